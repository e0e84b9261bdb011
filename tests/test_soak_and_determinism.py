"""Determinism: the same config and seed give bit-identical checkpoints and the same metrics
(timing fields aside), in the same process or a fresh one. Soak: a long run of small steps,
with evaluations, samples and checkpoints, grows neither its memory after the first evaluation
nor its time per step.

The default soak is 2,000 steps; the long one (`pytest -m slow tests/test_soak_and_determinism.py`)
20,000. Memory is the child's resident set (/proc/self/statm). Time per step is CPU time, not
wall time, and compared by its lower decile over 50 logging intervals: other programs on a
shared machine only ever add time (to wall time a lot, to CPU time through caches and shared
cores some), so the undisturbed cost is what is compared; medians are printed with wall time.
"""
from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys

import pytest

from charrnn import checkpoint
from charrnn.train import train

TEXT = "".join(random.Random(3).choice(["the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog. ", "\n"])
               for _ in range(700))
NEXT_CHAR = ("train.max_steps=40", "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=10",
             "train.keep_last=3", "train.sample_chars=30", "model.num_layers=2", "model.dropout=0.2",
             "train.lr_schedule=cosine", "train.warmup_steps=5")
CLOZE = ("model.bidirectional=true", "train.max_steps=30", "train.eval_every=10", "train.checkpoint_every=10",
         "model.dropout=0.1", "train.dtype=float64")


def files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != ".lock")


def assert_identical_runs(faults, a, b):
    assert files(a) == files(b)
    for name in files(a):
        if name.endswith(".npz"):
            faults.assert_same_checkpoint(checkpoint.load(a / name), checkpoint.load(b / name))
        elif name != "metrics.jsonl":  # config.yaml, samples/*.txt
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert faults.metrics_without_timing(a) == faults.metrics_without_timing(b)


@pytest.mark.parametrize("sets", [NEXT_CHAR, CLOZE], ids=["next-char", "cloze"])
def test_same_config_and_seed_give_identical_runs(faults, tiny, tmp_path, sets):
    """Run 1 tokenizes the corpus, run 2 reads the cached encoding; run 3 is a fresh interpreter
    with another hash seed. Arrays are compared bit for bit; metadata and metrics apart from
    elapsed_s, saved_at and chars_per_sec."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    runs = [tmp_path / f"run{i}" for i in range(3)]
    for run in runs[:2]:
        train(tiny.config(corpus, *sets), run)
    p = subprocess.run([sys.executable, "-m", "charrnn", "train", *tiny.args(corpus, *sets), "--run-dir", str(runs[2])],
                       capture_output=True, text=True, env={**faults.env(), "PYTHONHASHSEED": "12345"},
                       cwd=faults.REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(list((runs[0] / "checkpoints").glob("*.npz"))) >= 3
    for other in runs[1:]:
        assert_identical_runs(faults, runs[0], other)


SOAK = """
import json, os, sys, time
from charrnn import config
from charrnn.train import train
page = os.sysconf("SC_PAGE_SIZE")
out = open(sys.argv[1], "w")
def report(kind, r):
    if kind == "log":
        rss = int(open("/proc/self/statm").read().split()[1]) * page
        out.write(json.dumps({"step": r["step"], "rss": rss, "cpu": time.process_time(), "wall": time.perf_counter()}) + "\\n")
train(config.load(None, sys.argv[3:]), sys.argv[2], report=report)
"""


@pytest.mark.parametrize("steps, every", [(2000, 200), pytest.param(20000, 1000, marks=pytest.mark.slow)])
def test_soak_memory_and_time_per_step_do_not_grow(faults, tiny, tmp_path, steps, every):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 3, encoding="utf-8")
    log, log_every = tmp_path / "soak.jsonl", 10
    sets = tiny.sets(corpus, f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.eval_every={every}",
                     f"train.checkpoint_every={every}", "train.keep_last=2", "train.sample_chars=50")
    p = subprocess.run([sys.executable, "-c", SOAK, str(log), str(tmp_path / "run"), *sets], capture_output=True,
                       text=True, env=faults.env(), timeout=600)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["step"] == steps
    # memory: the largest resident set once the first evaluation and checkpoint have happened,
    # against the largest afterwards (allocator settling is a few hundred KiB at most)
    settled = max(r["rss"] for r in records if every <= r["step"] <= 2 * every)
    later = max(r["rss"] for r in records if r["step"] > 2 * every)
    growth_kib = (later - settled) / 1024
    # time per step over logging intervals that hold no evaluation or checkpoint: the first 500
    # steps after the first evaluation against the last 500
    per_step = [(b["step"], (b["cpu"] - a["cpu"]) / log_every * 1e3, (b["wall"] - a["wall"]) / log_every * 1e3)
                for a, b in zip(records, records[1:]) if b["step"] % every != 0]
    first = [x for x in per_step if every < x[0] <= every + 500]
    last = [x for x in per_step if x[0] > steps - 500]
    p10 = lambda xs: statistics.quantiles(xs, n=10)[0]  # noqa: E731
    cpu = p10([x[1] for x in first]), p10([x[1] for x in last])
    median = [statistics.median(x[i] for x in w) for i in (1, 2) for w in (first, last)]
    print(f"\nsoak {steps} steps: RSS {settled / 2**20:.1f} MiB after the first evaluation, +{growth_kib:.0f} KiB by the "
          f"end; CPU ms/step (lower decile) {cpu[0]:.3f} -> {cpu[1]:.3f}, median CPU {median[0]:.3f} -> {median[1]:.3f}, "
          f"median wall {median[2]:.3f} -> {median[3]:.3f}")
    assert growth_kib < 1024, f"resident memory grew by {growth_kib:.0f} KiB"
    assert cpu[1] < 1.5 * cpu[0], f"CPU time per step grew from {cpu[0]:.3f} to {cpu[1]:.3f} ms (lower deciles)"
