#!/usr/bin/env python3
"""Cost model of data-parallel training over K machines (issue 13), from measured step times.

For each workload it measures, with `charrnn bench` on this machine (one rank per machine, all
its cores), the compute time of one step at the batch a rank gets, N/K streams, and adds a ring
all-reduce of the float32 gradient, 4 x P bytes (P parameters):

    t_allreduce(K) = 2 (K - 1) / K * 4P / bandwidth + 2 (K - 1) * latency

(the bandwidth-optimal ring: each rank sends and receives 2 (K-1)/K of the buffer in 2 (K-1)
messages). Two ways of using K machines:

    strong scaling (charrnn's semantics: the global batch N stays, each rank trains N/K streams)
        efficiency(K) = t(N) / (K * (t(N/K) + t_allreduce(K)))
    weak scaling (the user raises train.batch_size to K * N: each rank keeps N streams)
        efficiency(K) = t(N) / (t(N) + t_allreduce(K))

    python benchmarks/mpi_cost_model.py --corpus ../shared/corpora/tinyshakespeare.txt
"""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from charrnn import model

HERE = Path(__file__).resolve().parent
NETWORKS = {"10 Gbit/s": (10e9 / 8, 30e-6), "100 Gbit/s": (100e9 / 8, 3e-6)}  # bytes/s, per-message latency
WORKLOADS = {"W1": ("W1", []), "W2": ("W2", []), "1 x 2048": ("W1", ["model.hidden_size=2048"])}
KS = (1, 2, 4, 8, 16, 32)


def step_seconds(workload: str, sets: list, batch: int, corpus: str, steps: int) -> tuple[float, int]:
    """(median seconds of one training step at this batch, parameter count) from charrnn bench."""
    cmd = [sys.executable, "-m", "charrnn", "bench", "-c", str(HERE / f"{workload}.yaml"), "--json", "--steps", str(steps),
           "--warmup", "2", "--sample-chars", "10", "--set", f"data.path={corpus}", "--set", f"train.batch_size={batch}"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}  # see compare.py
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])
    c = r["config"]
    spec = model.make_spec(c["vocab"], c["hidden_size"], c["num_layers"], c["bidirectional"], c["cell"])
    return r["step_ms"] / 1e3, sum(math.prod(shape) for shape in model.param_shapes(spec).values())


def allreduce_seconds(K: int, nbytes: int, bandwidth: float, latency: float) -> float:
    return 0.0 if K == 1 else 2 * (K - 1) / K * nbytes / bandwidth + 2 * (K - 1) * latency


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--batch", type=int, default=32, help="the global batch N (train.batch_size)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    args = ap.parse_args()
    print("| model | params | all-reduce bytes | network | K | t_compute(N/K) ms | t_allreduce ms | strong eff. | weak eff. |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (workload, sets) in WORKLOADS.items():
        t = {}
        for K in KS:
            t[K], params = step_seconds(workload, sets, args.batch // K, args.corpus, args.steps)
        nbytes = 4 * params
        for net, (bandwidth, latency) in NETWORKS.items():
            below = None
            for K in KS:
                ar = allreduce_seconds(K, nbytes, bandwidth, latency)
                strong, weak = t[1] / (K * (t[K] + ar)), t[1] / (t[1] + ar)
                below = below or (K if strong < 0.8 else None)
                print(f"| {name} | {params:,} | {nbytes / 2**20:.2f} MiB | {net} | {K} | {t[K] * 1e3:.1f} | {ar * 1e3:.2f} | "
                      f"{strong:.0%} | {weak:.0%} |")
            print(f"| {name} | | | {net} | strong scaling below 80% from K = {below or f'> {KS[-1]}'} | | | | |")


if __name__ == "__main__":
    main()
