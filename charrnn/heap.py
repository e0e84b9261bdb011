"""Keep freed array memory in the process, so each training step reuses the last step's pages.

Why: a training step allocates its temporaries afresh (W1, 1 x 512 at N x T = 32 x 100: about
30 MB in arrays of up to 6.5 MB: the looked-up inputs, the hidden states, tanh', dlogits...) and
frees them at the end. glibc's malloc serves blocks that large with mmap, or trims them off the
top of the heap when freed, so the next step gets fresh pages from the kernel, which zeroes each
one on first touch: hundreds of minor page faults a step, a noticeable share of its time
(`tests/test_heap.py` counts the faults; benchmarks/README.md has the numbers).

Telling malloc to keep large blocks in the heap (M_MMAP_THRESHOLD) and not to give the top of
the heap back (M_TRIM_THRESHOLD) makes every step after the first reuse the same pages. Worker
threads (train.threads, parallel.py) would each get an arena of their own, whose heaps glibc
trims regardless (about 1,300 page faults a W7 step, which cost more than the threads gain), so
one arena serves every thread (M_ARENA_MAX): a step makes few, large allocations. The
cost is that the process keeps its peak heap until it exits instead of returning it between
steps; peak RSS is unchanged, since a step needs that memory again a moment later.

The same could be had with preallocated buffers threaded through every op (llm.c does that),
at the price of output arguments on every forward and backward function. Done here instead, in
one place and only for glibc: on other C libraries (macOS, musl) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap top: more than any step's temporaries

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed large blocks instead of returning them to the kernel.

    Process-wide and idempotent. Returns True when the settings took effect (glibc only).
    Arrays above 32 MiB (e.g. the logits of a 6,000-character vocabulary at N x T = 32 x 100,
    77 MB) are still mapped afresh: glibc refuses a larger mmap threshold.
    """
    global _applied
    if _applied is None:
        _applied = (_mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                    and _mallopt(M_ARENA_MAX, 1))
    return _applied


def _mallopt(param: int, value: int) -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError):
        return False
