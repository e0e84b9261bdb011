"""One output path and one-line errors (issue 11): every command's results reach stdout completely
or the command fails with one `error:` line (exit 1), a reader that leaves early gives 141, a
closed stdout is an error, click's usage errors are one line with exit 2, and an unforeseen file
error is one line rather than a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from charrnn import output

WORDS = "a small corpus of words for the output tests, said again and again.\n" * 40


@pytest.fixture(scope="module")
def run(shared_run):
    return shared_run(WORDS)


def charrnn(*args, stdout=subprocess.PIPE, close_stdout=False, **kw) -> subprocess.CompletedProcess:
    """`python -m charrnn ARGS` in a real process (stdout and stderr are real file descriptors)."""
    cmd = [sys.executable, "-m", "charrnn", *map(str, args)]
    if close_stdout:  # the shell's `>&-`
        cmd = ["sh", "-c", 'exec "$@" >&-', "sh", *cmd]
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, timeout=120, **kw)


def one_error_line(stderr: bytes) -> str:
    lines = [line for line in stderr.decode().splitlines() if not line.startswith("seed ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr.decode()
    assert "Traceback" not in stderr.decode()
    return lines[0]


COMMANDS = {  # name -> arguments after the run directory; each prints a result on stdout
    "sample one stream": lambda run: ("sample", run, "--seed", "1", "--length", "3000"),
    "sample a batch": lambda run: ("sample", run, "--seed", "1", "--length", "3000", "-n", "3"),
    "eval": lambda run: ("eval", run),
    "eval --json": lambda run: ("eval", run, "--json"),
    "diagnose": lambda run: ("diagnose", run, "-k", "2", "-T", "8"),
    "runs": lambda run: ("runs", run.parent),
    "list-keys": lambda run: ("train", "--list-keys"),
}


# ---- the Output writer ----------------------------------------------------------------------------

def test_short_writes_are_continued_until_every_byte_is_out(tmp_path, monkeypatch):
    real_write, calls = os.write, []

    def short_write(fd, data):  # a disk or pipe that takes at most 7 bytes per call
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))

    path = tmp_path / "out.txt"
    with open(path, "wb") as f, monkeypatch.context() as m:
        m.setattr(sys, "stdout", f)
        m.setattr(output.os, "write", short_write)
        out = output.Output()
        text = "üñíçødé and ascii, " * 500
        out.write(text)
        out.flush()
    assert path.read_text(encoding="utf-8") == text
    assert len(calls) > len(text.encode()) // 7  # it really was written a few bytes at a time


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_is_one_error_line_and_exit_1(run, command):
    with open("/dev/full", "wb") as full:
        r = charrnn(*COMMANDS[command](run), stdout=full)
    assert r.returncode == 1
    assert "No space left on device" in one_error_line(r.stderr)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_closed_stdout_is_one_error_line_and_exit_1(run, command):
    r = charrnn(*COMMANDS[command](run), close_stdout=True)
    assert r.returncode == 1
    assert "stdout is closed" in one_error_line(r.stderr)


@pytest.mark.parametrize("args", [("--length", "100000"), ("--length", "30000", "-n", "3")], ids=["one stream", "a batch"])
def test_a_reader_that_leaves_early_gives_141(run, args):
    p = subprocess.Popen([sys.executable, "-m", "charrnn", "sample", str(run), "--seed", "1", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(10)) == 10  # like `| head -c 10`
    p.stdout.close()
    assert p.wait(timeout=120) == 141
    assert p.stderr.read() == b""  # no traceback, no message: a closed pipe is not an error
    p.stderr.close()


def test_output_that_fits_is_written_exactly(run, cli_invoke):
    """The same bytes in a real process as in-process (where stdout has no file descriptor)."""
    r = charrnn("sample", run, "--seed", "3", "--length", "500", "-n", "2")
    assert r.returncode == 0
    assert r.stdout.decode() == cli_invoke("sample", run, "--seed", "3", "--length", "500", "-n", "2").stdout


# ---- click's usage errors --------------------------------------------------------------------------

USAGE = {
    "missing argument": ("sample",),
    "unknown option": ("sample", "RUN", "--bogus"),
    "bad number": ("sample", "RUN", "--length", "ten"),
    "out of range": ("sample", "RUN", "--top-k", "0"),
    "bad choice": ("eval", "RUN", "--split", "test"),
    "unknown command": ("sampel",),
    "option without value": ("train", "--set"),
}


@pytest.mark.parametrize("case", USAGE)
def test_usage_errors_are_one_error_line_with_a_help_hint_and_exit_2(cli_invoke, run, case):
    args = [str(run) if a == "RUN" else a for a in USAGE[case]]
    r = cli_invoke(*args)
    assert r.exit_code == 2
    line = one_error_line(r.stderr_bytes)
    assert "--help" in line and "Usage:" not in r.stderr
    assert r.stdout == ""


def test_usage_errors_in_a_real_process(run):
    r = charrnn("sample", run, "--bogus")
    assert r.returncode == 2
    assert one_error_line(r.stderr) == "error: No such option '--bogus'. (see 'charrnn sample --help')"


def test_help_still_exits_0(cli_invoke):
    r = cli_invoke("sample", "--help")
    assert r.exit_code == 0 and "Usage:" in r.stdout


# ---- file errors nobody foresaw -------------------------------------------------------------------

def test_a_path_component_too_long_is_one_line(cli_invoke, tmp_path, write_text, tiny):
    corpus = write_text(WORDS)
    long = tmp_path / ("x" * 300)
    for args in (["train", "--run-dir", long, *tiny.args(corpus)], ["train", "--resume", long],
                 ["sample", long], ["eval", long], ["runs", long]):
        r = cli_invoke(*args)
        assert r.exit_code in (1, 2), (args, r.output)
        assert "too long" in one_error_line(r.stderr_bytes), args
