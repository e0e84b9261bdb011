"""Clipping, update rules and the learning-rate schedule, over one flat parameter vector.

The trainer keeps every parameter as a named view into one contiguous float vector (torch-rnn's
single weight tensor idea), so clipping and the optimizer are a handful of whole-vector numpy
operations however many tensors the model has; the names still come from the one parameter
dict (model.param_shapes), and optimizer state is stored per name in checkpoints
(optim/<slot>/<name>). All updates are in place on the trainer's own arrays.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from charrnn.config import TrainConfig


class Layout(NamedTuple):
    """Where each named tensor lives inside the flat vector."""

    names: tuple
    shapes: tuple
    offsets: tuple  # start of each tensor; offsets[-1] is the total size

    @classmethod
    def of(cls, shapes: dict) -> Layout:
        sizes = [math.prod(s) for s in shapes.values()]
        return cls(tuple(shapes), tuple(shapes.values()), tuple(np.concatenate([[0], np.cumsum(sizes)]).tolist()))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def views(self, flat: np.ndarray) -> dict:
        """name -> view of flat with that tensor's shape (writes go through to flat)."""
        return {n: flat[a:b].reshape(s) for n, s, a, b in zip(self.names, self.shapes, self.offsets, self.offsets[1:])}

    def flatten(self, tensors: dict, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(tensors[n], dtype=dtype).reshape(-1) for n in self.names])

    def mask(self, predicate, dtype) -> np.ndarray:
        """Flat 0/1 vector: 1 for the entries of tensors whose name satisfies predicate."""
        return np.concatenate([np.full(math.prod(s), float(predicate(n)), dtype=dtype) for n, s in zip(self.names, self.shapes)])


# The state each update rule keeps, by slot name: init_state and _step use these names, and
# checkpoints store and accept exactly these (optim/<slot>/<name>, checkpoint._allowed_entries).
SLOTS = {"sgd": ("velocity",), "adagrad": ("sum_sq",), "rmsprop": ("mean_sq",), "adam": ("m", "v")}


def init_state(kind: str, size: int, dtype) -> dict:
    """Optimizer state: {slot: flat zeros}; the step count t lives with the trainer."""
    return {slot: np.zeros(size, dtype=dtype) for slot in SLOTS[kind]}


def global_norm(g: np.ndarray) -> float:
    """L2 norm of a flat vector. One BLAS dot in g's own precision; only if that overflows (a
    float32 gradient above ~1e19) is it redone in float64, so a huge but finite gradient is
    clipped rather than mistaken for a non-finite one."""
    with np.errstate(over="ignore"):
        sq = float(np.dot(g, g))
    if not math.isfinite(sq):
        g64 = g.astype(np.float64)
        sq = float(np.dot(g64, g64))
    return math.sqrt(sq)


def clip(g: np.ndarray, clip_norm: float, clip_value: float) -> tuple[float, bool]:
    """Clip the flat gradient in place. Returns (global L2 norm before clipping, whether clipped).

    clip_value clamps each element to [-v, v] (min-char-rnn, char-rnn); clip_norm rescales the
    whole vector to norm <= c (global-norm clipping, Pascanu et al. 2013). 0 disables either.
    """
    norm = global_norm(g)
    clipped = False
    if clip_value > 0 and math.isfinite(norm):
        clipped = bool(np.abs(g).max() > clip_value)
        np.clip(g, -clip_value, clip_value, out=g)
    if clip_norm > 0 and math.isfinite(norm):
        now = global_norm(g) if clipped else norm
        if now > clip_norm:
            g *= g.dtype.type(clip_norm / now)
            clipped = True
    return norm, clipped


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that turns step into step + 1: linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.decay_rate ** ((step - cfg.warmup_steps) // cfg.decay_every)
    # cosine from lr down to lr * lr_min_ratio over the steps after warm-up (Loshchilov & Hutter)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.lr * cfg.lr_min_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * progress))


def update(theta: np.ndarray, g: np.ndarray, state: dict, t: int, lr: float, cfg: TrainConfig,
           decay_mask: np.ndarray | None) -> bool:
    """One in-place update of theta from the (clipped) flat gradient g; t counts updates from 1.

    Returns False, leaving theta untouched, when the new parameters would not be finite (a
    learning rate so large that float32 overflows): a checkpoint must never hold Inf or NaN.
    Weight decay is decoupled (AdamW, Loshchilov & Hutter 2019): theta -= lr * wd * theta on
    weight matrices only, the same for every optimizer, so it does not depend on gradient scale.
    g is used as scratch space and is garbage afterwards.
    """
    delta = _step(g, state, t, lr, cfg, theta.dtype.type)  # what to subtract from theta
    if cfg.weight_decay > 0:
        delta += theta.dtype.type(lr * cfg.weight_decay) * theta * decay_mask
    np.subtract(theta, delta, out=delta)  # the new parameters, not yet committed
    if not np.isfinite(delta).all():
        return False
    np.copyto(theta, delta)
    return True


def _step(g: np.ndarray, state: dict, t: int, lr: float, cfg: TrainConfig, dt) -> np.ndarray:
    """The update vector of the chosen rule (a new array or g's buffer), advancing its state."""
    kind = cfg.optimizer
    if kind == "sgd":
        if cfg.momentum > 0:  # heavy ball: v = mu v + g
            v = state["velocity"]
            v *= dt(cfg.momentum)
            v += g
            g = v.copy()
        g *= dt(lr)
        return g
    if kind == "adagrad":  # Duchi et al. 2011: per-coordinate rate from the running sum of g^2
        s = state["sum_sq"]
        s += g * g
        denom = np.sqrt(s)
    elif kind == "rmsprop":  # Tieleman & Hinton 2012: running mean of g^2
        s = state["mean_sq"]
        s *= dt(cfg.rmsprop_decay)
        s += dt(1 - cfg.rmsprop_decay) * (g * g)
        denom = np.sqrt(s)
    else:  # adam, Kingma & Ba 2015, with the bias corrections folded into the step size
        m, v = state["m"], state["v"]
        m *= dt(cfg.beta1)
        m += dt(1 - cfg.beta1) * g
        v *= dt(cfg.beta2)
        g *= g
        g *= dt(1 - cfg.beta2)
        v += g
        denom = np.sqrt(v)
        denom *= dt(1 / math.sqrt(1 - cfg.beta2 ** t))
        lr = lr / (1 - cfg.beta1 ** t)
        g = m
    denom += dt(cfg.eps)
    np.divide(g, denom, out=denom)
    denom *= dt(lr)
    return denom
