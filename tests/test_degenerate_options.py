"""Issue 11: memory stays bounded whatever the options, and degenerate options get a clear error.

One test per class, parametrized over the examples that were reproduced:
  * memory: a real `charrnn` process stays under a generous peak RSS or is refused up front
    (exit 2, one line naming the limit); the library's chunking holds its own budget;
  * sampling knobs: out-of-range or non-finite values are refused naming the option, and the
    sampler never emits the banned unknown symbol, whatever the distribution;
  * config values: every numeric key has both bounds, checked in one place;
  * config files: duplicate keys, special files and oversized files are refused with one line.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from charrnn import checkpoint, config, diagnose, model, sample
from charrnn.errors import CharRNNError, ConfigError, UsageError
from charrnn.vocab import Vocab

ROOT = Path(__file__).resolve().parent.parent
RSS_BOUND_MIB = 400

# Runs `charrnn ARGS` as the only child of a fresh interpreter and prints its exit code, peak RSS
# and stderr as JSON: RUSAGE_CHILDREN of the test process would also count earlier children. The
# address-space cap makes a regression fail fast instead of filling the machine.
MEASURE = """
import json, resource, subprocess, sys
cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
r = subprocess.run([sys.executable, "-m", "charrnn", *sys.argv[1:]], stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=cap, timeout=120)
print(json.dumps({"rc": r.returncode, "mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stderr": r.stderr.decode("utf-8", "replace")}))
"""


def measure(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *map(str, args)], capture_output=True, check=True,
                         cwd=ROOT, timeout=180)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def with_unk(shared_run, tiny):
    """A next-char model with an unknown symbol ('Q' and 'J' occur once, data.min_count=2)."""
    return shared_run("Q" + tiny.PHRASE + "J", "data.min_count=2")


@pytest.fixture(scope="module")
def long_text(tmp_path_factory, tiny) -> Path:
    """20,000 characters of the model's alphabet: 20,000 distinct windows for diagnose."""
    alphabet = sorted(set(tiny.PHRASE))
    path = tmp_path_factory.mktemp("long") / "long.txt"
    path.write_text("".join(np.random.default_rng(0).choice(alphabet, 20_000)), encoding="utf-8")
    return path


# ---- memory stays bounded whatever the options ----------------------------------------------------

def _prime(k: int, seed: int = 1) -> str:
    return "".join(np.random.default_rng(seed).choice(list("the quick brown fox"), k))


def _too_long_window(run: Path, tmp: Path) -> list:
    """diagnose with a window one character past the longest that fits, on a text that has it."""
    T = diagnose.PROFILE_BUDGET // model.position_bytes(checkpoint.load(run).spec)
    text = tmp / "longer.txt"
    text.write_text(_prime(T + 10, seed=2), encoding="utf-8")
    return ["diagnose", run, "--corpus", text, "-k", 1, "-T", T]


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "config.fifo")
    return tmp / "config.fifo"


# name: (args from (run, text, tmp), None if it must run under the bound, else what its one-line
# refusal (exit 2) names)
MEMORY = {
    "sample -n 100000 --length 1": (lambda run, text, tmp: ["sample", run, "--seed", 1, "-n", 100_000, "--length", 1],
                                    None),
    "sample -n 1000000": (lambda run, text, tmp: ["sample", run, "--seed", 1, "-n", 1_000_000, "--length", 1],
                          "-n 1000000: at most"),
    "120 KB --prime with -n 100": (lambda run, text, tmp: ["sample", run, "--seed", 1, "-n", 100, "--length", 5,
                                                           "--prime", _prime(120_000)], None),
    "diagnose -k 1000000000": (lambda run, text, tmp: ["diagnose", run, "--corpus", text, "-k", 10**9, "-T", 16], None),
    "diagnose -T past its limit": (lambda run, text, tmp: _too_long_window(run, tmp), "characters per window"),
    "train -c /dev/zero": (lambda run, text, tmp: ["train", "-c", "/dev/zero"], "/dev/zero is a device"),
    "train -c FIFO": (lambda run, text, tmp: ["train", "-c", _fifo(tmp)], "is a FIFO"),
}


@pytest.mark.parametrize("case", MEMORY)
def test_memory_stays_bounded_or_the_request_is_refused(case, with_unk, long_text, tmp_path):
    make, refusal = MEMORY[case]
    r = measure(*make(with_unk, long_text, tmp_path))
    if refusal is None:
        assert r["rc"] == 0, r["stderr"]
    else:
        lines = r["stderr"].strip().splitlines()
        assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error:") and refusal in lines[0], r
    assert r["mib"] < RSS_BOUND_MIB, (case, r)


def _traced_peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _tiny_model(cell="rnn", L=1, bidirectional=False, V=12, H=16, dtype=np.float32):
    spec = model.make_spec(V, H, L, bidirectional, cell)
    return spec, model.init_params(spec, np.random.default_rng(0), dtype)


@pytest.mark.parametrize("what", ["diagnose windows", "prime", "uniforms"])
def test_library_chunks_hold_their_budget(what, monkeypatch):
    """The mechanisms behind the bounds, measured with tracemalloc: diagnose runs its windows in
    batches within PROFILE_BUDGET, the prime is read in chunks by one stream, the uniforms of many
    streams come in blocks of at most UNIFORM_MAX. Each case would take 10-100x the bound at once."""
    spec, params = _tiny_model()
    if what == "diagnose windows":
        monkeypatch.setattr(diagnose, "PROFILE_BUDGET", 1 << 20)
        ids = np.random.default_rng(1).integers(0, spec.V, 20_000)
        prof, peak = _traced_peak(lambda: diagnose.profile(spec, params, ids, 10**9, 16))
        assert prof.windows == 20_000 - 17 + 1  # every distinct window, once
        bound = 6 << 20  # all 19,984 windows at once: ~100 MiB
    elif what == "prime":
        vocab = Vocab(list("abcdefghijkl"))
        prime = "".join(np.random.default_rng(1).choice(vocab.chars, 120_000))
        steps, peak = _traced_peak(lambda: list(sample.generate_ids(spec, params, vocab, 2, np.random.default_rng(0),
                                                                    100, prime)))
        assert len(steps) == 2 and steps[0].shape == (100,)
        bound = 24 << 20  # the whole prime as one window of 100 streams: ~1.5 GiB
    else:
        vocab = Vocab(list("abcdefghijkl"))
        steps, peak = _traced_peak(lambda: list(sample.generate_ids(spec, params, vocab, 1, np.random.default_rng(0),
                                                                    20_000)))
        assert steps[0].shape == (20_000,)
        bound = 48 << 20  # 1024 steps of uniforms for 20,000 streams: 156 MiB
    assert peak < bound, f"{what}: {peak / 2**20:.1f} MiB"


def test_chunked_results_equal_the_one_batch_results(monkeypatch):
    """Bounding memory changes no result: batched diagnose windows give the same norms as one
    batch, starts are np.linspace's, the chunked one-stream prime gives the batched state to
    rounding, and uniform blocks of any size give the same text."""
    spec, params = _tiny_model("lstm", L=2, dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, spec.V, 400)
    whole = diagnose.profile(spec, params, ids, 64, 12)
    monkeypatch.setattr(diagnose, "PROFILE_BUDGET", 13 * 5 * model.position_bytes(spec))  # 5 windows a batch
    batched = diagnose.profile(spec, params, ids, 64, 12)
    for name, flow in whole.layers.items():
        np.testing.assert_allclose(batched.layers[name].norms, flow.norms, rtol=1e-12)
        assert batched.layers[name].stats["mean forget gate"] == pytest.approx(flow.stats["mean forget gate"], rel=1e-12)
    for n, need, K in [(400, 13, 64), (100, 100, 1), (1000, 7, 994), (17, 3, 2)]:
        np.testing.assert_array_equal(diagnose.window_starts(n, K, need), np.linspace(0, n - need, K).round())

    monkeypatch.setattr(sample, "PRIME_CHUNK", 7)
    prime = ids[:300].astype(np.intp)
    _, h, _ = model.forward(spec, params, np.tile(prime, (3, 1)))
    for got, want in zip(sample.prime_state(spec, params, prime, 3), h["fwd"]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)

    vocab = Vocab([chr(97 + i) for i in range(spec.V)])
    draw = lambda: np.stack(list(sample.generate_ids(spec, params, vocab, 50, np.random.default_rng(3), 4)))  # noqa: E731
    before = draw()
    monkeypatch.setattr(sample, "UNIFORM_MAX", 12)  # 3 steps per Generator call instead of 1024
    np.testing.assert_array_equal(draw(), before)


# ---- sampling knobs: a clear error, never the unknown symbol ------------------------------------

BAD_KNOBS = [
    (dict(temperature=math.nan), "--temperature"), (dict(temperature=1e-45), "--temperature"),
    (dict(temperature=math.inf), "--temperature"), (dict(temperature=0.0), "--temperature"),
    (dict(temperature=-1.0), "--temperature"), (dict(temperature=1e4), "--temperature"),
    (dict(top_p=math.nan), "--top-p"), (dict(top_p=1e-320), "--top-p"), (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"), (dict(top_p=-math.inf), "--top-p"), (dict(top_k=-1), "--top-k"),
    (dict(top_k=2.5), "--top-k"),
]


@pytest.mark.parametrize("bad, option", BAD_KNOBS, ids=[f"{k}={v}" for k, v in (next(iter(b.items())) for b, _ in BAD_KNOBS)])
def test_degenerate_knobs_are_refused_naming_the_option(bad, option, cli_invoke, with_unk):
    name = option.lstrip("-").replace("-", "_")  # the library names the option; each front end spells it
    with pytest.raises(UsageError, match=f"^{name}=") as info:
        sample.Knobs(**bad).check()
    assert "\n" not in str(info.value) and info.value.exit_code == 2 and info.value.render("cli").startswith(option)
    spec, params = _tiny_model()
    vocab = Vocab(list("abcdefghijk") + ["\ufffd"], unk="\ufffd")
    with pytest.raises(UsageError, match=f"^{name}="):  # refused when called, before any character
        sample.generate_ids(spec, params, vocab, 5, np.random.default_rng(0), knobs=sample.Knobs(**bad))
    cloze, cloze_params = _tiny_model(bidirectional=True)
    with pytest.raises(UsageError, match=f"^{name}="):
        sample.infill(cloze, cloze_params, vocab, "abc_def", np.random.default_rng(0), knobs=sample.Knobs(**bad))
    flag, value = option, next(iter(bad.values()))
    if flag != "--top-k":  # the command refuses it too: exit 2, one line, nothing on stdout
        r = cli_invoke("sample", with_unk, "--seed", "1", "-l", "10", flag, repr(value))
        assert r.exit_code == 2 and r.stdout == "" and flag in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("knobs", [sample.Knobs(temperature=1e-3), sample.Knobs(temperature=1e3),
                                   sample.Knobs(top_p=1e-12), sample.Knobs(top_p=1.0, top_k=10**9),
                                   sample.Knobs(greedy=True)])
def test_the_limits_themselves_are_accepted_and_never_give_the_unknown_symbol(knobs):
    spec, params = _tiny_model()
    vocab = Vocab(list("abcdefghijk") + ["\ufffd"], unk="\ufffd")
    params = {**params, "out.b_o": params["out.b_o"] + np.eye(spec.V, dtype=np.float32)[vocab.unk_id] * 50}
    ids = np.concatenate(list(sample.generate_ids(spec, params, vocab, 200, np.random.default_rng(0), 3,
                                                  knobs=knobs.check())))
    assert len(ids) == 600 and not (ids == vocab.unk_id).any()


NaN, INF = math.nan, math.inf
DEGENERATE_LOGITS = {  # rows the sampler must refuse rather than draw from; index 3 is banned (-inf)
    "all NaN": [NaN, NaN, NaN, -INF],
    "one NaN": [0.0, NaN, 1.0, -INF],
    "overflow to +inf": [INF, 1.0, INF, -INF],
    "all mass on the banned symbol": [-INF, -INF, -INF, -INF],
}


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("top", [dict(), dict(top_k=2), dict(top_p=0.5)])
@pytest.mark.parametrize("name", DEGENERATE_LOGITS)
def test_the_sampler_never_emits_the_banned_symbol(name, top, greedy):
    """pick raises (exit 1, one line) for a distribution that is not finite or has no mass outside
    the banned symbol, for every filter; a finite one never lands on a zero-probability entry."""
    logits = np.array([DEGENERATE_LOGITS[name]] * 2, dtype=np.float32)
    for u in (np.zeros(2), np.full(2, np.nextafter(1.0, 0.0))):
        for rows in (logits[:1], logits):  # the one-stream binary search and the batched path
            with pytest.raises(CharRNNError, match="not finite") as info:
                sample.pick(rows.copy(), u[: len(rows)], sample.Knobs(greedy=greedy, **top))
            assert info.value.exit_code == 1 and "\n" not in str(info.value)
    finite = np.array([[math.log(0.3), math.log(0.2), math.log(0.5), -INF]] * 2, dtype=np.float32)
    for u in (np.zeros(2), np.full(2, np.nextafter(1.0, 0.0))):
        assert (sample.pick(finite.copy(), u, sample.Knobs(greedy=greedy, **top)) != 3).all()


@pytest.mark.parametrize("weight", [3e38, math.nan])
def test_weights_that_overflow_are_an_error_not_unknown_symbols(weight):
    """The reproduced case at its root: logits that overflow float32 (as --temperature 1e-45 used
    to make them) or are NaN stop the sampler with an error instead of yielding the unknown symbol."""
    spec, params = _tiny_model()
    vocab = Vocab(list("abcdefghijk") + ["\ufffd"], unk="\ufffd")
    params = {**params, "out.W_ho": np.full_like(params["out.W_ho"], weight),
              "out.b_o": np.full_like(params["out.b_o"], weight)}
    for knobs in (sample.Knobs(), sample.Knobs(greedy=True), sample.Knobs(top_k=3, top_p=0.5)):
        steps = sample.generate_ids(spec, params, vocab, 5, np.random.default_rng(0), 2, knobs=knobs)
        with pytest.raises(CharRNNError, match="not finite"), np.errstate(all="ignore"):
            next(steps)


# ---- config values: every number has sane limits, checked where values are checked -----------------

NUMERIC = [k for k in config.all_keys() if config._base_type(k)[0] in (int, float)]


def test_every_numeric_key_has_a_lower_and_an_upper_bound():
    for key in NUMERIC:
        meta = config._field(key).metadata
        assert ("ge" in meta or "gt" in meta) and ("le" in meta or "lt" in meta), key


def _outside(key: str) -> list:
    """Values just outside each bound of key, and non-finite or enormous ones."""
    meta, typ = config._field(key).metadata, config._base_type(key)[0]
    lo, hi = meta.get("ge", meta.get("gt")), meta.get("le", meta.get("lt"))
    if typ is int:
        return [lo - 1, hi + 1, 10**400]
    below = lo if "gt" in meta else lo - 1e-9 * max(1.0, abs(lo))
    above = hi if "lt" in meta else hi * 1.5 + 1
    return [below, above, "nan", ".inf", "-.inf", "1e400"]


@pytest.mark.parametrize("key", NUMERIC)
def test_values_outside_a_keys_limits_are_refused_naming_key_and_range(key, write_text):
    for value in _outside(key):
        yaml_text = f"{key.replace('.', ': {', 1)}: {value}{'}' if '.' in key else ''}\n"
        for load in (lambda value=value: config.load(None, [f"{key}={value}"]),
                     lambda yaml_text=yaml_text: config.load(write_text(yaml_text, "limits.yaml"))):
            with pytest.raises(ConfigError) as info:
                load()
            msg = str(info.value)
            assert key in msg and "\n" not in msg and info.value.exit_code == 2, msg
            assert "must be" in msg or "expected" in msg, msg


@pytest.mark.parametrize("key", NUMERIC)
def test_each_inclusive_bound_is_accepted(key):
    meta = config._field(key).metadata
    for name in ("ge", "le"):
        if name in meta:
            assert config.get(config.load(None, [f"{key}={meta[name]}"]), key) == meta[name]


def test_init_scale_1e308_is_refused_at_config_time():
    with pytest.raises(ConfigError, match=r"model.init_scale = 1e\+308: must be > 0.0 and <= 100.0"):
        config.load(None, ["model.init_scale=1e308"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "benchmarks").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_and_benchmark_configs_are_within_the_limits(path):
    cfg = config.load(path)
    assert config.from_dict(config.to_dict(cfg), "round-trip") == cfg


# ---- config files: duplicate keys, special and oversized files ------------------------------------

DUPLICATES = {
    "two train sections": ("train:\n  lr: 1e-3\nmodel:\n  hidden_size: 8\ntrain:\n  seq_len: 5\n", "'train'", 5, 1),
    "a key twice in a section": ("train:\n  lr: 1e-3\n  seq_len: 5\n  lr: 2e-3\n", "'lr'", 4, 2),
    "a key twice in a flow mapping": ("model: {hidden_size: 8, hidden_size: 16}\n", "'hidden_size'", 1, 1),
    "a top-level key twice": ("seed: 1\nname: a\nseed: 2\n", "'seed'", 3, 1),
}


@pytest.mark.parametrize("name", DUPLICATES)
def test_duplicate_keys_are_refused_naming_key_and_lines(name, write_text):
    text, key, line, first = DUPLICATES[name]
    path = write_text(text, "dup.yaml")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    msg = str(info.value)
    assert f"{path} line {line}" in msg and f"duplicate key {key}" in msg and f"first on line {first}" in msg, msg
    assert "\n" not in msg


def test_merge_keys_that_override_are_not_duplicates(write_text):
    text = "train:\n  <<: {lr: 0.5, seq_len: 3}\n  lr: 0.25\nmodel: {hidden_size: 8}\n"
    cfg = config.load(write_text(text, "merge.yaml"))
    assert (cfg.train.lr, cfg.train.seq_len) == (0.25, 3)


SPECIAL = {
    "/dev/zero": (lambda tmp: Path("/dev/zero"), "is a device, not a regular file"),
    "a FIFO": (lambda tmp: (os.mkfifo(tmp / "c.fifo"), tmp / "c.fifo")[1], "is a FIFO"),
    "a directory": (lambda tmp: tmp, "is a directory"),
    "over 1 MiB": (lambda tmp: (tmp / "big.yaml").write_text("#" * config.MAX_CONFIG_BYTES + "\n") and tmp / "big.yaml",
                   "larger than 1024 KiB"),
    "not UTF-8": (lambda tmp: (tmp / "bin.yaml").write_bytes(b"seed: \xff\n") and tmp / "bin.yaml", "cannot read"),
}


@pytest.mark.parametrize("name", SPECIAL)
def test_config_files_are_read_with_a_cap_and_special_files_refused(name, tmp_path):
    """A FIFO is refused at once (opened non-blocking, never waiting for a writer), a device or a
    huge file without reading it all."""
    make, fragment = SPECIAL[name]
    with pytest.raises(ConfigError, match=fragment) as info:
        config.load(make(tmp_path))
    assert "\n" not in str(info.value) and info.value.exit_code == 2
