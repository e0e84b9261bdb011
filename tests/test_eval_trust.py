"""What eval and diagnose read (issue 11): a checkpoint's meta never chooses the text read or a
directory written; a bare checkpoint needs --corpus; a run's own config.yaml names its corpus;
a corpus changed since training is reported; results that are not finite are an error, so that
--json output is always JSON."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from charrnn import checkpoint

WORDS = "words to score, words to diagnose, and nothing else in this corpus.\n" * 40


@pytest.fixture(scope="module")
def run(shared_run):
    return shared_run(WORDS)


def rewrite(src, dst, meta_config=None, scale=None):
    """A copy of the checkpoint at src with parts of its meta's config replaced (or the output layer set
    to huge, finite values, whose logits overflow)."""
    ck = checkpoint.load(src)
    meta = json.loads(json.dumps(ck.meta))
    for section, values in (meta_config or {}).items():
        meta["config"][section].update(values)
    params = dict(ck.params)
    if scale is not None:  # every output weight and bias `scale` times the dtype's largest number
        for name in ("out.W_ho", "out.b_o"):
            params[name] = np.full_like(params[name], scale * float(np.finfo(params[name].dtype).max))
    dst.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(dst, params, meta, ck.optim, ck.state)
    return dst


def one_error_line(r) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture
def planted(tmp_path, run):
    """A checkpoint whose meta names a 'secret' file as its corpus and another cache directory."""
    secret = tmp_path / "secret.txt"
    secret.write_text("a file the user never named\n" * 20, encoding="utf-8")
    evil_cache = tmp_path / "evil-cache"
    config = {"data": {"path": str(secret), "val_path": str(secret), "cache_dir": str(evil_cache)}}
    return secret, evil_cache, config


@pytest.mark.parametrize("command", [("eval",), ("eval", "--json"), ("diagnose", "-k", "2")])
def test_a_bare_checkpoint_needs_corpus_and_its_meta_chooses_nothing(cli_invoke, tmp_path, run, planted, write_text, command):
    secret, evil_cache, config = planted
    bare = rewrite(run / "checkpoints" / "last.npz", tmp_path / "downloads" / "model.npz", config)
    r = cli_invoke(command[0], bare, *command[1:])
    assert r.exit_code == 2
    assert "--corpus" in one_error_line(r)
    text = write_text(WORDS[:500], "mine.txt")
    r = cli_invoke(command[0], bare, *command[1:], "--corpus", text)
    assert r.exit_code == 0, r.output
    assert not evil_cache.exists()  # nothing was written where the checkpoint said


def test_a_run_directory_reads_its_own_config_not_the_checkpoint_meta(cli_invoke, tmp_path, run, planted):
    secret, evil_cache, config = planted
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    rewrite(run / "checkpoints" / "best.npz", copy / "checkpoints" / "best.npz", config)
    mine, theirs = cli_invoke("eval", run, "--json"), cli_invoke("eval", copy, "--json")
    assert mine.exit_code == 0 and theirs.exit_code == 0, theirs.output
    assert json.loads(theirs.stdout) == json.loads(mine.stdout)  # the run's own corpus was scored
    assert not evil_cache.exists()


def test_a_run_directory_without_its_config_needs_corpus(cli_invoke, tmp_path, run):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "config.yaml").unlink()
    (copy / "config.yaml").symlink_to(run / "config.yaml")  # not a file of the run: not trusted
    r = cli_invoke("eval", copy)
    assert r.exit_code == 2 and "--corpus" in one_error_line(r)


def test_a_corpus_changed_since_training_is_reported(cli_invoke, tmp_path, shared_run):
    run = shared_run(WORDS, "train.max_steps=5")
    copy = tmp_path / "copy"
    shutil.copytree(run.parent, copy)  # the run and its corpus.txt, cache and all
    config = (copy / "run" / "config.yaml").read_text(encoding="utf-8")
    (copy / "run" / "config.yaml").write_text(config.replace(str(run.parent), str(copy)), encoding="utf-8")
    corpus = copy / "corpus.txt"
    corpus.write_text("".join(reversed(WORDS)), encoding="utf-8")  # the same characters, other text
    r = cli_invoke("eval", copy / "run", "--json")
    assert r.exit_code == 0, r.output
    assert "changed since the checkpoint was written" in r.stderr
    assert json.loads(r.stdout)["chars"] > 0
    r = cli_invoke("eval", copy / "run", "--json", "--corpus", corpus)
    assert r.exit_code == 0 and r.stderr == ""  # an explicit --corpus is not a surprise


@pytest.mark.parametrize("args", [("--json",), ()])
def test_a_non_finite_score_is_an_error_and_never_invalid_json(cli_invoke, tmp_path, run, args):
    huge = rewrite(run / "checkpoints" / "last.npz", tmp_path / "run" / "checkpoints" / "last.npz", scale=0.9)
    shutil.copy(run / "config.yaml", tmp_path / "run" / "config.yaml")
    assert np.isfinite(checkpoint.load(huge).params["out.W_ho"]).all()  # loads: every weight is finite
    r = cli_invoke("eval", tmp_path / "run", *args)
    assert r.exit_code == 1
    assert "not finite" in one_error_line(r) or "overflow" in one_error_line(r)
    assert r.stdout == ""


def test_a_text_of_only_unknown_characters_says_so(cli_invoke, run, shared_run, write_text):
    german = write_text("ÄÖÜß" * 30, "german.txt")
    r = cli_invoke("eval", run, "--corpus", german)  # no unknown symbol: nothing is left to score
    assert r.exit_code == 1
    assert "none of the" in one_error_line(r) and "vocabulary" in one_error_line(r)
    with_unk = shared_run(WORDS + "§")  # '§' only in the validation tail: the vocabulary gets an unknown symbol
    r = cli_invoke("eval", with_unk, "--corpus", german, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["unk_rate"] == 1.0
    assert r.stderr.startswith("warning: every character of the text is outside the model's vocabulary")


def test_a_huge_seq_len_in_meta_does_not_decide_evals_memory(tmp_path, run):
    """A meta's train.seq_len of 10**6 once made eval hold windows of 32 x 45,000 positions
    (4 GB for a 3 MB text); windows are now sized by a memory budget, with the same score."""
    import subprocess
    import sys

    # the child reports its own peak RSS at exit (KiB on Linux), whatever ran before it
    report = ("import atexit, resource, sys; atexit.register(lambda: sys.stderr.write("
              "'PEAK %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "
              "from charrnn.cli import main; sys.argv[0] = 'charrnn'; main()")
    text = tmp_path / "big.txt"
    text.write_text(WORDS * 700, encoding="utf-8")  # about 1.4 MB
    scores, peaks = {}, {}
    for seq_len in (16, 10**6):
        ck = rewrite(run / "checkpoints" / "last.npz", tmp_path / f"seq{seq_len}.npz", {"train": {"seq_len": seq_len}})
        r = subprocess.run([sys.executable, "-c", report, "eval", str(ck), "--corpus", str(text), "--json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        scores[seq_len], peaks[seq_len] = json.loads(r.stdout), int(r.stderr.split("PEAK")[-1]) / 1024
    assert peaks[10**6] < 400, peaks
    assert scores[10**6]["chars"] == scores[16]["chars"]
    assert scores[10**6]["loss"] == pytest.approx(scores[16]["loss"], rel=1e-6)  # float32 model
