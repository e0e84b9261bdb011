"""Encoded corpora: tokenize once, cache the ids on disk, read them back memory-mapped.

A cache entry is keyed by the sha256 of the corpus bytes (and of the validation file) together
with the tokenizer settings (encoding, min_count, val_fraction), so a changed corpus or setting
gets a new entry and a second run on the same corpus skips tokenizing. Ids are stored as raw
little-endian files (ids.bin, val.bin; their id type and lengths are in meta.json) of the
smallest unsigned integer type that fits the vocabulary, and opened read-only with mmap:
nothing of the corpus is read into memory, pages are read as training reaches them.

Tokenizing reads the text once, in chunks (corpus.iter_codepoints). Characters are numbered in
the order they first appear (provisional ids) and written out with plain file writes; the
vocabulary is built from the training part's counts at the end, and a final pass over the
provisional ids, a cheap table lookup, puts them into the vocabulary's sorted order (or the
provisional file simply becomes ids.bin when the orders agree). Nothing is held in memory as a
Python string or list of the whole corpus. Measured on a 1 GB ASCII-heavy corpus (2 cores,
benchmarks/SCALE.md): the earlier scheme (a count pass, a memory-mapped write pass, bincounts
over the written ids) ran at 62 MB/s with 1.2 GB peak RSS, because every written or re-read
page of a memory-mapped output counts toward RSS and faults in one page at a time; this one
runs at 144 MB/s with 71 MB.

Pages of the mapped ids that training has read stay mapped (and counted in RSS) until someone
drops them: `release_pages` does that and the trainer calls it every `release_every` steps, so
a long run on a large corpus holds a bounded slice of it, not the whole file.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from charrnn import corpus
from charrnn.config import DataConfig
from charrnn.errors import DataError
from charrnn.vocab import Vocab, build_vocab, id_dtype

FORMAT = 2  # 2: raw .bin id files described in meta.json (1 stored .npy files)
# Ids per vectorized pass (bincount, table lookup, remap). np.bincount and np.take first convert
# their indices to 8-byte intp: on 1 Mi ids that temporary (8 MiB) stays in cache, and both ran
# about twice as fast as on 8 Mi ids at once (bincount 20 -> 9.5 ms, take 19 -> 7.5 ms per 8 Mi).
REMAP_CHUNK = 1 << 20
# Corpus bytes that training may leave mapped between two release_pages calls. A read from the
# mapping maps much more than its own 4 KiB page: Linux maps the neighbouring pages that are in
# the page cache (fault-around, whole large folios). Measured here (Linux 6.18): 250 KiB per
# random read on average in a 1 GB cache file, 1 MiB in a freshly written 16 MB one; release_every
# counts MAPPED_PER_WINDOW for each window.
RESIDENT_BUDGET = 32 << 20
MAPPED_PER_WINDOW = 1 << 20


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
    memo = corpus.cache_root(data.cache_dir) / "sha256"  # a cache hit need not re-read the whole file
    sha = corpus.file_sha256(path, memo)
    settings = {"format": FORMAT, "sha256": sha, "encoding": data.encoding, "min_count": data.min_count,
                "val_sha256": corpus.file_sha256(val_path, memo) if val_path else None,
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
        _remove_abandoned_builds(entry)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
        (tmp / "owner").write_text(_owner(), encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot write the corpus cache under {entry.parent}: {e.strerror}; "
                        "set data.cache_dir to a writable directory") from None
    try:
        meta = tokenize(path, val_path, data, tmp)
        (tmp / "meta.json").write_text(json.dumps({**meta, "settings": settings}, ensure_ascii=False), encoding="utf-8")
        (tmp / "owner").unlink()
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


def _owner() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _remove_abandoned_builds(entry: Path) -> None:
    """Delete the half-written builds of this entry that a killed process left behind (a 1 GB
    corpus leaves over 1 GB). A build is abandoned when its owner process, on this host, is gone;
    builds by live processes or other hosts (a shared cache directory) are left alone, and so is
    one with no owner file yet unless it is an hour old (its owner was killed while starting)."""
    host = socket.gethostname()
    for tmp in entry.parent.glob(f".{entry.name}.*"):
        try:
            owner = (tmp / "owner").read_text(encoding="utf-8").split()
        except FileNotFoundError:
            owner = None
        except OSError:
            continue
        if owner is None:
            abandoned = time.time() - tmp.stat().st_mtime > 3600
        else:
            abandoned = len(owner) == 2 and owner[0] == host and owner[1].isdigit() and not _alive(int(owner[1]))
        if abandoned:
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def _chunks(n: int, start: int = 0):
    for a in range(start, n, REMAP_CHUNK):
        yield slice(a, min(a + REMAP_CHUNK, n))


def _little_endian(dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def _sync(path: Path) -> None:
    """Flush a written file to disk: the entry is renamed into place afterwards and must not be
    left half-written. (Only final files: syncing provisional ones cost 45 ms a file in tests.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Provisional(NamedTuple):
    """A file's characters numbered in order of first appearance, ids written to segment files."""

    chars: np.ndarray  # (K,) the code point of each provisional id
    counts: np.ndarray  # (K,) occurrences of each provisional id
    n: int  # characters in the file
    segments: list  # [name, dtype, count] in file order; the id type widens from one to the next


def _provisional_ids(path: Path, encoding: str, out_dir: Path) -> _Provisional:
    """Read the file once: count its characters and write their provisional ids.

    A character gets the next id the first time it appears (the characters new in one block in
    code point order). Ids are written in the smallest type that holds the ids so far; when the
    character set outgrows it, a new segment file starts with the wider type, so nothing already
    written is rewritten. Plain file writes, not a writable memory map: written pages of a map
    count toward RSS, and faulting them in one by one cost more system time than the writes.
    """
    lut = np.full(256, -1, dtype=np.int64)  # code point -> provisional id; -1: not seen yet
    order, counts, segments, out, n = [], np.zeros(0, dtype=np.int64), [], None, 0
    try:
        for cps in corpus.iter_codepoints(path, encoding):
            for s in _chunks(len(cps)):
                block = cps[s]
                block_counts = np.bincount(block)  # (max code point in the block + 1,)
                present = np.flatnonzero(block_counts)
                if len(block_counts) > len(lut):
                    lut = np.concatenate([lut, np.full(len(block_counts) - len(lut), -1, dtype=np.int64)])
                new = present[lut[present] < 0]
                if len(new):  # always in the first block: dtype and table are set before use
                    lut[new] = np.arange(len(counts), len(counts) + len(new))
                    order.append(new)
                    counts = np.concatenate([counts, np.zeros(len(new), dtype=np.int64)])
                    dtype = _little_endian(id_dtype(len(counts)))
                    table = np.maximum(lut, 0).astype(dtype)  # code point -> id in the file's id type
                counts[lut[present]] += block_counts[present]
                if out is None or dtype != segments[-1][1]:
                    if out is not None:
                        out.close()
                    segments.append([f"provisional-{len(segments)}.bin", dtype, 0])
                    out = open(out_dir / segments[-1][0], "wb")
                out.write(np.take(table, block))
                segments[-1][2] += len(block)
                n += len(block)
    finally:
        if out is not None:
            out.close()
    chars = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    corpus.check_text(path, n, chars)
    return _Provisional(chars, counts, n, segments)


def _read_ids(out_dir: Path, segments: list, start: int = 0) -> Iterator[np.ndarray]:
    """Provisional ids from position `start` to the end, REMAP_CHUNK at a time, in file order."""
    offset = 0
    for name, dtype, count in segments:
        if start < offset + count:
            first = max(start - offset, 0)
            with open(out_dir / name, "rb") as f:
                f.seek(first * dtype.itemsize)
                for s in _chunks(count - first):
                    yield np.frombuffer(f.read((s.stop - s.start) * dtype.itemsize), dtype=dtype)
        offset += count


def _write_ids(path: Path, encoding: str, table: np.ndarray, out_path: Path) -> int:
    """Stream the file's code points through a lookup table into out_path; returns the count."""
    n = 0
    with open(out_path, "wb") as f:
        for cps in corpus.iter_codepoints(path, encoding):
            for s in _chunks(len(cps)):
                f.write(np.take(table, cps[s]))
            n += len(cps)
    _sync(out_path)
    return n


def tokenize(path: Path, val_path: Path | None, data: DataConfig, out_dir: Path) -> dict:
    """Write ids.bin (and val.bin) into out_dir; return the metadata of the entry."""
    prov = _provisional_ids(path, data.encoding, out_dir)
    chars = prov.chars
    if val_path is not None:
        split, train_counts = prov.n, prov.counts
        val_counts, n_val = corpus.count_codepoints(val_path, data.encoding)
        other = np.flatnonzero(val_counts)
    else:
        split = prov.n - int(prov.n * data.val_fraction)
        # the validation tail's counts, read back from the provisional ids (a tenth of them by
        # default); the training counts are the rest
        tail = np.zeros(len(chars), dtype=np.int64)
        for block in _read_ids(out_dir, prov.segments, split):
            tail += np.bincount(block, minlength=len(chars))
        train_counts, other = prov.counts - tail, chars[tail > 0]
    dense = np.zeros(int(chars.max()) + 1, dtype=np.int64)  # per code point, as build_vocab takes them
    dense[chars] = train_counts
    vocab = build_vocab(dense, data.min_count, other)
    dtype = _little_endian(vocab.dtype)
    _finalize_ids(out_dir, prov, vocab, dtype)
    meta = {**vocab.to_json(), "chars": prov.n, "split": split, "source": str(path),
            "val_source": str(val_path) if val_path else None,
            "ids": {"file": "ids.bin", "dtype": dtype.str}, "val": None}
    if val_path is not None:
        table = vocab.lookup(np.arange(len(val_counts)))
        table[table < 0] = vocab.unk_id
        if _write_ids(val_path, data.encoding, table.astype(dtype), out_dir / "val.bin") != n_val:
            raise DataError(f"{val_path} changed while it was read; run again")
        meta["val"] = {"file": "val.bin", "dtype": dtype.str, "chars": n_val}
    return meta


def _finalize_ids(out_dir: Path, prov: _Provisional, vocab: Vocab, dtype: np.dtype) -> None:
    """ids.bin in the vocabulary's own ids, remapped from the provisional ones."""
    remap = vocab.lookup(prov.chars)  # provisional id -> vocabulary id, -1 outside it
    remap[remap < 0] = vocab.unk_id
    segments = prov.segments
    if len(segments) == 1 and segments[0][1] == dtype and np.array_equal(remap, np.arange(len(remap))):
        # every character appeared in the first block (common for text in one script): the
        # provisional ids are already the vocabulary's
        os.replace(out_dir / segments[0][0], out_dir / "ids.bin")
    else:
        table = remap.astype(dtype)
        with open(out_dir / "ids.bin", "wb") as f:
            for block in _read_ids(out_dir, segments):
                f.write(np.take(table, block))
        for name, _, _ in segments:
            (out_dir / name).unlink()
    _sync(out_dir / "ids.bin")


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """(count,) ids of a raw file, mapped read-only: the kernel reads pages as they are touched."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != count * dtype.itemsize:
            raise ValueError(f"{path.name} holds {size} bytes, not {count} ids of {dtype.itemsize} bytes")
        if count == 0:
            return np.zeros(0, dtype=dtype)
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)  # stays valid after close
    return np.frombuffer(mapping, dtype=dtype)


def _open(entry: Path, path: Path, sha: str, reused: bool) -> Dataset:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        ids = _map(entry / meta["ids"]["file"], np.dtype(meta["ids"]["dtype"]), meta["chars"])
        if meta["val"]:
            val = _map(entry / meta["val"]["file"], np.dtype(meta["val"]["dtype"]), meta["val"]["chars"])
        else:
            val = ids[meta["split"]:]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"corpus cache entry {entry} is damaged ({e}); delete that directory to rebuild it") from None
    return Dataset(Vocab.from_json(meta), ids[: meta["split"]], val if len(val) else None, path, sha, entry, reused)


# ---- keeping the mapped corpus out of RSS ---------------------------------------------------------

def release_every(windows: int, seq_len: int) -> int:
    """Steps (or evaluation batches) of `windows` windows of seq_len + 1 ids between two
    release_pages calls, so that at most about RESIDENT_BUDGET bytes of the corpus stay mapped.

    With the default 32 windows this is every step, with 8 windows every 3. Measured on a 1 GB
    corpus (2 cores): a release, and faulting the next 32 windows back in from the page cache,
    cost about 0.3 ms; a training step of a hidden-64 model with 32 windows of 64 about 50 ms.
    """
    per_step = windows * (MAPPED_PER_WINDOW + 4 * (seq_len + 1))  # 4: the widest id type
    return max(1, RESIDENT_BUDGET // per_step)


def _mapping_of(a) -> mmap.mmap | None:
    """The mmap behind an array from load (through slices and views), else None."""
    while a is not None:
        if isinstance(a, memoryview):
            return a.obj if isinstance(a.obj, mmap.mmap) else None
        a = getattr(a, "base", None)
    return None


def release_pages(*arrays) -> None:
    """Drop the pages of memory-mapped ids (from load) that this process has read.

    Without this, every page training touches stays mapped and counts toward the process's RSS,
    so a long run would end up holding the whole encoded corpus. madvise(MADV_DONTNEED) on a
    read-only shared file mapping only removes the process's page table entries: the data stays
    in the kernel's page cache and in the file, values never change (determinism and exact
    resume are unaffected), and the next read of a page is a minor fault. Arrays that are not
    memory-mapped (in-memory ids, None) are skipped, as are platforms without madvise.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    done = set()
    for a in arrays:
        mapping = _mapping_of(a)
        if mapping is not None and id(mapping) not in done:
            mapping.madvise(mmap.MADV_DONTNEED)
            done.add(id(mapping))
