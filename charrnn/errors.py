"""Library exceptions. Only cli.py turns them into messages and exit codes.

`exit_code` is 2 for mistakes in how charrnn was called (options, config values) and 1 for
everything else (missing or broken files, numerical failure).
"""


class CharRNNError(Exception):
    """Base class: a one-line, user-facing message."""

    exit_code = 1


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
