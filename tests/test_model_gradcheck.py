"""Whole-model gradient checks: every parameter and every initial state, float64, finite differences.

Kinds: vanilla (L=1), stacked (L=3), bidirectional (L=1), bidirectional stacked (L=2), each with a
zero or a random carried-in state and without or with fixed dropout masks (p=0.3).

Run as a script to print the "model kind | worst relative error" table:
    python tests/test_model_gradcheck.py
"""
from __future__ import annotations

import numpy as np
import pytest

from charrnn import model, ops
from charrnn.gradcheck import numeric_gradient, rel_error, worst

V, H, N, T = 6, 4, 2, 4
TOL = 1e-6
KINDS = {  # name -> (layers, bidirectional)
    "vanilla": (1, False),
    "stacked": (3, False),
    "bidirectional": (1, True),
    "bidirectional stacked": (2, True),
}


def make_case(kind: str, carried: bool, dropout: bool, seed: int = 0):
    """float64 params (init perturbed so biases are non-zero), ids, targets, h0 and masks.

    init_scale 0.5 keeps tanh out of saturation (the gradient-check recipe: a scale of about
    0.1-0.5), so no gradient entry is so small that finite-difference noise dominates it."""
    L, bidirectional = KINDS[kind]
    rng = np.random.default_rng(seed)
    params = model.init_params(V, H, L, bidirectional, rng, np.float64, scale=0.5)
    params = {k: v + rng.normal(scale=0.1, size=v.shape) for k, v in params.items()}
    spec = model.spec_of(params)
    x = rng.integers(0, V, size=(N, T))
    y = None if bidirectional else rng.integers(0, V, size=(N, T))
    h0 = {d: [rng.normal(scale=0.5, size=(N, H)) for _ in range(L)] for d in spec.dirs} if carried else None
    masks = model.dropout_masks(spec, N, T, 0.3, rng, np.float64) if dropout else None
    return params, x, y, h0, masks


def _with_state(h0, d, l, value):
    """A copy of the state dict with h0[d][l] replaced."""
    return {k: [value if (k, i) == (d, l) else a for i, a in enumerate(v)] for k, v in h0.items()}


def model_errors(kind: str, carried: bool, dropout: bool) -> dict[str, tuple[float, str]]:
    """{name: (relative error, worst-index description)} for every parameter and initial state.

    The analytic side is model.loss_and_grads; with carried=False it is called with h0=None and
    the numeric side differentiates with respect to explicit zero states.
    """
    params, x, y, h0, masks = make_case(kind, carried, dropout)
    spec = model.spec_of(params)
    result = model.loss_and_grads(params, x, y, h0, masks)
    assert set(result.grads) == set(params), "grads must use exactly the parameter names"
    state = h0 if h0 is not None else model.zero_state(spec, N, np.float64)
    errors = {}
    for key, value in params.items():
        def loss_of(a, key=key):
            return model.loss_and_grads({**params, key: a}, x, y, state, masks).loss
        numeric = numeric_gradient(loss_of, value)
        errors[key] = (rel_error(result.grads[key], numeric), worst(result.grads[key], numeric))
    assert set(result.dh0) == set(spec.dirs) and all(len(result.dh0[d]) == spec.L for d in spec.dirs)
    for d in spec.dirs:
        for l in range(spec.L):
            def loss_of_state(a, d=d, l=l):
                return model.loss_and_grads(params, x, y, _with_state(state, d, l, a), masks).loss
            numeric = numeric_gradient(loss_of_state, state[d][l])
            errors[f"h0.{d}.{l}"] = (rel_error(result.dh0[d][l], numeric), worst(result.dh0[d][l], numeric))
    return errors


def worst_errors() -> dict[str, float]:
    """{model kind: worst relative error over all parameters, states, h0 and dropout variants}."""
    return {kind: max(err for carried in (False, True) for dropout in (False, True)
                      for err, _ in model_errors(kind, carried, dropout).values())
            for kind in KINDS}


@pytest.mark.parametrize("form", ["row-major", "feature-major"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("carried", [False, True], ids=["h0-zero", "h0-carried"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_loss_and_grads_match_numeric(kind, carried, dropout, form, monkeypatch):
    # both forms of the recurrence's products (ops.StepPlan); small H would pick the row-major one
    monkeypatch.setattr(ops, "FEATURE_MAJOR_MIN_H", 10**9 if form == "row-major" else 1)
    errors = model_errors(kind, carried, dropout)
    L, bidirectional = KINDS[kind]
    assert len(errors) == len(model.param_shapes(V, H, L, bidirectional)) + L * (2 if bidirectional else 1)
    bad = {k: v for k, v in errors.items() if not v[0] < TOL}
    assert not bad, "; ".join(f"{k}: rel error {e:.3e} ({where})" for k, (e, where) in bad.items())


@pytest.mark.parametrize("kind", list(KINDS))
def test_backward_matches_numeric_projection_of_logits(kind):
    """model.forward / model.backward as a pair, with a random upstream R: f = sum(logits * R)."""
    params, x, _, h0, masks = make_case(kind, carried=True, dropout=True, seed=1)
    spec = model.spec_of(params)
    logits, _, cache = model.forward(params, x, h0, masks)
    R = np.random.default_rng(2).normal(size=logits.shape)
    grads, dh0 = model.backward(R, cache)
    for key, value in params.items():
        numeric = numeric_gradient(lambda a, key=key: np.sum(model.forward({**params, key: a}, x, h0, masks)[0] * R), value)
        err = rel_error(grads[key], numeric)
        assert err < TOL, f"{key}: rel error {err:.3e}; {worst(grads[key], numeric)}"
    for d in spec.dirs:
        for l in range(spec.L):
            numeric = numeric_gradient(
                lambda a, d=d, l=l: np.sum(model.forward(params, x, _with_state(h0, d, l, a), masks)[0] * R), h0[d][l])
            err = rel_error(dh0[d][l], numeric)
            assert err < TOL, f"h0.{d}.{l}: rel error {err:.3e}; {worst(dh0[d][l], numeric)}"


def test_loss_and_grads_rejects_wrong_target_kind():
    params, x, y, _, _ = make_case("vanilla", False, False)
    with pytest.raises(ValueError, match="targets"):
        model.loss_and_grads(params, x, None)
    params, x, _, _, _ = make_case("bidirectional", False, False)
    with pytest.raises(ValueError, match="cloze"):
        model.loss_and_grads(params, x, x)


if __name__ == "__main__":
    table = worst_errors()
    width = max(len(k) for k in table)
    print(f"{'model kind':<{width}} | worst relative error")
    print(f"{'-' * width}-|---------------------")
    for kind, err in table.items():
        print(f"{kind:<{width}} | {err:.2e}")
    raise SystemExit(0 if all(e < TOL for e in table.values()) else 1)
