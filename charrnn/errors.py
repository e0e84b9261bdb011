"""Library exceptions. Only cli.py turns them into messages and exit codes.

`exit_code` is 2 for mistakes in how charrnn was called (options, config values) and 1 for
everything else (missing or broken files, numerical failure).

Advice in a message often names an option: "start a new run from its weights with --init-from
PATH" on the command line is `charrnn.train(..., init_from='PATH')` in Python. The library states
the fact and marks the option with `option(name, value)`; each front end spells it:
`str(error)` in Python terms (what an API user sees), `error.render("cli")` in command-line terms.
"""
from __future__ import annotations

import re
import shlex

_MARK = "\x00"  # cannot occur in a path or in text charrnn reads (a NUL makes a corpus binary)
_TOKEN = re.compile(f"{_MARK}([a-z_]+){_MARK}(.*?){_MARK}", re.S)

# how the command line spells an option that differs from --name-with-dashes
_CLI_SPELLING = {"config": "-c", "num_samples": "-n", "length": "--length", "windows": "-k"}
# how the Python API spells one that is not name=value (a method, or a flag with a directory)
_API_SPELLING = {"resume": "charrnn.train(config, run_dir={value}, resume=True)",
                 "infill": "Model.infill({value})", "corpus": "score(text)",
                 "num_samples": "n={value}", "greedy": "greedy=True",
                 "set": "sets=[{value}]"}  # config.load(path, sets=[...]), resume_config(run_dir, sets)


def option(name: str, value: object = None) -> str:
    """A marker for option `name` (the Python keyword, e.g. "init_from") and its value, for
    messages that give advice: rendered as `--init-from PATH` or `init_from='PATH'`."""
    return f"{_MARK}{name}{_MARK}{'' if value is None else value}{_MARK}"


def _spell_cli(name: str, value: str) -> str:
    flag = _CLI_SPELLING.get(name, "--" + name.replace("_", "-"))
    return f"{flag} {shlex.quote(value) if value and value.upper() != value else value}".rstrip()


def _literal(value: str) -> str:
    """value as a Python literal: numbers as they are, anything else quoted."""
    try:
        float(value)
        return value
    except ValueError:
        return repr(value)


def _spell_api(name: str, value: str) -> str:
    shown = _literal(value) if value else "..."
    if name in _API_SPELLING:
        return _API_SPELLING[name].format(value=shown)
    return f"{name}={shown}"


def render(message: str, style: str = "api") -> str:
    """message with every option() marker spelled for the command line ("cli") or Python ("api")."""
    spell = _spell_cli if style == "cli" else _spell_api
    return _TOKEN.sub(lambda m: spell(m.group(1), m.group(2)), message)


class CharRNNError(Exception):
    """Base class: a one-line, user-facing message (see option() for the advice in it)."""

    exit_code = 1

    def __str__(self) -> str:
        return render(super().__str__(), "api")

    def render(self, style: str) -> str:
        return render(super().__str__(), style)


class ConfigError(CharRNNError):
    """A bad config value, unknown key or conflicting option."""

    exit_code = 2


class UsageError(CharRNNError):
    """A valid request that this model or run cannot serve (e.g. plain sampling from a cloze model)."""

    exit_code = 2


class DataError(CharRNNError):
    """A corpus that cannot be read, decoded or used."""


class CheckpointError(CharRNNError):
    """A checkpoint that cannot be read or does not fit."""


class RunDirError(CharRNNError):
    """A run directory that cannot be created, resumed or locked."""


class TrainingError(CharRNNError):
    """Training cannot go on (non-finite loss, too many skipped batches)."""


class MissingDependencyError(CharRNNError):
    """An optional extra is needed for this command (e.g. matplotlib for plots)."""


class NumericalError(CharRNNError):
    """A result that is not a finite number (e.g. a checkpoint whose weights make the logits overflow)."""


class OutputError(CharRNNError):
    """A command's results could not be written to stdout (closed, full disk)."""
