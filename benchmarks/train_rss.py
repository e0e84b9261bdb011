"""Peak RSS of a short training run, and how much of the encoded corpus it leaves mapped.

    python benchmarks/train_rss.py /tmp/scale/corpus-1g.txt --steps 300 --runs 3
    python benchmarks/train_rss.py /tmp/scale/corpus-1g.txt --steps 300 --cloze --no-release

Each run is a fresh interpreter (this script calls itself with --once) that trains through the
library (train.train) with hidden size 64 into a temporary run directory and prints JSON:
peak RSS (VmHWM from /proc/self/status; Linux only), the peak of the ids file's own resident pages during the run
(read from /proc/self/smaps after every step), seconds from the call to the first step, and
whether the encoding came from the cache. --no-release turns dataset.release_pages off (it
sets dataset.RESIDENT_BUDGET so high that it never runs), to show what it prevents.
Run the corpus once through benchmarks/load_bench.py or a first training run to fill the
cache; --cache-dir must then point at the same place (default: $CHARRNN_CACHE_DIR).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """Linux's VmHWM (ru_maxrss would also count the parent's peak: subprocess uses vfork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def mapped_mb(name: str) -> float:
    """Resident MB of this process's mappings of files called `name` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[-1].endswith("/" + name)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total / 1024


def once(a) -> dict:
    from charrnn import config, dataset, train

    if a.no_release:
        dataset.RESIDENT_BUDGET = 1 << 62
    sets = [f"data.path={a.corpus}", "model.hidden_size=64", f"train.max_steps={a.steps}",
            "train.eval_every=100", "train.eval_chars=20000", "train.checkpoint_every=0", "train.log_every=100"]
    if a.cache_dir:
        sets.append(f"data.cache_dir={a.cache_dir}")
    if a.cloze:
        sets.append("model.bidirectional=true")
    cfg = config.load(None, sets)
    seen = {"mapped": 0.0}

    def report(kind, record):
        if kind == "start":
            seen["cached"] = record["cached"]
        if kind == "step":
            seen.setdefault("first_step", time.perf_counter() - t0)
            if not a.no_smaps:
                seen["mapped"] = max(seen["mapped"], mapped_mb("ids.bin"))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = train.train(cfg, Path(tmp) / "run", report=report)
    seconds = time.perf_counter() - t0
    return {"peak_rss_mb": peak_rss_mb(),
            "peak_mapped_ids_mb": seen["mapped"], "first_step_s": seen["first_step"], "cached": seen["cached"],
            "seconds": seconds, "steps_per_s": a.steps / (seconds - seen["first_step"]),
            "best_val_loss": summary.best_val_loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cloze", action="store_true", help="bidirectional model: random windows")
    p.add_argument("--no-release", action="store_true", help="never call dataset.release_pages")
    p.add_argument("--no-smaps", action="store_true",
                   help="do not read /proc/self/smaps after each step (it takes longer the more is mapped): for timing")
    p.add_argument("--cache-dir", default=os.environ.get("CHARRNN_CACHE_DIR"))
    p.add_argument("--once", action="store_true", help="one run in this process; prints JSON")
    a = p.parse_args()
    if a.once:
        print(json.dumps(once(a)))
        return
    argv = [sys.executable, __file__, a.corpus, "--once", "--steps", str(a.steps)]
    argv += ["--cloze"] * a.cloze + ["--no-release"] * a.no_release + ["--no-smaps"] * a.no_smaps
    argv += ["--cache-dir", a.cache_dir] if a.cache_dir else []
    runs = []
    for _ in range(a.runs):
        runs.append(json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout))
        print(json.dumps(runs[-1]), file=sys.stderr)

    def mmm(key, fmt):
        v = [r[key] for r in runs]
        return " / ".join(format(x, fmt) for x in (min(v), statistics.median(v), max(v)))
    print(f"{Path(a.corpus).name}, {a.steps} steps{' cloze' if a.cloze else ''}{' no release' if a.no_release else ''}"
          f" (min / median / max of {a.runs}): peak RSS {mmm('peak_rss_mb', '.0f')} MB, ids mapped at most "
          f"{mmm('peak_mapped_ids_mb', '.1f')} MB, first step after {mmm('first_step_s', '.2f')} s, "
          f"{mmm('steps_per_s', '.1f')} steps/s, cached {all(r['cached'] for r in runs)}")


if __name__ == "__main__":
    main()
