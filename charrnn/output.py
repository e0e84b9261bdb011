"""The one path by which a command's results reach stdout (sample text, eval numbers, JSON, tables).

Why not print() or sys.stdout: a buffered text stream hides the failures a batch job must see.
A full disk (ENOSPC) surfaced as a traceback, or not at all when the data sat in the buffer
until the interpreter's exit flush; a short write(2) was taken as complete; a closed fd 1
(`charrnn sample RUN >&-`) made sys.stdout None. Here every write goes to stdout's fd with os.write
in a loop until all bytes are out, and each failure becomes one outcome:

    reader gone (EPIPE)          BrokenPipeError, which cli.py turns into exit 141 like `cat`
    fd 1 closed (EBADF)          OutputError: "stdout is closed"                        exit 1
    any other error (ENOSPC..)   OutputError naming the error                           exit 1
"""
from __future__ import annotations

import errno
import io
import os
import sys

from charrnn.errors import OutputError

FLUSH_BYTES = 1 << 16  # buffered bytes that trigger a write: few syscalls for a long sample


class Output:
    """A byte buffer in front of stdout's file descriptor; flush() writes all of it or raises.

    When sys.stdout has no file descriptor (click's CliRunner, an embedding program), the bytes go
    to its binary buffer instead, with the same error mapping."""

    def __init__(self):
        self.pending, self.fd, self.stream = bytearray(), None, None
        if sys.stdout is None:  # started with fd 1 closed: Python leaves no stdout at all
            raise _error(OSError(errno.EBADF, os.strerror(errno.EBADF)))
        try:
            sys.stdout.flush()  # anything printed before goes first
            self.fd = sys.stdout.fileno()
            os.fstat(self.fd)
        except (AttributeError, ValueError, io.UnsupportedOperation):
            self.stream = getattr(sys.stdout, "buffer", sys.stdout)
        except OSError as e:
            raise _error(e) from None

    def write(self, data: bytes | str) -> None:
        self.pending += data.encode("utf-8") if isinstance(data, str) else data
        if len(self.pending) >= FLUSH_BYTES:
            self.flush()

    def line(self, text: str) -> None:
        self.write(text + "\n")

    def flush(self) -> None:
        data, self.pending = bytes(self.pending), bytearray()
        view = memoryview(data)
        try:
            if self.stream is not None:
                self.stream.write(data)
                self.stream.flush()
                return
            while view:
                view = view[os.write(self.fd, view):]  # a short write leaves the rest for the next call
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)) from None
            raise _error(e) from None


def _error(e: OSError) -> OutputError:
    if e.errno == errno.EBADF:
        return OutputError("stdout is closed; redirect it to a file or to /dev/null")
    return OutputError(f"cannot write the output to stdout: {e.strerror}; nothing more was written")
