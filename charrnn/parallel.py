"""A step's streams split across threads (train.threads): data parallelism inside one process.

Why threads help: the recurrence's per-step products run on BLAS's own threads, but every
elementwise pass (the gates, their derivatives, the lookup's scatter) runs on one core while the
other waits. Splitting the N streams into `threads` groups, each group's forward and backward in
its own thread with single-threaded BLAS, keeps every core busy (numpy releases the GIL inside
each array operation). The groups share nothing but the read-only parameters.

The gradient of the mean loss over all streams is the share-weighted sum of the groups' own mean
gradients (share = streams in the group / streams in all), the same arithmetic as MPI ranks
(distributed.py), so the result equals one thread's up to float rounding, and runs with the same
`train.threads` are bit for bit reproducible.

BLAS: with OpenBLAS (numpy's wheels), `blas_threads(1)` sets its thread count through its C API
for the duration of the step. Without a known OpenBLAS (MKL, Accelerate) the groups still run,
with BLAS threading as it is: the numbers are the same, the cores may be oversubscribed.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

# set/get entry points of OpenBLAS builds: numpy's own wheels (scipy-openblas, 64-bit ints), then plain builds
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries this process has already loaded: from /proc/self/maps
    (Linux), else (no /proc: macOS) the ones numpy's wheel ships and loads. Nothing else is
    opened: a library found by name only would be new code loaded into the process."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split(maxsplit=5)[-1].strip() for line in maps if "openblas" in line.lower()]
    except OSError:
        here = os.path.dirname(np.__file__)
        paths = sorted(glob.glob(os.path.join(here, "..", "numpy.libs", "*openblas*"))
                       + glob.glob(os.path.join(here, ".dylibs", "*openblas*")))
    return list(dict.fromkeys(p for p in paths if os.path.isabs(p)))


def _find_controls():
    """(set_num_threads, get_num_threads) of numpy's OpenBLAS, or None when there is none."""
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                return setter, getter
    return None


_CONTROLS = _find_controls()  # found once at import: numpy is loaded, so is its BLAS


def blas_controllable() -> bool:
    """Whether blas_threads can set BLAS's thread count in this process."""
    return _CONTROLS is not None


def blas_thread_count() -> int | None:
    """OpenBLAS's current thread count, or None when it cannot be read."""
    return _CONTROLS[1]() if _CONTROLS else None


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Run the body with BLAS on n threads (None: as it is), and put the count back afterwards."""
    if n is None or _CONTROLS is None:
        yield
        return
    setter, getter = _CONTROLS
    before = getter()
    setter(n)
    try:
        yield
    finally:
        setter(before)


def groups(n: int, k: int) -> list[slice]:
    """0..n-1 cut into min(k, n) contiguous slices whose sizes differ by at most one."""
    k = max(1, min(k, n))
    cuts = [n * i // k for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


class Workers:
    """A fixed pool of threads that run one step's groups; map waits for every task, even when
    the caller is interrupted, so no work of an abandoned step outlives it."""

    def __init__(self, n: int):
        self.n = n
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="charrnn-step")

    def map_parts(self, fn, n: int) -> list:
        """fn(part) for each of groups(n, self.n), one part a thread, in order."""
        return self.map(fn, groups(n, self.n))

    def map(self, fn, items) -> list:
        futures = []
        try:
            with _sigint_deferred():  # a Ctrl-C while submitting would lose track of queued tasks
                futures = [self.pool.submit(_quiet, fn, item) for item in items]
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            _wait_out(futures)
            raise


@contextlib.contextmanager
def _sigint_deferred():
    """In the main thread: a SIGINT during the body is noted, and raised again, to whatever
    handler was there, once the body is done. (Python runs signal handlers in the main thread
    whichever thread the signal reaches, so masking it there would not hold it back.)"""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # not the main thread, or a handler installed outside Python, which could not be put back
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def _wait_out(futures) -> None:
    """Wait until every task has ended, even through another Ctrl-C: a task still running after
    the caller has put its state back would write into that state (at most one step's wait)."""
    while True:
        try:
            wait(futures)
            return
        except KeyboardInterrupt:
            continue


def _quiet(fn, item):
    """fn(item) with floating-point warnings off, as the calling step has them: numpy's error
    state is per thread, and overflow shows up as a non-finite loss or norm, checked afterwards."""
    with np.errstate(all="ignore"):
        return fn(item)
