"""Property-based tests of the config loader: random YAML documents, random YAML-ish text and
random `--set` strings. The only allowed outcomes are a valid Config or a ConfigError whose
message is one line; any other exception type is a bug."""
from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from charrnn import config
from charrnn.config import Config
from charrnn.errors import ConfigError

KEYS = config.all_keys()
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# values PyYAML or our coercion find awkward: YAML 1.1 booleans and octals, numbers as text,
# huge integers, non-finite floats, NUL, binary, dates, nested containers
WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=8),
    st.sampled_from(["1e-3", "1.0e3", "on", "off", "yes", "010", "0x1F", "nan", ".inf", "-.inf", "1_000",
                     "2001-12-14", "~", "", " ", "\0", "a\nb", "true", "3.5", "-1", "1e400", "9" * 400]),
)
VALUES = st.recursive(WEIRD, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=8)
SECTION_KEYS = st.sampled_from([k.split(".", 1)[1] for k in KEYS if "." in k])
SECTIONS = st.dictionaries(SECTION_KEYS | st.text(max_size=10), VALUES, max_size=4)
DOCS = st.one_of(
    VALUES,
    st.dictionaries(st.sampled_from(["seed", "name", "data", "model", "train", "lr", "training"]) | st.text(max_size=8),
                    SECTIONS | VALUES, max_size=5),
)
# pieces of YAML syntax that reach unusual parser and constructor paths when glued together
TOKENS = st.sampled_from([
    "train:", "model:", "data:", " lr:", " seed:", "\n", "  ", "- ", "? ", ": ", "[", "]", "{", "}", ",", "&a ", "*a",
    "<<: *a", "!!float ", "!!int ", "!!bool ", "!!timestamp ", "!!binary ", "!!str ", "!!null ", "!!set ", "!!omap ",
    "!!python/object:os.system ", "!!python/name:os.system ", "!custom ", "%YAML 1.1\n---\n", "---\n", "...\n", "|\n",
    ">\n", "'", '"', "#", "\t", "\0", "\ufeff", "x", "1", "1e3", "0x", "2001-13-99", ".nan", "maybe", "\\", "%",
])
YAML_TEXT = st.one_of(st.text(max_size=60), st.lists(TOKENS, max_size=25).map("".join))
SET_STRINGS = st.one_of(
    st.text(max_size=40),
    st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), st.sampled_from(["=", " = ", "=="]),
              YAML_TEXT | WEIRD.map(str)).map("".join),
)


def assert_valid_or_config_error(make) -> None:
    try:
        cfg = make()
    except ConfigError as e:
        message = str(e)
        assert message.startswith("config error") and message.strip(), message
        assert "\n" not in message and "\r" not in message, repr(message)
        return
    assert isinstance(cfg, Config)
    config.validate(cfg)  # whatever was accepted is valid ...
    for key in ("train.lr", "train.clip_norm", "data.val_fraction", "model.dropout"):
        assert math.isfinite(config.get(cfg, key)), key  # ... and finite
    assert config.from_dict(yaml.safe_load(config.dump_yaml(cfg)), "dump") == cfg  # and survives config.yaml


@FUZZ
@given(doc=DOCS)
@example(doc={"train": {"lr": 10**400}})
@example(doc={"train": {"max_steps": 1e400}})
@example(doc={"name": "a/b"})
@example(doc={"name": "x\0y"})
@example(doc={"a\nb": 1})
@example(doc={1: 2, None: 3})
def test_random_yaml_documents(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        return  # not representable as YAML text: nothing for the loader to read
    assert_valid_or_config_error(lambda: config.load(path))


@FUZZ
@given(text=YAML_TEXT)
@example(text="train:\n  lr: !!float abc\n")
@example(text="seed: !!timestamp 2001-13-99\n")
@example(text="seed: !!bool maybe\n")
@example(text="seed: !!int 0x\n")
@example(text="[" * 500 + "]" * 500)
@example(text="a: &a [*a]\ntrain: &b {lr: *b}\n")
@example(text="train: !!python/object/apply:os.system [echo hi]\n")
def test_random_yaml_text(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    assert_valid_or_config_error(lambda: config.load(path))


@FUZZ
@given(sets=st.lists(SET_STRINGS, max_size=4))
@example(sets=["train.lr=!!float abc"])
@example(sets=["seed=!!timestamp x"])
@example(sets=["train.lr=" + "9" * 400])
@example(sets=["name=!!python/object:os.system x"])
@example(sets=["name=", "name=.."])
def test_random_set_strings(sets):
    assert_valid_or_config_error(lambda: config.load(None, sets))


@FUZZ
@given(flat=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), VALUES, max_size=6))
def test_random_flat_mappings_through_build(flat):
    assert_valid_or_config_error(lambda: config.build([("fuzz", flat)]))


@pytest.mark.parametrize("text, fragment", [
    ("train:\n  lr: !!float abc\n", "not valid YAML"),
    ("seed: !!bool maybe\n", "not valid YAML"),
    ("[" * 500 + "]" * 500, "not valid YAML"),
    ("train: {lr: " + "9" * 400 + "}\n", "train.lr = 999"),
    ("name: a/b\n", "name = 'a/b'"),
    ("name: \"x\\0y\"\n", "NUL"),
])
def test_named_hostile_documents(write_text, text, fragment):
    """The cases the fuzzing first found, each with the message it now gets."""
    with pytest.raises(ConfigError, match=fragment) as info:
        config.load(write_text(text, name="c.yaml"))
    assert "\n" not in str(info.value)
