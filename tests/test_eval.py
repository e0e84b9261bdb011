"""`charrnn eval`: the score of a short text is exactly the model's own mean loss over it, the
JSON shape, the run's own splits, unknown characters and the cloze objective."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from charrnn import checkpoint, config, dataset, model, runlog
from charrnn.vocab import Vocab

KEYS = {"loss", "bpc", "perplexity", "chars", "unk_rate", "objective"}
OTHER = "the lazy dog jumps over the quick brown fox.\n" * 50  # same characters, another order


@pytest.fixture(scope="module")
def learned(shared_run, tiny):
    return shared_run(tiny.PHRASE, *tiny.LEARN)  # float64


@pytest.fixture(scope="module")
def cloze(shared_run, tiny):
    return shared_run(tiny.PHRASE, *tiny.CLOZE, "train.dtype=float64")


def eval_json(cli_invoke, target, *args) -> dict:
    r = cli_invoke("eval", target, "--json", *args)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout  # exactly one JSON object
    return json.loads(lines[0])


@pytest.mark.parametrize("n", [2, 17, 450, 1999])
def test_eval_of_a_short_text_equals_the_model_loss(cli_invoke, learned, write_text, n):
    text = OTHER[:n]
    ck = checkpoint.load(learned / "checkpoints" / "last.npz")
    assert ck.params["out.W_ho"].dtype == np.float64
    res = eval_json(cli_invoke, ck.path, "--corpus", write_text(text))
    ids = Vocab.from_json(ck.meta).encode(text).astype(np.intp)
    expected = model.loss_and_grads(ck.spec, ck.params, ids[None, :-1], ids[None, 1:]).loss  # one stream, zero state
    assert res["loss"] == pytest.approx(expected, rel=1e-6)
    assert res["chars"] == n - 1
    assert res["bpc"] == pytest.approx(res["loss"] / math.log(2), rel=1e-12)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)
    assert res["unk_rate"] == 0 and res["objective"] == "next-char"


def test_eval_of_an_untrained_model_equals_the_model_loss(cli_invoke, shared_run, write_text, tiny):
    """At init the loss is high everywhere, so a mistake in state carrying cannot hide."""
    run = shared_run(tiny.PHRASE, "train.max_steps=0", "train.dtype=float64", "model.num_layers=2")
    ck = checkpoint.load(run)
    text = OTHER[:1000]
    ids = Vocab.from_json(ck.meta).encode(text).astype(np.intp)
    expected = model.loss_and_grads(ck.spec, ck.params, ids[None, :-1], ids[None, 1:]).loss
    assert eval_json(cli_invoke, run, "--corpus", write_text(text))["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("windows", [1, 3])
def test_cloze_eval_equals_the_model_loss(cli_invoke, cloze, write_text, windows):
    ck = checkpoint.load(cloze / "checkpoints" / "last.npz")
    text = OTHER[: 16 * windows]  # whole windows of train.seq_len
    ids = Vocab.from_json(ck.meta).encode(text).astype(np.intp)
    expected = model.loss_and_grads(ck.spec, ck.params, ids.reshape(windows, 16)).loss
    res = eval_json(cli_invoke, ck.path, "--corpus", write_text(text))
    assert res["objective"] == "cloze"
    assert res["chars"] == 16 * windows
    assert res["loss"] == pytest.approx(expected, rel=1e-6)


def test_json_has_exactly_the_documented_keys(cli_invoke, learned, cloze):
    for run, objective in ((learned, "next-char"), (cloze, "cloze")):
        res = eval_json(cli_invoke, run)
        assert set(res) == KEYS
        assert res["objective"] == objective
        assert isinstance(res["chars"], int) and res["chars"] > 0
        assert all(isinstance(res[k], float) and math.isfinite(res[k]) for k in ("loss", "bpc", "perplexity", "unk_rate"))


def test_human_readable_output(cli_invoke, learned):
    r = cli_invoke("eval", learned)
    assert r.exit_code == 0
    for word in ("objective", "loss", "bpc", "perplexity", "chars", "unk_rate"):
        assert word in r.stdout
    assert "nats/char" in r.stdout and r.stderr == ""


def test_splits_are_the_runs_own_train_and_val_text(cli_invoke, learned):
    last = learned / "checkpoints" / "last.npz"
    ck = checkpoint.load(last)
    data = dataset.load(config.from_dict(ck.meta["config"], "meta").data)
    val = eval_json(cli_invoke, last, "--split", "val")
    assert val == eval_json(cli_invoke, last)  # val is the default
    assert val["chars"] == len(data.val) - 1
    final = runlog.read_metrics(learned / "metrics.jsonl")[-1]
    assert final["step"] == ck.meta["step"]
    assert val["loss"] == pytest.approx(final["val_loss"], rel=1e-12)  # what training measured
    train = eval_json(cli_invoke, last, "--split", "train")
    assert train["chars"] == len(data.train) - 1
    assert train["loss"] != val["loss"] and train["loss"] < 0.1


def test_split_val_without_validation_text(cli_invoke, shared_run, tiny):
    run = shared_run(tiny.PHRASE, "data.val_fraction=0", "train.max_steps=2")
    r = cli_invoke("eval", run, "--split", "val")
    assert r.exit_code == 2
    assert "--split train" in r.stderr
    assert eval_json(cli_invoke, run, "--split", "train")["chars"] == len(tiny.PHRASE) - 1


@pytest.mark.parametrize("with_unk", [False, True])
def test_unknown_characters_in_a_corpus(cli_invoke, shared_run, write_text, tiny, with_unk):
    run = shared_run("Q" + tiny.PHRASE, "data.min_count=2") if with_unk else shared_run(tiny.PHRASE)
    text = OTHER[:190] + "Z" * 10  # 10 of 200 characters are unknown
    res = eval_json(cli_invoke, run, "--corpus", write_text(text))
    assert res["unk_rate"] == pytest.approx(0.05)
    # with an unknown symbol they are scored as it; without one they are left out
    assert res["chars"] == (199 if with_unk else 189)


def test_unicode_corpus(cli_invoke, shared_run, write_text):
    poem = "春眠不觉晓，处处闻啼鸟。🌸🐦\n"
    run = shared_run(poem * 60, "train.dtype=float64", "train.max_steps=5")
    ck = checkpoint.load(run)
    ids = Vocab.from_json(ck.meta).encode(poem * 3).astype(np.intp)
    expected = model.loss_and_grads(ck.spec, ck.params, ids[None, :-1], ids[None, 1:]).loss
    res = eval_json(cli_invoke, run, "--corpus", write_text(poem * 3))
    assert res["chars"] == len(poem * 3) - 1 and res["loss"] == pytest.approx(expected, rel=1e-6)


def test_corpus_errors(cli_invoke, learned, write_text, tmp_path):
    r = cli_invoke("eval", learned, "--corpus", tmp_path / "missing.txt")
    assert r.exit_code == 1 and "missing.txt" in r.stderr and r.stderr.startswith("error: ")
    r = cli_invoke("eval", learned, "--corpus", write_text("", name="empty.txt"))
    assert r.exit_code == 1 and "empty" in r.stderr
    r = cli_invoke("eval", learned, "--corpus", write_text("t", name="one.txt"))
    assert r.exit_code == 1 and "at least 2" in r.stderr
    r = cli_invoke("eval", learned, "--split", "test")
    assert r.exit_code == 2 and "--split" in r.stderr
