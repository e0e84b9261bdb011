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
from charrnn.model import Spec, forward, layer_params, zero_state
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


def generate_ids(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, n: int = 1,
                 prime: str = "", knobs: Knobs = Knobs()) -> Iterator[np.ndarray]:
    """Yield, for each of `length` steps, the ids (n,) of the next character of each stream.

    The prime text (default: a newline, or the first vocabulary character) is read first; its
    characters must be in the vocabulary or map to the unknown symbol.
    """
    if spec.bidirectional:
        raise UsageError("this is a bidirectional (cloze) checkpoint: it fills gaps and cannot generate left to right; "
                         "use --infill TEMPLATE (e.g. --infill 'to be or __ to be')")
    start = prime or ("\n" if "\n" in vocab.chars else vocab.chars[0])
    ids = np.tile(vocab.encode(start, on_unknown="unk").astype(np.intp), (n, 1))  # (n, P)
    if ids.shape[1] > 1:  # the prime minus its last character, in one batched forward pass
        _, s0, _ = forward(spec, params, ids[:, :-1])
        s = [np.array(a) for a in s0["fwd"]]
    else:
        s = zero_state(spec, n, params["out.W_ho"].dtype)["fwd"]
    net, spare = _prepare(spec, params, knobs.temperature, vocab.unk_id, n), [a.copy() for a in s]
    z = ops.times(net.top, s[-1][:, :spec.H])  # the top's recurrent term for step 1
    c = ids[:, -1]
    for i in range(length):
        if i % UNIFORM_BLOCK == 0:
            uniforms = rng.random((UNIFORM_BLOCK, n))
        logits, z = _step(net, c, s, spare, z)
        c = pick(logits, uniforms[i % UNIFORM_BLOCK], knobs)
        yield c


def generate(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, n: int = 1,
             prime: str = "", knobs: Knobs = Knobs()) -> Iterator[list]:
    """generate_ids as characters: for each step, the list of n new characters."""
    chars = vocab.chars
    for c in generate_ids(spec, params, vocab, length, rng, n, prime, knobs):
        yield [chars[j] for j in c.tolist()]


def sample_text(spec: Spec, params: dict, vocab: Vocab, length: int, rng: np.random.Generator, prime: str = "",
                knobs: Knobs = Knobs(), stop: str | None = None) -> str:
    """One sample as a string (prime included), cut after the first `stop` string if given."""
    out = []
    for chars in generate(spec, params, vocab, length, rng, 1, prime, knobs):
        out.append(chars[0])
        if stop and stop in "".join(out[-len(stop):]):
            break
    return prime + "".join(out)


# ---- gap filling with a cloze model ----------------------------------------------------------------

def infill(spec: Spec, params: dict, vocab: Vocab, template: str, rng: np.random.Generator, mask: str = "_",
           seq_len: int = 64, knobs: Knobs = Knobs(), sweeps: int = 3) -> str:
    """Replace every `mask` character of template using the text on both sides.

    Each gap is predicted from a window of up to seq_len - 1 characters on each side (the
    contexts the model saw in training), gaps visited left to right. Gaps not yet filled hold
    a placeholder (a space, if in the vocabulary); later sweeps re-predict every gap given the
    current fill of all the others (Gibbs-style), so each gap ends up conditioned on both sides.
    """
    if not spec.bidirectional:
        raise UsageError("--infill needs a bidirectional (cloze) checkpoint; this one is a next-char model")
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
