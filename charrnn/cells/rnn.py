"""The vanilla (Elman) cell: h_t = tanh(W_xh x_t + W_hh h_{t-1} + b_h).

Shape legend as in cells/base.py (G = 1, k = 1: the state is h alone).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from charrnn import ops
from charrnn.cells.base import Cell, CellGrads


class RNNCache(NamedTuple):
    hs: object  # (S+1, N, H): h_0 (the carried-in state) followed by h_1..h_S
    W_hh: object  # (H, H)


class RNN(Cell):
    name = "rnn"
    gates = ("h",)
    flow_note = ("One step back multiplies the gradient by diag(tanh') W_hh, so its norm changes by at most "
                 "sigma_max * max tanh' per step;\nfor W_hh = s * orthogonal it changes by s * ||tanh' * g|| / ||g||, "
                 "about s * rms tanh' (Pascanu et al. 2013; Pennington et al. 2017).")

    def step(self, s, pre_t, rec_t, p, out):
        """h_t = tanh(rec_t + pre_t), written into out (N, H); rec_t = h_{t-1} W_hh^T."""
        xp = ops.array_module(out)
        xp.add(rec_t, pre_t, out=out)
        xp.tanh(out, out=out)
        return out

    def forward(self, pre, s0, p):
        """Run the recurrence over S steps from s0 = h_0.

        hs is one preallocated buffer that the steps write into: no per-step allocation, and the
        whole history is contiguous for the single dW_hh product in backward.
        """
        xp = ops.array_module(pre)
        S, N, H = pre.shape
        W_hh = p["W_hh"]
        hs = xp.empty((S + 1, N, H), dtype=pre.dtype)  # (S+1, N, H)
        hs[0] = s0
        plan = ops.product(W_hh, N, ops.feature_major(H))  # the weight copy the steps multiply with
        for t in range(S):
            self.step(hs[t], pre[t], ops.times(plan, hs[t]), p, hs[t + 1])
        return hs, hs[S], RNNCache(hs, W_hh)

    def backward(self, dh, cache: RNNCache, keep=False):
        """Backpropagation through time over the whole window.

        Per step, backwards: the gradient at h_t is the upstream dh[t] plus what flows back from
        h_{t+1} (dh_next); through tanh it is multiplied by 1 - h_t^2 (tanh' from its output);
        that gives dpre[t], and dh_next = dpre[t] W_hh (the diag(tanh') W_hh Jacobian of the
        design notes). dW_hh = sum_t dpre[t]^T h_{t-1} is summed over time after the loop as one
        (H, S*N) x (S*N, H) product.
        """
        xp = ops.array_module(dh)
        hs, W_hh = cache
        S, N, H = dh.shape
        dpre = xp.multiply(hs[1:], hs[1:])  # (S, N, H): h_t^2 ...
        xp.subtract(1, dpre, out=dpre)  # ... -> tanh'(a_t) = 1 - h_t^2, for all steps in one pass
        dhs = xp.empty((S + 1, N, H), dtype=dh.dtype) if keep else None  # (S+1, N, H)
        back = ops.product(W_hh.T, N, ops.feature_major(H))  # rows times W_hh
        dh_t = xp.empty((N, H), dtype=dh.dtype)  # (N, H) scratch
        dh_next = xp.zeros((N, H), dtype=dh.dtype)  # (N, H): nothing flows back from beyond the window
        for t in range(S - 1, -1, -1):
            xp.add(dh[t], dh_next, out=dh_t)  # total gradient at h_{t+1}
            if keep:
                dhs[t + 1] = dh_t
            xp.multiply(dpre[t], dh_t, out=dpre[t])  # backprop through tanh
            dh_next = ops.times(back, dpre[t])  # (N, H) = dpre[t] W_hh
        dh0 = xp.array(dh_next, order="C")  # (N, H), a copy out of the plan's buffer
        if keep:
            dhs[0] = dh0
        dW_hh = dpre.reshape(S * N, H).T @ hs[:-1].reshape(S * N, H)  # (H, H)
        return CellGrads(dpre, dh0, {"W_hh": dW_hh}, dhs)

    def carry_stats(self, cache: RNNCache) -> dict:
        """One step back multiplies the gradient by diag(tanh') W_hh: mean and rms of tanh' = 1 - h^2."""
        tanh_prime = 1.0 - cache.hs[1:].astype(np.float64) ** 2  # (S, N, H)
        return {"mean tanh'": float(np.mean(tanh_prime)), "rms tanh'": float(np.sqrt(np.mean(tanh_prime ** 2)))}
