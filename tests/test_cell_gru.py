"""The GRU cell (charrnn/cells/gru.py) against a plain loop of PyTorch's nn.GRU equations,
finite differences, and its own step function."""
import numpy as np
import pytest
from gradcheck import numeric_gradient, rel_error, worst

from charrnn import ops
from charrnn.cells.gru import GRU

CELL = GRU()


@pytest.fixture(params=["row-major", "feature-major"])
def form(request, monkeypatch):
    """Run a test with each form of the per-step product (ops.Product), as in test_fast_paths."""
    monkeypatch.setattr(ops, "FEATURE_MAJOR_MIN_H", 10**9 if request.param == "row-major" else 1)
    return request.param


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def reference_forward(pre, h0, W_hh, b_hn):
    """The textbook loop, one gate at a time, with per-gate blocks of W_hh (torch's row order)."""
    H = h0.shape[1]
    W_r, W_z, W_n = W_hh[:H], W_hh[H : 2 * H], W_hh[2 * H :]
    hs, saved = [h0], []
    for t in range(pre.shape[0]):
        h = hs[-1]
        r = sigmoid(pre[t, :, :H] + h @ W_r.T)
        z = sigmoid(pre[t, :, H : 2 * H] + h @ W_z.T)
        m = h @ W_n.T + b_hn
        n = np.tanh(pre[t, :, 2 * H :] + r * m)
        hs.append((1 - z) * n + z * h)
        saved.append((r, z, n, m))
    return np.stack(hs), saved


def reference_backward(dh, hs, saved, W_hh):
    """Its BPTT, written out gate by gate. Returns dpre, dh0, dW_hh, db_hn, dhs (total dL/dh_t)."""
    S, N, H = dh.shape
    W_r, W_z, W_n = W_hh[:H], W_hh[H : 2 * H], W_hh[2 * H :]
    dpre, dW, db_hn = np.zeros((S, N, 3 * H)), np.zeros((3 * H, H)), np.zeros(H)
    dhs = np.zeros((S + 1, N, H))
    dh_next = np.zeros((N, H))
    for t in reversed(range(S)):
        r, z, n, m = saved[t]
        h_prev = hs[t]
        d = dh[t] + dh_next
        dhs[t + 1] = d
        da_n = d * (1 - z) * (1 - n**2)
        da_z = d * (h_prev - n) * z * (1 - z)
        dm = da_n * r
        da_r = da_n * m * r * (1 - r)
        dpre[t] = np.concatenate([da_r, da_z, da_n], axis=1)
        dW[:H] += da_r.T @ h_prev
        dW[H : 2 * H] += da_z.T @ h_prev
        dW[2 * H :] += dm.T @ h_prev
        db_hn += dm.sum(axis=0)
        dh_next = d * z + da_r @ W_r + da_z @ W_z + dm @ W_n
    dhs[0] = dh_next
    return dpre, dh_next, dW, db_hn, dhs


def make(rng, S=5, N=3, H=4, scale=0.6, dtype=np.float64):
    pre = (rng.standard_normal((S, N, 3 * H)) * scale).astype(dtype)
    s0 = (rng.standard_normal((N, H)) * scale).astype(dtype)
    p = {
        "W_hh": (rng.standard_normal((3 * H, H)) * scale).astype(dtype),
        "b_hn": (rng.standard_normal(H) * scale).astype(dtype),
    }
    dh = rng.standard_normal((S, N, H)).astype(dtype)
    return pre, s0, p, dh


def close(a, b, what):
    err = rel_error(a, b)
    assert np.allclose(a, b, rtol=1e-12, atol=1e-14), f"{what}: rel error {err}, {worst(a, b)}"


def test_forward_and_backward_equal_the_reference_loop(rng, form):
    pre, s0, p, dh = make(rng, S=6, N=3, H=5)
    hs, s_last, cache = CELL.forward(pre, s0, p)
    ref_hs, saved = reference_forward(pre, s0, p["W_hh"], p["b_hn"])
    assert hs.shape == (7, 3, 5) and hs.flags.c_contiguous
    close(hs, ref_hs, "hs")
    close(s_last, ref_hs[-1], "s_last")
    np.testing.assert_array_equal(hs[0], s0)
    dpre, ds0, grads, dhs = CELL.backward(dh, cache)
    ref = reference_backward(dh, ref_hs, saved, p["W_hh"])
    assert dhs is None and set(grads) == {"W_hh", "b_hn"}
    assert dpre.shape == pre.shape and ds0.shape == s0.shape
    for name, got, want in zip(["dpre", "ds0", "dW_hh", "db_hn"], [dpre, ds0, grads["W_hh"], grads["b_hn"]], ref):
        close(got, want, name)


def test_keep_returns_the_total_gradient_at_every_state(rng, form):
    pre, s0, p, dh = make(rng)
    hs, _, cache = CELL.forward(pre, s0, p)
    kept = CELL.backward(dh, cache, keep=True)
    plain = CELL.backward(dh, cache)
    _, saved = reference_forward(pre, s0, p["W_hh"], p["b_hn"])
    close(kept.dhs, reference_backward(dh, hs, saved, p["W_hh"])[4], "dhs")
    np.testing.assert_array_equal(kept.dhs[0], kept.ds0)
    for a, b in [(kept.dpre, plain.dpre), (kept.ds0, plain.ds0), (kept.grads["W_hh"], plain.grads["W_hh"])]:
        np.testing.assert_array_equal(a, b)


def test_gradients_match_finite_differences(rng):
    pre, s0, p, _ = make(rng, S=4, N=2, H=3, scale=0.5)
    dout = rng.standard_normal((4, 2, 3))  # a random projection, not all ones

    def loss(pre, s0, W_hh, b_hn):
        return float(np.sum(CELL.forward(pre, s0, {"W_hh": W_hh, "b_hn": b_hn})[0][1:] * dout))

    _, _, cache = CELL.forward(pre, s0, p)
    dpre, ds0, grads, _ = CELL.backward(dout, cache)
    args = {"pre": pre, "s0": s0, "W_hh": p["W_hh"], "b_hn": p["b_hn"]}
    analytic = {"pre": dpre, "s0": ds0, **grads}
    for name in args:
        def f(a, name=name):
            return loss(**{**args, name: a})

        numeric = numeric_gradient(f, args[name])
        assert rel_error(analytic[name], numeric) < 1e-6, f"d{name}: {worst(analytic[name], numeric)}"


def test_step_reproduces_forward(rng, form):
    pre, s0, p, _ = make(rng, S=6, N=3, H=5)
    hs, s_last, _ = CELL.forward(pre, s0, p)
    h = s0.copy()
    for t in range(pre.shape[0]):
        out = np.empty_like(h)
        assert CELL.step(h, pre[t], h @ p["W_hh"].T, p, out) is out
        np.testing.assert_allclose(out, hs[t + 1], rtol=1e-13, atol=1e-15)
        h = out
    np.testing.assert_allclose(h, s_last, rtol=1e-13, atol=1e-15)


def test_step_may_write_over_its_state(rng):
    pre, s0, p, _ = make(rng, S=1)
    rec = s0 @ p["W_hh"].T
    want = CELL.step(s0, pre[0], rec, p, np.empty_like(s0))
    h = s0.copy()
    assert CELL.step(h, pre[0], rec, p, h) is h
    np.testing.assert_array_equal(h, want)


def test_no_input_is_modified(rng, form):
    pre, s0, p, dh = make(rng)
    before = [a.copy() for a in (pre, s0, p["W_hh"], p["b_hn"], dh)]
    hs, _, cache = CELL.forward(pre, s0, p)
    cached = [a.copy() for a in cache]
    first = CELL.backward(dh, cache, keep=True)
    second = CELL.backward(dh, cache, keep=True)  # the cache is read, never written
    for a, b in zip(first, second):
        if isinstance(a, dict):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        else:
            np.testing.assert_array_equal(a, b)
    rec = s0 @ p["W_hh"].T
    rec_before = rec.copy()
    CELL.step(s0, pre[0], rec, p, np.empty_like(s0))
    for a, b in zip((pre, s0, p["W_hh"], p["b_hn"], dh, rec), before + [rec_before]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(cache, cached):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("H", [4, 512])  # 512: the feature-major form at its real threshold
def test_float32_keeps_its_dtype_and_stays_close_to_float64(rng, H):
    S, N = 3, 2
    pre, s0, p, dh = make(rng, S=S, N=N, H=H, scale=0.5 / np.sqrt(H) if H > 4 else 0.5)
    single = [a.astype(np.float32) for a in (pre, s0, p["W_hh"], p["b_hn"], dh)]
    p32 = {"W_hh": single[2], "b_hn": single[3]}
    hs, s_last, cache = CELL.forward(single[0], single[1], p32)
    dpre, ds0, grads, dhs = CELL.backward(single[4], cache, keep=True)
    out = CELL.step(single[1], single[0][0], single[1] @ p32["W_hh"].T, p32, np.empty_like(single[1]))
    for a in (hs, s_last, dpre, ds0, grads["W_hh"], grads["b_hn"], dhs, out, *cache):
        assert a.dtype == np.float32
    hs64, _, cache64 = CELL.forward(pre, s0, p)
    dpre64 = CELL.backward(dh, cache64)[0]
    np.testing.assert_allclose(hs, hs64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dpre, dpre64, rtol=1e-3, atol=1e-5)


def test_parameters_follow_torch_layout_and_init(rng):
    assert CELL.name == "gru" and CELL.gates == ("r", "z", "n") and CELL.extras == ("b_hn",)
    shapes = CELL.param_shapes(7, 5)
    assert shapes == {"W_xh": (15, 7), "W_hh": (15, 5), "b_h": (15,), "b_hn": (5,)}
    assert CELL.state_size(5) == 5
    p = CELL.init(7, 5, rng, scale=0.9, embedding=True)
    assert {k: v.shape for k, v in p.items()} == shapes
    assert not p["b_h"].any() and not p["b_hn"].any()
    for block in CELL.hh_blocks(p["W_hh"]).values():  # each gate's block: 0.9 times orthogonal
        np.testing.assert_allclose(block @ block.T, 0.81 * np.eye(5), atol=1e-12)


def test_carry_stats_report_the_update_gate(rng):
    pre, s0, p, _ = make(rng)
    _, _, cache = CELL.forward(pre, s0, p)
    _, saved = reference_forward(pre, s0, p["W_hh"], p["b_hn"])
    z = np.stack([s[1] for s in saved])
    stats = CELL.carry_stats(cache)
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["mean update gate z"] == pytest.approx(z.mean(), rel=1e-12)
    assert stats["geometric mean z (direct-path factor per step)"] == pytest.approx(np.exp(np.log(z).mean()), rel=1e-12)


def test_carry_stats_of_a_saturated_update_gate_are_zero_without_warnings(rng):
    pre, s0, p, _ = make(rng, dtype=np.float32)
    pre[:, :, 4:8] = -200  # a_z far below 0: z is exactly 0 in float32
    _, _, cache = CELL.forward(pre, s0, p)
    stats = CELL.carry_stats(cache)  # the suite turns warnings into errors (pyproject.toml)
    assert stats["mean update gate z"] == 0.0
    assert stats["geometric mean z (direct-path factor per step)"] == 0.0
