"""Whole-model gradient checks: every parameter and every initial state, float64, finite differences.

Cells: rnn, lstm, gru. Kinds: one layer (L=1), stacked (L=3), bidirectional (L=1), bidirectional
stacked (L=2), each with a zero or a random carried-in state (the LSTM's h and c) and without or
with fixed dropout masks (p=0.3, and DropConnect masks on every W_hh, weight_drop=0.3), and with
each form of the per-step products.

The numeric side evaluates the loss in extended precision with a fourth-order stencil
(tests/gradcheck.py says why): with sigmoid gates and three stacked layers some entries are
1e-9 and smaller, below what float64 differences resolve to a relative 1e-6. Entries below
FLOOR = 1e-10 are held to an absolute error of FLOOR * TOL = 1e-16.

Run as a script to print the "cell | model kind | worst relative error" table:
    python tests/test_model_gradcheck.py
"""
from __future__ import annotations

import numpy as np
import pytest
from gradcheck import numeric_gradient, rel_error, worst

from charrnn import cells, model, ops

V, H, N, T = 6, 4, 2, 4
TOL = 1e-6
FLOOR = 1e-10
EPS = 1e-3  # the five-point stencil's step

pytestmark = pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18,
                                reason="np.longdouble is plain float64 on this platform")
KINDS = {  # name -> (layers, bidirectional)
    "one layer": (1, False),
    "stacked": (3, False),
    "bidirectional": (1, True),
    "bidirectional stacked": (2, True),
}


def make_case(cell: str, kind: str, carried: bool, dropout: bool, seed: int = 0):
    """spec, float64 params (init perturbed so biases are non-zero), ids, targets, h0 and masks.

    init_scale 0.5 keeps tanh and the gates out of saturation (the gradient-check recipe: a scale
    of about 0.1-0.5), so no gradient entry is so small that finite-difference noise dominates it."""
    L, bidirectional = KINDS[kind]
    rng = np.random.default_rng(seed)
    spec = model.make_spec(V, H, L, bidirectional, cell)
    params = model.init_params(spec, rng, np.float64, scale=0.5)
    params = {k: v + rng.normal(scale=0.1, size=v.shape) for k, v in params.items()}
    x = rng.integers(0, V, size=(N, T))
    y = None if bidirectional else rng.integers(0, V, size=(N, T))
    h0 = {d: [rng.normal(scale=0.5, size=(N, spec.state_size)) for _ in range(L)] for d in spec.dirs} if carried else None
    masks = model.dropout_masks(spec, N, T, 0.3, rng, np.float64, weight_drop=0.3) if dropout else None
    return spec, params, x, y, h0, masks


def extended_loss(spec, params, x, y, h0, masks):
    """The mean cross-entropy of model.forward, computed in np.longdouble from end to end."""
    ld = lambda a: np.asarray(a, dtype=np.longdouble)  # noqa: E731
    params = {k: ld(v) for k, v in params.items()}
    h0 = {d: [ld(a) for a in v] for d, v in h0.items()}
    logits, _, _ = model.forward(spec, params, x, h0, masks)
    z = logits - logits.max(axis=1, keepdims=True)  # (T*N, V)
    t = model.targets(x, y)
    return np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(t)), t])


def numeric(f, a):
    return numeric_gradient(f, a, EPS, order=4)


def _with_state(h0, d, l, value):
    """A copy of the state dict with h0[d][l] replaced."""
    return {k: [value if (k, i) == (d, l) else a for i, a in enumerate(v)] for k, v in h0.items()}


def model_errors(cell: str, kind: str, carried: bool, dropout: bool) -> dict[str, tuple[float, str]]:
    """{name: (relative error, worst-index description)} for every parameter and initial state.

    The analytic side is model.loss_and_grads; with carried=False it is called with h0=None and
    the numeric side differentiates with respect to explicit zero states.
    """
    spec, params, x, y, h0, masks = make_case(cell, kind, carried, dropout)
    result = model.loss_and_grads(spec, params, x, y, h0, masks)
    assert set(result.grads) == set(params), "grads must use exactly the parameter names"
    state = h0 if h0 is not None else model.zero_state(spec, N, np.float64)
    errors = {}
    for key, value in params.items():
        num = numeric(lambda a, key=key: extended_loss(spec, {**params, key: a}, x, y, state, masks), value)
        errors[key] = (rel_error(result.grads[key], num, FLOOR), worst(result.grads[key], num, FLOOR))
    assert set(result.dh0) == set(spec.dirs) and all(len(result.dh0[d]) == spec.L for d in spec.dirs)
    for d in spec.dirs:
        for l in range(spec.L):
            num = numeric(lambda a, d=d, l=l: extended_loss(spec, params, x, y, _with_state(state, d, l, a), masks),
                          state[d][l])
            errors[f"h0.{d}.{l}"] = (rel_error(result.dh0[d][l], num, FLOOR), worst(result.dh0[d][l], num, FLOOR))
    return errors


def worst_errors() -> dict[tuple[str, str], float]:
    """{(cell, model kind): worst relative error over all parameters, states, h0 and dropout variants}."""
    return {(cell, kind): max(err for carried in (False, True) for dropout in (False, True)
                              for err, _ in model_errors(cell, kind, carried, dropout).values())
            for cell in cells.NAMES for kind in KINDS}


@pytest.mark.parametrize("form", ["row-major", "feature-major"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("carried", [False, True], ids=["h0-zero", "h0-carried"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cell", cells.NAMES)
def test_loss_and_grads_match_numeric(cell, kind, carried, dropout, form, monkeypatch):
    # both forms of the per-step products (ops.Product); small H would pick the row-major one
    monkeypatch.setattr(ops, "FEATURE_MAJOR_MIN_H", 10**9 if form == "row-major" else 1)
    errors = model_errors(cell, kind, carried, dropout)
    L, bidirectional = KINDS[kind]
    spec = model.make_spec(V, H, L, bidirectional, cell)
    assert len(errors) == len(model.param_shapes(spec)) + L * len(spec.dirs)
    bad = {k: v for k, v in errors.items() if not v[0] < TOL}
    assert not bad, "; ".join(f"{k}: rel error {e:.3e} ({where})" for k, (e, where) in bad.items())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cell", cells.NAMES)
def test_backward_matches_numeric_projection_of_logits(cell, kind):
    """model.forward / model.backward as a pair, with a random upstream R: f = sum(logits * R)."""
    spec, params, x, _, h0, masks = make_case(cell, kind, carried=True, dropout=True, seed=1)
    logits, _, cache = model.forward(spec, params, x, h0, masks)
    R = np.random.default_rng(2).normal(size=logits.shape)
    grads, dh0 = model.backward(R, cache)
    ld = lambda a: np.asarray(a, dtype=np.longdouble)  # noqa: E731

    def f(p, s):  # sum(logits * R) in extended precision
        state = {d: [ld(a) for a in v] for d, v in s.items()}
        return np.sum(model.forward(spec, {k: ld(v) for k, v in p.items()}, x, state, masks)[0] * R)
    for key, value in params.items():
        num = numeric(lambda a, key=key: f({**params, key: a}, h0), value)
        err = rel_error(grads[key], num, FLOOR)
        assert err < TOL, f"{key}: rel error {err:.3e}; {worst(grads[key], num, FLOOR)}"
    for d in spec.dirs:
        for l in range(spec.L):
            num = numeric(lambda a, d=d, l=l: f(params, _with_state(h0, d, l, a)), h0[d][l])
            err = rel_error(dh0[d][l], num, FLOOR)
            assert err < TOL, f"h0.{d}.{l}: rel error {err:.3e}; {worst(dh0[d][l], num, FLOOR)}"


def test_loss_and_grads_rejects_wrong_target_kind():
    spec, params, x, y, _, _ = make_case("rnn", "one layer", False, False)
    with pytest.raises(ValueError, match="targets"):
        model.loss_and_grads(spec, params, x, None)
    spec, params, x, _, _, _ = make_case("lstm", "bidirectional", False, False)
    with pytest.raises(ValueError, match="cloze"):
        model.loss_and_grads(spec, params, x, x)


if __name__ == "__main__":
    table = worst_errors()
    print("| cell | model kind | worst relative error |\n|---|---|---|")
    for (cell, kind), err in table.items():
        print(f"| {cell} | {kind} | {err:.2e} |")
    raise SystemExit(0 if all(e < TOL for e in table.values()) else 1)
