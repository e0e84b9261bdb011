"""The three models (vanilla, stacked, bidirectional) composed from the primitives in ops.py.

No formulas live here, only composition. Shape legend as in ops.py: N batch, T time, V vocab,
H hidden, L layers, S steps a tower runs; sequences are time-major inside.

Parameters are one dict with stable names, which are also the checkpoint format:
    layers.{l}.{fwd|bwd}.W_xh  (H, D)  D = V for l = 0, else H
    layers.{l}.{fwd|bwd}.W_hh  (H, H)
    layers.{l}.{fwd|bwd}.b_h   (H,)
    out.W_ho                   (V, H * directions)
    out.b_o                    (V,)
Gradients use the same names. Hidden state is a dict {direction: [one (N, H) array per layer]}.

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

from charrnn import ops

DIRECTIONS = ("fwd", "bwd")


class Spec(NamedTuple):
    V: int  # vocabulary size
    H: int  # hidden size per direction
    L: int  # layers per tower
    dirs: tuple  # ("fwd",) or ("fwd", "bwd")

    @property
    def bidirectional(self) -> bool:
        return len(self.dirs) == 2

    @property
    def objective(self) -> str:
        return "cloze" if self.bidirectional else "next-char"


def param_shapes(V: int, H: int, L: int, bidirectional: bool) -> dict[str, tuple]:
    """Names and shapes of every parameter, in their one fixed order."""
    dirs = DIRECTIONS if bidirectional else DIRECTIONS[:1]
    shapes = {}
    for l in range(L):
        for d in dirs:
            shapes[f"layers.{l}.{d}.W_xh"] = (H, V if l == 0 else H)
            shapes[f"layers.{l}.{d}.W_hh"] = (H, H)
            shapes[f"layers.{l}.{d}.b_h"] = (H,)
    shapes["out.W_ho"] = (V, H * len(dirs))
    shapes["out.b_o"] = (V,)
    return shapes


def spec_of(params: dict) -> Spec:
    """Read the architecture off the parameter dict, so it cannot disagree with the weights."""
    V, H = params["out.W_ho"].shape[0], params["layers.0.fwd.W_hh"].shape[0]
    L = 1 + max(int(k.split(".")[1]) for k in params if k.startswith("layers."))
    bidirectional = "layers.0.bwd.W_hh" in params
    return Spec(V, H, L, DIRECTIONS if bidirectional else DIRECTIONS[:1])


def init_params(V: int, H: int, L: int, bidirectional: bool, rng: np.random.Generator,
                dtype=np.float32, scale: float = 1.0) -> dict:
    """Initial weights, a function of the shapes, `scale` and the Generator only.

    W_hh starts as a scaled orthogonal matrix: all its singular values equal `scale`, so at the
    start gradients through time neither explode nor vanish from W_hh alone (Saxe et al. 2014;
    Le et al. 2015). Layer 0's input is one-hot, so its W_xh is an embedding table read one
    column at a time: N(0, scale^2) entries, as nn.Embedding, so a character moves the
    pre-activations by O(1). (Columns of norm 1 instead, std 1/sqrt(H), learned far slower: val
    loss 2.18 vs 1.77 after 400 steps of a 512-unit model on tiny-shakespeare.) Other input
    matrices are N(0, scale^2 / fan_in). The output matrix is 10x smaller than that, so the
    first predictions are near uniform and the step-0 loss is close to ln V. Biases are 0.
    """
    params = {}
    for name, shape in param_shapes(V, H, L, bidirectional).items():
        kind = name.rsplit(".", 1)[1]
        if kind.startswith("b_"):
            w = np.zeros(shape)
        elif kind == "W_hh":
            q, r = np.linalg.qr(rng.standard_normal(shape))
            w = scale * q * np.sign(np.diag(r))  # sign fix makes q uniformly distributed
        else:
            std = scale if name.startswith("layers.0.") else scale / np.sqrt(shape[1])
            w = rng.standard_normal(shape) * (std * 0.1 if name == "out.W_ho" else std)
        params[name] = w.astype(dtype)
    return params


def zero_state(spec: Spec, N: int, dtype=np.float32) -> dict:
    """All-zero hidden state: {direction: [(N, H) per layer]}."""
    return {d: [np.zeros((N, spec.H), dtype=dtype) for _ in range(spec.L)] for d in spec.dirs}


def dropout_masks(spec: Spec, N: int, T: int, p: float, rng: np.random.Generator, dtype=np.float32):
    """Masks for one step: between layers of each tower and on the head's input. None when p = 0."""
    if p == 0:
        return None
    S = T - 1 if spec.bidirectional else T
    masks = {f"layers.{l}.{d}": ops.dropout_mask((S, N, spec.H), p, rng, dtype)
             for d in spec.dirs for l in range(spec.L - 1)}
    masks["out"] = ops.dropout_mask((T, N, spec.H * len(spec.dirs)), p, rng, dtype)
    return masks


# ---- a tower: L stacked recurrent layers in one direction --------------------------------------

def tower_forward(params, d: str, ids, h0: list, masks):
    """Inputs: ids (S, N) time-major, h0 [(N, H)] * L.  Returns: hs_top (S+1, N, H), h_last, cache."""
    S, N = ids.shape
    layer_caches, inp, h_last = [], ids, []
    for l in range(len(h0)):
        p = f"layers.{l}.{d}."
        if l == 0:
            pre, in_cache = ops.lookup_forward(ids, params[p + "W_xh"], params[p + "b_h"])  # (S, N, H)
        else:
            pre, in_cache = ops.affine_forward(inp.reshape(S * N, -1), params[p + "W_xh"], params[p + "b_h"])
            pre = pre.reshape(S, N, -1)  # (S, N, H)
        hs, rnn_cache = ops.rnn_forward(pre, h0[l], params[p + "W_hh"])  # (S+1, N, H)
        h_last.append(hs[S])
        mask = masks.get(f"layers.{l}.{d}") if masks and l < len(h0) - 1 else None
        inp = hs[1:] * mask if mask is not None else hs[1:]  # (S, N, H) input of layer l+1
        layer_caches.append((in_cache, rnn_cache, mask))
    return hs, h_last, layer_caches


def tower_backward(dh_top, d: str, layer_caches):
    """Inputs: dh_top (S, N, H) reaching h_1..h_S of the top layer.  Returns: grads, dh0 list."""
    grads, dh0 = {}, [None] * len(layer_caches)
    dh = dh_top
    for l in range(len(layer_caches) - 1, -1, -1):
        p = f"layers.{l}.{d}."
        in_cache, rnn_cache, mask = layer_caches[l]
        dpre, dh0[l], grads[p + "W_hh"] = ops.rnn_backward(dh, rnn_cache)
        S, N, H = dpre.shape
        if l == 0:
            grads[p + "W_xh"], grads[p + "b_h"] = ops.lookup_backward(dpre, in_cache)
        else:
            dinp, grads[p + "W_xh"], grads[p + "b_h"] = ops.affine_backward(dpre.reshape(S * N, H), in_cache)
            dh = dinp.reshape(S, N, -1)  # (S, N, H) gradient reaching layer l-1's outputs
            below_mask = layer_caches[l - 1][2]
            if below_mask is not None:
                dh = dh * below_mask
    return grads, dh0


# ---- whole model -------------------------------------------------------------------------------

class ForwardCache(NamedTuple):
    spec: Spec
    towers: dict  # direction -> layer caches
    head: ops.AffineCache
    head_mask: object  # (T, N, H*dirs) or None
    shape: tuple  # (T, N)


def forward(params: dict, x, h0: dict | None = None, masks: dict | None = None):
    """Logits for every position of a batch.

    Inputs:  x (N, T) int ids; h0 {direction: [(N, H)] * L} or None for zeros; dropout masks or None
    Returns: logits (T*N, V) in time-major order (row t*N + n), h_last (the state after the
             window, for carrying), cache
    """
    spec = spec_of(params)
    N, T = x.shape
    xt = np.ascontiguousarray(x.T)  # (T, N): time-major ids
    h0 = h0 if h0 is not None else zero_state(spec, N, params["out.W_ho"].dtype)
    towers, h_last = {}, {}
    if not spec.bidirectional:
        hs, h_last["fwd"], towers["fwd"] = tower_forward(params, "fwd", xt, h0["fwd"], masks)
        feats = hs[1:]  # (T, N, H): h_1..h_T, each predicting the next character
    else:
        hs_f, h_last["fwd"], towers["fwd"] = tower_forward(params, "fwd", xt[:-1], h0["fwd"], masks)
        hs_b, h_last["bwd"], towers["bwd"] = tower_forward(params, "bwd", xt[:0:-1], h0["bwd"], masks)
        # position t reads h_{t-1} (hs_f[t-1], hs_f[0] = h_0) and g_{t+1} (hs_b reversed, g_{T+1} first)
        feats = np.concatenate([hs_f, hs_b[::-1]], axis=2)  # (T, N, 2H)
    head_mask = masks.get("out") if masks else None
    if head_mask is not None:
        feats = feats * head_mask
    logits, head_cache = ops.affine_forward(feats.reshape(T * N, -1), params["out.W_ho"], params["out.b_o"])  # (T*N, V)
    return logits, h_last, ForwardCache(spec, towers, head_cache, head_mask, (T, N))


def backward(dlogits, cache: ForwardCache):
    """Inputs: dlogits (T*N, V).  Returns: grads (same names as params), dh0 (same layout as h0)."""
    spec, (T, N) = cache.spec, cache.shape
    dfeats, dW_ho, db_o = ops.affine_backward(dlogits, cache.head)
    grads = {"out.W_ho": dW_ho, "out.b_o": db_o}
    dfeats = dfeats.reshape(T, N, -1)  # (T, N, H*dirs)
    if cache.head_mask is not None:
        dfeats = dfeats * cache.head_mask
    dh0 = {}
    if not spec.bidirectional:
        g, dh0["fwd"] = tower_backward(dfeats, "fwd", cache.towers["fwd"])
        grads.update(g)
    else:
        H = spec.H
        dleft, dright = dfeats[:, :, :H], dfeats[::-1, :, H:]  # (T, N, H) each, right back in tower order
        for d, dside in (("fwd", dleft), ("bwd", dright)):
            g, dh0[d] = tower_backward(dside[1:], d, cache.towers[d])
            dh0[d][-1] = dh0[d][-1] + dside[0]  # the head reads the top edge state directly
            grads.update(g)
    return {k: grads[k] for k in param_names(spec)}, dh0


def param_names(spec: Spec) -> list[str]:
    """Parameter names in their fixed order."""
    return list(param_shapes(spec.V, spec.H, spec.L, spec.bidirectional))


def targets(x, y=None):
    """Time-major flat targets (T*N,) matching the logits' rows: y for next-char, x itself for cloze."""
    return np.ascontiguousarray((x if y is None else y).T).reshape(-1)


class StepResult(NamedTuple):
    loss: float  # mean cross-entropy, nats per predicted character
    grads: dict
    h_last: dict
    dh0: dict


def loss_and_grads(params: dict, x, y=None, h0: dict | None = None, masks: dict | None = None) -> StepResult:
    """The one entry point the trainer and the gradient checks use.

    Inputs: x (N, T) ids; y (N, T) next-character targets (unidirectional) or None (cloze: x is
    its own target). h0 and masks as in forward().
    """
    spec = spec_of(params)
    if spec.bidirectional != (y is None):
        raise ValueError("next-char models need targets y; cloze models take y=None")
    logits, h_last, cache = forward(params, x, h0, masks)
    loss, dlogits = ops.softmax_cross_entropy(logits, targets(x, y))
    grads, dh0 = backward(dlogits, cache)
    return StepResult(loss, grads, h_last, dh0)
