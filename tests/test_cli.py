"""The command line as a user meets it: help, version, exit codes, one-line errors, plain
progress on a non-terminal, and train -> sample -> eval both in-process and as real processes."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import charrnn
from charrnn import checkpoint

REPO = Path(__file__).resolve().parent.parent
WORDS = " ".join(["alpha", "beta", "gamma", "delta", "fox", "dog", "cat", "tree"][(i * 7 + i // 3) % 8]
                 for i in range(400)) + "\n"


def run_module(*args, timeout=60):
    """`python -m charrnn ARGS` in a real child process (stderr is a pipe, not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "charrnn", *map(str, args)], capture_output=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def words_run(shared_run):
    return shared_run(WORDS)


# ---- help and version ---------------------------------------------------------------------------

def test_help_lists_the_three_commands(cli_invoke):
    r = cli_invoke("--help")
    assert r.exit_code == 0
    for command in ("train", "sample", "eval"):
        assert re.search(rf"^\s+{command}\s", r.stdout, re.M), r.stdout


@pytest.mark.parametrize("command", ["train", "sample", "eval"])
def test_each_command_has_help(cli_invoke, command):
    r = cli_invoke(command, "-h")
    assert r.exit_code == 0
    assert f"charrnn {command}" in r.stdout


def test_version(cli_invoke):
    r = cli_invoke("--version")
    assert r.exit_code == 0
    assert r.stdout.strip() == f"charrnn, version {charrnn.__version__}"


def test_python_dash_m_help_in_a_subprocess():
    p = run_module("--help")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode("utf-8")
    assert "train" in out and "sample" in out and "eval" in out
    assert p.stderr == b""


def test_list_keys_prints_every_config_key(cli_invoke):
    from charrnn import config

    r = cli_invoke("train", "--list-keys")
    assert r.exit_code == 0
    for key in config.all_keys():
        assert re.search(rf"^{re.escape(key)} = ", r.stdout, re.M), key


# ---- exit codes and messages ----------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--temperature", "0"), ("--temperature", "-1"), ("-t", "0"), ("--top-p", "2"), ("--top-p", "0"),
    ("--top-k", "0"), ("--length", "-5"), ("-n", "0"), ("--seed", "-1"), ("--mask", "ab"),
])
def test_bad_sample_options_exit_2_naming_the_option(cli_invoke, words_run, option, value):
    r = cli_invoke("sample", words_run, option, value, "--seed" if option != "--seed" else "--length", "1")
    assert r.exit_code == 2, r.output
    assert option in r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.output


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize("what", ["missing.npz", "missing-run-dir"])
def test_missing_checkpoint_is_one_error_line_exit_1(cli_invoke, tmp_path, command, what):
    target = tmp_path / what
    r = cli_invoke(command, target)
    assert r.exit_code == 1
    assert isinstance(r.exception, SystemExit)  # handled, not a crash
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], r.stderr
    assert r.stdout == ""


def test_run_dir_without_checkpoints_is_one_error_line(cli_invoke, tmp_path):
    r = cli_invoke("eval", tmp_path)
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert "last.npz" in r.stderr


def test_missing_checkpoint_in_a_real_process_has_no_traceback(tmp_path):
    p = run_module("eval", tmp_path / "nope.npz", "--json")
    assert p.returncode == 1
    err = p.stderr.decode("utf-8")
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert p.stdout == b""


def test_garbage_checkpoint_file_is_a_clear_error(cli_invoke, write_text):
    bad = write_text("not a zip file", name="bad.npz")
    r = cli_invoke("sample", bad, "--seed", "1")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and "bad.npz" in r.stderr and len(r.stderr.splitlines()) == 1


def test_unknown_set_key_exits_2_with_a_suggestion(cli_invoke, tmp_path):
    r = cli_invoke("train", "--set", "train.lrr=1e-3", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    assert "did you mean train.lr" in r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_set_value_exits_2(cli_invoke, tmp_path):
    r = cli_invoke("train", "--set", "train.lr=-1", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    assert "train.lr" in r.stderr and "must be > 0" in r.stderr


def test_missing_config_file_exits_2(cli_invoke, tmp_path):
    r = cli_invoke("train", "-c", tmp_path / "nope.yaml", "--run-dir", tmp_path / "run")
    assert r.exit_code == 2
    assert "nope.yaml" in r.stderr


def test_missing_corpus_is_a_data_error(cli_invoke, tmp_path, tiny):
    r = cli_invoke("train", *tiny.args(tmp_path / "nope.txt"), "--run-dir", tmp_path / "run")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and "nope.txt" in r.stderr


def test_resume_with_config_file_is_refused(cli_invoke, tmp_path, write_text):
    cfg = write_text("seed: 1\n", name="c.yaml")
    r = cli_invoke("train", "--resume", tmp_path / "run", "-c", cfg)
    assert r.exit_code == 2
    assert "--resume" in r.stderr


# ---- progress on a non-terminal ---------------------------------------------------------------------

def step0_line(stderr: str, vocab_size: int) -> float:
    """The step-0 loss from the progress output, checking it is printed next to ln V."""
    m = re.search(r"step 0 loss (\d+\.\d+) \(ln V = (\d+\.\d+)", stderr)
    assert m, stderr
    assert float(m.group(2)) == pytest.approx(math.log(vocab_size), abs=1e-4)
    return float(m.group(1))


def test_plain_progress_without_carriage_returns(cli_invoke, write_text, tmp_path, tiny):
    corpus = write_text(WORDS)
    r = cli_invoke("train", *tiny.args(corpus), "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "\r" not in r.stderr
    assert r.stdout == ""  # progress and messages go to stderr only
    V = len(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.npz").meta["vocab"])
    loss0 = step0_line(r.stderr, V)
    assert abs(loss0 - math.log(V)) < 0.3 * math.log(V)  # an untrained model is near uniform
    logged = re.findall(r"^step (\d+) \| loss ", r.stderr, re.M)
    assert [int(s) for s in logged] == [5, 10, 15, 20]  # one plain line per logged step
    assert re.search(r"^step 10 \|.*\| val \d+\.\d+ nats/char", r.stderr, re.M)  # eval_every=10


def test_a_terminal_gets_a_progress_bar_instead(tmp_path, write_text, tiny):
    """The contrast case: stderr on a pseudo-terminal shows a redrawn bar (carriage returns)."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    corpus = write_text(WORDS)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "train", *tiny.args(corpus), "--run-dir", tmp_path / "run"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env, cwd=REPO)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(timeout=60)
    err = b"".join(chunks).decode("utf-8")
    assert proc.returncode == 0, err
    assert re.search(r"\rtrain: 100%\|.*20/20", err), err
    assert "step 0 loss" in err
    assert not re.search(r"^step \d+ \| loss", err.replace("\r", "\n"), re.M)  # no plain log lines


# ---- end to end ---------------------------------------------------------------------------------------

def test_train_sample_eval_in_process(cli_invoke, write_text, tmp_path, tiny):
    corpus = write_text(tiny.PHRASE)
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, *tiny.LEARN), "--run-dir", run)
    assert r.exit_code == 0, r.output
    for f in ("config.yaml", "metrics.jsonl", "checkpoints/last.npz", "checkpoints/best.npz"):
        assert (run / f).is_file(), f
    assert any((run / "samples").iterdir())

    s = cli_invoke("sample", run, "--seed", "3", "--length", "200", "--prime", "the ")
    assert s.exit_code == 0, s.output
    text = s.stdout_bytes.decode("utf-8")
    assert text.startswith("the ") and text.endswith("\n") and len(text) == len("the ") + 200 + 1
    assert "quick brown fox" in text  # the phrase was learned
    assert s.stderr == ""  # a given seed is not echoed; nothing but the text on stdout

    e = cli_invoke("eval", run, "--json")
    assert e.exit_code == 0, e.output
    res = json.loads(e.stdout)
    assert res["objective"] == "next-char" and res["loss"] < 0.1


def test_train_sample_eval_as_real_processes(tmp_path, write_text, tiny):
    corpus = write_text(WORDS)
    run = tmp_path / "run"
    t = run_module("train", *tiny.args(corpus, "train.max_steps=10"), "--run-dir", run)
    err = t.stderr.decode("utf-8")
    assert t.returncode == 0, err
    assert "\r" not in err and t.stdout == b""
    step0_line(err, len(checkpoint.load(run / "checkpoints" / "last.npz").meta["vocab"]))

    s1, s2 = (run_module("sample", run, "--seed", "7", "--length", "80") for _ in range(2))
    assert s1.returncode == 0, s1.stderr
    assert s1.stdout == s2.stdout  # same seed, same text, across processes
    assert len(s1.stdout.decode("utf-8")) == 81

    e = run_module("eval", run, "--json")
    assert e.returncode == 0, e.stderr
    lines = e.stdout.decode("utf-8").splitlines()
    assert len(lines) == 1
    assert set(json.loads(lines[0])) == {"loss", "bpc", "perplexity", "chars", "unk_rate", "objective"}


def test_sample_without_seed_prints_the_seed_and_it_reproduces(cli_invoke, words_run):
    r = cli_invoke("sample", words_run, "--length", "60")
    assert r.exit_code == 0
    m = re.fullmatch(r"seed (\d+)\n", r.stderr)
    assert m, r.stderr
    again = cli_invoke("sample", words_run, "--length", "60", "--seed", m.group(1))
    assert again.stdout_bytes == r.stdout_bytes


def test_refuses_to_overwrite_an_existing_run(cli_invoke, write_text, tmp_path, tiny):
    corpus = write_text(WORDS)
    run = tmp_path / "run"
    assert cli_invoke("train", *tiny.args(corpus, "train.max_steps=3"), "--run-dir", run).exit_code == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = cli_invoke("train", *tiny.args(corpus, "train.max_steps=6", "seed=5"), "--run-dir", run)
    assert r.exit_code != 0
    assert r.stderr.startswith("error: ") and "already exists" in r.stderr and "--resume" in r.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_an_empty_existing_directory_may_be_used(cli_invoke, write_text, tmp_path, tiny):
    corpus = write_text(WORDS)
    run = tmp_path / "empty"
    run.mkdir()
    assert cli_invoke("train", *tiny.args(corpus, "train.max_steps=2"), "--run-dir", run).exit_code == 0
    assert (run / "checkpoints" / "last.npz").is_file()


def test_default_run_dir_is_under_runs_named_after_the_run(cli_invoke, write_text, tmp_path, tiny, monkeypatch):
    corpus = write_text(WORDS)
    monkeypatch.chdir(tmp_path)
    r = cli_invoke("train", *tiny.args(corpus, "train.max_steps=2", "name=tinyrun"))
    assert r.exit_code == 0, r.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"tinyrun-\d{8}-\d{6}", runs[0].name)
    assert (runs[0] / "checkpoints" / "last.npz").is_file()
