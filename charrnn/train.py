"""Training a run: `train(cfg, run_dir)` and `resume_config(run_dir, sets)`.

`train` starts a new run (or continues one) in its run directory, then repeats the training
step (trainer.py: take a window, loss and gradients, clip, update) and after each step logs,
evaluates and checkpoints on their intervals (intervals.py). Everything resuming needs is in
the checkpoint (resume.py), so a resumed run continues bit for bit.

The library reports progress through a `report(kind, record)` callback and never prints;
cli.py decides what the user sees.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from charrnn import config, dataset, heap, intervals, resume, runlog, trainer
from charrnn.config import Config
from charrnn.errors import CheckpointError
from charrnn.resume import newest_checkpoint, resume_config
from charrnn.trainer import Context, Report, TrainState, no_report

__all__ = ["RunSummary", "resume_config", "train"]


@dataclass
class RunSummary:
    """What train() returns."""

    run_dir: Path  # the run directory
    objective: str  # next-char or cloze
    steps: int  # optimizer steps taken in the whole run
    chars_seen: int  # characters trained on in the whole run
    elapsed_s: float  # seconds of training, earlier sessions included
    chars_per_sec: float  # training throughput of this session
    best_val_loss: float | None  # lowest validation loss (None: no evaluation)
    best_step: int | None  # the step of best_val_loss
    last_checkpoint: Path  # checkpoints/last.npz
    best_checkpoint: Path | None  # checkpoints/best.npz, if there is one
    interrupted: str | None = None  # the reason stop() gave (a signal name) when stopped early


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, init_from: str | None = None,
          report: Report = no_report, stop: Callable[[], str | None] = lambda: None) -> RunSummary:
    """Train (or continue) a run in run_dir until train.max_steps or until stop() names a reason."""
    heap.keep_freed_memory()  # steps reuse the previous step's pages (heap.py)
    run = runlog.RunDir(run_dir)
    try:
        ctx, state = _start(cfg, run, resume, init_from, report)
        try:
            return _loop(ctx, state, report, stop)
        except Exception as e:  # KeyboardInterrupt and SystemExit are interruptions, not failures
            runlog.mark_failed(run, e)
            raise
    finally:
        runlog.unlock(run)


def _start(cfg: Config, run: runlog.RunDir, resume_: bool, init_from: str | None, report: Report):
    data = dataset.load(cfg.data)
    if resume_:
        return _continue(cfg, run, data, report)
    init = resume.init_weights(init_from, cfg, data) if init_from else None
    # everything that can refuse the run comes before the directory is made, so a refusal leaves nothing behind
    ctx = trainer.build_context(cfg, data, run, report)
    runlog.start_new(run)
    state = trainer.fresh_state(ctx, init)
    # last.npz first, config.yaml second: from the moment the directory holds anything but the
    # skeleton create() makes, it holds a checkpoint that resuming can continue from
    with runlog.writing(run.last):
        resume.write(ctx, state, run.last, 0.0)
    with runlog.writing(run.config, runlog.continue_with(run)):
        runlog.write_text(run.config, config.dump_yaml(ctx.cfg))
    return ctx, state


def _continue(cfg: Config, run: runlog.RunDir, data: dataset.Dataset, report: Report):
    runlog.start_again(run)
    ck = newest_checkpoint(run)
    if ck is None:
        raise resume.nothing_to_resume(run)
    if ck.path != run.last:
        report("warning", {"message": f"resuming from {ck.path.name} (step {ck.meta['step']}), which is newer than last.npz"})
    resume.check_same_corpus(ck, data, run)
    ctx = trainer.build_context(cfg, data, run, report)
    state = resume.restore_state(ctx, ck)
    again = runlog.continue_with(run)
    with runlog.writing(run.metrics, again):
        runlog.truncate_metrics(run, state.step)  # drops records after the checkpoint, and a torn last line
    with runlog.writing(run.config, again):
        runlog.write_text(run.config, config.dump_yaml(ctx.cfg))  # run-length keys may have changed
    return ctx, state


def _loop(ctx: Context, state: TrainState, report: Report, stop) -> RunSummary:
    cfg = ctx.cfg.train
    report("start", {"run_dir": str(ctx.run.root), "objective": ctx.spec.objective, "vocab": ctx.spec.V,
                     "params": ctx.layout.size, "train_chars": len(ctx.data.train), "batch_size": ctx.N,
                     "val_chars": 0 if ctx.data.val is None else len(ctx.data.val), "step": state.step,
                     "max_steps": cfg.max_steps, "cached": ctx.data.reused})
    clock = intervals.Clock.started(state.elapsed_before)
    reason, start_chars = None, state.chars_seen
    try:
        while state.step < cfg.max_steps:
            result = trainer.train_step(ctx, state)
            trainer.check_finite(ctx, state, result)
            trainer.accumulate(state, result, ctx.N * cfg.seq_len)
            if state.step == 1:
                report("step0", {"loss": result.loss, "ln_v": math.log(ctx.spec.V)})
            report("step", result._asdict())
            intervals.after_step(ctx, state, result, clock, report)
            reason = stop()
            if reason:
                break
    except CheckpointError:
        raise  # a write failed: the previous checkpoint is intact, do not try again
    except BaseException:
        try:  # the state is finite and consistent (train_step is all or nothing): keep the work
            resume.save(ctx, state, ctx.run.last, clock.elapsed())
        except CheckpointError:
            pass  # last.npz stays the previous complete checkpoint; the error being raised is the news
        raise
    resume.save(ctx, state, ctx.run.last, clock.elapsed())
    return _summary(ctx, state, clock, start_chars, reason)


def _summary(ctx: Context, state: TrainState, clock: intervals.Clock, start_chars: int, reason: str | None) -> RunSummary:
    seconds = clock.now() - clock.start
    return RunSummary(ctx.run.root, ctx.spec.objective, state.step, state.chars_seen, clock.elapsed(),
                      (state.chars_seen - start_chars) / seconds if seconds > 0 else 0.0, state.best_val_loss,
                      state.best_step, ctx.run.last, ctx.run.best if ctx.run.best.exists() else None, reason)
