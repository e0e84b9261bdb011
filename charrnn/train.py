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

from charrnn import config, dataset, distributed, heap, intervals, resume, runlog, trainer
from charrnn.config import Config
from charrnn.errors import CheckpointError, TrainingError
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
    """Train (or continue) a run in run_dir until train.max_steps or until stop() names a reason.

    Under an MPI launcher with K > 1 processes (distributed.py) every process calls this with
    the same arguments: they train the batch's streams together, rank 0 writes run_dir and
    reports, the others' report callbacks are not called. stop() is polled on every rank and
    the ranks stop together at the first step after any of them saw a reason.
    """
    heap.keep_freed_memory()  # steps reuse the previous step's pages (heap.py)
    run = runlog.RunDir(run_dir)
    comm = distributed.world()
    if comm.rank != 0:
        report = no_report
    try:
        ctx, state = _start(cfg, run, resume, init_from, report, comm)
        try:
            return _loop(ctx, state, report, stop)
        except Exception as e:  # KeyboardInterrupt and SystemExit are interruptions, not failures
            runlog.mark_failed(run, e)
            raise
    finally:
        runlog.unlock(run)


def _start(cfg: Config, run: runlog.RunDir, resume_: bool, init_from: str | None, report: Report,
           comm: distributed.Solo):
    """The run's context and state. With several processes: what each rank can refuse runs on
    all of them at once (comm.together), what writes the directory on rank 0 (comm.root_does),
    so a refusal anywhere ends every rank with the same one-line error."""
    data = _load_data(cfg, comm)
    if resume_:
        return _continue(cfg, run, data, report, comm)
    # everything that can refuse the run comes before the directory is made, so a refusal leaves nothing behind
    def prepare():
        init = resume.init_weights(init_from, cfg, data()) if init_from else None
        ctx = trainer.build_context(cfg, data(), run, report, comm)
        return ctx, trainer.fresh_state(ctx, init)

    ctx, state = comm.together(prepare)
    comm.root_does(lambda: _create(ctx, state, run))
    comm.run_root = run.root
    return ctx, state


def _create(ctx: Context, state: TrainState, run: runlog.RunDir) -> None:
    runlog.start_new(run)
    # last.npz first, config.yaml second: from the moment the directory holds anything but the
    # skeleton create() makes, it holds a checkpoint that resuming can continue from
    with runlog.writing(run.last):
        resume.write(ctx, state, run.last, 0.0)  # step 0 carries no hidden state: nothing to gather
    with runlog.writing(run.config, runlog.continue_with(run)):
        runlog.write_text(run.config, config.dump_yaml(ctx.cfg))


def _load_data(cfg: Config, comm: distributed.Solo):
    """A callable giving the corpus. Rank 0 builds (or checks) the cache entry while the others
    wait without a deadline (tokenizing a large corpus takes minutes); they then map the entry
    rank 0 checked (dataset.attach), inside the caller's comm.together."""
    if comm.size == 1:
        data = dataset.load(cfg.data)
        return lambda: data
    loaded = comm.root_does(lambda: dataset.load(cfg.data), deadline=False)
    entry = comm.bcast(None if loaded is None else (str(loaded.cache_dir), str(loaded.source), loaded.sha256))
    if comm.rank == 0:
        return lambda: loaded
    attached = []

    def attach_once():
        if not attached:
            attached.append(dataset.attach(cfg.data, *entry))
        return attached[0]
    return attach_once


def _continue(cfg: Config, run: runlog.RunDir, data, report: Report, comm: distributed.Solo):
    comm.root_does(lambda: runlog.start_again(run))

    def prepare():
        ck = newest_checkpoint(run)
        if ck is None:
            raise resume.nothing_to_resume(run)
        if ck.path != run.last:
            report("warning", {"message": f"resuming from {ck.path.name} (step {ck.meta['step']}), which is newer than last.npz"})
        resume.check_same_corpus(ck, data(), run)
        ctx = trainer.build_context(cfg, data(), run, report, comm)
        return ctx, resume.restore_state(ctx, ck)

    ctx, state = comm.together(prepare)
    comm.root_does(lambda: _restart_files(ctx, state, run))
    comm.run_root = run.root
    return ctx, state


def _restart_files(ctx: Context, state: TrainState, run: runlog.RunDir) -> None:
    again = runlog.continue_with(run)
    with runlog.writing(run.metrics, again):
        runlog.truncate_metrics(run, state.step)  # drops records after the checkpoint, and a torn last line
    with runlog.writing(run.config, again):
        runlog.write_text(run.config, config.dump_yaml(ctx.cfg))  # run-length keys may have changed


def _loop(ctx: Context, state: TrainState, report: Report, stop) -> RunSummary:
    cfg = ctx.cfg.train
    report("start", {"run_dir": str(ctx.run.root), "objective": ctx.spec.objective, "vocab": ctx.spec.V,
                     "params": ctx.layout.size, "train_chars": len(ctx.data.train), "batch_size": ctx.N,
                     "val_chars": 0 if ctx.data.val is None else len(ctx.data.val), "step": state.step,
                     "max_steps": cfg.max_steps, "cached": ctx.data.reused})
    clock = intervals.Clock.started(state.elapsed_before)
    reason, start_chars = None, state.chars_seen
    parallel = ctx.comm.size > 1
    try:
        while state.step < cfg.max_steps:
            ctx.comm.step = state.step
            result = trainer.train_step(ctx, state, stop) if parallel else trainer.train_step(ctx, state)
            ctx.comm.step = state.step  # what a lost peer's message names from here on
            _check_finite(ctx, state, result)
            trainer.accumulate(state, result, ctx.N * cfg.seq_len)
            if state.step == 1:
                report("step0", {"loss": result.loss, "ln_v": math.log(ctx.spec.V)})
            report("step", result._asdict())
            intervals.after_step(ctx, state, result, clock, report)
            reason = state.agreed_stop if parallel else stop()  # ranks stop at the step they agreed on
            if reason:
                break
    except CheckpointError:
        raise  # a write failed: the previous checkpoint is intact, do not try again
    except BaseException as e:
        if parallel and not getattr(e, "root_reports", False) or isinstance(e, distributed.PeerLostError):
            raise  # raised on this rank alone: saving (a collective) would wait for ranks that are not coming
        try:  # the state is finite and consistent (train_step is all or nothing): keep the work
            resume.save(ctx, state, ctx.run.last, clock.elapsed())
        except CheckpointError:
            pass  # last.npz stays the previous complete checkpoint; the error being raised is the news
        raise
    resume.save(ctx, state, ctx.run.last, clock.elapsed())
    return _summary(ctx, state, clock, start_chars, reason)


def _check_finite(ctx: Context, state: TrainState, result) -> None:
    """trainer.check_finite; its error is the same on every rank (the numbers are global)."""
    try:
        trainer.check_finite(ctx, state, result)
    except TrainingError as e:
        raise distributed.shared(e) from None


def _summary(ctx: Context, state: TrainState, clock: intervals.Clock, start_chars: int, reason: str | None) -> RunSummary:
    seconds = clock.now() - clock.start
    return RunSummary(ctx.run.root, ctx.spec.objective, state.step, state.chars_seen, clock.elapsed(),
                      (state.chars_seen - start_chars) / seconds if seconds > 0 else 0.0, state.best_val_loss,
                      state.best_step, ctx.run.last, ctx.run.best if ctx.run.best.exists() else None, reason)
