"""The runs table: every run under runs/ (or another directory), how far it got, which is best.

Everything is derived from the files a run directory already holds (runlog.py):
    state       running      its .lock is flock-ed by a live process (the kernel drops the lock
                             when the process dies, so a killed run never looks like it is running)
                failed       failed.txt exists (training raised), or there is no readable last.npz
                finished     last.npz is at train.max_steps
                interrupted  last.npz is before train.max_steps (stopped by a signal; --resume it)
    progress    the newest of last.npz's meta and metrics.jsonl's last complete record
    best        the lowest val_bpc in metrics.jsonl, else the checkpoint's best_val_loss
Reading is cheap: only a checkpoint's meta entry is read, never its arrays. Nothing is trusted:
files are read through atomic.py (never following a link, never blocking on a FIFO), and every
value is type-checked as it is read; what cannot be known shows as unknown ("-"), never a traceback.
"""
from __future__ import annotations

import errno
import fcntl
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from charrnn import atomic, cells, checkpoint, runlog
from charrnn.errors import CharRNNError, CheckpointError, RunDirError
from charrnn.model import make_spec, param_shapes

MAX_HIDDEN, MAX_LAYERS = 16384, 64  # config's own limits on model.hidden_size and model.num_layers
FAILED_MAX_BYTES = 64 << 10  # failed.txt holds one error message


@dataclass
class RunInfo:
    name: str
    path: str
    kind: str | None  # vanilla, stacked or bidirectional
    cell: str | None  # rnn, lstm or gru
    layers: int | None
    hidden: int | None
    params: int | None  # None when the vocabulary is unknown (no readable checkpoint)
    objective: str | None  # next-char or cloze
    steps: int
    max_steps: int | None
    chars_seen: int | None
    best_val_bpc: float | None
    best_step: int | None
    chars_per_sec: float | None  # training throughput in the last logged interval
    elapsed_s: float | None
    state: str  # running, finished, interrupted or failed
    error: str | None = None  # what failed.txt says, or why the checkpoint is unreadable

    def as_dict(self) -> dict:
        return asdict(self)


def is_running(run: runlog.RunDir) -> bool:
    """Whether a process holds the run's lock. Takes a shared lock for an instant to find out."""
    try:
        fd = atomic.open_file(run.lock_file, os.O_RDONLY)
    except (OSError, CharRNNError):
        return False  # never locked, unreadable, or not a regular file: no charrnn trains here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def looks_like_run(path: Path) -> bool:
    return path.is_dir() and any(os.path.lexists(path / f) for f in ("config.yaml", "metrics.jsonl", "checkpoints"))


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _records(run: runlog.RunDir) -> list[dict]:
    try:
        return runlog.read_metrics(run.metrics)
    except (OSError, CharRNNError):
        return []  # unreadable, or not a regular file: the rest of the row still tells something


def _meta(run: runlog.RunDir) -> tuple[dict | None, str | None]:
    """last.npz's metadata (None if unreadable) and why it is unreadable."""
    try:
        if not atomic.check_regular(run.last):  # never open a FIFO (it would block) or follow a link
            raise CheckpointError(f"{run.last}: no such checkpoint file")
        return checkpoint.read_meta(run.last), None
    except (CharRNNError, OSError) as e:
        return None, str(e)


def _failure(run: runlog.RunDir) -> str | None:
    """What failed.txt says; None if there is none."""
    if not os.path.lexists(run.failed):
        return None
    try:
        return atomic.read_bytes(run.failed, FAILED_MAX_BYTES).decode("utf-8", errors="replace").strip()
    except (OSError, CharRNNError) as e:
        return f"{run.failed} is unreadable: {getattr(e, 'strerror', None) or e}"


def _best(records: list[dict], meta: dict) -> tuple[float | None, int | None]:
    evals = [(bpc, r["step"]) for r in records if (bpc := runlog.as_real(r.get("val_bpc"))) is not None]
    if evals:
        return min(evals, key=lambda e: e[0])  # min keeps the earliest of equal values
    loss = runlog.as_real(meta.get("best_val_loss"))
    if loss is not None:
        return loss / math.log(2), runlog.as_count(meta.get("best_step"))
    return None, None


def _model(cfg: dict, meta: dict) -> dict:
    """Model columns from a config mapping whose values are as found (checked against config's limits)."""
    m = _mapping(cfg.get("model"))
    H = runlog.as_count(m.get("hidden_size"), 1, MAX_HIDDEN)
    L = runlog.as_count(m.get("num_layers", 1), 1, MAX_LAYERS)
    bidir = m.get("bidirectional") is True
    cell = m.get("cell", "rnn")  # format-1 runs predate the key: vanilla cells
    if H is None or L is None or cell not in cells.NAMES:
        return {"kind": None, "cell": None, "layers": None, "hidden": None, "params": None, "objective": None}
    vocab = meta.get("vocab")
    params = None
    if isinstance(vocab, (list, str)) and vocab:
        params = sum(math.prod(s) for s in param_shapes(make_spec(len(vocab), H, L, bidir, cell)).values())
    return {"kind": "bidirectional" if bidir else "stacked" if L > 1 else "vanilla", "cell": cell, "layers": L,
            "hidden": H, "params": params, "objective": "cloze" if bidir else "next-char"}


def _state(run: runlog.RunDir, meta: dict | None, failure: str | None, max_steps: int | None) -> str:
    if is_running(run):
        return "running"
    if failure is not None or meta is None:
        return "failed"
    if max_steps is not None and (runlog.as_count(meta.get("step")) or 0) >= max_steps:
        return "finished"
    return "interrupted"


def run_info(root: str | Path) -> RunInfo:
    """One row of the runs table for the run directory root. Every value comes from files that
    others may have written, so each is checked as it is read: a wrong one shows as unknown."""
    run = runlog.RunDir(root)
    records = _records(run)
    meta, error = _meta(run)
    known = meta or {}
    cfg = _mapping(known.get("config")) or runlog.read_config(run)
    max_steps = runlog.as_count(_mapping(cfg.get("train")).get("max_steps"))
    last = records[-1] if records else {}
    steps = max(runlog.as_count(known.get("step")) or 0, last.get("step", 0))
    speeds = [v for r in records if (v := runlog.as_real(r.get("chars_per_sec"))) is not None]
    chars = runlog.as_count(last.get("chars_seen", known.get("chars_seen")))
    elapsed = runlog.as_real(last.get("elapsed_s", known.get("elapsed_s")))
    best, best_step = _best(records, known)
    failure = _failure(run)
    state = _state(run, meta, failure, max_steps)
    return RunInfo(run.root.name, str(run.root), **_model(cfg, known), steps=steps, max_steps=max_steps,
                   chars_seen=chars, best_val_bpc=best, best_step=best_step,
                   chars_per_sec=speeds[-1] if speeds else None, elapsed_s=elapsed, state=state,
                   error=(failure or error) if state == "failed" else None)


def list_runs(base: str | Path = "runs") -> list[RunInfo]:
    """Every run under base (or base itself, if it is a run directory), best validation first."""
    base = Path(base)
    if not base.is_dir():
        raise RunDirError(f"{base}: no such directory (runs are created under runs/ by charrnn train)")
    dirs = [base] if looks_like_run(base) else sorted(p for p in base.iterdir() if looks_like_run(p))
    infos = [run_info(d) for d in dirs]
    return sorted(infos, key=lambda r: (r.best_val_bpc is None, r.best_val_bpc or 0.0, r.name))


# ---- text ----------------------------------------------------------------------------------------

def _si(n: float | None) -> str:
    """1234 -> 1.2k, 5600000 -> 5.6M."""
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def format_table(infos: list[RunInfo]) -> str:
    """The runs table, one line per run, aligned columns."""
    header = ("name", "model", "params", "objective", "steps", "chars", "best val bpc", "at step", "chars/s", "state")
    rows = [header]
    for r in infos:
        model = f"{r.cell} {r.layers}x{r.hidden}" + (" bidirectional" if r.kind == "bidirectional" else "") if r.kind else "-"
        steps = f"{r.steps}/{r.max_steps}" if r.max_steps is not None else str(r.steps)
        rows.append((r.name, model, _si(r.params), r.objective or "-", steps, _si(r.chars_seen),
                     "-" if r.best_val_bpc is None else f"{r.best_val_bpc:.4f}",
                     "-" if r.best_step is None else str(r.best_step), _si(r.chars_per_sec), r.state))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, 1, 3, 9}  # text columns are left-aligned, numbers right-aligned
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)
