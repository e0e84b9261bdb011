"""Vanishing and exploding gradients, made visible: spectral norms and the gradient-flow profile.

Shape legend as in ops.py: N windows (batch), T time, V vocab, H hidden, L layers, S steps a
tower runs (T for next-char towers, T-1 for cloze towers).

The theory (Bengio et al. 1994; Pascanu, Mikolov & Bengio 2013, "On the difficulty of training
recurrent neural networks"): going back one step multiplies the gradient at h_t by the cell's
Jacobian dh_t/dh_{t-1}; for the vanilla cell that is diag(tanh'(a_t)) W_hh, so after k steps its
norm is bounded by (sigma_max(W_hh) * max tanh')^k. Gated cells add a path whose factor is a
gate (the LSTM's forget gate on c, the GRU's update gate z on h), which is how they keep
gradients alive; their Jacobian is not diag(.) W_hh, so this module measures rather than bounds:
  * spectral_norms: sigma_max of every W_hh (of each gate block, for gated cells), logged at each
    evaluation by the trainer;
  * gradient_flow / profile: for a loss at the last position of a window, ||dL/dh_t|| at every
    earlier step t of every layer, averaged over K windows, the per-step factor fitted to it, and
    the cell's own statistic of its carry path (cells: carry_stats).
Everything here is a pure function of its arguments; cli.py prints the tables.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from charrnn import cells, dataset, model
from charrnn.errors import DataError, UsageError, option

EXACT_SVD_MAX = 1024  # above this H an SVD per evaluation stops being cheap: use power iteration
PROFILE_BUDGET = 256 << 20  # bytes one batch of windows may hold in the profile's float64 pass


# ---- spectral norms ----------------------------------------------------------------------------

def spectral_norm(W, iters: int = 200) -> float:
    """Largest singular value of a matrix W (H, H), in float64.

    Exact (numpy.linalg.norm(W, 2), an SVD) up to EXACT_SVD_MAX; beyond, power iteration on
    W^T W from a fixed-seed start, which converges from below at rate (sigma_2 / sigma_1)^2 per
    iteration. For a near-orthogonal W that rate is slow, but then every singular value is close
    to sigma_1 and so is the estimate.
    """
    W = np.asarray(W, dtype=np.float64)
    if max(W.shape) <= EXACT_SVD_MAX:
        return float(np.linalg.norm(W, 2))
    v = np.random.default_rng(0).standard_normal(W.shape[1])  # (H,) fixed seed: deterministic logs
    for _ in range(iters):
        v = W.T @ (W @ v)
        v /= np.linalg.norm(v)
    return float(np.linalg.norm(W @ v))


def recurrent_layers(spec: model.Spec) -> list[str]:
    """Names 'layers.{l}.{d}' of every recurrent layer, in parameter order."""
    return [f"layers.{l}.{d}" for l in range(spec.L) for d in spec.dirs]


def spectral_norms(spec: model.Spec, params: dict) -> dict:
    """sigma_max of W_hh per layer: {'layers.0.fwd': s} for rnn, {'layers.0.fwd.i': s, ...} per
    gate block for gated cells (one (H, H) block acts on each gate's pre-activation)."""
    return {name + ("." + label if label else ""): sigma
            for name in recurrent_layers(spec) for label, sigma in layer_spectra(spec, params, name).items()}


def layer_spectra(spec: model.Spec, params: dict, name: str) -> dict:
    """{label: sigma_max} of each block of layer name's W_hh ('' for the vanilla cell's whole W_hh)."""
    return {label: spectral_norm(W) for label, W in spec.unit.hh_blocks(params[name + ".W_hh"]).items()}


def grad_health(spec: model.Spec, params: dict, acc: dict) -> dict:
    """The gradient-health fields of an evaluation record.

    acc sums the steps since the previous evaluation (the trainer's eval accumulator):
    steps, clipped, finite, norm_sum, norm_max (pre-clip global L2 norms of finite steps).
    """
    steps, finite = acc.get("steps", 0), acc.get("finite", 0)
    return {"w_hh_sigma": spectral_norms(spec, params),
            "grad_norm_mean_since_eval": acc["norm_sum"] / finite if finite else None,
            "grad_norm_max_since_eval": acc.get("norm_max") if finite else None,
            "clip_frac_since_eval": acc.get("clipped", 0) / steps if steps else None,
            "steps_since_eval": steps}


# ---- gradient flow through time ----------------------------------------------------------------

def _last_position_dlogits(logits, y, rows):
    """Gradient of the per-window cross-entropy at the given rows only, zero elsewhere.

    Inputs: logits (T*N, V), y (T*N,) targets, rows (N,) one row per window.
    Each window's loss is its own (not averaged over windows), so a norm is per window.
    """
    p = logits[rows] - logits[rows].max(axis=1, keepdims=True)  # (N, V) stable softmax
    p = np.exp(p)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(rows)), y[rows]] -= 1.0
    dlogits = np.zeros_like(logits)  # (T*N, V)
    dlogits[rows] = p
    return dlogits


def state_grads(spec: model.Spec, params: dict, x, y=None, h0: dict | None = None) -> dict:
    """dL/dh_t at every state of every layer, for a loss at the last position of each window.

    Inputs:  x (N, T) ids; y (N, T) next-char targets (None for cloze models); h0 as in
             model.forward (None: zeros). Computed in float64, without dropout.
    Returns: {'layers.{l}.{d}': (dhs (S+1, N, H), cell cache)} in the tower's own time, dhs[0]
             at the initial state; L is each window's own loss (not averaged over windows).

    "Last position" is in each tower's own time: the forward tower's loss is the last
    character's, the backward tower's (of a cloze model) the first character's, whose head
    reads g_2, the backward tower's final state. Either way the loss reads hs[S] of the top layer.
    The gradients are the model's own backward pass (model.towers_backward with keep), so the
    cell's equations are stated only in the cell.
    """
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    if spec.bidirectional != (y is None):
        raise ValueError("next-char models need targets y; cloze models take y=None")
    N, T = x.shape
    logits, _, cache = model.forward(spec, params, x, h0)  # (T*N, V)
    flat_y = model.targets(x, y)  # (T*N,) time-major, like the logits' rows
    grads = {}
    for d in spec.dirs:
        position = T - 1 if d == "fwd" else 0
        dlogits = _last_position_dlogits(logits, flat_y, position * N + np.arange(N))
        _, dsides = model.head_backward(dlogits, cache)
        _, _, kept = model.towers_backward({d: dsides[d]}, cache, keep=True)
        for l, dhs in kept[d].items():
            grads[f"layers.{l}.{d}"] = (dhs, cache.towers[d][l].cell)
    return {name: grads[name] for name in recurrent_layers(spec)}


def gradient_flow(spec: model.Spec, params: dict, x, y=None, h0: dict | None = None) -> dict:
    """Per layer: (norms (S+1, N) of dL/dh at distance k = S - t from the loss, the cell's
    carry statistics {label: value} over the layer's steps, units and windows).

    Inputs as in state_grads. Distance 0 is the state the loss reads.
    """
    flow = {}
    for name, (dhs, cell_cache) in state_grads(spec, params, x, y, h0).items():
        norms = np.linalg.norm(dhs, axis=2)[::-1]  # (S+1, N) reversed: index = distance
        flow[name] = (norms, spec.unit.carry_stats(cell_cache))
    return flow


# ---- the profile over K windows ------------------------------------------------------------------

class LayerFlow(NamedTuple):
    """One layer's part of a Profile."""

    norms: np.ndarray  # (S+1,) mean over windows of ||dL/dh|| at distance k = 0..S
    factor: float  # fitted per-step factor: exp(slope of ln norm vs distance); nan if unfittable
    sigmas: dict  # sigma_max of W_hh ('' -> s for rnn) or of each gate block ('i' -> s, ...)
    stats: dict  # the cell's carry statistics, e.g. {"mean tanh'": .., "rms tanh'": ..} for rnn

    @property
    def sigma(self) -> float:
        """The largest of the block spectra (the whole W_hh's for the vanilla cell)."""
        return max(self.sigmas.values())


class Profile(NamedTuple):
    """The gradient-flow profile of a model on K windows (profile())."""

    cell: str  # rnn, lstm or gru
    layers: dict  # 'layers.{l}.{d}' -> LayerFlow
    windows: int  # K
    length: int  # T characters per window
    objective: str  # "next-char" or "cloze"


def _need(ids, T: int, bidirectional: bool) -> int:
    """Characters a window takes (T, or T + 1 for the shifted targets), checked against the text."""
    need = T if bidirectional else T + 1
    n = len(ids)
    if n < need:
        raise DataError(f"the text has {n} characters; windows of {T} need at least {need} "
                        f"(lower {option('length')} to at most {max(1, n - (0 if bidirectional else 1))})")
    return need


def window_count(ids, K: int, T: int, bidirectional: bool) -> int:
    """How many distinct windows K evenly spaced ones are: min(K, the text's distinct windows)."""
    return min(K, len(ids) - _need(ids, T, bidirectional) + 1)


def window_starts(n: int, K: int, need: int, lo: int = 0, hi: int | None = None):
    """Starts (hi - lo,) of windows lo..hi-1 of K evenly spaced over n characters, exactly as
    np.linspace(0, n - need, K).round() places them, without making all K of them.

    For K <= n - need + 1 the starts are distinct (a step of at least 1 between them)."""
    hi = K if hi is None else hi
    last = n - need
    starts = (np.arange(lo, hi, dtype=np.float64) * (last / (K - 1) if K > 1 else 0.0)).round().astype(np.int64)
    if hi == K and K > 1 and hi > lo:
        starts[-1] = last  # linspace ends exactly at its stop
    return starts


def _cut(ids, starts, T: int, bidirectional: bool):
    need = T if bidirectional else T + 1
    dataset.check_mapped(ids)  # a cache file truncated under us: one line, not SIGBUS
    w = np.asarray(ids[starts[:, None] + np.arange(need)], dtype=np.intp)  # (k, need)
    return (w, None) if bidirectional else (w[:, :T], w[:, 1:])


def windows(ids, K: int, T: int, bidirectional: bool):
    """K windows of T characters at evenly spaced starts over ids (deterministic, no Generator),
    or all the text's windows where it has fewer than K distinct ones.

    Returns x (K', T) and y (K', T) shifted by one (next-char), or x and None (cloze).
    """
    K = window_count(ids, K, T, bidirectional)
    return _cut(ids, window_starts(len(ids), K, _need(ids, T, bidirectional)), T, bidirectional)


def windows_per_batch(spec: model.Spec, T: int) -> int:
    """Windows of T characters state_grads runs at once within PROFILE_BUDGET; a UsageError naming
    the longest window that fits when not even one does."""
    per_window = (T + 1) * model.position_bytes(spec)
    if per_window > PROFILE_BUDGET:
        longest = PROFILE_BUDGET // model.position_bytes(spec) - 1
        raise UsageError(f"{option('length', T)}: at most {longest:,} characters per window for this model (each position "
                         f"holds about {model.position_bytes(spec) / 1024:,.1f} KiB; {PROFILE_BUDGET >> 20} MiB per batch)")
    return PROFILE_BUDGET // per_window


def fit_line(norms) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ln(norm) against distance k = 0, 1, ...

    Only finite, positive norms take part (an underflow to 0 has no logarithm); (nan, nan)
    when fewer than two remain.
    """
    norms = np.asarray(norms, dtype=np.float64)
    k = np.arange(len(norms), dtype=np.float64)
    ok = np.isfinite(norms) & (norms > 0)
    if ok.sum() < 2:
        return math.nan, math.nan
    slope, intercept = np.polyfit(k[ok], np.log(norms[ok]), 1)
    return float(slope), float(intercept)


def fit_factor(norms) -> float:
    """Per-step growth factor exp(slope): below 1 a vanishing gradient, above 1 an exploding one."""
    return math.exp(fit_line(norms)[0])


def profile(spec: model.Spec, params: dict, ids, K: int, T: int) -> Profile:
    """Gradient-flow profile of a model on K windows of T characters from ids.

    K is capped at the text's distinct windows (more would repeat them), and the windows run in
    batches of windows_per_batch, so memory stays bounded whatever K is; the norms' sums are
    exact across batches, the carry statistics are averaged over batches weighted by windows
    (exact for means and fractions; rms and geometric means are a batch-weighted mean of them).
    """
    if K < 1 or T < 1:
        raise UsageError(f"{option('windows', K)} and {option('length', T)}: both must be at least 1")
    K = window_count(ids, K, T, spec.bidirectional)
    need, batch = _need(ids, T, spec.bidirectional), windows_per_batch(spec, T)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}  # once, not per batch
    sums, stats = {}, {}
    for lo in range(0, K, batch):
        starts = window_starts(len(ids), K, need, lo, min(K, lo + batch))
        x, y = _cut(ids, starts, T, spec.bidirectional)
        for name, (norms, st) in gradient_flow(spec, params, x, y).items():
            sums[name] = sums[name] + norms.sum(axis=1) if name in sums else norms.sum(axis=1)  # (S+1,)
            stats.setdefault(name, []).append((len(starts), st))
    layers = {}
    for name, total in sums.items():
        mean = total / K  # (S+1,) mean over windows
        layers[name] = LayerFlow(mean, fit_factor(mean), layer_spectra(spec, params, name), _pool(stats[name], K))
    return Profile(spec.cell, layers, K, T, spec.objective)


def _pool(parts: list, K: int) -> dict:
    """Per-batch carry statistics [(windows, {label: value})] as one {label: value}, weighted by windows."""
    if len(parts) == 1:
        return parts[0][1]
    return {label: sum(w * st[label] for w, st in parts) / K for label in parts[0][1]}


def _finite_or_none(v):
    return None if not math.isfinite(v) else v


def profile_dict(prof: Profile) -> dict:
    """A JSON-ready form of a Profile. sigma_max_w_hh is the whole W_hh's (rnn) or the largest
    gate block's; sigma_max_w_hh_blocks names each block; carry_stats are the cell's own."""
    return {"cell": prof.cell, "windows": prof.windows, "length": prof.length, "objective": prof.objective,
            "layers": {name: {"mean_grad_norm": [_finite_or_none(float(v)) for v in f.norms],
                              "factor_per_step": _finite_or_none(f.factor), "sigma_max_w_hh": f.sigma,
                              "sigma_max_w_hh_blocks": f.sigmas, "carry_stats": f.stats}
                       for name, f in prof.layers.items()}}


# ---- text --------------------------------------------------------------------------------------

def _verdict(factor: float) -> str:
    if not math.isfinite(factor):
        return "no fit (gradients underflowed)"
    per_decade = abs(1.0 / math.log10(factor)) if factor != 1.0 else math.inf
    if per_decade > 1000:
        return "flat: neither vanishing nor exploding"
    if factor < 1:
        return f"vanishing: /10 every {per_decade:.1f} steps"
    return f"exploding: x10 every {per_decade:.1f} steps"


def _log10(v: float) -> str:
    return f"{math.log10(v):+7.2f}" if v > 0 and math.isfinite(v) else "   -inf"


def _layer_line(name: str, f: LayerFlow) -> str:
    """One layer's summary: spectra (per gate block for gated cells), carry statistics, fit."""
    sig = " ".join(f"{k}={v:.3f}" for k, v in f.sigmas.items()) if len(f.sigmas) > 1 else f"{f.sigma:.4f}"
    stats = "  ".join(f"{k} {v:.4f}" for k, v in f.stats.items())
    return f"{name:<14} sigma_max(W_hh) {sig}  {stats}  fitted factor/step {f.factor:.4f}  {_verdict(f.factor)}"


def format_profile(prof: Profile, max_rows: int = 65) -> str:
    """The diagnose table: distance vs mean ||dL/dh|| (and log10) per layer, then one line per
    layer with the spectra of W_hh, the cell's carry statistics and the fitted per-step factor."""
    names = list(prof.layers)
    S = len(next(iter(prof.layers.values())).norms) - 1
    stride = max(1, math.ceil((S + 1) / max_rows))
    rows = sorted(set(range(0, S + 1, stride)) | {S})
    head = "distance" + "".join(f"  {name:>21}" for name in names)
    sub = " " * 8 + "".join(f"  {'mean |dL/dh|':>13} {'log10':>7}" for _ in names)
    lines = [f"gradient flow ({prof.cell} cell): loss at the last position of {prof.windows} windows of {prof.length} "
             f"characters ({prof.objective}); mean over windows of ||dL/dh_t||, distance = steps back from that position",
             "", head, sub]
    for k in rows:
        lines.append(f"{k:8d}" + "".join(f"  {prof.layers[n].norms[k]:13.3e} {_log10(prof.layers[n].norms[k])}"
                                         for n in names))
    lines.append("")
    lines += [_layer_line(n, f) for n, f in prof.layers.items()]
    return "\n".join(lines + ["", cells.get(prof.cell).flow_note])


def format_comparison(named: list) -> str:
    """Side by side, one line per model and layer: how much of the gradient survives the window.

    named is [(label, Profile)]. 'kept' is ||dL/dh|| at the farthest distance over its value at
    distance 0, the fraction of the gradient signal that reaches the start of the window."""
    lines = ["comparison: mean ||dL/dh|| at distance 0 and at the farthest distance, and the fitted factor per step",
             f"{'model':<40} {'cell':<5} {'layer':<14} {'|dL/dh| d=0':>12} {'d=max':>10} {'kept':>10} {'factor/step':>12}"]
    for label, prof in named:
        for name, f in prof.layers.items():
            first, last = float(f.norms[0]), float(f.norms[-1])
            kept = last / first if first > 0 else math.nan
            lines.append(f"{label[-40:]:<40} {prof.cell:<5} {name:<14} {first:12.3e} {last:10.3e} {kept:10.2e} {f.factor:12.4f}")
    return "\n".join(lines)
