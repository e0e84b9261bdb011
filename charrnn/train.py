"""The training loop: the only place that holds mutable state.

`train(cfg, run_dir)` builds a TrainState (flat parameters with named views, optimizer state,
step, data position, carried hidden state, Generator), then repeats: take a window, loss and
gradients, clip, update; log, evaluate and checkpoint on their intervals. Everything that
--resume needs is in the checkpoint, so a resumed run continues bit for bit.

The library reports progress through a `report(kind, record)` callback and never prints;
cli.py decides what the user sees.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from charrnn import __version__, batches, checkpoint, config, dataset, diagnose, evaluate, heap, model, optim, runlog
from charrnn.config import Config
from charrnn.errors import CheckpointError, ConfigError, DataError, RunDirError, TrainingError
from charrnn.sample import Knobs, sample_text

Report = Callable[[str, dict], None]

# keys --resume may change; everything else must match the run's config
RESUMABLE_KEYS = ("train.max_steps", "train.eval_every", "train.eval_chars", "train.log_every",
                  "train.checkpoint_every", "train.keep_last", "train.sample_chars",
                  "train.on_nonfinite", "train.max_skips", "data.cache_dir", "name")


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
    chars_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    skips: int = 0
    last_finite_loss: float | None = None
    elapsed_before: float = 0.0  # seconds spent in earlier sessions of this run
    acc: dict = field(default_factory=dict)  # sums over the current logging interval
    eval_acc: dict = field(default_factory=dict)  # gradient-norm sums since the last evaluation
    backup: dict = field(default_factory=dict)  # scratch copies of theta and the optimizer state (not saved)


@dataclass(frozen=True)
class Context:
    """What does not change during a run."""

    cfg: Config
    data: dataset.Dataset
    run: runlog.RunDir
    layout: optim.Layout
    spec: model.Spec
    N: int
    span: int  # stream length (next-char) or 0 (cloze)
    decay_mask: np.ndarray | None
    dtype: np.dtype


@dataclass
class RunSummary:
    run_dir: Path
    objective: str
    steps: int
    chars_seen: int
    elapsed_s: float
    chars_per_sec: float
    best_val_loss: float | None
    best_step: int | None
    last_checkpoint: Path
    best_checkpoint: Path | None
    interrupted: str | None = None  # the signal name when stopped early


def _noop(kind: str, record: dict) -> None:
    pass


# ---- setting up -------------------------------------------------------------------------------

def _context(cfg: Config, data: dataset.Dataset, run: runlog.RunDir, report: Report) -> tuple[Config, Context]:
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
    return cfg, Context(cfg, data, run, layout, spec, N, span, decay, dtype)


def _fresh_state(ctx: Context, init_params: dict | None = None) -> TrainState:
    cfg = ctx.cfg
    rng = np.random.default_rng(cfg.seed)
    params = init_params or model.init_params(ctx.spec, rng, ctx.dtype, cfg.model.init_scale)
    theta = ctx.layout.flatten(params, ctx.dtype)
    return TrainState(theta, ctx.layout.views(theta), optim.init_state(cfg.train.optimizer, ctx.layout.size, ctx.dtype), rng, None)


def _is_below(v, bound: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < bound


def _is_pcg64_state(v) -> bool:
    """The form numpy's PCG64 reports as bit_generator.state, every number in its range."""
    inner = v.get("state") if isinstance(v, dict) else None
    return (isinstance(inner, dict) and set(v) == {"bit_generator", "state", "has_uint32", "uinteger"}
            and v["bit_generator"] == "PCG64" and set(inner) == {"state", "inc"}
            and _is_below(inner["state"], 2**128) and _is_below(inner["inc"], 2**128)
            and _is_below(v["has_uint32"], 2) and _is_below(v["uinteger"], 2**32))


# everything --resume takes from the metadata (checkpoint.load has checked the fields every command
# reads, where present); all of it must be there, in range
RESUME_FIELDS = {
    **{k: checkpoint.COUNT for k in ("step", "updates", "pos", "chars_seen", "skips")},
    "best_val_loss": checkpoint.nullable(checkpoint.REAL), "best_step": checkpoint.nullable(checkpoint.COUNT),
    "last_finite_loss": checkpoint.nullable(checkpoint.REAL), "elapsed_s": checkpoint.SECONDS,
    "rng": checkpoint.Field(_is_pcg64_state, "a numpy PCG64 random generator state"),
    "acc": checkpoint.accumulator(("steps", "chars", "clipped", "finite"), ("loss_sum", "norm_max")),
    "eval_acc": checkpoint.accumulator(("steps", "clipped", "finite"), ("norm_sum", "norm_max")),
}


def _check_training_meta(ck: checkpoint.Checkpoint, ctx: Context) -> None:
    """Everything --resume takes from the metadata and hidden state, before any of it is used."""
    meta = {"acc": {}, "eval_acc": {}, **ck.meta}  # the accumulators may be absent (empty)
    bad = checkpoint.invalid_fields(meta, RESUME_FIELDS, required=True)
    bad += [f"state/{d} has the wrong shape" for d, layers in ck.state.items()
            if d not in ctx.spec.dirs or len(layers) != ctx.spec.L or any(a.shape != (ctx.N, ctx.spec.state_size) for a in layers)]
    if bad:
        shown = "; ".join(bad[:3]) + (f"; {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{ck.path}: its training state is missing or invalid ({shown}), so the run cannot be "
                              f"resumed from it; start a new run from its weights with --init-from {ck.path}")


def _restore_state(ctx: Context, ck: checkpoint.Checkpoint) -> TrainState:
    meta = ck.meta
    _check_training_meta(ck, ctx)
    state = _fresh_state(ctx, ck.params)
    for slot, flat in state.opt.items():
        if slot not in ck.optim:
            raise CheckpointError(f"{ck.path}: missing optimizer state optim/{slot}; cannot resume exactly")
        flat[:] = ctx.layout.flatten(ck.optim[slot], ctx.dtype)
    try:
        state.rng.bit_generator.state = meta["rng"]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{ck.path}: its random generator state is invalid, so the run cannot be resumed "
                              f"exactly; start a new run from its weights with --init-from {ck.path}") from None
    state.h = ck.state or None
    for key in ("step", "updates", "pos", "chars_seen", "best_val_loss", "best_step", "skips", "last_finite_loss"):
        setattr(state, key, meta[key])
    state.elapsed_before, state.acc = meta["elapsed_s"], dict(meta.get("acc", {}))
    # throughput counts this session only: the interval's clock restarts at resume
    state.acc.pop("chars", None)
    state.eval_acc = dict(meta.get("eval_acc", {}))
    return state


def _meta(ctx: Context, state: TrainState, elapsed: float) -> dict:
    return {"objective": ctx.spec.objective, **ctx.data.vocab.to_json(), "config": config.to_dict(ctx.cfg),
            "step": state.step, "best_val_loss": state.best_val_loss, "best_step": state.best_step,
            "updates": state.updates, "pos": state.pos, "chars_seen": state.chars_seen, "skips": state.skips,
            "last_finite_loss": state.last_finite_loss, "rng": state.rng.bit_generator.state,
            "elapsed_s": elapsed, "acc": state.acc, "eval_acc": state.eval_acc, "corpus_sha256": ctx.data.sha256,
            "charrnn_version": __version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def check_resume_config(old: Config, new: Config) -> Config:
    """new, if it differs from the run's own config only in run-length and logging keys."""
    refused = [k for k in config.all_keys() if config.get(old, k) != config.get(new, k) and k not in RESUMABLE_KEYS]
    if refused:
        k = refused[0]
        raise ConfigError(f"config error (--set): --resume cannot change {k} (the run has {config.get(old, k)!r}, "
                          f"asked for {config.get(new, k)!r}); only {', '.join(RESUMABLE_KEYS)} may change. "
                          "Start a new run, or use --init-from to start from its weights")
    return new


# ---- one step ---------------------------------------------------------------------------------

def _batch(ctx: Context, state: TrainState):
    T = ctx.cfg.train.seq_len
    if state.step % dataset.release_every(ctx.N, T) == 0:  # keep RSS independent of the corpus size
        dataset.release_pages(ctx.data.train)
    if ctx.spec.bidirectional:
        return batches.random_windows(ctx.data.train, ctx.N, T, state.rng), None
    x, y, state.pos, wrapped = batches.stream_window(ctx.data.train, ctx.N, ctx.span, T, state.pos)
    if wrapped:
        state.h = None
    return x, y


def train_step(ctx: Context, state: TrainState) -> dict:
    """One optimizer step; returns its numbers. A non-finite loss or gradient applies no update.

    All or nothing: an exception inside the step (MemoryError; Ctrl-C when called as a library)
    leaves the state as it was before it, so the checkpoint written next resumes exactly.
    """
    undo = (state.pos, state.h, state.rng.bit_generator.state)
    try:
        return _step(ctx, state)
    except BaseException:
        state.pos, state.h = undo[:2]
        state.rng.bit_generator.state = undo[2]
        raise


def _step(ctx: Context, state: TrainState) -> dict:
    cfg = ctx.cfg.train
    x, y = _batch(ctx, state)
    masks = model.dropout_masks(ctx.spec, ctx.N, cfg.seq_len, ctx.cfg.model.dropout, state.rng, ctx.dtype)
    with np.errstate(all="ignore"):  # overflow shows up as a non-finite loss or norm, checked below
        result = model.loss_and_grads(ctx.spec, state.params, x, y, state.h, masks)
        g = ctx.layout.flatten(result.grads, ctx.dtype)
        norm, clipped = optim.clip(g, cfg.clip_norm, cfg.clip_value)
    lr = optim.lr_at(state.step, cfg)
    finite = math.isfinite(result.loss) and math.isfinite(norm)
    overflow = False
    if finite:
        applied = _update(ctx, state, g, lr)
        if applied:
            state.updates += 1
            state.h = None if ctx.spec.bidirectional else result.h_last
            state.last_finite_loss = result.loss
        else:  # finite gradient, but the step would overflow the parameters: rejected the same way
            finite, overflow = False, True
    state.step += 1
    state.chars_seen += x.size
    return {"loss": result.loss, "grad_norm": norm, "clipped": clipped, "lr": lr, "finite": finite, "overflow": overflow}


def _update(ctx: Context, state: TrainState, g: np.ndarray, lr: float) -> bool:
    """optim.update, all or nothing: if the new parameters or the new optimizer state are not
    finite, both are put back as they were. (optim.update advances the optimizer state in place,
    and Adam's or Adagrad's g*g can overflow to Inf while the parameters stay finite.) The copies
    cost well under 1% of a step."""
    saved = state.backup or {key: np.empty_like(a) for key, a in (("theta", state.theta), *state.opt.items())}
    state.backup = saved
    np.copyto(saved["theta"], state.theta)
    for slot, flat in state.opt.items():
        np.copyto(saved[slot], flat)
    try:
        with np.errstate(all="ignore"):
            applied = optim.update(state.theta, g, state.opt, state.updates + 1, lr, ctx.cfg.train, ctx.decay_mask)
        if applied and all(np.isfinite(flat).all() for flat in state.opt.values()):
            return True
    except BaseException:
        _restore(state, saved)
        raise
    _restore(state, saved)
    return False


def _restore(state: TrainState, saved: dict) -> None:
    np.copyto(state.theta, saved["theta"])
    for slot, flat in state.opt.items():
        np.copyto(flat, saved[slot])


def _nonfinite(ctx: Context, state: TrainState, out: dict) -> None:
    cfg = ctx.cfg.train
    last = f"{state.last_finite_loss:.4f}" if state.last_finite_loss is not None else "none yet"
    # state.step already counts this step; its loss was computed at step - 1 (the first is step 0)
    kind = "parameters (the update overflowed)" if out["overflow"] else "loss" if not math.isfinite(out["loss"]) else "gradient"
    what = f"non-finite {kind} at step {state.step - 1}"
    if cfg.on_nonfinite == "skip":
        state.skips += 1
        if state.skips <= cfg.max_skips:
            return
        raise TrainingError(f"{what}: {state.skips} batches skipped, more than train.max_skips={cfg.max_skips}; "
                            f"last finite loss {last}. Lower train.lr or set train.clip_norm (e.g. 1){_restart(ctx)}")
    raise TrainingError(f"{what} (update not applied; last finite loss {last}). Lower train.lr (now {cfg.lr}), "
                        f"set train.clip_norm (now {cfg.clip_norm or 'off'}), or use --set train.on_nonfinite=skip"
                        f"{_restart(ctx)}")


def _restart(ctx: Context) -> str:
    """How to go on with other settings: --resume keeps the optimizer settings, --init-from does not."""
    return (f"; to keep the weights so far, start a new run with --init-from {ctx.run.last} "
            "and the new settings")


# ---- logging, evaluation, checkpoints -----------------------------------------------------------

def _accumulate(state: TrainState, out: dict, chars: int) -> None:
    a = state.acc
    a["steps"] = a.get("steps", 0) + 1
    a["chars"] = a.get("chars", 0) + chars
    a["clipped"] = a.get("clipped", 0) + int(out["clipped"])
    if out["finite"]:
        a["loss_sum"] = a.get("loss_sum", 0.0) + out["loss"]
        a["finite"] = a.get("finite", 0) + 1
        a["norm_max"] = max(a.get("norm_max", 0.0), out["grad_norm"])
    e = state.eval_acc  # the same, over the steps since the last evaluation (diagnose.grad_health)
    e["steps"] = e.get("steps", 0) + 1
    e["clipped"] = e.get("clipped", 0) + int(out["clipped"])
    if out["finite"]:
        e["finite"] = e.get("finite", 0) + 1
        e["norm_sum"] = e.get("norm_sum", 0.0) + out["grad_norm"]
        e["norm_max"] = max(e.get("norm_max", 0.0), out["grad_norm"])


def _log_record(ctx: Context, state: TrainState, out: dict, seconds: float, elapsed: float) -> dict:
    a, state.acc = state.acc, {}
    return {"step": state.step, "epoch": state.chars_seen / len(ctx.data.train), "chars_seen": state.chars_seen,
            "train_loss": a["loss_sum"] / a["finite"] if a.get("finite") else None,
            "lr": out["lr"], "grad_norm": out["grad_norm"] if math.isfinite(out["grad_norm"]) else None,
            "grad_norm_max": a.get("norm_max"), "clipped": out["clipped"], "clip_frac": a["clipped"] / a["steps"],
            "skips": state.skips, "chars_per_sec": a["chars"] / seconds if seconds > 0 else None, "elapsed_s": elapsed}


def _save(ctx: Context, state: TrainState, path: Path, elapsed: float) -> None:
    try:
        checkpoint.save(path, state.params, _meta(ctx, state, elapsed),
                        {slot: ctx.layout.views(flat) for slot, flat in state.opt.items()}, state.h)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; {path.name} was not changed. "
                              f"Free some space (or fix the permissions), then continue with: "
                              f"charrnn train --resume {ctx.run.root}") from None


def _evaluate(ctx: Context, state: TrainState, report: Report) -> tuple[dict, bool]:
    """Validation loss (and a sample for next-char models); whether it is the best so far."""
    val = ctx.data.val
    if ctx.cfg.train.eval_chars:
        val = val[: ctx.cfg.train.eval_chars + 1]
    res = evaluate.evaluate_ids(ctx.spec, state.params, val, ctx.cfg.train.seq_len)
    record = {"val_loss": res.loss, "val_bpc": res.bpc, **diagnose.grad_health(ctx.spec, state.params, state.eval_acc)}
    state.eval_acc = {}
    improved = state.best_val_loss is None or res.loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_step = res.loss, state.step
    if not ctx.spec.bidirectional and ctx.cfg.train.sample_chars:
        text = sample_text(ctx.spec, state.params, ctx.data.vocab, ctx.cfg.train.sample_chars,
                           np.random.default_rng([ctx.cfg.seed, state.step]), knobs=Knobs(temperature=0.8))
        try:
            runlog.write_text(ctx.run.sample_file(state.step), text)
        except OSError as e:
            report("warning", {"message": f"cannot write sample {ctx.run.sample_file(state.step)}: {e.strerror}"})
        report("sample", {"step": state.step, "text": text})
    return record, improved


def _after_step(ctx: Context, state: TrainState, out: dict, clock: dict, report: Report) -> None:
    """Log, evaluate and checkpoint when their intervals come round."""
    cfg, step = ctx.cfg.train, state.step
    now = time.perf_counter()
    elapsed = state.elapsed_before + now - clock["start"]
    at_end = step == cfg.max_steps
    do_eval = ctx.data.val is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or at_end)
    improved = False
    if step % cfg.log_every == 0 or do_eval or at_end:
        record = _log_record(ctx, state, out, now - clock["interval"], elapsed)
        clock["interval"] = now
        if do_eval:
            evaluation, improved = _evaluate(ctx, state, report)
            record.update(evaluation)
            clock["interval"] = time.perf_counter()  # evaluation time is not training throughput
        try:
            runlog.append_metrics(ctx.run, record)
        except OSError as e:
            raise CheckpointError(f"cannot append to {ctx.run.metrics}: {e.strerror or e}; checkpoints so far are intact. "
                                  f"Free some space (or fix the permissions), then continue with: "
                                  f"charrnn train --resume {ctx.run.root}") from None
        report("log", record)
    # checkpoints come last, so a checkpoint of step s implies that step s's metrics and sample are on disk
    if improved:
        _save(ctx, state, ctx.run.best, elapsed)
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not at_end:
        _save(ctx, state, ctx.run.last, elapsed)
        if cfg.keep_last:
            _save(ctx, state, ctx.run.periodic(step), elapsed)
            try:
                runlog.prune_periodic(ctx.run, cfg.keep_last)
            except OSError as e:
                report("warning", {"message": f"cannot delete old periodic checkpoints in {ctx.run.checkpoints}: "
                                              f"{e.strerror or e}; they are kept"})


# ---- the run ----------------------------------------------------------------------------------

def newest_checkpoint(run: runlog.RunDir) -> checkpoint.Checkpoint | None:
    """The checkpoint --resume continues from: last.npz, or best.npz when that is newer (a run
    killed after an evaluation improved but before its next last.npz). None if the run has no
    checkpoint at all (it was killed before its first one)."""
    last = best = None
    if checkpoint.present(run.last):  # a directory or a dangling link there is named as such
        try:
            last = checkpoint.load(run.last)
        except CheckpointError as e:
            others = sorted(p.name for p in run.checkpoints.glob("*.npz") if p != run.last)
            hint = f"; to resume from another checkpoint ({', '.join(others)}), copy it over {run.last}" if others else ""
            raise CheckpointError(f"{e}{hint}") from None
    if run.best.exists() or run.best.is_symlink():
        try:
            step, last_step = checkpoint.read_meta(run.best).get("step"), last and last.meta.get("step")
            newer = last is None or (isinstance(step, int) and isinstance(last_step, int) and step > last_step)
            best = checkpoint.load(run.best) if newer else None
        except CheckpointError:
            if last is None:
                raise
    return best if best is not None else last


def _nothing_to_resume(run: runlog.RunDir) -> CheckpointError:
    """Why a directory without a checkpoint cannot be resumed: it is none, never was a run, or is a
    run stopped before its first checkpoint (what create() makes: checkpoints/, samples/ and an
    empty metrics.jsonl; .lock and temporary files say nothing, --resume itself makes a .lock)."""
    root = run.root
    if not root.is_dir():
        return CheckpointError(f"cannot resume {root}: no such run directory; start a run with: "
                               f"charrnn train -c CONFIG --run-dir {root}")
    if not any(os.path.lexists(p) for p in (run.config, run.metrics, run.checkpoints, run.samples)):
        if runlog.unused(run):
            return CheckpointError(f"cannot resume {root}: it is an empty directory, not a charrnn run directory; "
                                   f"start a run in it with: charrnn train -c CONFIG --run-dir {root}")
        return CheckpointError(f"cannot resume {root}: it is not a charrnn run directory (no config.yaml, metrics.jsonl "
                               "or checkpoints/last.npz in it); start a run with: charrnn train -c CONFIG (or --run-dir NEW_DIR)")
    if runlog.unused(run):
        return CheckpointError(f"cannot resume {root}: the run stopped before it saved its first checkpoint, so there "
                               "is nothing to continue; start it again with the same command (that --run-dir is reused)")
    return CheckpointError(f"cannot resume {root}: no checkpoints/last.npz there")


def resume_config(run_dir: str | Path, sets: list[str] | tuple = ()) -> Config:
    """The config of an existing run with --set overrides of run-length and logging keys only."""
    run = runlog.RunDir(run_dir)
    ck = newest_checkpoint(run)
    if ck is None:
        raise _nothing_to_resume(run)
    old = config.from_dict(ck.meta["config"], str(ck.path))
    new = config.build([("--set", dict(config.parse_set(s) for s in sets))], base=old)
    return check_resume_config(old, new)


@contextmanager
def _writing(path: Path, again: str = "run the same command again"):
    """OSError while writing a run's files -> a one-line RunDirError naming the file and the fix."""
    try:
        yield
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {e.strerror or e}; free some space (or fix the permissions) "
                          f"and {again}") from None


def _start(cfg: Config, run: runlog.RunDir, resume: bool, init_from: str | None, report: Report):
    data = dataset.load(cfg.data)
    if resume:
        return _resume(cfg, run, data, report)
    init = None
    if init_from:
        init = _init_weights(init_from, cfg, data)
    # everything that can refuse the run comes before the directory is made, so a refusal leaves nothing behind
    cfg, ctx = _context(cfg, data, run, report)
    if (run.root / ".lock").exists():
        runlog.lock(run)  # "in use by another process" is the better message than "already exists"
    runlog.create(run)
    if run._lock_fd is None:
        runlog.lock(run)
    state = _fresh_state(ctx, init)
    with _writing(run.root):
        runlog.remove_temp_files(run)  # left by a start that was killed in this (unused) directory
    # last.npz first, config.yaml second: from the moment the directory holds anything but the
    # skeleton create() makes, it holds a checkpoint that --resume can continue from
    with _writing(run.last):
        checkpoint.save(run.last, state.params, _meta(ctx, state, 0.0),
                        {slot: ctx.layout.views(flat) for slot, flat in state.opt.items()}, state.h)
    with _writing(run.config, f"continue with: charrnn train --resume {run.root}"):
        runlog.write_text(run.config, config.dump_yaml(cfg))
    return ctx, state


def _resume(cfg: Config, run: runlog.RunDir, data: dataset.Dataset, report: Report):
    runlog.lock(run)
    again = f"continue with: charrnn train --resume {run.root}"
    with _writing(run.root, again):
        runlog.clear_failed(run)
        runlog.remove_temp_files(run)  # left by writes that a kill interrupted; nobody else writes here (locked)
    ck = newest_checkpoint(run)
    if ck is None:
        raise _nothing_to_resume(run)
    if ck.path != run.last:
        report("warning", {"message": f"resuming from {ck.path.name} (step {ck.meta['step']}), which is newer than last.npz"})
    if ck.meta.get("corpus_sha256") != data.sha256 or _vocab_of(ck.meta) != data.vocab.to_json():
        raise DataError(f"the corpus {data.source} changed since run {run.root} started; resume needs the same "
                        "corpus (use --init-from to start a new run from its weights)")
    cfg, ctx = _context(cfg, data, run, report)
    state = _restore_state(ctx, ck)
    with _writing(run.metrics, again):
        runlog.truncate_metrics(run, state.step)  # drops records after the checkpoint, and a torn last line
    with _writing(run.config, again):
        runlog.write_text(run.config, config.dump_yaml(cfg))  # --set may have changed run-length keys
    return ctx, state


def _vocab_of(meta: dict) -> dict:
    """The vocabulary part of checkpoint metadata, comparable with Vocab.to_json()."""
    return {"vocab": meta.get("vocab"), "unk": meta.get("unk")}


def _init_weights(path: str, cfg: Config, data: dataset.Dataset) -> dict:
    ck = checkpoint.load(path, with_training_state=False)
    if _vocab_of(ck.meta) != data.vocab.to_json():
        theirs = set(ck.meta["vocab"])
        missing = "".join(c for c in data.vocab.chars if c not in theirs)
        raise DataError(f"--init-from {path}: its vocabulary does not match the corpus"
                        + (f"; characters the checkpoint does not know: {missing[:40]!r}" if missing else
                           f" (it has {len(theirs)} characters, the corpus {len(data.vocab)})"))
    spec = ck.spec
    want = (cfg.model.cell, cfg.model.hidden_size, cfg.model.num_layers, cfg.model.bidirectional)
    if (spec.cell, spec.H, spec.L, spec.bidirectional) != want:
        raise ConfigError(f"--init-from {path}: checkpoint model is cell={spec.cell}, hidden_size={spec.H}, "
                          f"num_layers={spec.L}, bidirectional={spec.bidirectional}, config asks for "
                          f"{', '.join(map(str, want))}; set the model keys to match")
    return {k: v.astype(cfg.train.dtype) for k, v in ck.params.items()}


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, init_from: str | None = None,
          report: Report = _noop, stop: Callable[[], str | None] = lambda: None) -> RunSummary:
    """Train (or continue) a run in run_dir until train.max_steps or until stop() names a reason."""
    heap.keep_freed_memory()  # steps reuse the previous step's pages (heap.py: 4-6 ms a W1 step)
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


def _loop(ctx: Context, state: TrainState, report: Report, stop) -> RunSummary:
    cfg = ctx.cfg.train
    report("start", {"run_dir": str(ctx.run.root), "objective": ctx.spec.objective, "vocab": ctx.spec.V,
                     "params": ctx.layout.size, "train_chars": len(ctx.data.train), "batch_size": ctx.N,
                     "val_chars": 0 if ctx.data.val is None else len(ctx.data.val), "step": state.step,
                     "max_steps": cfg.max_steps, "cached": ctx.data.reused})
    t0 = time.perf_counter()
    clock = {"start": t0, "interval": t0}
    elapsed = lambda: state.elapsed_before + time.perf_counter() - t0  # noqa: E731
    reason, start_chars = None, state.chars_seen
    try:
        while state.step < cfg.max_steps:
            chars = ctx.N * cfg.seq_len
            out = train_step(ctx, state)
            if not out["finite"]:
                _nonfinite(ctx, state, out)
            _accumulate(state, out, chars)
            if state.step == 1:
                report("step0", {"loss": out["loss"], "ln_v": math.log(ctx.spec.V)})
            report("step", out)
            _after_step(ctx, state, out, clock, report)
            reason = stop()
            if reason:
                break
    except CheckpointError:
        raise  # a write failed: the previous checkpoint is intact, do not try again
    except BaseException:
        try:  # the state is finite and consistent (train_step is all or nothing): keep the work
            _save(ctx, state, ctx.run.last, elapsed())
        except CheckpointError:
            pass  # last.npz stays the previous complete checkpoint; the error being raised is the news
        raise
    _save(ctx, state, ctx.run.last, elapsed())
    seconds = time.perf_counter() - t0
    return RunSummary(ctx.run.root, ctx.spec.objective, state.step, state.chars_seen, elapsed(),
                      (state.chars_seen - start_chars) / seconds if seconds > 0 else 0.0, state.best_val_loss,
                      state.best_step, ctx.run.last, ctx.run.best if ctx.run.best.exists() else None, reason)
