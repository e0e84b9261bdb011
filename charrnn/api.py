"""The Python API: a trained model to sample from, fill gaps with or score text with, and training.

    import charrnn
    model = charrnn.load("runs/demo")                 # a run directory or a checkpoint .npz
    text = model.sample(200, prime="def ", seed=7)     # what `charrnn sample runs/demo -l 200
                                                       #   --prime "def " --seed 7` prints
    summary = charrnn.train({"data": {"path": "notes.txt"}}, run_dir="runs/notes")

The command line is a layer over these functions (cli.py calls them), so the same options and
seed give the same text, numbers and run directory. Nothing here prints unless asked (train's
`progress`) or exits: failures are charrnn.errors exceptions, whose str() gives the advice in
Python terms (e.g. `init_from='PATH'` where the command line says `--init-from PATH`).
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from charrnn import checkpoint, distributed, evaluate
from charrnn import config as _config
from charrnn import model as _model
from charrnn.config import Config
from charrnn.errors import UsageError, option
from charrnn.sample import Knobs, check_known, check_objective, sample_texts, text_pieces
from charrnn.sample import infill as _infill
from charrnn.train import RunSummary, resume_config
from charrnn.train import train as _train_run
from charrnn.vocab import Vocab

__all__ = ["Model", "RunSummary", "load", "train"]

def load(path_or_run_dir: str | Path) -> Model:
    """The model in a checkpoint file, or in a run directory (its checkpoints/best.npz, else
    last.npz). Raises CheckpointError (missing, unreadable or not charrnn's) or ConfigError (a
    config in its metadata that charrnn does not accept). Nothing but plain arrays and JSON is
    read: a checkpoint from a stranger cannot run code."""
    return Model(checkpoint.load(path_or_run_dir, with_training_state=False))


class Model:
    """A trained model, as read by charrnn.load; its arrays are read-only.

    Attributes: `path` (the checkpoint file read), `step` (optimizer steps it was trained for),
    `objective` ("next-char": generates left to right with sample/stream; "cloze": a
    bidirectional model that fills gaps with infill), `vocab` (its characters in id order),
    `unk` (the unknown symbol or None), `config` (the training config as a dict of the YAML's
    shape), `params` (name -> numpy array), `meta` (the checkpoint's metadata), `spec` (the
    architecture: cell, H, L, V, bidirectional).

    Sampling methods take the `charrnn sample` options under their Python names; `seed` is an
    int (the same int gives the same text as `--seed`), a numpy Generator (drawn from, so
    successive calls differ), or None (fresh randomness, not reproducible).
    """

    def __init__(self, ck: checkpoint.Checkpoint):
        """Made by charrnn.load (a checkpoint.Checkpoint is internal)."""
        for array in ck.params.values():
            array.setflags(write=False)  # shared with every call: a caller's write would change them all
        self._ck = ck
        self._cfg = _config.from_dict(ck.meta["config"], str(ck.path))
        self._vocab = Vocab.from_json(ck.meta)

    def __repr__(self) -> str:
        s = self.spec
        return (f"<charrnn.Model {str(self.path)!r}: {s.cell} {s.L} x {s.H}, V = {s.V}, {s.objective}, "
                f"step {self.step}>")

    @property
    def path(self) -> Path:
        """The checkpoint file this model was read from."""
        return Path(self._ck.path)

    @property
    def step(self) -> int | None:
        """Optimizer steps the checkpoint was trained for."""
        return self._ck.meta.get("step")

    @property
    def objective(self) -> str:
        """"next-char" (sample, stream) or "cloze" (infill)."""
        return self._ck.spec.objective

    @property
    def spec(self) -> _model.Spec:
        """The architecture (charrnn.model.Spec): cell, V, H, L, bidirectional."""
        return self._ck.spec

    @property
    def vocab(self) -> list[str]:
        """The model's characters in id order (a new list)."""
        return list(self._vocab.chars)

    @property
    def unk(self) -> str | None:
        """The unknown symbol (U+FFFD) that unseen characters map to, or None if the model has none."""
        return self._vocab.unk

    @property
    def config(self) -> dict:
        """The run's resolved config as a dict of the YAML's shape (a new copy; charrnn.train takes it)."""
        return _config.to_dict(self._cfg)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Parameter name -> read-only numpy array (a new dict over the same arrays)."""
        return dict(self._ck.params)

    @property
    def meta(self) -> dict:
        """The checkpoint's metadata (a new copy): config, vocab, step, best_val_loss, ..."""
        return copy.deepcopy(self._ck.meta)

    # ---- generating text ------------------------------------------------------------------------

    def sample(self, length: int = 500, prime: str = "", temperature: float = 1.0, top_k: int | None = None,
               top_p: float = 1.0, seed: int | np.random.Generator | None = None, n: int | None = None,
               stop: str | None = None, greedy: bool = False) -> str | list[str]:
        """Generate `length` characters after `prime`; returns prime + generated text, or with n a
        list of n such samples generated as one batch.

        Exactly what `charrnn sample` prints with the same options and an int seed, less its
        final newline (with n: the samples joined by lines '---'). top_k None: no limit.
        `stop`: a sample ends once its generated text ends with this string (the prime is not
        searched). Raises UsageError for a cloze model, an option out of range, a prime with
        characters the model cannot read, or a batch too large for memory; NumericalError for
        weights whose distribution is not finite.
        """
        if n is None:
            return "".join(self.stream(length, prime, temperature, top_k, top_p, seed, stop, greedy))
        knobs = _generation_request(self, length, prime, stop, temperature, top_k, top_p, greedy)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise UsageError(f"{option('num_samples', n)}: must be a whole number >= 1, or None for one string")
        return sample_texts(self.spec, self._ck.params, self._vocab, length, _rng(seed), int(n), prime, knobs, stop)

    def stream(self, length: int = 500, prime: str = "", temperature: float = 1.0, top_k: int | None = None,
               top_p: float = 1.0, seed: int | np.random.Generator | None = None, stop: str | None = None,
               greedy: bool = False) -> Iterator[str]:
        """sample() as it is generated: an iterator over pieces of text whose concatenation is
        sample()'s string: the prime with the first character, then one character at a time.

        The request is checked when stream() is called (the same errors as sample), so a
        refused request raises here, before the first piece."""
        knobs = _generation_request(self, length, prime, stop, temperature, top_k, top_p, greedy)
        return text_pieces(self.spec, self._ck.params, self._vocab, length, _rng(seed), prime, knobs, stop)

    def infill(self, template: str, mask: str = "_", seed: int | np.random.Generator | None = None,
               temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, greedy: bool = False) -> str:
        """template with every `mask` character filled from the text on both sides (cloze models);
        what `charrnn sample --infill TEMPLATE` prints, less its final newline.

        Raises UsageError for a next-char model, a mask that is not one character, an option out
        of range, or characters the model cannot read."""
        if not isinstance(template, str):
            raise UsageError(f"{option('infill', template)}: the template must be a str")
        if not (isinstance(mask, str) and len(mask) == 1):
            raise UsageError(f"{option('mask', mask)}: must be exactly one character")
        knobs = _knobs(temperature, top_k, top_p, greedy)
        check_objective(self.spec, infill=True)
        check_known(self._vocab, template.replace(mask, ""), "infill")
        return _infill(self.spec, self._ck.params, self._vocab, template, _rng(seed), mask,
                       self._cfg.train.seq_len, knobs)

    # ---- scoring text ---------------------------------------------------------------------------

    def score(self, text: str) -> dict:
        """The model's score on text: the keys and values `charrnn eval CHECKPOINT --corpus FILE
        --json` prints for a file holding that text: loss (nats/char), bpc, perplexity, chars
        (characters scored), unk_rate (share outside the vocabulary: scored as the unknown symbol
        if the model has one, else left out; 1.0 means the score says nothing about the text),
        objective.

        Raises DataError for a text too short to score, empty, or with no character the model
        knows; NumericalError when the weights make the loss non-finite."""
        return self._score_ids(*evaluate.encode_text(text, self._vocab))

    def score_file(self, path: str | Path, encoding: str | None = None, scratch_dir: str | Path | None = None) -> dict:
        """score() for the text of a file, read in `encoding` (default: the model's
        data.encoding); any size, in bounded memory: the file's ids go to an unlinked file in
        `scratch_dir` (default: scratch/ in charrnn's cache directory, $CHARRNN_CACHE_DIR or
        ~/.cache/charrnn) and are mapped, or stay in memory if it cannot be written.
        Raises DataError for a file that cannot be read or decoded, and as score() does."""
        from charrnn.corpus import cache_root

        scratch = Path(scratch_dir) if scratch_dir is not None else cache_root(None) / "scratch"
        ids, unk_rate = evaluate.encode_file(Path(path), self._vocab, encoding or self._cfg.data.encoding, scratch)
        return self._score_ids(ids, unk_rate)

    def _score_ids(self, ids, unk_rate: float | None = None) -> dict:
        """The score of ids (internal: cli.py scores a run's own split with it). unk_rate None:
        the share of ids that are the unknown symbol."""
        if unk_rate is None:
            unk = self._vocab.unk is not None and len(ids)
            unk_rate = float(np.mean(ids == self._vocab.unk_id)) if unk else 0.0
        return evaluate.evaluate_ids(self.spec, self._ck.params, ids, self._cfg.train.seq_len, unk_rate).as_dict()


def _knobs(temperature, top_k, top_p, greedy) -> Knobs:
    return Knobs(temperature, 0 if top_k is None else top_k, top_p, greedy).check()


def _whole(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{option(name, value)}: must be a whole number >= {minimum}")


def _generation_request(m: Model, length, prime, stop, temperature, top_k, top_p, greedy) -> Knobs:
    """The sampling options checked, in the command's order: the knobs, then the model's kind."""
    _whole("length", length, 0)
    if not isinstance(prime, str):
        raise UsageError(f"{option('prime', prime)}: must be a str")
    if stop is not None and not isinstance(stop, str):
        raise UsageError(f"{option('stop', stop)}: must be a str or None")
    knobs = _knobs(temperature, top_k, top_p, greedy)
    check_objective(m.spec, infill=False)
    return knobs


def _rng(seed) -> np.random.Generator:
    if seed is None or isinstance(seed, np.random.Generator):
        return np.random.default_rng(seed)
    _whole("seed", seed, 0)
    return np.random.default_rng(int(seed))


# ---- training -----------------------------------------------------------------------------------

def train(config: str | Path | dict | Config | None = None, run_dir: str | Path | None = None, resume: bool = False,
          init_from: str | Path | None = None, progress: bool | Callable[[str, dict], None] = False, *,
          sets: Iterable[str] = (), stop: Callable[[], str | None] | None = None) -> RunSummary:
    """Train a model into a run directory, as `charrnn train` does; returns the RunSummary
    (run_dir, steps, best_val_loss, best_checkpoint, ...).

    config: a YAML file's path, a dict of the YAML's shape ({"train": {"lr": 3e-3}}), a Config,
    or None (the defaults); `sets` are KEY=VALUE overrides applied last, like --set. Relative
    corpus paths are made absolute. run_dir: default runs/<name>-<timestamp>; an existing run
    directory is never overwritten. resume=True continues the run in run_dir from its newest
    checkpoint with its own config: `config` may then only be None or a dict of run-length
    keys to change (train.max_steps, ...). init_from: start from a checkpoint's weights.
    progress: False prints nothing; True shows the command's progress and summary on stderr; a
    callable(kind, record) receives each event instead. stop: a callable polled after each step;
    when it returns a reason (a str), training saves last.npz and returns with
    summary.interrupted set to it. KeyboardInterrupt saves last.npz, then propagates.

    The run written (config.yaml, metrics.jsonl apart from its timing fields, checkpoints) is
    the one `charrnn train` writes for the same config. Raises, never exits: ConfigError (a
    bad key or value), UsageError (options that do not go together), DataError (a corpus that
    cannot be read or used), CheckpointError (init_from or the run's checkpoint unreadable or
    unfit), RunDirError (run_dir exists, is in use, or cannot be written), TrainingError
    (non-finite training), all subclasses of charrnn.errors.CharRNNError.
    """
    comm = distributed.world()  # under an MPI launcher: rank 0 names the run and alone reports
    cfg, target = comm.together(lambda: _plan(config, run_dir, resume, init_from, _strings(sets)))
    if not (isinstance(progress, bool) or callable(progress)):
        raise UsageError(f"{option('progress', progress)}: must be True, False or a callable(kind, record)")
    if run_dir is None:
        target = comm.bcast(target)
    if comm.rank != 0:
        progress = False
    reporter = None
    if progress is True:
        from charrnn.progress import Reporter

        reporter = Reporter()
    report = reporter or (progress if callable(progress) else _quiet)
    with reporter or contextlib.nullcontext():
        summary = _train_run(cfg, target, resume=resume, init_from=init_from, report=report, stop=stop or _go_on)
    if reporter is not None:
        reporter.summary(summary)
    return summary


def _quiet(kind: str, record: dict) -> None:
    pass


def _go_on() -> None:
    return None


def _strings(sets) -> list[str]:
    if isinstance(sets, str) or not all(isinstance(s, str) for s in sets):
        raise UsageError(f"{option('set', 'KEY=VALUE')}: must be a list of 'KEY=VALUE' strings")
    return list(sets)


def _plan(config, run_dir, resume: bool, init_from, sets: list[str]) -> tuple[Config, Path]:
    """The resolved config and the run directory, as `charrnn train` makes them."""
    if resume:
        if run_dir is None:
            raise UsageError(f"{option('resume')} needs the run directory to continue")
        if init_from is not None:
            raise UsageError(f"{option('resume')} continues the run from its own weights; "
                             f"{option('init_from')} starts a new run: give one of them")
        if config is not None and not isinstance(config, dict):
            raise UsageError(f"{option('resume')} takes the run's own config: give config=None, or a dict "
                             "of the run-length keys to change")
        return resume_config(run_dir, _as_sets(config or {}) + sets), Path(run_dir)
    cfg = _absolute_paths(_resolve(config, sets))
    if run_dir is None:
        from charrnn.runlog import default_run_dir

        return cfg, default_run_dir(cfg.name)
    return cfg, Path(run_dir)


def _resolve(config, sets: list[str]) -> Config:
    if config is None or isinstance(config, (str, Path)):
        return _config.load(config, sets)
    if isinstance(config, dict):
        config = _config.from_dict(config, "config dict")
    elif not isinstance(config, Config):
        raise UsageError(f"config must be a path, a dict of the YAML's shape or a Config, not {type(config).__name__}")
    if not sets:
        return config
    return _config.build([(option("set"), dict(_config.parse_set(s) for s in sets))], base=config)


def _as_sets(doc: dict) -> list[str]:
    """A dict of keys to change ({"train": {"max_steps": 10}} or {"train.max_steps": 10}) as
    KEY=VALUE strings; JSON spells each value as a YAML scalar of the same type."""
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[str(key)] = value
    return [f"{key}={json.dumps(value, default=str)}" for key, value in flat.items()]


def _absolute_paths(cfg: Config) -> Config:
    """Relative corpus paths made absolute, so eval and resuming work from any directory."""
    values = {}
    for key in ("data.path", "data.val_path", "data.cache_dir"):
        value = _config.get(cfg, key)
        if value and not value.startswith("builtin:") and Path(value).expanduser().exists():
            values[key] = str(Path(value).expanduser().resolve())
    return _config.replace(cfg, values)
