"""Finite-difference gradient checking for the tests (test-only: not part of the charrnn package).

Imported as `from gradcheck import ...`: pyproject.toml puts tests/ on pytest's sys.path
([tool.pytest.ini_options] pythonpath), and running a test file as a script puts its own
directory there.

The checked function must compute its output from the array it is given: numeric_gradient
perturbs a private copy and passes it in, so nothing relies on aliasing (the CS231n notebook's
closure pitfall).

Precision: a centered difference of a float64 loss of O(1) carries a rounding error of about
1e-16 / eps and a truncation error of about eps^2 / 6 times the third derivative, so entries
below ~1e-8 cannot be checked to a relative 1e-6 that way. The model-level checks therefore
evaluate the loss in extended precision (np.longdouble, 64-bit mantissa on x86) with the
fourth-order five-point stencil (order=4): truncation ~eps^4 / 30, rounding ~1e-19 / eps.
"""
from __future__ import annotations

import numpy as np

STENCILS = {  # order -> ((offset in units of eps, weight), ...), divided by eps (and 2 or 12)
    2: (((1, 1.0), (-1, -1.0)), 2.0),
    4: (((-2, 1.0), (-1, -8.0), (1, 8.0), (2, -1.0)), 12.0),
}


def numeric_gradient(f, x: np.ndarray, eps: float = 1e-5, order: int = 2) -> np.ndarray:
    """Centered differences (second or fourth order) of the scalar f(x) for every element of x."""
    points, denominator = STENCILS[order]
    x = np.array(x, dtype=np.float64)  # private copy
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        old = x[i]
        total = 0.0
        for k, w in points:
            x[i] = old + k * eps
            total = total + w * f(x.copy())  # keeps f's precision (e.g. np.longdouble) until the end
        x[i] = old
        grad[i] = total / (denominator * eps)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> float:
    """max |a - b| / max(|a| + |b|, floor), elementwise; 0 for two all-zero arrays.

    Entries smaller than the floor are compared in absolute terms: |a - b| / floor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), floor)))


def worst(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> str:
    """Where a and b differ most, for failure messages."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), floor)
    i = np.unravel_index(np.argmax(err), err.shape)
    return f"worst at index {tuple(int(j) for j in i)}: analytic {a[i]!r} vs numeric {b[i]!r}"
