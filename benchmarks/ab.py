#!/usr/bin/env python3
"""Back-to-back speed of this checkout against another one (a regression check).

For each workload, runs `charrnn bench -c benchmarks/W.yaml --json` from the other checkout and
from this one, alternating, `--pairs` times, and prints the ratio this / other (min / median /
max). Both use the same Python and environment, without the host's OpenBLAS kernel pin (see
compare.py); only the charrnn package differs (PYTHONPATH).

    git worktree add /tmp/base <commit>
    python benchmarks/ab.py --base /tmp/base --corpus ../shared/corpora/tinyshakespeare.txt
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import BLAS_PINS, STEPS  # noqa: E402


def bench(root: Path, workload: str, corpus: str, seconds: float, env: dict) -> float:
    cmd = [sys.executable, "-m", "charrnn", "bench", "-c", str(HERE / f"{workload}.yaml"), "--json",
           "--steps", str(STEPS[workload]), "--seconds", str(seconds), "--set", f"data.path={corpus}"]
    if workload == "W6":
        cmd += ["--vocab", "6000"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**env, "PYTHONPATH": str(root)}).stdout
    return json.loads(out.strip().splitlines()[-1])["train_chars_per_sec"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the other checkout (its root, holding charrnn/)")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3", "W4", "W5", "W6"])
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in BLAS_PINS}
    print("| workload | base chars/s | this chars/s | ratio min / median / max |\n|---|---|---|---|")
    for w in a.workloads:
        pairs = [(bench(Path(a.base), w, a.corpus, a.seconds, env), bench(HERE.parent, w, a.corpus, a.seconds, env))
                 for _ in range(a.pairs)]
        ratios = [new / old for old, new in pairs]
        print(f"| {w} | {statistics.median(p[0] for p in pairs):,.0f} | {statistics.median(p[1] for p in pairs):,.0f} | "
              f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f} |", flush=True)


if __name__ == "__main__":
    main()
