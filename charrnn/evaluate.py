"""Scoring text with a model: loss in nats/char, bits/char, perplexity.

Next-char models score every character after the first from its left context, in the stream
layout of batches.eval_streams (one stream for texts under 2,000 characters, so a short text's
score is exactly the model's mean loss over it). Cloze models score every character from both
sides within consecutive windows of train.seq_len characters, as in training.
"""
from __future__ import annotations

import math
import mmap
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from charrnn import batches, corpus, heap, ops
from charrnn.errors import DataError, NumericalError
from charrnn.model import Spec, forward, position_bytes, targets
from charrnn.vocab import Vocab, codepoints


# Bytes of activations one batch of evaluation windows may hold. Training's own windows
# (batch_size x seq_len) usually fit far below it, so their numbers do not change.
EVAL_BUDGET = 256 << 20


class EvalResult(NamedTuple):
    """A model's score on a text (`charrnn eval`, Model.score)."""

    loss: float  # mean cross-entropy, nats per scored character
    bpc: float  # bits per character: loss / ln 2
    perplexity: float  # exp(loss)
    chars: int  # characters scored
    unk_rate: float  # share of the input characters that were outside the vocabulary
    objective: str  # "next-char" or "cloze"

    def as_dict(self) -> dict:
        """The fields as a dict, in order: the object `eval --json` prints."""
        return self._asdict()


def score(spec: Spec, params: dict, ids, seq_len: int, batch: int = 32, part: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(sum of -log p over scored characters in float64, number scored); with part (r, K), of
    the r-th of K shares of the windows (one process's: the shares' sums add up to the whole).

    Windows are sized to hold at most EVAL_BUDGET bytes of activations, whatever seq_len a
    checkpoint's meta gives: a next-char model's windows are shortened (the state is carried, so
    the score is the same up to rounding), a cloze model's batches hold fewer windows (its
    windows are its objective and keep their length).
    """
    total, count = 0.0, 0
    per_position = position_bytes(spec)
    if spec.bidirectional:
        batch = max(1, min(batch, EVAL_BUDGET // (seq_len * per_position)))
        for x in batches.eval_cloze_windows(ids, seq_len, batch, part):
            logits, _, _ = forward(spec, params, x)
            total += ops.cross_entropy_sum(logits, targets(x))
            count += x.size
        return total, count
    h = None
    streams = batches.eval_streams(len(ids))[0]
    seq_len = max(1, min(seq_len, EVAL_BUDGET // (streams * per_position)))
    for x, y, valid in batches.eval_stream_windows(ids, seq_len, part):
        logits, h, _ = forward(spec, params, x, h)
        rows = targets(valid)  # (Tw*B,) time-major like the logits
        total += ops.cross_entropy_sum(logits[rows], targets(x, y)[rows])
        count += int(rows.sum())
    return total, count


def result(total: float, count: int, objective: str, unk_rate: float = 0.0) -> EvalResult:
    """The EvalResult of a summed loss over count characters; NumericalError if it is not finite."""
    loss = total / count
    if not math.isfinite(loss):  # e.g. weights so large that the logits overflow: no number to report
        raise NumericalError(f"the model's loss on this text is {loss} (its logits overflow); "
                             "the checkpoint's weights are unusable: score another checkpoint")
    return EvalResult(loss, loss / math.log(2), math.exp(min(loss, 700.0)), count, unk_rate, objective)


def evaluate_ids(spec: Spec, params: dict, ids, seq_len: int, unk_rate: float = 0.0, comm=None) -> EvalResult:
    """The model's score on ids (N,); DataError for a text too short for its objective. With
    comm (distributed.World), each process scores its share and the sums are added up."""
    heap.keep_freed_memory()  # windows reuse the previous window's pages
    if len(ids) < (1 if spec.bidirectional else 2):
        raise DataError(f"the text has {len(ids)} characters; a {spec.objective} model needs at least "
                        f"{1 if spec.bidirectional else 2} to score")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by result(), once
        if comm is None or comm.size == 1:
            return result(*score(spec, params, ids, seq_len), spec.objective, unk_rate)
        total, count = comm.sum_floats(*score(spec, params, ids, seq_len, part=(comm.rank, comm.size)))
        return result(total, int(count), spec.objective, unk_rate)


def encode_file(path: Path, vocab: Vocab, encoding: str, scratch: Path | None = None) -> tuple[np.ndarray, float]:
    """Ids of a text file and its unknown-character rate. Unknown characters become the unknown
    symbol if the vocabulary has one, else they are left out of the scored text.

    With `scratch` (a directory on disk), the ids go to a file there, deleted at once, and come
    back memory-mapped: the scorer releases their pages as it moves on, so scoring a file of any
    size holds a bounded amount of RAM (held in memory, a 1 GB text is 1-2 GB of ids). If the
    directory cannot be written, the ids are kept in memory instead.
    """
    return _encode(corpus.iter_codepoints(path, encoding), vocab, _Sink(vocab.dtype, scratch), str(path))


def encode_text(text: str, vocab: Vocab) -> tuple[np.ndarray, float]:
    """Ids of a string and its unknown-character rate, exactly as encode_file gives them for a
    UTF-8 file holding that text (the same refusals too: empty, a NUL character, nothing known)."""
    if not isinstance(text, str):
        raise DataError(f"the text to score must be a str, not {type(text).__name__}")
    nul = text.find("\0")
    if nul >= 0:  # a file holding it would be refused as binary (corpus.iter_codepoints)
        raise DataError(f"the text holds a NUL character at character {nul}; text never contains one")
    try:
        cps = codepoints(text)
    except UnicodeEncodeError as e:  # a lone surrogate: no file can hold it as text
        raise DataError(f"the text holds {text[e.start]!r} at character {e.start}, a lone surrogate "
                        "that is not a Unicode character; decode the text with errors='replace'") from None
    return _encode(iter([cps] if len(cps) else []), vocab, _Sink(vocab.dtype, None), "the text")


def _encode(chunks, vocab: Vocab, sink: _Sink, name: str) -> tuple[np.ndarray, float]:
    """Ids and unknown-character rate of code-point chunks, collected in sink; name says what
    the text is in messages (a path, or "the text")."""
    unknown, n = 0, 0
    try:
        for cps in chunks:
            ids = vocab.lookup(cps)
            missing = ids < 0
            unknown += int(missing.sum())
            n += len(ids)
            ids = np.where(missing, vocab.unk_id, ids) if vocab.unk is not None else ids[~missing]
            sink.add(ids.astype(vocab.dtype))
        if n == 0:
            raise DataError(f"{name} is empty; give a text with some characters" if name == "the text" else
                            f"{name} is empty; give a text file with some characters")
        if unknown == n and vocab.unk is None:
            raise DataError(f"none of the {n:,} characters of {name} is in the model's vocabulary; "
                            "score a text in the script the model was trained on (or check data.encoding)")
        return sink.array(), unknown / n
    finally:
        sink.close()


class _Sink:
    """Collects id chunks in memory, or appends them to an unlinked scratch file to map at the end."""

    def __init__(self, dtype, scratch: Path | None):
        self.dtype, self.parts, self.file = np.dtype(dtype), [], None
        if scratch is not None:
            try:
                scratch.mkdir(parents=True, exist_ok=True)
                self.file = tempfile.TemporaryFile(dir=scratch, prefix="eval-ids-")
            except OSError:  # e.g. a checkpoint's cache_dir from another machine: score in memory
                self.file = None

    def add(self, ids: np.ndarray) -> None:
        if self.file is None:
            self.parts.append(ids)
            return
        try:
            self.file.write(ids.tobytes())
        except OSError as e:
            raise DataError(f"cannot write scratch ids: {e.strerror}; free some disk space "
                            "or set data.cache_dir (or CHARRNN_CACHE_DIR) elsewhere") from None

    def array(self) -> np.ndarray:
        if self.file is None:
            return np.concatenate(self.parts)
        self.file.flush()
        count = self.file.tell() // self.dtype.itemsize
        if count == 0:  # every character was unknown and dropped: nothing to map
            return np.zeros(0, dtype=self.dtype)
        # mapped as dataset.load maps its ids, so the scorer's dataset.release_pages applies; the
        # mapping keeps the data reachable after the file (already nameless) is closed
        mapping = mmap.mmap(self.file.fileno(), count * self.dtype.itemsize, access=mmap.ACCESS_READ)
        return np.frombuffer(mapping, dtype=self.dtype)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
