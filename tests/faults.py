"""Helpers for the fault-injection tests: disk faults and real `charrnn` child processes.

Reached through conftest's `faults` fixture (--import-mode=importlib keeps tests/ off sys.path).
"""
from __future__ import annotations

import errno
import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TIMING = ("chars_per_sec", "elapsed_s")  # the only metrics fields that may differ between identical runs


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class _FullFile(io.FileIO):
    """A file on a disk with `budget` bytes left: the write that crosses it is short, the next fails."""

    def __init__(self, fd: int, budget: int, code: int):
        super().__init__(fd, "wb", closefd=True)
        self.budget, self.code = budget, code

    def write(self, b) -> int:
        n = min(len(b), self.budget)
        if n <= 0:
            raise OSError(self.code, os.strerror(self.code))
        self.budget -= n
        return super().write(memoryview(b)[:n])


class Disk:
    """Makes writes fail the way a full (ENOSPC) or unwritable (EACCES) disk does, for the files
    whose path contains `target`, starting with the `nth` time such a file is written (1 = the
    first). Root ignores file modes, so a read-only directory cannot stand in for this here.

    where: "write" (the data stops after `budget` bytes), "fsync", "create" (mkstemp or os.open
    refuses the file) or "append" (os.write to an O_APPEND file: half a line, then the error).
    """

    def __init__(self, monkeypatch, target: str, where: str = "write", nth: int = 1, budget: int = 100,
                 code: int = errno.ENOSPC):
        self.target, self.where, self.nth, self.budget, self.code = target, where, nth, budget, code
        self.seen = 0  # matching writes so far
        self.failed = 0  # faults injected
        self._install(monkeypatch)

    def _due(self, path: str) -> bool:
        if self.target not in path:
            return False
        self.seen += 1
        return self.seen >= self.nth

    def _error(self) -> OSError:
        self.failed += 1
        return OSError(self.code, os.strerror(self.code))

    def _install(self, mp) -> None:
        import tempfile

        real_fdopen, real_fsync, real_mkstemp = os.fdopen, os.fsync, tempfile.mkstemp
        real_open, real_write = os.open, os.write

        def fdopen(fd, mode="r", *args, **kwargs):
            if self.where == "write" and "w" in mode and self._due(fd_path(fd)):
                self.failed += 1
                return io.BufferedWriter(_FullFile(fd, self.budget, self.code))
            return real_fdopen(fd, mode, *args, **kwargs)

        def fsync(fd):
            if self.where == "fsync" and self._due(fd_path(fd)):
                raise self._error()
            return real_fsync(fd)

        def mkstemp(suffix=None, prefix=None, dir=None, text=False):
            if self.where == "create" and self._due(os.path.join(str(dir or ""), str(prefix or ""))):
                raise self._error()
            return real_mkstemp(suffix, prefix, dir, text)

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            made_by_mkstemp = str(path).endswith(".tmp")  # counted (or refused) in mkstemp already
            if self.where == "create" and flags & (os.O_WRONLY | os.O_RDWR) and not made_by_mkstemp and self._due(str(path)):
                raise self._error()
            return real_open(path, flags, mode, dir_fd=dir_fd)

        appends = {}

        def write(fd, data):
            if self.where == "append" and fd not in appends and self._due(fd_path(fd)):
                appends[fd] = True
                return real_write(fd, memoryview(data)[: max(1, len(data) // 2)])  # a short write ...
            if appends.pop(fd, None):
                raise self._error()  # ... and then the disk is full
            return real_write(fd, data)

        mp.setattr(os, "fdopen", fdopen)
        mp.setattr(os, "fsync", fsync)
        mp.setattr(tempfile, "mkstemp", mkstemp)
        mp.setattr(os, "open", open_)
        mp.setattr(os, "write", write)


def temp_files(directory: Path) -> list[str]:
    """Leftovers of interrupted atomic writes (.<name>.<random>.tmp) anywhere under directory."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*.tmp"))


# ---- comparing runs ---------------------------------------------------------------------------------

def assert_same_checkpoint(a, b, skip_meta=("elapsed_s", "saved_at")):
    """Bit-identical arrays (parameters, optimizer and hidden state) and equal metadata."""
    for kind in ("params",):
        x, y = getattr(a, kind), getattr(b, kind)
        assert list(x) == list(y)
        for name in x:
            assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), f"{kind} {name} differs"
    assert a.optim.keys() == b.optim.keys()
    for slot in a.optim:
        for name in a.optim[slot]:
            assert np.array_equal(a.optim[slot][name], b.optim[slot][name]), f"optim/{slot}/{name} differs"
    assert a.state.keys() == b.state.keys()
    for d in a.state:
        assert all(np.array_equal(x, y) for x, y in zip(a.state[d], b.state[d], strict=True)), f"state/{d} differs"
    differ = sorted(k for k in a.meta.keys() | b.meta.keys() if k not in skip_meta and a.meta.get(k) != b.meta.get(k))
    assert not differ, {k: (a.meta.get(k), b.meta.get(k)) for k in differ}


def metrics_without_timing(run: Path) -> list[dict]:
    from charrnn import runlog

    return [{k: v for k, v in r.items() if k not in TIMING} for r in runlog.read_metrics(run / "metrics.jsonl")]


def assert_same_run(ref: Path, run: Path) -> None:
    """Same last.npz and best.npz (arrays bit for bit), same metrics apart from timing, same samples."""
    from charrnn import checkpoint

    for name in ("last.npz", "best.npz"):
        assert (ref / "checkpoints" / name).exists() == (run / "checkpoints" / name).exists(), name
        if (ref / "checkpoints" / name).exists():
            assert_same_checkpoint(checkpoint.load(ref / "checkpoints" / name), checkpoint.load(run / "checkpoints" / name))
    assert metrics_without_timing(run) == metrics_without_timing(ref)
    texts = lambda d: {p.name: p.read_bytes() for p in (d / "samples").iterdir()}  # noqa: E731
    assert texts(run) == texts(ref)


# ---- child processes --------------------------------------------------------------------------------

def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8", "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_module(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`python -m charrnn ARGS` to completion; stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=REPO, timeout=timeout, **kwargs)


class StderrLines:
    """A child process whose stderr is read line by line on a thread, so a test can wait for a
    line to appear without polling or sleeping."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """Block until a stderr line contains text; fail if the child ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s; stderr so far:\n{''.join(self.lines)}") from None
            if line is None:
                raise AssertionError(f"child exited ({self.proc.wait()}) before printing {text!r}:\n{''.join(self.lines)}")
            self.lines.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """(exit code, all of stderr) once the child has exited."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code, "".join(self.lines)


class Child(StderrLines):
    """A `python -m charrnn ...` (or `python -c CODE`) child, its stderr read line by line."""

    def __init__(self, *args, code: str | None = None, **kwargs):
        cmd = [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, "-m", "charrnn", *map(str, args)]
        super().__init__(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env(), cwd=REPO, **kwargs))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()
