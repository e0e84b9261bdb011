"""Library-level config tests: YAML loading, coercion, validation messages, precedence, round-trip.

Exit codes of the CLI are tested with the CLI; here errors are ConfigError with exit_code 2.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from charrnn import config
from charrnn.config import Config, ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_text(write_text, text: str, sets=(), name="cfg.yaml") -> Config:
    return config.load(write_text(text, name), sets)


def config_error(fn, *args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 2
    return info.value


# ---- coercion of YAML 1.1 surprises -----------------------------------------------------------

def test_yaml_values_are_coerced_to_field_types(write_text):
    cfg = load_text(write_text, "train:\n  lr: 1e-3\n  max_steps: 1e4\n  eps: 1.0e-6\n"
                                "model:\n  bidirectional: on\n  hidden_size: 32\n"
                                "name: 2024\n")
    # PyYAML itself gives the string '1e-3' and the string '1e4' here
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 10000 and type(cfg.train.max_steps) is int
    assert cfg.train.eps == 1e-6
    assert cfg.model.bidirectional is True
    assert cfg.name == "2024"


@pytest.mark.parametrize("text, key", [
    ("train:\n  max_steps: true\n", "train.max_steps"),
    ("model:\n  hidden_size: yes\n", "model.hidden_size"),
    ("seed: false\n", "seed"),
])
def test_bools_are_rejected_for_int_fields(write_text, text, key):
    err = config_error(load_text, write_text, text)
    assert key in str(err) and "boolean" in str(err)


@pytest.mark.parametrize("text, key, what", [
    ("train:\n  max_steps: 2.5\n", "train.max_steps", "integer"),
    ("train:\n  lr: fast\n", "train.lr", "number"),
    ("train:\n  lr: .inf\n", "train.lr", "finite"),
    ("model:\n  bidirectional: maybe\n", "model.bidirectional", "true or false"),
    ("train:\n  lr: true\n", "train.lr", "boolean"),
    ("train:\n  optimizer: [adam]\n", "train.optimizer", "text"),
])
def test_values_of_the_wrong_type_are_rejected(write_text, text, key, what):
    err = config_error(load_text, write_text, text)
    assert key in str(err) and what in str(err)


def test_null_clip_norm_means_off(write_text):
    cfg = load_text(write_text, "train:\n  clip_norm: null\n  clip_value:\n")
    assert cfg.train.clip_norm == 0.0 and cfg.train.clip_value == 0.0
    assert config.load(sets=["train.clip_norm=null"]).train.clip_norm == 0.0


def test_null_for_a_non_nullable_field_is_rejected():
    err = config_error(config.load, sets=["train.lr=null"])
    assert "train.lr" in str(err) and "null" in str(err)


def test_nullable_field_accepts_null(write_text):
    cfg = load_text(write_text, "data:\n  val_path: null\n  cache_dir: ~\n")
    assert cfg.data.val_path is None and cfg.data.cache_dir is None


# ---- unknown keys -----------------------------------------------------------------------------

def test_unknown_key_names_the_source_file(write_text):
    path = write_text("train:\n  batch_sise: 4\n", "typo.yaml")
    err = config_error(config.load, path)
    assert "unknown key train.batch_sise" in str(err)
    assert "did you mean train.batch_size?" in str(err)
    assert str(path) in str(err)


def test_unknown_key_from_set_names_set():
    err = config_error(config.load, sets=["model.hiden_size=8"])
    assert "(sets=[...])" in str(err) and "did you mean model.hidden_size?" in str(err)
    assert "(--set)" in err.render("cli")


def test_unknown_key_suggests_lr(write_text):
    path = write_text("train:\n  learning_rte: 0.1\n", "lr.yaml")
    err = config_error(config.load, path)
    assert str(path) in str(err)
    assert "did you mean train.lr?" in str(err)


def test_hopeless_unknown_key_lists_valid_keys():
    err = config_error(config.load, sets=["zzzzzz=1"])
    assert "valid keys" in str(err) and "train.lr" in str(err) and "model.hidden_size" in str(err)


# ---- value validation -------------------------------------------------------------------------

@pytest.mark.parametrize("assignment, key, shown, allowed", [
    ("train.lr=-1", "train.lr", "-1", "> 0"),
    ("train.batch_size=0", "train.batch_size", "0", ">= 1"),
    ("data.val_fraction=1.0", "data.val_fraction", "1.0", "< 1"),
    ("model.dropout=-0.1", "model.dropout", "-0.1", ">= 0"),
    ("model.hidden_size=100000", "model.hidden_size", "100000", "<= 16384"),
])
def test_out_of_range_messages_name_key_value_range_and_source(assignment, key, shown, allowed):
    err = config_error(config.load, sets=[assignment])
    msg = str(err)
    assert key in msg and shown in msg and allowed in msg and "(sets=[...])" in msg
    assert err.render("cli") == msg.replace("(sets=[...])", "(--set)")


def test_out_of_range_in_a_file_names_the_file(write_text):
    path = write_text("train:\n  seq_len: 0\n", "range.yaml")
    msg = str(config_error(config.load, path))
    assert str(path) in msg and "train.seq_len = 0" in msg and ">= 1" in msg


def test_both_bounds_are_stated():
    msg = str(config_error(config.load, sets=["train.lr_min_ratio=2"]))
    assert ">= 0" in msg and "<= 1" in msg


def test_choices(write_text):
    path = write_text("train:\n  optimizer: sgdd\n", "opt.yaml")
    msg = str(config_error(config.load, path))
    assert "train.optimizer = 'sgdd'" in msg and str(path) in msg
    for choice in ("sgd", "adagrad", "rmsprop", "adam"):
        assert choice in msg
    assert load_text(write_text, "train:\n  optimizer: rmsprop\n").train.optimizer == "rmsprop"
    assert config.load(sets=["train.dtype=float64"]).train.dtype == "float64"


def test_bidirectional_needs_two_characters_per_window():
    err = config_error(config.load, sets=["model.bidirectional=true", "train.seq_len=1"])
    assert "train.seq_len" in str(err) and "(sets=[...])" in str(err) and "(--set)" in err.render("cli")
    assert config.load(sets=["train.seq_len=1"]).train.seq_len == 1


# ---- precedence -------------------------------------------------------------------------------

def test_precedence_defaults_then_file_then_set(write_text):
    path = write_text("train:\n  lr: 0.01\n  batch_size: 8\n")
    defaults = Config()
    cfg = config.load(path, ["train.lr=0.5"])
    assert cfg.train.lr == 0.5  # --set beats the file
    assert cfg.train.batch_size == 8  # the file beats the default
    assert cfg.train.seq_len == defaults.train.seq_len  # untouched keys keep their defaults
    assert config.load(path).train.lr == 0.01
    assert config.load().train.lr == defaults.train.lr


def test_later_set_wins():
    assert config.load(sets=["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2


def test_error_source_is_where_the_bad_value_came_from(write_text):
    path = write_text("train:\n  lr: 0.01\n")
    err = config_error(config.load, path, ["train.lr=-3"])
    assert "(--set)" in err.render("cli") and str(path) not in str(err)
    bad = write_text("train:\n  lr: -3\n", "bad.yaml")
    assert config.load(bad, ["train.lr=0.1"]).train.lr == 0.1  # overridden before validation


# ---- --set parsing ----------------------------------------------------------------------------

@pytest.mark.parametrize("assignment", ["noequals", "=3", " =3"])
def test_malformed_set(assignment):
    err = config_error(config.parse_set, assignment)
    assert str(err) == f"config error (sets=[...]): {assignment!r} is not KEY=VALUE (e.g. sets=['train.lr=3e-3'])"
    assert err.render("cli") == f"config error (--set): {assignment!r} is not KEY=VALUE (e.g. --set train.lr=3e-3)"


def test_a_bad_name_advises_run_dir_in_each_front_end():
    err = config_error(config.load, sets=["name=a/b"])
    assert str(err).endswith("(choose the parent directory with run_dir=...)")
    assert err.render("cli").endswith("(choose the parent directory with --run-dir)")


def test_set_values_are_yaml_scalars():
    assert config.parse_set("train.lr=3e-3") == ("train.lr", "3e-3")
    assert config.parse_set("model.bidirectional=on") == ("model.bidirectional", True)
    assert config.parse_set(" data.path = a=b.txt") == ("data.path", "a=b.txt")
    assert config.parse_set("data.path=[x") == ("data.path", "[x")  # not YAML: kept as text
    cfg = config.load(sets=["data.path=a=b.txt", "name=[x"])
    assert cfg.data.path == "a=b.txt" and cfg.name == "[x"


# ---- malformed YAML documents -----------------------------------------------------------------

def test_yaml_syntax_error_names_file_and_line(write_text):
    path = write_text("seed: 1\ntrain:\n  lr: [0.1\n  batch_size: 3\n", "broken.yaml")
    msg = str(config_error(config.load, path))
    assert str(path) in msg
    line = int(msg.split(" line ")[1].split(")")[0])
    assert 3 <= line <= 5  # the unclosed bracket opened on line 3


def test_yaml_bad_indentation_line(write_text):
    path = write_text("train:\n  lr: 0.1\n    batch_size: 2\n", "indent.yaml")
    msg = str(config_error(config.load, path))
    assert f"({path} line 3)" in msg


@pytest.mark.parametrize("text, what", [("- 1\n- 2\n", "list"), ("just text\n", "str"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(write_text, text, what):
    path = write_text(text, "top.yaml")
    msg = str(config_error(config.load, path))
    assert str(path) in msg and "mapping" in msg and what in msg


@pytest.mark.parametrize("text", ["train: 3\n", "model: [1, 2]\n", "data: fast\n"])
def test_section_must_be_a_mapping(write_text, text):
    path = write_text(text, "sec.yaml")
    msg = str(config_error(config.load, path))
    section = text.split(":")[0]
    assert f"section {section}" in msg and "mapping" in msg and str(path) in msg


def test_empty_file_and_empty_section_give_defaults(write_text):
    assert config.load(write_text("", "empty.yaml")) == Config()
    assert config.load(write_text("train:\nmodel:\n", "sections.yaml")) == Config()


def test_missing_config_file(tmp_path):
    msg = str(config_error(config.load, tmp_path / "nope.yaml"))
    assert "nope.yaml" in msg and "not found" in msg


# ---- shipped configs and round-trips ----------------------------------------------------------

SHIPPED = sorted(CONFIGS_DIR.glob("*.yaml"))


@pytest.mark.skipif(not SHIPPED, reason="configs/ has no *.yaml files yet")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert isinstance(cfg, Config)
    assert config.from_dict(yaml.safe_load(config.dump_yaml(cfg)), "round-trip") == cfg


def _non_default() -> Config:
    return config.load(sets=[
        "seed=7", "name=tiny", "data.path=some/file.txt", "data.val_path=val.txt", "data.min_count=3",
        "model.hidden_size=48", "model.num_layers=2", "model.bidirectional=true", "model.dropout=0.25",
        "train.lr=3e-4", "train.eps=1e-10", "train.clip_norm=null", "train.optimizer=rmsprop",
        "train.max_steps=0", "train.lr_schedule=cosine",
    ])


@pytest.mark.parametrize("make", [Config, _non_default], ids=["defaults", "non-default"])
def test_dump_yaml_round_trips(make):
    cfg = make()
    text = config.dump_yaml(cfg)
    again = config.from_dict(yaml.safe_load(text), "dump")
    assert again == cfg
    assert config.dump_yaml(again) == text


def test_every_key_is_in_the_dump():
    doc = yaml.safe_load(config.dump_yaml(_non_default()))
    flat = ({f"{s}.{k}" for s, v in doc.items() if isinstance(v, dict) for k in v}
            | {k for k, v in doc.items() if not isinstance(v, dict)})
    assert flat == set(config.all_keys())


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
