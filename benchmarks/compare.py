#!/usr/bin/env python3
"""Back-to-back speed comparison of charrnn against the PyTorch CPU reference.

For each workload, runs `torch_reference.py W --json` and `charrnn bench -c benchmarks/W.yaml
--json` one after the other, `--pairs` times, and reports the ratio charrnn / PyTorch per pair
(min / median / max), so that machine load affects both sides of every ratio alike. Both sides
time at least `--seconds` (8, the reference's default): on a machine whose speed drifts, a
1.5-second run lands in one state where an 8-second one averages over several.

    python benchmarks/compare.py --torch-python /path/to/torch-venv/bin/python \\
        --reference ../shared/bench/torch_reference.py --corpus ../shared/corpora/tinyshakespeare.txt

Writes benchmarks/results.json and prints a markdown table.

BLAS kernels: where the machine's environment pins OpenBLAS to older kernels
(OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE, set on some hosts to work around bugs of old OpenBLAS
builds), both sides run with those two variables removed, as on a user's machine; PyTorch uses
MKL either way. `--keep-blas-env` keeps them. The kernel each run used is recorded (threadpoolctl,
when installed) in the results.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = {"W1": 30, "W2": 20, "W3": 300, "W4": 20, "W5": 3000, "W6": 10,  # at least these, and --seconds
         "W7": 10, "W8": 10, "W9": 6, "W10": 6}  # W7-W10: LSTM and GRU


BLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def run_json(cmd: list, env: dict) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def blas_kernel(python: str, env: dict) -> str:
    """The OpenBLAS kernel (architecture) numpy runs with in this environment, if threadpoolctl says."""
    probe = ("import json, numpy\ntry:\n import threadpoolctl\n info = threadpoolctl.threadpool_info()\n"
             "except ImportError:\n info = []\nprint(json.dumps([(i.get('internal_api'), i.get('architecture')) for i in info]))")
    return subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-python", required=True, help="python of a venv with torch==2.13.0")
    ap.add_argument("--reference", required=True, help="path to torch_reference.py")
    ap.add_argument("--corpus", required=True, help="tinyshakespeare.txt")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="minimum timed seconds for each side (the reference's own default is 8)")
    ap.add_argument("--workloads", nargs="+", default=list(STEPS))
    ap.add_argument("--out", default=str(HERE / "results.json"))
    ap.add_argument("--keep-blas-env", action="store_true", help=f"keep {' and '.join(BLAS_PINS)} if set")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if a.keep_blas_env or k not in BLAS_PINS}
    results = {"_blas": blas_kernel(sys.executable, env)}
    print(f"charrnn's BLAS: {results['_blas']}", file=sys.stderr)
    for w in a.workloads:
        pairs = []
        for i in range(a.pairs):
            ref = run_json([a.torch_python, a.reference, w, "--corpus", a.corpus, "--json", "--seconds", str(a.seconds)], env)
            ours_cmd = [sys.executable, "-m", "charrnn", "bench", "-c", str(HERE / f"{w}.yaml"), "--json",
                        "--steps", str(STEPS[w]), "--seconds", str(a.seconds), "--set", f"data.path={a.corpus}"]
            if w == "W6":
                ours_cmd += ["--vocab", str(ref["vocab"])]
            ours = run_json(ours_cmd, env)
            pairs.append({"torch": ref, "charrnn": ours, "ratio": ours["train_chars_per_sec"] / ref["chars_per_sec"]})
            print(f"{w} pair {i + 1}: charrnn {ours['train_chars_per_sec']:,.0f} chars/s, "
                  f"torch {ref['chars_per_sec']:,.0f} chars/s, ratio {pairs[-1]['ratio']:.2f}", file=sys.stderr)
        results[w] = pairs
    Path(a.out).write_text(json.dumps(results, indent=1))
    print("| workload | charrnn chars/s | PyTorch chars/s | ratio min / median / max | GEMM fraction | "
          "peak RSS charrnn / PyTorch (MiB) |")
    print("|---|---|---|---|---|---|")
    for w, pairs in results.items():
        if w.startswith("_"):
            continue
        ratios = [p["ratio"] for p in pairs]
        med = lambda key, side, pairs=pairs: statistics.median(p[side][key] for p in pairs)  # noqa: E731
        print(f"| {w} | {med('train_chars_per_sec', 'charrnn'):,.0f} | {med('chars_per_sec', 'torch'):,.0f} | "
              f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f} | "
              f"{med('gemm_fraction', 'charrnn'):.0%} | "
              f"{med('peak_rss_mib', 'charrnn'):.0f} / {med('peak_rss_mib', 'torch'):.0f} |")


if __name__ == "__main__":
    main()
