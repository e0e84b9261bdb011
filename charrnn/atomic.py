"""The one way charrnn touches files in a run directory or the cache: replace atomically, append,
lock and read, never through something that someone else planted there.

A run directory or cache may sit on shared storage where others can create entries. A symbolic
link named like one of charrnn's files would make a plain open() write into whatever the link
points at (any file the user can write); a FIFO would make it block forever; a hard link would
make an append or a truncation change the user's file elsewhere. So:

  write()      replaces the target through a temporary file and os.replace(): a link, FIFO or
               socket at the target is itself replaced, never written through. A directory there
               is refused. A reader, or a crash at any moment, sees either the old complete file
               or the new complete one, and no temporary file is left behind on an error. The
               data is fsynced before the rename and the directory after it, so the rename
               survives a power cut. Temporary names are `.<name>.<random>.tmp`; runlog knows the
               pattern and clears leftovers of a killed write on --resume.
  open_file()  opens in place (append, lock, read) with O_NOFOLLOW and O_NONBLOCK, so a link is
               refused and a FIFO never blocks, then checks with fstat that the opened file is a
               regular file, and for writing that it has no second hard link.
  append(), read_bytes() and check_regular() / check_directory() are built on those.

Refusals are one-line RunDirErrors naming the path and what to do; OSErrors (a full disk, a
permission problem) pass through unchanged, for the caller to word.

Files are created with mode 0o666 less the umask, as any Unix tool does, so that colleagues sharing
a run directory can read its checkpoints when the umask allows it (mkstemp's 0600 does not).
Files owned by another user are not refused: appending to or locking a regular, singly linked
file that someone else owns cannot reach any file of ours (a planted hard link could, and is
refused), and runs shared by a group, or resumed by root, are legitimate.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO
from collections.abc import Callable

from charrnn.errors import RunDirError

KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _umask_by_syscall() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import (normally before any thread exists) as the fallback for kernels without
# /proc/self/status "Umask:" (before 4.7): os.umask can only be read by setting it, which is racy
# once threads run, so it is never called again after this.
_IMPORT_UMASK = _umask_by_syscall()


def umask() -> int:
    """The process's umask, read without changing it."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def _kind(mode: int) -> str | None:
    """'a symbolic link', 'a directory', ... for what is not a regular file; None for a regular one."""
    return next((name for test, name in KINDS if test(mode)), None if stat.S_ISREG(mode) else "a special file")


def _refuse(path: Path, what: str) -> RunDirError:
    return RunDirError(f"{path} is {what}, not a regular file charrnn wrote; charrnn does not read or write "
                       "through it: remove it (someone else may have put it there) and run the command again")


# ---- checking what is there ---------------------------------------------------------------------

def check_regular(path: str | Path) -> bool:
    """Whether a regular file is at path (False if nothing is); RunDirError if something else is.
    Looks at the entry itself (lstat): a link is refused, not followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    what = _kind(st.st_mode)
    if what is not None:
        raise _refuse(Path(path), what)
    return True


def check_directory(path: str | Path) -> bool:
    """Whether a real directory is at path (False if nothing is); RunDirError if a link or anything
    else is (charrnn would write into the link's target)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        what = _kind(st.st_mode) or "a regular file"
        raise RunDirError(f"{path} is {what}, not a directory charrnn made; charrnn does not write through it: "
                          "remove it and run the command again (to keep runs on another disk, make the run "
                          "directory itself the link)")
    return True


# ---- opening in place ---------------------------------------------------------------------------

def open_file(path: str | Path, flags: int) -> int:
    """A file descriptor for the regular file at path, opened with flags (os.O_RDONLY, or O_WRONLY /
    O_RDWR with O_APPEND, O_CREAT); a created file gets mode 0o666 less the umask. RunDirError for a
    link, directory, FIFO, socket or device (without blocking on any of them), and when opening for
    writing, for a file with a second hard link. The caller closes the descriptor."""
    path = Path(path)
    writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        # ELOOP: a link (O_NOFOLLOW); EISDIR: a directory opened for writing; ENXIO: a FIFO without
        # a reader opened for writing, or a socket
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            check_regular(path)  # raises the refusal when the entry is indeed not a regular file
        raise
    try:
        st = os.fstat(fd)
        what = _kind(st.st_mode)
        if what is not None:
            raise _refuse(path, what)
        if writing and st.st_nlink > 1:
            raise RunDirError(f"{path} has {st.st_nlink} hard links, so writing to it would change another file too; "
                              "remove it (someone else may have put it there) and run the command again")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append(path: str | Path, data: bytes) -> None:
    """Append data to path (created if missing) with a single write(), so a crash leaves at most one
    torn last record. A write that fails part way (ENOSPC after a short write) is cut back off."""
    fd = open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # the torn tail stays; readers skip a torn line and --resume rewrites the file
            raise
    finally:
        os.close(fd)


def read_bytes(path: str | Path, limit: int | None = None) -> bytes:
    """The content of the regular file at path (FileNotFoundError if there is none); RunDirError
    for anything else, or for a file longer than limit bytes."""
    fd = open_file(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise RunDirError(f"{path} is longer than {limit:,} bytes, more than charrnn ever writes there; "
                          "it is not read")
    return data


# ---- atomic replacement -------------------------------------------------------------------------

def write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what fill(file) writes."""
    path = Path(path)
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise RunDirError(f"{path} is a directory, where charrnn writes a file; move it away and run the "
                              "command again")
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())  # what open(path, "w") would have made
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link or FIFO at path itself, never what it points at
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
