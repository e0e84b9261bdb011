"""The gated recurrent unit (Cho et al. 2014) with PyTorch's nn.GRU equations, gate rows r, z, n:

    r_t = sigmoid(a_r),  a_r = W_ir x_t + b_ir + W_hr h_{t-1} + b_hr        (reset gate)
    z_t = sigmoid(a_z),  a_z = W_iz x_t + b_iz + W_hz h_{t-1} + b_hz        (update gate)
    n_t = tanh(a_n),     a_n = W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn)
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}

Shape legend as in cells/base.py (G = 3, k = 1: the state is h alone). Parameters of a layer:
W_xh (3H, D) = torch's weight_ih, W_hh (3H, H) = weight_hh, b_h (3H,) = bias_ih plus bias_hh's
r and z blocks, b_hn (H,) = bias_hh's n block. b_hr and b_hz only ever appear added to b_ir and
b_iz, so one vector holds each sum (no redundant parameters); b_hn is multiplied by r_t and
must stay apart. From torch: b_h = b_ih + concat(b_hh[:2H], zeros(H)), b_hn = b_hh[2H:].

The model hands the cell pre = W_xh x_t + b_h for the window; the cell adds rec = h_{t-1} W_hh^T,
one product per step for all three gates, and b_hn inside the n gate.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from charrnn import ops
from charrnn.cells.base import Cell, CellGrads, gate_blocks


class GRUCache(NamedTuple):
    hs: object  # (S+1, N, H): h_0 (the carried-in state) followed by h_1..h_S
    g: object  # (S, 3, N, H): the gates r, z, n of every step, each block contiguous
    q: object  # (S, N, H): r * (h_{t-1} W_hn^T + b_hn), the reset-gated term inside a_n
    W_hh: object  # (3H, H)


def _blocks(x):
    """The r, z, n blocks of (N, 3H) rows as a (3, N, H) view."""
    return gate_blocks(x, 3)


def _gates(pre, rec, h_prev, b_hn, g, q, out):
    """The GRU equations for one step; forward and step both run them, nothing else does.

    Inputs: pre (3, N, H) the input terms and rec (3, N, H) = h_{t-1} W_hh^T by gate block r, z,
    n (views, not written), h_prev (N, H), b_hn (H,). Writes the gates r, z, n into g (3, N, H),
    r * (rec_n + b_hn) into q (N, H) and h_t into out (N, H), which may be h_prev itself.
    Returns out.
    sigmoid(a) = 0.5 tanh(a / 2) + 0.5 exactly, so r and z come from one tanh pass over (2, N, H),
    and no exp can overflow for large |a|. g's blocks are contiguous (N, H) arrays because
    numpy runs a pass over an (N, H) slice of (N, 3H) rows as one loop per row, several times
    the cost of a contiguous pass at the workloads' sizes (benchmarks/README.md).
    """
    xp = ops.array_module(out)
    a_rz = xp.add(pre[:2], rec[:2], out=g[:2])  # a_r, a_z
    xp.multiply(a_rz, 0.5, out=a_rz)
    xp.tanh(a_rz, out=a_rz)
    xp.multiply(a_rz, 0.5, out=a_rz)
    xp.add(a_rz, 0.5, out=a_rz)  # r, z
    r, z = g[0], g[1]
    xp.add(rec[2], b_hn, out=q)  # W_hn h_{t-1} + b_hn
    xp.multiply(q, r, out=q)  # ... gated by r
    a_n = xp.add(pre[2], q, out=g[2])  # a_n
    n = xp.tanh(a_n, out=a_n)  # n
    # h_t = (1 - z) n + z h_{t-1} = n + z (h_{t-1} - n): three passes, and out may alias h_prev
    xp.subtract(h_prev, n, out=out)
    xp.multiply(out, z, out=out)
    xp.add(out, n, out=out)
    return out


class GRU(Cell):
    name = "gru"
    gates = ("r", "z", "n")
    extras = ("b_hn",)
    flow_note = ("One step back the gradient at h is multiplied by the update gate z directly (h_t = ... + z h_{t-1}), "
                 "plus a path through the gates and W_hh;\nz near 1 keeps gradients alive over many steps, "
                 "whatever the spectra of W_hh's blocks.")

    def step(self, s, pre_t, rec_t, p, out):
        """h_t written into out (N, H) from s = h_{t-1} (N, H), pre_t (N, 3H) and rec_t (N, 3H) =
        h_{t-1} W_hh^T without b_hn."""
        xp = ops.array_module(out)
        N, H = out.shape
        g = xp.empty((3, N, H), dtype=out.dtype)  # (3, N, H) gates, not needed after the step
        q = xp.empty_like(out)  # (N, H)
        return _gates(_blocks(pre_t), _blocks(rec_t), s, p["b_hn"], g, q, out)

    def forward(self, pre, s0, p):
        """Run the recurrence over S steps from s0 = h_0.

        Each step writes its gates into g and q, which with hs are all backward needs; hs is one
        preallocated buffer, contiguous for the single dW_hh product in backward.
        """
        xp = ops.array_module(pre)
        S, N, G_H = pre.shape
        H = G_H // 3
        g = xp.empty((S, 3, N, H), dtype=pre.dtype)  # (S, 3, N, H)
        q = xp.empty((S, N, H), dtype=pre.dtype)  # (S, N, H)
        hs = xp.empty((S + 1, N, H), dtype=pre.dtype)  # (S+1, N, H)
        hs[0] = s0
        plan = ops.product(p["W_hh"], N, ops.feature_major(H))  # the weight copy the steps multiply with
        for t in range(S):
            rec = _blocks(ops.times(plan, hs[t]))  # (3, N, H) view
            _gates(_blocks(pre[t]), rec, hs[t], p["b_hn"], g[t], q[t], hs[t + 1])
        return hs, hs[S], GRUCache(hs, g, q, p["W_hh"])

    def backward(self, dh, cache: GRUCache, keep=False):
        """Backpropagation through time over the whole window.

        Per step, backwards: the gradient at h_t is the upstream dh[t] plus what flows back from
        h_{t+1}; _step_back takes it through the gates to da_n and drec = h_{t-1} W_hh^T's
        gradient, and dh_{t-1} = dh_t z + drec W_hh (the direct carry plus the product).
        dpre = da_r | da_z | da_n; drec differs in its n block, da_n r. dW_hh = sum_t drec_t^T
        h_{t-1} is one (3H, S*N) x (S*N, H) product after the loop, db_hn the sum of drec's n block.
        """
        xp = ops.array_module(dh)
        hs, g, q, W_hh = cache
        S, N, H = dh.shape
        drec = xp.empty((S, N, 3 * H), dtype=dh.dtype)  # (S, N, 3H)
        da_n = xp.empty((S, N, H), dtype=dh.dtype)  # (S, N, H)
        dhs = xp.empty((S + 1, N, H), dtype=dh.dtype) if keep else None  # (S+1, N, H)
        back = ops.product(W_hh.T, N, ops.feature_major(H))  # rows times W_hh
        dh_t = xp.empty((N, H), dtype=dh.dtype)  # (N, H) scratch
        tmp = xp.empty((3, N, H), dtype=dh.dtype)  # (3, N, H) scratch of _step_back
        dh_next = xp.zeros((N, H), dtype=dh.dtype)  # (N, H): nothing flows back from beyond the window
        for t in range(S - 1, -1, -1):
            xp.add(dh[t], dh_next, out=dh_t)  # total gradient at h_{t+1}
            if keep:
                dhs[t + 1] = dh_t
            _step_back(dh_t, g[t], q[t], hs[t], da_n[t], _blocks(drec[t]), dh_next, tmp)
            xp.add(dh_next, ops.times(back, drec[t]), out=dh_next)  # dh_t z + drec W_hh
        if keep:
            dhs[0] = dh_next
        flat = drec.reshape(S * N, 3 * H)  # (S*N, 3H)
        dW_hh = flat.T @ hs[:-1].reshape(S * N, H)  # (3H, H)
        db_hn = flat[:, 2 * H :].sum(axis=0)  # (H,)
        drec[..., 2 * H :] = da_n  # drec becomes dpre: only the n block differs (no factor r)
        return CellGrads(drec, dh_next, {"W_hh": dW_hh, "b_hn": db_hn}, dhs)

    def carry_stats(self, cache: GRUCache) -> dict:
        """One step back along the direct path h_t = ... + z h_{t-1} multiplies the gradient by z:
        its mean, and its geometric mean exp(mean log z), the typical per-step factor, whose k-th
        power is how much of a gradient survives k steps on that path alone."""
        z = cache.g[:, 1].astype(np.float64)  # (S, N, H)
        with np.errstate(divide="ignore"):  # a saturated z = 0 (it happens in float32) cuts the path: mean 0
            geometric = float(np.exp(np.mean(np.log(z))))
        return {"mean update gate z": float(np.mean(z)), "geometric mean z (direct-path factor per step)": geometric}


def _step_back(dh_t, g, q, h_prev, da_n, drec, carry, tmp):
    """One step of backward through the gates, from the forward's outputs alone.

    Inputs: dh_t (N, H) the total gradient at h_t, g (3, N, H) the step's gates r, z, n, q (N, H)
    = r (rec_n + b_hn), h_prev (N, H); tmp (3, N, H) scratch. Writes:
        carry = dh_t z                                the direct path h_t = ... + z h_{t-1}
        da_n  = dh_t (1 - z) (1 - n^2)                through (1 - z) n, then tanh' = 1 - n^2
        da_z  = dh_t (h_{t-1} - n) z (1 - z)          through z (h_{t-1} - n), then sigmoid'
        da_r  = da_n (rec_n + b_hn) r (1 - r)         through r (rec_n + b_hn), then sigmoid'
              = da_n q (1 - r)
    into carry (N, H), da_n (N, H) and the blocks of drec (3, N, H) = da_r, da_z, da_n r.
    x (1 - z) is computed as x - x z, which needs no array holding 1 - z.
    The factors of dh_t and da_n depend on the forward only, but making them for the whole
    window first in batched passes (as the vanilla cell does with tanh') made backward slower
    (benchmarks/README.md): three more (S, N, H) arrays written to memory and read back, where
    these passes read each block of the cache once, while it is in cache.
    """
    xp = ops.array_module(dh_t)
    r, z, n = g
    u, v, dn = tmp
    xp.multiply(dh_t, z, out=carry)  # dh_t z
    xp.subtract(dh_t, carry, out=dn)  # dh_t (1 - z): the gradient at n
    xp.multiply(dn, n, out=u)
    xp.multiply(u, n, out=u)
    xp.subtract(dn, u, out=da_n)  # dn (1 - n^2)
    xp.subtract(h_prev, n, out=u)
    xp.multiply(u, carry, out=u)  # dh_t z (h_{t-1} - n)
    xp.multiply(u, z, out=v)
    xp.subtract(u, v, out=drec[1])  # ... (1 - z): da_z
    xp.multiply(da_n, q, out=u)  # da_n q = da_n r (rec_n + b_hn)
    xp.multiply(u, r, out=v)
    xp.subtract(u, v, out=drec[0])  # ... (1 - r): da_r
    xp.multiply(da_n, r, out=drec[2])  # the gradient of rec_n + b_hn
