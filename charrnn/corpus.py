"""Corpus sources: text files, built-in corpora and the download catalog; chunked, checked decoding.

`data.path` is one of
  * a path to a text file;
  * `builtin:python-docs`: the English text of the Python documentation topics that ship with
    every CPython (`pydoc_data.topics`), written once into the cache so training works offline;
  * a catalog name from `corpora/catalog.json` (e.g. `tinyshakespeare`): downloaded on first use
    into `corpora/`, its size and sha256 verified.

Files are read in fixed-size byte chunks through an incremental decoder, so a multi-byte
character split across chunks is reassembled and memory does not grow with file size. A corpus
must be a regular file: it is opened without blocking (a FIFO named as data.path cannot hang a
run) and checked with fstat before a byte is read.

What the cache may trust. A sha256 memo (`<cache>/sha256/`) and an encoded entry
(`<cache>/encoded/`, see dataset.py) are shortcuts that someone else could have planted on shared
storage, or that a tool could have rewritten. One rule decides whether either is looked at: it is
a regular file (a real directory for an entry), not reached through a symbolic link, owned by the
user running charrnn, in a directory that the user owns and that no one else may write to; a file
that group or others may write to is accepted only in a directory that no one else may enter
(`owned`). Anything else is ignored: the file is hashed again, the corpus tokenized again into a
private entry. The directories that hold memos and entries are made with mode 0700 (one of the
user's own that others may enter is made so), which keeps what charrnn writes there trusted
whatever the umask.

A memo only says "this file, with these times, has that sha256". Even an owned memo is not
believed on its own word: the entry it leads to records a fingerprint of the text it was built
from (its size and 16 sampled 4 KiB blocks), and a memo whose file does not match that
fingerprint is dropped and the file hashed in full. The sha256 under which an entry is filed is
always that of the bytes that were tokenized (`ReadDigest`, fed by the same reads), so a file
rewritten while it was read cannot leave its old text filed under the new text's hash.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import stat
import time
import urllib.request
from pathlib import Path
from typing import BinaryIO, NamedTuple
from collections.abc import Iterator

import numpy as np

from charrnn import atomic
from charrnn.errors import CharRNNError, DataError, option

# Bytes read and decoded at a time. Larger chunks decode at less than half the speed, because
# the decoded str and its UTF-32 copy, 4 bytes a character, no longer fit in the caches; pure
# ASCII and CJK text are no slower at 1 MiB (benchmarks/README.md). Peak memory is about 13
# chunks (the chunk, its str, UTF-32 copies of it and of the previous chunk), so 1 MiB also
# keeps tokenizing small.
CHUNK_BYTES = 1 << 20
BUILTIN_PREFIX = "builtin:"
CORPORA_DIR = Path(__file__).resolve().parent.parent / "corpora"


def cache_root(configured: str | None = None) -> Path:
    """data.cache_dir, else $CHARRNN_CACHE_DIR, else $XDG_CACHE_HOME/charrnn or ~/.cache/charrnn."""
    try:
        if configured:
            return Path(configured).expanduser()
        if os.environ.get("CHARRNN_CACHE_DIR"):
            return Path(os.environ["CHARRNN_CACHE_DIR"]).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # "~" with HOME unset and no passwd entry for the user
        raise DataError("cannot find a home directory for the corpus cache (HOME is not set); "
                        "set CHARRNN_CACHE_DIR or data.cache_dir to a writable directory") from None
    return Path(base) / "charrnn"


# ---- resolving data.path -----------------------------------------------------------------------

def builtin_python_docs(cache_dir: str | None) -> Path:
    """Materialize pydoc_data.topics (about 465k characters) as a text file, once. The file in
    the cache is used only if it holds exactly that text (anyone who can write to the cache could
    have put another text there); otherwise it is written again."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()[:12]  # differs between Python versions
    path = cache_root(cache_dir) / "corpora" / f"python-docs-{digest}.txt"
    try:
        with open_regular(path) as f:
            found = f.read(len(data) + 1)
    except DataError:  # missing, or not a regular file
        found = None
    if found != data:
        try:
            atomic.write_bytes(path, data)
        except OSError as e:
            raise DataError(f"cannot write the builtin corpus to {path}: {e.strerror}; "
                            "set data.cache_dir to a writable directory") from None
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
    with open_regular(path) as f:
        while block := f.read(CHUNK_BYTES):  # hashing costs a small part of tokenizing
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
    try:
        path = Path(spec).expanduser()
        st = os.stat(path)  # stat, not open: opening a FIFO to look at it would block
    except RuntimeError:  # "~" with no home directory
        raise DataError(f"{key} = {spec!r}: cannot expand '~' (HOME is not set); give the full path") from None
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return path
    if spec in catalog():
        return fetch_catalog_entry(spec)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise DataError(f"{key} = {spec!r} is a directory; give a text file")
    if st is not None:
        raise DataError(f"{key} = {spec!r} is {_kind(st.st_mode)}, not a regular file; give a text file")
    names = ", ".join(["builtin:python-docs", *catalog()])
    raise DataError(f"{key} = {spec!r}: no such file (or give one of: {names})")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> BinaryIO:
    """path opened for reading; DataError unless it is a regular file. O_NONBLOCK: a FIFO put in
    the file's place after resolve() looked at it is refused, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        try:  # a socket cannot be opened at all (ENXIO): say what it is
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise DataError(f"{path} is {_kind(mode)}, not a regular file; give a text file") from None
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{path} is {_kind(mode)}, not a regular file; give a text file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# ---- what the cache trusts ---------------------------------------------------------------------

def owned(st: os.stat_result, dir_st: os.stat_result | None = None) -> bool:
    """Whether a cache directory (dir_st None) or a file in one (dir_st: its directory) may be
    trusted: the user's own, and nobody else can have written it (see the module docstring)."""
    if dir_st is None:
        return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and owned(dir_st)
            and (not st.st_mode & 0o022 or not dir_st.st_mode & 0o077))


def open_owned_dir(path: Path) -> int:
    """A descriptor of the directory at path if it is owned (trusted), else OSError. Files are
    then opened relative to it, so the directory checked is the directory read."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not owned(os.fstat(fd)):
        os.close(fd)
        raise PermissionError(f"{path} is not the user's own private directory")
    return fd


def open_owned_file(dir_fd: int, name: str) -> int:
    """A read-only descriptor of the file `name` in an owned directory if it is owned, else OSError."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    if not owned(os.fstat(fd), os.fstat(dir_fd)):
        os.close(fd)
        raise PermissionError(f"{name} is not the user's own file")
    return fd


def make_private_dir(path: Path) -> None:
    """Create a cache directory (and its parents) with mode 0700; an existing one of the user's
    that others may enter or write is made private, so that what charrnn writes there stays
    trusted (a directory someone else owns is left alone: nothing in it will be trusted)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700, follow_symlinks=False)


# ---- the sha256 of a corpus file, memoized -----------------------------------------------------

_now = time.time  # the clock the racy-timestamp check reads (tests move it forward)


class Source(NamedTuple):
    """A corpus file and the sha256 of its bytes."""

    path: Path
    sha256: str
    recalled: bool  # True: the sha256 came from a memo (to be checked against the entry it leads to)


def source_sha256(path: Path, memo_dir: Path | None = None, recall: bool = True) -> Source:
    """The file's sha256, remembered in memo_dir (if given) under the file's identity and times.

    Without a memo, hashing the whole file is what a cache hit costs (benchmarks/README.md has the
    time per GB). The memo is keyed by device, inode, size, mtime and ctime in nanoseconds: any
    write to the file changes its ctime, which no user tool can set back, so a changed file is
    always hashed again. As git does against "racy" timestamps, a file modified under 2 s before
    it was hashed is not memoized (a coarse clock could give a second same-size write the same
    times), nor one whose identity changed while it was hashed. recall=False hashes the file even
    when a memo exists (and rewrites the memo).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    key = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    if memo_dir is not None and recall:
        known = _recall(memo_dir, name)
        if known is not None:
            return Source(path, known, True)
    digest = _sha256_file(path)
    try:
        same = _identity(os.stat(path)) == _identity(st)
    except OSError:
        same = False
    if memo_dir is not None and same and _now() - max(st.st_mtime, st.st_ctime) > 2:
        try:
            make_private_dir(memo_dir)
            atomic.write_bytes(memo_dir / name, digest.encode("ascii"))
        except (OSError, CharRNNError):
            pass  # a read-only cache only costs the hashing next time
    return Source(path, digest, False)


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _recall(memo_dir: Path, name: str) -> str | None:
    """The sha256 in an owned memo file, else None."""
    try:
        dir_fd = open_owned_dir(memo_dir)
    except OSError:
        return None
    try:
        with os.fdopen(open_owned_file(dir_fd, name), "rb") as f:
            known = f.read(65).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(dir_fd)
    return known if len(known) == 64 and all(c in "0123456789abcdef" for c in known) else None


# ---- what was read: sha256 and fingerprint -----------------------------------------------------

SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 4096


def _sample_spans(size: int) -> list[tuple[int, int]]:
    """Byte ranges the fingerprint covers: the whole file when small, else 16 evenly spread blocks."""
    if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        return [(0, size)]
    return [(o, o + SAMPLE_BYTES) for o in (i * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS))]


def _fingerprint(size: int, blocks) -> str:
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    for block in blocks:
        h.update(block)
    return h.hexdigest()


def fingerprint(path: Path) -> str:
    """A cheap fingerprint of the file's bytes (its size and sampled blocks; 64 KiB read)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        return _fingerprint(size, [os.pread(f.fileno(), b - a, a) for a, b in _sample_spans(size)])


class ReadDigest:
    """The sha256, size and fingerprint of the bytes a reader actually read, fed chunk by chunk
    by iter_codepoints: an entry is filed under what was tokenized, whatever the file holds now."""

    def __init__(self):
        self._sha, self.size, self._spans, self._blocks, self._expected = hashlib.sha256(), 0, [], [], None

    def start(self, expected_size: int) -> None:
        self._spans = _sample_spans(expected_size)
        self._blocks = [bytearray() for _ in self._spans]
        self._expected = expected_size

    def update(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        a, b = self.size, self.size + len(chunk)
        for (lo, hi), block in zip(self._spans, self._blocks):
            if lo < b and hi > a:
                block += chunk[max(lo, a) - a : min(hi, b) - a]
        self.size = b

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def record(self) -> dict:
        """{"sha256", "fingerprint"}; the fingerprint is None when the file changed size while it
        was read (its blocks were chosen for the old size)."""
        fp = _fingerprint(self.size, self._blocks) if self.size == self._expected else None
        return {"sha256": self.sha256, "fingerprint": fp}


# ---- chunked, checked decoding -----------------------------------------------------------------

def check_encoding(encoding: str) -> codecs.CodecInfo:
    """The codec of data.encoding; DataError unless it is a text encoding (bytes to str)."""
    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError, ValueError):
        raise DataError(f"data.encoding = {encoding!r} is not a known text encoding (e.g. utf-8, latin-1, utf-16)") from None
    if not getattr(info, "_is_text_encoding", True) or info.incrementaldecoder is None:  # rot13, base64, zlib, hex...
        raise DataError(f"data.encoding = {encoding!r} is not a text encoding ({info.name} transforms bytes to bytes "
                        "or text to text); set data.encoding to one such as utf-8, latin-1 or utf-16")
    return info


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # UTF-32 LE's starts with UTF-16 LE's
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def wide_encoding(head: bytes) -> str | None:
    """The UTF-16/32 encoding that a file's first bytes suggest, else None: a byte order mark, or
    the NUL bytes that ASCII characters leave at fixed positions (every other byte in UTF-16,
    three bytes of four in UTF-32), which binary files do not show."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    n = len(head) // 4 * 4
    if n < 4:
        return None
    nul = (np.frombuffer(head[:n], dtype=np.uint8).reshape(-1, 4) == 0).mean(axis=0)  # NUL share at offset % 4
    if nul[0] < 0.05 and min(nul[2], nul[3]) > 0.9:
        return "utf-32-le"
    if nul[3] < 0.05 and min(nul[0], nul[1]) > 0.9:
        return "utf-32-be"
    if max(nul[0], nul[2]) < 0.05 and min(nul[1], nul[3]) > 0.3:
        return "utf-16-le"
    if max(nul[1], nul[3]) < 0.05 and min(nul[0], nul[2]) > 0.3:
        return "utf-16-be"
    return None


def _suggested(head: bytes, encoding: str) -> str | None:
    """The UTF-16/32 encoding the file's head suggests, when it is not the one in use."""
    wide = wide_encoding(head)
    return wide if wide is not None and codecs.lookup(wide).name != codecs.lookup(encoding).name else None


def _not_text(path: Path, encoding: str, head: bytes, where: str) -> DataError:
    """The error for a NUL in the text: a UTF-16/32 file read with another encoding, or binary."""
    wide = _suggested(head, encoding)
    if wide is not None:
        return DataError(f"{path} looks like {wide.upper()} text, not {encoding}; "
                         f"set data.encoding ({option('set', f'data.encoding={wide}')})")
    return DataError(f"{path} looks like a binary file ({where}); give a text file")


def iter_codepoints(path: Path, encoding: str = "utf-8", chunk_bytes: int | None = None,
                    digest: ReadDigest | None = None) -> Iterator[np.ndarray]:
    """Code points of the file, chunk by chunk: uint8 arrays for all-ASCII chunks, else uint32.

    Raises DataError for undecodable bytes (naming the byte offset and the encoding option) and
    for binary files (a NUL character: text never contains one), suggesting data.encoding when
    the bytes look like UTF-16 or UTF-32. `digest` is fed every byte read.
    """
    check_encoding(encoding)
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    ascii_fast = codecs.lookup(encoding).name in ("utf-8", "ascii", "iso8859-1", "cp1252")
    with open_regular(path) as f:
        if digest is not None:
            digest.start(os.fstat(f.fileno()).st_size)
        offset = chars = 0
        head = b""  # the file's first bytes: they tell UTF-16 text from a binary file
        while True:
            chunk = f.read(chunk_bytes)
            final = len(chunk) < chunk_bytes
            head += chunk[: 4096 - len(head)]
            if digest is not None:
                digest.update(chunk)
            try:
                cps = _decode(decoder, chunk, final, ascii_fast)
            except _BadBytes as bad:
                raise _undecodable(path, encoding, head, chunk if ascii_fast else b"", offset, bad) from None
            if cps.size and not cps.all():
                raise _not_text(path, encoding, head, f"NUL character at character {chars + int(np.argmin(cps))}")
            offset += len(chunk)
            chars += len(cps)
            if cps.size:
                yield cps
            if final:
                return


class _BadBytes(Exception):
    def __init__(self, error: ValueError, pending: int):
        super().__init__(str(error))
        self.error, self.pending = error, pending


def _decode(decoder, chunk: bytes, final: bool, ascii_fast: bool) -> np.ndarray:
    """The code points of one chunk; _BadBytes with the bytes the decoder held back from the
    previous chunk (they precede this chunk in the error's offsets)."""
    pending = decoder.getstate()[0]
    if ascii_fast and not pending and chunk.isascii():
        return np.frombuffer(chunk, dtype=np.uint8)  # ASCII: bytes are the code points
    try:
        text = decoder.decode(chunk, final=final)
    except ValueError as e:  # UnicodeDecodeError, or another codec's own complaint
        raise _BadBytes(e, len(pending)) from None
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def _undecodable(path: Path, encoding: str, head: bytes, chunk: bytes, offset: int, bad: _BadBytes) -> DataError:
    """The error for bytes that do not decode in the chunk at byte offset `offset`; chunk is
    empty unless the encoding is ASCII-compatible, where a NUL byte means binary data."""
    e = bad.error
    if not isinstance(e, UnicodeDecodeError):
        return DataError(f"{path}: cannot decode it as {encoding} ({e}); "
                         f"set data.encoding (e.g. {option('set', 'data.encoding=utf-8')})")
    nul = chunk.find(b"\0")
    if nul >= 0 or _suggested(head, encoding):
        return _not_text(path, encoding, head, f"NUL byte at byte offset {offset + nul}")
    return DataError(f"{path}: cannot decode byte offset {offset - bad.pending + e.start} as {encoding} ({e.reason}); "
                     f"set data.encoding (e.g. {option('set', 'data.encoding=latin-1')})")


def count_codepoints(path: Path, encoding: str, digest: ReadDigest | None = None) -> tuple[np.ndarray, int]:
    """Dense counts per code point (length max_cp + 1) and the number of characters."""
    counts = np.zeros(256, dtype=np.int64)
    n = 0
    for cps in iter_codepoints(path, encoding, digest=digest):
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
