"""DropConnect on the recurrent matrices (model.weight_drop): what the masks are, and that a masked
window is exactly the model run on masked weights. The gradient checks with these masks are in
test_model_gradcheck.py (its dropout cases), exact resume in test_train.py and the MPI split in
test_mpi.py."""
from __future__ import annotations

import numpy as np
import pytest

from charrnn import cells, model

V, H, N, T = 7, 5, 3, 6


def case(cell: str, bidirectional: bool = False, L: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    spec = model.make_spec(V, H, L, bidirectional, cell)
    params = model.init_params(spec, rng, np.float64, scale=0.5)
    x = rng.integers(0, V, size=(N, T))
    y = None if bidirectional else rng.integers(0, V, size=(N, T))
    return spec, params, x, y


@pytest.mark.parametrize("bidirectional", [False, True], ids=["next-char", "cloze"])
@pytest.mark.parametrize("cell", cells.NAMES)
def test_a_masked_window_is_the_model_on_masked_weights(cell, bidirectional):
    spec, params, x, y = case(cell, bidirectional)
    masks = model.dropout_masks(spec, N, T, 0.0, np.random.default_rng(1), np.float64, weight_drop=0.4)
    w_masks = {k: m for k, m in masks.items() if k.endswith(".W_hh")}
    assert set(masks) == set(w_masks) == {f"layers.{l}.{d}.W_hh" for l in range(spec.L) for d in spec.dirs}
    masked = {k: v * w_masks[k] if k in w_masks else v for k, v in params.items()}
    before = {k: v.copy() for k, v in params.items()}
    got = model.loss_and_grads(spec, params, x, y, masks=masks)
    plain = model.loss_and_grads(spec, masked, x, y)
    assert all(np.array_equal(params[k], before[k]) for k in params), "the caller's weights were changed"
    assert got.loss == plain.loss
    for k in params:  # d/dW of L(W * M) = M * L'(W * M)
        expected = plain.grads[k] * w_masks[k] if k in w_masks else plain.grads[k]
        assert np.array_equal(got.grads[k], expected), k
    for d in spec.dirs:
        assert all(np.array_equal(a, b) for a, b in zip(got.h_last[d], plain.h_last[d], strict=True))


def test_the_masks_are_inverted_dropout_of_the_right_shape_and_rate():
    spec, _, _, _ = case("lstm", L=2)
    masks = model.dropout_masks(spec, N, T, 0.0, np.random.default_rng(2), np.float32, weight_drop=0.25)
    for l in range(2):
        m = masks[f"layers.{l}.fwd.W_hh"]
        assert m.shape == (4 * H, H) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, np.float32(1 / 0.75)}
    big = model.make_spec(V, 64, 1, False, "gru")
    m = model.dropout_masks(big, N, T, 0.0, np.random.default_rng(3), np.float64, weight_drop=0.25)["layers.0.fwd.W_hh"]
    assert abs(np.mean(m == 0) - 0.25) < 0.01  # 12,288 entries: 4 standard deviations is 0.016
    assert abs(m.mean() - 1.0) < 0.02  # inverted: the expected weight is unchanged


def test_weight_drop_leaves_the_activation_masks_and_draws_of_a_run_without_it():
    spec, _, _, _ = case("gru", L=3)
    a_rng, b_rng = np.random.default_rng(4), np.random.default_rng(4)
    without = model.dropout_masks(spec, N, T, 0.3, a_rng, np.float64)
    with_wd = model.dropout_masks(spec, N, T, 0.3, b_rng, np.float64, weight_drop=0.5)
    assert list(with_wd)[:len(without)] == list(without)
    assert all(np.array_equal(without[k], with_wd[k]) for k in without)
    assert model.dropout_masks(spec, N, T, 0.0, np.random.default_rng(4), np.float64) is None
    assert model.dropout_masks(spec, N, T, 0.0, np.random.default_rng(4), np.float64, weight_drop=0.0) is None


def test_a_process_share_slices_activation_masks_and_keeps_w_hh_masks_whole():
    spec, _, _, _ = case("lstm", L=2)
    masks = model.dropout_masks(spec, 4, T, 0.3, np.random.default_rng(5), np.float64, weight_drop=0.3)
    share = model.stream_masks(masks, slice(2, 4))
    assert share.keys() == masks.keys()
    for k, m in masks.items():
        expected = m if k.endswith(".W_hh") else m[:, 2:4]
        assert np.array_equal(share[k], expected), k
    assert model.stream_masks(None, slice(0, 2)) is None
