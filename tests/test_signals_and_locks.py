"""Real `charrnn train` processes: SIGTERM and SIGINT stop cleanly with the resume command, a
second Ctrl-C quits at once without touching files, a second process on the same run directory
is refused, and the lock of a SIGKILLed process does not outlive it."""
from __future__ import annotations

import re
import shlex
import signal

import pytest

from charrnn import checkpoint, runlog, runs

WORDS = " ".join(["alpha", "beta", "gamma", "delta", "fox", "dog", "cat", "tree"][(i * 7 + i // 3) % 8]
                 for i in range(400)) + "\n"
LONG = ("train.max_steps=1000000", "train.log_every=5", "train.eval_every=0", "train.checkpoint_every=0")


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])  # 2: the step's own SIGINT deferral
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_and_prints_the_resume_command(faults, corpus, tmp_path, tiny, sig, code, threads):
    run = tmp_path / "run dir"  # with a space: the printed command must still work when pasted
    child = faults.Child("train", *tiny.args(corpus, *LONG, f"train.threads={threads}"), "--run-dir", run)
    child.wait_for("step 0 loss")  # the handlers are installed and training is under way
    child.proc.send_signal(sig)
    rc, err = child.finish()
    assert rc == code, err
    assert f"charrnn: {sig.name} received: finishing this step and saving last.npz" in err
    found = re.search(rf"stopped by {sig.name} at step (\d+); last.npz saved. Continue with:\n  (.+)\n$", err)
    assert found, err
    step, command = int(found.group(1)), shlex.split(found.group(2))
    assert command == ["charrnn", "train", "--resume", str(run)] and "Traceback" not in err
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == step >= 1
    assert faults.temp_files(run) == []
    p = faults.run_module(*command[1:], "--set", f"train.max_steps={step + 3}")  # the printed command, as is
    assert p.returncode == 0, p.stderr
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == step + 3


# A child whose third training step blocks (reading a stdin that never delivers), so the test
# knows a step is in progress when it signals: no timing involved.
BLOCK_IN_STEP_3 = """
import sys
import charrnn.model
real, calls = charrnn.model.loss_and_grads, [0]
def loss_and_grads(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        print("blocked in step 3", file=sys.stderr, flush=True)
        sys.stdin.read()
    return real(*args, **kwargs)
charrnn.model.loss_and_grads = loss_and_grads
from charrnn.cli import main
sys.argv[0] = "charrnn"
main()
"""


def test_a_second_ctrl_c_quits_at_once_without_touching_files(faults, corpus, tmp_path, tiny):
    run = tmp_path / "run"
    child = faults.Child("train", *tiny.args(corpus, *LONG, "train.log_every=1"), "--run-dir", run, code=BLOCK_IN_STEP_3)
    child.wait_for("blocked in step 3")
    before = snapshot(run)
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == 0
    child.proc.send_signal(signal.SIGINT)
    child.wait_for("SIGINT received: finishing this step and saving last.npz; Ctrl-C again quits at once")
    child.proc.send_signal(signal.SIGINT)
    rc, err = child.finish(timeout=30)
    assert rc == 130, err
    assert "stopped by" not in err and "Traceback" not in err
    assert snapshot(run) == before  # last.npz still the step-0 one, metrics as they were, no temp file


def test_a_second_process_is_refused_and_a_killed_ones_lock_does_not_stay(faults, corpus, tmp_path, tiny):
    run = tmp_path / "run"
    first = faults.Child("train", *tiny.args(corpus, *LONG, "train.checkpoint_every=5"), "--run-dir", run)
    first.wait_for("step 0 loss")
    in_use = f"error: run directory {run} is in use by another charrnn process; wait for it to finish or stop it first\n"
    for args in (("--resume", run), (*tiny.args(corpus, *LONG), "--run-dir", run)):
        p = faults.run_module("train", *args)
        assert (p.returncode, p.stderr) == (1, in_use)
    assert runs.is_running(runlog.RunDir(run))
    first.proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up ...
    assert first.finish()[0] == -signal.SIGKILL
    assert (run / ".lock").exists() and not runs.is_running(runlog.RunDir(run))  # ... the kernel dropped the lock
    step = checkpoint.load(run / "checkpoints" / "last.npz").meta["step"]
    p = faults.run_module("train", "--resume", run, "--set", f"train.max_steps={step + 2}")
    assert p.returncode == 0, p.stderr
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == step + 2


def test_a_second_ctrl_c_that_interrupts_the_first_handler_still_quits(monkeypatch):
    """A Python signal handler can be re-entered at any bytecode: a second SIGINT arriving while
    the first is being acknowledged must still count as the second (it used to be taken for a
    first one, and the process went on)."""
    from charrnn import cli

    stopper, exits = cli._Stopper(), []
    real_write = cli.os.write

    def write_interrupted_by_a_second_sigint(fd, data):
        monkeypatch.setattr(cli.os, "write", real_write)
        stopper.handle(signal.SIGINT, None)
        return len(data)

    def _exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "write", write_interrupted_by_a_second_sigint)
    monkeypatch.setattr(cli.os, "_exit", _exit)
    with pytest.raises(SystemExit):
        stopper.handle(signal.SIGINT, None)
    assert exits == [130] and stopper() == "SIGINT"
    stopper.handle(signal.SIGTERM, None)  # a signal after the first SIGTERM/SIGINT changes nothing else
    assert stopper() == "SIGINT" and exits == [130]
