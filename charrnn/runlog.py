"""Run directories: naming, locking, the metrics log, config and sample files.

    runs/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml          the resolved configuration
        metrics.jsonl        one JSON object per logged step
        checkpoints/         last.npz, best.npz, step-<n>.npz (the newest train.keep_last)
        samples/             step-<n>.txt, text sampled at each evaluation
        .lock                held (flock) by the process training in this directory
        failed.txt           the error that stopped training, if one did (removed on resume)

Every file here is written, appended, locked and read through atomic.py, which never follows a
link or blocks on a FIFO; lock() and create() also refuse a directory in which one of the names
above is something charrnn never makes (check_entries). Values read back (metrics records,
config.yaml) are checked before use: someone else may have written them.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from charrnn import atomic
from charrnn.errors import CharRNNError, RunDirError, UsageError, option

PERIODIC = re.compile(r"^step-(\d+)\.npz$")
CONFIG_MAX_BYTES = 1 << 20  # a resolved config is a few KB; more is not one charrnn wrote
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
        self.lock_file = self.root / ".lock"
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


def check_entries(run: RunDir) -> None:
    """Refuse (RunDirError) a run directory in which one of charrnn's own names is something that
    charrnn never makes there: a link, FIFO, socket or device where a file belongs, or anything but
    a real directory for checkpoints/ and samples/. The run directory itself is named by the user
    and may be a link; what is inside it was made by charrnn, or planted by someone else."""
    if not run.root.is_dir():
        return
    for path in (run.lock_file, run.metrics, run.config, run.failed):
        atomic.check_regular(path)
    for path in (run.checkpoints, run.samples):
        atomic.check_directory(path)


def unused(run: RunDir) -> bool:
    """Whether the directory holds nothing but what create() makes (and a start killed before its
    first checkpoint leaves): no config, no checkpoint, no metrics record. Such a directory is
    reused by a new run rather than refused."""
    for p in run.root.iterdir():
        if p.name == ".lock" or TEMP.match(p.name):
            continue
        st = p.lstat()  # a link is never what create() made
        if p.name == "metrics.jsonl" and stat.S_ISREG(st.st_mode) and st.st_size == 0:
            continue
        if p.name in ("checkpoints", "samples") and stat.S_ISDIR(st.st_mode) and all(TEMP.match(q.name)
                                                                                    for q in p.iterdir()):
            continue
        return False
    return True


def remove_temp_files(run: RunDir) -> None:
    """Delete the temporary files of interrupted atomic writes. Only while holding the lock."""
    for d in (run.root, run.checkpoints, run.samples):
        if d.is_dir() and not d.is_symlink():
            for p in d.iterdir():
                if TEMP.match(p.name) and stat.S_ISREG(p.lstat().st_mode):
                    p.unlink(missing_ok=True)


def create(run: RunDir) -> None:
    """Make a new run directory; an existing one that holds a run is only ever resumed, not reused."""
    check_entries(run)
    if run.root.exists() and (not run.root.is_dir() or not unused(run)):
        raise UsageError(f"run directory {run.root} already exists; continue it with {option('resume', run.root)} "
                         f"or choose another {option('run_dir')}")
    try:
        for d in (run.root, run.checkpoints, run.samples):
            d.mkdir(parents=True, exist_ok=True)
        check_entries(run)  # nothing was planted between the first check and the mkdirs
        atomic.append(run.metrics, b"")  # creates it, refusing a link or FIFO planted in the meantime
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run.root}: {e.strerror}") from None


def lock(run: RunDir) -> None:
    """Take the run's lock for the life of this process (released by the kernel if it dies).

    The lock is an flock on .lock, a regular file of this directory (never a link's target), which
    then holds this process's PID. The directory's other entries are checked here too, since every
    write into the run comes after this."""
    check_entries(run)
    try:
        fd = atomic.open_file(run.lock_file, os.O_RDWR | os.O_CREAT)
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
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the PID is for people; the flock is what counts
    run._lock_fd = fd


def unlock(run: RunDir) -> None:
    if run._lock_fd is not None:
        os.close(run._lock_fd)
        run._lock_fd = None


# ---- the lifecycle of a training process in its run directory -------------------------------------

def continue_with(run: RunDir) -> str:
    """The advice that ends a message about a run whose last checkpoint is intact."""
    return f"continue with {option('resume', run.root)}"


@contextmanager
def writing(path: Path, again: str = "run the same command again"):
    """OSError while writing a run's files -> a one-line RunDirError naming the file and the fix."""
    try:
        yield
    except OSError as e:
        raise RunDirError(f"cannot write {path}: {e.strerror or e}; free some space (or fix the permissions) "
                          f"and {again}") from None


def start_new(run: RunDir) -> None:
    """Create the directory of a new run and hold its lock (until unlock). Temporary files of a
    start that was killed in this (unused) directory are removed."""
    if run.lock_file.exists():
        lock(run)  # "in use by another process" is the better message than "already exists"
    create(run)
    if run._lock_fd is None:
        lock(run)
    with writing(run.root):
        remove_temp_files(run)


def start_again(run: RunDir) -> None:
    """Hold the lock of an existing run (until unlock) and clear what its last process left:
    failed.txt, and temporary files of writes that a kill interrupted (nobody else writes here)."""
    lock(run)
    with writing(run.root, continue_with(run)):
        clear_failed(run)
        remove_temp_files(run)


def mark_failed(run: RunDir, error: BaseException) -> None:
    """Record why training stopped with an error (for `charrnn runs`), in a run this process holds."""
    if run._lock_fd is None:
        return  # not our run (e.g. it was locked by another process): leave it alone
    try:
        # spelled for the command line: `charrnn runs` is what shows it
        text = error.render("cli") if isinstance(error, CharRNNError) else str(error)
        write_text(run.failed, f"{type(error).__name__}: {text}\n")
    except (OSError, CharRNNError):
        pass  # never hide the error being reported behind a second one


def clear_failed(run: RunDir) -> None:
    run.failed.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    atomic.write_bytes(path, text.encode("utf-8"))


def read_config(run: RunDir) -> dict:
    """The run's config.yaml as a mapping, for display: {} when it is missing, unreadable, not a
    regular file, not YAML or not a mapping. Its values are as found; check each before use."""
    try:
        doc = yaml.safe_load(atomic.read_bytes(run.config, CONFIG_MAX_BYTES).decode("utf-8"))
    except (OSError, CharRNNError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


# ---- values read back from files others can write -----------------------------------------------

def as_count(value, lo: int = 0, hi: int = 2**63 - 1) -> int | None:
    """value if it is an int (not a bool) in [lo, hi], else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi else None


def as_real(value) -> float | None:
    """value as a float if it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return value if math.isfinite(value) else None


# ---- metrics.jsonl --------------------------------------------------------------------------------

def append_metrics(run: RunDir, record: dict) -> None:
    """Append one line with a single write(), so a crash leaves at most one torn last line. A
    write that fails part way (ENOSPC after a short write) is cut back off: no torn line at all."""
    atomic.append(run.metrics, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records. A line that does not parse (the torn last line a crash can leave),
    or whose step is not a non-negative integer, is skipped, never fatal. The other values are as
    found: check each before use (as_real). RunDirError if the file is a link, FIFO or the like."""
    try:
        data = atomic.read_bytes(path)
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n"):
        try:
            record = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            record = None
        if isinstance(record, dict) and as_count(record.get("step")) is not None:
            records.append(record)
    return records


def truncate_metrics(run: RunDir, step: int) -> None:
    """On resume: keep the records up to `step` (later ones will be logged again)."""
    kept = [r for r in read_metrics(run.metrics) if r["step"] <= step]
    write_text(run.metrics, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def prune_periodic(run: RunDir, keep: int) -> None:
    """Delete all but the newest `keep` step-<n>.npz checkpoints."""
    found = sorted((int(m.group(1)), p) for p in run.checkpoints.glob("step-*.npz") if (m := PERIODIC.match(p.name)))
    for _, p in found[: max(0, len(found) - keep)]:
        p.unlink(missing_ok=True)
