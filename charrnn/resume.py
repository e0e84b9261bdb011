"""What a checkpoint holds of a training run, and continuing from it.

A checkpoint written during training holds everything resuming needs (the parameters, optimizer
state, carried hidden state and, in its metadata, the counters, the random generator and the
interval sums), so a resumed run continues bit for bit. Here: writing that metadata, finding the
checkpoint to continue from, checking all of it before any of it is used, restoring the
TrainState, which config keys a resumed run may change, and the weights a new run starts from
(init_from).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from charrnn import __version__, checkpoint, config, dataset, runlog
from charrnn.config import Config
from charrnn.errors import CheckpointError, ConfigError, DataError, option
from charrnn.trainer import Context, GradSums, IntervalSums, TrainState, fresh_state

# keys a resumed run may change; everything else must match the run's config
RESUMABLE_KEYS = ("train.max_steps", "train.eval_every", "train.eval_chars", "train.log_every",
                  "train.checkpoint_every", "train.keep_last", "train.sample_chars",
                  "train.on_nonfinite", "train.max_skips", "train.threads", "data.cache_dir", "name")


def _is_below(v, bound: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < bound


def _is_pcg64_state(v) -> bool:
    """The form numpy's PCG64 reports as bit_generator.state, every number in its range."""
    inner = v.get("state") if isinstance(v, dict) else None
    return (isinstance(inner, dict) and set(v) == {"bit_generator", "state", "has_uint32", "uinteger"}
            and v["bit_generator"] == "PCG64" and set(inner) == {"state", "inc"}
            and _is_below(inner["state"], 2**128) and _is_below(inner["inc"], 2**128)
            and _is_below(v["has_uint32"], 2) and _is_below(v["uinteger"], 2**32))


# everything resuming takes from the metadata (checkpoint.load has checked the fields every
# command reads, where present); all of it must be there, in range
RESUME_FIELDS = {
    **{k: checkpoint.COUNT for k in ("step", "updates", "pos", "chars_seen", "skips")},
    "best_val_loss": checkpoint.nullable(checkpoint.REAL), "best_step": checkpoint.nullable(checkpoint.COUNT),
    "last_finite_loss": checkpoint.nullable(checkpoint.REAL), "elapsed_s": checkpoint.SECONDS,
    "rng": checkpoint.Field(_is_pcg64_state, "a numpy PCG64 random generator state"),
    "acc": checkpoint.accumulator(("steps", "chars", "clipped", "finite"), ("loss_sum", "norm_max")),
    "eval_acc": checkpoint.accumulator(("steps", "clipped", "finite"), ("norm_sum", "norm_max")),
}
_COUNTERS = ("step", "updates", "pos", "chars_seen", "best_val_loss", "best_step", "skips", "last_finite_loss")


# ---- writing ------------------------------------------------------------------------------------

def training_meta(ctx: Context, state: TrainState, elapsed: float) -> dict:
    """The checkpoint metadata of state: the interval sums as JSON mappings ("acc", "eval_acc")."""
    return {"objective": ctx.spec.objective, **ctx.data.vocab.to_json(), "config": config.to_dict(ctx.cfg),
            "step": state.step, "best_val_loss": state.best_val_loss, "best_step": state.best_step,
            "updates": state.updates, "pos": state.pos, "chars_seen": state.chars_seen, "skips": state.skips,
            "last_finite_loss": state.last_finite_loss, "rng": state.rng.bit_generator.state,
            "elapsed_s": elapsed, "acc": state.acc.to_json(), "eval_acc": state.eval_acc.to_json(),
            "corpus_sha256": ctx.data.sha256,
            "charrnn_version": __version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write(ctx: Context, state: TrainState, path: Path, elapsed: float, h: dict | None = None) -> None:
    """Write state to the checkpoint at path (OSError when the file system refuses); h: the
    carried state of all N streams (default state.h: one process holds them all)."""
    checkpoint.save(path, state.params, training_meta(ctx, state, elapsed),
                    {slot: ctx.layout.views(flat) for slot, flat in state.opt.items()}, state.h if h is None else h)


def full_state(ctx: Context, state: TrainState) -> dict | None:
    """The carried state of all N streams: with several processes each holds its rows, gathered
    here on rank 0 (None elsewhere), so the checkpoint is the one a single process writes.
    Collective: every rank calls it at the same step."""
    if state.h is None or ctx.comm.size == 1:
        return state.h
    full = {d: [ctx.comm.gather_rows(a) for a in layers] for d, layers in state.h.items()}
    return full if ctx.comm.rank == 0 else None


def save(ctx: Context, state: TrainState, path: Path, elapsed: float) -> None:
    """write(), with a failure as a one-line CheckpointError (the file keeps its previous content).
    With several processes every rank calls it; rank 0 writes, and its failure is raised on all."""
    h = full_state(ctx, state)
    ctx.comm.root_does(lambda: _save(ctx, state, path, elapsed, h))


def _save(ctx: Context, state: TrainState, path: Path, elapsed: float, h: dict | None) -> None:
    try:
        write(ctx, state, path, elapsed, h)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; {path.name} was not changed. "
                              f"Free some space (or fix the permissions), then continue with "
                              f"{option('resume', ctx.run.root)}") from None


# ---- reading ------------------------------------------------------------------------------------

def newest_checkpoint(run: runlog.RunDir) -> checkpoint.Checkpoint | None:
    """The checkpoint resuming continues from: last.npz, or best.npz when that is newer (a run
    killed after an evaluation improved but before its next last.npz). None if the run has no
    checkpoint at all (it was killed before its first one)."""
    last = best = None
    if checkpoint.present(run.last):  # a directory or a dangling link there is named as such
        try:
            last = checkpoint.load(run.last)
        except CheckpointError as e:
            others = sorted(p.name for p in run.checkpoints.glob("*.npz") if p != run.last)
            hint = f"; to resume from another checkpoint ({', '.join(others)}), copy it over {run.last}" if others else ""
            raise CheckpointError(f"{e.args[0]}{hint}") from None  # args[0]: its option() marks unspelled
    if run.best.exists() or run.best.is_symlink():
        try:
            step, last_step = checkpoint.read_meta(run.best).get("step"), last and last.meta.get("step")
            newer = last is None or (isinstance(step, int) and isinstance(last_step, int) and step > last_step)
            best = checkpoint.load(run.best) if newer else None
        except CheckpointError:
            if last is None:
                raise
    return best if best is not None else last


def nothing_to_resume(run: runlog.RunDir) -> CheckpointError:
    """Why a directory without a checkpoint cannot be resumed: it is none, never was a run, or is a
    run stopped before its first checkpoint (what runlog.create makes: checkpoints/, samples/ and
    an empty metrics.jsonl; .lock and temporary files say nothing, resuming itself makes a .lock)."""
    root = run.root
    if not root.is_dir():
        return CheckpointError(f"cannot resume {root}: no such run directory; start a new run there with "
                               f"{option('run_dir', root)}")
    if not any(os.path.lexists(p) for p in (run.config, run.metrics, run.checkpoints, run.samples)):
        if runlog.unused(run):
            return CheckpointError(f"cannot resume {root}: it is an empty directory, not a charrnn run directory; "
                                   f"start a new run in it with {option('run_dir', root)}")
        return CheckpointError(f"cannot resume {root}: it is not a charrnn run directory (no config.yaml, metrics.jsonl "
                               f"or checkpoints/last.npz in it); start a new run in another directory "
                               f"({option('run_dir', 'NEW_DIR')})")
    if runlog.unused(run):
        return CheckpointError(f"cannot resume {root}: the run stopped before it saved its first checkpoint, so there "
                               f"is nothing to continue; start it again with the same command (a new run with "
                               f"{option('run_dir', root)} reuses the directory)")
    return CheckpointError(f"cannot resume {root}: no checkpoints/last.npz there")


def _check_training_meta(ck: checkpoint.Checkpoint, ctx: Context) -> None:
    """Everything resuming takes from the metadata and hidden state, before any of it is used."""
    meta = {"acc": {}, "eval_acc": {}, **ck.meta}  # the accumulators may be absent (empty)
    bad = checkpoint.invalid_fields(meta, RESUME_FIELDS, required=True)
    bad += [f"state/{d} has the wrong shape" for d, layers in ck.state.items()
            if d not in ctx.spec.dirs or len(layers) != ctx.spec.L
            or any(a.shape != (ctx.N, ctx.spec.state_size) for a in layers)]
    if bad:
        shown = "; ".join(bad[:3]) + (f"; {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{ck.path}: its training state is missing or invalid ({shown}), so the run cannot be "
                              f"resumed from it; start a new run from its weights with {option('init_from', ck.path)}")


def restore_state(ctx: Context, ck: checkpoint.Checkpoint) -> TrainState:
    """The TrainState ck was saved from, after checking all of it (CheckpointError)."""
    meta = ck.meta
    _check_training_meta(ck, ctx)
    state = fresh_state(ctx, ck.params)
    for slot, flat in state.opt.items():
        if slot not in ck.optim:
            raise CheckpointError(f"{ck.path}: missing optimizer state optim/{slot}; cannot resume exactly")
        flat[:] = ctx.layout.flatten(ck.optim[slot], ctx.dtype)
    try:
        state.rng.bit_generator.state = meta["rng"]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{ck.path}: its random generator state is invalid, so the run cannot be resumed "
                              f"exactly; start a new run from its weights with {option('init_from', ck.path)}") from None
    # this process's rows of the carried state (all of them with one process)
    state.h = {d: [a[ctx.rows] for a in layers] for d, layers in ck.state.items()} if ck.state else None
    for key in _COUNTERS:
        setattr(state, key, meta[key])
    state.elapsed_before = meta["elapsed_s"]
    # throughput counts this session only: the interval's character count restarts at resume
    state.acc = dataclasses.replace(IntervalSums.from_json(meta.get("acc", {})), chars=0)
    state.eval_acc = GradSums.from_json(meta.get("eval_acc", {}))
    return state


def check_same_corpus(ck: checkpoint.Checkpoint, data: dataset.Dataset, run: runlog.RunDir) -> None:
    """DataError unless data is the corpus (bytes and vocabulary) the run was trained on."""
    if ck.meta.get("corpus_sha256") != data.sha256 or vocab_of(ck.meta) != data.vocab.to_json():
        raise DataError(f"the corpus {data.source} changed since run {run.root} started; resuming needs the same "
                        f"corpus (start a new run from its weights with {option('init_from', ck.path)})")


# ---- config -------------------------------------------------------------------------------------

def check_resume_config(old: Config, new: Config) -> Config:
    """new, if it differs from the run's own config only in run-length and logging keys."""
    refused = [k for k in config.all_keys() if config.get(old, k) != config.get(new, k) and k not in RESUMABLE_KEYS]
    if refused:
        k = refused[0]
        raise ConfigError(f"config error ({config.SET_SOURCE}): {option('resume')} cannot change {k} (the run has "
                          f"{config.get(old, k)!r}, asked for {config.get(new, k)!r}); only "
                          f"{', '.join(RESUMABLE_KEYS)} may change. Start a new run, or use "
                          f"{option('init_from')} to start from its weights")
    return new


def resume_config(run_dir: str | Path, sets: list[str] | tuple = ()) -> Config:
    """The config of an existing run, with KEY=VALUE overrides (`sets`) of run-length and
    logging keys only (RESUMABLE_KEYS); ConfigError for any other key."""
    run = runlog.RunDir(run_dir)
    ck = newest_checkpoint(run)
    if ck is None:
        raise nothing_to_resume(run)
    old = config.from_dict(ck.meta["config"], str(ck.path))
    new = config.build([config.overrides(sets)], base=old)
    return check_resume_config(old, new)


# ---- a new run from a checkpoint's weights --------------------------------------------------------

def vocab_of(meta: dict) -> dict:
    """The vocabulary part of checkpoint metadata, comparable with Vocab.to_json()."""
    return {"vocab": meta.get("vocab"), "unk": meta.get("unk")}


def init_weights(path: str | Path, cfg: Config, data: dataset.Dataset) -> dict:
    """The parameters of the checkpoint at path, for a new run of cfg on data (init_from): its
    vocabulary and model shape must match (DataError, ConfigError)."""
    ck = checkpoint.load(path, with_training_state=False)
    if vocab_of(ck.meta) != data.vocab.to_json():
        theirs = set(ck.meta["vocab"])
        missing = "".join(c for c in data.vocab.chars if c not in theirs)
        raise DataError(f"{option('init_from', path)}: its vocabulary does not match the corpus"
                        + (f"; characters the checkpoint does not know: {missing[:40]!r}" if missing else
                           f" (it has {len(theirs)} characters, the corpus {len(data.vocab)})"))
    spec = ck.spec
    want = (cfg.model.cell, cfg.model.hidden_size, cfg.model.num_layers, cfg.model.bidirectional)
    if (spec.cell, spec.H, spec.L, spec.bidirectional) != want:
        raise ConfigError(f"{option('init_from', path)}: checkpoint model is cell={spec.cell}, hidden_size={spec.H}, "
                          f"num_layers={spec.L}, bidirectional={spec.bidirectional}, config asks for "
                          f"{', '.join(map(str, want))}; set the model keys to match")
    return {k: v.astype(cfg.train.dtype) for k, v in ck.params.items()}
