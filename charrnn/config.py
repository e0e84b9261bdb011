"""Typed configuration: dataclasses with defaults, YAML loading, `--set` overrides, one validator.

Precedence: dataclass defaults < config file < `--set section.key=value` on the command line.

YAML is read with PyYAML's safe loader (refusing a key given twice, which it would silently drop)
from a regular file of at most MAX_CONFIG_BYTES, and then every value is coerced to its field's
type, because PyYAML follows YAML 1.1: `lr: 1e-3` arrives as the *string* "1e-3", `on` as True,
`010` as 8. Each field carries its own limits in `metadata` (`ge`, `gt`, `le`, `lt`, `choices`;
every number has a lower and an upper one, floats must be finite), so that `validate` is the one
place that checks values and every message has the same shape:

    config error (configs/x.yaml): train.lr = -1: must be > 0
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from charrnn.errors import ConfigError, option


# Upper limits. Every numeric key has both bounds (tests check it), so that a value that would only
# fail later - an init scale that overflows the weights, a sample length that fills memory - is
# refused here with the key named. Counts of steps or characters stop at COUNT_MAX, which no run
# reaches; the learning rate only has to stay finite in float32 (3.4e38): a huge one is a way to
# make training diverge on purpose, and the trainer's non-finite guard reports that clearly.
COUNT_MAX = 10**12
LR_MAX = 1e38
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB of YAML; more is a wrong file (e.g. /dev/zero)
# where override values came from, in messages: `--set` on the command line, `sets=[...]` in Python
SET_SOURCE = option("set")


def _f(default, why: str, **limits) -> Any:
    """A dataclass field with a default, a one-line reason and its allowed values."""
    return field(default=default, metadata={"why": why, **limits})


@dataclass(frozen=True)
class DataConfig:
    path: str = _f("builtin:python-docs", "a text file, builtin:python-docs (offline) or a catalog name such as tinyshakespeare")
    val_path: str | None = _f(None, "a separate validation file; if unset the tail of the corpus is used")
    val_fraction: float = _f(0.1, "share of the corpus (its end) held out for validation when val_path is unset", ge=0.0, lt=1.0)
    encoding: str = _f("utf-8", "text encoding of the corpus files (e.g. latin-1, utf-16)")
    min_count: int = _f(1, "characters seen fewer times in the training text map to one unknown symbol", ge=1, le=COUNT_MAX)
    cache_dir: str | None = _f(None, "where encoded corpora are cached; default: the user cache dir")


@dataclass(frozen=True)
class ModelConfig:
    cell: str = _f("rnn", "recurrent cell: rnn (tanh), lstm or gru (gated, for long-range memory)",
                   choices=("rnn", "lstm", "gru"))
    hidden_size: int = _f(256, "H: width of each recurrent layer (per direction)", ge=1, le=16384)
    num_layers: int = _f(1, "L: stacked layers; layer l reads layer l-1's h_t", ge=1, le=64)
    bidirectional: bool = _f(False, "two towers, one per direction: a gap-filling (cloze) model, not a next-char one")
    dropout: float = _f(0.0, "inverted dropout between layers and before the output; off at evaluation", ge=0.0, lt=1.0)
    weight_drop: float = _f(0.0, "DropConnect on each W_hh: one mask per step for all streams and time steps "
                                 "(AWD-LSTM); off at evaluation", ge=0.0, lt=1.0)
    init_scale: float = _f(1.0, "multiplies the 1/sqrt(fan_in) init; each W_hh block starts as a scaled orthogonal matrix",
                           gt=0.0, le=100.0)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _f(32, "N: parallel streams (left-to-right) or random windows (cloze) per step", ge=1, le=10**6)
    seq_len: int = _f(64, "T: characters per step, the truncated-BPTT horizon", ge=1, le=10**6)
    max_steps: int = _f(2000, "optimizer steps; 0 writes the initialized model and stops", ge=0, le=COUNT_MAX)
    optimizer: str = _f("adam", "update rule", choices=("sgd", "adagrad", "rmsprop", "adam"))
    lr: float = _f(2e-3, "peak learning rate (values far above 1 diverge: the non-finite guard stops or skips)",
                   gt=0.0, le=LR_MAX)
    momentum: float = _f(0.0, "sgd momentum (0 = plain sgd)", ge=0.0, lt=1.0)
    beta1: float = _f(0.9, "adam first-moment decay", ge=0.0, lt=1.0)
    beta2: float = _f(0.999, "adam second-moment decay", ge=0.0, lt=1.0)
    rmsprop_decay: float = _f(0.95, "rmsprop: decay of the running mean of squared gradients (char-rnn uses 0.95)",
                              ge=0.0, lt=1.0)
    eps: float = _f(1e-8, "added to denominators of adagrad, rmsprop and adam", gt=0.0, le=1.0)
    weight_decay: float = _f(0.0, "decoupled (AdamW-style) decay of weight matrices, not biases", ge=0.0, le=100.0)
    lr_schedule: str = _f("constant", "learning-rate decay after warm-up", choices=("constant", "cosine", "step"))
    lr_min_ratio: float = _f(0.1, "cosine: final lr as a fraction of lr", ge=0.0, le=1.0)
    decay_every: int = _f(1000, "step schedule: steps between decays", ge=1, le=COUNT_MAX)
    decay_rate: float = _f(0.5, "step schedule: lr multiplier at each decay", gt=0.0, le=1.0)
    warmup_steps: int = _f(0, "linear warm-up from 0 to lr over this many steps", ge=0, le=COUNT_MAX)
    clip_norm: float = _f(5.0, "rescale all gradients so their global L2 norm is at most this; 0 or null: off",
                          ge=0.0, le=1e6, null=0.0)
    clip_value: float = _f(0.0, "clamp each gradient element to [-v, v] (min-char-rnn style); 0 or null: off",
                           ge=0.0, le=1e6, null=0.0)
    dtype: str = _f("float32", "parameter and activation precision", choices=("float32", "float64"))
    threads: int = _f(1, "threads a step's streams are split across, each with one-thread BLAS; 2 on 2 cores "
                         "speeds up gated cells (results equal 1's up to float rounding)", ge=1, le=256)
    eval_every: int = _f(500, "steps between validation evaluations (0: only at the end)", ge=0, le=COUNT_MAX)
    eval_chars: int = _f(0, "validation characters scored per evaluation (0: all of them)", ge=0, le=COUNT_MAX)
    log_every: int = _f(50, "steps between metrics.jsonl lines and plain log lines", ge=1, le=COUNT_MAX)
    checkpoint_every: int = _f(1000, "steps between periodic checkpoints (0: only last and best)", ge=0, le=COUNT_MAX)
    keep_last: int = _f(3, "periodic checkpoints kept, newest first", ge=0, le=10**6)
    sample_chars: int = _f(200, "characters sampled at each evaluation (left-to-right models)", ge=0, le=10**6)
    on_nonfinite: str = _f("stop", "a NaN/Inf loss or gradient: stop with an error, or skip the batch", choices=("stop", "skip"))
    max_skips: int = _f(10, "with on_nonfinite=skip: stop after this many skipped batches", ge=0, le=COUNT_MAX)


@dataclass(frozen=True)
class Config:
    seed: int = _f(1337, "one seed for init, dropout, window order and evaluation samples", ge=0, le=2**63 - 1)
    name: str = _f("run", "run-directory prefix: runs/<name>-<timestamp>/")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ['seed', 'name', 'data.path', ...]."""
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _field(key: str) -> dataclasses.Field:
    section, _, name = key.rpartition(".")
    cls = SECTIONS[section] if section else Config
    return {f.name: f for f in dataclasses.fields(cls)}[name]


# names peers use for our keys (char-rnn, torch-rnn, nanoGPT), so a habit gets the right hint
ALIASES = {"learning_rate": "lr", "rnn_size": "hidden_size", "hidden": "hidden_size", "n_embd": "hidden_size",
           "layers": "num_layers", "n_layer": "num_layers", "num_layer": "num_layers", "batch": "batch_size",
           "seq_length": "seq_len", "block_size": "seq_len", "bptt": "seq_len", "max_iters": "max_steps",
           "steps": "max_steps", "grad_clip": "clip_norm", "clip": "clip_norm", "dropout_p": "dropout",
           "val_frac": "val_fraction", "eval_interval": "eval_every", "log_interval": "log_every",
           "decay": "weight_decay", "precision": "dtype", "random_seed": "seed"}


def _suggest(key: str) -> str | None:
    """The closest valid key: same section first, peers' names (ALIASES) included."""
    section, _, name = key.rpartition(".")
    keys = all_keys()
    # a bare name ("lr") may be any section's key; a sectioned one is matched within its section
    names = {k.rpartition(".")[2]: k for k in keys if not section or k.rpartition(".")[0] == section}
    candidates = {**{alias: names[target] for alias, target in ALIASES.items() if target in names}, **names}
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return candidates[close[0]]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)  # maybe the wrong section
    return close[0] if close else None


def _unknown(key: str, source: str) -> ConfigError:
    close = _suggest(key)
    hint = f" (did you mean {close}?)" if close else f"; valid keys: {', '.join(all_keys())}"
    shown = key if key.isprintable() and len(key) <= 60 else _describe(key)
    return ConfigError(f"config error ({source}): unknown key {shown}{hint}")


# ---- coercion -------------------------------------------------------------------------------

def _base_type(key: str) -> tuple[type, bool]:
    """(scalar type, whether None is allowed) for a field, from its annotation."""
    hint = typing.get_type_hints(SECTIONS.get(key.rpartition(".")[0], Config))[key.rpartition(".")[2]]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _describe(value: Any, limit: int = 60) -> str:
    """A value as a message shows it: one line (repr of text), at most about `limit` characters."""
    text = repr(value) if isinstance(value, str) else str(value)
    if not text.isprintable():
        text = repr(text)  # a newline inside some exotic value must not break the one-line message
    return text if len(text) <= limit else text[: limit - 3] + "..."


def coerce(key: str, value: Any, source: str) -> Any:
    """Convert a YAML scalar to the type of field `key`, or raise a one-line ConfigError."""
    typ, nullable = _base_type(key)
    meta = _field(key).metadata
    bad = lambda what: ConfigError(f"config error ({source}): {key} = {_describe(value)}: {what}")  # noqa: E731
    if value is None:
        if nullable:
            return None
        if "null" in meta:
            return meta["null"]
        raise bad(f"expected {typ.__name__}, got null")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise bad("expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("expected an integer, got a boolean")
        try:  # "1e4" (a string to PyYAML) and 1e4 are fine, 2.5 is not
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float):
                if not number.is_integer():
                    raise ValueError
                number = int(number)
            if not isinstance(number, int):
                raise ValueError
            return number
        except (TypeError, ValueError, OverflowError):
            raise bad("expected an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise bad("expected a number, got a boolean")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
            raise bad("expected a number") from None
        if not math.isfinite(number):
            raise bad("expected a finite number")
        return number
    if typ is str:
        if isinstance(value, str):
            if "\0" in value:
                raise bad("text must not contain a NUL character")
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("expected text (quote it in YAML)")
    raise AssertionError(f"unsupported field type {typ} for {key}")


# ---- loading and merging --------------------------------------------------------------------

def _flatten(doc: Any, source: str) -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}, rejecting anything that is not this shape."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config error ({source}): expected a mapping of sections and keys, got {type(doc).__name__}")
    flat = {}
    for key, value in doc.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config error ({source}): section {key} must be a mapping of keys, got {_describe(value)}")
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def _read_text(path: Path) -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG_BYTES, as UTF-8.

    Opened non-blocking so that a FIFO is refused instead of waiting for a writer, and read with
    a cap so that a device (/dev/zero) or a huge file is refused instead of filling memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"config error: config file {path} not found") from None
    except OSError as e:
        raise ConfigError(f"config error: cannot read config file {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                                           (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")) if test(mode)), "a socket")
            raise ConfigError(f"config error: config file {path} is {kind}, not a regular file; give a YAML file")
        data = b""
        while len(data) <= MAX_CONFIG_BYTES:
            more = os.read(fd, MAX_CONFIG_BYTES + 1 - len(data))
            if not more:
                break
            data += more
    except OSError as e:
        raise ConfigError(f"config error: cannot read config file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config error: config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                          "a config is a few KB of YAML (is this the right file?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config error: cannot read config file {path}: {e}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Flattened, not yet coerced key -> value mapping of a YAML config file."""
    path = Path(path)
    text = _read_text(path)
    try:
        doc = _safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or "not valid YAML").split())[:200]  # one line
        raise ConfigError(f"config error ({path}{where}): {problem}") from None
    return _flatten(doc, str(path))


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (two `train:` sections, or
    `lr` twice in one): PyYAML would keep the last one and silently drop the first.

    The check runs in flatten_mapping, which SafeConstructor calls on every mapping before
    building it, and only on a node's first visit: flattening prepends the keys of `<<` merges
    to the node, and a merged key that the mapping overrides is not a duplicate."""

    def __init__(self, stream):
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node):
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._refuse_duplicates(node)
        super().flatten_mapping(node)

    def _refuse_duplicates(self, node) -> None:
        first_line: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a non-scalar key is refused by SafeConstructor itself ("unhashable key")
            key = self.construct_object(key_node)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_describe(key)} (first on line {first_line[key] + 1}): "
                    "give each key once (merge the two)", key_node.start_mark)
            first_line[key] = key_node.start_mark.line


def _safe_load(text: str) -> Any:
    """yaml.safe_load (refusing duplicate keys), with every failure as a yaml.YAMLError. PyYAML's
    constructors raise plain ValueError, KeyError or AttributeError for malformed tagged scalars
    (`!!timestamp x`, `!!bool maybe`, `!!int 0x`) and RecursionError for deeply nested flow collections."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as e:
        raise yaml.MarkedYAMLError(problem=f"not valid YAML ({type(e).__name__}: {e})") from None


def parse_set(assignment: str) -> tuple[str, Any]:
    """'train.lr=3e-3' -> ('train.lr', '3e-3' parsed as a YAML scalar)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"config error ({SET_SOURCE}): {assignment!r} is not KEY=VALUE "
                          f"(e.g. {option('set', 'train.lr=3e-3')})")
    try:
        value = _safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not a YAML scalar: keep the text; coercion decides whether that is allowed
    if isinstance(value, (dict, list)):
        value = raw
    return key, value


def build(layers: list[tuple[str, dict[str, Any]]], base: Config | None = None) -> Config:
    """Apply (source, flat mapping) layers over `base` (defaults), coerce each value and validate.

    The source of each key is remembered so that a validation error names where the value came from.
    """
    valid = set(all_keys())
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, flat in layers:
        for key, value in flat.items():
            if key not in valid:
                raise _unknown(key, source)
            values[key] = coerce(key, value, source)
            sources[key] = source
    cfg = replace(base or Config(), values)
    validate(cfg, sources)
    return cfg


def replace(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of cfg with dotted keys replaced (values must already be coerced)."""
    top = {k: v for k, v in values.items() if "." not in k}
    for section in SECTIONS:
        sub = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(section + ".")}
        if sub:
            top[section] = dataclasses.replace(getattr(cfg, section), **sub)
    return dataclasses.replace(cfg, **top)


def overrides(sets: tuple[str, ...] | list[str]) -> tuple[str, dict[str, Any]]:
    """The layer of KEY=VALUE overrides (--set on the command line, `sets` in Python) for build()."""
    return SET_SOURCE, dict(parse_set(s) for s in sets)


def load(config_path: str | Path | None = None, sets: tuple[str, ...] | list[str] = ()) -> Config:
    """defaults < config file < overrides (`sets`, --set): the resolved, validated Config."""
    layers = []
    if config_path is not None:
        layers.append((str(config_path), read_yaml(config_path)))
    layers.append(overrides(sets))
    return build(layers)


def get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# ---- validation: the one place values are checked -------------------------------------------

_LIMITS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _allowed(meta) -> str:
    """A field's numeric limits as text, e.g. '> 0.0 and <= 100.0'."""
    return " and ".join(f"{sym} {meta[name]}" for name, (sym, _) in _LIMITS.items() if name in meta)


def validate(cfg: Config, sources: dict[str, str] | None = None) -> None:
    sources = sources or {}
    for key in all_keys():
        value, meta = get(cfg, key), _field(key).metadata
        where = sources.get(key, "default")
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"config error ({where}): {key} = {_describe(value)}: must be one of {', '.join(meta['choices'])}")
        if any(not test(value, meta[name]) for name, (_, test) in _LIMITS.items() if name in meta):
            raise ConfigError(f"config error ({where}): {key} = {_describe(value)}: must be {_allowed(meta)}")
    if not cfg.name.strip() or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"config error ({sources.get('name', 'default')}): name = {_describe(cfg.name)}: must be a "
                          f"non-empty run-directory prefix without '/' (choose the parent directory with {option('run_dir')})")
    if cfg.model.bidirectional and cfg.train.seq_len < 2:
        raise ConfigError(f"config error ({sources.get('train.seq_len', 'default')}): train.seq_len = {cfg.train.seq_len}: "
                          "a bidirectional (cloze) model needs train.seq_len >= 2")


# ---- output ---------------------------------------------------------------------------------

def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(doc: dict[str, Any], source: str) -> Config:
    return build([(source, _flatten(doc, source))])


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe_keys() -> str:
    """Every key with its default and reason, for `charrnn train --list-keys`."""
    lines = []
    for key in all_keys():
        f = _field(key)
        default = f.default if f.default is not dataclasses.MISSING else None
        allowed = _allowed(f.metadata) or " | ".join(f.metadata.get("choices", ()))
        lines.append(f"{key} = {default!r}" + (f"  ({allowed})" if allowed else "") + f"\n    {f.metadata.get('why', '')}")
    return "\n".join(lines)
