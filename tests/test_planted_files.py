"""Files that someone else planted in a run directory are never followed, blocked on or trusted.

A link, hard link or FIFO under one of charrnn's names makes `charrnn train` (fresh or --resume)
stop with one line and leave the link's target as it was, or replace the planted entry whole;
`charrnn runs` and `charrnn plot` show what can be known from files holding special entries or
hostile values, never hanging and never with a traceback; written files follow the umask.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import stat

import pytest

from charrnn import atomic, checkpoint, runlog
from charrnn.errors import RunDirError

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!\n" * 30
SECRET = b"the user's own file\n"
FILES = (".lock", "metrics.jsonl", "config.yaml", "failed.txt")
DIRS = ("checkpoints", "samples")


def one_error_line(stderr: str, names: str) -> str:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr
    assert names in errors[0], errors[0]
    return errors[0]


def snapshot(path):
    if path.is_dir():
        return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes()


@pytest.fixture
def finished(shared_run, tmp_path):
    """A private copy of a finished tiny run (20 steps, evaluations and samples at 10 and 20)."""
    return shutil.copytree(shared_run(TEXT), tmp_path / "run")


@pytest.fixture
def fresh_args(tmp_path, tiny):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    return tiny.args(corpus)


def start(mode, run, fresh_args):
    """The `charrnn train` arguments that start (fresh) or continue (resume) the run at `run`."""
    if mode == "resume":
        return ["train", "--resume", run, "--set", "train.max_steps=30"]
    return ["train", *fresh_args, "--run-dir", run]


@pytest.fixture
def run_for(finished, tmp_path):
    """run_for(mode) -> the run directory to plant in: the finished copy, or an empty new one."""
    def get(mode):
        if mode == "resume":
            return finished
        (tmp_path / "new").mkdir()
        return tmp_path / "new"
    return get


# ---- links planted under charrnn's names ------------------------------------------------------

@pytest.mark.parametrize("mode", ["fresh", "resume"])
@pytest.mark.parametrize("name", FILES + DIRS)
def test_a_planted_symlink_is_refused_and_its_target_untouched(cli_invoke, run_for, fresh_args, tmp_path, name, mode):
    run = run_for(mode)
    target = tmp_path / "elsewhere"
    if name in DIRS:
        if (run / name).exists():  # the copy a resumed run would otherwise write into
            shutil.move(run / name, target)
        else:
            target.mkdir()
    else:
        target.write_bytes(SECRET if name != "metrics.jsonl" or mode == "resume" else b"")
        (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target, target_is_directory=name in DIRS)
    before = snapshot(target)
    r = cli_invoke(*start(mode, run, fresh_args))
    assert r.exit_code == 1, r.output
    one_error_line(r.stderr, f"{run / name} is a symbolic link")
    assert snapshot(target) == before and (run / name).is_symlink()


@pytest.mark.parametrize("mode", ["fresh", "resume"])
@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_planted_hard_link_is_never_written_through(cli_invoke, run_for, fresh_args, tmp_path, name, mode):
    """A hard link shares the inode: an append or a truncation would change the user's other file.
    Files written in place refuse it; a file replaced whole (metrics.jsonl on --resume) drops it."""
    run = run_for(mode)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"" if (mode, name) == ("fresh", "metrics.jsonl") else SECRET)  # an empty log: an unused dir
    (run / name).unlink(missing_ok=True)
    os.link(target, run / name)
    before = target.read_bytes()
    r = cli_invoke(*start(mode, run, fresh_args))
    if (mode, name) == ("resume", "metrics.jsonl"):
        assert r.exit_code == 0, r.output  # truncate_metrics replaced the log: a new inode of its own
        assert os.stat(run / name).st_nlink == 1 and runlog.read_metrics(run / name)[-1]["step"] == 30
    else:
        assert r.exit_code == 1, r.output
        one_error_line(r.stderr, f"{run / name} has 2 hard links")
    assert target.read_bytes() == before


# ---- files charrnn replaces whole ---------------------------------------------------------------

@pytest.mark.parametrize("planted", ["symlink", "directory"])
@pytest.mark.parametrize("how", ["library", "sample", "plot"])
def test_a_file_replaced_whole_replaces_a_planted_link_and_refuses_a_directory(cli_invoke, finished, tmp_path,
                                                                               how, planted):
    path = {"library": tmp_path / "out.txt", "sample": finished / "samples" / "step-0000030.txt",
            "plot": finished / "plot.png"}[how]
    if how == "plot":
        pytest.importorskip("matplotlib")
    target = tmp_path / "elsewhere"
    target.write_bytes(SECRET)
    if planted == "symlink":
        path.symlink_to(target)
    else:
        path.mkdir()
    if how == "sample":
        r = cli_invoke("train", "--resume", finished, "--set", "train.max_steps=30")  # evaluates and samples at 30
        code, err = r.exit_code, r.stderr
    else:
        from charrnn import plot

        try:
            if how == "library":
                atomic.write_bytes(path, b"new\n")
            else:
                plot.plot_runs([finished], path)
            code, err = 0, ""
        except RunDirError as e:
            code, err = e.exit_code, f"error: {e}"
    assert target.read_bytes() == SECRET
    if planted == "symlink":
        assert code == 0, err
        assert not path.is_symlink() and stat.S_ISREG(path.lstat().st_mode) and path.stat().st_size > 0
    else:
        assert code == 1
        one_error_line(err, f"{path} is a directory")
        assert path.is_dir() and not any(path.iterdir())


# ---- FIFOs: never block on one ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fresh", "resume"])
@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_a_planted_fifo_is_refused_without_blocking(faults, run_for, fresh_args, name, mode):
    run = run_for(mode)
    (run / name).unlink(missing_ok=True)
    os.mkfifo(run / name)
    p = faults.run_module(*start(mode, run, fresh_args), timeout=120)  # the timeout only guards a hang
    assert p.returncode == 1, p.stderr
    one_error_line(p.stderr, f"{run / name} is a named pipe (FIFO)")
    assert stat.S_ISFIFO(os.lstat(run / name).st_mode)


def plant(path, kind, tmp_path):
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link-to-fifo":
        os.mkfifo(tmp_path / "pipe")
        path.symlink_to(tmp_path / "pipe")
    else:  # a link to a file of the user's, which charrnn must not read as the run's
        (tmp_path / "other").write_bytes(SECRET)
        path.symlink_to(tmp_path / "other")


@pytest.mark.parametrize("kind", ["fifo", "link-to-fifo", "link-to-file"])
@pytest.mark.parametrize("name", [*FILES, "checkpoints/last.npz"])
def test_runs_shows_what_it_can_of_a_run_with_special_files(cli_invoke, finished, tmp_path, no_hang, name, kind):
    if not (finished / name).exists():
        (finished / name).write_text("RuntimeError: disk on fire\n")
    plant(finished / name, kind, tmp_path)
    r = cli_invoke("runs", finished, "--json")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    [row] = json.loads(r.stdout)
    assert row["name"] == "run" and row["steps"] == 20 and row["state"] != "running"
    if name in ("failed.txt", "checkpoints/last.npz"):
        assert row["state"] == "failed" and str(finished / name) in row["error"]
    else:
        assert row["state"] == "finished" and row["best_val_bpc"] is not None
    assert cli_invoke("runs", finished).exit_code == 0


# ---- the umask --------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640)])
def test_written_files_follow_the_umask(faults, fresh_args, tmp_path, umask, mode):
    run = tmp_path / "run"
    p = faults.run_module("train", *fresh_args, "--set", "train.max_steps=2", "--set", "train.eval_every=1",
                          "--set", "train.checkpoint_every=1", "--set", "train.keep_last=1", "--run-dir", run,
                          umask=umask)
    assert p.returncode == 0, p.stderr
    files = {str(f.relative_to(run)): stat.S_IMODE(f.stat().st_mode) for f in run.rglob("*") if f.is_file()}
    assert {".lock", "config.yaml", "metrics.jsonl", "checkpoints/last.npz", "checkpoints/best.npz",
            "checkpoints/step-0000001.npz", "samples/step-0000002.txt"} <= set(files)
    assert files == dict.fromkeys(files, mode)
    dirs = [d for d in run.rglob("*") if d.is_dir()]
    assert dirs and all(stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask for d in dirs)


def test_plot_files_follow_the_umask(finished, tmp_path):
    pytest.importorskip("matplotlib")
    from charrnn import plot

    old = os.umask(0o027)
    try:
        out, _ = plot.plot_runs([finished], tmp_path / "curves.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


# ---- hostile values in metrics.jsonl, a checkpoint's meta and config.yaml -----------------------

NAN = float("nan")
HOSTILE = {
    # name: (where, value): "metrics" appends records, "meta" updates last.npz's meta,
    # "config" replaces config.yaml and makes last.npz's meta hold no config
    "step-string": ("metrics", {"step": "25", "val_bpc": 0.001}),
    "step-list": ("metrics", {"step": [25], "val_bpc": 0.001}),
    "step-bool": ("metrics", {"step": True, "val_bpc": 0.001}),
    "step-nan": ("metrics", {"step": NAN, "val_bpc": 0.001}),
    "step-float": ("metrics", {"step": 25.0, "val_bpc": 0.001}),
    "step-negative": ("metrics", {"step": -5, "val_bpc": 0.001}),
    "step-huge": ("metrics", {"step": 10**400, "val_bpc": 0.001}),
    "no-step": ("metrics", {"val_bpc": 0.001}),
    "values-strings": ("metrics", {"step": 20, "val_bpc": "low", "val_loss": "x", "chars_per_sec": "fast",
                                   "train_loss": "x", "grad_norm": "x", "lr": "x", "chars_seen": "x",
                                   "elapsed_s": "x"}),
    "values-odd": ("metrics", {"step": 20, "val_bpc": [0.1], "chars_per_sec": {}, "train_loss": True,
                               "grad_norm": None, "lr": 10**400, "elapsed_s": NAN}),
    "values-nonfinite": ("metrics", {"step": 20, "val_bpc": NAN, "chars_per_sec": float("inf"), "train_loss": NAN}),
    "sigma-odd": ("metrics", {"step": 20, "w_hh_sigma": {"layer0": "x", "layer1": [1], "layer2": NAN}}),
    "sigma-list": ("metrics", {"step": 20, "w_hh_sigma": [1, 2]}),
    "meta-step": ("meta", {"step": "twenty", "chars_seen": "x", "elapsed_s": [], "best_val_loss": "x"}),
    "meta-best": ("meta", {"best_step": [1], "best_val_loss": NAN, "vocab": 5}),
    "meta-config-list": ("meta", {"config": ["model"]}),
    "meta-config-odd": ("meta", {"config": {"model": {"hidden_size": "8", "num_layers": 10**9, "cell": ["rnn"]},
                                            "train": {"max_steps": "six"}}}),
    "config-list": ("config", "- a\n- b\n"),
    "config-odd": ("config", "model: [1]\ntrain: 5\n"),
    "config-values": ("config", "model:\n  hidden_size: -3\n  num_layers: two\n  bidirectional: 'no'\n"
                                "train:\n  max_steps: six\n  clip_norm: lots\n"),
    "config-not-yaml": ("config", "model: {hidden_size: [\n"),
}


def make_hostile(run, where, value):
    if where == "metrics":
        with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(value) + "\n")
        return
    last = run / "checkpoints" / "last.npz"
    ck = checkpoint.load(last)
    meta = {**ck.meta, **value} if where == "meta" else {k: v for k, v in ck.meta.items() if k != "config"}
    checkpoint.save(last, ck.params, meta, ck.optim, ck.state)
    if where == "config":
        (run / "config.yaml").write_text(value, encoding="utf-8")


def check_row(row):
    """Every value in a runs row has its declared type and range."""
    for key in ("params", "max_steps", "chars_seen", "best_step", "layers", "hidden"):
        assert row[key] is None or (type(row[key]) is int and row[key] >= 0), (key, row[key])
    for key in ("best_val_bpc", "chars_per_sec", "elapsed_s"):
        assert row[key] is None or (type(row[key]) is float and math.isfinite(row[key])), (key, row[key])
    assert type(row["steps"]) is int and row["steps"] >= 0
    assert row["cell"] in (None, "rnn", "lstm", "gru") and row["kind"] in (None, "vanilla", "stacked", "bidirectional")


@pytest.mark.parametrize("case", list(HOSTILE))
def test_runs_and_plot_take_hostile_values_as_unknown(cli_invoke, finished, tmp_path, case):
    clean = json.loads(cli_invoke("runs", finished, "--json").stdout)[0]
    where, value = HOSTILE[case]
    make_hostile(finished, where, value)
    r = cli_invoke("runs", finished, "--json")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    [row] = json.loads(r.stdout)
    check_row(row)
    if where == "metrics":  # the hostile record changes nothing it cannot prove
        assert (row["steps"], row["best_val_bpc"], row["best_step"]) == (20, clean["best_val_bpc"], clean["best_step"])
    assert row["steps"] == 20  # from metrics.jsonl even when the meta's step is unreadable
    assert cli_invoke("runs", finished).exit_code == 0
    pytest.importorskip("matplotlib")
    for x in {"metrics": ("step", "chars", "time"), "config": ("step",), "meta": ()}[where]:  # plot reads no meta
        r = cli_invoke("plot", finished, "-o", tmp_path / f"{x}.png", "--x", x)
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
        assert (tmp_path / f"{x}.png").read_bytes()[:4] == b"\x89PNG"
