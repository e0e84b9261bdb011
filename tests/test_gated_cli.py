"""Every command on gated-cell runs (lstm, gru): train, sample with all its options, infill, eval,
diagnose (alone and beside an rnn), runs, plot and bench."""
from __future__ import annotations

import json

import pytest

from charrnn import checkpoint, runlog

GATED = ("lstm", "gru")


@pytest.fixture(scope="module")
def learned(shared_run, tiny):
    """cell -> a next-char run that has learned the tiny phrase (2 layers, dropout)."""
    return {cell: shared_run(tiny.PHRASE, *tiny.LEARN, f"model.cell={cell}", "model.num_layers=2", "model.dropout=0.1")
            for cell in ("rnn", *GATED)}


@pytest.fixture(scope="module")
def cloze(shared_run, tiny):
    return {cell: shared_run(tiny.PHRASE, *tiny.CLOZE, f"model.cell={cell}", "model.num_layers=2", "train.max_steps=200")
            for cell in GATED}


def out(result):
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("cell", GATED)
def test_a_gated_model_learns_the_phrase_and_samples_it(cli_invoke, learned, cell):
    run = learned[cell]
    assert checkpoint.load(run).spec.cell == cell
    assert json.loads(out(cli_invoke("eval", run, "--json")))["loss"] < 0.1
    text = out(cli_invoke("sample", run, "--greedy", "--prime", "the quick", "-l", "36"))
    assert text.startswith("the quick brown fox jumps over the lazy")


@pytest.mark.parametrize("cell", GATED)
def test_sample_options_on_a_gated_model(cli_invoke, learned, cell):
    run = learned[cell]
    args = ("sample", run, "--seed", "4", "-l", "60", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9")
    first, again = out(cli_invoke(*args)), out(cli_invoke(*args))
    assert first == again and len(first) == 61  # the same seed, the same text
    three = out(cli_invoke(*args, "-n", "3", "--prime", "the"))
    assert three.count("\n---\n") == 2 and all(s.startswith("the") for s in three.split("\n---\n"))
    stopped = out(cli_invoke("sample", run, "--greedy", "--prime", "the", "-l", "200", "--stop", "fox"))
    assert stopped.rstrip("\n").endswith("fox") and len(stopped) < 30


@pytest.mark.parametrize("cell", GATED)
def test_infill_with_a_bidirectional_gated_model(cli_invoke, cloze, cell):
    filled = out(cli_invoke("sample", cloze[cell], "--infill", "the quick br_wn fox jumps _ver the lazy dog.", "--greedy"))
    assert filled == "the quick brown fox jumps over the lazy dog.\n"
    res = cli_invoke("sample", cloze[cell], "-l", "10")
    assert res.exit_code == 2 and "--infill" in res.output


def test_diagnose_compares_an_rnn_and_an_lstm_on_the_same_text(cli_invoke, learned, tmp_path, tiny):
    corpus = tmp_path / "text.txt"
    corpus.write_text(tiny.PHRASE, encoding="utf-8")
    text = out(cli_invoke("diagnose", learned["rnn"], learned["lstm"], "--corpus", corpus, "-k", "4", "-T", "12"))
    assert "gradient flow (rnn cell)" in text and "gradient flow (lstm cell)" in text
    assert "mean tanh'" in text and "mean forget gate" in text
    summary = text.split("comparison:")[1].splitlines()
    assert sum(" rnn " in line for line in summary) == 2 and sum(" lstm " in line for line in summary) == 2
    docs = [json.loads(line) for line in out(cli_invoke("diagnose", learned["rnn"], learned["gru"], "--corpus", corpus,
                                                        "-k", "2", "-T", "6", "--json")).splitlines()]
    assert [d["cell"] for d in docs] == ["rnn", "gru"]
    gru_layer = docs[1]["layers"]["layers.0.fwd"]
    assert set(gru_layer["sigma_max_w_hh_blocks"]) == {"r", "z", "n"} and len(gru_layer["mean_grad_norm"]) == 7


def test_runs_shows_the_cell_and_plot_draws_gate_spectra(cli_invoke, learned, tmp_path):
    for cell, run in learned.items():
        info = json.loads(out(cli_invoke("runs", run.parent, "--json")))
        assert [r["cell"] for r in info] == [cell]
        assert f"{cell} 2x32" in out(cli_invoke("runs", run.parent))
    evals = [r for r in runlog.read_metrics(learned["lstm"] / "metrics.jsonl") if "w_hh_sigma" in r]
    assert set(evals[-1]["w_hh_sigma"]) == {f"layers.{l}.fwd.{g}" for l in (0, 1) for g in "ifgo"}
    pytest.importorskip("matplotlib")  # the plot extra
    png = tmp_path / "p.png"
    out(cli_invoke("plot", learned["rnn"], learned["lstm"], learned["gru"], "-o", png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cell", GATED)
def test_bench_runs_a_gated_config(cli_invoke, tmp_path, corpus, tiny, cell):
    r = json.loads(out(cli_invoke("bench", *tiny.args(corpus, f"model.cell={cell}"), "--steps", "2", "--json")))
    assert r["config"]["cell"] == cell and r["train_chars_per_sec"] > 0 and 0 < r["gemm_fraction"]
    assert r["sample_chars_per_sec"] > 0


WORDS = "a few words for the bench corpus, repeated.\n" * 30
