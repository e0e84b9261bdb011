"""The interface every recurrent cell implements, and what all cells share (init, FLOP count).

Shape legend as in ops.py: N batch, S steps a layer runs, D input width of the layer,
H hidden size, G gate blocks (1 rnn, 4 lstm, 3 gru), k state blocks (1 rnn and gru, 2 lstm).

A cell owns, and nothing else in charrnn states:
  * its parameters: `W_xh` (G*H, D), `W_hh` (G*H, H), `b_h` (G*H,), plus any extra (GRU: b_hn),
    with PyTorch's row blocks (`gates`), so weights move to and from torch.nn.LSTM / GRU by slicing;
  * their initialisation;
  * `forward` over a window and its `backward` (the paired pure functions of ops.py);
  * `step`, one time step for sampling, from the same equations as `forward`;
  * its state layout: one (N, k*H) array per layer holding the blocks `states` side by side,
    h first, so the layer's output is always state[:, :H];
  * its FLOP count, the blocks of W_hh whose spectra diagnose reports, and the statistic of its
    carry path that diagnose shows next to the gradient-flow profile.

The model computes the input term pre = W_xh x + b_h for a whole window (a lookup for layer 0,
one product above) and hands it to the cell, which runs the recurrence.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class CellGrads(NamedTuple):
    dpre: object  # (S, N, G*H) gradient of the input term W_xh x_t + b_h
    ds0: object  # (N, k*H) gradient of the initial state
    grads: dict  # {"W_hh": (G*H, H), ...extras}: parameter gradients summed over time
    dhs: object  # (S+1, N, H) total dL/dh_t for t = 0..S if asked for (diagnose), else None


def gate_blocks(x, G: int):
    """(N, G*H) rows viewed as (G, N, H), one block per gate (no copy), so that a cell's
    elementwise passes can run on, or write into, whole contiguous (N, H) gate blocks."""
    N, GH = x.shape
    return x.reshape(N, G, GH // G).transpose(1, 0, 2)


class Cell:
    """Base class: subclasses set the class attributes and implement the four methods."""

    name = ""
    gates: tuple = ()  # row blocks of W_xh, W_hh and b_h, in PyTorch's order
    states: tuple = ("h",)  # blocks of the per-layer state array, h first (rnn and gru keep this default)
    extras: tuple = ()  # names of extra (H,) bias vectors beyond b_h
    flow_note = ""  # how gradients travel back through this cell, printed under diagnose's table

    # ---- parameters ----

    def param_shapes(self, D: int, H: int) -> dict[str, tuple]:
        """The layer's parameter suffixes and shapes, in their fixed order."""
        G = len(self.gates)
        return {"W_xh": (G * H, D), "W_hh": (G * H, H), "b_h": (G * H,), **{e: (H,) for e in self.extras}}

    def state_size(self, H: int) -> int:
        return len(self.states) * H

    def init(self, D: int, H: int, rng: np.random.Generator, scale: float, embedding: bool) -> dict:
        """Initial float64 weights of one layer (the caller casts), a function of its arguments only.

        Each (H, H) block of W_hh starts as a scaled orthogonal matrix: all its singular values
        equal `scale`, so at the start gradients through time neither explode nor vanish from W_hh
        alone (Saxe et al. 2014; Le et al. 2015). Layer 0's input is one-hot, so its W_xh is an
        embedding table read one column at a time: N(0, scale^2) entries, as nn.Embedding, so a
        character moves the pre-activations by O(1); other input matrices are N(0, scale^2 /
        fan_in). Biases are 0 unless the cell says otherwise (bias_init).
        """
        shapes = self.param_shapes(D, H)
        std = scale if embedding else scale / np.sqrt(D)
        p = {"W_xh": rng.standard_normal(shapes["W_xh"]) * std}
        blocks = []
        for _ in self.gates:
            q, r = np.linalg.qr(rng.standard_normal((H, H)))
            blocks.append(scale * q * np.sign(np.diag(r)))  # sign fix makes q uniformly distributed
        p["W_hh"] = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)
        p["b_h"] = self.bias_init(H)
        p.update({e: np.zeros(H) for e in self.extras})
        return p

    def bias_init(self, H: int) -> np.ndarray:
        return np.zeros(len(self.gates) * H)

    # ---- what diagnose and bench ask ----

    def flops(self, S: int, N: int, D: int, H: int, lookup: bool) -> float:
        """Matrix-product FLOPs (2 per multiply-add) of one layer's forward and backward over a window:
        the recurrent product forward, its input gradient and dW_hh; above layer 0 the same three
        for the input product. Elementwise gate arithmetic is not counted."""
        G = len(self.gates)
        return 3 * 2 * S * N * H * G * H + (0 if lookup else 3 * 2 * S * N * D * G * H)

    def hh_blocks(self, W_hh) -> dict:
        """{label: (H, H) block} of W_hh whose largest singular values diagnose reports."""
        H = W_hh.shape[1]
        if len(self.gates) == 1:
            return {"": W_hh}
        return {g: W_hh[i * H:(i + 1) * H] for i, g in enumerate(self.gates)}

    # ---- the recurrence: implemented by each cell ----

    def forward(self, pre, s0, p: dict):
        """pre (S, N, G*H), s0 (N, k*H), p the layer's parameters by suffix.
        Returns hs (S+1, N, H) with hs[0] = h_0, s_last (N, k*H), cache."""
        raise NotImplementedError

    def backward(self, dh, cache, keep: bool = False) -> CellGrads:
        """dh (S, N, H) reaching h_1..h_S from above (not through time). keep: also return dhs."""
        raise NotImplementedError

    def step(self, s, pre_t, rec_t, p: dict, out):
        """One step for sampling: s (N, k*H), pre_t (N, G*H), rec_t = h_{t-1} W_hh^T (N, G*H)
        computed by the caller; the new state is written into out (N, k*H) and returned."""
        raise NotImplementedError

    def carry_stats(self, cache) -> dict:
        """{label: value} describing the path gradients take through time (diagnose)."""
        raise NotImplementedError
