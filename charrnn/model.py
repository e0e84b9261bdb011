"""The models (one layer, stacked, bidirectional) composed from ops.py and a cell (cells/).

No formulas live here, only composition: ops.py has the lookup, affine head, dropout and loss;
the cell named in the Spec runs the recurrence. Shape legend as in ops.py: N batch, T time,
V vocab, H hidden, L layers, S steps a tower runs, G gate blocks and k state blocks of the cell;
sequences are time-major inside.

Parameters are one dict with stable names, which are also the checkpoint format:
    layers.{l}.{fwd|bwd}.W_xh  (G*H, D)  D = V for l = 0, else H
    layers.{l}.{fwd|bwd}.W_hh  (G*H, H)
    layers.{l}.{fwd|bwd}.b_h   (G*H,)    (+ the cell's extras, e.g. b_hn (H,) for the GRU)
    out.W_ho                   (V, H * directions)
    out.b_o                    (V,)
Gradients use the same names. The recurrent state is a dict {direction: [one (N, k*H) array per
layer]}, each array the cell's state blocks side by side, h first (LSTM: [h | c]).

The architecture (Spec) is data: it comes from the config, or from a checkpoint's metadata,
never from parameter names (checkpoint.load checks every array against it).

Objectives:
  * next-char (unidirectional): h_t runs over x_1..x_T and o_t = W_ho h_t + b_o predicts x_{t+1}.
  * cloze (bidirectional): the forward tower gives h_t over x_1..x_{T-1}, the backward tower g_t
    over x_T..x_2, and o_t = W_ho [h_{t-1}; g_{t+1}] + b_o predicts x_t itself, with h_0 and
    g_{T+1} the edge states (zero in training). Neither side ever reads x_t, so a backward tower
    cannot leak the answer (a next-char target would let it read x_{t+1} directly).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from charrnn import cells, ops

DIRECTIONS = ("fwd", "bwd")


class Spec(NamedTuple):
    V: int  # vocabulary size
    H: int  # hidden size per direction
    L: int  # layers per tower
    dirs: tuple  # ("fwd",) or ("fwd", "bwd")
    cell: str = "rnn"  # a name in cells.NAMES

    @property
    def bidirectional(self) -> bool:
        return len(self.dirs) == 2

    @property
    def objective(self) -> str:
        return "cloze" if self.bidirectional else "next-char"

    @property
    def unit(self) -> cells.Cell:
        """The cell object that runs this model's recurrence."""
        return cells.get(self.cell)

    @property
    def state_size(self) -> int:
        """Width of one layer's state array: k*H."""
        return self.unit.state_size(self.H)


def make_spec(V: int, H: int, L: int, bidirectional: bool, cell: str = "rnn") -> Spec:
    return Spec(V, H, L, DIRECTIONS if bidirectional else DIRECTIONS[:1], cell)


def spec_of_config(V: int, model_cfg) -> Spec:
    """The Spec a config's model section describes, for a vocabulary of V characters."""
    return make_spec(V, model_cfg.hidden_size, model_cfg.num_layers, model_cfg.bidirectional, model_cfg.cell)


def param_shapes(spec: Spec) -> dict[str, tuple]:
    """Names and shapes of every parameter, in their one fixed order."""
    shapes = {}
    for l in range(spec.L):
        for d in spec.dirs:
            for suffix, shape in spec.unit.param_shapes(spec.V if l == 0 else spec.H, spec.H).items():
                shapes[f"layers.{l}.{d}.{suffix}"] = shape
    shapes["out.W_ho"] = (spec.V, spec.H * len(spec.dirs))
    shapes["out.b_o"] = (spec.V,)
    return shapes


def position_bytes(spec: Spec) -> int:
    """An upper estimate of the bytes one window position holds in a float64 forward and backward
    (caches, kept gradients, logits): what eval and diagnose size their batches by. Fitted with
    room above the peak each of the three cells reaches."""
    G, dirs = len(spec.unit.gates), len(spec.dirs)
    return 8 * (spec.L * dirs * (2 + 4 * G) * spec.H + 3 * dirs * spec.V)


def param_names(spec: Spec) -> list[str]:
    """Parameter names in their fixed order."""
    return list(param_shapes(spec))


def init_params(spec: Spec, rng: np.random.Generator, dtype=np.float32, scale: float = 1.0) -> dict:
    """Initial weights, a function of the spec, `scale` and the Generator only.

    Each layer is the cell's own init (cells/base.py: orthogonal W_hh blocks, embedding-scale
    W_xh for layer 0). The output matrix is N(0, (0.1 scale)^2 / fan_in), 10x smaller than a
    hidden layer's, so the first predictions are near uniform and the step-0 loss is close to
    ln V; its bias is 0. (Layer 0 columns of norm 1 instead, std 1/sqrt(H), learned far slower:
    val loss 2.18 vs 1.77 after 400 steps of a 512-unit model on tiny-shakespeare.)
    """
    params = {}
    for l in range(spec.L):
        for d in spec.dirs:
            layer = spec.unit.init(spec.V if l == 0 else spec.H, spec.H, rng, scale, embedding=l == 0)
            params.update({f"layers.{l}.{d}.{k}": w.astype(dtype) for k, w in layer.items()})
    fan_in = spec.H * len(spec.dirs)
    params["out.W_ho"] = (rng.standard_normal((spec.V, fan_in)) * (scale / np.sqrt(fan_in) * 0.1)).astype(dtype)
    params["out.b_o"] = np.zeros(spec.V).astype(dtype)
    return params


def zero_state(spec: Spec, N: int, dtype=np.float32) -> dict:
    """All-zero recurrent state: {direction: [(N, k*H) per layer]}."""
    return {d: [np.zeros((N, spec.state_size), dtype=dtype) for _ in range(spec.L)] for d in spec.dirs}


def dropout_masks(spec: Spec, N: int, T: int, p: float, rng: np.random.Generator, dtype=np.float32,
                  weight_drop: float = 0.0):
    """Masks for one step, None when p and weight_drop are both 0.

    p: on the activations between layers of each tower ("layers.{l}.{d}", (S, N, H)) and on the
    head's input ("out", (T, N, H*dirs)). weight_drop: DropConnect on every recurrent matrix
    ("layers.{l}.{d}.W_hh", the shape of W_hh), one mask shared by all streams and time steps of
    the window, so the recurrence is regularized without a new mask at every step (Wan et al.
    2013; Merity et al. 2018, AWD-LSTM). The W_hh masks are drawn after the others: a run without
    weight drop draws exactly what it drew before the option existed.
    """
    masks = {}
    if p > 0:
        S = T - 1 if spec.bidirectional else T
        masks.update({f"layers.{l}.{d}": ops.dropout_mask((S, N, spec.H), p, rng, dtype)
                      for d in spec.dirs for l in range(spec.L - 1)})
        masks["out"] = ops.dropout_mask((T, N, spec.H * len(spec.dirs)), p, rng, dtype)
    if weight_drop > 0:
        shape = spec.unit.param_shapes(spec.H, spec.H)["W_hh"]
        masks.update({f"layers.{l}.{d}.W_hh": ops.dropout_mask(shape, weight_drop, rng, dtype)
                      for d in spec.dirs for l in range(spec.L)})
    return masks or None


def stream_masks(masks: dict | None, rows: slice) -> dict | None:
    """The masks of the streams in rows (one process's share): activation masks are sliced, the
    W_hh masks are shared by every stream and stay whole."""
    if masks is None:
        return None
    return {k: m if k.endswith(".W_hh") else np.ascontiguousarray(m[:, rows]) for k, m in masks.items()}


def layer_params(params: dict, l: int, d: str) -> dict:
    """{suffix: array} of layer l in direction d."""
    prefix = f"layers.{l}.{d}."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


# ---- a tower: L stacked recurrent layers in one direction --------------------------------------

class LayerCache(NamedTuple):
    input: object  # ops.LookupCache (layer 0) or ops.AffineCache
    cell: object  # the cell's own cache
    mask: object  # (S, N, H) dropout mask on this layer's output, or None
    w_mask: object  # (G*H, H) DropConnect mask the recurrence's W_hh was multiplied by, or None


def tower_forward(spec: Spec, params, d: str, ids, s0: list, masks):
    """Inputs: ids (S, N) time-major, s0 [(N, k*H)] * L.
    Returns: hs_top (S+1, N, H), s_last [(N, k*H)] * L, [LayerCache] * L."""
    S, N = ids.shape
    layer_caches, inp, s_last = [], ids, []
    for l in range(spec.L):
        p = layer_params(params, l, d)
        if l == 0:
            pre, in_cache = ops.lookup_forward(ids, p["W_xh"], p["b_h"])  # (S, N, G*H)
        else:
            # explicit widths: a cloze tower of an edge window runs S = 0 steps, and -1 cannot be inferred from size 0
            pre, in_cache = ops.affine_forward(inp.reshape(S * N, inp.shape[-1]), p["W_xh"], p["b_h"])
            pre = pre.reshape(S, N, p["W_xh"].shape[0])  # (S, N, G*H)
        w_mask = masks.get(f"layers.{l}.{d}.W_hh") if masks else None
        if w_mask is not None:  # the window's recurrence runs on a thinned copy; params stay as they are
            p = {**p, "W_hh": p["W_hh"] * w_mask}  # (G*H, H)
        hs, last, cell_cache = spec.unit.forward(pre, s0[l], p)  # (S+1, N, H), (N, k*H)
        s_last.append(last)
        mask = masks.get(f"layers.{l}.{d}") if masks and l < spec.L - 1 else None
        inp = hs[1:] * mask if mask is not None else hs[1:]  # (S, N, H) input of layer l+1
        layer_caches.append(LayerCache(in_cache, cell_cache, mask, w_mask))
    return hs, s_last, layer_caches


def tower_backward(spec: Spec, dh_top, d: str, layer_caches, keep: bool = False):
    """Inputs: dh_top (S, N, H) reaching h_1..h_S of the top layer.
    Returns: grads, ds0 [(N, k*H)] * L, and with keep {l: dhs (S+1, N, H)} (total dL/dh_t per layer)."""
    grads, ds0, kept = {}, [None] * spec.L, {}
    dh = dh_top
    for l in range(spec.L - 1, -1, -1):
        prefix = f"layers.{l}.{d}."
        c = layer_caches[l]
        dpre, ds0[l], cell_grads, kept[l] = spec.unit.backward(dh, c.cell, keep)
        if c.w_mask is not None:  # W_hh entered as W_hh * mask: its gradient passes the same mask
            cell_grads = {**cell_grads, "W_hh": cell_grads["W_hh"] * c.w_mask}
        grads.update({prefix + k: g for k, g in cell_grads.items()})
        S, N, GH = dpre.shape
        if l == 0:
            grads[prefix + "W_xh"], grads[prefix + "b_h"] = ops.lookup_backward(dpre, c.input)
        else:
            dinp, grads[prefix + "W_xh"], grads[prefix + "b_h"] = ops.affine_backward(dpre.reshape(S * N, GH), c.input)
            dh = dinp.reshape(S, N, spec.H)  # (S, N, H) gradient reaching layer l-1's outputs
            below_mask = layer_caches[l - 1].mask
            if below_mask is not None:
                dh = dh * below_mask
    return grads, ds0, kept


# ---- whole model -------------------------------------------------------------------------------

class ForwardCache(NamedTuple):
    spec: Spec
    towers: dict  # direction -> layer caches
    head: ops.AffineCache
    head_mask: object  # (T, N, H*dirs) or None
    shape: tuple  # (T, N)


def forward(spec: Spec, params: dict, x, h0: dict | None = None, masks: dict | None = None):
    """Logits for every position of a batch.

    Inputs:  x (N, T) int ids; h0 {direction: [(N, k*H)] * L} or None for zeros; dropout masks or None
    Returns: logits (T*N, V) in time-major order (row t*N + n), h_last (the state after the
             window, for carrying), cache
    """
    N, T = x.shape
    xt = np.ascontiguousarray(x.T)  # (T, N): time-major ids
    h0 = h0 if h0 is not None else zero_state(spec, N, params["out.W_ho"].dtype)
    towers, h_last = {}, {}
    if not spec.bidirectional:
        hs, h_last["fwd"], towers["fwd"] = tower_forward(spec, params, "fwd", xt, h0["fwd"], masks)
        feats = hs[1:]  # (T, N, H): h_1..h_T, each predicting the next character
    else:
        hs_f, h_last["fwd"], towers["fwd"] = tower_forward(spec, params, "fwd", xt[:-1], h0["fwd"], masks)
        hs_b, h_last["bwd"], towers["bwd"] = tower_forward(spec, params, "bwd", xt[:0:-1], h0["bwd"], masks)
        # position t reads h_{t-1} (hs_f[t-1], hs_f[0] = h_0) and g_{t+1} (hs_b reversed, g_{T+1} first)
        feats = np.concatenate([hs_f, hs_b[::-1]], axis=2)  # (T, N, 2H)
    head_mask = masks.get("out") if masks else None
    if head_mask is not None:
        feats = feats * head_mask
    logits, head_cache = ops.affine_forward(feats.reshape(T * N, -1), params["out.W_ho"], params["out.b_o"])  # (T*N, V)
    return logits, h_last, ForwardCache(spec, towers, head_cache, head_mask, (T, N))


def head_backward(dlogits, cache: ForwardCache):
    """Through the head: (grads of out.*, {direction: (T, N, H) gradient at the features, in tower order})."""
    (T, N), H = cache.shape, cache.spec.H
    dfeats, dW_ho, db_o = ops.affine_backward(dlogits, cache.head)
    dfeats = dfeats.reshape(T, N, -1)  # (T, N, H*dirs)
    if cache.head_mask is not None:
        dfeats = dfeats * cache.head_mask
    if not cache.spec.bidirectional:
        return {"out.W_ho": dW_ho, "out.b_o": db_o}, {"fwd": dfeats}
    # the right half back in the backward tower's own time order
    return {"out.W_ho": dW_ho, "out.b_o": db_o}, {"fwd": dfeats[:, :, :H], "bwd": dfeats[::-1, :, H:]}


def towers_backward(dsides: dict, cache: ForwardCache, keep: bool = False):
    """From the features' gradients to every tower parameter and initial state.

    Cloze towers run one step shorter than the window: the head reads each tower's edge state
    h_0 directly at position 0 (dside[0]) and h_1..h_S at the others.
    Returns grads, ds0 {direction: [(N, k*H)] * L}, kept {direction: {l: dhs}} (keep only).
    """
    spec, H = cache.spec, cache.spec.H
    grads, ds0, kept = {}, {}, {}
    for d, dside in dsides.items():
        if not spec.bidirectional:
            g, ds0[d], kept[d] = tower_backward(spec, dside, d, cache.towers[d], keep)
        else:
            g, ds0[d], kept[d] = tower_backward(spec, dside[1:], d, cache.towers[d], keep)
            top = ds0[d][-1] = ds0[d][-1].copy()
            top[:, :H] += dside[0]  # the head reads the top edge state's h directly
            if keep:
                kept[d][spec.L - 1][0] += dside[0]
        grads.update(g)
    return grads, ds0, kept


def backward(dlogits, cache: ForwardCache):
    """Inputs: dlogits (T*N, V).  Returns: grads (same names as params), dh0 (same layout as h0)."""
    grads, dsides = head_backward(dlogits, cache)
    tower_grads, dh0, _ = towers_backward(dsides, cache)
    grads.update(tower_grads)
    return {k: grads[k] for k in param_names(cache.spec)}, dh0


def targets(x, y=None):
    """Time-major flat targets (T*N,) matching the logits' rows: y for next-char, x itself for cloze."""
    return np.ascontiguousarray((x if y is None else y).T).reshape(-1)


class StepResult(NamedTuple):
    loss: float  # mean cross-entropy, nats per predicted character
    grads: dict
    h_last: dict
    dh0: dict


def loss_and_grads(spec: Spec, params: dict, x, y=None, h0: dict | None = None, masks: dict | None = None) -> StepResult:
    """The one entry point the trainer and the gradient checks use.

    Inputs: x (N, T) ids; y (N, T) next-character targets (unidirectional) or None (cloze: x is
    its own target). h0 and masks as in forward().
    """
    if spec.bidirectional != (y is None):
        raise ValueError("next-char models need targets y; cloze models take y=None")
    logits, h_last, cache = forward(spec, params, x, h0, masks)
    loss, dlogits = ops.softmax_cross_entropy(logits, targets(x, y))
    grads, dh0 = backward(dlogits, cache)
    return StepResult(loss, grads, h_last, dh0)
