"""The runs table: every run under runs/ (or another directory), how far it got, which is best.

Everything is derived from the files a run directory already holds (runlog.py):
    state       running      its .lock is flock-ed by a live process (the kernel drops the lock
                             when the process dies, so a killed run never looks like it is running)
                failed       failed.txt exists (training raised), or there is no readable last.npz
                finished     last.npz is at train.max_steps
                interrupted  last.npz is before train.max_steps (stopped by a signal; --resume it)
    progress    the newest of last.npz's meta and metrics.jsonl's last complete record
    best        the lowest val_bpc in metrics.jsonl, else the checkpoint's best_val_loss
Reading is cheap: only a checkpoint's meta entry is read, never its arrays.
"""
from __future__ import annotations

import errno
import fcntl
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from charrnn import cells, checkpoint, runlog
from charrnn.errors import CheckpointError, RunDirError
from charrnn.model import make_spec, param_shapes


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
        fd = os.open(run.root / ".lock", os.O_RDONLY)
    except OSError:
        return False  # never locked (or unreadable): nobody is training here
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
    return path.is_dir() and any((path / f).exists() for f in ("config.yaml", "metrics.jsonl", "checkpoints"))


def _config_yaml(run: runlog.RunDir) -> dict:
    try:
        doc = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _best(records: list[dict], meta: dict | None) -> tuple[float | None, int | None]:
    evals = [r for r in records if isinstance(r.get("val_bpc"), (int, float))]
    if evals:
        best = min(evals, key=lambda r: r["val_bpc"])  # min keeps the earliest of equal values
        return best["val_bpc"], best.get("step")
    if meta and meta.get("best_val_loss") is not None:
        return meta["best_val_loss"] / math.log(2), meta.get("best_step")
    return None, None


def _model(cfg: dict, meta: dict | None) -> dict:
    m = cfg.get("model") or {}
    H, L, bidir = m.get("hidden_size"), m.get("num_layers"), bool(m.get("bidirectional"))
    cell = m.get("cell", "rnn")  # format-1 runs predate the key: vanilla cells
    kind = None if H is None else "bidirectional" if bidir else "stacked" if (L or 1) > 1 else "vanilla"
    params = None
    if meta and H and L and cell in cells.NAMES and isinstance(meta.get("vocab"), (list, str)):
        spec = make_spec(len(meta["vocab"]), int(H), int(L), bidir, cell)
        params = sum(math.prod(s) for s in param_shapes(spec).values())
    return {"kind": kind, "cell": cell if H is not None else None, "layers": L, "hidden": H, "params": params,
            "objective": None if H is None else "cloze" if bidir else "next-char"}


def _state(run: runlog.RunDir, meta: dict | None, max_steps: int | None) -> str:
    if is_running(run):
        return "running"
    if run.failed.exists() or meta is None:
        return "failed"
    if max_steps is not None and meta.get("step", 0) >= max_steps:
        return "finished"
    return "interrupted"


def run_info(root: str | Path) -> RunInfo:
    """One row of the runs table for the run directory root."""
    run = runlog.RunDir(root)
    records = runlog.read_metrics(run.metrics)
    meta, error = None, None
    try:
        meta = checkpoint.read_meta(run.last)
    except CheckpointError as e:
        error = str(e)
    cfg = (meta or {}).get("config") or _config_yaml(run)
    max_steps = (cfg.get("train") or {}).get("max_steps")
    last = records[-1] if records else {}
    steps = max((meta or {}).get("step", 0), last.get("step", 0))
    speeds = [r["chars_per_sec"] for r in records if r.get("chars_per_sec") is not None]
    best, best_step = _best(records, meta)
    state = _state(run, meta, max_steps)
    if run.failed.exists():
        error = run.failed.read_text(encoding="utf-8", errors="replace").strip()
    return RunInfo(run.root.name, str(run.root), **_model(cfg, meta), steps=steps, max_steps=max_steps,
                   chars_seen=last.get("chars_seen", (meta or {}).get("chars_seen")), best_val_bpc=best,
                   best_step=best_step, chars_per_sec=speeds[-1] if speeds else None,
                   elapsed_s=last.get("elapsed_s", (meta or {}).get("elapsed_s")), state=state,
                   error=error if state == "failed" else None)


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
