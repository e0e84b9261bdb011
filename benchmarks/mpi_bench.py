#!/usr/bin/env python3
"""Throughput of 1 process x 2 BLAS threads against 2 MPI processes x 1 thread, back to back,
and the step-time breakdown of the 2-process run (issue 13).

    python benchmarks/mpi_bench.py --corpus ../shared/corpora/tinyshakespeare.txt --pairs 3

For each workload and pair: `charrnn train` for --steps steps (no evaluation, checkpoint or
sample in between), once as one process with OPENBLAS_NUM_THREADS=2 and once under
`mpiexec -n 2` (1 thread each, charrnn's default on 2 cores); the rate is the median
chars_per_sec of the metrics records after the first. The breakdown: the compute of one rank's
step, measured with `charrnn bench` at N/2 streams on 1 thread, and the Allreduce of the
gradient's 4P bytes between two processes, timed alone.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from charrnn import model

HERE = Path(__file__).resolve().parent
ENV = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}  # see compare.py
ALLREDUCE = """
import sys, time
import numpy as np
from mpi4py import MPI
buf = np.ones(int(sys.argv[1]) // 4, dtype=np.float32)
times = []
for _ in range(60):
    MPI.COMM_WORLD.Barrier()
    t = time.perf_counter()
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    times.append(time.perf_counter() - t)
if MPI.COMM_WORLD.Get_rank() == 0:
    print(sorted(times)[len(times) // 2])
"""


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def train_rate(workload: str, corpus: str, steps: int, ranks: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "charrnn", "train", "-c", str(HERE / f"{workload}.yaml"), "--run-dir", f"{tmp}/run",
               "--set", f"data.path={corpus}", "--set", f"train.max_steps={steps}", "--set", "train.log_every=10",
               "--set", f"train.eval_every={10 * steps}", "--set", "train.checkpoint_every=0", "--set", "train.sample_chars=0"]
        env = dict(ENV, OPENBLAS_NUM_THREADS="2") if ranks == 1 else dict(ENV)
        if ranks > 1:
            cmd = [mpiexec(), "-n", str(ranks), *cmd]
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        records = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl") if "chars_per_sec" in line]
    return statistics.median(r["chars_per_sec"] for r in records[1:])


def compute_ms(workload: str, corpus: str, batch: int) -> tuple[float, int]:
    """(one step's ms on 1 thread at this batch, all-reduce bytes = 4 x parameters)."""
    cmd = [sys.executable, "-m", "charrnn", "bench", "-c", str(HERE / f"{workload}.yaml"), "--json", "--steps", "20",
           "--warmup", "3", "--sample-chars", "10", "--set", f"data.path={corpus}", "--set", f"train.batch_size={batch}"]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env=dict(ENV, OPENBLAS_NUM_THREADS="1")).stdout.strip().splitlines()[-1])
    c = r["config"]
    spec = model.make_spec(c["vocab"], c["hidden_size"], c["num_layers"], c["bidirectional"], c["cell"])
    params = sum(math.prod(s) for s in model.param_shapes(spec).values())
    return r["step_ms"], 4 * params


def allreduce_ms(nbytes: int) -> float:
    out = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", ALLREDUCE, str(nbytes)], check=True,
                         capture_output=True, text=True, env=dict(ENV, OPENBLAS_NUM_THREADS="1")).stdout
    return float(out.split()[-1]) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workloads", nargs="+", default=["W1", "W2"])
    args = ap.parse_args()
    print("| workload | 1 x 2 threads chars/s | 2 x 1 thread chars/s | ratio min / median / max | "
          "step ms (2 procs) | compute ms (N/2, 1 thread) | Allreduce ms (4P bytes) |")
    print("|---|---|---|---|---|---|---|")
    for w in args.workloads:
        one, two = [], []
        for _ in range(args.pairs):
            one.append(train_rate(w, args.corpus, args.steps, 1))
            two.append(train_rate(w, args.corpus, args.steps, 2))
        ratios = [b / a for a, b in zip(one, two)]
        step = 32 * 100 / statistics.median(two) * 1e3  # N x T characters per step
        comp, nbytes = compute_ms(w, args.corpus, 16)
        print(f"| {w} | {statistics.median(one):,.0f} | {statistics.median(two):,.0f} | {min(ratios):.2f} / "
              f"{statistics.median(ratios):.2f} / {max(ratios):.2f} | {step:.1f} | {comp:.1f} | {allreduce_ms(nbytes):.2f} |")


if __name__ == "__main__":
    main()
