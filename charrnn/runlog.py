"""Run directories: naming, locking, the metrics log, config and sample files.

    runs/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml          the resolved configuration
        metrics.jsonl        one JSON object per logged step
        checkpoints/         last.npz, best.npz, step-<n>.npz (the newest train.keep_last)
        samples/             step-<n>.txt, text sampled at each evaluation
        .lock                held (flock) by the process training in this directory
        failed.txt           the error that stopped training, if one did (removed on --resume)
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from pathlib import Path

from charrnn import atomic
from charrnn.errors import RunDirError, UsageError

PERIODIC = re.compile(r"^step-(\d+)\.npz$")
# .<name>.<random>.tmp of charrnn's own atomic writes (tempfile.mkstemp), left by a kill midway;
# only these names, so a user's own .tmp files are never taken for ours
TEMP = re.compile(r"^\.(config\.yaml|metrics\.jsonl|failed\.txt|last\.npz|best\.npz|step-\d+\.(npz|txt))\.[a-z0-9_]+\.tmp$")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.last = self.checkpoints / "last.npz"
        self.best = self.checkpoints / "best.npz"
        self.failed = self.root / "failed.txt"
        self._lock_fd: int | None = None

    def periodic(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}.npz"

    def sample_file(self, step: int) -> Path:
        return self.samples / f"step-{step:07d}.txt"


def default_run_dir(name: str, base: str | Path = "runs") -> Path:
    """runs/<name>-<timestamp>, with a -2, -3 ... suffix if that exists already."""
    stem = Path(base) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = stem, 2
    while path.exists():
        path, k = Path(f"{stem}-{k}"), k + 1
    return path


def unused(run: RunDir) -> bool:
    """Whether the directory holds nothing but what create() makes (and a start killed before its
    first checkpoint leaves): no config, no checkpoint, no metrics record. Such a directory is
    reused by a new run rather than refused."""
    for p in run.root.iterdir():
        if p.name == ".lock" or TEMP.match(p.name):
            continue
        if p.name == "metrics.jsonl" and p.is_file() and p.stat().st_size == 0:
            continue
        if p.name in ("checkpoints", "samples") and p.is_dir() and all(TEMP.match(q.name) for q in p.iterdir()):
            continue
        return False
    return True


def remove_temp_files(run: RunDir) -> None:
    """Delete the temporary files of interrupted atomic writes. Only while holding the lock."""
    for d in (run.root, run.checkpoints, run.samples):
        if d.is_dir():
            for p in d.iterdir():
                if TEMP.match(p.name) and p.is_file():
                    p.unlink(missing_ok=True)


def create(run: RunDir) -> None:
    """Make a new run directory; an existing one that holds a run is never reused without --resume."""
    if run.root.exists() and (not run.root.is_dir() or not unused(run)):
        raise UsageError(f"run directory {run.root} already exists; continue it with --resume {run.root} "
                         "or choose another --run-dir")
    try:
        for d in (run.root, run.checkpoints, run.samples):
            d.mkdir(parents=True, exist_ok=True)
        run.metrics.touch()
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run.root}: {e.strerror}") from None


def lock(run: RunDir) -> None:
    """Take the run's lock for the life of this process (released by the kernel if it dies)."""
    try:
        fd = os.open(run.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot lock run directory {run.root}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunDirError(f"run directory {run.root} is in use by another charrnn process; "
                              "wait for it to finish or stop it first") from None
        raise RunDirError(f"cannot lock run directory {run.root}: {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    run._lock_fd = fd


def unlock(run: RunDir) -> None:
    if run._lock_fd is not None:
        os.close(run._lock_fd)
        run._lock_fd = None


def mark_failed(run: RunDir, error: BaseException) -> None:
    """Record why training stopped with an error (for `charrnn runs`), in a run this process holds."""
    if run._lock_fd is None:
        return  # not our run (e.g. it was locked by another process): leave it alone
    try:
        write_text(run.failed, f"{type(error).__name__}: {error}\n")
    except OSError:
        pass  # never hide the error being reported behind a second one


def clear_failed(run: RunDir) -> None:
    run.failed.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic.write_bytes(path, text.encode("utf-8"))


# ---- metrics.jsonl --------------------------------------------------------------------------------

def append_metrics(run: RunDir, record: dict) -> None:
    """Append one line with a single write(), so a crash leaves at most one torn last line. A
    write that fails part way (ENOSPC after a short write) is cut back off: no torn line at all."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(run.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # the torn line stays; read_metrics skips it and --resume rewrites the file
            raise
    finally:
        os.close(fd)


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records. A line that does not parse (the torn last line a crash can leave)
    is skipped, never fatal."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_metrics(run: RunDir, step: int) -> None:
    """On resume: keep the records up to `step` (later ones will be logged again)."""
    kept = [r for r in read_metrics(run.metrics) if r.get("step", 0) <= step]
    write_text(run.metrics, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def prune_periodic(run: RunDir, keep: int) -> None:
    """Delete all but the newest `keep` step-<n>.npz checkpoints."""
    found = sorted((int(m.group(1)), p) for p in run.checkpoints.glob("step-*.npz") if (m := PERIODIC.match(p.name)))
    for _, p in found[: max(0, len(found) - keep)]:
        p.unlink(missing_ok=True)
