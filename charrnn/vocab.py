"""Character vocabulary over Unicode code points.

The vocabulary is the sorted list of characters kept from the training text, stored in id order
as a JSON list (it goes into every checkpoint). With `data.min_count` > 1, or when validation
text holds characters the training text lacks, one unknown symbol stands for every character
outside the list, so a model can still score and be primed with text it never saw.
The unknown symbol is U+FFFD, Unicode's own replacement character; if the corpus already uses
U+FFFD, that entry simply doubles as the unknown symbol.
"""
from __future__ import annotations

import numpy as np

from charrnn.errors import DataError

UNK = "\ufffd"
MAX_SIZE = 0x110000  # every Unicode code point: no vocabulary of distinct characters is larger


def id_dtype(size: int):
    """The smallest unsigned integer type that holds ids 0..size-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"vocabulary of {size} characters is too large")


def codepoints(text: str) -> np.ndarray:
    """(len(text),) uint32 code points, without a Python loop over characters."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.uint32)
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


class Vocab:
    """chars in id order, the optional unknown symbol, and a code point -> id lookup table."""

    def __init__(self, chars, unk: str | None = None):
        self.chars = tuple(chars)
        # types and size first: a vocabulary read from a checkpoint may hold anything
        if (len(self.chars) > MAX_SIZE or not all(isinstance(c, str) and len(c) == 1 for c in self.chars)
                or list(self.chars) != sorted(set(self.chars))):
            raise DataError("vocabulary must be distinct single characters in sorted order")
        if unk is not None and not (isinstance(unk, str) and unk in self.chars):
            raise DataError(f"unknown symbol {unk!r:.20} is not in the vocabulary")
        self.unk = unk
        self.unk_id = self.chars.index(unk) if unk is not None else -1
        self.dtype = id_dtype(len(self.chars))
        cps = np.array([ord(c) for c in self.chars], dtype=np.int64)
        # lookup table over code points 0..max: -1 marks "not in the vocabulary"
        self._lut = np.full(int(cps.max()) + 1 if len(cps) else 1, -1, dtype=np.int64)
        self._lut[cps] = np.arange(len(cps))

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and (self.chars, self.unk) == (other.chars, other.unk)

    def lookup(self, cps: np.ndarray) -> np.ndarray:
        """int64 ids for code points; -1 for characters outside the vocabulary (not mapped to unk)."""
        inside = cps < len(self._lut)
        ids = np.full(cps.shape, -1, dtype=np.int64)
        ids[inside] = self._lut[cps[inside]]
        return ids

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of text that are not in the vocabulary, in order of appearance."""
        cps = codepoints(text)
        missing = cps[self.lookup(cps) < 0]
        _, first = np.unique(missing, return_index=True)
        return [chr(int(c)) for c in missing[np.sort(first)]]

    def encode(self, text: str, on_unknown: str = "unk") -> np.ndarray:
        """Ids of text. Characters outside the vocabulary become the unknown symbol when the
        vocabulary has one; otherwise `on_unknown="error"` (or no unknown symbol) raises a
        DataError naming them, and "drop" removes them."""
        ids = self.lookup(codepoints(text))
        if (ids < 0).any():
            if on_unknown == "drop":
                ids = ids[ids >= 0]
            elif self.unk is not None and on_unknown == "unk":
                ids[ids < 0] = self.unk_id
            else:
                shown = "".join(self.unknown_chars(text)[:20])
                raise DataError(f"characters not in the model's vocabulary: {shown!r}")
        return ids.astype(self.dtype)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def to_json(self) -> dict:
        return {"vocab": list(self.chars), "unk": self.unk}

    @classmethod
    def from_json(cls, doc: dict) -> Vocab:
        """The vocabulary of to_json's form. DataError unless vocab is a list (a string or a mapping
        would turn into characters too) and unk a character of it or null."""
        if not isinstance(doc["vocab"], list):
            raise DataError("vocabulary must be a list of distinct single characters in sorted order")
        return cls(doc["vocab"], doc.get("unk"))


def build_vocab(train_counts: np.ndarray, min_count: int, other_chars: np.ndarray) -> Vocab:
    """Vocabulary from dense per-code-point counts of the training text.

    train_counts: (max_cp + 1,) counts over the training text.
    other_chars:  code points that occur anywhere else (validation text, rare characters): if
                  any of them is not kept, the unknown symbol joins the vocabulary.
    """
    kept = np.flatnonzero(train_counts >= min_count)
    if len(kept) == 0:
        raise DataError(f"no character occurs data.min_count={min_count} times in the training text; lower data.min_count")
    outside = np.setdiff1d(np.concatenate([np.flatnonzero(train_counts), other_chars]), kept)
    chars = [chr(int(c)) for c in kept]
    unk = None
    if len(outside):
        unk = UNK
        if UNK not in chars:
            chars = sorted(chars + [UNK])
    return Vocab(chars, unk)
