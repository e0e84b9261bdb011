"""train.threads (parallel.py): a step's streams split across threads give the one-thread
step's numbers up to rounding, the same bits run after run, every cell and model shape, an
uneven split, an optimizer split into parts that gives the same bits, an all-or-nothing step when a
worker fails, no floating-point warnings from the workers, and BLAS's thread count put back."""
from __future__ import annotations

import os
import signal
import threading
import warnings

import numpy as np
import pytest

from charrnn import checkpoint, dataset, parallel, trainer
from charrnn.resume import resume_config
from charrnn.train import train

WORDS = " ".join(["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
                  "how vexingly quick daft zebras jump"] * 30) + "\n"
SHAPES = {
    "rnn": ("model.cell=rnn",),
    "lstm-2-layers-dropout-weight-drop": ("model.cell=lstm", "model.num_layers=2", "model.dropout=0.2",
                                          "model.weight_drop=0.2"),
    "gru-carried": ("model.cell=gru",),
    "lstm-cloze-2-layers": ("model.cell=lstm", "model.bidirectional=true", "model.num_layers=2"),
}


def built(tiny, corpus, *extra):
    cfg = tiny.config(corpus, "train.batch_size=7", "model.hidden_size=12", *extra)
    return trainer.build_trainer(cfg, dataset.load(cfg.data))


def run_steps(t: trainer.Trainer, k: int) -> list:
    return [t.step() for _ in range(k)]


def test_groups_are_contiguous_and_even():
    assert parallel.groups(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert parallel.groups(2, 5) == [slice(0, 1), slice(1, 2)]  # never an empty group
    assert parallel.groups(9, 1) == [slice(0, 9)]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_threads_give_the_one_thread_step(tiny, corpus, shape):
    """Eight float64 steps (carried state included) split 3 ways over 7 streams (2, 2 and 3):
    the same losses, norms, parameters, optimizer state and carried state up to rounding."""
    one = built(tiny, corpus, "train.dtype=float64", *SHAPES[shape])
    three = built(tiny, corpus, "train.dtype=float64", "train.threads=3", *SHAPES[shape])
    assert one.ctx.workers is None and three.ctx.workers.n == 3
    a, b = run_steps(one, 8), run_steps(three, 8)
    assert [r.loss for r in b] == pytest.approx([r.loss for r in a], rel=1e-12)
    assert [r.grad_norm for r in b] == pytest.approx([r.grad_norm for r in a], rel=1e-10)
    np.testing.assert_allclose(three.state.theta, one.state.theta, rtol=0, atol=1e-12)
    for slot in one.state.opt:
        np.testing.assert_allclose(three.state.opt[slot], one.state.opt[slot], rtol=1e-9, atol=1e-15)
    if not one.ctx.spec.bidirectional:
        for d in one.state.h:
            for x, y in zip(one.state.h[d], three.state.h[d], strict=True):
                np.testing.assert_allclose(y, x, rtol=0, atol=1e-12)
    assert not np.array_equal(three.state.theta, built(tiny, corpus, "train.dtype=float64").state.theta)  # it trained


def test_threaded_runs_repeat_bit_for_bit(tiny, corpus):
    a = built(tiny, corpus, "model.cell=lstm", "train.threads=2", "model.dropout=0.1")
    b = built(tiny, corpus, "model.cell=lstm", "train.threads=2", "model.dropout=0.1")
    run_steps(a, 6), run_steps(b, 6)
    assert np.array_equal(a.state.theta, b.state.theta)
    assert all(np.array_equal(a.state.opt[s], b.state.opt[s]) for s in a.state.opt)


def test_the_optimizer_in_parts_gives_the_same_bits(tiny, corpus, monkeypatch):
    """Weight decay and Adam applied to the whole flat vector at once, or by two threads in
    blocks of 37 entries: the same parameters and optimizer state after three steps, bit for bit."""
    extra = ("model.cell=gru", "train.weight_decay=0.1", "train.threads=2")
    real_map = parallel.Workers.map

    def one_pass(self, fn, items):  # the gradient's groups as usual; the update whole, in this thread
        if fn.__name__ == "update_part":
            return [fn(slice(0, items[-1].stop))]
        return real_map(self, fn, items)

    monkeypatch.setattr(trainer, "UPDATE_BLOCK", 10**9)
    monkeypatch.setattr(parallel.Workers, "map", one_pass)
    whole = built(tiny, corpus, *extra)
    run_steps(whole, 3)
    monkeypatch.setattr(trainer, "UPDATE_BLOCK", 37)
    monkeypatch.setattr(parallel.Workers, "map", real_map)
    parts = built(tiny, corpus, *extra)
    assert all(r.finite for r in run_steps(parts, 3))
    assert whole.state.theta.size > 37 * 10
    assert np.array_equal(whole.state.theta, parts.state.theta)
    assert all(np.array_equal(whole.state.opt[s], parts.state.opt[s]) for s in whole.state.opt)


@pytest.mark.parametrize("fault", ["MemoryError", "Ctrl-C"])
def test_a_failed_or_interrupted_step_leaves_the_state_as_it_was(tiny, corpus, monkeypatch, fault):
    """A worker runs out of memory, or Ctrl-C reaches the caller while the workers compute (as in
    a library call; the CLI stops between steps): the step raises and changes nothing."""
    t = built(tiny, corpus, "model.cell=lstm", "train.threads=2", "model.dropout=0.2")
    run_steps(t, 2)
    before = (t.state.theta.copy(), {s: a.copy() for s, a in t.state.opt.items()}, t.state.pos, t.state.step,
              t.state.rng.bit_generator.state)
    real = trainer.model.loss_and_grads

    def faulty_second_group(spec, params, x, *args, **kwargs):
        if x.shape[0] == 4:  # 7 streams: groups of 3 and 4
            if fault == "MemoryError":
                raise MemoryError("worker ran out")
            os.kill(os.getpid(), signal.SIGINT)
        return real(spec, params, x, *args, **kwargs)

    monkeypatch.setattr(trainer.model, "loss_and_grads", faulty_second_group)
    with pytest.raises(MemoryError if fault == "MemoryError" else KeyboardInterrupt):
        t.step()
    assert np.array_equal(t.state.theta, before[0]) and all(np.array_equal(t.state.opt[s], before[1][s]) for s in before[1])
    assert (t.state.pos, t.state.step, t.state.rng.bit_generator.state) == before[2:]


@pytest.mark.parametrize("threads", [1, 2])
def test_an_update_that_fails_part_way_is_put_back(tiny, corpus, monkeypatch, threads):
    """The update runs in blocks (here of 50 entries); a MemoryError in the third block leaves
    every parameter and optimizer entry as it was before the step, blocks done and not done alike."""
    t = built(tiny, corpus, "model.cell=gru", f"train.threads={threads}")
    run_steps(t, 2)
    before = (t.state.theta.copy(), {s: a.copy() for s, a in t.state.opt.items()})
    monkeypatch.setattr(trainer, "UPDATE_BLOCK", 50)
    real, calls = trainer.optim.update, []

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("no room for the update")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.optim, "update", fail_third)
    with pytest.raises(MemoryError, match="no room"):
        t.step()
    assert len(calls) > 3 if threads == 2 else len(calls) == 3  # with 2 threads the other part went on
    assert np.array_equal(t.state.theta, before[0])
    assert all(np.array_equal(t.state.opt[s], before[1][s]) for s in before[1])


def test_workers_raise_no_floating_point_warnings(tiny, corpus):
    """Weights of 3e38 overflow float32 in the workers' forward passes: the step is refused and
    no warning is raised (numpy's error state is per thread; the workers set their own)."""
    t = built(tiny, corpus, "model.cell=lstm", "train.threads=2", "train.on_nonfinite=skip", "train.dtype=float32")
    t.state.theta[:] = 3e38  # the parameters are views of theta: sums of two already overflow
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning in any thread would fail that thread's task
        result = t.step()
    assert not result.finite and not np.isfinite(result.loss)


def test_ctrl_c_while_waiting_lets_every_task_end_first(monkeypatch):
    """Ctrl-C reaches the caller (the main thread) while a task still runs: map raises
    KeyboardInterrupt only once that task has ended, so no worker writes into state the caller
    has already put back."""
    gate, ended = threading.Event(), []
    real_wait = parallel.wait

    def wait_opening_the_gate(futures):  # the caller is now waiting for the tasks to end
        gate.set()
        return real_wait(futures)

    monkeypatch.setattr(parallel, "wait", wait_opening_the_gate)

    running = threading.Event()

    def task(i):
        if i == 0:
            assert running.wait(timeout=60)  # task 1 is under way and can no longer be cancelled
            os.kill(os.getpid(), signal.SIGINT)
        else:
            running.set()
            assert gate.wait(timeout=60)  # held until the caller is in its wait
        ended.append(i)

    with pytest.raises(KeyboardInterrupt):
        parallel.Workers(2).map(task, [0, 1])
    assert sorted(ended) == [0, 1]


@pytest.mark.skipif(not parallel.blas_controllable(), reason="numpy's BLAS is not an OpenBLAS this process can control")
def test_blas_thread_count_is_set_for_the_body_and_put_back():
    before = parallel.blas_thread_count()
    with pytest.raises(KeyError):
        with parallel.blas_threads(1):
            assert parallel.blas_thread_count() == 1
            raise KeyError
    assert parallel.blas_thread_count() == before


def test_resuming_with_another_thread_count_continues_the_run(tiny, corpus, tmp_path):
    """Like the MPI process count, train.threads may change at --resume (float64: same run up to rounding)."""
    base = ("model.cell=lstm", "train.dtype=float64", "train.batch_size=6", "train.eval_every=0")
    train(tiny.config(corpus, *base, "train.max_steps=12"), tmp_path / "ref")
    train(tiny.config(corpus, *base, "train.max_steps=6"), tmp_path / "run")
    train(resume_config(tmp_path / "run", ["train.max_steps=12", "train.threads=2"]), tmp_path / "run", resume=True)

    a = checkpoint.load(tmp_path / "ref" / "checkpoints" / "last.npz")
    b = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.npz")
    assert b.meta["step"] == 12 and b.meta["config"]["train"]["threads"] == 2
    for name in a.params:
        np.testing.assert_allclose(b.params[name], a.params[name], rtol=0, atol=1e-12)
