"""Format-1 checkpoints (written before gated cells) keep working with the same numbers and text.

tests/fixtures/v1 holds two tiny runs written by the last format-1 release (a stacked next-char
model with dropout and a bidirectional cloze model), their corpus, and expected.json: what that
release printed for eval, sample, diagnose, and the metrics of --resume and --init-from runs
(tests/fixtures/v1/make_v1.py made them). Every command must reproduce them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from charrnn import checkpoint, runlog

FIXTURE = Path(__file__).parent / "fixtures" / "v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
TIMING = {"elapsed_s", "chars_per_sec", "time", "eta_s", "step_s"}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A writable copy of the fixture, as the working directory (its configs name corpus.txt)."""
    shutil.copytree(FIXTURE, tmp_path / "v1")
    monkeypatch.chdir(tmp_path / "v1")
    return tmp_path / "v1"


def run_ok(cli_invoke, *args):
    r = cli_invoke(*args)
    assert r.exit_code == 0, r.output
    return r.stdout if hasattr(r, "stdout") else r.output


def test_a_format_1_checkpoint_loads_as_an_rnn_model(runs):
    ck = checkpoint.load(runs / "next-char")
    assert ck.meta["format_version"] == 1 and "cell" not in ck.meta["config"]["model"]
    assert (ck.spec.cell, ck.spec.L, ck.spec.H, ck.spec.bidirectional) == ("rnn", 2, 12, False)


def test_eval_gives_the_same_numbers(runs, cli_invoke):
    assert json.loads(run_ok(cli_invoke, "eval", "next-char", "--json")) == EXPECTED["eval_val"]
    got = json.loads(run_ok(cli_invoke, "eval", "next-char/checkpoints/last.npz", "--corpus", "corpus.txt", "--json"))
    assert got == EXPECTED["eval_corpus"]
    assert json.loads(run_ok(cli_invoke, "eval", "cloze", "--json")) == EXPECTED["cloze_eval"]


def test_sample_and_infill_give_the_same_text(runs, cli_invoke):
    assert run_ok(cli_invoke, "sample", "next-char", "--greedy", "-l", "60", "--prime", "it was") == EXPECTED["greedy"]
    assert run_ok(cli_invoke, "sample", "next-char", "--seed", "3", "-l", "60", "-n", "2") == EXPECTED["seeded"]
    assert run_ok(cli_invoke, "sample", "cloze", "--infill", "it was the ___ of times", "--seed", "1") == EXPECTED["infill"]


def test_diagnose_gives_the_same_profile(runs, cli_invoke):
    layers = json.loads(run_ok(cli_invoke, "diagnose", "next-char", "-k", "3", "-T", "8", "--json"))["layers"]
    assert set(layers) == set(EXPECTED["diagnose"])
    for name, old in EXPECTED["diagnose"].items():
        new = layers[name]
        assert new["mean_grad_norm"] == pytest.approx(old["mean_grad_norm"], rel=1e-12)
        assert new["factor_per_step"] == pytest.approx(old["factor_per_step"], rel=1e-12)
        assert new["sigma_max_w_hh"] == pytest.approx(old["sigma_max_w_hh"], rel=1e-12)
        assert new["carry_stats"]["mean tanh'"] == pytest.approx(old["mean_tanh_prime"], rel=1e-12)
        assert new["carry_stats"]["rms tanh'"] == pytest.approx(old["rms_tanh_prime"], rel=1e-12)


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_resume_and_init_from_continue_exactly(runs, cli_invoke):
    run_ok(cli_invoke, "train", "--resume", "next-char", "--set", "train.max_steps=9")
    assert _strip(runlog.read_metrics(runs / "next-char" / "metrics.jsonl")) == _strip(EXPECTED["resume_metrics"])
    resumed = checkpoint.load(runs / "next-char" / "checkpoints" / "last.npz")
    assert resumed.meta["format_version"] == checkpoint.FORMAT_VERSION and resumed.meta["config"]["model"]["cell"] == "rnn"
    common = ["--set", "data.path=corpus.txt", "--set", "model.hidden_size=12", "--set", "train.batch_size=4",
              "--set", "train.seq_len=16", "--set", "train.eval_every=3", "--set", "train.log_every=1",
              "--set", "train.sample_chars=0", "--set", "seed=7"]
    run_ok(cli_invoke, "train", *common, "--set", "model.num_layers=2", "--set", "train.max_steps=3",
           "--init-from", str(FIXTURE / "next-char" / "checkpoints" / "last.npz"), "--run-dir", "init")
    assert _strip(runlog.read_metrics(runs / "init" / "metrics.jsonl")) == _strip(EXPECTED["init_metrics"])
