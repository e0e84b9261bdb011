"""Scale (issue 4): tokenizing in bounded memory, and memory-mapped corpus pages that training
and evaluation release so that RSS does not grow with the corpus."""
from __future__ import annotations

import mmap
import os
import sys
import tracemalloc

import numpy as np
import pytest

from charrnn import batches, checkpoint, corpus, dataset
from charrnn.config import DataConfig
from charrnn.errors import DataError
from charrnn.train import train
from charrnn.vocab import codepoints

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of the file at path (Linux /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                inside = len(fields) == 6 and fields[5].rstrip("\n") == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def letters(n: int, seed: int = 0) -> str:
    """n characters of random lower-case words and newlines: fast to make in bulk."""
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      \n", dtype=np.uint8)
    return np.random.default_rng(seed).choice(alphabet, n).tobytes().decode("ascii")


def mixed_corpus(path, size: int) -> str:
    """About `size` bytes: lines of letters, every third with an accented or Greek word from the
    start; 300 CJK characters only in the second half, so the provisional id type widens
    mid-file and the vocabulary's sorted order differs from the order of first appearance (a
    remap pass). No emoji: tables over code points (8 bytes per code point up to the largest,
    1 MiB for U+1F680) would dwarf the small chunks this test uses."""
    rng = np.random.default_rng(1)
    early = ["café naïve", "Zürich", "Ελλάδα"]
    late = early + ["".join(chr(0x4E00 + int(c)) for c in rng.integers(0, 300, 12)) for _ in range(400)]
    body = letters(size)
    lines = [body[i : i + 60] for i in range(0, size, 60)]
    for k in range(0, len(lines), 3):
        extra = early if k < len(lines) // 2 else late
        lines[k] += extra[int(rng.integers(len(extra)))]
    text = "\n".join(lines) + "\n"
    path.write_bytes(text.encode("utf-8"))
    return text


# ---- tokenizing ----------------------------------------------------------------------------------

def test_tokenizing_a_large_file_keeps_memory_bounded(tmp_path, monkeypatch):
    chunk = 128 << 10
    monkeypatch.setattr(corpus, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(dataset, "REMAP_CHUNK", 32 << 10)
    path = tmp_path / "big.txt"
    text = mixed_corpus(path, 6 << 20)
    size = path.stat().st_size
    (tmp_path / "warm.txt").write_text("warm up: café 中文\n", encoding="utf-8")
    dataset.load(DataConfig(path=str(tmp_path / "warm.txt")))  # first-use imports are not tokenizing
    tracemalloc.start()  # numpy reports its array allocations to tracemalloc too
    try:
        ds = dataset.load(DataConfig(path=str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # one chunk's bytes, decoded str (2 bytes a character here) and UTF-32 copy, a block's intp
    # temporaries, and tables over the code points up to U+4F2B (160 KiB each): about 10 chunks,
    # nothing that grows with the file
    assert peak < 16 * chunk, f"traced peak {peak:,} bytes with {chunk:,}-byte chunks"
    assert peak < size / 3
    assert ds.train.dtype == np.uint16 and not ds.reused
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), ds.vocab.lookup(codepoints(text)))


def test_id_type_that_widens_mid_file(tmp_path, monkeypatch):
    """Provisional ids start in uint8 and continue in a uint16 segment; ids.bin is uint16 throughout."""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 1 << 10)
    monkeypatch.setattr(dataset, "REMAP_CHUNK", 256)
    text = "plain ascii text\n" * 200 + "".join(chr(0x4E00 + i) for i in range(300)) + "\nend\n"
    path = tmp_path / "widen.txt"
    path.write_bytes(text.encode("utf-8"))
    ds = dataset.load(DataConfig(path=str(path), val_fraction=0.0))
    assert ds.train.dtype == np.uint16 and len(ds.vocab) == len(set(text))
    assert ds.vocab.decode(ds.train) == text
    assert sorted(p.name for p in ds.cache_dir.iterdir()) == ["ids.bin", "meta.json"]  # segments removed


# ---- memory-mapped pages -------------------------------------------------------------------------

@linux_only
def test_release_pages_unmaps_what_was_read_and_keeps_the_values(write_text):
    ds = dataset.load(DataConfig(path=str(write_text(letters(4 << 20))), val_fraction=0.0))
    ids_file = ds.cache_dir / "ids.bin"
    assert mapped_kib(ids_file) == 0  # opening reads nothing
    total = int(np.sum(ds.train, dtype=np.int64))  # reads every page
    assert mapped_kib(ids_file) > 0.9 * (4 << 10)
    dataset.release_pages(ds.train[10:20])  # any view of the mapping will do
    assert mapped_kib(ids_file) == 0
    assert int(np.sum(ds.train, dtype=np.int64)) == total


def anonymous_pages(n: int) -> tuple[mmap.mmap, np.ndarray]:
    """n bytes of a private anonymous mapping, written (so resident), as a writable array."""
    pages = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE) if hasattr(mmap, "MAP_PRIVATE") else mmap.mmap(-1, n)
    a = np.frombuffer(pages, dtype=np.uint8)
    a[:] = np.arange(n) % 251 + 1
    return pages, a


@linux_only
def test_release_pages_ignores_arrays_that_are_not_mapped(write_text):
    """In-memory arrays, None, and arrays behind a writable mapping (whose pages MADV_DONTNEED
    would throw away: a private anonymous one reads back as zeros) keep every value, while the
    corpus mapping passed in the same call is released."""
    ds = dataset.load(DataConfig(path=str(write_text(letters(1 << 20))), val_fraction=0.0))
    ids_file = ds.cache_dir / "ids.bin"
    _, written = anonymous_pages(1 << 20)
    others = [np.arange(10), np.zeros(3)[1:], np.frombuffer(bytearray(b"abc"), dtype=np.uint8), written]
    before = [a.copy() for a in others]
    total = int(np.sum(ds.train, dtype=np.int64))
    assert mapped_kib(ids_file) > 0
    dataset.release_pages(*others[:2], None, ds.train[5:9], *others[2:])
    for a, was in zip(others, before):
        np.testing.assert_array_equal(a, was)
    assert mapped_kib(ids_file) == 0  # the one mapping that is the corpus's was released
    assert int(np.sum(ds.train, dtype=np.int64)) == total
    dataset.check_mapped(*others)  # nothing to check, and no error (an anonymous mapping has no file)


@linux_only
def test_a_truncated_cache_file_advises_resume_in_each_front_end(write_text):
    ds = dataset.load(DataConfig(path=str(write_text(letters(10_000))), val_fraction=0.0))
    os.truncate(ds.cache_dir / "ids.bin", 4096)
    with pytest.raises(DataError) as info:
        dataset.check_mapped(ds.train)
    assert str(info.value).endswith("continues from its last checkpoint with "
                                    "charrnn.train(config, run_dir=..., resume=True))")
    assert info.value.render("cli").endswith("continues from its last checkpoint with --resume)")


@linux_only
@pytest.mark.parametrize("cloze", [False, True], ids=["next-char", "cloze"])
def test_trainer_releases_the_corpus_pages_it_read(write_text, tiny, monkeypatch, cloze):
    path = write_text(letters(1 << 20))
    cfg = tiny.config(path, "train.batch_size=8", "train.seq_len=16", "train.max_steps=20", "train.eval_every=0",
                      "train.eval_chars=2000",
                      *(["model.bidirectional=true"] if cloze else []))
    ids_file = dataset.load(cfg.data).cache_dir / "ids.bin"
    every = 3  # a budget of 3 steps' windows
    monkeypatch.setattr(dataset, "RESIDENT_BUDGET", every * 8 * (dataset.MAPPED_PER_WINDOW + 4 * 17))
    assert dataset.release_every(8, 16) == every
    real, seen = dataset.release_pages, []

    def spy(*arrays):
        before = mapped_kib(ids_file)
        real(*arrays)
        seen.append((len(arrays[0]), before, mapped_kib(ids_file)))
    monkeypatch.setattr(dataset, "release_pages", spy)
    train(cfg, path.parent / "run")
    n_train = len(dataset.load(cfg.data).train)
    by_trainer = [(before, after) for n, before, after in seen if n == n_train]
    assert len(by_trainer) == len(range(0, 20, every))  # steps 0, 3, ..., 18
    assert all(after == 0 for _, after in by_trainer)
    assert all(before > 0 for before, _ in by_trainer[1:])  # the windows since the last release were mapped
    assert any(n != n_train for n, _, _ in seen)  # the evaluation at the end released the validation text


@pytest.mark.parametrize("extra", [(), ("model.bidirectional=true",)], ids=["next-char", "cloze"])
def test_releasing_pages_does_not_change_training(tmp_path, write_text, tiny, monkeypatch, extra):
    path = write_text(letters(200_000))
    params = []
    for budget in (1, 1 << 62):  # release before every step, and never
        monkeypatch.setattr(dataset, "RESIDENT_BUDGET", budget)
        summary = train(tiny.config(path, "train.max_steps=12", *extra), tmp_path / f"run-{budget}")
        params.append(checkpoint.load(summary.last_checkpoint).params)
    assert params[0].keys() == params[1].keys()
    for key in params[0]:
        np.testing.assert_array_equal(params[0][key], params[1][key], err_msg=key)


# ---- evaluation windows gathered from the mapping ------------------------------------------------

def padded_stream_windows(ids, T):
    """The earlier eval_stream_windows: the whole text copied into a zero-padded intp array."""
    n = len(ids)
    B, span = batches.eval_streams(n)
    padded = np.zeros(B * span + 1, dtype=np.intp)
    padded[:n] = ids
    starts = (np.arange(B) * span)[:, None]
    for t0 in range(0, span, T):
        pos = starts + t0 + np.arange(min(T, span - t0))
        yield padded[pos], padded[pos + 1], pos + 1 <= n - 1


@pytest.mark.parametrize("n,T", [(2, 1), (5, 3), (2_500, 7), (40_003, 64), (65_000, 100)])
def test_eval_stream_windows_equal_the_padded_layout(rng, n, T):
    ids = rng.integers(1, 50, n).astype(np.uint8)
    got, want = list(batches.eval_stream_windows(ids, T)), list(padded_stream_windows(ids, T))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,T,N", [(1, 4, 2), (17, 4, 2), (1_000, 16, 8)])
def test_eval_cloze_windows_cover_every_character_once(rng, n, T, N):
    ids = rng.integers(0, 50, n).astype(np.uint8)
    windows = list(batches.eval_cloze_windows(ids, T, N))
    assert all(w.dtype == np.intp for w in windows)
    np.testing.assert_array_equal(np.concatenate([w.reshape(-1) for w in windows]), ids)


def test_scoring_a_large_file_keeps_its_ids_on_disk(tmp_path, monkeypatch):
    """eval/diagnose --corpus: the ids go to an unlinked scratch file and come back memory-mapped,
    equal to the in-memory encoding; memory does not grow with the file."""
    from charrnn import evaluate
    from charrnn.vocab import Vocab

    chunk = 128 << 10
    monkeypatch.setattr(corpus, "CHUNK_BYTES", chunk)
    path = tmp_path / "big.txt"
    text = mixed_corpus(path, 6 << 20)
    vocab = Vocab(sorted(set(text)))
    in_memory, rate = evaluate.encode_file(path, vocab, "utf-8")
    scratch = tmp_path / "scratch"
    tracemalloc.start()
    try:
        mapped, mapped_rate = evaluate.encode_file(path, vocab, "utf-8", scratch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # per chunk: code points (4 bytes a character), intp lookups (8), the mask, the narrowed copy:
    # about 36 chunks' bytes at most, the same for any file size; the ids alone are 3x more here
    assert peak < 40 * chunk < in_memory.nbytes / 2, f"traced peak {peak:,} bytes"
    assert dataset._mapping_of(mapped) is not None and list(scratch.iterdir()) == []  # mapped, and nameless
    np.testing.assert_array_equal(mapped, in_memory)
    assert mapped_rate == rate == 0.0


def test_an_unwritable_scratch_directory_falls_back_to_memory(tmp_path):
    from charrnn import evaluate
    from charrnn.vocab import Vocab

    path = tmp_path / "t.txt"
    path.write_text("abcab\n", encoding="utf-8")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ids, _ = evaluate.encode_file(path, Vocab(list("\nabc")), "utf-8", blocker / "scratch")
    assert dataset._mapping_of(ids) is None and ids.tolist() == [1, 2, 3, 1, 2, 0]
