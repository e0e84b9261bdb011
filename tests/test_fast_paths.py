"""Every speed trick against the straightforward computation it replaces."""
import math

import numpy as np
import pytest

from charrnn import cells, model, ops, optim, sample
from charrnn.config import TrainConfig
from charrnn.vocab import Vocab


def test_row_table_is_row_major_and_equals_transpose_plus_bias(rng):
    W, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    table = ops.row_table(W, b)
    assert table.flags.c_contiguous
    np.testing.assert_array_equal(table, W.T + b)


@pytest.mark.parametrize("V, M", [(3, 50), (40, 30), (1000, 200)])
def test_sorted_scatter_add_equals_add_at(rng, V, M):
    idx = rng.integers(0, V, M)
    rows = rng.standard_normal((M, 6))
    fast, slow = np.zeros((V, 6)), np.zeros((V, 6))
    ops.scatter_add_rows(fast, idx, rows)
    np.add.at(slow, idx, rows)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)


@pytest.fixture(params=["row-major", "feature-major"])
def form(request, monkeypatch):
    """Run a test with each form of the per-step products (ops.Product)."""
    monkeypatch.setattr(ops, "FEATURE_MAJOR_MIN_H", 10**9 if request.param == "row-major" else 1)
    return request.param


@pytest.mark.parametrize("fm", [False, True], ids=["row-major", "feature-major"])
def test_a_product_plan_in_either_form_equals_the_product(rng, fm):
    x, M = rng.standard_normal((3, 4)), rng.standard_normal((8, 4))
    plan = ops.product(M, 3, fm)
    assert plan.M.flags.c_contiguous and plan.fm == fm
    if fm:  # where the alignment matters (ops.aligned_empty)
        assert plan.M.ctypes.data % 64 == 0 and plan.out.ctypes.data % 64 == 0 and plan.out.shape == (8, 3)
    np.testing.assert_allclose(ops.times(plan, x), x @ M.T, rtol=1e-13)


@pytest.mark.parametrize("fm", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_products_from_blocked_copies_equal_plain_products(rng, fm, transposed):
    A = rng.standard_normal((37, 21))  # 37 and 21: several 16-wide blocks and a partial one
    M = A.T if transposed else A[:, :19]  # a transposed view, or a contiguous-row slice
    x = rng.standard_normal((3, M.shape[1]))
    np.testing.assert_allclose(ops.times(ops.product(M, 3, fm), x), x @ M.T, rtol=1e-13)
    np.testing.assert_array_equal(ops.aligned_copy(M), M)
    np.testing.assert_array_equal(ops.contiguous(M), M)
    assert ops.contiguous(M).flags.c_contiguous


def test_the_form_follows_the_hidden_size():
    assert ops.feature_major(ops.FEATURE_MAJOR_MIN_H) and not ops.feature_major(ops.FEATURE_MAJOR_MIN_H - 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_aligned_arrays_start_on_a_cache_line_and_copy_exactly(rng, dtype, shape):
    for _ in range(8):  # several allocations: malloc alone gives only 16-byte alignment
        a = rng.standard_normal(shape).astype(dtype)
        b = ops.aligned_copy(a.T)
        assert b.ctypes.data % 64 == 0 and b.flags.c_contiguous and b.dtype == dtype
        np.testing.assert_array_equal(b, a.T)
        e = ops.aligned_empty(shape, dtype)
        assert e.shape == shape and e.ctypes.data % 64 == 0 and e.flags.c_contiguous


def test_rnn_loops_equal_a_plain_float64_recurrence(rng, form):
    """The rnn cell's forward / backward (aligned copies, feature-major products) against the textbook
    loop: h_t = tanh(W h_{t-1} + pre_t); dpre_t = (dh_t + dpre_{t+1} W) (1 - h_t^2)."""
    S, N, H = 6, 3, 5
    pre, h0, W, dh = (rng.standard_normal(s) for s in ((S, N, H), (N, H), (H, H), (S, N, H)))
    hs, _, cache = cells.get("rnn").forward(pre, h0, {"W_hh": W})
    h, plain = h0, [h0]
    for t in range(S):
        h = np.tanh(h @ W.T + pre[t])
        plain.append(h)
    np.testing.assert_allclose(hs, np.stack(plain), rtol=1e-13, atol=1e-15)
    dpre, dh0, grads, _ = cells.get("rnn").backward(dh, cache)
    dW = grads["W_hh"]
    back, g, dW_plain = [None] * S, np.zeros((N, H)), np.zeros((H, H))
    for t in range(S - 1, -1, -1):
        back[t] = (dh[t] + g) * (1 - plain[t + 1] ** 2)
        g = back[t] @ W
        dW_plain += back[t].T @ plain[t]
    np.testing.assert_allclose(dpre, np.stack(back), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dh0, g, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dW, dW_plain, rtol=1e-12, atol=1e-14)
    assert dh0.flags.c_contiguous


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9])
def test_dropout_mask_values_and_rate(p):
    """The one test of dropout_mask's values (its raw-bit draws against the float definition):
    0 with probability p, else 1/(1-p) in the requested dtype, the same entries dropped for
    either dtype from the same Generator state."""
    m = ops.dropout_mask((200, 50, 40), p, np.random.default_rng(0), np.float32)
    assert m.dtype == np.float32 and m.shape == (200, 50, 40)
    assert set(np.unique(m).tolist()) == {0.0, np.float32(1 / (1 - p))}
    sigma = (p * (1 - p) / m.size) ** 0.5  # 400,000 draws
    assert abs((m == 0).mean() - p) < 5 * sigma
    assert abs(m.mean() - 1.0) < 5 * sigma / (1 - p)  # inverted dropout keeps the expectation
    wide = ops.dropout_mask((200, 50, 40), p, np.random.default_rng(0), np.float64)
    assert wide.dtype == np.float64
    np.testing.assert_array_equal(wide == 0, m == 0)
    np.testing.assert_array_equal(wide[wide != 0], 1.0 / (1.0 - p))


def test_dropout_mask_without_dropout_is_all_ones():
    m = ops.dropout_mask((7, 3, 5), 0.0, np.random.default_rng(0), np.float32)
    np.testing.assert_array_equal(m, np.ones((7, 3, 5), np.float32))


def test_dropout_mask_is_reproducible_from_the_generator_state():
    a = ops.dropout_mask((7, 3, 5), 0.5, np.random.default_rng(1), np.float64)
    b = ops.dropout_mask((7, 3, 5), 0.5, np.random.default_rng(1), np.float64)
    np.testing.assert_array_equal(a, b)


def test_float32_norm_equals_float64_norm_and_survives_overflow(rng):
    g = rng.standard_normal(10_000).astype(np.float32)
    assert optim.global_norm(g) == pytest.approx(float(np.linalg.norm(g.astype(np.float64))), rel=1e-5)
    huge = np.full(4, 1e30, dtype=np.float32)  # squares overflow float32, the norm does not
    assert optim.global_norm(huge) == pytest.approx(2e30, rel=1e-6)


def _adam_reference(theta, grads, lr, b1, b2, eps):
    m = v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return theta


def test_flat_adam_equals_the_textbook_update(rng):
    """Bias corrections folded into the step size: the same numbers up to rounding (eps placement
    differs by a factor sqrt(1 - b2^t), so eps is set tiny)."""
    cfg = TrainConfig(optimizer="adam", lr=0.01, eps=1e-12)
    theta = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(5)]
    flat, state = theta.copy(), optim.init_state("adam", 50, np.float64)
    for t, g in enumerate(grads, start=1):
        assert optim.update(flat, g.copy(), state, t, cfg.lr, cfg, None)
    np.testing.assert_allclose(flat, _adam_reference(theta, grads, 0.01, 0.9, 0.999, 1e-12), rtol=1e-9)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rmsprop"])
def test_flat_rules_equal_their_textbook_updates(rng, kind):
    cfg = TrainConfig(optimizer=kind, lr=0.05, momentum=0.9, eps=1e-8)
    theta = rng.standard_normal(30)
    grads = [rng.standard_normal(30) for _ in range(4)]
    flat, state = theta.copy(), optim.init_state(kind, 30, np.float64)
    ref, acc = theta.copy(), np.zeros(30)
    for t, g in enumerate(grads, start=1):
        optim.update(flat, g.copy(), state, t, cfg.lr, cfg, None)
        if kind == "sgd":
            acc = 0.9 * acc + g
            ref = ref - 0.05 * acc
        elif kind == "adagrad":
            acc = acc + g * g
            ref = ref - 0.05 * g / (np.sqrt(acc) + 1e-8)
        else:
            acc = 0.95 * acc + 0.05 * g * g
            ref = ref - 0.05 * g / (np.sqrt(acc) + 1e-8)
    np.testing.assert_allclose(flat, ref, rtol=1e-12)


def test_one_stream_binary_search_equals_the_batched_pick(rng):
    logits = rng.standard_normal((1, 30)) * 3
    for u in rng.random(200):
        fast = sample.pick(logits.copy(), np.array([u]), sample.Knobs())
        batched = sample.pick(np.repeat(logits, 2, axis=0), np.array([u, u]), sample.Knobs())
        assert fast[0] == batched[0] == batched[1]


def test_pick_inverts_the_cdf(rng):
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))
    for u, want in [(0.05, 0), (0.15, 1), (0.35, 2), (0.99, 3)]:
        assert sample.pick(logits.copy(), np.array([u]), sample.Knobs())[0] == want


def _naive_generate(spec, params, vocab, length, rng, prime):
    """The straightforward sampler: the full model forward over the whole text at every step."""
    text = prime
    uniforms = rng.random((sample.UNIFORM_BLOCK, 1))
    for i in range(length):
        ids = vocab.encode(text)[None, :].astype(np.intp)
        logits, _, _ = model.forward(spec, params, ids)
        p = np.exp(logits[-1] - logits[-1].max())
        cdf = np.cumsum(p)
        text += vocab.chars[min(int((cdf <= uniforms[i, 0] * cdf[-1]).sum()), len(cdf) - 1)]
    return text[len(prime):]


@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("L", [1, 2])
def test_incremental_sampler_equals_full_recomputation(L, cell, form):
    """The per-character step (the cell's step, prepared tables, swapped buffers) generates exactly
    what running model.forward over the whole text again at every step generates."""
    vocab = Vocab(list("abcdefgh"))
    spec = model.make_spec(len(vocab), 16, L, False, cell)
    params = model.init_params(spec, np.random.default_rng(0), np.float64)
    params = {k: v + np.random.default_rng(1).normal(scale=0.1, size=v.shape) for k, v in params.items()}
    fast = "".join(c[0] for c in sample.generate(spec, params, vocab, 40, np.random.default_rng(5), prime="abc"))
    assert fast == _naive_generate(spec, params, vocab, 40, np.random.default_rng(5), "abc")


def test_sampler_tables_are_row_major_and_equal_the_parameters(rng, form):
    """The stacked top-layer matrix is row-major and aligned (a column-major one is multiplied
    ~1.5x slower) and is exactly [W_hh ; W_ho / temperature]."""
    spec = model.make_spec(9, 6, 2, False)
    params = model.init_params(spec, rng, np.float64)
    net = sample._prepare(spec, params, 0.5, banned=-1, n=3)
    assert net.top.M.flags.c_contiguous and (not net.top.fm or net.top.M.ctypes.data % 64 == 0)
    assert all(p.M.flags.c_contiguous for p in net.plans)
    stacked = np.vstack([params["layers.1.fwd.W_hh"], params["out.W_ho"] / 0.5])
    np.testing.assert_array_equal(net.top.M, stacked if net.top.fm else stacked.T)


def test_step_flops_counts_the_matrix_products():
    from charrnn.bench import step_flops

    spec = model.Spec(V=10, H=4, L=1, dirs=("fwd",))
    N, T = 2, 3
    recurrent = 3 * 2 * T * N * 4 * 4  # forward, backward through time, dW_hh
    head = 3 * 2 * T * N * 4 * 10
    assert step_flops(spec, N, T) == recurrent + head
    assert math.isclose(step_flops(model.Spec(10, 4, 1, ("fwd", "bwd")), N, T),
                        2 * 3 * 2 * (T - 1) * N * 16 + 3 * 2 * T * N * 8 * 10)
    lstm = model.make_spec(10, 4, 2, False, "lstm")  # four gate blocks; layer 1 adds its input product
    assert step_flops(lstm, N, T) == 3 * 2 * T * N * 16 * 4 * (1 + 2) + head
