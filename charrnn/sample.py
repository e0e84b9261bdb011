"""Generating text: left-to-right sampling for next-char models, gap filling for cloze models.

Sampling draws one uniform number per character and stream and inverts the cumulative
distribution (no rng.choice per character, which is slow and re-normalizes). The same
Generator state therefore gives the same text. The unknown symbol is never emitted: it has
probability 0, and a distribution that is not finite or has no mass left outside it is an
error (pick), whatever the knobs or weights.

Memory is bounded whatever the options: the knobs are checked before anything runs
(Knobs.check), the prime is read in chunks of PRIME_CHUNK characters by one stream, uniforms are
drawn in blocks of at most UNIFORM_MAX numbers, and a batch of n streams whose working set
would pass STREAMS_BUDGET bytes is refused up front with its limit (check_streams).
"""
from __future__ import annotations

import math
from typing import NamedTuple
from collections.abc import Iterator

import numpy as np

from charrnn import ops
from charrnn.errors import NumericalError, UsageError, option
from charrnn.model import Spec, forward, layer_params, tower_forward, zero_state
from charrnn.vocab import Vocab

UNIFORM_BLOCK = 1024  # steps of uniforms drawn per Generator call, while n * UNIFORM_BLOCK <= UNIFORM_MAX
UNIFORM_MAX = 1 << 20  # uniforms held at once (8 MiB): more streams draw fewer steps per call
PRIME_CHUNK = 4096  # prime characters per forward call: bounds the caches that call keeps
STREAMS_BUDGET = 512 << 20  # bytes a batch of streams may hold (state, logits, the text kept)
HELD_CHAR_BYTES = 16  # per character of a batch kept for printing: a list slot, the joined and encoded text

# Temperature: 1/T scales the output weights in the model's dtype (float32: max 3.4e38), so a tiny
# T overflows them (1e-45 is a float32 denormal: 1/T is inf) and NaN spreads to every logit.
# Outside [1e-3, 1e3] nothing is gained anyway: at T = 1e-3 a gap of 0.1 nats between the two
# likeliest characters is odds of e^100 (greedy in all but exact ties), and at T = 1e3 gaps of
# 10 nats shrink to 0.01 (uniform over the allowed characters). Logits stay finite there for any
# weights below 3e35, far beyond what training produces.
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-3, 1e3
# top-p: any value below 1/V keeps the likeliest character alone (V <= 1.1M code points); the
# minimum keeps top_p * (total mass >= 1) far from float32's underflow at 1e-38.
TOP_P_MIN = 1e-12


class Knobs(NamedTuple):
    """How each next character is chosen from the model's distribution (check() before use)."""

    temperature: float = 1.0  # in [TEMPERATURE_MIN, TEMPERATURE_MAX]; divides the logits
    top_k: int = 0  # keep the k most likely characters (0: all)
    top_p: float = 1.0  # in [TOP_P_MIN, 1]: keep the smallest set with this much probability (1: all)
    greedy: bool = False  # always the most likely character (ignores the rest)

    def check(self) -> Knobs:
        """self, or a UsageError naming the option whose value is out of range (NaN included)."""
        t, p = self.temperature, self.top_p
        if not (isinstance(t, (int, float, np.floating)) and TEMPERATURE_MIN <= t <= TEMPERATURE_MAX):
            raise UsageError(f"{option('temperature', t)}: must be a number from {TEMPERATURE_MIN:g} to "
                             f"{TEMPERATURE_MAX:g} (for a temperature near 0, use {option('greedy')})")
        if not (isinstance(p, (int, float, np.floating)) and TOP_P_MIN <= p <= 1):
            raise UsageError(f"{option('top_p', p)}: must be a number from {TOP_P_MIN:g} to 1 "
                             f"(for a top-p near 0, use {option('greedy')})")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise UsageError(f"{option('top_k', k)}: must be a whole number >= 1 (None or 0: no limit)")
        return self


def stream_bytes(spec: Spec, itemsize: int, length: int = 0) -> int:
    """Bytes one stream of a batch holds while generating: two copies of its state per layer,
    each layer's product, the logits and pick's (V,) temporaries, and `length` kept characters."""
    G = len(spec.unit.gates)
    work = 2 * spec.L * spec.state_size + (spec.L + 2) * G * spec.H + 12 * spec.V
    return itemsize * work + 8 * spec.V + 128 + HELD_CHAR_BYTES * length


def max_streams(spec: Spec, itemsize: int, length: int = 0) -> int:
    """The most streams generated at once within STREAMS_BUDGET (at least 1)."""
    return max(1, STREAMS_BUDGET // stream_bytes(spec, itemsize, length))


def check_streams(spec: Spec, itemsize: int, n: int, length: int = 0) -> None:
    """A UsageError naming the limit when n streams (keeping `length` characters each) would hold
    more than STREAMS_BUDGET bytes: refused up front, never a MemoryError halfway."""
    limit = max_streams(spec, itemsize, length)
    if n > limit:
        per = stream_bytes(spec, itemsize, length)
        raise UsageError(f"{option('num_samples', n)}: at most {limit:,} samples of {option('length', f'{length:,}')} "
                         f"from this model at once (each holds about {per / 1024:,.1f} KiB, {STREAMS_BUDGET >> 20} MiB "
                         f"in all); draw fewer at a time, each with its own seed")


def _unusable() -> NumericalError:
    """The model's next-character distribution is not finite, or has no mass outside the banned symbol."""
    return NumericalError("the model's next-character distribution is not finite (overflowing weights?) or puts all "
                         "its mass on the unknown symbol; nothing was emitted: score the checkpoint to see whether it is usable")


def pick(logits, u, knobs: Knobs):
    """Characters (n,) from logits (n, V) already divided by the temperature and uniforms u (n,).

    Inverse CDF: the first index whose cumulative probability exceeds u * total. Characters a
    filter removed have zero probability, so the cumulative sum does not rise at them and
    they are never chosen. Logits may hold -inf (a banned character, which is never drawn); a row
    whose maximum is not finite (a NaN, an overflow, or nothing but banned characters) raises.
    """
    if knobs.greedy:
        idx = logits.argmax(axis=1)  # the first NaN of a row with one; a banned -inf only if all are
        if not _all_finite(logits[0, idx[0]] if len(idx) == 1 else logits[np.arange(len(idx)), idx]):
            raise _unusable()
        return idx
    top = logits.max(axis=1, keepdims=True)  # (n, 1): NaN for a row holding one
    if not _all_finite(top):  # checked first, so no NaN arithmetic (and no warning) follows
        raise _unusable()
    p = logits - top  # (n, V): exp stays <= 1, and the max gives exp(0) = 1
    np.exp(p, out=p)
    V = p.shape[1]
    if 0 < knobs.top_k < V:
        kth = np.partition(p, V - knobs.top_k, axis=1)[:, V - knobs.top_k, None]  # (n, 1)
        p[p < kth] = 0
    if knobs.top_p < 1:
        order = np.argsort(-p, axis=1)  # (n, V) most likely first
        sp = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sp, axis=1) - sp  # mass of the more likely characters
        keep = knobs.top_p * sp.sum(axis=1, keepdims=True)  # > 0 for checked knobs: the top one always stays
        if not (keep > 0).all():
            raise _unusable()
        sp[before >= keep] = 0
        np.put_along_axis(p, order, sp, axis=1)
    cdf = np.cumsum(p, axis=1)  # (n, V), each row's total >= 1
    if len(cdf) == 1:  # one stream: a binary search is cheaper than comparing the whole row
        i = int(cdf[0].searchsorted(u[0] * cdf[0, -1], side="right"))
        return np.array([i if i < V else _last_kept(p[0])])
    idx = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1)  # count of entries <= the target
    over = idx >= V  # u * total < total for u < 1, so only a caller's u >= 1 gets here:
    if over.any():  # the last character with any mass, never a banned or filtered one
        idx[over] = [_last_kept(row) for row in p[over]]
    return idx


def _all_finite(a) -> bool:
    """Whether every value of a (a scalar or an array) is finite; plain float tests for a single
    value, which is the one-stream case and cheaper than a numpy call per character."""
    if not isinstance(a, np.ndarray):
        return math.isfinite(a)
    if a.size == 1:
        return math.isfinite(a.item())
    return bool(np.isfinite(a).all())


def _last_kept(p_row) -> int:
    """Index of the last entry of p_row (V,) with probability above 0."""
    return int(len(p_row) - 1 - (p_row[::-1] > 0).argmax())


class _Net(NamedTuple):
    """Per-layer arrays for single-step inference, prepared once per generation."""

    spec: Spec
    layers: list  # per layer: the layer's parameters by suffix (the cell's step reads its extras)
    table0: object  # (V, G*H): W_xh^T + b_h of layer 0, gathered by row
    plans: list  # [ops.Product] of W_hh for the layers below the top
    top: ops.Product  # plan for [W_hh of the top layer ; W_ho / temperature] (G*H + V, H): one call
    # gives the top's recurrent term and the logits
    b_out: object  # (V,) = b_o / temperature, -inf for the unknown symbol so it is never drawn


def _prepare(spec: Spec, params: dict, temperature: float, banned: int, n: int) -> _Net:
    """Tables for _step. The top layer's recurrent matrix and the output matrix are stacked: one
    product W_top h_t gives the recurrent term of step t + 1 and the logits of position t
    (one BLAS call fewer per character, which is what a sampler's time goes to: 32 streams of a
    512-unit model spent 30% of each step in the separate head call). Its product is written
    feature-major from H = ops.FEATURE_MAJOR_MIN_H on, for the reasons in ops.Product."""
    t = params["out.W_ho"].dtype.type(1.0 / temperature)
    b_out = params["out.b_o"] * t
    if banned >= 0:
        b_out[banned] = -np.inf
    layers = [layer_params(params, l, "fwd") for l in range(spec.L)]
    fm = ops.feature_major(spec.H)
    W_top = np.concatenate([layers[-1]["W_hh"], params["out.W_ho"] * t], axis=0)  # (G*H + V, H)
    return _Net(spec, layers, ops.row_table(layers[0]["W_xh"], layers[0]["b_h"]),
                [ops.product(p["W_hh"], n, fm) for p in layers[:-1]], ops.product(W_top, n, fm), b_out)


def _step(net: _Net, c, s: list, spare: list, z):
    """Advance every layer by one character c (n,); returns the logits (n, V) of the next one and
    the top product z for the next step.

    z (n, G*H + V) is the top layer's product from the previous step: its first G*H columns are
    the top layer's recurrent term for this step, its last V columns plus b_out the logits.
    Layers swap their state and spare buffers, so only the logits are allocated per step.
    """
    spec, H = net.spec, net.spec.H
    GH = len(spec.unit.gates) * H
    pre = np.take(net.table0, c, axis=0)  # (n, G*H)
    for l in range(spec.L):
        rec = z[:, :GH] if l == spec.L - 1 else ops.times(net.plans[l], s[l][:, :H])  # (n, G*H)
        spec.unit.step(s[l], pre, rec, net.layers[l], spare[l])
        s[l], spare[l] = spare[l], s[l]
        if l < spec.L - 1:
            p = net.layers[l + 1]
            pre = s[l][:, :H] @ p["W_xh"].T + p["b_h"]  # (n, G*H): input term of layer l + 1
    z = ops.times(net.top, s[-1][:, :H])  # (n, G*H + V)
    return z[:, GH:] + net.b_out, z  # (n, V) logits, a new row-major array


def check_objective(spec: Spec, infill: bool) -> None:
    """A UsageError unless the request fits the model: generating left to right needs a next-char
    model, filling gaps (infill) a bidirectional (cloze) one."""
    if spec.bidirectional and not infill:
        raise UsageError("this is a bidirectional (cloze) checkpoint: it fills gaps and cannot generate left to right; "
                         f"use {option('infill', 'TEMPLATE')} (e.g. {option('infill', 'to be or __ to be')})")
    if infill and not spec.bidirectional:
        raise UsageError(f"{option('infill')} needs a bidirectional (cloze) checkpoint; this one is a next-char model")


def check_known(vocab: Vocab, text: str, what: str = "prime") -> None:
    """A UsageError naming the characters of text (given as option `what`) that the model cannot
    read: those outside its vocabulary when it has no unknown symbol to map them to."""
    unknown = vocab.unknown_chars(text)
    if unknown and vocab.unk is None:
        raise UsageError(f"{option(what)} has characters the model does not know: {''.join(unknown)!r}; "
                         "remove them (this model has no unknown symbol)")


def generate_ids(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, n: int = 1,
                 prime: str = "", knobs: Knobs = Knobs()) -> Iterator[np.ndarray]:
    """An iterator over `length` steps, each the ids (n,) of the next character of each stream.

    The prime text (default: a newline, or the first vocabulary character) is read first; its
    characters must be in the vocabulary or map to the unknown symbol. The request is checked
    here, before anything runs: a cloze model, knobs out of range, or more streams than
    STREAMS_BUDGET allows (counting the characters a caller keeps when n > 1) raise UsageError.
    """
    check_objective(spec, infill=False)
    knobs.check()
    check_streams(spec, params["out.W_ho"].dtype.itemsize, n, length if n > 1 else 0)
    return _generate_ids(spec, params, vocab, length, rng, n, prime, knobs)


def _generate_ids(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, n: int,
                  prime: str, knobs: Knobs) -> Iterator[np.ndarray]:
    start = prime or ("\n" if "\n" in vocab.chars else vocab.chars[0])
    ids = vocab.encode(start, on_unknown="unk").astype(np.intp)  # (P,)
    s = prime_state(spec, params, ids[:-1], n)
    net, spare = _prepare(spec, params, knobs.temperature, vocab.unk_id, n), [a.copy() for a in s]
    z = ops.times(net.top, s[-1][:, :spec.H])  # the top's recurrent term for step 1
    c = np.full(n, ids[-1], dtype=np.intp)
    # the uniforms of step i are row i of one (length, n) draw whatever the rows per call, so
    # bounding the block for many streams changes no text; UNIFORM_BLOCK rows while that fits
    rows = max(1, min(UNIFORM_BLOCK, UNIFORM_MAX // n))
    for i in range(length):
        if i % rows == 0:
            uniforms = rng.random((rows, n))
        logits, z = _step(net, c, s, spare, z)
        c = pick(logits, uniforms[i % rows], knobs)
        yield c


def prime_state(spec: Spec, params: dict, ids, n: int) -> list:
    """The forward tower's state [(n, k*H)] * L after reading ids (P,), the same for each of n
    streams: read once by one stream, PRIME_CHUNK characters per call carrying the state (each
    call's caches are dropped with it), then repeated n times. Memory: O(PRIME_CHUNK + n), not O(n P)."""
    s = zero_state(spec, 1, params["out.W_ho"].dtype)["fwd"]
    for a in range(0, len(ids), PRIME_CHUNK):
        _, s, _ = tower_forward(spec, params, "fwd", ids[a:a + PRIME_CHUNK, None], s, None)  # ids (S, 1) time-major
    return [np.repeat(layer, n, axis=0) for layer in s]


def generate(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, n: int = 1,
             prime: str = "", knobs: Knobs = Knobs()) -> Iterator[list]:
    """generate_ids as characters: for each step, the list of n new characters."""
    chars = vocab.chars
    return ([chars[j] for j in c.tolist()] for c in generate_ids(spec, params, vocab, length, rng, n, prime, knobs))


def text_pieces(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, prime: str = "",
                knobs: Knobs = Knobs(), stop: str | None = None) -> Iterator[str]:
    """One sample as it is generated: the prime with the first character, then one character at
    a time (the prime alone when length is 0), ending after the generated text first ends with
    `stop` (the prime is not searched). Joined, the pieces are the sample.

    The request is checked before this returns (check_known on the prime, then generate_ids's
    checks), so a refused request yields nothing; the prime travels with the first character, so
    a model that fails at its first step has yielded nothing either.
    """
    check_known(vocab, prime)
    return _pieces(generate(spec, params, vocab, length, rng, 1, prime, knobs), prime, stop)


def _pieces(steps: Iterator[list], prime: str, stop: str | None) -> Iterator[str]:
    pending, tail = prime, ""
    for chars in steps:
        yield pending + chars[0]
        pending = ""
        if stop:
            tail = (tail + chars[0])[-len(stop):]
            if tail == stop:
                return
    if pending:
        yield pending


def sample_texts(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, n: int,
                 prime: str = "", knobs: Knobs = Knobs(), stop: str | None = None) -> list[str]:
    """n samples generated as one batch, each the prime and its generated text, that text cut
    after it first ends with `stop`. Checked as text_pieces is."""
    check_known(vocab, prime)
    steps = generate(spec, params, vocab, length, rng, n, prime, knobs)
    texts, done = [[] for _ in range(n)], [False] * n
    for chars in steps:
        for i, ch in enumerate(chars):
            if not done[i]:
                texts[i].append(ch)
                done[i] = bool(stop) and "".join(texts[i][-len(stop):]) == stop
        if all(done):
            break
    return [prime + "".join(t) for t in texts]


def sample_text(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, prime: str = "",
                knobs: Knobs = Knobs(), stop: str | None = None) -> str:
    """One sample as a string (prime included), cut after the first `stop` string if given."""
    return "".join(text_pieces(spec, params, vocab, length, rng, prime, knobs, stop))


# ---- gap filling with a cloze model ----------------------------------------------------------------

def infill(spec: Spec, params: dict, vocab: Vocab, template: str, rng: np.random.Generator, mask: str = "_",
           seq_len: int = 64, knobs: Knobs = Knobs(), sweeps: int = 3) -> str:
    """Replace every `mask` character of template using the text on both sides.

    Each gap is predicted from a window of up to seq_len - 1 characters on each side (the
    contexts the model saw in training), gaps visited left to right. Gaps not yet filled hold
    a placeholder (a space, if in the vocabulary); later sweeps re-predict every gap given the
    current fill of all the others (Gibbs-style), so each gap ends up conditioned on both sides.
    """
    check_objective(spec, infill=True)
    knobs.check()
    gaps = [i for i, ch in enumerate(template) if ch == mask]
    ids = vocab.encode(template.replace(mask, " " if " " in vocab.chars else vocab.chars[0]),
                       on_unknown="unk").astype(np.intp)
    reach = max(1, seq_len - 1)
    draws = rng.random(max(1, sweeps) * len(gaps))
    for k, t in enumerate(g for _ in range(max(1, sweeps)) for g in gaps):
        lo, hi = max(0, t - reach), min(len(ids), t + reach + 1)
        logits, _, _ = forward(spec, params, ids[None, lo:hi])  # (hi-lo, V): row j predicts position lo+j
        row = logits[t - lo : t - lo + 1] / knobs.temperature
        if vocab.unk is not None:
            row[:, vocab.unk_id] = -np.inf
        ids[t] = pick(row, draws[k : k + 1], knobs)[0]
    out = list(template)  # every character but the gaps is kept as written, even unknown ones
    for t in gaps:
        out[t] = vocab.chars[ids[t]]
    return "".join(out)
