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
what backward needs. Matrices follow the column-vector math of the papers and of PyTorch's
nn.RNN (h_t = tanh(W_xh x_t + W_hh h_{t-1} + b_h), W_hh is H x H), applied to row-vector
batches as h @ W.T: numpy passes the transpose to BLAS as a flag, it is never copied.

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

    malloc aligns to 16 bytes only, and OpenBLAS multiplies by a misaligned weight matrix markedly
    slower at the recurrence's shapes, by an amount that depends on the offset (benchmarks/README.md).
    Which offset an array gets depends on the process's allocation history, so without this the
    speed of a run would vary from process to process.
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
    return copy_into(aligned_empty(a.shape, a.dtype, xp), a)


def contiguous(a):
    """a itself if C-contiguous, else a C-ordered copy made as copy_into makes it."""
    xp = array_module(a)
    return a if a.flags.c_contiguous else copy_into(xp.empty(a.shape, dtype=a.dtype), a)


COPY_BLOCK = 16  # columns per block when copying a transposed matrix


def copy_into(out, a):
    """out[...] = a, returns out. A 2-D transposed view is copied COPY_BLOCK columns at a time:
    numpy's plain copy reads such a source a column at a time, each element in another cache
    line, while a block of 16 source rows stays in cache (several times faster for the
    recurrent matrices' transposes; benchmarks/README.md)."""
    if a.ndim != 2 or a.flags.c_contiguous or not a.flags.f_contiguous:
        out[...] = a
        return out
    for j in range(0, a.shape[1], COPY_BLOCK):
        out[:, j : j + COPY_BLOCK] = a[:, j : j + COPY_BLOCK]
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
    rows from it is a strided copy, several times slower per sampled character (benchmarks/README.md).
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

    np.add.at states this literally but walks the rows one at a time, and np.add.reduceat on the
    sorted rows is not much better. Sorting the ids once, copying ids that occur once straight
    into place and summing each longer run of equal ids as one block of rows is several times
    faster than either, for small and large vocabularies (benchmarks/README.md). Each run's rows
    are gathered just before their sum, while they fit in cache, rather than all (M, H) rows
    sorted first: a quarter less time, the same additions. The stable sort fixes the order of
    additions, so results are reproducible. Only `out` is written.
    """
    xp = array_module(rows)
    M = idx.size
    if M == 0:
        return out
    order = xp.argsort(idx, kind="stable")
    sorted_idx = idx[order]  # (M,)
    starts = xp.flatnonzero(xp.concatenate([xp.ones(1, bool), sorted_idx[1:] != sorted_idx[:-1]]))
    ends = xp.concatenate([starts[1:], xp.asarray([M])])
    single = ends - starts == 1
    out[sorted_idx[starts[single]]] += rows[order[starts[single]]]  # ids seen once: no sum needed
    for a, b in zip(starts[~single].tolist(), ends[~single].tolist()):
        out[sorted_idx[a]] += rows[order[a:b]].sum(axis=0)  # (b-a, H) rows of one id, in sorted order
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


# ---- recurrent products: the one matrix product per time step of every cell ---------------------

FEATURE_MAJOR_MIN_H = 512  # from H = 512 on, per-step products are written (R, N)


def feature_major(H: int) -> bool:
    """Whether per-step products with a recurrent matrix of inner size H are written (R, N)."""
    return H >= FEATURE_MAJOR_MIN_H


class Product(NamedTuple):
    """How `times` multiplies a batch of rows by a fixed matrix, chosen once per window.

    OpenBLAS (numpy's BLAS) writes the (R, N) result of M x^T faster than the (N, R) result of
    x M^T for the larger models, and slower for the smaller ones (benchmarks/README.md has the
    measurements). The choice depends on H only, so a run and its resumption always take the
    same path; both give the same numbers up to rounding, and are tested against plain loops.
    """

    M: object  # feature-major: M (R, K), 64-byte aligned; row-major: M^T (K, R) contiguous
    out: object  # (R, N) scratch (feature-major) or (N, R) buffer (row-major)
    fm: bool


def product(M, N: int, fm: bool) -> Product:
    """A plan for x M^T with x (N, K) and M (R, K); see Product."""
    xp = array_module(M)
    R = M.shape[0]
    if fm:
        return Product(aligned_copy(M), aligned_empty((R, N), M.dtype, xp), True)
    # small models: a plain contiguous copy (aligning it cost the smallest workload more than it saved)
    return Product(contiguous(M.T), xp.empty((N, R), dtype=M.dtype), False)


def times(plan: Product, x):
    """x M^T for x (N, K): an (N, R) view of the plan's buffer, valid until the next call.

    In the feature-major form the view is the transpose of the (R, N) scratch: callers read it
    in their next elementwise pass, which writes their own row-major arrays.
    """
    xp = array_module(x)
    if plan.fm:
        xp.matmul(plan.M, x.T, out=plan.out)  # (R, N)
        return plan.out.T  # (N, R) view
    xp.matmul(x, plan.M, out=plan.out)  # (N, R)
    return plan.out


# ---- dropout ----------------------------------------------------------------------------------

def dropout_mask(shape, p, rng, dtype):
    """Inverted-dropout mask: 0 with probability p, else 1/(1-p), so evaluation needs no rescale.

    Masks are drawn outside the forward pass (from the caller's Generator) and passed in, which
    keeps the forward pure and lets a gradient check hold one mask fixed.
    Speed: each 64-bit raw draw gives four 16-bit uniforms, compared with round(p * 2^16); that
    is p to within 2^-17, and several times faster than rng.random in float64, which mattered:
    the float64 path cost as much as the forward pass (benchmarks/README.md).
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
