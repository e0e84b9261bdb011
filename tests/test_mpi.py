"""Data-parallel training over MPI (distributed.py): `mpiexec -n 2 charrnn train` equals the
one-process run, resumes with another process count, and ends cleanly on SIGTERM and when a
rank is killed. Every run is tiny; the two-process runs of the equivalence and resume checks
share one mpiexec (one start-up)."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from faults import StderrLines

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
if MPIEXEC is None:
    pytest.skip("no mpiexec next to the interpreter or on PATH", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
WORDS = " ".join(["the quick brown fox jumps over the lazy dog", "a cat sat on the mat while birds sang",
                  "every good boy deserves fudge"] * 60) + "\n"
BASE = ("model.hidden_size=12", "train.seq_len=12", "train.batch_size=8", "train.max_steps=50",
        "train.log_every=10", "train.eval_every=25", "train.checkpoint_every=0", "train.sample_chars=0",
        "train.dtype=float64", "data.val_fraction=0.2")
KINDS = {
    "vanilla": (),
    "stacked": ("model.num_layers=2",),
    "cloze": ("model.bidirectional=true", "model.num_layers=2"),
    "dropout": ("model.num_layers=2", "model.dropout=0.2"),
    "lstm": ("model.cell=lstm",),
    "gru": ("model.cell=gru", "model.dropout=0.1"),
    "lstm-weight-drop": ("model.cell=lstm", "model.num_layers=2", "model.dropout=0.1", "model.weight_drop=0.2"),
    "vanilla-float32": ("train.dtype=float32",),
    "lstm-threads": ("model.cell=lstm", "model.num_layers=2", "train.threads=2"),  # 2 threads in each process
}
RESUMED = ("model.cell=lstm", "model.num_layers=2", "model.dropout=0.1")  # carried [h | c] of two layers, masks
HALF = ("train.max_steps=25",)
FULL = ("train.max_steps=50",)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _sets(corpus: Path, *extra: str) -> list[str]:
    return [f"data.path={corpus}", *BASE, *extra]


def _arrays(run: Path) -> dict:
    with np.load(run / "checkpoints" / "last.npz") as z:
        return {k: z[k] for k in z.files if z[k].dtype.kind == "f"}


def _max_diff(a: Path, b: Path) -> float:
    x, y = _arrays(a), _arrays(b)
    assert set(x) == set(y) and any(k.startswith("optim/") for k in x)
    return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for k in x)


def _mpi_train(jobs: list, n: int = 2, timeout: float = 120) -> None:
    """Run charrnn.train(None, run_dir, resume=..., sets=...) for each job in one mpiexec of n ranks."""
    code = ("import json, sys, charrnn\n"
            "for run_dir, resume, sets in json.loads(sys.argv[1]):\n"
            "    charrnn.train(None, run_dir, resume=resume, sets=sets)\n")
    proc = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-c", code, json.dumps(jobs)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of the equivalence and resume checks: one-process runs in this process, the
    two-process ones in one mpiexec. Returns {name: run directory}."""
    from charrnn import train

    root = tmp_path_factory.mktemp("mpi")
    corpus = root / "words.txt"
    corpus.write_text(WORDS, encoding="utf-8")
    os.environ["CHARRNN_CACHE_DIR"] = str(root / "cache")  # the ranks inherit it through _env()
    try:
        dirs = {}
        for kind, extra in KINDS.items():
            dirs[f"{kind}-1"] = root / f"{kind}-1"
            train(None, dirs[f"{kind}-1"], sets=_sets(corpus, *extra))
        for name in ("resumed-1", "half-1", "half-2"):
            dirs[name] = root / name
        train(None, dirs["resumed-1"], sets=_sets(corpus, *RESUMED, *FULL))
        train(None, dirs["half-1"], sets=_sets(corpus, *RESUMED, *HALF))
        jobs = [(str(root / f"{kind}-2"), False, _sets(corpus, *extra)) for kind, extra in KINDS.items()]
        jobs += [(str(dirs["half-2"]), False, _sets(corpus, *RESUMED, *HALF)),
                 (str(dirs["half-1"]), True, list(FULL))]  # a one-process checkpoint continued by two
        _mpi_train(jobs)
        dirs.update({f"{kind}-2": root / f"{kind}-2" for kind in KINDS})
        train(None, dirs["half-2"], resume=True, sets=list(FULL))  # a two-process checkpoint continued by one
        yield dirs
    finally:
        os.environ.pop("CHARRNN_CACHE_DIR", None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_processes_equal_one(runs, kind):
    """Parameters and optimizer state after 50 steps: float64 within 1e-12, float32 within 1e-5."""
    limit = 1e-5 if kind.endswith("float32") else 1e-12
    assert _max_diff(runs[f"{kind}-1"], runs[f"{kind}-2"]) <= limit


@pytest.mark.parametrize("half", ["half-1", "half-2"])
def test_resume_with_another_process_count(runs, half):
    """Stopped at step 25 by one (two) process(es), continued by two (one): the uninterrupted run."""
    assert _max_diff(runs["resumed-1"], runs[half]) <= 1e-12
    with np.load(runs[half] / "checkpoints" / "last.npz") as z:
        assert z["state/fwd/0"].shape == (8, 24)  # the checkpoint holds all 8 streams' [h | c]


def test_same_metrics_as_one_process(runs):
    """Rank 0 alone logs; its records are the one-process run's (timings aside)."""
    def records(run):
        return [{k: v for k, v in json.loads(line).items() if k not in ("chars_per_sec", "elapsed_s")}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    one, two = records(runs["vanilla-1"]), records(runs["vanilla-2"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [10, 20, 25, 30, 40, 50]
    assert [r["val_loss"] for r in one if "val_loss" in r] == pytest.approx([r["val_loss"] for r in two if "val_loss" in r],
                                                                            rel=1e-12)


# A NaN loss on one rank only, at its 7th step (in one process: at the 7th step), with
# on_nonfinite=skip: every rank must skip that same step.
NAN_ON_ONE_RANK = """
import json, math, os, sys
import charrnn, charrnn.model as m
rank, calls, real = int(os.environ.get("PMI_RANK", "0")), [0], m.loss_and_grads
def loss_and_grads(*args, **kwargs):
    result = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 7 and rank == int(sys.argv[3]):
        return result._replace(loss=math.nan)
    return result
m.loss_and_grads = loss_and_grads
charrnn.train(None, sys.argv[1], sets=json.loads(sys.argv[2]))
"""


def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path):
    corpus = tmp_path / "words.txt"
    corpus.write_text(WORDS, encoding="utf-8")
    sets = json.dumps(_sets(corpus, "train.on_nonfinite=skip", "train.max_steps=20"))
    for name, launch, bad_rank in (("one", [], "0"), ("two", [MPIEXEC, "-n", "2"], "1")):
        proc = subprocess.run([*launch, sys.executable, "-c", NAN_ON_ONE_RANK, str(tmp_path / name), sets, bad_rank],
                              env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    skips = [[json.loads(line).get("skips") for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("one", "two")]
    assert skips[0] == skips[1] and skips[0][-1] == 1  # the same single step skipped
    assert _max_diff(tmp_path / "one", tmp_path / "two") <= 1e-12  # and the same parameters after it


# ---- refusals and start-up ------------------------------------------------------------------------

def test_processes_must_divide_the_batch(tmp_path):
    corpus = tmp_path / "words.txt"
    corpus.write_text(WORDS, encoding="utf-8")
    args = [a for s in _sets(corpus, "train.batch_size=7") for a in ("--set", s)]
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "charrnn", "train", *args, "--run-dir",
                           tmp_path / "run"], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch_size=7" in lines[0] and "2 processes" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_one_process_never_imports_mpi4py(tmp_path):
    corpus = tmp_path / "words.txt"
    corpus.write_text(WORDS, encoding="utf-8")
    args = [a for s in _sets(corpus, "train.max_steps=3") for a in ("--set", s)] + ["--run-dir", str(tmp_path / "run")]
    code = ("import sys\nfrom charrnn.cli import main\nsys.argv = ['charrnn', 'train'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('mpi4py' in sys.modules, 'numpy' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "True"], proc.stderr


def test_thread_defaults():
    from charrnn import distributed

    env = {"PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALNRANKS": "2"}
    distributed.set_thread_defaults(env)
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == str(distributed.thread_default(env))
    mine = {"PMI_SIZE": "2", "PMI_RANK": "0", "OMP_NUM_THREADS": "3"}
    distributed.set_thread_defaults(mine)  # the user's choice stands
    assert "OPENBLAS_NUM_THREADS" not in mine
    assert distributed.launcher_size({"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}) == 4
    assert distributed.launcher_size({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == 1  # a batch script, not a step
    assert distributed.launcher_size({}) == 1


# ---- faults -------------------------------------------------------------------------------------

class Ranks(StderrLines):
    """`mpiexec -n 2 sh -c 'python -m charrnn train ...; echo $? > rc.<rank>'`: each rank's exit
    code is kept, and its stderr is read line by line so a test can wait for a line."""

    def __init__(self, tmp_path: Path, *args, mpiexec_args=(), bare: int | None = None):
        self.dir = tmp_path
        # hydra tells the survivors of a failure with SIGUSR1: MPI handles it in the ranks, the
        # wrapping shell must ignore it to live on and record the rank's exit code. Rank `bare`
        # runs without the shell (exec), as ranks do: a killed one stays a zombie of the launcher.
        charrnn = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "charrnn", *args))
        cmd = (f'if [ "$PMI_RANK" = "{bare}" ]; then exec {charrnn}; fi; trap "" USR1; {charrnn}; '
               'echo $? > "$RC_DIR/rc.$PMI_RANK"')
        env = {**_env(), "RC_DIR": str(tmp_path)}  # CHARRNN_CACHE_DIR: the test's own (conftest)
        super().__init__(subprocess.Popen([MPIEXEC, *mpiexec_args, "-n", "2", "sh", "-c", cmd], env=env, text=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    def pids(self) -> dict:
        """rank -> pid of each rank's python process (found by its launcher environment)."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            rc_dir = f"RC_DIR={self.dir}".encode()
            if rc_dir in environ and b"charrnn" in cmdline and cmdline.startswith(sys.executable.encode()):
                rank = next(int(v.split(b"=")[1]) for v in environ if v.startswith(b"PMI_RANK="))
                found[rank] = int(entry.name)
        return found

    def finish(self, timeout: float = 60) -> tuple[dict, str]:
        """({rank: exit code}, all of stderr) once mpiexec has exited. If it has not within
        timeout, its ranks and itself are killed first: a rank left spinning would take a core
        from every later test and benchmark (one did, once, in a full run)."""
        try:
            _, stderr = super().finish(timeout)
        except subprocess.TimeoutExpired:
            for pid in self.pids().values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            raise
        codes = {int(p.name.split(".")[1]): int(p.read_text()) for p in self.dir.glob("rc.*")}
        return codes, stderr


def _train_args(tmp_path: Path, *extra) -> list:
    corpus = tmp_path / "words.txt"
    corpus.write_text(WORDS, encoding="utf-8")
    sets = _sets(corpus, "train.max_steps=100000", "train.log_every=5", "train.eval_every=0", *extra)
    return ["train", *[a for s in sets for a in ("--set", s)], "--run-dir", tmp_path / "run"]


def _step_of(run: Path) -> int:
    from charrnn import checkpoint

    return checkpoint.load(run / "checkpoints" / "last.npz").meta["step"]


def test_sigterm_to_every_rank(tmp_path):
    """What Slurm does at the time limit: one checkpoint at the agreed step, 143 everywhere, one resume line."""
    ranks = Ranks(tmp_path, *_train_args(tmp_path))
    ranks.wait_for("step 10 |")
    pids = ranks.pids()
    assert sorted(pids) == [0, 1]
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    codes, err = ranks.finish()
    assert codes == {0: 143, 1: 143}, err
    assert err.count("Continue with:") == 1 and err.count("--resume") == 1, err
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert _step_of(tmp_path / "run") == stopped > 10
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.npz"]
    from charrnn import train

    summary = train(None, tmp_path / "run", resume=True, sets=[f"train.max_steps={stopped + 3}"])
    assert summary.steps == stopped + 3


@pytest.mark.parametrize("killed", [1, 0])
def test_sigkill_of_one_rank(tmp_path, killed):
    """The survivor ends with one line naming the killed rank (rank 0 is the one that writes);
    last.npz is intact and resumes."""
    ranks = Ranks(tmp_path, *_train_args(tmp_path, "train.checkpoint_every=5"), mpiexec_args=["-disable-auto-cleanup"],
                  bare=killed)
    ranks.wait_for("step 10 |")
    pids = ranks.pids()
    os.kill(pids[killed], signal.SIGKILL)
    codes, err = ranks.finish(timeout=60)
    # the killed rank has no shell to record its end; hydra may end the survivor's shell too
    # once the survivor has exited, before it records the code (the line below is the survivor's)
    assert set(codes) <= {1 - killed} and codes.get(1 - killed, 1) == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # MPICH 5 may end the survivor itself within milliseconds of the death (its own detection,
    # despite -disable-auto-cleanup): then no rank hangs, but none is left to say which died
    assert len(errors) <= 1, err
    for line in errors:
        assert f"rank {killed} (host {os.uname().nodename}, pid {pids[killed]}) stopped answering" in line, err
        assert "--resume" in line
    from charrnn import train

    step = _step_of(tmp_path / "run")
    summary = train(None, tmp_path / "run", resume=True, sets=[f"train.max_steps={step + 3}"])
    assert summary.steps == step + 3


def test_rank_that_stops_answering(tmp_path, monkeypatch):
    """A rank alive but silent (as a rank on a lost host looks): the others give up after
    CHARRNN_MPI_TIMEOUT seconds with one line naming it."""
    monkeypatch.setenv("CHARRNN_MPI_TIMEOUT", "2")
    ranks = Ranks(tmp_path, *_train_args(tmp_path), mpiexec_args=["-disable-auto-cleanup"])
    ranks.wait_for("step 10 |")
    pids = ranks.pids()
    os.kill(pids[1], signal.SIGSTOP)
    try:
        line = ranks.wait_for("error:")
    finally:
        os.kill(pids[1], signal.SIGKILL)
    codes, err = ranks.finish()
    assert codes[0] == 1
    assert f"rank 1 (host {os.uname().nodename}, pid {pids[1]}) did not answer within 2 s" in line, err
