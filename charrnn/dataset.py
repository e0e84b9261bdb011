"""Encoded corpora: tokenize once, cache the ids on disk, read them back memory-mapped.

A cache entry is keyed by the sha256 of the corpus bytes (and of the validation file) together
with the tokenizer settings (encoding, min_count, val_fraction), so a changed corpus or setting
gets a new entry and a second run on the same corpus skips tokenizing. Ids are stored as a .npy
file of the smallest unsigned integer type that fits the vocabulary and opened with
mmap_mode="r": memory use does not grow with the corpus, pages are read as training reaches them.

Tokenizing streams the file twice in chunks (count characters, then write provisional ids over
the file's own character set) and finally remaps those ids onto the vocabulary, which is built
from the training part only. Nothing is held in memory as a Python string of the whole corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from charrnn import corpus
from charrnn.config import DataConfig
from charrnn.errors import DataError
from charrnn.vocab import Vocab, build_vocab, id_dtype

FORMAT = 1
REMAP_CHUNK = 8 << 20  # ids per vectorized remap/bincount pass


class Dataset(NamedTuple):
    vocab: Vocab
    train: np.ndarray  # (n_train,) ids, memory-mapped
    val: np.ndarray | None  # (n_val,) ids or None when there is no validation text
    source: Path  # the resolved training file
    sha256: str  # of the training file's bytes
    cache_dir: Path  # the cache entry
    reused: bool  # True when read from the cache without tokenizing


def load(data: DataConfig) -> Dataset:
    """Resolve data.path / data.val_path, then open the cached encoding (building it if needed)."""
    path = corpus.resolve(data.path, data.cache_dir)
    val_path = corpus.resolve(data.val_path, data.cache_dir, key="data.val_path") if data.val_path else None
    sha = corpus.file_sha256(path)
    settings = {"format": FORMAT, "sha256": sha, "encoding": data.encoding, "min_count": data.min_count,
                "val_sha256": corpus.file_sha256(val_path) if val_path else None,
                "val_fraction": None if val_path else data.val_fraction}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    entry = corpus.cache_root(data.cache_dir) / "encoded" / key
    reused = (entry / "meta.json").exists()
    if not reused:
        _build_entry(entry, path, val_path, data, settings)
    return _open(entry, path, sha, reused)


def _build_entry(entry: Path, path: Path, val_path: Path | None, data: DataConfig, settings: dict) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    except OSError as e:
        raise DataError(f"cannot write the corpus cache under {entry.parent}: {e.strerror}; "
                        "set data.cache_dir to a writable directory") from None
    try:
        meta = tokenize(path, val_path, data, tmp)
        (tmp / "meta.json").write_text(json.dumps({**meta, "settings": settings}, ensure_ascii=False), encoding="utf-8")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "meta.json").exists():  # not a concurrent build that won the race
                raise
    except OSError as e:
        raise DataError(f"cannot write the corpus cache under {entry.parent}: {e.strerror}; "
                        "set data.cache_dir to a writable directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _chunks(n: int):
    for start in range(0, n, REMAP_CHUNK):
        yield slice(start, min(start + REMAP_CHUNK, n))


def _write_ids(path: Path, encoding: str, lut: np.ndarray, out: np.ndarray) -> None:
    """Stream the file's code points through a lookup table into the (memory-mapped) out array."""
    pos = 0
    for cps in corpus.iter_codepoints(path, encoding):
        np.take(lut, cps, out=out[pos : pos + len(cps)])
        pos += len(cps)
    assert pos == len(out), f"file changed while reading: {pos} != {len(out)} characters"


def tokenize(path: Path, val_path: Path | None, data: DataConfig, out_dir: Path) -> dict:
    """Write ids.npy (and val.npy) into out_dir; return the metadata of the entry."""
    counts, n = corpus.count_codepoints(path, data.encoding)
    file_chars = np.flatnonzero(counts)  # sorted code points present in the file
    lut = np.zeros(len(counts), dtype=np.int64)
    lut[file_chars] = np.arange(len(file_chars))
    dtype = id_dtype(len(file_chars))
    ids = np.lib.format.open_memmap(out_dir / "provisional.npy", mode="w+", dtype=dtype, shape=(n,))
    _write_ids(path, data.encoding, lut.astype(dtype), ids)
    if val_path is not None:
        split, train_counts = n, counts
        val_counts, n_val = corpus.count_codepoints(val_path, data.encoding)
        other = np.flatnonzero(val_counts)
    else:
        split = n - int(n * data.val_fraction)
        train_counts = np.zeros_like(counts)
        train_counts[file_chars] = sum(np.bincount(ids[s], minlength=len(file_chars)) for s in _chunks(split))
        other = file_chars[sum(np.bincount(ids[split:][s], minlength=len(file_chars)) for s in _chunks(n - split)) > 0] \
            if split < n else file_chars[:0]
    vocab = build_vocab(train_counts, data.min_count, other)
    _finalize_ids(out_dir, ids, vocab, file_chars)
    if val_path is not None:
        val_lut = vocab.lookup(np.arange(len(val_counts)))
        val_lut[val_lut < 0] = vocab.unk_id
        val = np.lib.format.open_memmap(out_dir / "val.npy", mode="w+", dtype=vocab.dtype, shape=(n_val,))
        _write_ids(val_path, data.encoding, val_lut.astype(vocab.dtype), val)
        val.flush()
        del val
    return {**vocab.to_json(), "chars": n, "split": split, "source": str(path), "val_source": str(val_path) if val_path else None}


def _finalize_ids(out_dir: Path, provisional: np.ndarray, vocab: Vocab, file_chars: np.ndarray) -> None:
    """ids.npy in the vocabulary's own id type, remapped from the provisional file-charset ids."""
    remap = vocab.lookup(file_chars)
    remap[remap < 0] = vocab.unk_id
    if provisional.dtype == vocab.dtype and np.array_equal(remap, np.arange(len(file_chars))):
        provisional.flush()
        os.replace(out_dir / "provisional.npy", out_dir / "ids.npy")
        return
    ids = np.lib.format.open_memmap(out_dir / "ids.npy", mode="w+", dtype=vocab.dtype, shape=provisional.shape)
    remap = remap.astype(vocab.dtype)
    for s in _chunks(len(ids)):
        ids[s] = remap[provisional[s]]
    ids.flush()
    (out_dir / "provisional.npy").unlink()


def _open(entry: Path, path: Path, sha: str, reused: bool) -> Dataset:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        ids = np.load(entry / "ids.npy", mmap_mode="r")
        val = np.load(entry / "val.npy", mmap_mode="r") if (entry / "val.npy").exists() else ids[meta["split"]:]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"corpus cache entry {entry} is damaged ({e}); delete that directory to rebuild it") from None
    return Dataset(Vocab.from_json(meta), ids[: meta["split"]], val if len(val) else None, path, sha, entry, reused)
