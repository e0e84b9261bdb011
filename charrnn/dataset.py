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
Python string or list of the whole corpus. The earlier scheme (a count pass, a memory-mapped
write pass, bincounts over the written ids) was less than half as fast and its peak RSS grew
with the corpus, because every written or re-read page of a memory-mapped output counts toward
RSS and faults in one page at a time (benchmarks/SCALE.md, benchmarks/README.md).

Pages of the mapped ids that training has read stay mapped (and counted in RSS) until someone
drops them: `release_pages` does that and the trainer calls it every `release_every` steps, so
a long run on a large corpus holds a bounded slice of it, not the whole file.

An entry serves only the text it was built from. It is filed under the sha256 of the bytes that
were tokenized (hashed in the same reads), and its meta.json records those settings, a
fingerprint of each source (corpus.ReadDigest) and a CRC-32 of each id file. An entry is used
only when it passes every check as it is opened: owned by the user (corpus.owned, the rule for
everything in the cache), its meta.json well-formed and made for these settings, each id file
of the recorded size and checksum with every id below the vocabulary size (one chunked pass,
read, not mapped, so validating adds nothing to RSS), and, when the corpus's sha256 came from a
memo, the corpus matching the recorded fingerprint. An entry that fails is not used: one of the
user's own is replaced by a fresh build; one that is not the user's is left alone and the corpus
is tokenized into a private directory, used and deleted (its mapped files live on until exit).

A memory-mapped file that shrinks under a running process turns the next read of a page past
its new end into SIGBUS, which kills Python without a message. `check_mapped` compares each
mapping with its file's current size (one fstat); batches.py calls it before every read of
windows, so a cache file truncated during training ends the run with a DataError at the next
step. A truncation in the microseconds between that check and the read can still raise SIGBUS.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import socket
import stat
import tempfile
import time
import zlib
from pathlib import Path
from typing import NamedTuple
from collections.abc import Iterator

import numpy as np

from charrnn import corpus
from charrnn.config import DataConfig
from charrnn.errors import DataError, option
from charrnn.vocab import Vocab, build_vocab, id_dtype

FORMAT = 3  # 3: meta.json records checksums and source fingerprints (2: without; 1: .npy files)
# Ids per vectorized pass (bincount, table lookup, remap). np.bincount and np.take first convert
# their indices to 8-byte intp: on 1 Mi ids that temporary (8 MiB) stays in cache, which makes
# both about twice as fast as on much longer passes (benchmarks/README.md).
REMAP_CHUNK = 1 << 20
# Corpus bytes that training may leave mapped between two release_pages calls. A read from the
# mapping maps much more than its own 4 KiB page: Linux maps the neighbouring pages that are in
# the page cache (fault-around, whole large folios), how many depending on the kernel and on the
# file. release_every counts MAPPED_PER_WINDOW, the most one read was seen to map
# (benchmarks/README.md), for each window.
RESIDENT_BUDGET = 32 << 20
MAPPED_PER_WINDOW = 1 << 20
SCAN_BYTES = 1 << 20  # id file bytes checksummed at a time when an entry is opened
META_LIMIT = 64 << 20  # meta.json of the largest vocabulary (1.1 M code points) is about 10 MB


class Dataset(NamedTuple):
    vocab: Vocab
    train: np.ndarray  # (n_train,) ids, memory-mapped
    val: np.ndarray | None  # (n_val,) ids or None when there is no validation text
    source: Path  # the resolved training file
    sha256: str  # of the training file's bytes, as they were tokenized
    cache_dir: Path  # the cache entry
    reused: bool  # True when read from the cache without tokenizing


def load(data: DataConfig) -> Dataset:
    """Resolve data.path / data.val_path, then open the cached encoding (building it if needed)."""
    path = corpus.resolve(data.path, data.cache_dir)
    val_path = corpus.resolve(data.val_path, data.cache_dir, key="data.val_path") if data.val_path else None
    corpus.check_encoding(data.encoding)
    root = corpus.cache_root(data.cache_dir)
    memo = root / "sha256"  # a cache hit need not re-read the whole file
    sources = [corpus.source_sha256(p, memo) if p else None for p in (path, val_path)]
    for _ in range(2):
        settings = _settings(data, sources)
        entry = root / "encoded" / _key(settings)
        try:
            return _open_entry(entry, settings, sources, reused=True)
        except _MemoMismatch:  # a memo's sha256 led to an entry of another text: hash the files
            sources = [corpus.source_sha256(s.path, memo, recall=False) if s else None for s in sources]
        except _Unusable:
            break
    return _build(entry, path, val_path, data)


def attach(data: DataConfig, entry: str, source: str, sha256: str) -> Dataset:
    """The entry another process of the same training run (rank 0) has just built or checked,
    opened without reading the text or checksumming the id files again: the other ranks of a
    parallel run read only the windows they train on. The entry must be the one for data's
    settings and that sha256; if it is not there (rank 0 built it privately), load() instead."""
    path = Path(entry)
    try:
        dir_fd = corpus.open_owned_dir(path)
    except OSError:
        return load(data)
    try:
        meta = _read_meta(dir_fd)
        settings = meta.get("settings")
        if not isinstance(settings, dict) or settings.get("sha256") != sha256:
            raise _Unusable("made for another text")
        vocab = _check_meta(meta, settings)
        ids = _map_checked(dir_fd, path, meta["ids"], meta["chars"], len(vocab), scan=False)
        val = (_map_checked(dir_fd, path, meta["val"], meta["val"]["chars"], len(vocab), scan=False)
               if meta["val"] else ids[meta["split"]:])
    except _Unusable:
        return load(data)
    finally:
        os.close(dir_fd)
    return Dataset(vocab, ids[: meta["split"]], val if len(val) else None, Path(source), sha256, path, True)


def _settings(data: DataConfig, sources: list) -> dict:
    """What an entry depends on: the texts' sha256 and the tokenizer settings."""
    train, val = sources
    return {"format": FORMAT, "sha256": train.sha256, "encoding": data.encoding, "min_count": data.min_count,
            "val_sha256": val.sha256 if val else None, "val_fraction": None if val else data.val_fraction}


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


class _Unusable(Exception):
    """A cache entry that is missing, not the user's own, damaged, or made for another text."""


class _MemoMismatch(_Unusable):
    """The entry that a memoized sha256 leads to was not built from the file as it is now."""


def _build(guess: Path, path: Path, val_path: Path | None, data: DataConfig) -> Dataset:
    """Tokenize into a fresh private directory and file it under the sha256 of what was read
    (`guess`, the entry of the hashes read before, names the build directory)."""
    tmp = _new_build_dir(guess)
    try:
        meta = tokenize(path, val_path, data, tmp)
        train, val = meta["sources"]["train"], meta["sources"]["val"]
        sources = [corpus.Source(path, train["sha256"], False), corpus.Source(val_path, val["sha256"], False) if val else None]
        settings = _settings(data, sources)
        for part in ("ids", "val"):
            if meta[part]:
                meta[part]["crc32"] = _checksum(tmp / meta[part]["file"])
        (tmp / "meta.json").write_text(json.dumps({**meta, "settings": settings}, ensure_ascii=False), encoding="utf-8")
        _sync(tmp / "meta.json")
        (tmp / "owner").unlink()
        return _place(tmp, guess.parent / _key(settings), settings, sources)
    except OSError as e:
        raise DataError(f"cannot write the corpus cache under {guess.parent}: {e.strerror}; "
                        "set data.cache_dir to a writable directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the build failed or stayed private


def _new_build_dir(entry: Path) -> Path:
    """A fresh directory (mode 0700) next to entry, with an owner file naming this process."""
    try:
        corpus.make_private_dir(entry.parent)
        _remove_abandoned_builds(entry)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
        (tmp / "owner").write_text(_owner(), encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot write the corpus cache under {entry.parent}: {e.strerror}; "
                        "set data.cache_dir to a writable directory") from None
    return tmp


_OCCUPIED = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)  # rename() onto something


def _place(tmp: Path, entry: Path, settings: dict, sources: list) -> Dataset:
    """Rename the finished build tmp to entry and open it. If something is there already: an
    entry that passes its checks (a concurrent build of the same text) is used instead; anything
    else of the user's own is replaced; another user's is left alone, and tmp is opened where it
    is, privately (the caller deletes it: mapped files outlive their names)."""
    for _ in range(3):
        try:
            os.rename(tmp, entry)
            return _open_new(entry, settings, sources)
        except OSError as e:
            if e.errno not in _OCCUPIED:
                raise
        try:
            return _open_entry(entry, settings, sources, reused=False)
        except _Unusable:
            pass
        if not _remove_own(entry):
            break
    return _open_new(tmp, settings, sources)


def _open_new(entry: Path, settings: dict, sources: list) -> Dataset:
    try:
        return _open_entry(entry, settings, sources, reused=False)
    except _Unusable as e:
        raise DataError(f"the corpus cache entry {entry} failed its check right after it was written ({e}); "
                        "check the disk, or set data.cache_dir elsewhere") from None


def _remove_own(entry: Path) -> bool:
    """Remove what is at entry if it is the user's own (True), else leave it (False)."""
    try:
        st = os.lstat(entry)
    except FileNotFoundError:
        return True
    if st.st_uid != os.geteuid():
        return False
    if stat.S_ISDIR(st.st_mode):
        aside = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.stale-"))
        os.rename(entry, aside / "entry")  # one step: a reader sees the old entry or none
        shutil.rmtree(aside, ignore_errors=True)
    else:
        entry.unlink()
    return True


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
            st = os.lstat(tmp)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue  # another user's, or planted: not ours to delete
        try:
            owner = (tmp / "owner").read_text(encoding="utf-8").split()
        except FileNotFoundError:
            owner = None
        except OSError:
            continue
        if owner is None:
            abandoned = time.time() - st.st_mtime > 3600
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
    left half-written. (Only final files: provisional ones are deleted after the build, and
    syncing each of them too made every build, and the test suite, noticeably slower.)"""
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


def _provisional_ids(path: Path, encoding: str, out_dir: Path, digest: corpus.ReadDigest) -> _Provisional:
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
        for cps in corpus.iter_codepoints(path, encoding, digest=digest):
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


def _write_ids(path: Path, encoding: str, table: np.ndarray, out_path: Path, digest: corpus.ReadDigest) -> int:
    """Stream the file's code points through a lookup table into out_path; returns the count."""
    n = 0
    with open(out_path, "wb") as f:
        for cps in corpus.iter_codepoints(path, encoding, digest=digest):
            for s in _chunks(len(cps)):
                f.write(np.take(table, cps[s]))
            n += len(cps)
    _sync(out_path)
    return n


def tokenize(path: Path, val_path: Path | None, data: DataConfig, out_dir: Path) -> dict:
    """Write ids.bin (and val.bin) into out_dir; return the metadata of the entry, with the
    sha256 and fingerprint of the bytes that were read under "sources"."""
    read = corpus.ReadDigest()
    prov = _provisional_ids(path, data.encoding, out_dir, read)
    chars = prov.chars
    if val_path is not None:
        split, train_counts = prov.n, prov.counts
        val_read = corpus.ReadDigest()
        val_counts, n_val = corpus.count_codepoints(val_path, data.encoding, val_read)
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
            "ids": {"file": "ids.bin", "dtype": dtype.str}, "val": None,
            "sources": {"train": read.record(), "val": None}}
    if val_path is not None:
        table = vocab.lookup(np.arange(len(val_counts)))
        table[table < 0] = vocab.unk_id
        again = corpus.ReadDigest()  # the counts and the ids must come from the same bytes
        if _write_ids(val_path, data.encoding, table.astype(dtype), out_dir / "val.bin", again) != n_val \
                or again.sha256 != val_read.sha256:
            raise DataError(f"{val_path} changed while it was read; run again")
        meta["val"] = {"file": "val.bin", "dtype": dtype.str, "chars": n_val}
        meta["sources"]["val"] = val_read.record()
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


# ---- opening an entry: every check before any use ------------------------------------------------

def _open_entry(entry: Path, settings: dict, sources: list, reused: bool) -> Dataset:
    """The entry's ids, mapped, if it passes every check (module docstring); else _Unusable."""
    try:
        dir_fd = corpus.open_owned_dir(entry)
    except OSError as e:
        raise _Unusable(f"not a directory of the user's own: {e.strerror or e}") from None
    try:
        meta = _read_meta(dir_fd)
        vocab = _check_meta(meta, settings)
        _check_sources(meta, sources)
        ids = _map_checked(dir_fd, entry, meta["ids"], meta["chars"], len(vocab))
        val = _map_checked(dir_fd, entry, meta["val"], meta["val"]["chars"], len(vocab)) if meta["val"] else ids[meta["split"]:]
    finally:
        os.close(dir_fd)
    return Dataset(vocab, ids[: meta["split"]], val if len(val) else None, sources[0].path, settings["sha256"], entry, reused)


def _read_meta(dir_fd: int) -> dict:
    try:
        with os.fdopen(corpus.open_owned_file(dir_fd, "meta.json"), "rb") as f:
            size = os.fstat(f.fileno()).st_size  # read(n) would set aside n bytes at once
            if size > META_LIMIT:
                raise _Unusable("meta.json is too long")
            raw = f.read(size)
        meta = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise _Unusable(f"meta.json: {e.strerror or e}") from None
    except ValueError as e:  # undecodable or invalid JSON
        raise _Unusable(f"meta.json: {e}") from None
    if not isinstance(meta, dict):
        raise _Unusable("meta.json is not an object")
    return meta


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_meta(meta: dict, settings: dict) -> Vocab:
    """The entry's vocabulary, after checking the type of everything load reads from meta."""
    if meta.get("settings") != settings:
        raise _Unusable("made for other settings or another text")
    n, split, ids, val = meta.get("chars"), meta.get("split"), meta.get("ids"), meta.get("val")
    if not (_count(n) and _count(split) and split <= n):
        raise _Unusable("chars or split is not a valid count")
    chars, unk = meta.get("vocab"), meta.get("unk")
    if not (isinstance(chars, list) and all(isinstance(c, str) for c in chars) and (unk is None or isinstance(unk, str))):
        raise _Unusable("the vocabulary is not a list of characters")
    try:
        vocab = Vocab(chars, unk)
    except DataError as e:
        raise _Unusable(str(e)) from None
    dtype = _little_endian(vocab.dtype).str
    val_ok = val is None or (_id_file(val, "val.bin", dtype) and _count(val.get("chars")))
    if not (_id_file(ids, "ids.bin", dtype) and val_ok):
        raise _Unusable("the id files are not described as written")
    if (val is None) != (settings["val_sha256"] is None):
        raise _Unusable("the validation part does not match the settings")
    return vocab


def _id_file(spec, name: str, dtype: str) -> bool:
    crc = spec.get("crc32") if isinstance(spec, dict) else None
    return isinstance(spec, dict) and spec.get("file") == name and spec.get("dtype") == dtype and _count(crc) and crc < 1 << 32


def _check_sources(meta: dict, sources: list) -> None:
    """_MemoMismatch when a source's sha256 came from a memo and the file does not match the
    fingerprint recorded when the entry was built."""
    recorded = meta.get("sources")
    if not isinstance(recorded, dict):
        raise _Unusable("the sources are not recorded")
    for part, source in zip(("train", "val"), sources):
        rec = recorded.get(part)
        fp = rec.get("fingerprint") if isinstance(rec, dict) else None
        if not (fp is None or isinstance(fp, str)):
            raise _Unusable("a source fingerprint is not a string")
        if source is not None and source.recalled and (fp is None or corpus.fingerprint(source.path) != fp):
            raise _MemoMismatch(f"{source.path} does not match the text the entry was built from")


class _FileMap(mmap.mmap):
    """A read-only mapping of a cache file that knows the file's path (for check_mapped)."""

    path: Path


def _map_checked(dir_fd: int, entry: Path, spec: dict, count: int, V: int, scan: bool = True) -> np.ndarray:
    """(count,) ids of an entry's file, mapped read-only, after checking its owner, size, checksum
    and that every id is below V (the last two only with scan: see attach)."""
    dtype = np.dtype(spec["dtype"])
    try:
        fd = corpus.open_owned_file(dir_fd, spec["file"])
    except OSError as e:
        raise _Unusable(f"{spec['file']}: {e.strerror or e}") from None
    try:
        size = os.fstat(fd).st_size
        if size != count * dtype.itemsize:
            raise _Unusable(f"{spec['file']} holds {size} bytes, not {count} ids of {dtype.itemsize} bytes")
        crc, top = _scan(fd, dtype, size) if scan else (spec["crc32"], 0)
        if crc != spec["crc32"]:
            raise _Unusable(f"{spec['file']} does not match its checksum")
        if top >= V:
            raise _Unusable(f"{spec['file']} holds id {top}, outside the vocabulary of {V}")
        if count == 0:
            return np.zeros(0, dtype=dtype)
        mapping = _FileMap(fd, size, access=mmap.ACCESS_READ)  # stays valid after close
        mapping.path = entry / spec["file"]
    finally:
        os.close(fd)
    return np.frombuffer(mapping, dtype=dtype)


def _scan(fd: int, dtype: np.dtype, size: int) -> tuple[int, int]:
    """(CRC-32, largest id) of an id file of `size` bytes, read SCAN_BYTES at a time: one pass,
    plain reads (a read does not stay mapped in RSS the way a mapped page does)."""
    buf = bytearray(SCAN_BYTES)
    view = memoryview(buf)
    crc, top, pos = 0, 0, 0
    while pos < size:
        n = os.preadv(fd, [view[: min(SCAN_BYTES, size - pos)]], pos)
        if n == 0 or n % dtype.itemsize:
            raise _Unusable("an id file changed while it was checked")
        crc = zlib.crc32(view[:n], crc)
        top = max(top, int(np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize).max()))
        pos += n
    return crc, top


def _checksum(path: Path) -> int:
    """The CRC-32 of a file just written into a build directory, for meta.json."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _scan(fd, np.dtype(np.uint8), os.fstat(fd).st_size)[0]
    except _Unusable:
        raise DataError(f"{path} changed while it was written; run the command again") from None
    finally:
        os.close(fd)


def check_mapped(*arrays) -> None:
    """DataError if the file behind memory-mapped ids (from load) has shrunk since it was mapped:
    reading a page past its new end would kill the process with SIGBUS. mmap.size() is one fstat
    of the mapping's own descriptor, cheap enough before every batch."""
    for a in arrays:
        mapping = _mapping_of(a)
        if mapping is not None and len(mapping) and mapping.size() < len(mapping):
            path = getattr(mapping, "path", None)
            if path is None:
                raise DataError("a memory-mapped corpus file was truncated while it was read; run the command again")
            raise DataError(f"the corpus cache file {path} was truncated while it was in use; run the command again "
                            f"(the entry is rebuilt; a training run continues from its last checkpoint with {option('resume')})")


# ---- keeping the mapped corpus out of RSS ---------------------------------------------------------

def release_every(windows: int, seq_len: int) -> int:
    """Steps (or evaluation batches) of `windows` windows of seq_len + 1 ids between two
    release_pages calls, so that at most about RESIDENT_BUDGET bytes of the corpus stay mapped.

    With the default 32 windows this is every step, with 8 windows every 3. A release, and
    faulting the next windows back in from the page cache, costs well under a hundredth of even a
    small model's training step (benchmarks/README.md), so releasing this often is cheap.
    """
    per_step = windows * (MAPPED_PER_WINDOW + 4 * (seq_len + 1))  # 4: the widest id type
    return max(1, RESIDENT_BUDGET // per_step)


def _mapping_of(a) -> mmap.mmap | None:
    """The read-only file mapping behind an array (through slices and views), as load maps ids,
    else None. Writable mappings are not ours: dropping their pages would discard what was
    written (a private anonymous mapping reads back as zeros), and one without a file cannot
    be truncated."""
    while a is not None:
        if isinstance(a, memoryview):
            return a.obj if isinstance(a.obj, mmap.mmap) and _read_only_file(a.obj) else None
        a = getattr(a, "base", None)
    return None


def _read_only_file(mapping: mmap.mmap) -> bool:
    with memoryview(mapping) as view:
        if not view.readonly:
            return False
    try:
        mapping.size()  # the mapped file's size: EBADF for an anonymous mapping
    except OSError:
        return False
    return True


def release_pages(*arrays) -> None:
    """Drop the pages of memory-mapped ids (from load) that this process has read.

    Without this, every page training touches stays mapped and counts toward the process's RSS,
    so a long run would end up holding the whole encoded corpus. madvise(MADV_DONTNEED) on a
    read-only shared file mapping only removes the process's page table entries: the data stays
    in the kernel's page cache and in the file, values never change (determinism and exact
    resume are unaffected), and the next read of a page is a minor fault. Arrays that are not
    behind such a mapping (in-memory ids, None, writable or anonymous mappings: see _mapping_of)
    are skipped, as are platforms without madvise.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    done = set()
    for a in arrays:
        mapping = _mapping_of(a)
        if mapping is not None and id(mapping) not in done:
            mapping.madvise(mmap.MADV_DONTNEED)
            done.add(id(mapping))
