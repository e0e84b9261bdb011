"""`charrnn bench`: the numbers a user picks a model size by, as text or one JSON object."""
from __future__ import annotations

import json

import pytest

KEYS = {"train_chars_per_sec", "sample_chars_per_sec", "peak_rss_mib", "gemm_fraction"}


def bench(cli_invoke, write_text, tiny, *extra):
    corpus = write_text(tiny.PHRASE)
    result = cli_invoke("bench", *tiny.args(corpus), "--steps", "3", "--warmup", "1", "--sample-chars", "40", *extra)
    assert result.exit_code == 0, result.stderr
    return result


def test_json_has_the_documented_numbers(cli_invoke, write_text, tiny):
    r = json.loads(bench(cli_invoke, write_text, tiny, "--json").stdout)
    assert KEYS <= set(r)
    assert r["steps_timed"] == 3
    assert r["train_chars_per_sec_min"] <= r["train_chars_per_sec"] <= r["train_chars_per_sec_max"]
    assert r["train_chars_per_sec"] == pytest.approx(8 * 16 / (r["step_ms"] / 1e3))  # N x T = 8 x 16
    assert r["sample_chars_per_sec"] > 0 and r["sample_32_streams_chars_per_sec"] > 0
    assert 0 < r["gemm_fraction"] and r["gemm_gflops"] > 0 and r["peak_rss_mib"] > 10
    assert r["config"] == {"cell": "rnn", "hidden_size": 16, "num_layers": 1, "bidirectional": False, "vocab": 29,
                           "batch_size": 8, "seq_len": 16, "optimizer": "adam", "dtype": "float32", "threads": 1}


def test_a_time_floor_times_more_steps_than_the_minimum(cli_invoke, write_text, tiny):
    # a 16-unit step is tiny: half a second holds far more than 3 of them (benchmarks/README.md)
    r = json.loads(bench(cli_invoke, write_text, tiny, "--seconds", "0.5", "--json").stdout)
    assert r["steps_timed"] > 3


def test_a_cloze_model_has_no_sampling_rate_and_text_output_names_every_number(cli_invoke, write_text, tiny):
    r = json.loads(bench(cli_invoke, write_text, tiny, "--set", "model.bidirectional=true", "--json").stdout)
    assert r["sample_chars_per_sec"] is None and r["config"]["bidirectional"] is True
    text = bench(cli_invoke, write_text, tiny).stdout
    for label in ("model", "train", "sample", "GEMM", "peak RSS"):
        assert any(line.startswith(label) for line in text.splitlines()), text


def test_synthetic_vocabulary(cli_invoke, write_text, tiny):
    r = json.loads(bench(cli_invoke, write_text, tiny, "--vocab", "3000", "--json").stdout)
    assert r["config"]["vocab"] == 3000
