"""`charrnn sample`: only the text on stdout, reproducible from the seed, the decoding knobs,
--stop and -n, UTF-8 output, primes with unknown characters, and gap filling with cloze models."""
from __future__ import annotations

import pytest

from charrnn import checkpoint
from charrnn.vocab import UNK

POEM = "春眠不觉晓，处处闻啼鸟。🌸🐦 夜来风雨声，花落知多少。🌧️\n"


@pytest.fixture(scope="module")
def partly_trained(shared_run, tiny):
    """A next-char model that has not settled yet: its samples vary with the seed."""
    return shared_run(tiny.PHRASE)


@pytest.fixture(scope="module")
def learned(shared_run, tiny):
    return shared_run(tiny.PHRASE, *tiny.LEARN)


@pytest.fixture(scope="module")
def cloze(shared_run, tiny):
    return shared_run(tiny.PHRASE, *tiny.CLOZE)


def sample(cli_invoke, target, *args) -> str:
    r = cli_invoke("sample", target, *args)
    assert r.exit_code == 0, r.output
    return r.stdout_bytes.decode("utf-8")


def vocab_of(run):
    return checkpoint.load(run).meta["vocab"]


# ---- reproducibility -------------------------------------------------------------------------------

def test_same_seed_same_text(cli_invoke, partly_trained):
    a = sample(cli_invoke, partly_trained, "--seed", "42", "--length", "300")
    b = sample(cli_invoke, partly_trained, "--seed", "42", "--length", "300")
    assert a == b and len(a) == 301 and a.endswith("\n")
    assert set(a[:-1]) <= set(vocab_of(partly_trained))


def test_different_seeds_differ(cli_invoke, partly_trained):
    texts = {sample(cli_invoke, partly_trained, "--seed", str(s), "--length", "300") for s in (1, 2, 3)}
    assert len(texts) == 3


def test_same_seed_same_text_with_knobs(cli_invoke, partly_trained):
    args = ("--seed", "5", "--length", "200", "--temperature", "1.3", "--top-p", "0.9", "--top-k", "5",
            "--prime", "the ")
    assert sample(cli_invoke, partly_trained, *args) == sample(cli_invoke, partly_trained, *args)


def test_greedy_does_not_depend_on_the_seed(cli_invoke, partly_trained):
    a = sample(cli_invoke, partly_trained, "--greedy", "--seed", "1", "--length", "150")
    b = sample(cli_invoke, partly_trained, "--greedy", "--seed", "2", "--length", "150")
    c = sample(cli_invoke, partly_trained, "--greedy", "--seed", "3", "--length", "150", "--temperature", "3")
    assert a == b == c


def test_a_random_seed_is_printed_except_for_greedy_output(cli_invoke, partly_trained):
    drawn = cli_invoke("sample", str(partly_trained), "--length", "20")
    assert drawn.exit_code == 0 and drawn.stderr.startswith("seed ")
    greedy = cli_invoke("sample", str(partly_trained), "--length", "20", "--greedy")
    assert greedy.exit_code == 0 and "seed" not in greedy.stderr


def test_top_k_1_equals_greedy(cli_invoke, partly_trained):
    greedy = sample(cli_invoke, partly_trained, "--greedy", "--seed", "0", "--length", "150")
    for seed in ("1", "9"):
        assert sample(cli_invoke, partly_trained, "--top-k", "1", "--seed", seed, "--length", "150") == greedy


def test_a_tiny_top_p_equals_greedy(cli_invoke, partly_trained):
    greedy = sample(cli_invoke, partly_trained, "--greedy", "--seed", "0", "--length", "150")
    assert sample(cli_invoke, partly_trained, "--top-p", "1e-9", "--seed", "4", "--length", "150") == greedy


def test_learned_model_reproduces_its_phrase(cli_invoke, learned):
    text = sample(cli_invoke, learned, "--greedy", "--prime", "the quick", "--length", "100")
    assert text.startswith("the quick brown fox jumps over the lazy dog.\nthe quick brown fox")


# ---- output shape -------------------------------------------------------------------------------------

def test_length_0_prints_the_prime_only(cli_invoke, partly_trained):
    assert sample(cli_invoke, partly_trained, "--length", "0", "--prime", "the", "--seed", "1") == "the\n"


def test_prime_is_printed_first(cli_invoke, partly_trained):
    text = sample(cli_invoke, partly_trained, "--prime", "the lazy ", "--length", "50", "--seed", "1")
    assert text.startswith("the lazy ") and len(text) == len("the lazy ") + 50 + 1


def test_stop_truncates_after_the_stop_string(cli_invoke, learned):
    text = sample(cli_invoke, learned, "--stop", "fox", "--length", "500", "--seed", "0", "--prime", "the ")
    assert text.endswith("fox\n")
    generated = text[len("the "):-1]
    assert generated.count("fox") == 1 and len(generated) < 100


def test_stop_that_never_appears_gives_the_full_length(cli_invoke, learned):
    text = sample(cli_invoke, learned, "--stop", "zebra", "--length", "120", "--seed", "0")
    assert len(text) == 121


def test_n_samples_are_separated_by_dash_lines(cli_invoke, partly_trained):
    out = sample(cli_invoke, partly_trained, "-n", "3", "--length", "40", "--seed", "8", "--prime", "a ")
    assert out.endswith("\n")
    parts = out[:-1].split("\n---\n")
    assert len(parts) == 3
    assert all(p.startswith("a ") and len(p) == 42 for p in parts)
    assert len(set(parts)) == 3  # independent streams
    assert out == sample(cli_invoke, partly_trained, "-n", "3", "--length", "40", "--seed", "8", "--prime", "a ")


def test_n_samples_with_stop(cli_invoke, learned):
    out = sample(cli_invoke, learned, "-n", "3", "--length", "300", "--seed", "2", "--stop", "dog", "--prime", "the ")
    parts = out[:-1].split("\n---\n")
    assert len(parts) == 3 and all(p.endswith("dog") and p.count("dog") == 1 for p in parts)


# ---- characters --------------------------------------------------------------------------------------

def test_chinese_and_emoji_samples_are_valid_utf8(cli_invoke, shared_run):
    run = shared_run(POEM * 60)
    r = cli_invoke("sample", run, "--length", "300", "--seed", "3", "--prime", "春眠")
    assert r.exit_code == 0, r.output
    text = r.stdout_bytes.decode("utf-8")  # strict: raises on invalid UTF-8
    assert text.startswith("春眠") and len(text) == 2 + 300 + 1
    assert set(text[2:-1]) <= set(vocab_of(run))
    assert {"🌸", "🐦"} <= set(vocab_of(run))


def test_prime_with_unknown_characters_names_them(cli_invoke, partly_trained):
    r = cli_invoke("sample", partly_trained, "--prime", "the Zebra über", "--seed", "1", "--length", "5")
    assert r.exit_code == 2
    assert "'Zü'" in r.stderr and "--prime" in r.stderr
    assert r.stderr.startswith("error: ") and r.stdout == ""


@pytest.fixture(scope="module")
def with_unk(shared_run, tiny):
    """Trained with data.min_count=2 on a text where 'Q' and 'J' occur once: it has an unknown symbol."""
    return shared_run("Q" + tiny.PHRASE + "J", "data.min_count=2")


def test_model_with_unknown_symbol_accepts_unknown_prime_characters(cli_invoke, with_unk):
    ck = checkpoint.load(with_unk)
    assert ck.meta["unk"] == UNK and "Q" not in ck.meta["vocab"]
    text = sample(cli_invoke, with_unk, "--prime", "QZ the", "--length", "300", "--seed", "1")
    assert text.startswith("QZ the") and len(text) == len("QZ the") + 300 + 1
    assert UNK not in text[len("QZ the"):]  # the unknown symbol is never generated


@pytest.mark.parametrize("extra", [(), ("--prime", "the "), ("-n", "2")])
def test_bidirectional_checkpoint_refuses_plain_sampling(cli_invoke, cloze, extra):
    r = cli_invoke("sample", cloze, "--seed", "1", *extra)
    assert r.exit_code == 2
    assert "--infill" in r.stderr and r.stderr.startswith("error: ")
    assert r.stdout_bytes == b""  # not even the prime


# ---- infill -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, mask", [
    ("the qu_ck br___ fox ju_ps over the l_zy dog.", "_"),
    ("_he quick brown fox jumps over the lazy do__", "_"),
    ("___", "_"),
    ("the quick #### fox", "#"),
    ("no gaps here", "_"),
])
@pytest.mark.parametrize("seed", ["0", "1"])
def test_infill_keeps_every_other_character_and_fills_every_mask(cli_invoke, cloze, template, mask, seed):
    out = sample(cli_invoke, cloze, "--infill", template, "--mask", mask, "--seed", seed)
    assert out.endswith("\n")
    filled = out[:-1]
    vocab = set(vocab_of(cloze))
    assert len(filled) == len(template)
    for got, want in zip(filled, template):
        if want == mask:
            assert got in vocab and got != mask
        else:
            assert got == want


def test_infill_is_deterministic_and_learned(cli_invoke, cloze):
    template = "the quick br_wn fox jumps _ver the lazy dog."
    a = sample(cli_invoke, cloze, "--infill", template, "--seed", "3")
    assert a == sample(cli_invoke, cloze, "--infill", template, "--seed", "3")
    greedy = sample(cli_invoke, cloze, "--infill", template, "--greedy", "--seed", "0")
    assert greedy == "the quick brown fox jumps over the lazy dog.\n"


def test_infill_needs_a_bidirectional_model(cli_invoke, partly_trained):
    r = cli_invoke("sample", partly_trained, "--infill", "the _uick", "--seed", "1")
    assert r.exit_code == 2
    assert "bidirectional" in r.stderr


def test_infill_names_unknown_characters(cli_invoke, cloze):
    r = cli_invoke("sample", cloze, "--infill", "the Qu_ck", "--seed", "1")
    assert r.exit_code == 2
    assert "'Q'" in r.stderr and "--infill" in r.stderr and "--prime" not in r.stderr


def test_infill_with_unknown_symbol_keeps_unknown_template_characters(cli_invoke, shared_run, tiny):
    run = shared_run("Q" + tiny.PHRASE + "J", *tiny.CLOZE, "data.min_count=2")
    template = "the Qu_ck"
    out = sample(cli_invoke, run, "--infill", template, "--seed", "0")[:-1]
    assert len(out) == len(template)
    assert all(o == t for o, t in zip(out, template) if t != "_")  # Q is unknown to the model, yet kept
    assert out[6] not in ("_", "\ufffd")
