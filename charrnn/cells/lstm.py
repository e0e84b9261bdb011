"""The LSTM cell, with PyTorch's nn.LSTM equations and gate rows i, f, g, o (Hochreiter &
Schmidhuber 1997, with the forget gate of Gers et al. 2000):

    a_t = pre_t + W_hh h_{t-1}                       pre_t = W_xh x_t + b_h, from the model
    i, f, o = sigmoid(a_i, a_f, a_o)    g = tanh(a_g)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

Shape legend as in cells/base.py (G = 4, k = 2): the per-layer state is one (N, 2H) array
[h | c]. W_xh (4H, D), W_hh (4H, H) and b_h (4H,) stack the blocks i, f, g, o in this order,
PyTorch's weight_ih_l0 / weight_hh_l0 / bias_ih_l0 + bias_hh_l0, so weights slice to and from torch.

Speed: the window runs one product per step for all four gates (ops.product, written
feature-major from H = 512) and a few passes over the step's (N, 4H) block. All four
nonlinearities are one tanh pass, because sigmoid(x) = 0.5 tanh(x / 2) + 0.5: scaling each
block by `half` (0.5 for i, f, o; 1 for g) before and after the tanh and adding `shift` (0.5; 0)
turns the tanh of every block into its gate (_gates_and_state, shared by forward and step).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from charrnn import ops
from charrnn.cells.base import Cell, CellGrads, gate_blocks

_HALF = (0.5, 0.5, 1.0, 0.5)  # per gate block i, f, g, o: the scale inside and outside the tanh
_SHIFT = (0.5, 0.5, 0.0, 0.5)  # per gate block: added after it (sigmoid = 0.5 tanh(x/2) + 0.5)


@functools.lru_cache(maxsize=16)
def _block_vectors(xp, dtype):
    """(4, 1, 1) half and shift factors in the arrays' dtype (a float64 one would upcast the pass),
    broadcast over a (4, N, H) block of gates. Cached, read-only: the sampler asks at every character."""
    half = xp.asarray(_HALF, dtype=dtype).reshape(4, 1, 1)  # (4, 1, 1)
    shift = xp.asarray(_SHIFT, dtype=dtype).reshape(4, 1, 1)  # (4, 1, 1)
    if xp is np:
        half.flags.writeable = shift.flags.writeable = False
    return half, shift


def _blocks(x):
    """The i, f, g, o blocks of (N, 4H) rows as a (4, N, H) view."""
    return gate_blocks(x, 4)


def _gates_and_state(a, c_prev, c, tc, h, half, shift):
    """The gate equations, in place: the one statement of them that forward and step share.

    Inputs: a (4, N, H) = pre_t + h_{t-1} W_hh^T as gate blocks, overwritten with the gates
    i, f, g, o; c_prev (N, H). Writes c (N, H) = c_t, tc (N, H) = tanh(c_t) and h (N, H) = h_t;
    tc and h may be the same array (step passes one buffer). The blocks of a are contiguous
    (N, H) arrays: numpy runs a pass over a strided (N, H) slice of (N, 4H) rows as one loop per
    row, several times the cost of a contiguous pass at the workloads' sizes.
    """
    xp = ops.array_module(a)
    a *= half  # sigmoid blocks: x / 2
    xp.tanh(a, out=a)  # one pass for all four blocks
    a *= half  # sigmoid blocks: 0.5 tanh(x/2) + 0.5 = sigmoid(x); g: tanh(x) * 1 + 0
    a += shift
    i, f, g, o = a  # (N, H) each, contiguous
    xp.multiply(i, g, out=tc)  # tc as scratch for i * g
    xp.multiply(f, c_prev, out=c)
    c += tc  # c_t = f * c_{t-1} + i * g
    xp.tanh(c, out=tc)
    xp.multiply(o, tc, out=h)  # h_t = o * tanh(c_t)
    return h


class LSTMCache(NamedTuple):
    hs: object  # (S+1, N, H): h_0..h_S (h_{t-1} is dW_hh's right factor)
    cs: object  # (S+1, N, H): c_0..c_S (c_{t-1} is the forget gate's input)
    tcs: object  # (S, N, H): tanh(c_1..c_S), saved since forward computes it anyway
    gates: object  # (S, 4, N, H): i, f, g, o after their nonlinearities, one contiguous block each
    W_hh: object  # (4H, H)


class LSTM(Cell):
    name = "lstm"
    gates = ("i", "f", "g", "o")
    states = ("h", "c")
    extras = ()
    flow_note = ("One step back the gradient at c is multiplied by the forget gate f (elementwise, no matrix), "
                 "and reaches h through the gates;\nW_hh acts only through the gates' derivatives, so its spectra "
                 "do not bound the flow as they do for rnn: a mean f near 1 keeps gradients alive over many steps.")

    def bias_init(self, H):
        """Zeros except the forget gate's block, 1: the carry starts mostly open, so gradients
        through c survive many steps from the first update (Jozefowicz et al. 2015, sec. 2.2)."""
        b = np.zeros(4 * H)
        b[H:2 * H] = 1.0
        return b

    def step(self, s, pre_t, rec_t, p, out):
        """One step: s (N, 2H) = [h_{t-1} | c_{t-1}], pre_t (N, 4H), rec_t = h_{t-1} W_hh^T (N, 4H).
        The new state [h_t | c_t] is written into out (N, 2H) and returned."""
        xp = ops.array_module(out)
        H = out.shape[1] // 2
        a = xp.add(_blocks(rec_t), _blocks(pre_t))  # (4, N, H), a new array: rec_t and pre_t stay as they are
        half, shift = _block_vectors(xp, np.dtype(out.dtype))
        _gates_and_state(a, s[:, H:], out[:, H:], out[:, :H], out[:, :H], half, shift)
        return out

    def forward(self, pre, s0, p):
        """Run the recurrence over S steps from s0 = [h_0 | c_0].

        Inputs: pre (S, N, 4H), s0 (N, 2H), p["W_hh"] (4H, H).
        Returns: hs (S+1, N, H), s_last (N, 2H) a new array [h_S | c_S], cache.
        The steps write into preallocated window buffers (no per-step allocation); the gates
        buffer doubles as each step's work area, so what backward needs is saved as it is made.
        """
        xp = ops.array_module(pre)
        S, N, GH = pre.shape
        H = GH // 4
        W_hh = p["W_hh"]
        half, shift = _block_vectors(xp, np.dtype(pre.dtype))  # (4, 1, 1) each
        hs = xp.empty((S + 1, N, H), dtype=pre.dtype)  # (S+1, N, H)
        cs = xp.empty((S + 1, N, H), dtype=pre.dtype)  # (S+1, N, H)
        tcs = xp.empty((S, N, H), dtype=pre.dtype)  # (S, N, H)
        gates = xp.empty((S, 4, N, H), dtype=pre.dtype)  # (S, 4, N, H)
        hs[0], cs[0] = s0[:, :H], s0[:, H:]
        plan = ops.product(W_hh, N, ops.feature_major(H))  # all four gates' rows in one product
        for t in range(S):
            # one pass gathers the product (read transposed when feature-major) and pre_t into blocks
            xp.add(_blocks(ops.times(plan, hs[t])), _blocks(pre[t]), out=gates[t])
            _gates_and_state(gates[t], cs[t], cs[t + 1], tcs[t], hs[t + 1], half, shift)
        s_last = xp.concatenate([hs[S], cs[S]], axis=1)  # (N, 2H)
        return hs, s_last, LSTMCache(hs, cs, tcs, gates, W_hh)

    def backward(self, dh, cache: LSTMCache, keep=False):
        """Backpropagation through time over the window; nothing flows in from beyond it.

        Per step, backwards (d-names are dL/d of the forward's names): the gradient at h_t is the
        upstream dh[t] plus dh_next from step t+1; h_t = o * tanh(c_t) sends do = dh_t * tanh(c_t)
        and adds dh_t * o * (1 - tanh(c_t)^2) to dc_t, which already holds dc_next * f_{t+1}
        (the carry path); c_t = f c_{t-1} + i g sends di = dc g, df = dc c_{t-1}, dg = dc i and
        dc_{t-1} = dc f. Through the nonlinearities: sigmoid' = s (1 - s), tanh' = 1 - g^2.
        Then dh_next = da_t W_hh (one product for all four gates), and after the loop
        dW_hh = sum_t da_t^T h_{t-1} as one (4H, S*N) x (S*N, H) product.
        """
        xp = ops.array_module(dh)
        hs, cs, tcs, gates, W_hh = cache
        S, N, H = dh.shape
        half, shift = _block_vectors(xp, np.dtype(dh.dtype))
        half2 = half * half  # (4, 1, 1)
        kc = _carry_factor(gates, tcs)  # (S, N, H) = o (1 - tanh(c)^2), for the whole window
        dpre = xp.empty((S, N, 4 * H), dtype=dh.dtype)  # (S, N, 4H)
        dhs = xp.empty((S + 1, N, H), dtype=dh.dtype) if keep else None  # (S+1, N, H)
        back = ops.product(W_hh.T, N, ops.feature_major(H))  # rows times W_hh
        dh_t = xp.empty((N, H), dtype=dh.dtype)  # (N, H) scratch
        da = xp.empty((4, N, H), dtype=dh.dtype)  # (4, N, H) scratch: dL/da_t as gate blocks
        deriv = xp.empty((4, N, H), dtype=dh.dtype)  # (4, N, H) scratch: the gates' derivatives
        dc = xp.zeros((N, H), dtype=dh.dtype)  # (N, H): dL/dc_t, carried backwards
        dh_next = xp.zeros((N, H), dtype=dh.dtype)  # (N, H): dL/dh_t through time
        for t in range(S - 1, -1, -1):
            xp.add(dh[t], dh_next, out=dh_t)  # total gradient at h_{t+1}
            if keep:
                dhs[t + 1] = dh_t
            _step_backward(dh_t, dc, gates[t], cs[t], tcs[t], kc[t], shift, half2, deriv, da)
            _blocks(dpre[t])[...] = da  # (N, 4H) rows, the layout the model's input gradients use
            dh_next = ops.times(back, dpre[t])  # (N, H) = da_t W_hh
        ds0 = xp.concatenate([dh_next, dc], axis=1)  # (N, 2H) = [dh_0 | dc_0], out of the plan's buffer
        if keep:
            dhs[0] = dh_next
        dW_hh = dpre.reshape(S * N, 4 * H).T @ hs[:-1].reshape(S * N, H)  # (4H, H)
        return CellGrads(dpre, ds0, {"W_hh": dW_hh}, dhs)

    def carry_stats(self, cache: LSTMCache) -> dict:
        """Along the carry c, one step back multiplies the gradient by f (dc_{t-1} = f * dc_t
        plus what enters through h), so the forget gate's values are the carry path's factors:
        their mean, their geometric mean (the typical per-step factor of a product over many
        steps) and the fraction above 0.9, over steps, units and streams."""
        f = cache.gates[:, 1].astype(np.float64)  # (S, N, H)
        return {"mean forget gate": float(np.mean(f)),
                "geometric mean forget gate": float(np.exp(np.mean(np.log(np.maximum(f, 1e-300))))),
                "fraction forget gate > 0.9": float(np.mean(f > 0.9))}


def _carry_factor(gates, tcs):
    """o (1 - tanh(c)^2) for every step at once (S, N, H): what dh_t contributes to dc_t per unit."""
    xp = ops.array_module(tcs)
    kc = xp.multiply(tcs, tcs)  # (S, N, H)
    xp.subtract(1, kc, out=kc)
    kc *= gates[:, 3]
    return kc


def _step_backward(dh_t, dc, g_t, c_prev, tc, kc, shift, half2, deriv, da):
    """One step of the LSTM's backward, in place: dc (N, H) from dL/dc_t (the carried part) to
    dL/dc_{t-1}; da (4, N, H) receives dL/da_t. g_t (4, N, H) holds i, f, g, o; deriv is scratch."""
    xp = ops.array_module(dh_t)
    i, f, g, o = g_t  # (N, H) each, contiguous
    di, df, dg, do = da
    xp.multiply(dh_t, tc, out=do)  # h = o tanh(c)
    xp.multiply(dh_t, kc, out=di)  # di as scratch: dh * o * (1 - tanh(c)^2) ...
    dc += di  # ... joins the carried dc_next * f_{t+1}
    xp.multiply(dc, g, out=di)  # c = f c_prev + i g
    xp.multiply(dc, c_prev, out=df)
    xp.multiply(dc, i, out=dg)
    # through the nonlinearities, all four blocks in one expression: the forward took
    # x -> half x -> t = tanh -> half t + shift, so the derivative is half^2 (1 - t^2), and
    # half t = gate - shift: half^2 - (gate - shift)^2 (= s (1 - s) for sigmoid, 1 - g^2 for tanh)
    xp.subtract(g_t, shift, out=deriv)
    deriv *= deriv
    xp.subtract(half2, deriv, out=deriv)
    da *= deriv
    dc *= f  # the carry: dL/dc_{t-1} through c_t = f c_{t-1} + ...
