"""Finite-difference gradient checking (float64), used by the tests.

The checked function must compute its output from the array it is given: numeric_gradient
perturbs a private copy and passes it in, so nothing relies on aliasing (the CS231n notebook's
closure pitfall).
"""
from __future__ import annotations

import numpy as np


def numeric_gradient(f, x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Centered differences of the scalar f(x) with respect to every element of x."""
    x = np.array(x, dtype=np.float64)  # private copy
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f(x.copy())
        x[i] = old - eps
        minus = f(x.copy())
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|a| + |b|, tiny), elementwise; 0 for two all-zero arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-12)))


def worst(a: np.ndarray, b: np.ndarray) -> str:
    """Where a and b differ most, for failure messages."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-12)
    i = np.unravel_index(np.argmax(err), err.shape)
    return f"worst at index {tuple(int(j) for j in i)}: analytic {a[i]!r} vs numeric {b[i]!r}"
