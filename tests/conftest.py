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
