"""Recurrent cells behind one interface (cells/base.py); the model picks one by name, here.

    rnn   h_t = tanh(W_xh x_t + W_hh h_{t-1} + b_h)                       cells/rnn.py
    lstm  PyTorch's nn.LSTM equations, gate rows i, f, g, o               cells/lstm.py
    gru   PyTorch's nn.GRU equations, gate rows r, z, n (+ b_hn)          cells/gru.py
"""
from __future__ import annotations

from charrnn.cells.base import Cell, CellGrads
from charrnn.cells.gru import GRU
from charrnn.cells.lstm import LSTM
from charrnn.cells.rnn import RNN

CELLS: dict[str, Cell] = {c.name: c for c in (RNN(), LSTM(), GRU())}
NAMES = tuple(CELLS)


def get(name: str) -> Cell:
    """The cell called name; KeyError for an unknown one (config validation names the choices)."""
    return CELLS[name]


__all__ = ["Cell", "CellGrads", "CELLS", "NAMES", "get"]
