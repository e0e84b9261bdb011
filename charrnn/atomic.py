"""Atomic file replacement: a reader, or a crash at any moment, sees either the old complete file
or the new complete one, never a mixture, and no temporary file is left behind on an error.

The new content goes to a temporary file in the same directory (so the rename cannot cross file
systems), is flushed and fsynced, renamed over the target, and the directory is fsynced so the
rename itself survives a power cut. Temporary names are `.<name>.<random>.tmp`; runlog knows the
pattern and clears leftovers of a killed write on --resume.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what fill(file) writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes(path: Path, data: bytes) -> None:
    write(path, lambda f: f.write(data))
