"""The Python API (charrnn.load, Model, charrnn.train) against the command line it sits under:
the same seed gives the same text as `charrnn sample`, score() the numbers of `eval --json`,
charrnn.train the run of `charrnn train`; failures are exceptions whose message speaks Python."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import charrnn
from charrnn import config
from charrnn.errors import CharRNNError, CheckpointError, ConfigError, DataError, UsageError
from charrnn.vocab import UNK

TIMING = ("elapsed_s", "chars_per_sec")  # the only fields of metrics.jsonl that differ between runs


@pytest.fixture(scope="module")
def run(shared_run, tiny):
    """A next-char run, trained a little (its samples still vary with the seed)."""
    return shared_run(tiny.PHRASE)


@pytest.fixture(scope="module")
def cloze(shared_run, tiny):
    return shared_run(tiny.PHRASE, *tiny.CLOZE)


@pytest.fixture(scope="module")
def with_unk(shared_run, tiny):
    """A model with an unknown symbol: 'Q' and 'J' occur once and data.min_count is 2."""
    return shared_run(tiny.PHRASE + "Quick Jumps\n", "data.min_count=2")


# ---- sampling: the same text as `charrnn sample` -------------------------------------------------

FLAGS = {"length": "-l", "prime": "--prime", "temperature": "-t", "top_k": "--top-k", "top_p": "--top-p",
         "n": "-n", "stop": "--stop", "seed": "--seed"}
REQUESTS = [
    dict(length=60, seed=1),
    dict(length=60, seed=2, prime="the quick"),
    dict(length=60, seed=3, temperature=0.6, top_k=4),
    dict(length=60, seed=3, top_p=0.8, temperature=1.5),
    dict(length=60, seed=4, greedy=True),
    dict(length=200, seed=5, stop="fox"),
    dict(length=0, seed=6, prime="lazy "),
    dict(length=40, seed=7, n=3, prime="dog", top_k=3),
    dict(length=200, seed=8, n=4, stop="."),
    dict(length=30, seed=9, n=1),
]


def cli_args(request: dict) -> list[str]:
    args = ["--greedy"] if request.get("greedy") else []
    for key, value in request.items():
        if key != "greedy":
            args += [FLAGS[key], str(value)]
    return args


@pytest.mark.parametrize("request_", REQUESTS, ids=[",".join(r) for r in REQUESTS])
def test_sample_with_a_seed_is_what_charrnn_sample_prints(cli_invoke, run, request_):
    r = cli_invoke("sample", run, *cli_args(request_))
    assert r.exit_code == 0 and r.stderr == "", r.output
    got = charrnn.load(run).sample(**request_)
    if "n" in request_:
        assert isinstance(got, list) and len(got) == request_["n"]
        assert all(text.startswith(request_.get("prime", "")) for text in got)
        got = "\n---\n".join(got)
    assert r.stdout_bytes == (got + "\n").encode("utf-8")


def test_samples_vary_with_the_seed_and_a_generator_seed_is_drawn_from(run):
    model = charrnn.load(run)
    assert model.sample(80, seed=1) != model.sample(80, seed=2)
    assert model.sample(80, seed=np.random.default_rng(1)) == model.sample(80, seed=1)
    rng = np.random.default_rng(1)
    assert model.sample(80, seed=rng) != model.sample(80, seed=rng)  # the second call continues the stream


def test_stream_yields_the_sample_as_it_is_generated(run):
    model = charrnn.load(run)
    pieces = list(model.stream(50, prime="the ", seed=3))
    assert "".join(pieces) == model.sample(50, prime="the ", seed=3)
    assert len(pieces) == 50 and pieces[0].startswith("the ") and len(pieces[0]) == 5
    assert all(len(p) == 1 for p in pieces[1:])
    stopped = list(model.stream(500, seed=3, stop="o"))
    assert "".join(stopped).endswith("o") and "".join(stopped).count("o") == 1
    assert list(model.stream(0, prime="ab", seed=1)) == ["ab"] and list(model.stream(0, seed=1)) == []


def test_a_refused_stream_raises_when_called_not_when_read(run, cloze):
    with pytest.raises(UsageError, match="cloze"):
        charrnn.load(cloze).stream(10, seed=1)
    with pytest.raises(UsageError, match="temperature"):
        charrnn.load(run).stream(10, temperature=0)


def test_infill_is_what_charrnn_sample_infill_prints(cli_invoke, cloze):
    model = charrnn.load(cloze)
    for template, mask, seed in [("the qu_ck br_wn fox", "_", 1), ("j#mps over th# l#zy dog", "#", 2)]:
        r = cli_invoke("sample", cloze, "--infill", template, "--mask", mask, "--seed", seed)
        assert r.exit_code == 0 and r.stderr == ""
        filled = model.infill(template, mask=mask, seed=seed)
        assert r.stdout_bytes == (filled + "\n").encode("utf-8")
        assert len(filled) == len(template) and mask not in filled
    assert model.infill("the qu_ck", greedy=True) == model.infill("the qu_ck", greedy=True, seed=5)


# ---- scoring: the numbers of `charrnn eval --json` ----------------------------------------------

TEXTS = ["the quick brown fox jumps over the lazy dog.\n" * 3, "a cat sat on the mat",
         "the Quick brown fox: Jumps! 狐狸\r\n", "dog."]


@pytest.mark.parametrize("which", ["run", "cloze", "with_unk"])
def test_score_is_eval_json_on_a_file_holding_the_text(cli_invoke, write_text, request, which):
    ck = request.getfixturevalue(which) / "checkpoints" / "last.npz"
    model = charrnn.load(ck)
    for i, text in enumerate(TEXTS):
        path = write_text(text, name=f"text{i}.txt")
        r = cli_invoke("eval", ck, "--corpus", path, "--json")
        assert r.exit_code == 0, r.output
        assert model.score(text) == json.loads(r.stdout)
        assert model.score_file(path) == model.score(text)
    scored = model.score(TEXTS[2])
    assert scored["unk_rate"] > 0 and set(scored) == {"loss", "bpc", "perplexity", "chars", "unk_rate", "objective"}


def test_score_refuses_what_eval_refuses(run, write_text, cli_invoke):
    model = charrnn.load(run)
    for text, words in [("", "empty"), ("t", "at least 2"), ("ab\0cd", "NUL"), ("ZZZ", "none of the 3")]:
        with pytest.raises(DataError, match=words):
            model.score(text)
        if text:  # a file of the same text is refused by the command too
            r = cli_invoke("eval", run / "checkpoints" / "last.npz", "--corpus", write_text(text, name="t.txt"))
            assert r.exit_code == 1 and r.stderr.startswith("error: ")
    with pytest.raises(DataError, match="surrogate"):
        model.score("the \ud800 dog")


# ---- the model's data -----------------------------------------------------------------------------

def test_model_exposes_plain_data(run, with_unk):
    model = charrnn.load(run)
    ck = np.load(run / "checkpoints" / "best.npz", allow_pickle=False)
    meta = json.loads(str(ck["meta"]))
    assert model.path == run / "checkpoints" / "best.npz" and model.step == meta["step"]
    assert model.vocab == meta["vocab"] and model.unk is None and charrnn.load(with_unk).unk == UNK
    assert model.config == yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert model.objective == "next-char" and model.spec.H == model.config["model"]["hidden_size"]
    params = model.params
    assert set(params) == {k for k in ck.files if k != "meta" and "/" not in k}
    for name, array in params.items():
        np.testing.assert_array_equal(array, ck[name])
        with pytest.raises(ValueError):
            array[...] = 0  # read-only: every call shares them
    model.config["train"]["lr"] = 1.0
    model.meta["vocab"].clear()
    assert model.config["train"]["lr"] != 1.0 and model.meta["vocab"] == meta["vocab"]  # copies
    assert "next-char" in repr(model)


# ---- training: the run of `charrnn train` -----------------------------------------------------------

def as_dict(sets: list[str]) -> dict:
    """KEY=VALUE strings as a dict of the YAML's shape."""
    doc: dict = {}
    for key, value in map(config.parse_set, sets):
        section, _, name = key.rpartition(".")
        (doc.setdefault(section, {}) if section else doc)[name or key] = value
    return doc


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_same_run(a, b) -> None:
    assert metrics(a) == metrics(b) and len(metrics(a)) > 2
    assert (a / "config.yaml").read_text(encoding="utf-8") == (b / "config.yaml").read_text(encoding="utf-8")
    names = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (b / "checkpoints").iterdir())
    for name in names:
        x, y = np.load(a / "checkpoints" / name), np.load(b / "checkpoints" / name)
        assert x.files == y.files
        for key in x.files:
            if key != "meta":
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}: {key}")
    samples = [sorted(p.read_text() for p in (run / "samples").iterdir()) for run in (a, b)]
    assert samples[0] == samples[1] and samples[0]


def test_train_from_python_writes_the_run_charrnn_train_writes(cli_invoke, write_text, tmp_path, tiny, capfd):
    corpus = write_text(tiny.PHRASE)
    sets = tiny.sets(corpus, "train.checkpoint_every=10")
    r = cli_invoke("train", *tiny.args(corpus, "train.checkpoint_every=10"), "--run-dir", tmp_path / "cli")
    assert r.exit_code == 0, r.output
    capfd.readouterr()
    summary = charrnn.train(as_dict(sets), run_dir=tmp_path / "api")
    assert capfd.readouterr() == ("", "")  # quiet unless asked
    assert summary.run_dir == tmp_path / "api" and summary.steps == 20 and summary.interrupted is None
    assert summary.best_checkpoint == tmp_path / "api" / "checkpoints" / "best.npz"
    assert_same_run(tmp_path / "cli", tmp_path / "api")
    # a YAML file with overrides, and a Config, give the same run too
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(as_dict(sets[:4])), encoding="utf-8")
    charrnn.train(tmp_path / "tiny.yaml", run_dir=tmp_path / "yaml", sets=sets[4:])
    assert_same_run(tmp_path / "cli", tmp_path / "yaml")
    charrnn.train(config.load(None, sets), tmp_path / "config")
    assert_same_run(tmp_path / "cli", tmp_path / "config")


def test_train_resolves_paths_and_run_dirs_as_the_command_does(write_text, tmp_path, tiny, monkeypatch):
    write_text(tiny.PHRASE, name="work/corpus.txt")
    monkeypatch.chdir(tmp_path / "work")
    doc = as_dict(tiny.sets("corpus.txt"))
    doc["name"] = "tiny"
    summary = charrnn.train(doc)
    assert summary.run_dir.parent == __import__("pathlib").Path("runs") and summary.run_dir.name.startswith("tiny-")
    model = charrnn.load(summary.run_dir)
    assert model.config["data"]["path"] == str(tmp_path / "work" / "corpus.txt")  # absolute
    # a model's config trains the same model again
    again = charrnn.train(model.config, run_dir=tmp_path / "again")
    assert metrics(again.run_dir) == metrics(summary.run_dir)


def test_train_resumes_a_run_with_a_dict_of_run_length_keys(write_text, tmp_path, tiny, cli_invoke):
    corpus = write_text(tiny.PHRASE)
    charrnn.train(as_dict(tiny.sets(corpus)), tmp_path / "api")
    r = cli_invoke("train", *tiny.args(corpus), "--run-dir", tmp_path / "cli")
    assert r.exit_code == 0
    summary = charrnn.train({"train": {"max_steps": 30}}, run_dir=tmp_path / "api", resume=True)
    r = cli_invoke("train", "--resume", tmp_path / "cli", "--set", "train.max_steps=30")
    assert r.exit_code == 0 and summary.steps == 30
    assert_same_run(tmp_path / "cli", tmp_path / "api")
    charrnn.train(run_dir=tmp_path / "api", resume=True, sets=["train.max_steps=35"])
    assert metrics(tmp_path / "api")[-1]["step"] == 35
    with pytest.raises(ConfigError) as info:
        charrnn.train({"model": {"hidden_size": 64}}, run_dir=tmp_path / "api", resume=True)
    assert "init_from=" in str(info.value) and "--" not in str(info.value)


def test_train_reports_progress_only_when_asked(write_text, tmp_path, tiny, capfd):
    corpus = write_text(tiny.PHRASE)
    events = []
    charrnn.train(as_dict(tiny.sets(corpus)), tmp_path / "a", progress=lambda kind, record: events.append(kind))
    assert events[0] == "start" and "log" in events and capfd.readouterr() == ("", "")
    charrnn.train(as_dict(tiny.sets(corpus)), tmp_path / "b", progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "step 0 loss" in err and "done: 20 steps" in err


def test_a_stop_callable_ends_training_with_last_npz_saved(write_text, tmp_path, tiny):
    corpus = write_text(tiny.PHRASE)
    calls = []
    summary = charrnn.train(as_dict(tiny.sets(corpus)), tmp_path / "run",
                            stop=lambda: calls.append(1) or ("enough" if len(calls) == 7 else None))
    assert summary.interrupted == "enough" and summary.steps == 7
    assert charrnn.load(tmp_path / "run" / "checkpoints" / "last.npz").step == 7


# ---- failures: exceptions (never SystemExit) in Python terms ---------------------------------------

def failure(call) -> CharRNNError:
    with pytest.raises(CharRNNError) as info:  # SystemExit is no Exception: it would not be caught here
        call()
    message = str(info.value)
    assert "\n" not in message and "--" not in message, message
    return info.value


def test_failures_are_exceptions_whose_advice_speaks_python(run, cloze, tmp_path, write_text, tiny):
    model, gaps = charrnn.load(run), charrnn.load(cloze)
    e = failure(lambda: gaps.sample(10))
    assert isinstance(e, UsageError) and "Model.infill(" in str(e) and e.exit_code == 2
    assert str(failure(lambda: model.infill("a_b"))).startswith("Model.infill(")
    assert "temperature=" in str(failure(lambda: model.sample(10, temperature=0.0)))
    assert "top_p=" in str(failure(lambda: model.sample(10, top_p=2.0)))
    assert "top_k=" in str(failure(lambda: model.sample(10, top_k=-1)))
    assert str(failure(lambda: model.sample(10, prime="Zü"))).startswith("prime=")
    unknown = str(failure(lambda: gaps.infill("Z_")))
    assert "'Z'" in unknown and unknown.startswith("Model.infill(")
    assert "length=" in str(failure(lambda: model.sample(-1)))
    assert "seed=" in str(failure(lambda: model.sample(5, seed=-1)))
    assert "mask=" in str(failure(lambda: gaps.infill("a__b", mask="__")))
    failure(lambda: model.sample(1000, n=10**9, seed=1))  # more streams than memory allows, refused up front
    assert isinstance(failure(lambda: charrnn.load(tmp_path / "missing.npz")), CheckpointError)
    corpus = write_text(tiny.PHRASE)
    typo = failure(lambda: charrnn.train({"train": {"learning_rate": 1}}, tmp_path / "r"))
    assert isinstance(typo, ConfigError) and "did you mean train.lr" in str(typo)
    charrnn.train(as_dict(tiny.sets(corpus)), tmp_path / "done")
    e = failure(lambda: charrnn.train(as_dict(tiny.sets(corpus)), tmp_path / "done"))
    assert "already exists" in str(e) and "resume=True" in str(e)
    assert isinstance(failure(lambda: charrnn.train(resume=True)), UsageError)
    assert isinstance(failure(lambda: charrnn.train(None, tmp_path / "done", resume=True, init_from=run)), UsageError)
    assert "init_from=" in str(failure(lambda: charrnn.train(as_dict(tiny.sets(corpus)), tmp_path / "x",
                                                             init_from=cloze / "checkpoints" / "last.npz")))
