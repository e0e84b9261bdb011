"""The corpus cache serves only the text it was built from, and corpus files are read as what they are.

One test per class of defect (issue 11), each parametrized over the ways it was (or could be)
reproduced: a corpus rewritten while it is tokenized, damaged or forged cache entries, forged
sha256 memos, memos and entries that are not the user's own, a cache file truncated under a
running process, corpora that are not regular files or not UTF-8, non-text codecs, and no home
directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import zlib

import numpy as np
import pytest

from charrnn import batches, corpus, dataset
from charrnn.config import DataConfig
from charrnn.errors import DataError

A = "the cat sat on the mat.\n" * 20  # 480 bytes
B = ("QUIZ BOX JUMPY WORDS VEX!\n" * 19)[: len(A)]  # another text of the same size, with characters A lacks


def load(path, **kwargs) -> dataset.Dataset:
    return dataset.load(DataConfig(path=str(path), **kwargs))


def text_of(ds, part="train") -> str:
    return ds.vocab.decode(getattr(ds, part))


@pytest.fixture
def memoizing(monkeypatch):
    """Files written now count as 10 s old, so their sha256 is memoized."""
    monkeypatch.setattr(corpus, "_now", lambda: time.time() + 10)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---- an entry is filed under the text that was actually tokenized --------------------------------

@pytest.mark.parametrize("part, at_open", [("train", 2), ("val", 2), ("val", 3)],
                         ids=["train-while-tokenized", "val-while-counted", "val-while-encoded"])
def test_a_corpus_rewritten_while_it_is_read_is_never_filed_under_the_old_text(
        write_text, monkeypatch, memoizing, part, at_open):
    """The file is overwritten (same size, same inode) after the first chunk of its at_open-th
    read (the 1st is the sha256 before tokenizing), then the original text comes back. The
    entry holds exactly the bytes it was filed under, and a run on the restored file gets the
    original text and vocabulary, not a character that only the other text had."""
    train, val = write_text(A, "train.txt"), write_text(A[:96], "val.txt")
    target, original, other = (train, A, B) if part == "train" else (val, A[:96], B[:96])
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 64)
    opens, real_open = [], corpus.open_regular

    class Rewritten:  # the file as a reader sees it while another process rewrites it
        def __init__(self, f):
            self.f, self.done = f, False

        def read(self, n):
            data = os.read(self.f.fileno(), n)  # unbuffered: the reader sees the rewrite from here on
            if not self.done:
                self.done = True
                with open(target, "r+b") as g:
                    g.write(other.encode("utf-8"))
            return data

        def fileno(self):
            return self.f.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opening(path):
        f = real_open(path)
        opens.append(path)
        return Rewritten(f) if path == target and opens.count(target) == at_open else f
    monkeypatch.setattr(corpus, "open_regular", opening)
    kwargs = {"val_path": str(val)} if part == "val" else {"val_fraction": 0.0}
    try:
        first = load(train, **kwargs)
    except DataError as e:
        assert part == "val" and "changed while it was read" in str(e)
    else:
        assert part == "train" and sha(text_of(first)) == first.sha256 != sha(A)  # filed under what it holds
        assert "Q" in first.vocab.chars
    monkeypatch.setattr(corpus, "open_regular", real_open)
    target.write_text(original, encoding="utf-8")  # the original text is back
    again = load(train, **kwargs)
    assert text_of(again) == A and again.sha256 == sha(A)
    assert set(again.vocab.chars) == set(A) and "Q" not in again.vocab.chars
    if part == "val":
        assert text_of(again, "val") == A[:96]


# ---- a damaged or forged entry is never used --------------------------------------------------------

def _meta(entry):
    return json.loads((entry / "meta.json").read_text(encoding="utf-8"))


def _set_meta(entry, **changes):
    (entry / "meta.json").write_text(json.dumps({**_meta(entry), **changes}), encoding="utf-8")


def _out_of_range(entry):
    """ids.bin rewritten with ids past the vocabulary, its checksum forged to match."""
    ids = np.full((entry / "ids.bin").stat().st_size, 250, dtype=np.uint8).tobytes()
    (entry / "ids.bin").write_bytes(ids)
    _set_meta(entry, ids={**_meta(entry)["ids"], "crc32": zlib.crc32(ids)})


def _other_entry(entry, other_entry):
    """The files of an entry built from another text, put in this entry's place."""
    for name in ("meta.json", "ids.bin"):
        shutil.copyfile(other_entry / name, entry / name)


def _symlinked(path):
    """path replaced by a symbolic link to the same content elsewhere."""
    os.rename(path, path.parent.parent / f"real-{path.name}")
    os.symlink(path.parent.parent / f"real-{path.name}", path)


DAMAGE = {
    "ids-rewritten": lambda e, o: (e / "ids.bin").write_bytes((e / "ids.bin").read_bytes()[::-1]),
    "ids-out-of-range": lambda e, o: _out_of_range(e),
    "ids-truncated": lambda e, o: os.truncate(e / "ids.bin", 7),
    "ids-extended": lambda e, o: (e / "ids.bin").write_bytes((e / "ids.bin").read_bytes() * 2),
    "ids-missing": lambda e, o: (e / "ids.bin").unlink(),
    "ids-symlink": lambda e, o: _symlinked(e / "ids.bin"),
    "meta-not-json": lambda e, o: (e / "meta.json").write_bytes(b"{\"chars\": 12, "),
    "meta-not-an-object": lambda e, o: (e / "meta.json").write_text("[1, 2]"),
    "meta-chars-string": lambda e, o: _set_meta(e, chars="480"),
    "meta-split-beyond": lambda e, o: _set_meta(e, split=10**6),
    "meta-dtype": lambda e, o: _set_meta(e, ids={**_meta(e)["ids"], "dtype": "<u2"}),
    "meta-file-outside": lambda e, o: _set_meta(e, ids={**_meta(e)["ids"], "file": "../elsewhere.bin"}),
    "meta-crc-string": lambda e, o: _set_meta(e, ids={**_meta(e)["ids"], "crc32": "0"}),
    "meta-vocab-unsorted": lambda e, o: _set_meta(e, vocab=_meta(e)["vocab"][::-1]),
    "meta-vocab-numbers": lambda e, o: _set_meta(e, vocab=list(range(len(_meta(e)["vocab"])))),
    "meta-fingerprint-number": lambda e, o: _set_meta(e, sources={"train": {"fingerprint": 7}, "val": None}),
    "another-text": _other_entry,
    "group-writable": lambda e, o: os.chmod(e, 0o770),
    "entry-symlink": lambda e, o: _symlinked(e),
    "entry-a-file": lambda e, o: (shutil.rmtree(e), e.write_bytes(b"not an entry")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_or_forged_entry_is_rebuilt_not_used(write_text, memoizing, damage):
    path = write_text(A)
    other = load(write_text(B, "other.txt"), val_fraction=0.0).cache_dir
    entry = load(path, val_fraction=0.0).cache_dir
    DAMAGE[damage](entry, other)
    ds = load(path, val_fraction=0.0)
    assert ds.reused is False and text_of(ds) == A and ds.sha256 == sha(A)
    assert ds.cache_dir == entry and entry.is_dir() and not entry.is_symlink()
    again = load(path, val_fraction=0.0)  # the rebuilt entry passes its own check
    assert again.reused is True and text_of(again) == A


def test_a_damaged_validation_file_is_rebuilt_not_used(write_text):
    train, val = write_text(A, "train.txt"), write_text(A[:50], "val.txt")
    entry = load(train, val_path=str(val)).cache_dir
    (entry / "val.bin").write_bytes(b"\xff" * 50)
    ds = load(train, val_path=str(val))
    assert not ds.reused and text_of(ds, "val") == A[:50]


def test_an_entry_built_concurrently_is_used_not_replaced(write_text, monkeypatch):
    """Two processes tokenize the same text: the second to finish finds the first's entry in its
    place, checks it and uses it (its ids stay the files the first process mapped)."""
    path = write_text(A)
    real, first = dataset.tokenize, {}

    def racing(*args):
        meta = real(*args)
        if not first:  # another process finishes the same build meanwhile
            first["started"] = True
            first["ds"] = load(path)
            first["inode"] = (first["ds"].cache_dir / "ids.bin").stat().st_ino
        return meta
    monkeypatch.setattr(dataset, "tokenize", racing)
    ds = load(path)
    assert ds.cache_dir == first["ds"].cache_dir and not ds.reused and text_of(ds) == text_of(first["ds"]) == A[:432]
    assert (ds.cache_dir / "ids.bin").stat().st_ino == first["inode"]
    assert [p.name for p in ds.cache_dir.parent.iterdir()] == [ds.cache_dir.name]  # no build left behind


# ---- a memo is a shortcut, never the word that decides the text -----------------------------------

def _memo_of(cache_dir, text):
    memos = [m for m in (cache_dir / "sha256").iterdir() if m.read_text() == sha(text)]
    assert len(memos) == 1
    return memos[0]


FORGED = {
    "another-entry": sha(B),  # the sha256 of another text whose entry is in the cache
    "unknown-text": "0" * 64,
    "garbage": "not a sha256",
    "uppercase": sha(A).upper(),
    "empty": "",
}


@pytest.mark.parametrize("forged", list(FORGED))
def test_a_forged_memo_never_makes_a_run_train_on_other_text(write_text, cache_dir, memoizing, forged):
    other = write_text(B, "other.txt")
    load(other, val_fraction=0.0)
    path = write_text(A)
    load(path, val_fraction=0.0)
    memo = _memo_of(cache_dir, A)
    memo.write_text(FORGED[forged])
    ds = load(path, val_fraction=0.0)
    assert text_of(ds) == A and ds.sha256 == sha(A) and set(ds.vocab.chars) == set(A)
    if forged == "another-entry":  # caught by the entry's fingerprint of A: the memo is corrected
        assert memo.read_text() == sha(A)


def _chown_away(path):
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chown(p, 65534, 65534, follow_symlinks=False)


UNTRUSTED_MEMOS = {
    "symlink": _symlinked,
    "others-may-write": lambda memo: (os.chmod(memo.parent, 0o755), os.chmod(memo, 0o666)),
    "directory-others-may-write": lambda memo: os.chmod(memo.parent, 0o777),
    "another-users": lambda memo: _chown_away(memo),
    "another-users-directory": lambda memo: _chown_away(memo.parent),
}


@pytest.mark.parametrize("how", list(UNTRUSTED_MEMOS))
def test_a_memo_that_is_not_the_users_own_is_not_believed(write_text, cache_dir, memoizing, monkeypatch, how):
    """Even holding the right sha256, such a memo is ignored: the file is hashed in full."""
    path = write_text(A)
    first = load(path)
    UNTRUSTED_MEMOS[how](_memo_of(cache_dir, A))
    calls, real = [], corpus._sha256_file
    monkeypatch.setattr(corpus, "_sha256_file", lambda p: calls.append(p) or real(p))
    ds = load(path)
    assert calls == [path] and ds.reused and ds.cache_dir == first.cache_dir and text_of(ds) == text_of(first)


@pytest.mark.parametrize("how", ["another-users", "others-may-write"])
def test_an_entry_that_is_not_the_users_own_is_not_used(write_text, monkeypatch, how):
    """A valid-looking entry of another user is left alone and the corpus tokenized privately;
    one of the user's own that others may write is replaced."""
    path = write_text(A)
    entry = load(path).cache_dir
    if how == "another-users":
        _chown_away(entry)
    else:
        os.chmod(entry, 0o777)
    ds = load(path)
    assert ds.reused is False and text_of(ds) == text_of(load(path))
    if how == "another-users":
        assert ds.cache_dir != entry and entry.stat().st_uid == 65534 and not ds.cache_dir.exists()
    else:
        assert ds.cache_dir == entry and entry.stat().st_mode & 0o777 == 0o700


PLANTED = {
    "other-text": lambda p: p.write_text("planted text\n" * 100, encoding="utf-8"),
    "truncated": lambda p: os.truncate(p, 1000),
    "fifo": lambda p: (p.unlink(), os.mkfifo(p)),
    "symlink": lambda p: (p.unlink(), p.with_name("other.txt").write_text("planted\n" * 9), os.symlink("other.txt", p)),
}


@pytest.mark.parametrize("planted", list(PLANTED))
def test_the_builtin_corpus_in_the_cache_is_used_only_if_it_holds_the_builtin_text(no_hang, planted):
    path = corpus.resolve("builtin:python-docs")
    text = path.read_bytes()
    PLANTED[planted](path)
    assert corpus.resolve("builtin:python-docs") == path
    assert not path.is_symlink() and path.read_bytes() == text


# ---- a cache file truncated under a running process ------------------------------------------------

READERS = {
    "stream": lambda ids: batches.stream_window(ids, 2, len(ids) // 2, 8, 0),
    "random": lambda ids: batches.random_windows(ids, 2, 8, np.random.default_rng(0)),
    "eval-streams": lambda ids: next(batches.eval_stream_windows(ids, 8)),
    "eval-cloze": lambda ids: next(batches.eval_cloze_windows(ids, 8, 2)),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_a_cache_file_truncated_while_in_use_is_a_one_line_error(write_text, reader):
    """One byte less: a read would still be inside the file's last page (no SIGBUS even if the
    check were missing), but the mapping no longer matches its file."""
    ds = load(write_text(A), val_fraction=0.0)
    READERS[reader](ds.train)  # fine before
    os.truncate(ds.cache_dir / "ids.bin", len(A) - 1)
    with pytest.raises(DataError) as info:
        READERS[reader](ds.train)
    msg = str(info.value)
    assert "truncated" in msg and str(ds.cache_dir / "ids.bin") in msg and "\n" not in msg


def test_training_on_a_truncated_cache_file_stops_with_one_line_and_resumes(tmp_path, cli_invoke, tiny, monkeypatch):
    corpus_path = tmp_path / "words.txt"
    corpus_path.write_text(tiny.PHRASE, encoding="utf-8")
    real, calls = batches.stream_window, []

    def truncating(ids, *args):
        calls.append(1)
        if len(calls) == 5:
            mapping = dataset._mapping_of(ids)
            os.truncate(mapping.path, len(mapping) - 1)
        return real(ids, *args)
    monkeypatch.setattr(batches, "stream_window", truncating)
    run = tmp_path / "run"
    result = cli_invoke("train", "--run-dir", run, *tiny.args(corpus_path, "train.checkpoint_every=2"))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "truncated" in lines[-1]
    monkeypatch.setattr(batches, "stream_window", real)
    resumed = cli_invoke("train", "--resume", run)
    assert resumed.exit_code == 0, resumed.output


# ---- corpus files that are not text, or not in the encoding given ----------------------------------

def _fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


def _socket(tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.bind(str(path))
        except OSError:
            pytest.skip("cannot bind a unix socket here (path too long)")
    return path  # the socket file stays after the socket is closed


SPECIAL = {
    "fifo": (_fifo, "FIFO"),
    "dev-zero": (lambda tmp_path: "/dev/zero", "character device"),
    "socket": (_socket, "socket"),
    "directory": (lambda tmp_path: tmp_path, "directory"),
}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_a_corpus_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path, no_hang, kind):
    make, word = SPECIAL[kind]
    path = make(tmp_path)
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(DataError) as info:
        load(path)
    assert word in str(info.value) and "no such file" not in str(info.value)
    if kind != "directory":  # read directly too: a FIFO swapped in after resolve() is refused, not waited on
        with pytest.raises(DataError, match="not a regular file"):
            list(corpus.iter_codepoints(path))


WIDE_TEXT = "Wide text, mostly ASCII: héllo wörld.\n" * 4


@pytest.mark.parametrize("written, suggested", [("utf-16", "utf-16"), ("utf-16-le", "utf-16-le"),
                                                ("utf-16-be", "utf-16-be"), ("utf-32", "utf-32"),
                                                ("utf-32-le", "utf-32-le"), ("utf-32-be", "utf-32-be")])
@pytest.mark.parametrize("read_as", ["utf-8", "latin-1"])
def test_utf16_or_utf32_text_suggests_data_encoding(write_text, written, suggested, read_as):
    path = write_text(WIDE_TEXT, encoding=written)
    with pytest.raises(DataError) as info:
        load(path, encoding=read_as)
    msg = str(info.value)
    assert f"data.encoding={suggested}" in msg and "binary" not in msg
    ds = load(path, encoding=suggested, val_fraction=0.0)  # and the suggestion works
    assert text_of(ds) == WIDE_TEXT


@pytest.mark.parametrize("data", [b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4,
                                  b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200),
                                  b"text then\x00\x00\x00\x00 zeros"], ids=["elf", "png", "nul-run"])
def test_a_binary_file_is_still_called_binary(write_text, data):
    with pytest.raises(DataError, match="binary file"):
        load(write_text(data))


@pytest.mark.parametrize("codec", ["rot13", "base64", "zlib", "hex", "bz2", "uu", "quopri", "rot_13", "zip"])
def test_a_non_text_codec_is_refused_naming_data_encoding(write_text, codec):
    with pytest.raises(DataError) as info:
        load(write_text(A), encoding=codec)
    assert "data.encoding" in str(info.value) and "not a text encoding" in str(info.value)
    with pytest.raises(DataError, match="not a text encoding"):
        list(corpus.iter_codepoints(write_text(A), codec))


@pytest.mark.parametrize("codec", ["undefined", "idna", "punycode", "utf-7"])
def test_text_codecs_that_reject_the_bytes_give_a_data_error(write_text, codec):
    path = write_text(b"caf\xc3\xa9 \xff\xfe+- not ascii \x80\n" * 3)
    with pytest.raises(DataError, match="data.encoding"):
        load(path, encoding=codec)


# ---- no home directory -----------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["cache_root", "cache_dir-with-tilde", "corpus-with-tilde", "load"])
def test_no_home_directory_is_one_line_naming_the_settings(monkeypatch, write_text, call):
    """HOME unset for a user with no passwd entry: Path.home() raises RuntimeError."""
    import pwd

    path = write_text(A)
    for var in ("HOME", "CHARRNN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    calls = {"cache_root": lambda: corpus.cache_root(),
             "cache_dir-with-tilde": lambda: corpus.cache_root("~/cache"),
             "corpus-with-tilde": lambda: corpus.resolve("~/corpus.txt"),
             "load": lambda: load(path)}
    with pytest.raises(DataError) as info:
        calls[call]()
    msg = str(info.value)
    assert "HOME" in msg and "\n" not in msg
    if call != "corpus-with-tilde":
        assert "CHARRNN_CACHE_DIR" in msg and "data.cache_dir" in msg
