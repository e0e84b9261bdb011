"""Where each training and evaluation window comes from. Pure functions of (ids, position, rng).

Left-to-right (next-char) training, truncated BPTT:
    The n training ids are cut into N contiguous streams of `span = (n - 1) // N` characters;
    stream i starts at i * span. Step k takes characters [pos, pos + T] of every stream (inputs
    x = the first T, targets y = the last T) and advances pos by T. The hidden state after a
    window is carried into the next one (values only: no gradient flows back across windows).
    When the next window would run past the end of a stream, pos returns to 0 and the state is
    reset to zeros: that is the only reset. The last `span % T` characters of each stream and
    the `n - N * span` characters after the last stream are not trained on in that pass.

Bidirectional (cloze) training: N independent windows of T characters at uniformly random
starts, drawn from the trainer's Generator; every window starts from zero edge states.

ids may be memory-mapped (dataset.load): windows are gathered with fancy indexing, which reads
only the pages they lie on. The evaluation generators release those pages as they go; the
trainer does the same for training windows (dataset.release_pages never changes a value).
Every read of windows is preceded by dataset.check_mapped, so a cache file truncated under a
running process ends it with a DataError instead of SIGBUS.
"""
from __future__ import annotations

import numpy as np

from charrnn import dataset
from charrnn.errors import DataError, option


def plan_streams(n: int, N: int, T: int) -> tuple[int, int]:
    """(batch size, span) for n training ids: N shrinks until every stream holds one window.

    A stream of span = (n - 1) // N characters holds a window when span >= T + 1 (see
    stream_window), so one stream needs n >= T + 2. Raises DataError, with the numbers, when
    even that does not fit.
    """
    if n < 3:
        raise DataError(f"the training text has {n} character(s); next-character training needs at least 3: "
                        "use a longer corpus")
    if n < T + 2:
        raise DataError(f"the training text has {n} characters but train.seq_len={T} needs at least {T + 2}; "
                        f"lower train.seq_len (e.g. {option('set', f'train.seq_len={n - 2}')}) or use a longer corpus")
    N = min(N, (n - 1) // (T + 1))
    return N, (n - 1) // N


def stream_window(ids, N: int, span: int, T: int, pos: int, rows: slice = slice(None)):
    """Window at pos of every stream (of streams[rows], one process's share, when given).
    Returns x (n, T), y (n, T), the next pos, and whether the streams wrapped (pos went back to
    0, so the caller resets its hidden state). Only the chosen streams' text is read."""
    wrapped = pos + T + 1 > span
    if wrapped:
        pos = 0
    idx = (np.arange(N)[rows] * span)[:, None] + pos + np.arange(T + 1)  # (n, T+1)
    dataset.check_mapped(ids)
    w = np.asarray(ids[idx], dtype=np.intp)  # (N, T+1)
    return w[:, :T], w[:, 1:], pos + T, wrapped


def random_windows(ids, N: int, T: int, rng: np.random.Generator, rows: slice = slice(None)):
    """x (n, T): windows[rows] of N windows at random starts (cloze training). All N starts are
    drawn, so a window (and the generator's state) does not depend on which process takes it."""
    n = len(ids)
    if n < T:
        raise DataError(f"the training text has {n} characters but train.seq_len={T} needs at least {T}; "
                        f"lower train.seq_len or use a longer corpus")
    starts = rng.integers(0, n - T + 1, size=N)[rows]
    dataset.check_mapped(ids)
    return np.asarray(ids[starts[:, None] + np.arange(T)], dtype=np.intp)  # (N, T)


# ---- evaluation layouts: every character is scored exactly once ----------------------------------

EVAL_MAX_STREAMS = 32
EVAL_MIN_STREAM = 1000  # characters per stream at least, so cold starts are a small share


def eval_streams(n: int) -> tuple[int, int]:
    """(streams, span) to score the n - 1 next-character predictions of n ids.

    Texts under 2 * EVAL_MIN_STREAM characters are one stream, i.e. scored with their whole left
    context; longer texts are split into up to 32 streams of >= 1000 characters for speed,
    each starting from a zero state. The last stream may be shorter (its tail is padding).
    """
    predictions = n - 1
    B = max(1, min(EVAL_MAX_STREAMS, predictions // EVAL_MIN_STREAM))
    return B, -(-predictions // B)


def eval_stream_windows(ids, T: int, part: tuple[int, int] = (0, 1)):
    """Yield (x, y, valid) windows over eval_streams' layout, in order; the caller carries state.
    part (r, K): only the r-th of K contiguous shares of the streams (one process's; maybe none).

    x, y (B, Tw) ids with Tw <= T; valid (B, Tw) bool marks real targets (False on padding, whose
    ids are 0). Windows are gathered from ids one at a time, so a memory-mapped text is never
    copied whole, and its pages are released as the streams move on (dataset.release_pages).
    """
    n = len(ids)
    B, span = eval_streams(n)
    starts = np.array_split(np.arange(B) * span, part[1])[part[0]][:, None]
    if not len(starts):
        return
    every = dataset.release_every(B, T)
    for k, t0 in enumerate(range(0, span, T)):
        if k % every == every - 1:
            dataset.release_pages(ids)
        offs = t0 + np.arange(min(T, span - t0))
        pos = starts + offs  # (B, Tw) input positions
        yield _gather_padded(ids, pos), _gather_padded(ids, pos + 1), pos + 1 <= n - 1
    dataset.release_pages(ids)


def _gather_padded(ids, pos: np.ndarray) -> np.ndarray:
    """ids[pos] as intp, with 0 where pos runs past the end of ids."""
    dataset.check_mapped(ids)
    inside = pos < len(ids)
    return np.where(inside, np.asarray(ids[np.where(inside, pos, 0)], dtype=np.intp), 0)


def eval_cloze_windows(ids, T: int, N: int, part: tuple[int, int] = (0, 1)):
    """Yield x (B, Tw) batches of consecutive non-overlapping windows; every character once.
    part (r, K): only every K-th batch from the r-th (one process's share)."""
    full = len(ids) // T
    rows = ids[: full * T].reshape(full, T)  # a view: nothing is copied until a batch is taken
    every = dataset.release_every(N, T)
    r, K = part
    batches = range(0, full, N)
    for k, b in enumerate(batches):
        if k % every == every - 1:
            dataset.release_pages(ids)
        if k % K != r:
            continue
        dataset.check_mapped(ids)
        yield np.asarray(rows[b : b + N], dtype=np.intp)
    if len(ids) % T and len(batches) % K == r:
        dataset.check_mapped(ids)
        yield np.asarray(ids[full * T :], dtype=np.intp)[None, :]
    dataset.release_pages(ids)
