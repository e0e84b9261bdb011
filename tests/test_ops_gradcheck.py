"""Finite-difference checks of every primitive in charrnn.ops (float64, tiny shapes).

Each check projects the primitive's output onto a *random* upstream gradient `dout`
(f = sum(out * dout)), so transposes and sign mistakes cannot cancel as they can with all-ones.
Parameters are drawn at scale 0.1-0.5 so that tanh is far from saturation.
"""
from __future__ import annotations

import numpy as np
import pytest
from gradcheck import numeric_gradient, rel_error, worst

from charrnn import cells, model, ops

N, S, V, H, D, K = 2, 3, 6, 5, 4, 3  # batch, steps, vocab, hidden, affine input, affine output
TOL = 1e-7


def assert_grad(name: str, analytic, numeric, tol: float = TOL) -> None:
    analytic = np.asarray(analytic)
    assert analytic.shape == numeric.shape, f"{name}: shape {analytic.shape} != {numeric.shape}"
    err = rel_error(analytic, numeric)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:g}; {worst(analytic, numeric)}"


def ids(rng, shape, V=V):
    return rng.integers(0, V, size=shape)


# ---- lookup -----------------------------------------------------------------------------------

def test_lookup_gradients(rng):
    x = ids(rng, (S, N))
    W = rng.normal(scale=0.3, size=(H, V))
    b = rng.normal(scale=0.3, size=H)
    dout = rng.normal(size=(S, N, H))
    pre, cache = ops.lookup_forward(x, W, b)
    dW, db = ops.lookup_backward(dout, cache)
    assert_grad("W", dW, numeric_gradient(lambda w: np.sum(ops.lookup_forward(x, w, b)[0] * dout), W))
    assert_grad("b", db, numeric_gradient(lambda bb: np.sum(ops.lookup_forward(x, W, bb)[0] * dout), b))


def test_lookup_forward_is_column_plus_bias(rng):
    x = ids(rng, (S, N))
    W = rng.normal(size=(H, V))
    b = rng.normal(size=H)
    pre, _ = ops.lookup_forward(x, W, b)
    assert pre.shape == (S, N, H)
    for s in range(S):
        for n in range(N):
            np.testing.assert_allclose(pre[s, n], W[:, x[s, n]] + b, rtol=0, atol=1e-15)


def test_lookup_backward_accumulates_repeated_ids(rng):
    # id 1 appears four times, id 3 twice, the others never
    x = np.array([[1, 1], [1, 3], [3, 1]])
    W = rng.normal(scale=0.3, size=(H, V))
    b = rng.normal(scale=0.3, size=H)
    dout = rng.normal(size=(S, N, H))
    _, cache = ops.lookup_forward(x, W, b)
    dW, db = ops.lookup_backward(dout, cache)
    expected = np.zeros((H, V))
    for s in range(S):
        for n in range(N):
            expected[:, x[s, n]] += dout[s, n]
    np.testing.assert_allclose(dW, expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(db, dout.sum(axis=(0, 1)), rtol=1e-13)
    assert np.all(dW[:, [0, 2, 4, 5]] == 0)
    # and the finite-difference oracle agrees
    assert_grad("W (repeated ids)", dW,
                numeric_gradient(lambda w: np.sum(ops.lookup_forward(x, w, b)[0] * dout), W))


@pytest.mark.parametrize("n_rows, n_out", [(0, 4), (1, 4), (7, 3), (50, 5), (50, 60)])
def test_scatter_add_rows_matches_add_at(rng, n_rows, n_out):
    idx = rng.integers(0, n_out, size=n_rows)
    rows = rng.normal(size=(n_rows, 3))
    start = rng.normal(size=(n_out, 3))
    expected = start.copy()
    np.add.at(expected, idx, rows)
    out = start.copy()
    idx_before, rows_before = idx.copy(), rows.copy()
    result = ops.scatter_add_rows(out, idx, rows)
    assert result is out
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(idx, idx_before)
    np.testing.assert_array_equal(rows, rows_before)


def test_scatter_add_rows_exact_on_integers(rng):
    # integer-valued floats: any summation order gives the exact result
    idx = rng.integers(0, 5, size=40)
    rows = rng.integers(-9, 10, size=(40, 2)).astype(np.float64)
    expected = np.zeros((5, 2))
    for i, r in zip(idx, rows):
        expected[i] += r
    out = ops.scatter_add_rows(np.zeros((5, 2)), idx, rows)
    np.testing.assert_array_equal(out, expected)


# ---- affine -----------------------------------------------------------------------------------

def test_affine_gradients(rng):
    M = N * S
    x = rng.normal(scale=0.5, size=(M, D))
    W = rng.normal(scale=0.3, size=(K, D))
    b = rng.normal(scale=0.3, size=K)
    dout = rng.normal(size=(M, K))
    out, cache = ops.affine_forward(x, W, b)
    np.testing.assert_allclose(out, x @ W.T + b, rtol=1e-14)
    dx, dW, db = ops.affine_backward(dout, cache)
    f = lambda x_, W_, b_: np.sum(ops.affine_forward(x_, W_, b_)[0] * dout)  # noqa: E731
    assert_grad("x", dx, numeric_gradient(lambda a: f(a, W, b), x))
    assert_grad("W", dW, numeric_gradient(lambda a: f(x, a, b), W))
    assert_grad("b", db, numeric_gradient(lambda a: f(x, W, a), b))


# ---- recurrence -------------------------------------------------------------------------------

def rnn_inputs(rng):
    pre = rng.normal(scale=0.5, size=(S, N, H))
    h0 = rng.normal(scale=0.5, size=(N, H))
    W_hh = rng.normal(scale=0.3, size=(H, H))
    dout = rng.normal(size=(S, N, H))
    return pre, h0, W_hh, dout


RNN = cells.get("rnn")


def test_rnn_gradients_including_dh0_and_dW_hh(rng):
    pre, h0, W_hh, dout = rnn_inputs(rng)
    hs, _, cache = RNN.forward(pre, h0, {"W_hh": W_hh})
    assert hs.shape == (S + 1, N, H)
    dpre, dh0, grads, _ = RNN.backward(dout, cache)
    dW_hh = grads["W_hh"]
    f = lambda p, h, w: np.sum(RNN.forward(p, h, {"W_hh": w})[0][1:] * dout)  # noqa: E731
    assert_grad("pre", dpre, numeric_gradient(lambda a: f(a, h0, W_hh), pre))
    assert_grad("h0", dh0, numeric_gradient(lambda a: f(pre, a, W_hh), h0))
    assert_grad("W_hh", dW_hh, numeric_gradient(lambda a: f(pre, h0, a), W_hh))
    # the check has power: the state is neither saturated nor trivially zero
    assert 0.05 < np.abs(hs[1:]).mean() < 0.9


def test_rnn_forward_matches_step_by_step(rng):
    pre, h0, W_hh, _ = rnn_inputs(rng)
    hs, h_last, _ = RNN.forward(pre, h0, {"W_hh": W_hh})
    np.testing.assert_array_equal(hs[0], h0)
    np.testing.assert_array_equal(h_last, hs[S])
    h = h0
    for t in range(S):
        h = np.tanh(h @ W_hh.T + pre[t])
        np.testing.assert_allclose(hs[t + 1], h, rtol=1e-13, atol=1e-15)


def test_rnn_step_writes_out(rng):
    pre, h0, W_hh, _ = rnn_inputs(rng)
    out = np.empty((N, H))
    result = RNN.step(h0, pre[0], h0 @ W_hh.T, {"W_hh": W_hh}, out)
    assert result is out
    np.testing.assert_allclose(out, np.tanh(W_hh @ h0.T + pre[0].T).T, rtol=1e-13)


# ---- softmax cross-entropy --------------------------------------------------------------------

def reference_ce(logits, y):
    """Mean -log softmax(logits)[y] via np.logaddexp.reduce (an independent log-sum-exp)."""
    lse = np.logaddexp.reduce(np.asarray(logits, np.float64), axis=1)
    return float(np.mean(lse - logits[np.arange(len(y)), y]))


def test_softmax_cross_entropy_gradient_and_value(rng):
    M = N * S
    logits = rng.normal(scale=2.0, size=(M, V))
    y = ids(rng, M)
    loss, dlogits = ops.softmax_cross_entropy(logits, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(reference_ce(logits, y), rel=1e-13)
    assert_grad("logits", dlogits, numeric_gradient(lambda z: ops.softmax_cross_entropy(z, y)[0], logits))
    # the gradient is (softmax - onehot) / M: each row sums to zero
    np.testing.assert_allclose(dlogits.sum(axis=1), 0, atol=1e-15)


def test_softmax_cross_entropy_is_stable_for_huge_logits(rng):
    M = 8
    logits = rng.normal(size=(M, V)) * 1e4
    y = ids(rng, M)
    loss, dlogits = ops.softmax_cross_entropy(logits, y)
    assert np.isfinite(loss)
    assert np.all(np.isfinite(dlogits))
    ref = reference_ce(logits, y)
    assert np.isfinite(ref) and ref > 1000  # random targets at this scale are very wrong
    assert loss == pytest.approx(ref, rel=1e-12)
    # the argmax target gives (almost) zero loss, without overflow
    best = logits.argmax(axis=1)
    loss_best, _ = ops.softmax_cross_entropy(logits, best)
    assert loss_best == pytest.approx(reference_ce(logits, best), abs=1e-12)


def test_cross_entropy_sum_agrees_with_mean(rng):
    logits = rng.normal(scale=3.0, size=(7, V))
    y = ids(rng, 7)
    total = ops.cross_entropy_sum(logits, y)
    assert total == pytest.approx(7 * reference_ce(logits, y), rel=1e-13)


# ---- dropout (applied by the model, masks from ops.dropout_mask) -------------------------------

def test_dropout_gradients_through_model(rng):
    """Stacked model with fixed masks: gradients flow through the inter-layer and head masks."""
    spec = model.make_spec(V, 4, 2, False)
    params = model.init_params(spec, rng, np.float64)
    params = {k: v + rng.normal(scale=0.1, size=v.shape) for k, v in params.items()}
    x = ids(rng, (N, S))
    masks = model.dropout_masks(spec, N, S, 0.3, rng, np.float64)
    assert set(masks) == {"layers.0.fwd", "out"}
    R = rng.normal(size=(S * N, V))
    logits, _, cache = model.forward(spec, params, x, masks=masks)
    plain, _, _ = model.forward(spec, params, x)
    assert not np.allclose(logits, plain)  # the masks are really applied
    grads, _ = model.backward(R, cache)
    for key in ("layers.0.fwd.W_xh", "layers.0.fwd.W_hh", "layers.1.fwd.W_xh", "out.W_ho"):
        def f(a, key=key):
            return np.sum(model.forward(spec, {**params, key: a}, x, masks=masks)[0] * R)
        assert_grad(key, grads[key], numeric_gradient(f, params[key]))


# ---- purity: forward and backward never modify what they are given ------------------------------

def _snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays]


def _unchanged(before, after, what):
    for i, (b, a) in enumerate(zip(before, after)):
        np.testing.assert_array_equal(a, b, err_msg=f"{what} modified argument {i}")


def test_primitives_do_not_modify_inputs(rng):
    x = ids(rng, (S, N))
    W, b = rng.normal(size=(H, V)), rng.normal(size=H)
    args = (x, W, b)
    before = _snapshot(*args)
    pre, cache = ops.lookup_forward(*args)
    _unchanged(before, args, "lookup_forward")
    dpre = rng.normal(size=pre.shape)
    before = _snapshot(dpre, x)
    ops.lookup_backward(dpre, cache)
    _unchanged(before, (dpre, x), "lookup_backward")

    A, Wa, ba = rng.normal(size=(6, D)), rng.normal(size=(K, D)), rng.normal(size=K)
    before = _snapshot(A, Wa, ba)
    out, cache = ops.affine_forward(A, Wa, ba)
    _unchanged(before, (A, Wa, ba), "affine_forward")
    dout = rng.normal(size=out.shape)
    before = _snapshot(dout, A, Wa)
    ops.affine_backward(dout, cache)
    _unchanged(before, (dout, A, Wa), "affine_backward")

    pre, h0, W_hh, dh = rnn_inputs(rng)
    before = _snapshot(pre, h0, W_hh)
    hs, _, cache = RNN.forward(pre, h0, {"W_hh": W_hh})
    _unchanged(before, (pre, h0, W_hh), "rnn forward")
    before = _snapshot(dh, hs, W_hh)
    RNN.backward(dh, cache, keep=True)
    _unchanged(before, (dh, hs, W_hh), "rnn backward")

    logits, y = rng.normal(size=(6, V)), ids(rng, 6)
    before = _snapshot(logits, y)
    ops.softmax_cross_entropy(logits, y)
    ops.cross_entropy_sum(logits, y)
    _unchanged(before, (logits, y), "softmax_cross_entropy / cross_entropy_sum")


@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_model_does_not_modify_inputs(rng, bidirectional, cell):
    spec = model.make_spec(V, 4, 2, bidirectional, cell)
    params = model.init_params(spec, rng, np.float64)
    x = ids(rng, (N, S))
    h0 = {d: [rng.normal(scale=0.3, size=(N, spec.state_size)) for _ in range(2)] for d in spec.dirs}
    masks = model.dropout_masks(spec, N, S, 0.3, rng, np.float64)
    y = None if bidirectional else ids(rng, (N, S))
    keys = sorted(params)
    before = _snapshot(x, *[params[k] for k in keys], *[a for d in spec.dirs for a in h0[d]], *masks.values())
    model.loss_and_grads(spec, params, x, y, h0, masks)
    after = (x, *[params[k] for k in keys], *[a for d in spec.dirs for a in h0[d]], *masks.values())
    _unchanged(before, after, "model.loss_and_grads")
