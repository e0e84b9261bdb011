"""Forward pass of every model kind and cell: shapes, a naive reference (vanilla cell), causality
and leak tests, initial loss, state carrying and deterministic initialization."""
from __future__ import annotations

import math

import numpy as np
import pytest

from charrnn import cells, model

V, H, N, T = 6, 5, 3, 5


def perturbed_params(V, H, L, bidirectional, seed=0, dtype=np.float64, cell="rnn"):
    rng = np.random.default_rng(seed)
    spec = model.make_spec(V, H, L, bidirectional, cell)
    params = model.init_params(spec, rng, dtype)
    return spec, {k: (v + rng.normal(scale=0.1, size=v.shape)).astype(dtype) for k, v in params.items()}


def random_state(spec, N, seed=5):
    rng = np.random.default_rng(seed)
    return {d: [rng.normal(scale=0.5, size=(N, spec.state_size)) for _ in range(spec.L)] for d in spec.dirs}


# ---- a naive reference: column vectors, explicit loops over n and t ----------------------------

def ref_tower(params, d, seq, h0_cols):
    """Run one tower (all its layers) over seq (a list of ids); return the top layer's states.

    h_t = tanh(W_xh x_t + W_hh h_{t-1} + b_h) with x_t one-hot for layer 0 (so W_xh x_t is the
    column W_xh[:, x_t]) and the layer below's h_t above it. Returns [h_0, h_1, ..., h_S].
    """
    L = len(h0_cols)
    inputs = None
    for l in range(L):
        W_xh, W_hh = params[f"layers.{l}.{d}.W_xh"], params[f"layers.{l}.{d}.W_hh"]
        b_h = params[f"layers.{l}.{d}.b_h"].reshape(-1, 1)
        h = h0_cols[l]
        states = [h]
        for s in range(len(seq)):
            inp = W_xh[:, [seq[s]]] if l == 0 else W_xh @ inputs[s]
            h = np.tanh(inp + W_hh @ h + b_h)
            states.append(h)
        inputs = states[1:]
    return states


def ref_logits(spec, params, x, h0=None):
    """(T*N, V) logits in time-major order, built position by position."""
    Nx, Tx = x.shape
    W_ho, b_o = params["out.W_ho"], params["out.b_o"].reshape(-1, 1)
    out = np.zeros((Tx * Nx, spec.V))
    for n in range(Nx):
        col = lambda d, n=n: [np.zeros((spec.H, 1)) if h0 is None else h0[d][l][n].reshape(-1, 1)  # noqa: E731
                         for l in range(spec.L)]
        seq = [int(c) for c in x[n]]
        if not spec.bidirectional:
            hs = ref_tower(params, "fwd", seq, col("fwd"))
            for t in range(Tx):
                out[t * Nx + n] = (W_ho @ hs[t + 1] + b_o).ravel()  # o_t = W_ho h_t + b_o
        else:
            # 1-based: h runs over x_1..x_{T-1}, g over x_T..x_2; o_t = W_ho [h_{t-1}; g_{t+1}] + b_o
            hs = ref_tower(params, "fwd", seq[:-1], col("fwd"))  # hs[k] = h_k, k = 0..T-1
            gs = ref_tower(params, "bwd", seq[:0:-1], col("bwd"))  # gs[k] = g_{T+1-k}
            for t in range(1, Tx + 1):
                h_prev = hs[t - 1]
                g_next = gs[Tx - t]  # g_{t+1}: after reading x_T..x_{t+1}; gs[0] is g_{T+1}
                out[(t - 1) * Nx + n] = (W_ho @ np.vstack([h_prev, g_next]) + b_o).ravel()
    return out


KINDS = {"vanilla": (1, False), "stacked": (3, False),
         "bidirectional": (1, True), "bidirectional stacked": (2, True)}


# ---- (a) shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes_and_time_major_rows(kind, cell):
    L, bidir = KINDS[kind]
    spec, params = perturbed_params(V, H, L, bidir, cell=cell)
    x = np.random.default_rng(1).integers(0, V, size=(N, T))
    logits, h_last, _ = model.forward(spec, params, x)
    assert logits.shape == (T * N, V)
    assert set(h_last) == ({"fwd", "bwd"} if bidir else {"fwd"})
    for d in h_last:
        assert len(h_last[d]) == L
        assert all(h.shape == (N, spec.state_size) for h in h_last[d])
    # row t*N + n belongs to sequence n at time t: compare with each sequence run alone
    for n in range(N):
        alone, _, _ = model.forward(spec, params, x[n:n + 1])
        np.testing.assert_allclose(logits[n::N], alone, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("L", [1, 2])
def test_single_step_next_char(L):
    spec, params = perturbed_params(V, H, L, False)
    h0 = random_state(spec, N)
    x = np.random.default_rng(2).integers(0, V, size=(N, 1))
    logits, h_last, _ = model.forward(spec, params, x, h0)
    assert logits.shape == (N, V)
    np.testing.assert_allclose(logits, ref_logits(spec, params, x, h0), rtol=1e-12, atol=1e-14)
    result = model.loss_and_grads(spec, params, x, x, h0)
    assert np.isfinite(result.loss) and set(result.grads) == set(params)


# ---- (b) equals the naive per-step reference ----------------------------------------------------

@pytest.mark.parametrize("carried", [False, True], ids=["h0-zero", "h0-carried"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_matches_naive_reference(kind, carried):
    L, bidir = KINDS[kind]
    spec, params = perturbed_params(V, H, L, bidir)
    h0 = random_state(spec, N) if carried else None
    x = np.random.default_rng(3).integers(0, V, size=(N, T))
    logits, _, _ = model.forward(spec, params, x, h0)
    np.testing.assert_allclose(logits, ref_logits(spec, params, x, h0), rtol=1e-12, atol=1e-13)


def test_h_last_is_the_final_state():
    spec, params = perturbed_params(V, H, 2, False)
    h0 = random_state(spec, N)
    x = np.random.default_rng(4).integers(0, V, size=(N, T))
    _, h_last, _ = model.forward(spec, params, x, h0)
    for n in range(N):
        seq = [int(c) for c in x[n]]
        for l in range(spec.L):
            states = ref_tower(params, "fwd", seq, [h0["fwd"][k][n].reshape(-1, 1) for k in range(l + 1)])
            np.testing.assert_allclose(h_last["fwd"][l][n], states[-1].ravel(), rtol=1e-12, atol=1e-14)


# ---- (c) causality ------------------------------------------------------------------------------

def _changed(x, cols, rng):
    """x with every id in the given columns replaced by a different id."""
    x2 = x.copy()
    x2[:, cols] = (x[:, cols] + rng.integers(1, V, size=x[:, cols].shape)) % V
    assert np.all(x2[:, cols] != x[:, cols])
    return x2


@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("L", [1, 3])
def test_next_char_model_is_causal(L, cell):
    spec, params = perturbed_params(V, H, L, False, cell=cell)
    rng = np.random.default_rng(6)
    x = rng.integers(0, V, size=(N, T))
    base, _, _ = model.forward(spec, params, x)
    for k in range(T - 1):
        changed, _, _ = model.forward(spec, params, _changed(x, slice(k + 1, None), rng))
        np.testing.assert_array_equal(changed[: (k + 1) * N], base[: (k + 1) * N],
                                      err_msg=f"logits at positions <= {k} depend on x[:, {k + 1}:]")
        assert not np.allclose(changed[(k + 1) * N:], base[(k + 1) * N:])  # the future does change


@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("L", [1, 2])
def test_cloze_model_never_reads_its_target(L, cell):
    spec, params = perturbed_params(V, H, L, True, cell=cell)
    rng = np.random.default_rng(7)
    x = rng.integers(0, V, size=(N, T))
    base, _, _ = model.forward(spec, params, x)
    for t in range(T):
        changed, _, _ = model.forward(spec, params, _changed(x, t, rng))
        rows = slice(t * N, (t + 1) * N)  # the logits that predict x[:, t]
        np.testing.assert_array_equal(changed[rows], base[rows], err_msg=f"logits predicting x_{t} depend on x_{t}")
        others = np.ones(T * N, bool)
        others[rows] = False
        assert not np.allclose(changed[others], base[others])  # both neighbours' contexts do change


# ---- (d) leak test by training, with positive controls -------------------------------------------

def adam_train(spec, params, batch, steps, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
    """Plain Adam on loss_and_grads; batch(step) -> (x, y). Returns the per-step losses."""
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    losses = []
    for step in range(1, steps + 1):
        x, y = batch(step)
        result = model.loss_and_grads(spec, params, x, y)
        losses.append(result.loss)
        for k, g in result.grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1 ** step), v[k] / (1 - b2 ** step)
            params[k] = params[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return np.array(losses)


LEAK_V, LEAK_H, LEAK_N, LEAK_T, LEAK_STEPS = 8, 16, 16, 8, 300


def _periodic_windows(rng, period):
    """Random windows (and their next-char targets) of one fixed permutation repeated forever."""
    seq = np.tile(rng.permutation(LEAK_V), 64)

    def batch(_step):
        starts = rng.integers(0, period, size=LEAK_N)
        idx = starts[:, None] + np.arange(LEAK_T + 1)
        return seq[idx[:, :-1]], seq[idx[:, 1:]]
    return batch


@pytest.mark.parametrize("cell", cells.NAMES)
def test_cloze_model_cannot_learn_iid_noise(cell):
    """On i.i.d. uniform characters a leak-free cloze model stays near ln V; a leak would reach ~0."""
    rng = np.random.default_rng(8)
    spec = model.make_spec(LEAK_V, LEAK_H, 1, True, cell)
    params = model.init_params(spec, rng, np.float64)
    losses = adam_train(spec, params, lambda _: (rng.integers(0, LEAK_V, size=(LEAK_N, LEAK_T)), None), LEAK_STEPS)
    fresh = rng.integers(0, LEAK_V, size=(64, LEAK_T))
    held_out = model.loss_and_grads(spec, params, fresh).loss
    assert losses[-50:].mean() > 0.9 * math.log(LEAK_V), losses[-50:].mean()
    assert held_out > 0.9 * math.log(LEAK_V), held_out


def test_next_char_model_learns_a_repeating_sequence():
    """Positive control for the training budget above: a learnable signal is learned."""
    rng = np.random.default_rng(9)
    spec = model.make_spec(LEAK_V, LEAK_H, 1, False)
    params = model.init_params(spec, rng, np.float64)
    losses = adam_train(spec, params, _periodic_windows(rng, LEAK_V), LEAK_STEPS)
    assert losses[0] > 0.9 * math.log(LEAK_V)
    assert losses[-20:].mean() < 0.25 * math.log(LEAK_V), losses[-20:].mean()


@pytest.mark.parametrize("cell", cells.NAMES)
def test_cloze_model_learns_a_repeating_sequence(cell):
    """Positive control for the cloze model itself: neighbours determine x_t, and it learns that."""
    rng = np.random.default_rng(10)
    spec = model.make_spec(LEAK_V, LEAK_H, 1, True, cell)
    params = model.init_params(spec, rng, np.float64)
    windows = _periodic_windows(rng, LEAK_V)
    losses = adam_train(spec, params, lambda s: (windows(s)[0], None), LEAK_STEPS)
    assert losses[-20:].mean() < 0.25 * math.log(LEAK_V), losses[-20:].mean()


# ---- (e) initial loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["next-char", "cloze"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_initial_loss_is_near_ln_V(dtype, bidirectional, cell):
    V0, H0 = 65, 64
    rng = np.random.default_rng(11)
    spec = model.make_spec(V0, H0, 1, bidirectional, cell)
    params = model.init_params(spec, rng, dtype)
    assert all(p.dtype == dtype for p in params.values())
    x = rng.integers(0, V0, size=(16, 32))
    y = None if bidirectional else rng.integers(0, V0, size=(16, 32))
    result = model.loss_and_grads(spec, params, x, y)
    assert abs(result.loss - math.log(V0)) < 0.1, (result.loss, math.log(V0))
    assert all(result.grads[k].dtype == dtype for k in params)


# ---- (f) carrying the state ---------------------------------------------------------------------

@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("L", [1, 2])
def test_two_carried_windows_equal_one_long_window(L, cell):
    spec, params = perturbed_params(V, H, L, False, cell=cell)
    h0 = random_state(spec, N)
    x = np.random.default_rng(12).integers(0, V, size=(N, 2 * T))
    full, h_full, _ = model.forward(spec, params, x, h0)
    first, h_first, _ = model.forward(spec, params, x[:, :T], h0)
    second, h_second, _ = model.forward(spec, params, x[:, T:], h_first)
    np.testing.assert_allclose(np.concatenate([first, second]), full, rtol=1e-12, atol=1e-14)
    for l in range(L):
        np.testing.assert_allclose(h_second["fwd"][l], h_full["fwd"][l], rtol=1e-12, atol=1e-14)
    # and the carried state matters: starting the second window from zeros differs
    fresh, _, _ = model.forward(spec, params, x[:, T:])
    assert not np.allclose(fresh, second)


# ---- (g) initialization -------------------------------------------------------------------------

@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("L, bidirectional", [(1, False), (2, True)])
def test_init_depends_only_on_shapes_and_seed(L, bidirectional, cell):
    spec = model.make_spec(7, 5, L, bidirectional, cell)
    a = model.init_params(spec, np.random.default_rng(3))
    b = model.init_params(spec, np.random.default_rng(3))
    c = model.init_params(spec, np.random.default_rng(4))
    wide = model.init_params(spec, np.random.default_rng(3), np.float64)
    shapes = model.param_shapes(spec)
    assert list(a) == list(shapes)
    for k, shape in shapes.items():
        assert a[k].shape == shape and a[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], wide[k].astype(np.float32))
        if k.endswith(".b_h") and cell == "lstm":  # the forget gate's block starts at 1
            np.testing.assert_array_equal(a[k], np.repeat(np.array([0, 1, 0, 0], np.float32), 5))
        elif k.endswith((".b_h", ".b_o", ".b_hn")):
            assert not a[k].any()
        else:
            assert not np.array_equal(a[k], c[k]), k


@pytest.mark.parametrize("cell", cells.NAMES)
def test_init_recurrent_matrices_are_scaled_orthogonal(cell):
    """Every (H, H) gate block of W_hh is 0.5 times an orthogonal matrix, each block its own."""
    spec = model.make_spec(7, 6, 2, True, cell)
    params = model.init_params(spec, np.random.default_rng(0), np.float64, scale=0.5)
    for k, w in params.items():
        if k.endswith("W_hh"):
            blocks = w.reshape(-1, 6, 6)
            assert len(blocks) == len(spec.unit.gates)
            for b in blocks:
                np.testing.assert_allclose(b @ b.T, 0.25 * np.eye(6), atol=1e-12, err_msg=k)
            assert len(blocks) == 1 or not np.allclose(blocks[0], blocks[1])


@pytest.mark.parametrize("id_dtype", [np.uint8, np.uint16])
def test_unsigned_ids_from_the_dataset_give_the_same_results(id_dtype):
    """The encoded corpus stores ids as uint8/uint16; the model must treat them like int64."""
    spec, params = perturbed_params(V, H, 2, False)
    rng = np.random.default_rng(13)
    x, y = rng.integers(0, V, size=(N, T)), rng.integers(0, V, size=(N, T))
    wide = model.loss_and_grads(spec, params, x, y)
    small = model.loss_and_grads(spec, params, x.astype(id_dtype), y.astype(id_dtype))
    assert small.loss == wide.loss
    for k in params:
        np.testing.assert_array_equal(small.grads[k], wide.grads[k], err_msg=k)


@pytest.mark.parametrize("cell", cells.NAMES)
def test_a_one_character_cloze_window_of_a_stacked_model(cell):
    """T = 1: each tower runs S = 0 steps and the head reads only the edge states (this crashed
    stacked models, whose upper layers reshaped an empty input)."""
    spec, params = perturbed_params(V, H, 2, True, cell=cell)
    x = np.random.default_rng(14).integers(0, V, size=(N, 1))
    logits, _, cache = model.forward(spec, params, x)
    assert logits.shape == (N, V)
    np.testing.assert_allclose(logits, np.broadcast_to(params["out.b_o"], (N, V)), rtol=1e-12)  # zero edges
    grads, _ = model.backward(np.ones_like(logits), cache)
    assert set(grads) == set(params) and not grads["layers.1.fwd.W_hh"].any()
