"""Pure forward/backward primitives: all of charrnn's algebra lives here.

Shape legend (used in every math module):
    N batch (parallel streams or windows)     T time steps in a window
    S steps a recurrence actually runs (T for next-char towers, T-1 for cloze towers)
    V vocabulary size                          H hidden size (per direction)
    D input width of a layer (V for layer 0, H or 2H above)      M = T*N positions

Layout: inside the math, sequences are *time-major*, (T, N, ...), so that the slice a time step
reads or writes, h[t], is one contiguous (N, H) block and the per-step matrix products run on
contiguous memory without copies. The model converts the user-facing (N, T) ids once.

Each primitive is a pair: `x_forward(...) -> (out, cache)` and `x_backward(dout, cache) -> grads`
(the CS231n / llm.c contract). Functions never modify arrays they are given; caches hold only
what backward needs. Matrices follow the column-vector math of the design documents
(h_t = tanh(W_xh x_t + W_hh h_{t-1} + b_h), W_hh is H x H), applied to row-vector batches as
h @ W.T: numpy passes the transpose to BLAS as a flag, it is never copied.

Array module: arithmetic goes through `xp = array_module(x)`, numpy by default, so that an
array library with numpy's API (e.g. CuPy) can run the same code.
"""
from __future__ import annotations

import math
import sys
from typing import NamedTuple

import numpy as np


def array_module(a):
    """numpy for numpy arrays, else the module the array type comes from (e.g. cupy)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np
    return sys.modules[type(a).__module__.split(".")[0]]


ALIGN = 64  # bytes: one cache line


def aligned_empty(shape, dtype, xp=np):
    """An uninitialized C-ordered array whose data starts on a 64-byte boundary.

    malloc aligns to 16 bytes only, and OpenBLAS multiplied by a misaligned weight matrix up to
    35% slower at the recurrence's shapes (measured, (32,512) x (512,512): 112 us aligned, 120 or
    147-155 us at offsets 16, 32 or 48, varying from process to process). Which offset an array
    gets depends on the process's allocation history.
    """
    dtype = np.dtype(dtype)
    n = math.prod(shape)
    buf = xp.empty(n + ALIGN // dtype.itemsize, dtype=dtype)
    address = buf.__array_interface__["data"][0] if xp is np else buf.data.ptr
    skip = -address % ALIGN // dtype.itemsize
    return buf[skip : skip + n].reshape(shape)


def aligned_copy(a):
    """A C-ordered, 64-byte-aligned copy of a (see aligned_empty)."""
    xp = array_module(a)
    out = aligned_empty(a.shape, a.dtype, xp)
    out[...] = a
    return out


# ---- layer-0 input: a column lookup instead of a one-hot product ------------------------------

class LookupCache(NamedTuple):
    x: object  # (S, N) int ids
    V: int


def lookup_forward(x, W, b):
    """Input term of layer 0: W_xh x_t + b_h for one-hot x_t is column x_t of W_xh plus b_h.

    Inputs:  x (S, N) int ids, W (H, V), b (H,)
    Returns: pre (S, N, H), cache
    """
    xp = array_module(W)
    table = row_table(W, b)  # (V, H)
    pre = xp.take(table, x, axis=0)  # (S, N, H)
    return pre, LookupCache(x, W.shape[1])


def row_table(W, b):
    """(V, H) = W^T + b in row-major order, so that one character's row is contiguous.

    `W.T + b` alone would come out column-major (numpy keeps the input's layout), and gathering
    rows from it is a strided copy: 15 us instead of 2 us per sampled character.
    """
    xp = array_module(W)
    table = xp.empty((W.shape[1], W.shape[0]), dtype=W.dtype)  # (V, H)
    xp.add(W.T, b, out=table)
    return table


def lookup_backward(dpre, cache: LookupCache):
    """Scatter-add of the upstream rows into the columns that were looked up.

    Inputs:  dpre (S, N, H)
    Returns: dW (H, V), db (H,)
    """
    xp = array_module(dpre)
    H = dpre.shape[-1]
    dtable = xp.zeros((cache.V, H), dtype=dpre.dtype)  # (V, H)
    scatter_add_rows(dtable, cache.x.reshape(-1), dpre.reshape(-1, H))
    # every position adds its row to exactly one table row, so summing the table is the bias grad
    return dtable.T, dtable.sum(axis=0)


def scatter_add_rows(out, idx, rows):
    """out[idx[i]] += rows[i] for every i, repeated indices accumulating (in place on `out`).

    np.add.at states this literally but walks the rows one at a time (21 ms for 3,200 rows of
    512 here), and np.add.reduceat on the sorted rows is not much better (8.6 ms). Sorting the
    ids once, copying ids that occur once straight into place and summing each longer run of
    equal ids as one contiguous slice takes 0.9 ms (V = 65) to 4 ms (V = 6,000). The stable sort
    fixes the order of additions, so results are reproducible. Only `out` is written.
    """
    xp = array_module(rows)
    M = idx.size
    if M == 0:
        return out
    order = xp.argsort(idx, kind="stable")
    sorted_idx, sorted_rows = idx[order], rows[order]  # (M,), (M, H)
    starts = xp.flatnonzero(xp.concatenate([xp.ones(1, bool), sorted_idx[1:] != sorted_idx[:-1]]))
    ends = xp.concatenate([starts[1:], xp.asarray([M])])
    single = ends - starts == 1
    out[sorted_idx[starts[single]]] += sorted_rows[starts[single]]  # ids seen once: no sum needed
    for a, b in zip(starts[~single].tolist(), ends[~single].tolist()):
        out[sorted_idx[a]] += sorted_rows[a:b].sum(axis=0)
    return out


# ---- dense affine map: inputs of layers above 0, and the output head -------------------------

class AffineCache(NamedTuple):
    x: object  # (M, D)
    W: object  # (K, D)


def affine_forward(x, W, b):
    """Inputs: x (M, D), W (K, D), b (K,).  Returns: out (M, K) = x W^T + b, cache."""
    out = x @ W.T  # (M, K)
    out += b
    return out, AffineCache(x, W)


def affine_backward(dout, cache: AffineCache):
    """Inputs: dout (M, K).  Returns: dx (M, D), dW (K, D), db (K,).

    dW is one (K, M) x (M, D) product over every position at once, the positions summed inside
    the matrix product rather than in a Python loop.
    """
    x, W = cache
    return dout @ W, dout.T @ x, dout.sum(axis=0)


# ---- the recurrence ---------------------------------------------------------------------------

class RNNCache(NamedTuple):
    hs: object  # (S+1, N, H): h_0 (the carried-in state) followed by h_1..h_S
    W_hh: object  # (H, H)


FEATURE_MAJOR_MIN_H = 512  # from H = 512 on, the recurrence's products are written (H, N)


def feature_major(H: int) -> bool:
    """Whether products with an (H, H) recurrent matrix are written (H, N); see StepPlan."""
    return H >= FEATURE_MAJOR_MIN_H


class StepPlan(NamedTuple):
    """How rnn_step_forward multiplies by W_hh, fixed once per window from the hidden size.

    OpenBLAS (numpy's BLAS) writes the (H, N) result of W_hh h^T faster than the (N, H) result
    of h W_hh^T for the larger models, and slower for the smaller ones. Measured here, per step
    of 32 streams with the add and tanh: H = 512 152.9 vs 172.7 us (96-102 vs 113-155 us for the
    product alone, the row-major one varying with how the two cores share the fresh h), H = 768
    286 vs 302 us; but H = 256 54 vs 36 us and H = 128 15.9 vs 13.3 us, where the row-major form
    stays. The choice depends on H only, so a run (and its resumption) always takes the same path;
    both give the same numbers up to rounding, and are tested against the textbook loop.
    """

    W: object  # (H, H) contiguous: W_hh, 64-byte aligned (feature-major), or W_hh^T (row-major)
    scratch: object  # (H, N) buffer for the feature-major product; None for the row-major form


def step_plan(W_hh, N: int) -> StepPlan:
    xp = array_module(W_hh)
    H = W_hh.shape[0]
    if feature_major(H):
        return StepPlan(aligned_copy(W_hh), aligned_empty((H, N), W_hh.dtype, xp))
    # small models: a plain contiguous copy (the aligned one cost W5, 1 x 100, 3% of its step)
    return StepPlan(xp.ascontiguousarray(W_hh.T), None)


def rnn_step_forward(h_prev, pre_t, plan: StepPlan, out):
    """One step, written into `out`: h_t = tanh(W_hh h_{t-1} + pre_t), batched as rows.

    Inputs: h_prev (N, H), pre_t (N, H) = W_xh x_t + b_h, plan from step_plan (made once per
    window), out (N, H). In the feature-major form the add reads the small, cache-resident
    (H, N) product transposed and writes `out` row-major.
    The sampler calls this too, so both paths share one statement of the recurrence.
    """
    xp = array_module(out)
    if plan.scratch is not None:
        xp.matmul(plan.W, h_prev.T, out=plan.scratch)  # (H, N): W_hh h_{t-1}, feature-major
        xp.add(plan.scratch.T, pre_t, out=out)  # (N, H)
    else:
        xp.matmul(h_prev, plan.W, out=out)  # (N, H): h_{t-1} W_hh^T
        out += pre_t
    xp.tanh(out, out=out)
    return out


def rnn_forward(pre, h0, W_hh):
    """Run the recurrence over S steps from h0.

    Inputs:  pre (S, N, H) input terms W_xh x_t + b_h, h0 (N, H), W_hh (H, H)
    Returns: hs (S+1, N, H) with hs[0] = h0 and hs[t] = h_t, cache

    hs is one preallocated buffer that the steps write into: no per-step allocation, and the
    whole history is contiguous for the single dW_hh product in backward.
    """
    xp = array_module(pre)
    S, N, H = pre.shape
    hs = xp.empty((S + 1, N, H), dtype=pre.dtype)  # (S+1, N, H)
    hs[0] = h0
    plan = step_plan(W_hh, N)  # the weight copy (and scratch) the steps multiply with
    for t in range(S):
        rnn_step_forward(hs[t], pre[t], plan, hs[t + 1])
    return hs, RNNCache(hs, W_hh)


def rnn_backward(dh, cache: RNNCache):
    """Backpropagation through time over the whole window.

    Inputs:  dh (S, N, H): gradient of the loss reaching h_1..h_S from above (not through time)
    Returns: dpre (S, N, H), dh0 (N, H), dW_hh (H, H)

    Per step, backwards: the gradient at h_t is the upstream dh[t] plus what flows back from
    h_{t+1} (dh_next); through tanh it is multiplied by 1 - h_t^2 (tanh' from its output);
    that gives dpre[t], and dh_next = dpre[t] W_hh (the diag(tanh') W_hh Jacobian of the
    design notes). dW_hh = sum_t dpre[t]^T h_{t-1} is summed over time after the loop as one
    (H, S*N) x (S*N, H) product. From H = FEATURE_MAJOR_MIN_H on, dh_next is kept feature-major,
    (H, N) = W_hh^T dpre[t]^T, for the reason given in StepPlan.
    """
    xp = array_module(dh)
    hs, W_hh = cache
    S, N, H = dh.shape
    dpre = xp.multiply(hs[1:], hs[1:])  # (S, N, H): h_t^2 ...
    xp.subtract(1, dpre, out=dpre)  # ... -> tanh'(a_t) = 1 - h_t^2, for all steps in one pass
    dh_t = xp.empty((N, H), dtype=dh.dtype)  # (N, H) scratch
    if feature_major(H):
        W_T = aligned_copy(W_hh.T)  # (H, H)
        dh_next = xp.zeros((H, N), dtype=dh.dtype)  # (H, N): nothing flows back from beyond the window
        for t in range(S - 1, -1, -1):
            xp.add(dh[t], dh_next.T, out=dh_t)
            xp.multiply(dpre[t], dh_t, out=dpre[t])
            xp.matmul(W_T, dpre[t].T, out=dh_next)
        dh_next = xp.ascontiguousarray(dh_next.T)  # (N, H)
    else:
        dh_next = xp.zeros((N, H), dtype=dh.dtype)  # (N, H)
        for t in range(S - 1, -1, -1):
            xp.add(dh[t], dh_next, out=dh_t)
            xp.multiply(dpre[t], dh_t, out=dpre[t])
            xp.matmul(dpre[t], W_hh, out=dh_next)
    dW_hh = dpre.reshape(S * N, H).T @ hs[:-1].reshape(S * N, H)  # (H, H)
    return dpre, dh_next, dW_hh


# ---- dropout ----------------------------------------------------------------------------------

def dropout_mask(shape, p, rng, dtype):
    """Inverted-dropout mask: 0 with probability p, else 1/(1-p), so evaluation needs no rescale.

    Masks are drawn outside the forward pass (from the caller's Generator) and passed in, which
    keeps the forward pure and lets a gradient check hold one mask fixed.
    Speed: each 64-bit raw draw gives four 16-bit uniforms, compared with round(p * 2^16); that
    is p to within 2^-17, and 8x faster than rng.random in float64 (4 ms vs 32 ms for a
    (100, 32, 512) mask), which mattered: the float64 path cost as much as the forward pass.
    """
    n = math.prod(shape)
    bits = rng.bit_generator.random_raw(-(-n // 4)).view(np.uint16)[:n].reshape(shape)
    mask = (bits >= np.uint16(min(65535, round(p * 65536)))).astype(dtype)
    mask *= np.dtype(dtype).type(1.0 / (1.0 - p))
    return mask


# ---- loss -------------------------------------------------------------------------------------

def _exp_shifted(logits, y):
    """exp(z) and z[y] for z = logits - row max: the stable core of softmax and its loss.

    Subtracting the row max before exp keeps exp(z) <= 1 (min-char-rnn does not, and overflows).
    Inputs: logits (M, V), y (M,).  Returns: e (M, V) a new array, picked (M,) float64.
    """
    xp = array_module(logits)
    z = logits - logits.max(axis=1, keepdims=True)  # (M, V), new array: logits stay untouched
    picked = z[xp.arange(len(y)), y].astype(np.float64)  # (M,)
    xp.exp(z, out=z)
    return z, picked


def softmax_cross_entropy(logits, y):
    """Fused, numerically stable softmax + mean cross-entropy (nats per position).

    Inputs:  logits (M, V), y (M,) int targets
    Returns: loss (a Python float), dlogits (M, V)

    log-softmax = z - log(sum exp z), so loss = mean(log(sum exp z) - z[y]).
    The loss is the *mean* over M positions, so every row of the gradient
    d loss / d logits = softmax - onehot(y) is divided by M: the chain rule starts here.
    """
    xp = array_module(logits)
    M = logits.shape[0]
    e, picked = _exp_shifted(logits, y)  # (M, V), (M,)
    total = e.sum(axis=1)  # (M,)
    loss = float(xp.mean(xp.log(total.astype(np.float64)) - picked))
    e *= (1.0 / (total * M))[:, None]  # softmax / M
    e[xp.arange(M), y] -= 1.0 / M
    return loss, e


def cross_entropy_sum(logits, y):
    """Sum (not mean) of -log softmax(logits)[y] in float64: evaluation accumulates it over windows.

    Inputs: logits (M, V), y (M,).  Returns: a Python float.
    """
    xp = array_module(logits)
    e, picked = _exp_shifted(logits, y)
    return float(xp.sum(xp.log(e.sum(axis=1, dtype=np.float64)) - picked))
