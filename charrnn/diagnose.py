"""Vanishing and exploding gradients, made visible: spectral norms and the gradient-flow profile.

Shape legend as in ops.py: N windows (batch), T time, V vocab, H hidden, L layers, S steps a
tower runs (T for next-char towers, T-1 for cloze towers).

The theory (Bengio et al. 1994; Pascanu, Mikolov & Bengio 2013, "On the difficulty of training
recurrent neural networks"): going back one step multiplies the gradient at h_t by the Jacobian
dh_t/dh_{t-1} = diag(tanh'(a_t)) W_hh, so after k steps its norm is bounded by
(sigma_max(W_hh) * max tanh')^k. Below 1 the gradient of a distant loss vanishes
geometrically, above 1 it can explode; global-norm clipping is the cure for the second.

This module measures both sides of that statement:
  * spectral_norms(params): sigma_max of every W_hh, logged at each evaluation by the trainer;
  * gradient_flow / profile: for a loss at the last position of a window, ||dL/dh_t|| at every
    earlier step t of every layer, averaged over K windows, and the per-step factor fitted to it.
Everything here is a pure function of its arguments; cli.py prints the tables.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from charrnn import model, ops
from charrnn.errors import DataError

EXACT_SVD_MAX = 1024  # above this H an SVD per evaluation stops being cheap: use power iteration


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


def recurrent_layers(params: dict) -> list[str]:
    """Names 'layers.{l}.{d}' of every recurrent layer, in parameter order."""
    return [k[: -len(".W_hh")] for k in params if k.endswith(".W_hh")]


def spectral_norms(params: dict) -> dict:
    """{'layers.0.fwd': sigma_max(W_hh), ...} for every recurrent layer."""
    return {name: spectral_norm(params[name + ".W_hh"]) for name in recurrent_layers(params)}


def grad_health(params: dict, acc: dict) -> dict:
    """The gradient-health fields of an evaluation record.

    acc sums the steps since the previous evaluation (the trainer's eval accumulator):
    steps, clipped, finite, norm_sum, norm_max (pre-clip global L2 norms of finite steps).
    """
    steps, finite = acc.get("steps", 0), acc.get("finite", 0)
    return {"w_hh_sigma": spectral_norms(params),
            "grad_norm_mean_since_eval": acc["norm_sum"] / finite if finite else None,
            "grad_norm_max_since_eval": acc.get("norm_max") if finite else None,
            "clip_frac_since_eval": acc.get("clipped", 0) / steps if steps else None,
            "steps_since_eval": steps}


# ---- gradient flow through time ----------------------------------------------------------------

def hidden_grads(dh, dpre, dh0, W_hh):
    """Total gradient at every state of one layer, from what ops.rnn_backward returned.

    Inputs:  dh (S, N, H) upstream gradient at h_1..h_S (the one given to rnn_backward);
             dpre (S, N, H), dh0 (N, H) its outputs; W_hh (H, H)
    Returns: dhs (S+1, N, H), dhs[t] = dL/dh_t including the part through later steps

    rnn_backward keeps only dh0 of the through-time gradients; each one is dpre[t] W_hh (the
    gradient reaching h_t through step t+1), so one batched product restores them all.
    """
    xp = ops.array_module(dh)
    S, N, H = dh.shape
    dhs = xp.zeros((S + 1, N, H), dtype=dh.dtype)  # (S+1, N, H)
    dhs[1:] = dh  # upstream, from the head or the layer above
    dhs[:S] += dpre @ W_hh  # (S, N, H) through time: dpre[t] W_hh reaches h_t
    assert np.allclose(dhs[0], dh0), "hidden_grads disagrees with rnn_backward's dh0"
    return dhs


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


def _tower_grads(dh_top, d: str, layer_caches, params, edge=None) -> dict:
    """Walk one tower top-down as model.tower_backward does, keeping every state's gradient.

    Inputs: dh_top (S, N, H) reaching h_1..h_S of the top layer; edge (N, H) or None: what the
    head reads from the top layer's h_0 directly (cloze models).
    Returns {'layers.{l}.{d}': (dhs (S+1, N, H), hs (S+1, N, H))}, both indexed by t.
    """
    out, dh = {}, dh_top
    for l in range(len(layer_caches) - 1, -1, -1):
        in_cache, rnn_cache, _ = layer_caches[l]
        dpre, dh0, _ = ops.rnn_backward(dh, rnn_cache)
        dhs = hidden_grads(dh, dpre, dh0, params[f"layers.{l}.{d}.W_hh"])  # (S+1, N, H)
        if edge is not None and l == len(layer_caches) - 1:
            dhs[0] += edge
        out[f"layers.{l}.{d}"] = (dhs, rnn_cache.hs)
        if l > 0:
            S, N, H = dpre.shape
            dinp, _, _ = ops.affine_backward(dpre.reshape(S * N, H), in_cache)
            dh = dinp.reshape(S, N, -1)  # (S, N, H) gradient reaching layer l-1's outputs
    return out


def state_grads(params: dict, x, y=None, h0: dict | None = None) -> dict:
    """dL/dh_t at every state of every layer, for a loss at the last position of each window.

    Inputs:  x (N, T) ids; y (N, T) next-char targets (None for cloze models); h0 as in
             model.forward (None: zeros). Computed in float64, without dropout.
    Returns: {'layers.{l}.{d}': (dhs (S+1, N, H), hs (S+1, N, H))} in the tower's own time,
             hs[0] the initial state; L is each window's own loss (not averaged over windows).

    "Last position" is in each tower's own time: the forward tower's loss is the last
    character's, the backward tower's (of a cloze model) the first character's, whose head
    reads g_2, the backward tower's final state. Either way the loss reads hs[S] of the top layer.
    """
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    spec = model.spec_of(params)
    if spec.bidirectional != (y is None):
        raise ValueError("next-char models need targets y; cloze models take y=None")
    N, T = x.shape
    logits, _, cache = model.forward(params, x, h0)  # (T*N, V)
    flat_y = model.targets(x, y)  # (T*N,) time-major, like the logits' rows
    grads = {}
    for i, d in enumerate(spec.dirs):
        position = T - 1 if d == "fwd" else 0
        dlogits = _last_position_dlogits(logits, flat_y, position * N + np.arange(N))
        dfeats, _, _ = ops.affine_backward(dlogits, cache.head)
        dside = dfeats.reshape(T, N, -1)[:, :, i * spec.H:(i + 1) * spec.H]  # (T, N, H) this direction
        if spec.bidirectional:  # tower order and the one-step shift, as in model.backward
            dside = dside if d == "fwd" else dside[::-1]
            grads.update(_tower_grads(dside[1:], d, cache.towers[d], params, edge=dside[0]))
        else:
            grads.update(_tower_grads(dside, d, cache.towers[d], params))
    return {name: grads[name] for name in recurrent_layers(params)}


def gradient_flow(params: dict, x, y=None, h0: dict | None = None) -> dict:
    """Per layer: (norms (S+1, N) of dL/dh at distance k = S - t from the loss, mean tanh',
    root-mean-square tanh').

    Inputs as in state_grads. Distance 0 is the state the loss reads; the tanh' statistics are
    over the layer's steps t = 1..S, units and windows, from the outputs: tanh' = 1 - h_t^2.
    """
    flow = {}
    for name, (dhs, hs) in state_grads(params, x, y, h0).items():
        norms = np.linalg.norm(dhs, axis=2)[::-1]  # (S+1, N) reversed: index = distance
        tanh_prime = 1.0 - hs[1:] ** 2  # (S, N, H)
        flow[name] = (norms, float(np.mean(tanh_prime)), float(np.sqrt(np.mean(tanh_prime ** 2))))
    return flow


# ---- the profile over K windows ------------------------------------------------------------------

class LayerFlow(NamedTuple):
    norms: np.ndarray  # (S+1,) mean over windows of ||dL/dh|| at distance k = 0..S
    factor: float  # fitted per-step factor: exp(slope of ln norm vs distance); nan if unfittable
    sigma: float  # sigma_max(W_hh)
    tanh_prime: float  # mean tanh' over the layer's steps, units and windows
    tanh_rms: float  # root-mean-square tanh': sigma * tanh_rms is the mean-field per-step factor


class Profile(NamedTuple):
    layers: dict  # 'layers.{l}.{d}' -> LayerFlow
    windows: int  # K
    length: int  # T characters per window
    objective: str  # "next-char" or "cloze"


def windows(ids, K: int, T: int, bidirectional: bool):
    """K windows of T characters at evenly spaced starts over ids (deterministic, no Generator).

    Returns x (K, T) and y (K, T) shifted by one (next-char), or x and None (cloze).
    """
    need = T if bidirectional else T + 1
    n = len(ids)
    if n < need:
        raise DataError(f"the text has {n} characters; windows of {T} need at least {need} "
                        f"(lower --length to at most {max(1, n - (0 if bidirectional else 1))})")
    starts = np.unique(np.linspace(0, n - need, K).round().astype(np.int64))  # (K',) K' <= K
    w = np.asarray(ids[starts[:, None] + np.arange(need)], dtype=np.intp)  # (K', need)
    return (w, None) if bidirectional else (w[:, :T], w[:, 1:])


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


def profile(params: dict, ids, K: int, T: int) -> Profile:
    """Gradient-flow profile of a model on K windows of T characters from ids."""
    spec = model.spec_of(params)
    x, y = windows(ids, K, T, spec.bidirectional)
    sigmas = spectral_norms(params)
    layers = {}
    for name, (norms, tanh_prime, tanh_rms) in gradient_flow(params, x, y).items():
        mean = norms.mean(axis=1)  # (S+1,) mean over windows
        layers[name] = LayerFlow(mean, fit_factor(mean), sigmas[name], tanh_prime, tanh_rms)
    return Profile(layers, len(x), T, spec.objective)


def profile_dict(prof: Profile) -> dict:
    """A JSON-ready form of a Profile."""
    nan_none = lambda v: None if not math.isfinite(v) else v  # noqa: E731
    return {"windows": prof.windows, "length": prof.length, "objective": prof.objective,
            "layers": {name: {"mean_grad_norm": [nan_none(float(v)) for v in f.norms], "factor_per_step": nan_none(f.factor),
                              "sigma_max_w_hh": f.sigma, "mean_tanh_prime": f.tanh_prime,
                              "rms_tanh_prime": f.tanh_rms}
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


Q = "'"  # a prime, for the tanh' headers


def format_profile(prof: Profile, max_rows: int = 65) -> str:
    """The diagnose table: distance vs mean ||dL/dh|| (and log10) per layer, then one line per
    layer with sigma_max(W_hh), mean tanh' and the fitted per-step factor."""
    names = list(prof.layers)
    S = len(next(iter(prof.layers.values())).norms) - 1
    stride = max(1, math.ceil((S + 1) / max_rows))
    rows = sorted(set(range(0, S + 1, stride)) | {S})
    head = "distance" + "".join(f"  {name:>21}" for name in names)
    sub = " " * 8 + "".join(f"  {'mean |dL/dh|':>13} {'log10':>7}" for _ in names)
    lines = [f"gradient flow: loss at the last position of {prof.windows} windows of {prof.length} characters "
             f"({prof.objective}); mean over windows of ||dL/dh_t||, distance = steps back from that position",
             "", head, sub]
    for k in rows:
        lines.append(f"{k:8d}" + "".join(f"  {prof.layers[n].norms[k]:13.3e} {_log10(prof.layers[n].norms[k])}"
                                         for n in names))
    lines += ["", f"{'layer':<14} {'sigma_max(W_hh)':>15} {'mean tanh' + Q:>10} {'rms tanh' + Q:>9} "
                  f"{'sigma*rms':>9} {'fitted factor/step':>18}  verdict"]
    for n, f in prof.layers.items():
        lines.append(f"{n:<14} {f.sigma:15.4f} {f.tanh_prime:10.4f} {f.tanh_rms:9.4f} {f.sigma * f.tanh_rms:9.4f} "
                     f"{f.factor:18.4f}  {_verdict(f.factor)}")
    lines += ["", "One step back multiplies the gradient by diag(tanh') W_hh, so its norm changes by at most "
                  "sigma_max * max tanh' per step;",
              "for W_hh = s * orthogonal it changes by s * ||tanh' * g|| / ||g||, about s * rms tanh' "
              "(Pascanu et al. 2013; Pennington et al. 2017)."]
    return "\n".join(lines)
