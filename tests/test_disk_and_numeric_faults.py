"""Injected faults inside one process: disk full or unwritable while writing a checkpoint, the
metrics log, a sample or the run's first files; NaN/Inf losses, gradients and overflowing updates;
an exception in the middle of a step. Each ends with a one-line message and exit code, keeps the
previous checkpoint intact, leaves no temporary file, and --resume then finishes the run exactly
as if nothing had happened."""
from __future__ import annotations

import errno
import math
import random
import subprocess
import sys

import numpy as np
import pytest

import charrnn.model
from charrnn import checkpoint, runlog
from charrnn.train import resume_config, train

_rng = random.Random(1)
WORDS = " ".join(_rng.choice(["alpha", "beta", "gamma", "delta", "fox", "dog", "cat", "tree", "sun", "moon"])
                 for _ in range(560)) + "\n"
RUN = ("train.max_steps=30", "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=5",
       "train.keep_last=2", "train.sample_chars=10", "train.dtype=float64")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, tiny):
    """The uninterrupted run that every faulted-then-resumed run must end up identical to."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny.config(corpus, *RUN), run)
    return run


def one_error_line(r) -> str:
    assert isinstance(r.exception, SystemExit), r.exception  # handled, not a crash
    lines = r.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in r.output, r.stderr
    return errors[0]


# ---- disk faults -------------------------------------------------------------------------------------

CHECKPOINT_FAULTS = {
    # name: (Disk arguments, what the message says, the step last.npz is left at)
    # last.npz is written at steps 0, 5, 10, ...: nth=3 is the write at step 10
    "enospc-mid-write": (dict(target=".last.npz.", where="write", budget=3000, nth=3), "No space left on device", 5),
    "enospc-at-fsync": (dict(target=".last.npz.", where="fsync", nth=3), "No space left on device", 5),
    "eacces-creating": (dict(target=".last.npz.", where="create", code=errno.EACCES, nth=3), "Permission denied", 5),
    # the periodic copy is written right after last.npz, best.npz (first evaluation) right before it
    "enospc-periodic": (dict(target=".step-0000010.npz.", where="write", budget=0), "No space left on device", 10),
    "enospc-best": (dict(target=".best.npz.", where="write", budget=500), "No space left on device", 5),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_FAULTS))
def test_disk_fault_while_writing_a_checkpoint(cli_invoke, faults, monkeypatch, corpus, reference, tmp_path, tiny, case):
    """A checkpoint write at step 10 fails: exit 1, one line naming the file, the problem and the
    fix; the previous checkpoint is intact, no temporary file is left; --resume then ends
    identical to an uninterrupted run."""
    kwargs, problem, kept = CHECKPOINT_FAULTS[case]
    run = tmp_path / "run"
    target = kwargs["target"].strip(".")
    disk = faults.Disk(monkeypatch, **kwargs)
    r = cli_invoke("train", *tiny.args(corpus, *RUN), "--run-dir", run)
    monkeypatch.undo()
    assert disk.failed == 1 and r.exit_code == 1, r.output
    line = one_error_line(r)
    assert f"cannot write checkpoint {run / 'checkpoints' / target}: {problem}" in line
    assert f"{target} was not changed" in line and f"--resume {run}" in line
    assert faults.temp_files(run) == []
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == kept
    assert (run / "failed.txt").read_text(encoding="utf-8").startswith("CheckpointError")
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    faults.assert_same_run(reference, run)


@pytest.mark.parametrize("where, nth, code, problem", [("append", 3, errno.ENOSPC, "No space left on device"),
                                                       ("create", 4, errno.EACCES, "Permission denied")])
def test_disk_fault_while_appending_metrics(cli_invoke, faults, monkeypatch, corpus, reference, tmp_path, tiny,
                                            where, nth, code, problem):
    """At step 15, a short write then ENOSPC (or EACCES opening the file) on metrics.jsonl: no
    torn line is left, checkpoints are intact, and --resume finishes the run exactly."""
    run = tmp_path / "run"
    # appends at steps 5, 10, 15; "create" also counts the empty file made with the run directory
    disk = faults.Disk(monkeypatch, target="metrics.jsonl", where=where, nth=nth, code=code)
    r = cli_invoke("train", *tiny.args(corpus, *RUN), "--run-dir", run)
    monkeypatch.undo()
    assert disk.failed == 1 and r.exit_code == 1, r.output
    line = one_error_line(r)
    assert f"cannot append to {run / 'metrics.jsonl'}: {problem}; checkpoints so far are intact" in line
    assert f"--resume {run}" in line
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    assert len(lines) == 2 and all(line.startswith(b"{") and line.endswith(b"}") for line in lines)  # nothing torn
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == 10
    assert faults.temp_files(run) == []
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    faults.assert_same_run(reference, run)


def test_disk_full_while_writing_a_sample_is_a_warning(cli_invoke, faults, monkeypatch, corpus, reference, tmp_path, tiny):
    """A sample is not worth stopping hours of training for: a one-line warning, the run goes on."""
    run = tmp_path / "run"
    disk = faults.Disk(monkeypatch, target=".step-0000020.txt.", where="write", budget=3)
    r = cli_invoke("train", *tiny.args(corpus, *RUN), "--run-dir", run)
    monkeypatch.undo()
    assert disk.failed == 1 and r.exit_code == 0, r.output
    assert f"warning: cannot write sample {run / 'samples' / 'step-0000020.txt'}: No space left on device" in r.stderr
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000010.txt", "step-0000030.txt"]
    assert faults.temp_files(run) == []
    faults.assert_same_checkpoint(checkpoint.load(reference / "checkpoints" / "last.npz"),
                                  checkpoint.load(run / "checkpoints" / "last.npz"))


@pytest.mark.parametrize("target, written", [(".last.npz.", False), (".config.yaml.", True)])
def test_disk_full_while_starting_a_run(cli_invoke, faults, monkeypatch, corpus, reference, tmp_path, tiny, target, written):
    """The first checkpoint (step 0) or config.yaml cannot be written. Without a checkpoint the
    directory is only the empty skeleton and the same command simply runs again; with one,
    --resume continues. Either way the result is the uninterrupted run."""
    run = tmp_path / "run"
    faults.Disk(monkeypatch, target=target, where="write", budget=10)
    r = cli_invoke("train", *tiny.args(corpus, *RUN), "--run-dir", run)
    monkeypatch.undo()
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    name = target.strip(".")
    assert f"{name}: No space left on device" in line
    assert faults.temp_files(run) == []
    if written:
        assert f"continue with --resume {run}" in line
        r = cli_invoke("train", "--resume", run)
    else:
        assert "run the same command again" in line and runlog.unused(runlog.RunDir(run))
        r = cli_invoke("train", "--resume", run)
        assert r.exit_code == 1 and "start it again with the same command" in one_error_line(r)
        r = cli_invoke("train", *tiny.args(corpus, *RUN), "--run-dir", run)
    assert r.exit_code == 0, r.output
    faults.assert_same_run(reference, run)


def test_file_size_limit_in_a_real_process(faults, corpus, tmp_path, tiny):
    """No monkeypatching: RLIMIT_FSIZE makes the kernel cut metrics.jsonl short at 40 KiB (a short
    write, then EFBIG) in the middle of a run; checkpoints (about 26 KB) still fit."""
    sets = (*RUN, "train.dtype=float32", "train.log_every=1", "train.max_steps=200", "train.eval_every=100",
            "train.checkpoint_every=20")
    settings = tiny.args(corpus, *sets)
    run, ref = tmp_path / "run", tmp_path / "ref"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (40960, 40960)); "
            "from charrnn.cli import main; sys.argv[0] = 'charrnn'; main()")
    p = subprocess.run([sys.executable, "-c", code, "train", *settings, "--run-dir", str(run)], capture_output=True,
                       text=True, env=faults.env(), timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.splitlines()[-1].startswith(f"error: cannot append to {run / 'metrics.jsonl'}: File too large")
    assert "Traceback" not in p.stderr
    data = (run / "metrics.jsonl").read_bytes()
    assert 40000 < len(data) <= 40960 and data.endswith(b"\n")  # cut back to the last complete line
    steps = [r["step"] for r in runlog.read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and 100 < len(steps) < 200
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == 20 * (len(steps) // 20)
    assert faults.temp_files(run) == []
    p = faults.run_module("train", "--resume", run)
    assert p.returncode == 0, p.stderr
    train(tiny.config(corpus, *sets), ref)
    faults.assert_same_run(ref, run)


def test_torn_metrics_line_is_ignored_and_removed_on_resume(cli_invoke, faults, corpus, reference, tmp_path, tiny):
    run = tmp_path / "run"
    train(tiny.config(corpus, *RUN), run, stop=stop_after(15))
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 20, "train_lo')  # what a crash in the middle of a write could leave
    assert [r["step"] for r in runlog.read_metrics(run / "metrics.jsonl")] == [5, 10, 15]
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    faults.assert_same_run(reference, run)


def test_resume_removes_temporary_files_of_interrupted_writes(cli_invoke, faults, corpus, tmp_path, tiny):
    run = tmp_path / "run"
    train(tiny.config(corpus, *RUN, "train.max_steps=10"), run)
    leftovers = [run / "checkpoints" / ".last.npz.k2j4h1.tmp", run / "samples" / ".step-0000010.txt.x9.tmp",
                 run / ".config.yaml.abc.tmp"]
    for p in leftovers:
        p.write_bytes(b"partial")
    mine = [run / "checkpoints" / "notes.tmp", run / ".notes.tmp", run / "samples" / ".draft.abc.tmp"]  # not ours
    for p in mine:
        p.write_text("mine")
    r = cli_invoke("train", "--resume", run, "--set", "train.max_steps=12")
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in leftovers) and all(p.read_text() == "mine" for p in mine)


def test_a_directory_with_only_a_users_hidden_file_is_not_taken_for_an_unused_run(cli_invoke, corpus, tmp_path, tiny):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".notes.tmp").write_text("mine")
    r = cli_invoke("train", *tiny.args(corpus, *RUN), "--run-dir", run)
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert sorted(p.name for p in run.iterdir()) == [".notes.tmp"]


# ---- numerical faults ----------------------------------------------------------------------------------

def poison(monkeypatch, at: set, what: str):
    """Make model.loss_and_grads return a NaN loss, a NaN/huge gradient or raise, at the given
    0-based steps (counted in calls during training; evaluation does not call it)."""
    real = charrnn.model.loss_and_grads
    calls = [0]

    def loss_and_grads(*args, **kwargs):
        result = real(*args, **kwargs)
        step, calls[0] = calls[0], calls[0] + 1
        if step not in at:
            return result
        if what == "interrupt":
            raise KeyboardInterrupt
        if what == "nan-loss":
            return result._replace(loss=float("nan"))
        grads = dict(result.grads)
        grads["out.b_o"] = np.full_like(grads["out.b_o"], np.nan if what == "nan-grad" else 1e25)
        return result._replace(grads=grads)

    monkeypatch.setattr(charrnn.model, "loss_and_grads", loss_and_grads)


def stop_after(k: int):
    calls = [0]

    def stop():
        calls[0] += 1
        return "SIGTERM" if calls[0] == k else None

    return stop


@pytest.mark.parametrize("what, kind", [("nan-loss", "loss"), ("nan-grad", "gradient"),
                                        ("huge-grad", "parameters (the update overflowed)")])
def test_a_non_finite_step_stops_the_run_without_applying_it(cli_invoke, faults, monkeypatch, corpus, tmp_path, tiny,
                                                             what, kind):
    """Step 7's loss or gradient is NaN, or (float32, no clipping) its gradient of 1e25 squares to
    Inf inside Adam: exit 1, the message names step 7, the last finite loss and the fixes; the
    saved parameters *and optimizer state* are exactly those after step 6."""
    extra = ("train.dtype=float32", "train.clip_norm=0", "train.checkpoint_every=0")
    losses = []
    before = tmp_path / "before"
    train(tiny.config(corpus, *RUN, *extra), before, stop=stop_after(7),
          report=lambda kind_, r: losses.append(r["loss"]) if kind_ == "step" else None)
    poison(monkeypatch, {7}, what)
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, *RUN, *extra), "--run-dir", run)
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    assert f"non-finite {kind} at step 7 (update not applied; last finite loss {losses[6]:.4f})" in line
    assert "Lower train.lr" in line and "train.clip_norm" in line and "train.on_nonfinite=skip" in line
    got, ref = checkpoint.load(run / "checkpoints" / "last.npz"), checkpoint.load(before / "checkpoints" / "last.npz")
    assert got.meta["step"] == 8 and ref.meta["step"] == 7 and got.meta["updates"] == ref.meta["updates"] == 7
    for name in ref.params:
        assert np.array_equal(got.params[name], ref.params[name]), name
    for slot in ref.optim:
        for name in ref.optim[slot]:
            assert np.array_equal(got.optim[slot][name], ref.optim[slot][name]), f"optim/{slot}/{name}"


def test_skip_mode_counts_skipped_batches_and_finishes(monkeypatch, corpus, tmp_path, tiny):
    poison(monkeypatch, {3, 12, 13}, "nan-grad")
    run = tmp_path / "run"
    summary = train(tiny.config(corpus, *RUN, "train.on_nonfinite=skip", "train.max_skips=3"), run)
    assert summary.steps == 30
    ck = checkpoint.load(run / "checkpoints" / "last.npz")  # load() checks every array is finite
    assert ck.meta["skips"] == 3 and ck.meta["updates"] == 27
    assert [r["skips"] for r in runlog.read_metrics(run / "metrics.jsonl")] == [1, 1, 3, 3, 3, 3]


def test_skip_mode_stops_after_max_skips(cli_invoke, monkeypatch, corpus, tmp_path, tiny):
    poison(monkeypatch, {3, 12, 13}, "nan-loss")
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, *RUN, "train.on_nonfinite=skip", "train.max_skips=2"), "--run-dir", run)
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "non-finite loss at step 13: 3 batches skipped, more than train.max_skips=2" in line
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["skips"] == 3


def test_an_exception_inside_a_step_leaves_an_exactly_resumable_checkpoint(faults, monkeypatch, corpus, reference,
                                                                          tmp_path, tiny):
    """Ctrl-C in library use (KeyboardInterrupt) in the middle of step 13, after the window and
    the dropout masks were drawn: the step is undone, last.npz holds step 12, and resuming gives
    the uninterrupted run bit for bit."""
    poison(monkeypatch, {12}, "interrupt")
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny.config(corpus, *RUN), run)
    monkeypatch.undo()
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == 12
    train(resume_config(run), run, resume=True)
    faults.assert_same_run(reference, run)


def test_checkpoints_never_hold_non_finite_values_under_a_huge_learning_rate(corpus, tmp_path, tiny):
    """lr=1e30 without clipping, skipping every bad batch: whatever the run writes loads (load()
    refuses NaN or Inf in any array) and the parameters stay finite."""
    run = tmp_path / "run"
    extra = ("train.lr=1e30", "train.clip_norm=0", "train.dtype=float32", "train.on_nonfinite=skip",
             "train.max_skips=1000", "train.checkpoint_every=3", "train.keep_last=5")
    summary = train(tiny.config(corpus, *RUN, *extra), run)
    assert summary.steps == 30
    paths = sorted((run / "checkpoints").glob("*.npz"))
    assert len(paths) >= 3
    for path in paths:
        ck = checkpoint.load(path)
        assert all(np.isfinite(a).all() for a in ck.params.values())
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["skips"] > 0
    assert all(r["train_loss"] is None or math.isfinite(r["train_loss"]) for r in runlog.read_metrics(run / "metrics.jsonl"))
