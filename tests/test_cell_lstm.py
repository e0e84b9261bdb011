"""The LSTM cell against a textbook float64 loop, finite differences, and its own contracts
(step = forward, inputs untouched, dtype kept, PyTorch's layout and the forget-gate bias)."""
import numpy as np
import pytest
from gradcheck import numeric_gradient, rel_error, worst

from charrnn import ops
from charrnn.cells.lstm import LSTM

CELL = LSTM()


@pytest.fixture(params=["row-major", "feature-major"])
def form(request, monkeypatch):
    """Run a test with each form of the per-step product (ops.Product), as in test_fast_paths."""
    monkeypatch.setattr(ops, "FEATURE_MAJOR_MIN_H", 10**9 if request.param == "row-major" else 1)
    return request.param


def _inputs(rng, S, N, H, scale=0.5, dtype=np.float64):
    """pre (S, N, 4H), s0 (N, 2H), W_hh (4H, H), dh (S, N, H): moderate values, nothing saturates."""
    pre = rng.standard_normal((S, N, 4 * H)) * scale
    s0 = rng.standard_normal((N, 2 * H)) * scale
    W_hh = rng.standard_normal((4 * H, H)) * scale / np.sqrt(H)
    dh = rng.standard_normal((S, N, H))  # random upstream gradient, not all ones
    return tuple(a.astype(dtype) for a in (pre, s0, W_hh, dh))


# ---- the textbook LSTM: exp-based sigmoid, one matrix per gate, hand-written BPTT -------------

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _textbook_forward(pre, s0, W_hh):
    """Returns hs (S+1, N, H), s_last (N, 2H) and per step (i, f, g, o, c_prev, c, h_prev)."""
    H = W_hh.shape[1]
    W_i, W_f, W_g, W_o = (W_hh[k * H:(k + 1) * H] for k in range(4))
    h, c = s0[:, :H], s0[:, H:]
    hs, steps = [h], []
    for p in pre:
        p_i, p_f, p_g, p_o = np.split(p, 4, axis=1)
        i = _sigmoid(p_i + h @ W_i.T)
        f = _sigmoid(p_f + h @ W_f.T)
        g = np.tanh(p_g + h @ W_g.T)
        o = _sigmoid(p_o + h @ W_o.T)
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        steps.append((i, f, g, o, c, c_new, h))
        h, c = h_new, c_new
        hs.append(h)
    return np.stack(hs), np.concatenate([h, c], axis=1), steps


def _textbook_backward(dh, steps, W_hh):
    """Returns dpre (S, N, 4H), ds0 (N, 2H), dW_hh (4H, H), dhs (S+1, N, H)."""
    S, N, H = dh.shape
    W = [W_hh[k * H:(k + 1) * H] for k in range(4)]
    dh_next, dc_next = np.zeros((N, H)), np.zeros((N, H))
    dpre, dhs, dW = [None] * S, [None] * (S + 1), np.zeros_like(W_hh)
    for t in range(S - 1, -1, -1):
        i, f, g, o, c_prev, c, h_prev = steps[t]
        dh_t = dh[t] + dh_next
        dhs[t + 1] = dh_t
        do = dh_t * np.tanh(c)
        dc = dc_next + dh_t * o * (1 - np.tanh(c) ** 2)
        da = [dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g ** 2), do * o * (1 - o)]
        dpre[t] = np.concatenate(da, axis=1)
        dh_next = sum(da[k] @ W[k] for k in range(4))
        dc_next = dc * f
        for k in range(4):
            dW[k * H:(k + 1) * H] += da[k].T @ h_prev
    dhs[0] = dh_next
    return np.stack(dpre), np.concatenate([dh_next, dc_next], axis=1), dW, np.stack(dhs)


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=what)


def test_forward_and_backward_equal_the_textbook_loop(rng, form):
    S, N, H = 7, 3, 5
    pre, s0, W_hh, dh = _inputs(rng, S, N, H, scale=1.0)
    hs, s_last, cache = CELL.forward(pre, s0, {"W_hh": W_hh})
    ref_hs, ref_last, steps = _textbook_forward(pre, s0, W_hh)
    _close(hs, ref_hs, "hs")
    _close(s_last, ref_last, "s_last")
    assert hs.shape == (S + 1, N, H) and hs.flags.c_contiguous and s_last.shape == (N, 2 * H)
    assert not np.shares_memory(s_last, hs) and not np.shares_memory(s_last, cache.cs)
    dpre, ds0, grads, dhs = CELL.backward(dh, cache, keep=True)
    ref_dpre, ref_ds0, ref_dW, ref_dhs = _textbook_backward(dh, steps, W_hh)
    _close(dpre, ref_dpre, "dpre")
    _close(ds0, ref_ds0, "ds0")
    _close(grads["W_hh"], ref_dW, "dW_hh")
    _close(dhs, ref_dhs, "dhs")
    assert set(grads) == {"W_hh"} and dpre.shape == (S, N, 4 * H) and ds0.shape == (N, 2 * H)


def test_gradients_match_finite_differences(rng):
    """Scalar loss sum(hs[1:] * dout): analytic gradients w.r.t. pre, both halves of s0 and W_hh."""
    S, N, H = 4, 2, 3
    pre, s0, W_hh, dout = _inputs(rng, S, N, H)

    def loss(pre_, s0_, W_):
        hs, _, _ = CELL.forward(pre_, s0_, {"W_hh": W_})
        return float(np.sum(hs[1:] * dout))

    _, _, cache = CELL.forward(pre, s0, {"W_hh": W_hh})
    dpre, ds0, grads, _ = CELL.backward(dout, cache)
    numeric = {"pre": numeric_gradient(lambda a: loss(a, s0, W_hh), pre),
               "s0": numeric_gradient(lambda a: loss(pre, a, W_hh), s0),
               "W_hh": numeric_gradient(lambda a: loss(pre, s0, a), W_hh)}
    for name, analytic in (("pre", dpre), ("s0", ds0), ("W_hh", grads["W_hh"])):
        err = rel_error(analytic, numeric[name])
        assert err < 1e-6, f"{name}: rel error {err:.2e}, {worst(analytic, numeric[name])}"
    assert np.abs(ds0[:, H:]).max() > 1e-3  # the c half of s0 was really checked


def test_kept_state_gradients_are_the_total_gradient_at_each_h(rng):
    """dhs[t] = dL/dh_t with everything downstream of h_t (the loss term at t and all later
    steps through both h and c), checked by perturbing h_t and rerunning the rest of the window."""
    S, N, H = 4, 2, 3
    pre, s0, W_hh, dout = _inputs(rng, S, N, H)
    p = {"W_hh": W_hh}
    hs, _, cache = CELL.forward(pre, s0, p)
    dpre, ds0, grads, dhs = CELL.backward(dout, cache, keep=True)
    assert dhs.shape == (S + 1, N, H)
    np.testing.assert_array_equal(dhs[0], ds0[:, :H])
    for t in range(S + 1):
        c_t = cache.cs[t]

        def rest(h, t=t, c_t=c_t):
            later, _, _ = CELL.forward(pre[t:], np.concatenate([h, c_t], axis=1), p)
            return float(np.sum(later[1:] * dout[t:]) + (np.sum(h * dout[t - 1]) if t > 0 else 0.0))

        numeric = numeric_gradient(rest, hs[t])
        assert rel_error(dhs[t], numeric) < 1e-6, f"t={t}: {worst(dhs[t], numeric)}"
    plain = CELL.backward(dout, cache)
    assert plain.dhs is None
    np.testing.assert_array_equal(plain.dpre, dpre)
    np.testing.assert_array_equal(plain.ds0, ds0)
    np.testing.assert_array_equal(plain.grads["W_hh"], grads["W_hh"])


def test_steps_reproduce_the_window(rng, form):
    """The sampler's step, fed rec_t = h_{t-1} W_hh^T, gives forward's hs and s_last."""
    S, N, H = 6, 3, 4
    pre, s0, W_hh, _ = _inputs(rng, S, N, H, scale=1.0)
    hs, s_last, _ = CELL.forward(pre, s0, {"W_hh": W_hh})
    s, out = s0.copy(), np.empty_like(s0)
    for t in range(S):
        # the sampler hands over a transposed view in the feature-major form: give one here too
        rec = (W_hh @ s[:, :H].T).T if form == "feature-major" else s[:, :H] @ W_hh.T  # (N, 4H)
        returned = CELL.step(s, pre[t], rec, {"W_hh": W_hh}, out)
        assert returned is out
        np.testing.assert_allclose(out[:, :H], hs[t + 1], rtol=1e-13, atol=1e-15)
        s, out = out, s  # swapped buffers, as the sampler does
    np.testing.assert_allclose(s, s_last, rtol=1e-13, atol=1e-15)


def test_no_input_is_modified(rng, form):
    S, N, H = 5, 2, 3
    pre, s0, W_hh, dh = _inputs(rng, S, N, H)
    p = {"W_hh": W_hh, "W_xh": rng.standard_normal((4 * H, 7)), "b_h": rng.standard_normal(4 * H)}
    before = {k: v.copy() for k, v in {"pre": pre, "s0": s0, "dh": dh, **p}.items()}
    hs, s_last, cache = CELL.forward(pre, s0, p)
    kept = {f"cache.{k}": v.copy() for k, v in cache._asdict().items()}
    kept["hs"] = hs.copy()
    CELL.backward(dh, cache, keep=True)
    CELL.backward(dh, cache)
    rec, out = s0[:, :H] @ W_hh.T, np.empty_like(s0)
    before["rec"], before["pre_t"] = rec.copy(), pre[0].copy()
    CELL.step(s0, pre[0], rec, p, out)
    now = {"pre": pre, "s0": s0, "dh": dh, **p, "rec": rec, "pre_t": pre[0], "hs": hs,
           **{f"cache.{k}": v for k, v in cache._asdict().items()}}
    for name, value in {**before, **kept}.items():
        np.testing.assert_array_equal(now[name], value, err_msg=name)


def test_float32_runs_in_float32_and_agrees_with_float64(rng, form):
    S, N, H = 6, 3, 5
    args64 = _inputs(rng, S, N, H, scale=1.0)
    pre, s0, W_hh, dh = (a.astype(np.float32) for a in args64)
    hs, s_last, cache = CELL.forward(pre, s0, {"W_hh": W_hh})
    dpre, ds0, grads, dhs = CELL.backward(dh, cache, keep=True)
    out = CELL.step(s0, pre[0], s0[:, :H] @ W_hh.T, {"W_hh": W_hh}, np.empty_like(s0))
    for name, a in {"hs": hs, "s_last": s_last, "dpre": dpre, "ds0": ds0, "dW_hh": grads["W_hh"],
                    "dhs": dhs, "step": out, **cache._asdict()}.items():
        assert a.dtype == np.float32, name
    hs64, _, cache64 = CELL.forward(args64[0], args64[1], {"W_hh": args64[2]})
    dpre64 = CELL.backward(args64[3], cache64).dpre
    np.testing.assert_allclose(hs, hs64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dpre, dpre64, rtol=1e-3, atol=1e-5)


def test_an_empty_window_passes_the_state_through(rng):
    """S = 0 happens: a cloze tower of a one-character window runs no steps."""
    N, H = 2, 3
    pre, s0, W_hh, dh = _inputs(rng, 0, N, H)
    hs, s_last, cache = CELL.forward(pre, s0, {"W_hh": W_hh})
    np.testing.assert_array_equal(hs, s0[None, :, :H])
    np.testing.assert_array_equal(s_last, s0)
    dpre, ds0, grads, dhs = CELL.backward(dh, cache, keep=True)
    assert dpre.shape == (0, N, 4 * H) and not ds0.any() and not grads["W_hh"].any() and dhs.shape == (1, N, H)


def test_layout_and_initialisation_follow_pytorch_and_jozefowicz(rng):
    H, D = 4, 6
    assert CELL.name == "lstm" and CELL.gates == ("i", "f", "g", "o") and CELL.states == ("h", "c")
    assert CELL.param_shapes(D, H) == {"W_xh": (4 * H, D), "W_hh": (4 * H, H), "b_h": (4 * H,)}
    assert CELL.state_size(H) == 2 * H
    b = CELL.bias_init(H)
    assert b.dtype == np.float64
    np.testing.assert_array_equal(b, np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)])
    p = CELL.init(D, H, rng, 0.9, embedding=False)
    np.testing.assert_array_equal(p["b_h"], b)
    for k in range(4):  # every gate's (H, H) block is a scaled orthogonal matrix
        block = p["W_hh"][k * H:(k + 1) * H]
        np.testing.assert_allclose(block @ block.T, 0.81 * np.eye(H), atol=1e-12)


def test_carry_stats_describe_the_forget_gate(rng):
    S, N, H = 5, 3, 4
    pre, s0, W_hh, _ = _inputs(rng, S, N, H, scale=2.0)
    _, _, cache = CELL.forward(pre, s0, {"W_hh": W_hh})
    _, _, steps = _textbook_forward(pre, s0, W_hh)
    f = np.stack([step[1] for step in steps])  # (S, N, H)
    stats = CELL.carry_stats(cache)
    assert stats["mean forget gate"] == pytest.approx(f.mean(), rel=1e-12)
    assert stats["geometric mean forget gate"] == pytest.approx(np.exp(np.log(f).mean()), rel=1e-12)
    assert stats["fraction forget gate > 0.9"] == pytest.approx((f > 0.9).mean())
    assert all(isinstance(v, float) for v in stats.values())
