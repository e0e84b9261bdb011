"""Bad corpora fed to `charrnn train` and `charrnn eval`: random bytes, invalid UTF-8, NUL-heavy
binary, a 1-character file, text shorter than one window, validation splits too small to score.
Each either trains (shrinking what must shrink, with a warning) or stops with one line that
gives the numbers, before any run directory is made."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from charrnn import checkpoint, config, dataset, runlog
from charrnn.errors import DataError


def one_error_line(r) -> str:
    assert isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    return lines[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from([b"\0", b"a", b"\xff", b"\xc3", b"\xa9", b"\n", b" ", b"\xe4\xb8", b"\xad"]),
             max_size=200).map(b"".join),
))
@example(data=b"\0" * 1000)
@example(data=b"\xff\xfe" + "text".encode("utf-16-le"))
@example(data=b"a")
@example(data=b"\xc3")  # a character cut off at the end of the file
def test_random_bytes_give_a_dataset_or_one_data_error(tmp_path, data):
    path = tmp_path / "corpus.bin"
    path.write_bytes(data)
    cfg = config.load(None, [f"data.path={path}"]).data
    try:
        ds = dataset.load(cfg)
    except DataError as e:
        message = str(e)
        assert str(path) in message and "\n" not in message, message
        return
    assert len(ds.train) + (0 if ds.val is None else len(ds.val)) == len(data.decode("utf-8"))
    assert int(ds.train.max()) < len(ds.vocab)


@pytest.mark.parametrize("data, fragment", [
    (bytes(range(256)) * 4, "looks like a binary file (NUL byte at byte offset 0)"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "looks like a binary file (NUL byte at byte offset 8)"),
    (b"text\0" * 50, "looks like a binary file (NUL character at character 4)"),
    (b"hello \xff world", "cannot decode byte offset 6 as utf-8"),
    (b"", "is empty"),
    (b" \n\t ", "holds only whitespace"),
])
def test_unreadable_corpora_stop_before_a_run_directory_is_made(cli_invoke, tmp_path, tiny, data, fragment):
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(data)
    r = cli_invoke("train", *tiny.args(corpus), "--run-dir", tmp_path / "run")
    assert r.exit_code == 1
    line = one_error_line(r)
    assert str(corpus) in line and fragment in line
    assert not (tmp_path / "run").exists()


def test_a_one_character_corpus(cli_invoke, write_text, tmp_path, tiny):
    r = cli_invoke("train", *tiny.args(write_text("a")), "--run-dir", tmp_path / "run")
    assert r.exit_code == 1
    assert "the training text has 1 character(s); next-character training needs at least 3" in one_error_line(r)
    assert not (tmp_path / "run").exists()


def test_a_corpus_shorter_than_one_window_names_the_numbers_and_the_fix(cli_invoke, write_text, tmp_path, tiny):
    """10 characters (9 for training) and seq_len 16: the error says so and suggests seq_len 7;
    nothing is left behind, so the same --run-dir works with the suggestion, which then also
    shrinks the batch and skips evaluation of a 1-character validation split, with warnings."""
    corpus, run = write_text("abcdefghij"), tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus), "--run-dir", run)
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "the training text has 9 characters but train.seq_len=16 needs at least 18" in line
    assert "--set train.seq_len=7" in line
    assert not run.exists()
    r = cli_invoke("train", *tiny.args(corpus, "train.seq_len=7"), "--run-dir", run)
    assert r.exit_code == 0, r.output
    assert "warning: the training text (9 characters) is too short for 8 streams of 8; using train.batch_size=1" in r.stderr
    assert "warning: the validation text has 1 character(s), too few to score; training without evaluation" in r.stderr
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["config"]["train"]["batch_size"] == 1
    assert not (run / "checkpoints" / "best.npz").exists()
    assert all("val_loss" not in rec for rec in runlog.read_metrics(run / "metrics.jsonl"))


@pytest.mark.parametrize("val_fraction, val_chars", [(0.011, 1), (0.001, 0)])
def test_validation_split_too_small_to_score(cli_invoke, write_text, tmp_path, tiny, val_fraction, val_chars):
    """With 1 validation character there is no prediction to score; with 0 there is no text."""
    corpus = write_text(tiny.PHRASE[:100])
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, f"data.val_fraction={val_fraction}", "train.seq_len=8"), "--run-dir", run)
    assert r.exit_code == 0, r.output
    warned = "warning: the validation text has 1 character(s), too few to score" in r.stderr
    assert warned == (val_chars == 1)
    assert "0 validation characters" in r.stderr
    assert not (run / "checkpoints" / "best.npz").exists()
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == 20


def test_eval_of_a_binary_or_undecodable_corpus(cli_invoke, shared_run, tiny, write_text):
    run = shared_run(tiny.PHRASE, "train.max_steps=2")
    for data, fragment in ((b"ab\0cd", "binary file"), (b"ab\xffcd", "cannot decode byte offset 2")):
        path = write_text(data, name="other.txt")
        r = cli_invoke("eval", run, "--corpus", path)
        assert r.exit_code == 1
        assert fragment in one_error_line(r) and str(path) in r.stderr
