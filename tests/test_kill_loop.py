"""Crash consistency: SIGKILL a real `charrnn train` at random moments, over and over.

Training checkpoints every step (last.npz and a periodic copy, each fsynced) and logs every
step, so most of a session's time is spent writing files and many kills land in the middle of
a write. After every kill: each .npz in checkpoints/ loads completely (checkpoint.load checks
everything), metrics.jsonl reads, the newest checkpoint never moved backwards, the lock is free.
Then the next session resumes (or, if the kill came before the first checkpoint, the same
command starts again in the same directory). Finally the run is resumed to its end and must be
bit for bit the run that was never killed.

The default run kills 5 times; the long one (`pytest -m slow tests/test_kill_loop.py`) 30 times.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

from charrnn import checkpoint, runlog, runs
from charrnn.train import train

TEXT = "".join(random.Random(7).choice(["the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog. ", "\n"])
               for _ in range(900))
SETS = ("model.hidden_size=32", "train.max_steps=1000000", "train.log_every=1", "train.eval_every=7",
        "train.checkpoint_every=1", "train.keep_last=2", "train.sample_chars=20", "train.dtype=float32")


def newest_step(run) -> int | None:
    steps = [checkpoint.read_meta(p)["step"] for p in (run / "checkpoints").glob("*.npz")] if run.exists() else []
    return max(steps, default=None)


def check_after_kill(run, previous: int | None) -> int | None:
    """Everything the kill left behind is complete and readable; returns the newest step."""
    if not run.exists():
        return None
    for path in sorted((run / "checkpoints").glob("*.npz")) if (run / "checkpoints").exists() else []:
        checkpoint.load(path)  # raises CheckpointError for anything torn, truncated or inconsistent
    steps = [r["step"] for r in runlog.read_metrics(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)), steps
    newest = newest_step(run)
    assert previous is None or (newest is not None and newest >= previous), (previous, newest)
    assert not runs.is_running(runlog.RunDir(run))
    return newest


@pytest.mark.parametrize("kills", [5, pytest.param(30, marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run(faults, tiny, tmp_path, kills):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    run = tmp_path / "run"
    rng = random.Random(int(os.environ.get("CHARRNN_KILL_SEED", "0")))
    stats = {"kills": 0, "left no checkpoint": 0, "mid-write (temp file left)": 0}
    newest, log = None, tmp_path / "stderr.txt"

    def command(*extra):
        if (run / "checkpoints" / "last.npz").exists():
            return ["train", "--resume", run, *extra]
        # killed before its first checkpoint: the same command again, in the same directory
        return ["train", *tiny.args(corpus, *SETS, *[e for e in extra if e != "--set"]), "--run-dir", run]

    for i in range(kills):
        args = command()
        # the first kill lands in start-up (the first checkpoint comes 0.25-0.4 s after launch here),
        # the others anywhere from start-up to well into training
        delay = rng.uniform(0.02, 0.2) if i == 0 else rng.uniform(0.05, 1.5)
        with open(log, "wb") as err:
            child = subprocess.Popen([sys.executable, "-m", "charrnn", *map(str, args)], stdout=subprocess.DEVNULL,
                                     stderr=err, env=faults.env(), cwd=faults.REPO)
            try:
                code = child.wait(timeout=delay)  # the random moment ...
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)  # ... SIGKILL, no handler runs
                code = child.wait()
        assert code == -signal.SIGKILL, f"session {i} ended by itself ({code}):\n{log.read_text()}"
        stats["kills"] += 1
        stats["mid-write (temp file left)"] += bool(faults.temp_files(run)) if run.exists() else 0
        newest = check_after_kill(run, newest)
        stats["left no checkpoint"] += newest is None
    target = (newest or 0) + 9
    p = faults.run_module(*command("--set", f"train.max_steps={target}"))
    assert p.returncode == 0, p.stderr
    assert faults.temp_files(run) == []
    ref = tmp_path / "uninterrupted"
    train(tiny.config(corpus, *SETS, f"train.max_steps={target}", "train.checkpoint_every=0"), ref)
    for name in ("last.npz", "best.npz"):
        faults.assert_same_checkpoint(checkpoint.load(ref / "checkpoints" / name), checkpoint.load(run / "checkpoints" / name),
                                      skip_meta=("elapsed_s", "saved_at", "config"))
    assert faults.metrics_without_timing(run) == faults.metrics_without_timing(ref)
    texts = lambda d: {p.name: p.read_bytes() for p in (d / "samples").iterdir()}  # noqa: E731
    assert texts(run) == texts(ref)
    print(f"\nkill loop: {stats}, {target} steps in all; final run identical to the uninterrupted one")
    assert stats["kills"] == kills
