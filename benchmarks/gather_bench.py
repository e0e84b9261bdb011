"""Cost of the training hot path's window gathers with and without dataset.release_pages.

    python benchmarks/gather_bench.py /tmp/scale/corpus-1g.txt --reps 5

Times batches.stream_window (next-char) and batches.random_windows (cloze) for 32 windows of
65 ids over an already cached corpus, releasing the mapping's pages never, before every step,
or every 4 or 16 steps; prints the min / median / max over reps of microseconds per step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from charrnn import batches, dataset
from charrnn.config import DataConfig


def per_step_us(ids, every: int, cloze: bool, steps: int = 400, N: int = 32, T: int = 64) -> float:
    N, span = batches.plan_streams(len(ids), N, T)
    rng, pos = np.random.default_rng(0), 0
    dataset.release_pages(ids)
    t0 = time.perf_counter()
    for k in range(steps):
        if every and k % every == 0:
            dataset.release_pages(ids)
        if cloze:
            batches.random_windows(ids, N, T, rng)
        else:
            _, _, pos, _ = batches.stream_window(ids, N, span, T, pos)
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cache-dir")
    a = p.parse_args()
    ids = dataset.load(DataConfig(path=a.corpus, cache_dir=a.cache_dir)).train
    for cloze in (False, True):
        times = {every: [] for every in (0, 1, 4, 16)}
        for _ in range(a.reps):  # interleaved, so that load from other work hits all alike
            for every in times:
                times[every].append(per_step_us(ids, every, cloze))
        cells = [f"{'never' if e == 0 else f'every {e}'}: " + " / ".join(f"{x:.0f}" for x in
                 (min(v), statistics.median(v), max(v))) for e, v in times.items()]
        print(f"{'random_windows' if cloze else 'stream_window '} us/step (min / median / max), release " + "; ".join(cells))


if __name__ == "__main__":
    main()
