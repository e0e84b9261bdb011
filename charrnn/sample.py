"""Generating text: left-to-right sampling for next-char models, gap filling for cloze models.

Sampling draws one uniform number per character and stream and inverts the cumulative
distribution (no rng.choice per character, which is slow and re-normalizes). The same
Generator state therefore gives the same text. The unknown symbol is never emitted.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from charrnn import ops
from charrnn.errors import UsageError
from charrnn.model import forward, spec_of
from charrnn.vocab import Vocab

UNIFORM_BLOCK = 1024  # uniforms drawn per Generator call (per stream)


class Knobs(NamedTuple):
    temperature: float = 1.0  # > 0; divides the logits
    top_k: int = 0  # keep the k most likely characters (0: all)
    top_p: float = 1.0  # keep the smallest set with this much probability (1: all)
    greedy: bool = False  # always the most likely character (ignores the rest)


def pick(logits, u, knobs: Knobs):
    """Characters (n,) from logits (n, V) already divided by the temperature and uniforms u (n,).

    Inverse CDF: the first index whose cumulative probability exceeds u * total. Characters a
    filter removed have zero probability, so the cumulative sum does not rise at them and
    they are never chosen. Logits may hold -inf (a banned character).
    """
    if knobs.greedy:
        return logits.argmax(axis=1)
    p = logits - logits.max(axis=1, keepdims=True)  # (n, V): exp stays <= 1
    np.exp(p, out=p)
    V = p.shape[1]
    if 0 < knobs.top_k < V:
        kth = np.partition(p, V - knobs.top_k, axis=1)[:, V - knobs.top_k, None]  # (n, 1)
        p[p < kth] = 0
    if knobs.top_p < 1:
        order = np.argsort(-p, axis=1)  # (n, V) most likely first
        sp = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sp, axis=1) - sp  # mass of the more likely characters
        sp[before >= knobs.top_p * sp.sum(axis=1, keepdims=True)] = 0  # the top one always stays
        np.put_along_axis(p, order, sp, axis=1)
    cdf = np.cumsum(p, axis=1)  # (n, V)
    if len(cdf) == 1:  # one stream: a binary search is cheaper than comparing the whole row
        return np.minimum(cdf[0].searchsorted(u[0] * cdf[0, -1], side="right"), V - 1)[None]
    idx = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1)  # count of entries <= the target
    return np.minimum(idx, V - 1)


class _Net(NamedTuple):
    """Per-layer arrays for single-step inference, prepared once per generation."""

    table0: object  # (V, H): W_xh^T + b_h of layer 0, gathered by row
    upper: list  # [(W_xh, b_h)] for layers 1..L-1
    plans: list  # [ops.StepPlan] for the layers below the top
    W_top: object  # [W_hh of the top layer ; W_ho / temperature]: (H + V, H), or its transpose
    top_fm: bool  # True: W_top is (H + V, H) and its product is written feature-major
    b_out: object  # (V,) = b_o / temperature, -inf for the unknown symbol so it is never drawn


def _prepare(params: dict, temperature: float, banned: int, n: int) -> _Net:
    """Tables for _step. The top layer's recurrent matrix and the output matrix are stacked: one
    product W_top h_t gives the recurrent term of step t + 1 and the logits of position t
    (one BLAS call fewer per character, which is what a sampler's time goes to: 32 streams of a
    512-unit model spent 30% of each step in the separate head call). W_top is row-major and
    64-byte aligned; from H = ops.FEATURE_MAJOR_MIN_H on, its product is written feature-major,
    (H + V, n), for the reasons in ops.StepPlan (at H = 512: 147 vs 153 us a step for 32 streams,
    19.4 vs 20.2 us for one)."""
    spec = spec_of(params)
    t = params["out.W_ho"].dtype.type(1.0 / temperature)
    b_out = params["out.b_o"] * t
    if banned >= 0:
        b_out[banned] = -np.inf
    top = spec.L - 1
    stacked = np.concatenate([params[f"layers.{top}.fwd.W_hh"], params["out.W_ho"] * t], axis=0)  # (H + V, H)
    top_fm = ops.feature_major(spec.H)
    return _Net(ops.row_table(params["layers.0.fwd.W_xh"], params["layers.0.fwd.b_h"]),
                [(params[f"layers.{l}.fwd.W_xh"], params[f"layers.{l}.fwd.b_h"]) for l in range(1, spec.L)],
                [ops.step_plan(params[f"layers.{l}.fwd.W_hh"], n) for l in range(top)],
                ops.aligned_copy(stacked if top_fm else stacked.T), top_fm, b_out)


def _step(net: _Net, c, h: list, spare: list, z):
    """Advance every layer by one character c (n,); returns the logits (n, V) of the next one.

    z holds the top layer's product from the previous step, (H + V, n) feature-major or (n, H + V):
    its first H rows (columns) are the top layer's recurrent term for this step; the step
    overwrites z with the new product, whose last V rows (columns) plus b_out are the logits.
    Layers below the top swap h and spare buffers, so only the logits are allocated per step.
    """
    H = h[0].shape[1]
    inp = np.take(net.table0, c, axis=0)  # (n, H)
    for l in range(len(h) - 1):
        ops.rnn_step_forward(h[l], inp, net.plans[l], spare[l])
        h[l], spare[l] = spare[l], h[l]
        W, b = net.upper[l]
        inp = h[l] @ W.T + b  # (n, H): input term of layer l + 1
    top = h[-1]
    if net.top_fm:
        np.add(z[:H].T, inp, out=top)  # h_t = tanh(W_hh h_{t-1} + W_xh x_t + b_h) for the top layer
        np.tanh(top, out=top)
        np.matmul(net.W_top, top.T, out=z)  # (H + V, n)
        return z[H:].T + net.b_out  # (n, V) logits, a new row-major array
    np.add(z[:, :H], inp, out=top)  # the same, with z row-major
    np.tanh(top, out=top)
    np.matmul(top, net.W_top, out=z)  # (n, H + V)
    return z[:, H:] + net.b_out


def generate_ids(params: dict, vocab: Vocab, length: int, rng: np.random.Generator, n: int = 1,
                 prime: str = "", knobs: Knobs = Knobs()) -> Iterator[np.ndarray]:
    """Yield, for each of `length` steps, the ids (n,) of the next character of each stream.

    The prime text (default: a newline, or the first vocabulary character) is read first; its
    characters must be in the vocabulary or map to the unknown symbol.
    """
    spec = spec_of(params)
    if spec.bidirectional:
        raise UsageError("this is a bidirectional (cloze) checkpoint: it fills gaps and cannot generate left to right; "
                         "use --infill TEMPLATE (e.g. --infill 'to be or __ to be')")
    start = prime or ("\n" if "\n" in vocab.chars else vocab.chars[0])
    ids = np.tile(vocab.encode(start, on_unknown="unk").astype(np.intp), (n, 1))  # (n, P)
    if ids.shape[1] > 1:  # the prime minus its last character, in one batched forward pass
        _, h0, _ = forward(params, ids[:, :-1])
        h = [a.copy() for a in h0["fwd"]]
    else:
        h = [np.zeros((n, spec.H), dtype=params["out.W_ho"].dtype) for _ in range(spec.L)]
    net, spare = _prepare(params, knobs.temperature, vocab.unk_id, n), [a.copy() for a in h]
    z = net.W_top @ h[-1].T if net.top_fm else h[-1] @ net.W_top  # the top's recurrent term for step 1
    c = ids[:, -1]
    for i in range(length):
        if i % UNIFORM_BLOCK == 0:
            uniforms = rng.random((UNIFORM_BLOCK, n))
        c = pick(_step(net, c, h, spare, z), uniforms[i % UNIFORM_BLOCK], knobs)
        yield c


def generate(params: dict, vocab: Vocab, length: int, rng: np.random.Generator, n: int = 1,
             prime: str = "", knobs: Knobs = Knobs()) -> Iterator[list]:
    """generate_ids as characters: for each step, the list of n new characters."""
    chars = vocab.chars
    for c in generate_ids(params, vocab, length, rng, n, prime, knobs):
        yield [chars[j] for j in c.tolist()]


def sample_text(params: dict, vocab: Vocab, length: int, rng: np.random.Generator, prime: str = "",
                knobs: Knobs = Knobs(), stop: str | None = None) -> str:
    """One sample as a string (prime included), cut after the first `stop` string if given."""
    out = []
    for chars in generate(params, vocab, length, rng, 1, prime, knobs):
        out.append(chars[0])
        if stop and stop in "".join(out[-len(stop):]):
            break
    return prime + "".join(out)


# ---- gap filling with a cloze model ----------------------------------------------------------------

def infill(params: dict, vocab: Vocab, template: str, rng: np.random.Generator, mask: str = "_",
           seq_len: int = 64, knobs: Knobs = Knobs(), sweeps: int = 3) -> str:
    """Replace every `mask` character of template using the text on both sides.

    Each gap is predicted from a window of up to seq_len - 1 characters on each side (the
    contexts the model saw in training), gaps visited left to right. Gaps not yet filled hold
    a placeholder (a space, if in the vocabulary); later sweeps re-predict every gap given the
    current fill of all the others (Gibbs-style), so each gap ends up conditioned on both sides.
    """
    spec = spec_of(params)
    if not spec.bidirectional:
        raise UsageError("--infill needs a bidirectional (cloze) checkpoint; this one is a next-char model")
    gaps = [i for i, ch in enumerate(template) if ch == mask]
    ids = vocab.encode(template.replace(mask, " " if " " in vocab.chars else vocab.chars[0]),
                       on_unknown="unk").astype(np.intp)
    reach = max(1, seq_len - 1)
    draws = rng.random(max(1, sweeps) * len(gaps))
    for k, t in enumerate(g for _ in range(max(1, sweeps)) for g in gaps):
        lo, hi = max(0, t - reach), min(len(ids), t + reach + 1)
        logits, _, _ = forward(params, ids[None, lo:hi])  # (hi-lo, V): row j predicts position lo+j
        row = logits[t - lo : t - lo + 1] / knobs.temperature
        if vocab.unk is not None:
            row[:, vocab.unk_id] = -np.inf
        ids[t] = pick(row, draws[k : k + 1], knobs)[0]
    out = list(template)  # every character but the gaps is kept as written, even unknown ones
    for t in gaps:
        out[t] = vocab.chars[ids[t]]
    return "".join(out)
