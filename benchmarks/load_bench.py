"""Time dataset.load on a corpus: first load (tokenize + cache) and second load (cache hit).

    python benchmarks/load_bench.py /tmp/scale/corpus-1g.txt --runs 3

Every measurement runs in a fresh interpreter (this script calls itself with --once). A first
load starts from an empty cache directory; the second load that follows reuses it. Reported:
`peak_rss_mb`, the process's peak RSS (VmHWM, or getrusage's ru_maxrss where there is no /proc: imports
and load); `load_peak_rss_mb`,
the peak during the load alone (Linux: the peak is reset through /proc/self/clear_refs after the
imports; elsewhere it equals peak_rss_mb); `rss_before_mb`, the RSS just before the load. The
corpus is read once beforehand so that every load finds it in the page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    except (OSError, StopIteration):
        return None


def rss_mb() -> float:
    """Peak RSS so far in MB: Linux's VmHWM, else getrusage's ru_maxrss. (On Linux ru_maxrss
    also counts the parent's peak when subprocess starts the child with vfork.)"""
    hwm = _status_mb("VmHWM:")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)  # bytes on macOS, KiB elsewhere


def current_rss_mb() -> float | None:
    return _status_mb("VmRSS:")


def reset_peak_rss() -> None:
    """Linux: restart the peak RSS count from the current RSS (no-op where unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def once(corpus: str, cache_dir: str) -> dict:
    from charrnn import dataset
    from charrnn.config import DataConfig

    import_peak, before = rss_mb(), current_rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    ds = dataset.load(DataConfig(path=corpus, cache_dir=cache_dir))
    seconds = time.perf_counter() - t0
    size = os.path.getsize(corpus)
    return {"cached": ds.reused, "seconds": seconds, "mb_per_s": size / 1e6 / seconds,
            "peak_rss_mb": max(import_peak, rss_mb()), "load_peak_rss_mb": rss_mb(), "rss_before_mb": before,
            "chars": len(ds.train) + (0 if ds.val is None else len(ds.val)), "vocab": len(ds.vocab),
            "id_bytes": ds.train.dtype.itemsize}


def measure(corpus: str, cache_dir: str) -> dict:
    out = subprocess.run([sys.executable, __file__, corpus, "--once", "--cache-dir", cache_dir],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def warm_page_cache(corpus: str) -> None:
    with open(corpus, "rb") as f:
        while f.read(1 << 20):
            pass


def summary(values: list[float], fmt: str) -> str:
    """min / median / max."""
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus")
    p.add_argument("--runs", type=int, default=3, help="first+second load pairs, each in fresh processes")
    p.add_argument("--cache-dir", help="(with --once) the cache directory to use")
    p.add_argument("--once", action="store_true", help="one load in this process; prints JSON")
    a = p.parse_args()
    if a.once:
        print(json.dumps(once(a.corpus, a.cache_dir)))
        return
    warm_page_cache(a.corpus)
    first, second = [], []
    for _ in range(a.runs):
        cache = tempfile.mkdtemp(prefix="charrnn-bench-cache-")
        try:
            first.append(measure(a.corpus, cache))
            second.append(measure(a.corpus, cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        assert not first[-1]["cached"] and second[-1]["cached"], (first[-1], second[-1])
        print(json.dumps({"first": first[-1], "second": second[-1]}), file=sys.stderr)
    size = os.path.getsize(a.corpus)
    f = first[0]
    print(f"{Path(a.corpus).name}: {size / 1e6:,.0f} MB, {f['chars']:,} characters, vocab {f['vocab']} "
          f"({f['id_bytes']}-byte ids); min / median / max of {a.runs} runs")
    for name, runs in (("first load ", first), ("second load", second)):
        print(f"  {name} {summary([r['seconds'] for r in runs], '.2f')} s   "
              f"{summary([r['mb_per_s'] for r in runs], '.0f')} MB/s   "
              f"peak RSS {summary([r['peak_rss_mb'] for r in runs], '.0f')} MB; during the load "
              f"{summary([r['load_peak_rss_mb'] for r in runs], '.0f')} MB (RSS before it {runs[0]['rss_before_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
