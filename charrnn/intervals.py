"""What happens after a training step when one of its intervals comes round: a metrics record
(train.log_every), an evaluation with a sample (train.eval_every), checkpoints
(train.checkpoint_every, best.npz on a new best validation loss)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from charrnn import diagnose, evaluate, runlog
from charrnn.errors import CheckpointError, option
from charrnn.resume import save
from charrnn.sample import Knobs, sample_text
from charrnn.trainer import (
    Context,
    GradSums,
    IntervalSums,
    Report,
    StepResult,
    TrainState,
)


@dataclass
class Clock:
    """This session's wall clock: training time and the current logging interval's throughput."""

    start: float  # when this session's training began (perf_counter)
    interval: float  # when the current logging interval's training time began
    before: float = 0.0  # seconds of earlier sessions of the run

    @classmethod
    def started(cls, before: float = 0.0) -> Clock:
        now = time.perf_counter()
        return cls(now, now, before)

    def now(self) -> float:
        return time.perf_counter()

    def elapsed(self, now: float | None = None) -> float:
        """Seconds the run has trained, earlier sessions included."""
        return self.before + (self.now() if now is None else now) - self.start


def log_record(ctx: Context, state: TrainState, result: StepResult, seconds: float, elapsed: float) -> dict:
    """The metrics record of the interval that ends with this step (and its sums restart)."""
    a, state.acc = state.acc, IntervalSums()
    return {"step": state.step, "epoch": state.chars_seen / len(ctx.data.train), "chars_seen": state.chars_seen,
            "train_loss": a.loss_sum / a.finite if a.finite else None,
            "lr": result.lr, "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
            "grad_norm_max": a.norm_max if a.finite else None, "clipped": result.clipped,
            "clip_frac": a.clipped / a.steps, "skips": state.skips,
            "chars_per_sec": a.chars / seconds if seconds > 0 else None, "elapsed_s": elapsed}


def evaluate_now(ctx: Context, state: TrainState, report: Report) -> tuple[dict, bool]:
    """Validation loss (and a sample for next-char models); whether it is the best so far."""
    val = ctx.data.val
    if ctx.cfg.train.eval_chars:
        val = val[: ctx.cfg.train.eval_chars + 1]
    res = evaluate.evaluate_ids(ctx.spec, state.params, val, ctx.cfg.train.seq_len, comm=ctx.comm)  # split over the processes
    record = {"val_loss": res.loss, "val_bpc": res.bpc,
              **diagnose.grad_health(ctx.spec, state.params, state.eval_acc.to_json())}
    state.eval_acc = GradSums()
    improved = state.best_val_loss is None or res.loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_step = res.loss, state.step
    if not ctx.spec.bidirectional and ctx.cfg.train.sample_chars and ctx.comm.rank == 0:
        _write_sample(ctx, state, report)
    return record, improved


def _write_sample(ctx: Context, state: TrainState, report: Report) -> None:
    """A sample is not worth stopping training for: a write that fails is a warning."""
    text = sample_text(ctx.spec, state.params, ctx.data.vocab, ctx.cfg.train.sample_chars,
                       np.random.default_rng([ctx.cfg.seed, state.step]), knobs=Knobs(temperature=0.8))
    try:
        runlog.write_text(ctx.run.sample_file(state.step), text)
    except OSError as e:
        report("warning", {"message": f"cannot write sample {ctx.run.sample_file(state.step)}: {e.strerror}"})
    report("sample", {"step": state.step, "text": text})


def after_step(ctx: Context, state: TrainState, result: StepResult, clock: Clock, report: Report) -> None:
    """Log, evaluate and checkpoint when their intervals come round."""
    cfg, step = ctx.cfg.train, state.step
    now = clock.now()
    elapsed = clock.elapsed(now)
    at_end = step == cfg.max_steps
    do_eval = ctx.data.val is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or at_end)
    improved = False
    if ctx.comm.size > 1 and cfg.eval_every and step % cfg.eval_every == 0:
        ctx.comm.check_same(state.theta)
    if step % cfg.log_every == 0 or do_eval or at_end:
        record = log_record(ctx, state, result, now - clock.interval, elapsed)
        clock.interval = now
        if do_eval:
            evaluation, improved = evaluate_now(ctx, state, report)
            record.update(evaluation)
            clock.interval = clock.now()  # evaluation time is not training throughput
        _append(ctx, record)
        report("log", record)
    # checkpoints come last, so a checkpoint of step s implies that step s's metrics and sample are on disk
    if improved:
        save(ctx, state, ctx.run.best, elapsed)
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not at_end:
        _periodic(ctx, state, elapsed, report)


def _append(ctx: Context, record: dict) -> None:
    ctx.comm.root_does(lambda: _append_here(ctx, record))


def _append_here(ctx: Context, record: dict) -> None:
    try:
        runlog.append_metrics(ctx.run, record)
    except OSError as e:
        raise CheckpointError(f"cannot append to {ctx.run.metrics}: {e.strerror or e}; checkpoints so far are intact. "
                              f"Free some space (or fix the permissions), then continue with "
                              f"{option('resume', ctx.run.root)}") from None


def _periodic(ctx: Context, state: TrainState, elapsed: float, report: Report) -> None:
    """last.npz, and step-<n>.npz keeping the newest train.keep_last."""
    save(ctx, state, ctx.run.last, elapsed)
    if ctx.cfg.train.keep_last:
        save(ctx, state, ctx.run.periodic(state.step), elapsed)
        try:
            if ctx.comm.rank == 0:
                runlog.prune_periodic(ctx.run, ctx.cfg.train.keep_last)
        except OSError as e:
            report("warning", {"message": f"cannot delete old periodic checkpoints in {ctx.run.checkpoints}: "
                                          f"{e.strerror or e}; they are kept"})
