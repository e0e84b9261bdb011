"""`charrnn bench`: how fast does a config train and sample on this machine, and how close to the
machine's own matrix-product rate does training get?

Training is timed with the trainer's own step (trainer.Trainer.step, the step train.train takes:
window, forward, backward, clipping, update) after a warm-up, on the config's corpus or on
synthetic ids with a given vocabulary size (content does not change speed). The matrix-product
rate is measured here with a GEMM of the model's own shape, (N*T, H) x (H, H), so `gemm_fraction`
says how much of the machine's attainable rate the whole training step reaches; the rest is
memory-bound work (tanh, softmax, the optimizer) and Python overhead.
"""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from charrnn import dataset, heap, model
from charrnn.config import Config
from charrnn.sample import Knobs, generate
from charrnn.trainer import Trainer, build_trainer
from charrnn.vocab import Vocab


def synthetic_data(V: int, n: int = 1_000_000, seed: int = 0) -> dataset.Dataset:
    """Uniform random ids over a made-up vocabulary of V characters (CJK code points)."""
    vocab = Vocab([chr(0x4E00 + i) for i in range(V)])
    ids = np.random.default_rng(seed).integers(0, V, n).astype(vocab.dtype)
    return dataset.Dataset(vocab, ids, None, Path(f"synthetic:{V}"), "", Path(), False)


def step_flops(spec: model.Spec, N: int, T: int) -> float:
    """Floating-point operations of one training step's matrix products (2 per multiply-add).

    Each tower layer's count is its cell's (cells/base.py: the recurrent product, its input
    gradient and dW_hh; above layer 0 the same for the input product). The head is three
    (T*N, H*dirs) x (H*dirs, V) products.
    """
    S = T - 1 if spec.bidirectional else T
    H, dirs = spec.H, len(spec.dirs)
    per_tower = sum(spec.unit.flops(S, N, H, H, lookup=l == 0) for l in range(spec.L))
    return dirs * per_tower + 3 * 2 * T * N * H * dirs * spec.V


def gemm_rate(M: int, H: int, dtype, seconds: float = 1.0) -> float:
    """Attainable FLOP/s of this machine for an (M, H) x (H, H) product (median of repeats)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((M, H)).astype(dtype), rng.standard_normal((H, H)).astype(dtype)
    out = np.empty((M, H), dtype=dtype)
    np.matmul(a, b, out=out)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * M * H * H / statistics.median(times)


def _time_training(timed: Trainer, steps: int, warmup: int, seconds: float = 0.0) -> list[float]:
    """Per-step times of at least `steps` steps and `seconds` seconds, after `warmup` steps.

    A time floor lets a comparison time both sides over equally long stretches: this machine's
    speed drifts over seconds, and a short run lands in one state where a long one averages."""
    for _ in range(warmup):
        timed.step()
    times, start = [], time.perf_counter()
    while len(times) < steps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        timed.step()
        times.append(time.perf_counter() - t0)
    return times


def _time_sampling(spec, params, vocab, chars: int, n: int) -> float:
    """Characters per second (all streams together) of generating `chars` steps of n streams."""
    rng = np.random.default_rng(0)
    steps = generate(spec, params, vocab, chars, rng, n, knobs=Knobs())
    next(steps)  # the prime pass is not part of the rate
    t0 = time.perf_counter()
    count = sum(1 for _ in steps)
    return n * count / (time.perf_counter() - t0)


def run(cfg: Config, steps: int = 30, warmup: int = 5, vocab_size: int | None = None,
        sample_chars: int = 3000, streams: int = 32, seconds: float = 0.0) -> dict:
    """Benchmark a config; returns one flat dict of results (see the module docstring)."""
    heap.keep_freed_memory()  # as train.train does, so the bench times what training runs
    data = synthetic_data(vocab_size) if vocab_size else dataset.load(cfg.data)
    timed = build_trainer(cfg, data)
    ctx, state, cfg = timed.ctx, timed.state, timed.ctx.cfg
    times = _time_training(timed, steps, warmup, seconds)
    N, T = ctx.N, cfg.train.seq_len
    med = statistics.median(times)
    rate = gemm_rate(N * T, ctx.spec.H, ctx.dtype)
    result = {"config": {"cell": ctx.spec.cell, "hidden_size": ctx.spec.H, "num_layers": ctx.spec.L,
                         "bidirectional": ctx.spec.bidirectional,
                         "vocab": ctx.spec.V, "batch_size": N, "seq_len": T, "optimizer": cfg.train.optimizer,
                         "dtype": cfg.train.dtype, "threads": cfg.train.threads},
              "steps_timed": len(times), "train_chars_per_sec": N * T / med,
              "train_chars_per_sec_min": N * T / max(times), "train_chars_per_sec_max": N * T / min(times),
              "step_ms": med * 1e3, "gemm_gflops": rate / 1e9,
              "gemm_fraction": step_flops(ctx.spec, N, T) / med / rate}
    if not ctx.spec.bidirectional:
        result["sample_chars_per_sec"] = _time_sampling(ctx.spec, state.params, data.vocab, sample_chars, 1)
        result[f"sample_{streams}_streams_chars_per_sec"] = _time_sampling(ctx.spec, state.params, data.vocab,
                                                                         sample_chars // 4, streams)
    else:
        result["sample_chars_per_sec"] = None  # cloze models fill gaps; they do not sample left to right
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result
