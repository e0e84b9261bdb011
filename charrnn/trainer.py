"""The training step and the state it changes: the only place that holds mutable state.

`Trainer` (made by `build_trainer`) is a model and its optimizer at step 0 with no run directory:
what benchmarks and tests time and drive. `train.train` builds the same `Context` and
`TrainState` and adds the run directory, the intervals (intervals.py) and checkpoints
(resume.py) around `train_step`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from charrnn import batches, config, dataset, distributed, model, optim, parallel, runlog
from charrnn.config import Config
from charrnn.errors import TrainingError, option

Report = Callable[[str, dict], None]


def no_report(kind: str, record: dict) -> None:
    """The report callback that ignores everything."""


class StepResult(NamedTuple):
    """The numbers of one optimizer step (reported as a dict: `_asdict()`)."""

    loss: float  # mean cross-entropy of the window, before the update (may be non-finite)
    grad_norm: float  # global L2 norm of the gradient before clipping (may be non-finite)
    clipped: bool  # whether clipping changed the gradient
    lr: float  # the learning rate of this step
    finite: bool  # whether the update was applied (loss, gradient and new parameters finite)
    overflow: bool  # finite gradient, but the update would have overflowed the parameters


class _Sums:
    """What IntervalSums and GradSums share: reading back the mapping their to_json writes."""

    @classmethod
    def from_json(cls, d: dict):
        """The sums from their checkpoint mapping, whose absent keys are zero."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class IntervalSums(_Sums):
    """Sums over the current logging interval; saved in checkpoint meta as "acc" (to_json)."""

    steps: int = 0  # steps taken in the interval
    chars: int = 0  # characters trained on in this session's part of the interval (throughput)
    clipped: int = 0  # steps whose gradient was clipped
    finite: int = 0  # steps whose update was applied
    loss_sum: float = 0.0  # sum of the losses of the finite steps
    norm_max: float = 0.0  # largest gradient norm of the finite steps

    def add(self, result: StepResult, chars: int) -> None:
        self.steps += 1
        self.chars += chars
        self.clipped += int(result.clipped)
        if result.finite:
            self.loss_sum += result.loss
            self.finite += 1
            self.norm_max = max(self.norm_max, result.grad_norm)

    def to_json(self) -> dict:
        """The checkpoint's "acc" mapping: a key exists once something was counted in it."""
        out = {"steps": self.steps} if self.steps else {}
        if self.chars:
            out["chars"] = self.chars
        if self.steps:
            out["clipped"] = self.clipped
        if self.finite:
            out.update(loss_sum=self.loss_sum, finite=self.finite, norm_max=self.norm_max)
        return out


@dataclass
class GradSums(_Sums):
    """Gradient sums since the last evaluation (diagnose.grad_health); checkpoint meta "eval_acc"."""

    steps: int = 0  # steps since the last evaluation
    clipped: int = 0  # of them, steps whose gradient was clipped
    finite: int = 0  # of them, steps whose update was applied
    norm_sum: float = 0.0  # sum of the gradient norms of the finite steps
    norm_max: float = 0.0  # largest gradient norm of the finite steps

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.clipped += int(result.clipped)
        if result.finite:
            self.finite += 1
            self.norm_sum += result.grad_norm
            self.norm_max = max(self.norm_max, result.grad_norm)

    def to_json(self) -> dict:
        """The checkpoint's "eval_acc" mapping (and grad_health's argument)."""
        out = {"steps": self.steps, "clipped": self.clipped} if self.steps else {}
        if self.finite:
            out.update(finite=self.finite, norm_sum=self.norm_sum, norm_max=self.norm_max)
        return out


@dataclass
class Backup:
    """Scratch copies of theta and the optimizer state, reused by every step (never saved)."""

    theta: np.ndarray  # a copy of TrainState.theta
    opt: dict  # slot -> a copy of that slot's flat state


@dataclass
class TrainState:
    theta: np.ndarray  # all parameters, one flat vector
    params: dict  # name -> view into theta
    opt: dict  # slot -> flat optimizer state
    rng: np.random.Generator  # dropout masks and cloze windows
    h: dict | None  # hidden state carried into the next window (None: zeros)
    step: int = 0  # optimizer steps taken (skipped batches count as steps)
    updates: int = 0  # updates applied: Adam's t
    pos: int = 0  # offset of the next window inside each stream
    chars_seen: int = 0  # characters trained on in the whole run
    best_val_loss: float | None = None  # lowest validation loss so far
    best_step: int | None = None  # the step of best_val_loss
    skips: int = 0  # non-finite steps skipped (train.on_nonfinite=skip)
    last_finite_loss: float | None = None  # loss of the last step that was applied
    elapsed_before: float = 0.0  # seconds spent in earlier sessions of this run
    acc: IntervalSums = field(default_factory=IntervalSums)  # sums over the current logging interval
    eval_acc: GradSums = field(default_factory=GradSums)  # gradient sums since the last evaluation
    backup: Backup | None = None  # scratch copies for an all-or-nothing update (not saved)
    agreed_stop: str | None = None  # the stop reason the ranks agreed on in the last step (not saved)


@dataclass(frozen=True)
class Context:
    """What does not change during a run."""

    cfg: Config  # the run's config, batch size as used
    data: dataset.Dataset  # the corpus (val None when there is too little to score)
    run: runlog.RunDir | None  # where the run is written (None: a Trainer without a run directory)
    layout: optim.Layout  # where each parameter lives in the flat vector
    spec: model.Spec  # the model's shape
    N: int  # windows per step (streams for next-char)
    span: int  # stream length (next-char) or 0 (cloze)
    decay_mask: np.ndarray | None  # 1 where weight decay applies (None: no decay)
    dtype: np.dtype  # of parameters and optimizer state
    comm: distributed.Solo = field(default_factory=distributed.Solo)  # the processes training together (distributed.py)
    rows: slice = field(default_factory=lambda: slice(None))  # this process's streams (windows) of the N: all with one process
    workers: parallel.Workers | None = None  # threads that split this process's streams (train.threads > 1)


# ---- setting up -------------------------------------------------------------------------------

def build_context(cfg: Config, data: dataset.Dataset, run: runlog.RunDir | None = None,
                  report: Report = no_report, comm: distributed.Solo | None = None) -> Context:
    """The fixed part of a run of cfg on data. The batch size is lowered (with a warning) when the
    training text is too short for it, and evaluation dropped when the validation text is: the
    context's cfg is the one the run uses."""
    spec = model.spec_of_config(len(data.vocab), cfg.model)
    N, span = cfg.train.batch_size, 0
    if not spec.bidirectional:
        N, span = batches.plan_streams(len(data.train), cfg.train.batch_size, cfg.train.seq_len)
    elif len(data.train) < cfg.train.seq_len:
        batches.random_windows(data.train, 1, cfg.train.seq_len, np.random.default_rng(0))  # raises with the numbers
    if N != cfg.train.batch_size:
        report("warning", {"message": f"the training text ({len(data.train):,} characters) is too short for "
                                      f"{cfg.train.batch_size} streams of {cfg.train.seq_len + 1}; using train.batch_size={N}"})
        cfg = config.replace(cfg, {"train.batch_size": N})
    if data.val is not None and len(data.val) < (1 if spec.bidirectional else 2):
        report("warning", {"message": f"the validation text has {len(data.val)} character(s), too few to score; "
                                      "training without evaluation (raise data.val_fraction or set data.val_path)"})
        data = data._replace(val=None)
    dtype = np.dtype(cfg.train.dtype)
    layout = optim.Layout.of(model.param_shapes(spec))
    decay = layout.mask(lambda n: ".W_" in n, dtype) if cfg.train.weight_decay > 0 else None
    comm = comm or distributed.Solo()
    rows = comm.rows(N)  # ConfigError when the processes do not divide the batch, before any work
    threads = min(cfg.train.threads, len(range(N)[rows]))
    workers = parallel.Workers(threads) if threads > 1 else None
    return Context(cfg, data, run, layout, spec, N, span, decay, dtype, comm, rows, workers)


def fresh_state(ctx: Context, init_params: dict | None = None) -> TrainState:
    """Step 0: parameters from init_params or initialized from cfg.seed, optimizer state zero."""
    cfg = ctx.cfg
    rng = np.random.default_rng(cfg.seed)
    params = init_params or model.init_params(ctx.spec, rng, ctx.dtype, cfg.model.init_scale)
    theta = ctx.layout.flatten(params, ctx.dtype)
    opt = optim.init_state(cfg.train.optimizer, ctx.layout.size, ctx.dtype)
    return TrainState(theta, ctx.layout.views(theta), opt, rng, None)


@dataclass
class Trainer:
    """A model and its optimizer, taking training steps exactly as `train.train` does but without
    a run directory, logging, evaluation or checkpoints (for benchmarks and tests)."""

    ctx: Context  # ctx.cfg is the config as used (see build_context)
    state: TrainState  # advanced in place by step()

    def step(self) -> StepResult:
        """One optimizer step (train_step)."""
        return train_step(self.ctx, self.state)


def build_trainer(cfg: Config, data: dataset.Dataset, report: Report = no_report) -> Trainer:
    """A Trainer at step 0 for cfg on data; warnings about the data go to report("warning", ...)."""
    ctx = build_context(cfg, data, None, report)
    return Trainer(ctx, fresh_state(ctx))


# ---- one step ---------------------------------------------------------------------------------

def _batch(ctx: Context, state: TrainState):
    T = ctx.cfg.train.seq_len
    if state.step % dataset.release_every(ctx.N, T) == 0:  # keep RSS independent of the corpus size
        dataset.release_pages(ctx.data.train)
    if ctx.spec.bidirectional:
        return batches.random_windows(ctx.data.train, ctx.N, T, state.rng, ctx.rows), None
    x, y, state.pos, wrapped = batches.stream_window(ctx.data.train, ctx.N, ctx.span, T, state.pos, ctx.rows)
    if wrapped:
        state.h = None
    return x, y


def train_step(ctx: Context, state: TrainState, vote=None) -> StepResult:
    """One optimizer step; returns its numbers. A non-finite loss or gradient applies no update.

    With several processes, each computes its streams' share of the gradient of the global mean
    loss and one Allreduce sums the shares (distributed.World.reduce_step): clipping, the skip
    decision and the update see the same global numbers everywhere. vote() (the local stop
    reason) rides in the same buffer; the agreed reason lands in state.agreed_stop.

    All or nothing: an exception inside the step (MemoryError; Ctrl-C when called as a library)
    leaves the state as it was before it, so the checkpoint written next resumes exactly.
    """
    undo = (state.pos, state.h, state.rng.bit_generator.state)
    try:
        return _step(ctx, state, vote)
    except BaseException:
        state.pos, state.h = undo[:2]
        state.rng.bit_generator.state = undo[2]
        raise


def _masks(ctx: Context, state: TrainState):
    """Dropout masks of this process's streams: drawn for all N, so a stream's mask (and the
    generator's state) does not depend on how many processes share the batch."""
    m = ctx.cfg.model
    masks = model.dropout_masks(ctx.spec, ctx.N, ctx.cfg.train.seq_len, m.dropout, state.rng, ctx.dtype, m.weight_drop)
    return masks if ctx.comm.size == 1 else model.stream_masks(masks, ctx.rows)


def _step(ctx: Context, state: TrainState, vote=None) -> StepResult:
    # with worker threads, BLAS runs single-threaded in each of them (parallel.py)
    with parallel.blas_threads(1 if ctx.workers else None):
        return _step_body(ctx, state, vote)


def _local_grads(ctx: Context, state: TrainState, x, y, masks):
    """(flat gradient, loss, carried state) of this process's streams: one call to the model, or
    one per group of streams on ctx.workers, weighted by the group's share of the streams."""
    if ctx.workers is None:
        result = model.loss_and_grads(ctx.spec, state.params, x, y, state.h, masks)
        return ctx.layout.flatten(result.grads, ctx.dtype), result.loss, result.h_last
    n = x.shape[0]

    def group(rows: slice):
        h = None if state.h is None else {d: [s[rows] for s in layers] for d, layers in state.h.items()}
        result = model.loss_and_grads(ctx.spec, state.params, x[rows], None if y is None else y[rows], h,
                                      model.stream_masks(masks, rows))
        share = (rows.stop - rows.start) / n
        g = ctx.layout.flatten(result.grads, ctx.dtype)
        g *= g.dtype.type(share)
        return g, result.loss * share, result.h_last

    parts = ctx.workers.map_parts(group, n)
    g = parts[0][0]

    def add_others(cut: slice):  # the groups' gradients summed in group order, each thread a part of g
        for other, _, _ in parts[1:]:
            g[cut] += other[cut]

    ctx.workers.map_parts(add_others, g.size)
    h_last = {d: [np.concatenate([p[2][d][l] for p in parts]) for l in range(ctx.spec.L)] for d in ctx.spec.dirs}
    return g, sum(p[1] for p in parts), h_last


def _step_body(ctx: Context, state: TrainState, vote=None) -> StepResult:
    cfg = ctx.cfg.train
    x, y = _batch(ctx, state)
    masks = _masks(ctx, state)
    with np.errstate(all="ignore"):  # overflow shows up as a non-finite loss or norm, checked below
        g, loss, h_last = _local_grads(ctx, state, x, y, masks)
        g, loss, state.agreed_stop = ctx.comm.reduce_step(g, loss, x.shape[0] / ctx.N, vote() if vote else None)
        norm, clipped = optim.clip(g, cfg.clip_norm, cfg.clip_value)
    lr = optim.lr_at(state.step, cfg)
    finite = math.isfinite(loss) and math.isfinite(norm)
    overflow = False
    if finite:
        if _update(ctx, state, g, lr):
            state.updates += 1
            state.h = None if ctx.spec.bidirectional else h_last
            state.last_finite_loss = loss
        else:  # finite gradient, but the step would overflow the parameters: rejected the same way
            finite, overflow = False, True
    state.step += 1
    state.chars_seen += ctx.N * cfg.seq_len
    return StepResult(loss, norm, clipped, lr, finite, overflow)


UPDATE_BLOCK = 1 << 17  # entries of the flat vectors one block of the update covers: 512 KB in float32


def _update(ctx: Context, state: TrainState, g: np.ndarray, lr: float) -> bool:
    """optim.update, all or nothing: if the new parameters or the new optimizer state are not
    finite, both are put back as they were. (optim.update advances the optimizer state in place,
    and Adam's or Adagrad's g*g can overflow to Inf while the parameters stay finite.) The copies
    are small next to a step's products (benchmarks/README.md). Every pass is elementwise, so the
    work may be cut anywhere with the same bits: each worker thread takes a contiguous part of the
    flat vectors, and each part runs in blocks of UPDATE_BLOCK entries whose dozen or so passes
    stay in cache (a third faster than whole-vector passes, which stream from memory)."""
    if state.backup is None:
        state.backup = Backup(np.empty_like(state.theta), {slot: np.empty_like(a) for slot, a in state.opt.items()})
    saved, t, cfg = state.backup, state.updates + 1, ctx.cfg.train
    backed_up = []  # the blocks copied to the backup so far: no other block has changed

    def update_part(part: slice) -> bool:  # every block, even after a failed one
        return all([update_block(slice(a, min(a + UPDATE_BLOCK, part.stop)))
                    for a in range(part.start, part.stop, UPDATE_BLOCK)])

    def update_block(part: slice) -> bool:
        np.copyto(saved.theta[part], state.theta[part])
        for slot, flat in state.opt.items():
            np.copyto(saved.opt[slot][part], flat[part])
        backed_up.append(part)
        opt = {slot: flat[part] for slot, flat in state.opt.items()}
        decay = ctx.decay_mask[part] if ctx.decay_mask is not None else None
        with np.errstate(all="ignore"):
            applied = optim.update(state.theta[part], g[part], opt, t, lr, cfg, decay)
        return applied and all(np.isfinite(flat).all() for flat in opt.values())

    size = state.theta.size
    try:
        if ctx.workers is None:
            ok = update_part(slice(0, size))
        else:
            ok = all(ctx.workers.map_parts(update_part, size))
    except BaseException:  # a failure or Ctrl-C part way: the blocks done so far are put back
        _put_back(state, saved, backed_up)
        raise
    if not ok:
        _put_back(state, saved, backed_up)
    return ok


def _put_back(state: TrainState, saved: Backup, parts: list[slice]) -> None:
    for part in parts:
        np.copyto(state.theta[part], saved.theta[part])
        for slot, flat in state.opt.items():
            np.copyto(flat[part], saved.opt[slot][part])


def accumulate(state: TrainState, result: StepResult, chars: int) -> None:
    """Count a step in the logging interval's and the evaluation interval's sums."""
    state.acc.add(result, chars)
    state.eval_acc.add(result)


def check_finite(ctx: Context, state: TrainState, result: StepResult) -> None:
    """After a step that applied no update: count it as skipped (train.on_nonfinite=skip, up to
    train.max_skips) or raise TrainingError with what to change."""
    cfg = ctx.cfg.train
    if result.finite:
        return
    last = f"{state.last_finite_loss:.4f}" if state.last_finite_loss is not None else "none yet"
    # state.step already counts this step; its loss was computed at step - 1 (the first is step 0)
    kind = ("parameters (the update overflowed)" if result.overflow
            else "loss" if not math.isfinite(result.loss) else "gradient")
    what = f"non-finite {kind} at step {state.step - 1}"
    if cfg.on_nonfinite == "skip":
        state.skips += 1
        if state.skips <= cfg.max_skips:
            return
        raise TrainingError(f"{what}: {state.skips} batches skipped, more than train.max_skips={cfg.max_skips}; "
                            f"last finite loss {last}. Lower train.lr or set train.clip_norm (e.g. 1){_restart(ctx)}")
    raise TrainingError(f"{what} (update not applied; last finite loss {last}). Lower train.lr (now {cfg.lr}), "
                        f"set train.clip_norm (now {cfg.clip_norm or 'off'}), or use "
                        f"{option('set', 'train.on_nonfinite=skip')}{_restart(ctx)}")


def _restart(ctx: Context) -> str:
    """How to go on with other settings: resuming keeps the optimizer settings, a new run from
    the weights does not."""
    if ctx.run is None:
        return ""
    return f"; to keep the weights so far, start a new run with {option('init_from', ctx.run.last)} and the new settings"
