"""Training runs end to end: exact resume, resume refusals, extending a run, max_steps 0 and
deterministic init, learning a learnable corpus, --init-from, metrics.jsonl, periodic and best
checkpoints."""
from __future__ import annotations

import math
import random
import shutil
import signal

import numpy as np
import pytest

from charrnn import checkpoint, config, dataset, evaluate, model, runlog
from charrnn.errors import ConfigError
from charrnn.train import resume_config, train

TIMING = ("chars_per_sec", "elapsed_s")
_rng = random.Random(0)
# ~3,000 characters of varied text: 2,700 train characters make 8 streams of 337, so with
# seq_len 16 the streams wrap (and the carried state resets) after step 20.
WORDS = " ".join(_rng.choice(["alpha", "beta", "gamma", "delta", "fox", "dog", "cat", "tree", "sun", "moon"])
                 for _ in range(560)) + "\n"
RESUME = ("train.max_steps=30", "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=7",
          "train.keep_last=2", "train.sample_chars=10")

CASES = {
    "float64": ("train.dtype=float64",),
    "float32": ("train.dtype=float32",),
    "float64-dropout": ("train.dtype=float64", "model.dropout=0.3"),
    "float32-dropout-2-layers": ("train.dtype=float32", "model.dropout=0.3", "model.num_layers=2"),
    "float32-cosine-warmup-decay-clip": ("train.lr_schedule=cosine", "train.warmup_steps=5",
                                         "train.weight_decay=0.01", "train.clip_norm=0.5"),
    "float64-sgd-momentum": ("train.dtype=float64", "train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.1"),
    "float32-rmsprop": ("train.optimizer=rmsprop",),
    "float32-adagrad-clip-value": ("train.optimizer=adagrad", "train.lr=0.05", "train.clip_value=0.01"),
    "cloze-float64": ("model.bidirectional=true", "train.dtype=float64"),
    "cloze-float32-dropout-2-layers": ("model.bidirectional=true", "model.dropout=0.2", "model.num_layers=2"),
    # gated cells: the LSTM carries h and c across windows and through the checkpoint
    "lstm-float32-dropout-2-layers": ("model.cell=lstm", "model.dropout=0.3", "model.num_layers=2"),
    "lstm-float64": ("model.cell=lstm", "train.dtype=float64"),
    "gru-float32-2-layers": ("model.cell=gru", "model.num_layers=2"),
    "gru-float64-dropout": ("model.cell=gru", "train.dtype=float64", "model.dropout=0.3"),
    "lstm-cloze-float64": ("model.cell=lstm", "model.bidirectional=true", "train.dtype=float64"),
    "lstm-float32-weight-drop-2-layers": ("model.cell=lstm", "model.weight_drop=0.3", "model.dropout=0.2",
                                          "model.num_layers=2"),
    # streams split across worker threads (train.threads): the same bits again after a resume
    "lstm-float32-3-threads-2-layers": ("model.cell=lstm", "train.threads=3", "model.num_layers=2", "model.dropout=0.2"),
}


def stop_after(k: int):
    """A stop() callback that asks to stop (as SIGTERM would) after the k-th step of a session."""
    calls = 0

    def stop():
        nonlocal calls
        calls += 1
        return "SIGTERM" if calls == k else None

    return stop


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, module_cache, tiny):
    """reference(*extra_sets) -> run dir of an uninterrupted run (trained once per module)."""
    runs = {}

    def get(*extra):
        if extra not in runs:
            run = tmp_path_factory.mktemp("ref") / "run"
            train(tiny.config(corpus, *RESUME, *extra, cache_dir=module_cache), run)
            runs[extra] = run
        return runs[extra]

    return get


def load_last(run):
    return checkpoint.load(run / "checkpoints" / "last.npz")


def assert_same_params(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def assert_same_run(ref, run):
    """Same parameters, optimizer state, carried state, counters, metrics, periodic checkpoints."""
    a, b = load_last(ref), load_last(run)
    assert_same_params(a.params, b.params)
    assert a.optim.keys() == b.optim.keys()
    for slot in a.optim:
        assert_same_params(a.optim[slot], b.optim[slot])
    assert a.state.keys() == b.state.keys()
    for d in a.state:
        assert all(np.array_equal(x, y) for x, y in zip(a.state[d], b.state[d], strict=True))
    for key in ("step", "updates", "pos", "chars_seen", "best_val_loss", "best_step", "rng", "config"):
        assert a.meta[key] == b.meta[key], key
    assert_same_params(checkpoint.load(ref / "checkpoints" / "best.npz").params,
                       checkpoint.load(run / "checkpoints" / "best.npz").params)
    strip = lambda path: [{k: v for k, v in r.items() if k not in TIMING} for r in runlog.read_metrics(path)]  # noqa: E731
    assert strip(run / "metrics.jsonl") == strip(ref / "metrics.jsonl")
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(run / "checkpoints") == names(ref / "checkpoints")
    assert names(run / "samples") == names(ref / "samples")
    for f in (ref / "samples").iterdir():
        assert (run / "samples" / f.name).read_text(encoding="utf-8") == f.read_text(encoding="utf-8")


# ---- exact resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [13, 21])  # before and just after the streams wrap
def test_stop_and_resume_equals_uninterrupted(tmp_path, corpus, module_cache, reference, tiny, case, k):
    extra = CASES[case]
    run = tmp_path / "run"
    first = train(tiny.config(corpus, *RESUME, *extra, cache_dir=module_cache), run, stop=stop_after(k))
    assert first.interrupted == "SIGTERM" and first.steps == k
    assert load_last(run).meta["step"] == k
    second = train(resume_config(run), run, resume=True)
    assert second.interrupted is None and second.steps == 30
    assert_same_run(reference(*extra), run)


def test_two_interruptions(tmp_path, corpus, module_cache, reference, tiny):
    extra = CASES["float32-dropout-2-layers"]
    run = tmp_path / "run"
    train(tiny.config(corpus, *RESUME, *extra, cache_dir=module_cache), run, stop=stop_after(4))
    assert train(resume_config(run), run, resume=True, stop=stop_after(11)).steps == 15
    assert train(resume_config(run), run, resume=True).steps == 30
    assert_same_run(reference(*extra), run)


def test_throughput_and_elapsed_time_across_a_resume(tmp_path, corpus, module_cache, tiny, monkeypatch):
    """With a clock that advances one second per training step, every record reports N*T
    chars/s and elapsed_s == step, including the first record after a resume."""
    import time
    import types

    from charrnn import intervals, trainer

    now = [0.0]
    real_step = trainer.train_step

    def one_second_step(ctx, state):
        now[0] += 1.0
        return real_step(ctx, state)

    monkeypatch.setattr(trainer, "train_step", one_second_step)
    monkeypatch.setattr(intervals, "time", types.SimpleNamespace(perf_counter=lambda: now[0], strftime=time.strftime))
    run = tmp_path / "run"
    train(tiny.config(corpus, *RESUME, cache_dir=module_cache), run, stop=stop_after(13))
    train(resume_config(run), run, resume=True)
    records = runlog.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert [r["chars_per_sec"] for r in records] == [8 * 16] * 6
    assert [r["elapsed_s"] for r in records] == [float(r["step"]) for r in records]


def test_resume_through_the_cli(cli_invoke, tmp_path, corpus, module_cache, reference, tiny):
    extra = CASES["float32-dropout-2-layers"]
    run = tmp_path / "run"
    train(tiny.config(corpus, *RESUME, *extra, cache_dir=module_cache), run, stop=stop_after(13))
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    assert_same_run(reference(*extra), run)


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_cleanly_and_resume_continues_exactly(cli_invoke, tmp_path, corpus, module_cache,
                                                             reference, tiny, monkeypatch, signame, code):
    """The CLI's own signal handling: a first SIGTERM/SIGINT finishes the step, saves last.npz
    and exits 143/130; --resume then continues bit for bit."""
    sig = getattr(signal, signame)
    from charrnn.progress import Reporter

    on_log = Reporter.on_log

    def on_log_then_sigterm(self, r):
        on_log(self, r)
        if r["step"] == 10:
            handler = signal.getsignal(sig)
            assert callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler), \
                f"charrnn train must handle {signame}"  # never raise the signal without a handler
            signal.raise_signal(sig)

    monkeypatch.setattr(Reporter, "on_log", on_log_then_sigterm)
    extra = CASES["float64-dropout"]
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, *RESUME, *extra, cache_dir=module_cache), "--run-dir", run)
    assert r.exit_code == code, r.output
    assert f"stopped by {signame} at step 10" in r.stderr and f"--resume {run}" in r.stderr
    assert load_last(run).meta["step"] == 10
    monkeypatch.setattr(Reporter, "on_log", on_log)
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    assert_same_run(reference(*extra), run)


# ---- resume: what may and may not change ------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(reference):
    return reference(*CASES["float64"])


@pytest.mark.parametrize("assignment, key", [
    ("model.hidden_size=32", "model.hidden_size"),
    ("model.num_layers=2", "model.num_layers"),
    ("model.bidirectional=true", "model.bidirectional"),
    ("model.dropout=0.1", "model.dropout"),
    ("data.min_count=2", "data.min_count"),
    ("data.val_fraction=0.2", "data.val_fraction"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("train.lr=0.5", "train.lr"),
    ("train.batch_size=4", "train.batch_size"),
    ("train.seq_len=8", "train.seq_len"),
    ("train.dtype=float32", "train.dtype"),
    ("seed=3", "seed"),
])
def test_resume_refuses_model_data_and_optimizer_changes(cli_invoke, finished, assignment, key):
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    r = cli_invoke("train", "--resume", finished, "--set", assignment)
    assert r.exit_code == 2, r.output
    assert f"--resume cannot change {key} " in r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before


def test_resume_refuses_a_different_corpus_path(cli_invoke, finished, write_text):
    other = write_text(WORDS, name="copy.txt")
    r = cli_invoke("train", "--resume", finished, "--set", f"data.path={other}")
    assert r.exit_code == 2
    assert "data.path" in r.stderr


def test_resume_config_raises_config_error(finished):
    with pytest.raises(ConfigError, match="train.optimizer"):
        resume_config(finished, ["train.optimizer=adagrad"])


@pytest.mark.parametrize("extra", [("--init-from", "x.npz"), ("--run-dir", "elsewhere")])
def test_resume_does_not_combine_with_other_starts(cli_invoke, finished, tmp_path, extra):
    r = cli_invoke("train", "--resume", finished, extra[0], tmp_path / extra[1])
    assert r.exit_code == 2
    assert "--resume" in r.stderr


def test_resume_of_a_directory_without_a_run(cli_invoke, tmp_path):
    r = cli_invoke("train", "--resume", tmp_path)
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and "last.npz" in r.stderr


def test_resume_refuses_a_changed_corpus(cli_invoke, tmp_path, tiny):
    corpus = tmp_path / "c.txt"
    corpus.write_text(WORDS, encoding="utf-8")
    run = tmp_path / "run"
    train(tiny.config(corpus, "train.max_steps=4"), run, stop=stop_after(2))
    corpus.write_text(WORDS.upper(), encoding="utf-8")
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 1
    assert "changed" in r.stderr and load_last(run).meta["step"] == 2


def test_resume_refuses_a_run_in_use(cli_invoke, finished):
    holder = runlog.RunDir(finished)
    runlog.lock(holder)
    try:
        r = cli_invoke("train", "--resume", finished, "--set", "train.max_steps=31")
    finally:
        runlog.unlock(holder)
    assert r.exit_code == 1
    assert "in use" in r.stderr
    assert load_last(finished).meta["step"] == 30


def test_extending_a_finished_run_equals_a_longer_run(cli_invoke, tmp_path, corpus, module_cache, reference, tiny):
    extra = CASES["float64-dropout"]
    run = tmp_path / "run"
    shutil.copytree(reference(*extra), run)
    r = cli_invoke("train", "--resume", run, "--set", "train.max_steps=45", "--set", "train.log_every=3")
    assert r.exit_code == 0, r.output
    longer = tmp_path / "longer"
    train(tiny.config(corpus, *RESUME, *extra, "train.max_steps=45", cache_dir=module_cache), longer)
    ck = load_last(run)
    assert ck.meta["step"] == 45 and ck.meta["config"]["train"]["max_steps"] == 45
    assert_same_params(load_last(longer).params, ck.params)
    steps = [rec["step"] for rec in runlog.read_metrics(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 45
    # every 3rd step and evaluations (every 10th)
    assert steps[:6] == [5, 10, 15, 20, 25, 30] and steps[6:] == [33, 36, 39, 40, 42, 45]


def test_resume_accepts_run_length_and_logging_keys(cli_invoke, tmp_path, reference):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(reference(*CASES["float64"]), run)
    sets = {"train.max_steps": 33, "train.eval_every": 3, "train.eval_chars": 50, "train.log_every": 1,
            "train.checkpoint_every": 2, "train.keep_last": 1, "train.sample_chars": 5, "train.on_nonfinite": "skip",
            "train.max_skips": 4, "name": "renamed"}
    r = cli_invoke("train", "--resume", run, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert r.exit_code == 0, r.output
    meta = load_last(run).meta
    written = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert written == meta["config"]  # config.yaml follows the run's current config
    for key, value in sets.items():
        section, _, name = key.rpartition(".")
        assert (meta["config"][section] if section else meta["config"])[name] == value, key
    assert meta["step"] == 33
    assert [rec["step"] for rec in runlog.read_metrics(run / "metrics.jsonl")][-3:] == [31, 32, 33]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.npz")) == ["step-0000032.npz"]


def test_resuming_a_finished_run_changes_nothing(cli_invoke, tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference(*CASES["float64"]), run)
    before = load_last(run)
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 0, r.output
    after = load_last(run)
    assert after.meta["step"] == 30
    assert_same_params(before.params, after.params)


# ---- max_steps 0 and initialization --------------------------------------------------------------------

@pytest.mark.parametrize("extra", [(), ("train.dtype=float64", "model.num_layers=2", "model.init_scale=0.5"),
                                   ("model.bidirectional=true",)])
def test_max_steps_0_writes_the_initialized_model(cli_invoke, write_text, tmp_path, tiny, extra):
    corpus = write_text(WORDS)
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, "train.max_steps=0", "seed=11", *extra), "--run-dir", run)
    assert r.exit_code == 0, r.output
    ck = load_last(run)
    assert ck.meta["step"] == 0 and ck.meta["best_val_loss"] is None
    assert not (run / "checkpoints" / "best.npz").exists()
    assert not runlog.read_metrics(run / "metrics.jsonl")
    cfg = config.from_dict(ck.meta["config"], "meta")
    expected = model.init_params(model.spec_of_config(len(ck.meta["vocab"]), cfg.model), np.random.default_rng(11),
                                 np.dtype(cfg.train.dtype), cfg.model.init_scale)
    assert_same_params(expected, ck.params)
    assert ck.optim and all(not a.any() for slot in ck.optim.values() for a in slot.values())


def test_init_depends_only_on_config_and_seed(write_text, tmp_path, tiny):
    corpus = write_text(WORDS)
    runs = {}
    for name, extra in {"a": ("seed=5",), "b": ("seed=5", "train.lr=0.3", "train.log_every=2", "name=other"),
                        "c": ("seed=6",)}.items():
        train(tiny.config(corpus, "train.max_steps=0", *extra), tmp_path / name)
        runs[name] = load_last(tmp_path / name).params
    assert_same_params(runs["a"], runs["b"])
    for name, a in runs["a"].items():
        if not name.split(".")[-1].startswith("b_"):  # biases start at zero whatever the seed
            assert not np.array_equal(a, runs["c"][name]), name


# ---- learning ---------------------------------------------------------------------------------------------

def test_a_repeated_phrase_is_learned(shared_run, tiny):
    run = shared_run(tiny.PHRASE, *tiny.LEARN)
    records = runlog.read_metrics(run / "metrics.jsonl")
    assert records[0]["train_loss"] > 0.5  # it started from not knowing the phrase
    assert records[-1]["train_loss"] < 0.1
    assert records[-1]["val_loss"] < 0.1
    ck = checkpoint.load(run)  # best.npz
    data = dataset.load(config.from_dict(ck.meta["config"], "meta").data)
    assert evaluate.evaluate_ids(ck.spec, ck.params, data.train, 16).loss < 0.1


# ---- --init-from -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(shared_run, tiny):
    return shared_run(tiny.PHRASE, *tiny.LEARN)


def test_init_from_starts_from_the_checkpoint_weights(cli_invoke, source, write_text, tmp_path, tiny):
    corpus = write_text(tiny.PHRASE)
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, *tiny.LEARN, "train.max_steps=0"), "--run-dir", run,
                   "--init-from", source / "checkpoints" / "last.npz")
    assert r.exit_code == 0, r.output
    assert_same_params(load_last(source).params, load_last(run).params)
    assert load_last(run).meta["step"] == 0  # a new run: its own step count and optimizer state

    run2 = tmp_path / "run2"
    r = cli_invoke("train", *tiny.args(corpus, *tiny.LEARN, "train.max_steps=2", "train.dtype=float32"),
                   "--run-dir", run2, "--init-from", source / "checkpoints" / "best.npz")
    assert r.exit_code == 0, r.output
    step0 = float(r.stderr.split("step 0 loss ")[1].split()[0])
    assert step0 < 0.2  # the loaded weights already know the phrase (ln V is about 3.3)
    assert load_last(run2).params["out.b_o"].dtype == np.float32


def test_init_from_with_a_different_vocabulary_names_the_characters(cli_invoke, source, write_text, tmp_path, tiny):
    corpus = write_text("XYZ! " * 30 + tiny.PHRASE)  # in the training part, not only the validation tail
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, *tiny.LEARN), "--run-dir", run,
                   "--init-from", source / "checkpoints" / "last.npz")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert "vocabulary" in r.stderr and "'!XYZ'" in r.stderr
    assert not run.exists()


def test_init_from_with_fewer_characters_is_refused(cli_invoke, source, write_text, tmp_path, tiny):
    corpus = write_text("the lazy dog. " * 150)
    r = cli_invoke("train", *tiny.args(corpus, *tiny.LEARN), "--run-dir", tmp_path / "run",
                   "--init-from", source / "checkpoints" / "last.npz")
    assert r.exit_code == 1
    assert "vocabulary" in r.stderr


def test_init_from_with_another_model_shape_is_a_config_error(cli_invoke, source, write_text, tmp_path, tiny):
    corpus = write_text(tiny.PHRASE)
    r = cli_invoke("train", *tiny.args(corpus, *tiny.LEARN, "model.hidden_size=16"), "--run-dir", tmp_path / "run",
                   "--init-from", source / "checkpoints" / "last.npz")
    assert r.exit_code == 2
    assert "hidden_size=32" in r.stderr


def test_init_from_a_missing_file(cli_invoke, write_text, tmp_path, tiny):
    corpus = write_text(tiny.PHRASE)
    r = cli_invoke("train", *tiny.args(corpus), "--run-dir", tmp_path / "run", "--init-from", tmp_path / "no.npz")
    assert r.exit_code == 1
    assert "no.npz" in r.stderr


# ---- numerical failure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    ((), "use --set train.on_nonfinite=skip"),
    (("train.on_nonfinite=skip", "train.max_skips=2"), "more than train.max_skips=2"),
])
def test_non_finite_training_stops_with_advice_and_a_finite_checkpoint(cli_invoke, tmp_path, corpus, tiny,
                                                                       extra, message):
    run = tmp_path / "run"
    r = cli_invoke("train", *tiny.args(corpus, "train.lr=1e38", "train.clip_norm=0", *extra), "--run-dir", run)
    assert r.exit_code == 1, r.output
    assert "non-finite" in r.stderr and "train.lr" in r.stderr and message in r.stderr
    assert "Traceback" not in r.output
    ck = load_last(run)  # the last finite state was kept; load() checks every value is finite
    assert 0 < ck.meta["step"] < 20


# ---- metrics.jsonl, periodic and best checkpoints ----------------------------------------------------------

def test_metrics_records(source):
    records = runlog.read_metrics(source / "metrics.jsonl")
    ck = load_last(source)
    n_train = len(dataset.load(config.from_dict(ck.meta["config"], "meta").data).train)
    assert [r["step"] for r in records] == [25, 50, 75, 100, 125, 150]
    for r in records:
        for key in ("step", "epoch", "chars_seen", "train_loss", "lr", "grad_norm", "clipped", "chars_per_sec",
                    "elapsed_s"):
            assert key in r, key
        assert r["chars_seen"] == r["step"] * 8 * 16
        assert r["epoch"] == pytest.approx(r["chars_seen"] / n_train)
        assert r["lr"] == 0.01 and isinstance(r["clipped"], bool)
        assert r["grad_norm"] > 0 and r["chars_per_sec"] > 0 and math.isfinite(r["train_loss"])
        assert ("val_loss" in r) == (r["step"] % 50 == 0)
        if "val_loss" in r:
            assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)


@pytest.mark.parametrize("keep", [0, 2])
def test_keep_last_periodic_checkpoints(tmp_path, corpus, tiny, keep):
    run = tmp_path / "run"
    train(tiny.config(corpus, "train.max_steps=30", "train.checkpoint_every=5", f"train.keep_last={keep}"), run)
    periodic = sorted(p.name for p in (run / "checkpoints").glob("step-*.npz"))
    assert (run / "checkpoints" / "last.npz").is_file()
    if keep == 0:
        assert periodic == []
        return
    assert periodic in (["step-0000020.npz", "step-0000025.npz"], ["step-0000025.npz", "step-0000030.npz"])
    for name in periodic:
        assert checkpoint.load(run / "checkpoints" / name).meta["step"] == int(name[5:12])


def test_best_checkpoint_has_the_lowest_validation_loss(tmp_path, corpus, tiny):
    run = tmp_path / "run"
    # a high learning rate makes the validation loss go up and down
    summary = train(tiny.config(corpus, "train.max_steps=60", "train.lr=0.1", "train.eval_every=5"), run)
    vals = {r["step"]: r["val_loss"] for r in runlog.read_metrics(run / "metrics.jsonl") if "val_loss" in r}
    assert sorted(vals) == list(range(5, 61, 5))
    best_step = min(vals, key=vals.get)
    assert best_step != 60, "premise: the last evaluation is not the best one"
    best = checkpoint.load(run / "checkpoints" / "best.npz")
    assert best.meta["step"] == best.meta["best_step"] == best_step == summary.best_step
    assert best.meta["best_val_loss"] == vals[best_step] == summary.best_val_loss
    assert load_last(run).meta["best_val_loss"] == vals[best_step]
    data = dataset.load(config.from_dict(best.meta["config"], "meta").data)
    assert evaluate.evaluate_ids(best.spec, best.params, data.val, 16).loss == vals[best_step]
    assert checkpoint.resolve(run) == run / "checkpoints" / "best.npz"


def test_no_validation_text_means_no_best_checkpoint(tmp_path, corpus, tiny):
    run = tmp_path / "run"
    summary = train(tiny.config(corpus, "data.val_fraction=0"), run)
    assert summary.best_val_loss is None and summary.best_checkpoint is None
    assert not (run / "checkpoints" / "best.npz").exists()
    assert all("val_loss" not in r for r in runlog.read_metrics(run / "metrics.jsonl"))


def test_config_yaml_is_the_resolved_config(tmp_path, corpus, tiny):
    import yaml

    run = tmp_path / "run"
    cfg = tiny.config(corpus, "train.lr=3e-3", "train.batch_size=1000")  # more streams than the text allows
    train(cfg, run)
    written = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert written == load_last(run).meta["config"]
    assert written["train"]["lr"] == 3e-3
    assert written["train"]["batch_size"] < 1000  # the batch size actually used
