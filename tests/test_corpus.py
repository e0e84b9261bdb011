"""Corpus reading, tokenization, the encoded-corpus cache and corpus sources (no network)."""
from __future__ import annotations

import hashlib
import json
import mmap
import urllib.error
import urllib.request

import numpy as np
import pytest

from charrnn import corpus, dataset, vocab
from charrnn.config import DataConfig
from charrnn.errors import DataError
from charrnn.vocab import UNK, Vocab

CHINESE = "深度学习是机器学习的分支。字符级模型逐字预测下一个字。\n"
EMOJI = "rockets 🚀 and faces 😀😃 and a flag 🇯🇵 and a family 👨‍👩‍👧!\n"
COMBINING = "cafe\u0301 vs caf\u00e9; n\u0303 and a\u0308\u0301\n"


def load(path, **kwargs) -> dataset.Dataset:
    return dataset.load(DataConfig(path=str(path), **kwargs))


def text_of(ds, part="train") -> str:
    return ds.vocab.decode(getattr(ds, part))


def is_memmap(a) -> bool:
    """True if a's memory is a file mapping (np.memmap, or an mmap seen through a memoryview)."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return False


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [CHINESE, EMOJI, COMBINING, CHINESE + EMOJI + COMBINING],
                         ids=["chinese", "emoji", "combining", "mixed"])
def test_dataset_round_trip(write_text, text):
    ds = load(write_text(text * 3), val_fraction=0.0)
    assert ds.val is None
    assert len(ds.train) == len(text) * 3  # code points, not bytes and not graphemes
    assert text_of(ds) == text * 3
    assert ds.vocab.unk is None


@pytest.mark.parametrize("text", [CHINESE, EMOJI, COMBINING])
def test_vocab_round_trip(text):
    v = Vocab(sorted(set(text)))
    ids = v.encode(text)
    assert ids.dtype == np.uint8
    assert len(ids) == len(text)
    assert v.decode(ids) == text


def test_combining_marks_stay_separate_code_points(write_text):
    ds = load(write_text("e\u0301e\u0301x" * 4), val_fraction=0.0)
    assert set(ds.vocab.chars) == {"e", "\u0301", "x"}
    assert len(ds.train) == 20  # 5 code points per repeat: e, U+0301, e, U+0301, x
    assert text_of(ds)[:2] == "e\u0301"


def test_astral_characters_are_single_ids(write_text):
    ds = load(write_text("😀a😀b" * 5), val_fraction=0.0)
    assert "😀" in ds.vocab.chars and len(ds.vocab) == 3
    assert len(ds.train) == 20


# ---- id dtype ---------------------------------------------------------------------------------

def _distinct(n: int, base: int = 0x100) -> str:
    return "".join(chr(base + i) for i in range(n))


def test_small_vocabulary_uses_uint8(write_text):
    ds = load(write_text(_distinct(200) * 2), val_fraction=0.0)
    assert len(ds.vocab) == 200
    assert ds.train.dtype == np.uint8 and ds.vocab.dtype == np.uint8


def test_more_than_256_characters_use_uint16(write_text):
    text = _distinct(300) * 2
    ds = load(write_text(text), val_fraction=0.0)
    assert len(ds.vocab) == 300
    assert ds.train.dtype == np.uint16 and ds.vocab.dtype == np.uint16
    assert text_of(ds) == text


def test_exactly_256_characters_fit_uint8(write_text):
    ds = load(write_text(_distinct(256) * 2), val_fraction=0.0)
    assert len(ds.vocab) == 256 and ds.vocab.dtype == np.uint8
    assert ds.train.dtype == ds.vocab.dtype


def test_five_thousand_cjk_characters(write_text):
    text = _distinct(5000, base=0x4E00)
    text = text + text[::-1]
    ds = load(write_text(text), val_fraction=0.0)
    assert len(ds.vocab) == 5000
    assert ds.train.dtype == np.uint16
    assert text_of(ds) == text


def test_id_dtype_thresholds():
    assert vocab.id_dtype(256) == np.uint8
    assert vocab.id_dtype(257) == np.uint16
    assert vocab.id_dtype(65536) == np.uint16
    assert vocab.id_dtype(65537) == np.uint32


# ---- vocabulary, unknown symbol ---------------------------------------------------------------

def test_min_count_maps_rare_characters_to_unk(write_text):
    text = "abababab" * 4 + "z" + "ababq" + "q"
    ds = load(write_text(text), val_fraction=0.0, min_count=2)
    assert ds.vocab.unk == UNK and UNK in ds.vocab.chars
    assert "z" not in ds.vocab.chars and "q" in ds.vocab.chars
    assert text_of(ds) == text.replace("z", UNK)
    assert int(np.sum(np.asarray(ds.train) == ds.vocab.unk_id)) == 1


def test_min_count_that_keeps_nothing(write_text):
    with pytest.raises(DataError, match="min_count=9"):
        load(write_text("abcabc"), val_fraction=0.0, min_count=9)


def test_validation_characters_unseen_in_training_map_to_unk(write_text):
    text = "abcabcabcabcabcabc" + "abxy"  # 22 chars, val_fraction 0.2 -> the last 4 are validation
    ds = load(write_text(text), val_fraction=0.2)
    assert len(ds.train) == 18 and len(ds.val) == 4
    assert set(ds.vocab.chars) == {"a", "b", "c", UNK}
    assert text_of(ds, "val") == "ab" + UNK + UNK


def test_val_path_unseen_characters_map_to_unk(write_text):
    train = write_text("hello world\n" * 3, "train.txt")
    val = write_text("hold the wire!", "val.txt")
    ds = load(train, val_path=str(val))
    assert len(ds.train) == 36  # all of the training file; val_fraction is ignored
    assert text_of(ds) == "hello world\n" * 3
    expected = "".join(c if c in "hello world\n" else UNK for c in "hold the wire!")
    assert text_of(ds, "val") == expected
    assert is_memmap(ds.val)


def test_val_path_with_known_characters_has_no_unk(write_text):
    ds = load(write_text("abcabc", "t.txt"), val_path=str(write_text("cab", "v.txt")))
    assert ds.vocab.unk is None and text_of(ds, "val") == "cab"


def test_vocab_is_sorted_and_json_round_trips(write_text):
    ds = load(write_text("zebra 中文 😀 Apple\n" * 2), val_fraction=0.0)
    chars = list(ds.vocab.chars)
    assert chars == sorted(set("zebra 中文 😀 Apple\n"))
    doc = json.loads(json.dumps(ds.vocab.to_json()))
    assert Vocab.from_json(doc) == ds.vocab
    with_unk = Vocab(sorted("ab" + UNK), UNK)
    again = Vocab.from_json(json.loads(json.dumps(with_unk.to_json(), ensure_ascii=True)))
    assert again == with_unk and again.unk_id == with_unk.unk_id


def test_vocab_rejects_unsorted_or_duplicate_characters():
    for bad in (["b", "a"], ["a", "a"], ["ab"]):
        with pytest.raises(DataError):
            Vocab(bad)
    with pytest.raises(DataError):
        Vocab(["a", "b"], unk=UNK)


def test_encode_unknown_characters():
    v = Vocab(["a", "b"])
    with pytest.raises(DataError, match="'xy'"):
        v.encode("axby")
    np.testing.assert_array_equal(v.encode("axby", on_unknown="drop"), [0, 1])
    u = Vocab(sorted(["a", "b", UNK]), UNK)
    assert u.decode(u.encode("axb")) == "a" + UNK + "b"
    assert u.unknown_chars("axbyx") == ["x", "y"]


# ---- the encoded-corpus cache -----------------------------------------------------------------

def test_second_load_reuses_the_cache_without_tokenizing(write_text, monkeypatch, cache_dir):
    path = write_text(CHINESE * 5)
    first = load(path)
    assert first.reused is False
    assert first.cache_dir.is_relative_to(cache_dir)

    def boom(*args, **kwargs):
        raise AssertionError("tokenize called although the cache entry exists")
    monkeypatch.setattr(dataset, "tokenize", boom)
    second = load(path)
    assert second.reused is True and second.cache_dir == first.cache_dir
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    assert second.vocab == first.vocab and second.sha256 == first.sha256


def test_changed_file_invalidates_the_cache(write_text):
    path = write_text("aaaa bbbb\n" * 3)
    first = load(path, val_fraction=0.0)
    path.write_text("xyz xyz\n" * 3, encoding="utf-8")
    second = load(path, val_fraction=0.0)
    assert second.reused is False and second.cache_dir != first.cache_dir
    assert text_of(second) == "xyz xyz\n" * 3
    assert set(second.vocab.chars) == set("xyz \n")


def test_different_settings_get_new_entries(write_text):
    path = write_text("abababab" * 4 + "z")
    base = load(path, val_fraction=0.0)
    other_min = load(path, val_fraction=0.0, min_count=2)
    other_split = load(path, val_fraction=0.5)
    assert not other_min.reused and not other_split.reused
    assert len({base.cache_dir, other_min.cache_dir, other_split.cache_dir}) == 3
    assert UNK in other_min.vocab.chars and UNK not in base.vocab.chars
    assert load(path, val_fraction=0.0, min_count=2).reused


def test_ids_are_memory_mapped(write_text):
    ds = load(write_text(CHINESE * 4))
    assert is_memmap(ds.train) and is_memmap(ds.val)
    assert not ds.train.flags.writeable


def test_val_fraction_puts_the_tail_in_val(write_text):
    text = "".join("abcdefghij"[i % 10] for i in range(100))
    ds = load(write_text(text), val_fraction=0.1)
    assert text_of(ds) == text[:90]
    assert text_of(ds, "val") == text[90:]
    ds = load(write_text(text, "b.txt"), val_fraction=0.25)
    assert len(ds.train) == 75 and text_of(ds, "val") == text[75:]


def test_zero_val_fraction_means_no_validation(write_text):
    assert load(write_text("some text"), val_fraction=0.0).val is None


def test_cache_dir_setting_overrides_the_environment(write_text, tmp_path, cache_dir):
    own = tmp_path / "own-cache"
    ds = load(write_text("abc abc"), cache_dir=str(own))
    assert ds.cache_dir.is_relative_to(own)
    assert not any(cache_dir.iterdir())


# ---- errors -----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        load(tmp_path / "nope.txt")
    assert "nope.txt" in str(info.value) and "no such file" in str(info.value)
    assert "builtin:python-docs" in str(info.value)


def test_directory_is_not_a_corpus(tmp_path):
    with pytest.raises(DataError, match="directory"):
        load(tmp_path)


def test_unknown_builtin():
    with pytest.raises(DataError, match="builtin:python-docs"):
        load("builtin:nope")


def test_empty_file(write_text):
    path = write_text("")
    with pytest.raises(DataError) as info:
        load(path)
    assert str(path) in str(info.value) and "empty" in str(info.value)


def test_whitespace_only_file(write_text):
    path = write_text(" \n\t\n  \u3000\n")
    with pytest.raises(DataError) as info:
        load(path)
    assert str(path) in str(info.value) and "whitespace" in str(info.value)


def test_binary_file_with_nul_bytes(write_text):
    path = write_text(b"hello\x00\x01\x02world")
    with pytest.raises(DataError) as info:
        load(path)
    msg = str(info.value)
    assert str(path) in msg and "binary" in msg and "NUL" in msg and "character 5" in msg


def test_invalid_utf8_names_file_offset_and_encoding_option(write_text):
    prefix = "ok 中文 ".encode()
    path = write_text(prefix + b"\xff\xfe more")
    with pytest.raises(DataError) as info:
        load(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"byte offset {len(prefix)} " in msg
    # the advice names the config key, spelled for Python in str() and for the command line by cli.py
    assert msg.endswith("set data.encoding (e.g. sets=['data.encoding=latin-1'])")
    assert info.value.render("cli").endswith("set data.encoding (e.g. --set data.encoding=latin-1)")


def test_latin1_file_with_encoding_latin1(write_text):
    text = "café naïve señor ÆØÅ ±\n" * 3
    path = write_text(text, encoding="latin-1")
    with pytest.raises(DataError, match="byte offset 3 "):
        load(path)  # utf-8 by default: é is the invalid byte 0xe9 at offset 3
    ds = load(path, encoding="latin-1", val_fraction=0.0)
    assert text_of(ds) == text


def test_utf16_file(write_text):
    text = "héllo 中文 😀\n" * 3
    ds = load(write_text(text, encoding="utf-16"), encoding="utf-16", val_fraction=0.0)
    assert text_of(ds) == text


def test_unknown_encoding(write_text):
    with pytest.raises(DataError, match="data.encoding"):
        load(write_text("abc"), encoding="no-such-codec")


# ---- chunk boundaries -------------------------------------------------------------------------

MULTIBYTE = "aé中😀b" * 6  # 1-, 2-, 3- and 4-byte characters in UTF-8


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 11])
def test_multibyte_characters_straddling_chunks(write_text, chunk):
    path = write_text(MULTIBYTE)
    pieces = list(corpus.iter_codepoints(path, "utf-8", chunk))
    assert len(pieces) > 1
    assert "".join(chr(c) for p in pieces for c in p) == MULTIBYTE


@pytest.mark.parametrize("chunk", [4, 5, 8])
def test_four_byte_character_at_every_position_of_a_chunk_boundary(write_text, monkeypatch, chunk):
    """The emoji starts at every offset from a chunk boundary, so boundaries fall before it,
    after each of its first three bytes, and after it; read directly and through dataset.load."""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(dataset, "REMAP_CHUNK", 3)
    for prefix in range(chunk):
        text = "a" * prefix + "😀" + "b" * chunk + "é中😀\n"
        path = write_text(text, f"emoji-{prefix}.txt")
        pieces = list(corpus.iter_codepoints(path, "utf-8"))
        assert "".join(chr(c) for p in pieces for c in p) == text
        assert text_of(load(path, val_fraction=0.0)) == text


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 13])
@pytest.mark.parametrize("where", [0, 1, 5, 9, 10, 11, 17])
def test_invalid_byte_offset_is_exact_across_chunks(write_text, chunk, where):
    data = MULTIBYTE.encode()
    # cut only at character boundaries, then insert a stray continuation byte there
    cut = len(MULTIBYTE[:where].encode())
    path = write_text(data[:cut] + b"\x80" + data[cut:])
    with pytest.raises(DataError, match=f"byte offset {cut} "):
        list(corpus.iter_codepoints(path, "utf-8", chunk))


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_truncated_character_at_end_of_file(write_text, chunk):
    data = MULTIBYTE.encode()
    # MULTIBYTE ends with '😀b': dropping 2 bytes removes 'b' and the emoji's last byte, so the
    # file ends with an incomplete 4-byte sequence that starts 5 bytes before the original end
    path = write_text(data[:-2])
    with pytest.raises(DataError, match=f"byte offset {len(data) - 5} "):
        list(corpus.iter_codepoints(path, "utf-8", chunk))


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Make every read in charrnn go through 7-byte chunks; returns a list of chunk counts."""
    real = corpus.iter_codepoints
    counts = []

    def chunked(path, encoding="utf-8", chunk_bytes=None, digest=None):
        n = 0
        for piece in real(path, encoding, 7, digest=digest):
            n += 1
            yield piece
        counts.append(n)
    monkeypatch.setattr(corpus, "iter_codepoints", chunked)
    return counts


def test_dataset_load_with_tiny_chunks(write_text, tiny_chunks):
    text = CHINESE + EMOJI + COMBINING
    ds = load(write_text(text), val_fraction=0.0)
    assert tiny_chunks and max(tiny_chunks) > 10  # really read in many chunks
    assert text_of(ds) == text


def test_dataset_load_invalid_byte_offset_with_tiny_chunks(write_text, tiny_chunks):
    prefix = (CHINESE + EMOJI).encode()
    path = write_text(prefix + b"\xc3(" + b"rest")
    with pytest.raises(DataError) as info:
        load(path)
    assert f"byte offset {len(prefix)} " in str(info.value) and str(path) in str(info.value)


# ---- corpus sources ---------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_builtin_python_docs_is_offline(no_network, cache_dir):
    path = corpus.resolve("builtin:python-docs")
    assert path.is_file() and path.is_relative_to(cache_dir)
    assert len(path.read_text(encoding="utf-8")) > 400_000
    assert corpus.resolve("builtin:python-docs") == path  # stable name, written once


def test_builtin_python_docs_loads_as_dataset(no_network, cache_dir):
    ds = dataset.load(DataConfig())  # the default data.path
    assert ds.source.is_relative_to(cache_dir)
    assert len(ds.train) + len(ds.val) > 400_000
    assert 0.09 < len(ds.val) / (len(ds.train) + len(ds.val)) <= 0.1


CONTENT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture
def corpora_dir(tmp_path):
    d = tmp_path / "corpora"
    d.mkdir()
    entry = {"file": "tiny.txt", "url": "https://example.invalid/tiny.txt", "size": len(CONTENT),
             "sha256": hashlib.sha256(CONTENT).hexdigest()}
    (d / "catalog.json").write_text(json.dumps({"tiny": entry}), encoding="utf-8")
    return d


class FakeResponse:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, n=-1):
        return self.data if n < 0 else self.data[:n]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_catalog_lists_entries(corpora_dir, tmp_path):
    assert set(corpus.catalog(corpora_dir)) == {"tiny"}
    assert corpus.catalog(tmp_path / "missing") == {}


def test_failed_download_says_where_to_put_the_file(corpora_dir, no_network):
    with pytest.raises(DataError) as info:
        corpus.fetch_catalog_entry("tiny", corpora_dir)
    msg = str(info.value)
    assert "by hand" in msg and str(corpora_dir / "tiny.txt") in msg
    assert hashlib.sha256(CONTENT).hexdigest() in msg and "network disabled" in msg
    assert not (corpora_dir / "tiny.txt").exists()


@pytest.mark.parametrize("payload", [CONTENT[:-1] + b"?", CONTENT[:-3], CONTENT + b"extra"],
                         ids=["wrong-sha", "short", "long"])
def test_download_with_wrong_checksum_is_rejected(corpora_dir, monkeypatch, payload):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(payload))
    with pytest.raises(DataError) as info:
        corpus.fetch_catalog_entry("tiny", corpora_dir)
    assert "sha256" in str(info.value) and "by hand" in str(info.value)
    assert sorted(p.name for p in corpora_dir.iterdir()) == ["catalog.json"]  # no file, no temp file


def test_download_with_right_checksum_is_kept(corpora_dir, monkeypatch):
    urls = []

    def fake(url, timeout=None):
        urls.append(url)
        return FakeResponse(CONTENT)
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    path = corpus.fetch_catalog_entry("tiny", corpora_dir)
    assert path == corpora_dir / "tiny.txt" and path.read_bytes() == CONTENT
    assert urls == ["https://example.invalid/tiny.txt"]
    assert corpus.fetch_catalog_entry("tiny", corpora_dir) == path
    assert len(urls) == 1  # the second call used the local copy


def test_correct_local_file_is_used_without_downloading(corpora_dir, no_network):
    (corpora_dir / "tiny.txt").write_bytes(CONTENT)
    assert corpus.fetch_catalog_entry("tiny", corpora_dir) == corpora_dir / "tiny.txt"


def test_corrupt_local_file_is_reported(corpora_dir, no_network):
    (corpora_dir / "tiny.txt").write_bytes(CONTENT + b"tampered")
    with pytest.raises(DataError) as info:
        corpus.fetch_catalog_entry("tiny", corpora_dir)
    assert "delete it" in str(info.value) and str(corpora_dir / "tiny.txt") in str(info.value)


def test_builds_abandoned_by_killed_processes_are_removed(write_text, cache_dir):
    """A process killed while tokenizing leaves a half-written `.<entry>.*` directory; the next
    build of that entry removes it, but not the build of a live process or of another host."""
    import os
    import socket
    import subprocess
    import sys

    path = write_text("abcabc\n" * 20)
    entry = load(path).cache_dir
    for f in entry.iterdir():
        f.unlink()
    entry.rmdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"killed": f"{socket.gethostname()} {int(dead.stdout)}", "live": f"{socket.gethostname()} {os.getpid()}",
              "other-host": f"some-other-host-{os.getpid()} {int(dead.stdout)}"}
    for name, owner in owners.items():
        (entry.parent / f".{entry.name}.{name}").mkdir()
        (entry.parent / f".{entry.name}.{name}" / "ids.bin").write_bytes(b"\0" * 64)
        (entry.parent / f".{entry.name}.{name}" / "owner").write_text(owner)
    again = load(path)
    assert again.reused is False and again.cache_dir == entry
    left = sorted(p.name for p in entry.parent.glob(f".{entry.name}.*"))
    assert left == [f".{entry.name}.live", f".{entry.name}.other-host"]
    assert text_of(again) == text_of(load(path)) and not (entry / "owner").exists()


def test_the_hash_of_an_unchanged_file_is_remembered_and_a_rewrite_is_hashed_again(write_text, monkeypatch, cache_dir):
    import os

    import time

    path = write_text("abcd efgh\n" * 30)
    monkeypatch.setattr(corpus, "_now", lambda: time.time() + 10)  # the file was written 10 s ago
    first = load(path)
    calls = []
    real = corpus._sha256_file
    monkeypatch.setattr(corpus, "_sha256_file", lambda p: calls.append(p) or real(p))
    again = load(path)
    assert again.reused and again.sha256 == first.sha256 and calls == []  # no full read on a cache hit
    path.write_text("zyxw vuts\n" * 30, encoding="utf-8")  # same size, new content (new ctime)
    os.utime(path, ns=(path.stat().st_mtime_ns - 10**9,) * 2)  # even with an older mtime set
    changed = load(path)
    assert calls == [path] and changed.sha256 != first.sha256 and not changed.reused
    assert text_of(changed, "train").startswith("zyxw")


def test_a_just_modified_file_is_not_memoized(write_text, monkeypatch, cache_dir):
    path = write_text("abcd efgh\n" * 30)  # mtime now: a coarse clock could hide a second write
    load(path)
    calls = []
    real = corpus._sha256_file
    monkeypatch.setattr(corpus, "_sha256_file", lambda p: calls.append(p) or real(p))
    assert load(path).reused and calls == [path]
