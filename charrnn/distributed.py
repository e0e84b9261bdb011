"""Data-parallel training over MPI: `mpiexec -n K charrnn train ...` (or `srun` under Slurm).

charrnn knows that it runs under a launcher from the launcher's environment, without importing
mpi4py: with one process, or none of these variables, nothing changes and mpi4py is never
imported. With K > 1 processes (ranks), each rank trains K-th of the global batch's N streams
and the ranks sum one buffer per step (the gradient of the global mean loss, the loss and the
stop votes) with one Allreduce, so every rank sees the same numbers and keeps the same
parameters. Rank 0 alone writes the run directory.

Every collective waits by polling, so a rank that dies (SIGKILL, a crash) cannot hang the others:
a peer on this host that is gone ends the wait at once, and any wait ends after
CHARRNN_MPI_TIMEOUT seconds (default 45) with a one-line PeerLostError naming the ranks.

This module is imported by charrnn/__init__.py before numpy (set_thread_defaults must run
before numpy reads its thread variables), so it imports nothing heavy at module level.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import zlib

from charrnn.errors import CharRNNError, ConfigError, MissingDependencyError, TrainingError, option

TIMEOUT_VAR = "CHARRNN_MPI_TIMEOUT"
DEFAULT_TIMEOUT = 45.0  # a survivor ends within a minute of a peer's death on another host
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# (size, rank) variables of the launchers: MPICH/hydra (PMI), Open MPI, Open MPI 5 with PMIx
_LAUNCHERS = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
              ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))
_LOCAL_SIZE = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE",
               "SLURM_NTASKS_PER_NODE")


class MPIUnavailable(MissingDependencyError):
    """Started by an MPI launcher with several processes, but mpi4py cannot join them."""

    exit_code = 2


class PeerLostError(TrainingError):
    """Another rank stopped answering (killed, crashed, or its host is gone)."""


# ---- the launcher's environment (no imports) ---------------------------------------------------

def _int(env, name: str) -> int | None:
    m = re.match(r"\d+", env.get(name, ""))
    return int(m.group()) if m else None


def launcher_size(env=None) -> int:
    """Processes the launcher started (1 when not started by one)."""
    env = os.environ if env is None else env
    for size_var, rank_var in _LAUNCHERS:
        size = _int(env, size_var)
        if size is not None and _int(env, rank_var) is not None:
            return size
    if env.get("SLURM_STEP_ID", "").isdigit() and _int(env, "SLURM_PROCID") is not None:
        return _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS") or 1
    return 1


def _cores() -> int:
    """Cores this process may use: all of a bound process's set (the launcher already split
    them), else the machine's cores shared by the ranks on this node (set_thread_defaults)."""
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = os.cpu_count() or 1
    return mine


def thread_default(env=None) -> int | None:
    """BLAS threads per rank when K > 1 ranks run: the cores divided among this node's ranks, so
    `mpiexec -n 2` on two cores runs 2 x 1 threads rather than 2 x 2. None with one process."""
    env = os.environ if env is None else env
    if launcher_size(env) <= 1:
        return None
    total, mine = os.cpu_count() or 1, _cores()
    if mine < total:  # bound by the launcher to its own cores
        return max(1, mine)
    local = next((n for n in (_int(env, v) for v in _LOCAL_SIZE) if n), 1)
    return max(1, total // local)


def set_thread_defaults(env=None) -> None:
    """Before numpy is imported: one BLAS thread count per rank, unless the user chose one (any
    of THREAD_VARS set: then nothing is changed, the user's choice stands for every library)."""
    env = os.environ if env is None else env
    threads = thread_default(env)
    if threads is None or any(v in env for v in THREAD_VARS):
        return
    for var in THREAD_VARS:
        env[var] = str(threads)


# ---- one process --------------------------------------------------------------------------------

class Solo:
    """The world of one process: every collective is the identity."""

    size, rank = 1, 0
    step, run_root = 0, None

    def rows(self, N: int) -> slice:
        return slice(0, N)

    def reduce_step(self, g, loss: float, share: float, vote: str | None):
        return g, loss, None

    def sum_floats(self, *values: float) -> tuple:
        return values

    def gather_rows(self, a):
        return a

    def root_does(self, fn, deadline: bool = True):
        return fn()

    def together(self, fn):
        return fn()

    def bcast(self, obj):
        return obj

    def check_same(self, theta) -> None:
        pass


# ---- K processes ------------------------------------------------------------------------------------

class World(Solo):
    """COMM_WORLD of K > 1 ranks, with every wait bounded (module docstring)."""

    def __init__(self, MPI):
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.size, self.rank = self.comm.Get_size(), self.comm.Get_rank()
        raw = os.environ.get(TIMEOUT_VAR, "")
        try:
            self.timeout = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            raise ConfigError(f"{TIMEOUT_VAR}={raw!r} is not a number of seconds; set it to e.g. 45") from None
        self.host = socket.gethostname()
        self.peers = self.comm.allgather((self.host, os.getpid()))  # for naming a rank that is lost
        self.notified = False
        # MPICH's hydra (-disable-auto-cleanup) tells the survivors of a rank's death with
        # SIGUSR1, whose default action would end this rank without a word: note it instead,
        # and look for the dead peer at once (a handler the user installed is left alone)
        if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            signal.signal(signal.SIGUSR1, self._notice)

    def _notice(self, signum, frame) -> None:
        self.notified = True

    def rows(self, N: int) -> slice:
        if N % self.size:
            raise ConfigError(f"train.batch_size={N} streams cannot be split over {self.size} processes: the number "
                              f"of processes must divide the batch size; use a batch size that is a multiple of "
                              f"{self.size} (e.g. {option('set', f'train.batch_size={self.size * max(1, N // self.size)}')})"
                              f" or another process count")
        n = N // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    # -- waiting --

    def _wait(self, req, deadline: bool = True) -> None:
        """Until req completes; PeerLostError when a peer on this host is gone or, with a
        deadline, when CHARRNN_MPI_TIMEOUT seconds pass."""
        start = checked = time.monotonic()
        pause = 0.0
        while True:
            try:
                if req.Test():
                    return
            except self.MPI.Exception:
                raise self._lost(self.timeout) from None
            now = time.monotonic()
            if now - checked >= 0.5 or self.notified:
                checked, self.notified = now, False
                if self._dead_here():
                    raise self._lost(now - start)
            if deadline and now - start > self.timeout:
                raise self._lost(now - start)
            # the first millisecond only yields (a peer a step behind answers at once), then naps
            # of up to 1 ms: a waiting rank costs its core little and wakes soon after the answer
            time.sleep(pause if now - start > 1e-3 else 0)
            pause = min(1e-3, pause * 2 or 2e-5)

    def _dead_here(self) -> list[int]:
        return [r for r, (host, pid) in enumerate(self.peers) if r != self.rank and host == self.host and not _alive(pid)]

    def _lost(self, waited: float) -> PeerLostError:
        dead = self._dead_here()
        if dead:
            who = ", ".join(f"rank {r} (host {self.peers[r][0]}, pid {self.peers[r][1]})" for r in dead)
            what = f"{who} stopped answering"
        else:
            others = [r for r, (host, _) in enumerate(self.peers) if r != self.rank and host != self.host]
            others = others or [r for r in range(self.size) if r != self.rank]
            who = ", ".join(f"rank {r} (host {self.peers[r][0]}, pid {self.peers[r][1]})" for r in others)
            what = f"{who} did not answer within {waited:.0f} s ({TIMEOUT_VAR})"
        advice = (f"the last checkpoint is intact; resume with {option('resume', self.run_root)}"
                  if self.run_root is not None else "run the command again")
        return PeerLostError(f"rank {self.rank}: {what} at step {self.step}; {advice}")

    def _arrive(self, deadline: bool = True) -> None:
        """Every rank reached this point (then a blocking collective of objects cannot hang)."""
        self._wait(self.comm.Ibarrier(), deadline)

    # -- collectives --

    def reduce_step(self, g, loss: float, share: float, vote: str | None):
        """One Allreduce of [g * share, loss * share (as float32 pair in float32), votes]: the
        global gradient and loss, and the stop reason any rank voted for (SIGTERM first)."""
        import numpy as np

        buf = np.empty(g.size + 4, dtype=g.dtype)
        np.multiply(g, g.dtype.type(share), out=buf[:-4])
        part = loss * share
        buf[-4] = part
        buf[-3] = part - float(buf[-4])  # what the buffer's type lost of the loss (float32)
        buf[-2], buf[-1] = vote == "SIGINT", vote == "SIGTERM"
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        reason = "SIGTERM" if buf[-1] > 0 else "SIGINT" if buf[-2] > 0 else None
        return buf[:-4], float(buf[-4]) + float(buf[-3]), reason

    def sum_floats(self, *values: float) -> tuple:
        import numpy as np

        buf = np.array(values, dtype=np.float64)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        return tuple(float(v) for v in buf)

    def gather_rows(self, a):
        """(N, W) on rank 0 from every rank's (N / K, W) rows, in rank order; None elsewhere."""
        import numpy as np

        a = np.ascontiguousarray(a)
        out = np.empty((self.size * a.shape[0],) + a.shape[1:], dtype=a.dtype) if self.rank == 0 else None
        self._wait(self.comm.Igather(a, out, root=0))
        return out

    def bcast(self, obj, deadline: bool = True):
        self._arrive(deadline)
        return self.comm.bcast(obj, root=0)

    def root_does(self, fn, deadline: bool = True):
        """fn() on rank 0 (writing the run directory); its error, if any, is raised on every
        rank (rank 0 reports it). Returns fn's result on rank 0, None elsewhere."""
        result = error = None
        if self.rank == 0:
            try:
                result = fn()
            except CharRNNError as e:
                error = e
        outcome = self.bcast(None if error is None else _describe(error), deadline)
        if error is not None:
            raise error
        if outcome is not None:
            raise _rebuild(outcome, 0)
        return result

    def together(self, fn):
        """fn() on every rank (no collectives inside); if it fails anywhere, every rank raises:
        rank 0 the first failure (its own, or another rank's named as such), the others quietly."""
        result = error = None
        try:
            result = fn()
        except CharRNNError as e:
            error = e
        self._arrive()
        outcomes = self.comm.allgather(None if error is None else _describe(error))
        failed = [r for r, o in enumerate(outcomes) if o is not None]
        if not failed:
            return result
        if self.rank == 0 and error is not None:
            raise error
        raise _rebuild(outcomes[failed[0]], failed[0], quiet=self.rank != 0)

    def check_same(self, theta) -> None:
        """TrainingError on every rank if the parameters differ between ranks (they never should)."""
        crc = zlib.crc32(memoryview(theta).cast("B"))
        self._arrive()
        crcs = self.comm.allgather(crc)
        if len(set(crcs)) > 1:
            odd = [r for r, c in enumerate(crcs) if c != crcs[0]]
            raise shared(TrainingError(f"the parameters of rank(s) {', '.join(map(str, odd))} differ from rank 0's at "
                                       f"step {self.step}: the processes diverged (mixed MPI or numpy builds?); "
                                       "the last checkpoint is intact"))


def _alive(pid: int) -> bool:
    """Whether process pid runs. A killed rank stays a zombie until the launcher reaps it, which
    signal 0 cannot tell from a live process: /proc says so where there is one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the field after "(command name)"
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def _describe(e: CharRNNError) -> tuple:
    return type(e).__name__, e.exit_code, e.args[0] if e.args else str(e)


def _rebuild(outcome: tuple, rank: int, quiet: bool = True) -> CharRNNError:
    """Another rank's error, raised here: the same class where charrnn.errors has it."""
    from charrnn import errors

    name, code, message = outcome
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, CharRNNError)):
        cls = type(name, (CharRNNError,), {"exit_code": code})
    e = cls(message if rank == 0 else f"rank {rank}: {message}")
    e.exit_code = code
    return shared(e) if quiet else e


def shared(e: BaseException) -> BaseException:
    """Mark an error that every rank raises alike: rank 0 reports it, the others stay quiet."""
    e.root_reports = True
    return e


def quiet_here(e: BaseException) -> bool:
    """Whether this rank leaves reporting e to rank 0."""
    return _WORLD is not None and _WORLD.rank != 0 and getattr(e, "root_reports", False)


# ---- the world --------------------------------------------------------------------------------

_WORLD: Solo | None = None


def world() -> Solo:
    """This process's world: Solo without a launcher (mpi4py not imported), else the MPI world."""
    global _WORLD
    if _WORLD is None:
        size = launcher_size()
        _WORLD = Solo() if size <= 1 else _connect(size)
    return _WORLD


def parallel() -> bool:
    """Whether this process is one of several ranks (without starting MPI)."""
    return _WORLD is not None and _WORLD.size > 1


def _connect(size: int) -> World:
    try:
        from mpi4py import MPI
    except ImportError:
        raise MPIUnavailable(f"charrnn was started as one of {size} MPI processes, but mpi4py is not installed; "
                             "install it with pip install -e '.[mpi]' (or pip install mpi4py mpich), "
                             "or run a single process") from None
    got = MPI.COMM_WORLD.Get_size()
    if got != size:
        raise MPIUnavailable(f"the launcher started {size} processes but mpi4py's MPI sees {got}: mpi4py was built "
                             "for another MPI than the mpiexec used; use the mpiexec of the MPI mpi4py was built "
                             "with (or reinstall mpi4py against the site's MPI)")
    return World(MPI)


def leave(code: int) -> None:
    """End a rank of a parallel run now, skipping MPI_Finalize, which waits for ranks that may
    be gone. Output is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)
