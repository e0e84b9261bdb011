"""Shared fixtures for the charrnn tests.

Kept deliberately small; add new fixtures below the existing ones, one per concern.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point the corpus cache at a fresh directory so no test reads or writes the user's cache."""
    cache = tmp_path / "charrnn-cache"
    cache.mkdir()
    monkeypatch.setenv("CHARRNN_CACHE_DIR", str(cache))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return cache


@pytest.fixture
def cache_dir(_isolated_cache) -> Path:
    """The per-test cache directory that CHARRNN_CACHE_DIR points at."""
    return _isolated_cache


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def write_text(tmp_path):
    """write_text(text, name="corpus.txt", encoding="utf-8") -> Path of the written file.

    Pass `bytes` to write raw bytes (e.g. invalid UTF-8). Names may contain subdirectories.
    """

    def write(text: str | bytes, name: str = "corpus.txt", encoding: str = "utf-8") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_bytes(text.encode(encoding))
        return path

    return write


# ---- end-to-end helpers: the CLI in-process, tiny training configs, shared tiny runs ------------

@pytest.fixture
def cli_invoke():
    """cli_invoke(*args) -> click Result of `charrnn ARGS`, run in-process by click's CliRunner.

    stdout and stderr are kept apart (result.stdout, result.stderr; result.stdout_bytes for the raw
    bytes) and neither is a terminal. `charrnn train` installs SIGINT/SIGTERM handlers; they are
    put back afterwards so that Ctrl-C still reaches pytest.
    """
    import signal

    from click.testing import CliRunner

    from charrnn.cli import cli

    def invoke(*args):
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return CliRunner().invoke(cli, [str(a) for a in args], prog_name="charrnn")
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)

    return invoke


class Tiny:
    """Settings for runs that train in well under a second on a corpus of a few KB."""

    SETS = ("model.hidden_size=16", "train.seq_len=16", "train.batch_size=8", "train.max_steps=20",
            "train.log_every=5", "train.eval_every=10", "train.checkpoint_every=0", "train.sample_chars=20")
    # a learnable corpus and settings that learn it to ~0.01 nats/char in about 0.2 s (float64)
    PHRASE = "the quick brown fox jumps over the lazy dog.\n" * 50
    LEARN = ("model.hidden_size=32", "train.lr=1e-2", "train.max_steps=150", "train.eval_every=50",
             "train.log_every=25", "train.dtype=float64")
    CLOZE = ("model.bidirectional=true", "train.lr=1e-2", "train.max_steps=60", "train.eval_every=30")

    @classmethod
    def sets(cls, corpus, *extra, cache_dir=None) -> list[str]:
        """KEY=VALUE strings: data.path=corpus, the tiny defaults, then `extra` (which win)."""
        cache = [f"data.cache_dir={cache_dir}"] if cache_dir is not None else []
        return [f"data.path={corpus}", *cache, *cls.SETS, *extra]

    @classmethod
    def args(cls, corpus, *extra, cache_dir=None) -> list[str]:
        """The same as `--set KEY=VALUE` command-line arguments."""
        return [a for s in cls.sets(corpus, *extra, cache_dir=cache_dir) for a in ("--set", s)]

    @classmethod
    def config(cls, corpus, *extra, cache_dir=None):
        from charrnn import config

        return config.load(None, cls.sets(corpus, *extra, cache_dir=cache_dir))


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory) -> Path:
    """words.txt holding the test module's WORDS text, written once per module."""
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(request.module.WORDS, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny() -> type[Tiny]:
    """Tiny.sets / Tiny.args / Tiny.config(corpus, *extra_sets): tiny-run configuration."""
    return Tiny


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """shared_run(text, *extra_sets) -> Path of a finished run trained (through the library) on
    `text` with the Tiny settings and `extra_sets`; trained once per session for each distinct
    (text, extra_sets). Treat the directory as read-only: other tests use it too. Its corpus is
    the file corpus.txt next to it, its cache data.cache_dir (set in its config)."""
    from charrnn.train import train

    runs: dict = {}

    def get(text: str, *extra: str) -> Path:
        key = (text, extra)
        if key not in runs:
            root = tmp_path_factory.mktemp("shared-run")
            corpus = root / "corpus.txt"
            corpus.write_bytes(text.encode("utf-8"))
            train(Tiny.config(corpus, *extra, cache_dir=root / "cache"), root / "run")
            runs[key] = root / "run"
        return runs[key]

    return get


# ---- fault injection ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def faults():
    """The helper module tests/faults.py: Disk (writes that fail like a full or read-only disk),
    Child (a real `charrnn` process whose stderr can be waited on), run and checkpoint comparisons.
    Loaded from its file because --import-mode=importlib keeps tests/ off sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("charrnn_test_faults", Path(__file__).parent / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_hang():
    """Turns a hang (a blocking open of a FIFO with no writer) into a test failure (SIGALRM after
    60 s) instead of a stuck suite."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("blocked for 60 s: a FIFO was opened as if it were a file")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
