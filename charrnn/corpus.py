"""Corpus sources: text files, built-in corpora and the download catalog; chunked, checked decoding.

`data.path` is one of
  * a path to a text file;
  * `builtin:python-docs`: the English text of the Python documentation topics that ship with
    every CPython (`pydoc_data.topics`), written once into the cache so training works offline;
  * a catalog name from `corpora/catalog.json` (e.g. `tinyshakespeare`): downloaded on first use
    into `corpora/`, its size and sha256 verified.

Files are read in fixed-size byte chunks through an incremental decoder, so a multi-byte
character split across chunks is reassembled and memory does not grow with file size.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np

from charrnn import atomic
from charrnn.errors import DataError

# Bytes read and decoded at a time. Measured on 256 MB of ASCII-heavy text with some emoji (2
# cores): 1 MiB chunks decode at 460 MB/s, 8 MiB ones at 200 MB/s (the decoded str and its UTF-32
# copy, 4 bytes a character, no longer fit in the caches); pure ASCII and CJK text are no slower
# at 1 MiB. Peak memory is about 13 chunks (the chunk, its str, UTF-32 copies of it and of the
# previous chunk), so 1 MiB also keeps tokenizing small.
CHUNK_BYTES = 1 << 20
BUILTIN_PREFIX = "builtin:"
CORPORA_DIR = Path(__file__).resolve().parent.parent / "corpora"


def cache_root(configured: str | None = None) -> Path:
    """data.cache_dir, else $CHARRNN_CACHE_DIR, else $XDG_CACHE_HOME/charrnn or ~/.cache/charrnn."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("CHARRNN_CACHE_DIR"):
        return Path(os.environ["CHARRNN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "charrnn"


# ---- resolving data.path -----------------------------------------------------------------------

def builtin_python_docs(cache_dir: str | None) -> Path:
    """Materialize pydoc_data.topics (about 465k characters) as a text file, once."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()[:12]  # differs between Python versions
    path = cache_root(cache_dir) / "corpora" / f"python-docs-{digest}.txt"
    if not path.exists():
        try:
            atomic.write_bytes(path, data)
        except OSError as e:
            raise DataError(f"cannot write the builtin corpus to {path}: {e.strerror}; set data.cache_dir to a writable directory") from None
    return path


def catalog(corpora_dir: Path | None = None) -> dict:
    """name -> {url, size, sha256, file} from corpora/catalog.json ({} if there is none)."""
    path = (corpora_dir or CORPORA_DIR) / "catalog.json"
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not all({"url", "size", "sha256", "file"} <= set(e) for e in doc.values()):
            raise ValueError("each entry needs url, size, sha256 and file")
    except (ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a valid corpus catalog ({e}); restore it from git") from None
    return doc


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):  # 1.5 GB/s here: a tenth of a first load's time
            digest.update(block)
    return digest.hexdigest()


def fetch_catalog_entry(name: str, corpora_dir: Path | None = None, timeout: float = 30.0) -> Path:
    """The verified local copy of a catalog corpus, downloading it first if needed."""
    corpora_dir = corpora_dir or CORPORA_DIR
    entry = catalog(corpora_dir)[name]
    path = corpora_dir / entry["file"]
    by_hand = (f"put the file there by hand: {path} ({entry['size']:,} bytes, sha256 {entry['sha256']}, "
               f"from {entry['url']})")
    if not path.exists():
        try:
            with urllib.request.urlopen(entry["url"], timeout=timeout) as response:
                data = response.read(entry["size"] + 1)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(f"cannot download {name} ({reason}); {by_hand}") from None
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DataError(f"download of {name} from {entry['url']} does not match the catalog's size and sha256; {by_hand}")
        atomic.write_bytes(path, data)
    elif _sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path} does not match the catalog's sha256 for {name}; delete it to download again, or {by_hand}")
    return path


def resolve(spec: str, cache_dir: str | None = None, key: str = "data.path") -> Path:
    """The text file that a data.path (or data.val_path) value names."""
    if spec.startswith(BUILTIN_PREFIX):
        if spec == "builtin:python-docs":
            return builtin_python_docs(cache_dir)
        raise DataError(f"{key} = {spec!r}: unknown builtin corpus; available: builtin:python-docs")
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if spec in catalog():
        return fetch_catalog_entry(spec)
    if path.is_dir():
        raise DataError(f"{key} = {spec!r} is a directory; give a text file")
    names = ", ".join(["builtin:python-docs", *catalog()])
    raise DataError(f"{key} = {spec!r}: no such file (or give one of: {names})")


# ---- chunked, checked decoding -----------------------------------------------------------------

_now = time.time  # the clock the racy-timestamp check reads (tests move it forward)


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """The file's sha256, remembered in memo_dir (if given) under the file's identity and times.

    Hashing is what a cache hit costs (0.7 s per GB here). The memo is keyed by device, inode,
    size, mtime and ctime in nanoseconds: any write to the file changes its ctime, which no user
    tool can set back, so a changed file is always hashed again. As git does against "racy"
    timestamps, a file modified under 2 s before it was hashed is not memoized (a coarse clock
    could give a second same-size write the same times).
    """
    try:
        st = os.stat(path)
        key = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        memo = memo_dir / hashlib.sha256(key.encode()).hexdigest()[:32] if memo_dir is not None else None
        if memo is not None:
            try:
                known = memo.read_text(encoding="ascii").strip()
                if len(known) == 64:
                    return known
            except (OSError, UnicodeDecodeError):
                pass
        digest = _sha256_file(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if memo is not None and _now() - max(st.st_mtime, st.st_ctime) > 2:
        try:
            memo_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(memo, digest.encode("ascii"))
        except OSError:
            pass  # a read-only cache only costs the hashing next time
    return digest


def iter_codepoints(path: Path, encoding: str = "utf-8", chunk_bytes: int | None = None) -> Iterator[np.ndarray]:
    """Code points of the file, chunk by chunk: uint8 arrays for all-ASCII chunks, else uint32.

    Raises DataError for undecodable bytes (naming the byte offset and the encoding option) and
    for binary files (a NUL character: text never contains one).
    """
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise DataError(f"data.encoding = {encoding!r} is not a known text encoding (e.g. utf-8, latin-1, utf-16)") from None
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    ascii_fast = codecs.lookup(encoding).name in ("utf-8", "ascii", "iso8859-1", "cp1252")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with f:
        offset = chars = 0
        while True:
            chunk = f.read(chunk_bytes)
            final = len(chunk) < chunk_bytes
            pending = decoder.getstate()[0]
            if ascii_fast and not pending and chunk.isascii():
                cps = np.frombuffer(chunk, dtype=np.uint8)  # ASCII: bytes are the code points
            else:
                try:
                    text = decoder.decode(chunk, final=final)
                except UnicodeDecodeError as e:
                    nul = chunk.find(b"\0") if ascii_fast else -1
                    if nul >= 0:  # a binary file, not a text in another encoding
                        raise DataError(f"{path} looks like a binary file (NUL byte at byte offset {offset + nul}); "
                                        "give a text file") from None
                    at = offset - len(pending) + e.start
                    raise DataError(f"{path}: cannot decode byte offset {at} as {encoding} ({e.reason}); "
                                    "set data.encoding (e.g. --set data.encoding=latin-1)") from None
                cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
                del text  # up to 4 bytes a character: not kept while the caller works on cps
            if cps.size and not cps.all():
                at = chars + int(np.argmin(cps))
                raise DataError(f"{path} looks like a binary file (NUL character at character {at}); give a text file")
            offset += len(chunk)
            chars += len(cps)
            if cps.size:
                yield cps
            if final:
                return


def count_codepoints(path: Path, encoding: str) -> tuple[np.ndarray, int]:
    """Dense counts per code point (length max_cp + 1) and the number of characters."""
    counts = np.zeros(256, dtype=np.int64)
    n = 0
    for cps in iter_codepoints(path, encoding):
        chunk_counts = np.bincount(cps)
        if len(chunk_counts) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(chunk_counts) - len(counts), np.int64)])
        counts[: len(chunk_counts)] += chunk_counts
        n += len(cps)
    check_text(path, n, np.flatnonzero(counts))
    return counts, n


def check_text(path: Path, n: int, chars: np.ndarray) -> None:
    """Raise DataError unless the file's n characters, of distinct code points chars, hold text."""
    if n == 0:
        raise DataError(f"{path} is empty; give a text file with some characters")
    if not any(not chr(c).isspace() for c in chars.tolist()):
        raise DataError(f"{path} holds only whitespace; give a text file with some characters")
