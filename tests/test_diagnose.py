"""Gradient health: spectral norms, the gradient-flow profile against the theory, and the
gradient-health fields the trainer logs at each evaluation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from gradcheck import numeric_gradient, rel_error, worst

from charrnn import checkpoint, config, diagnose, model, runlog
from charrnn.cli import cli
from charrnn.errors import DataError
from charrnn.train import resume_config, train

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!\n" * 30
TIMING = ("chars_per_sec", "elapsed_s")


def tiny_run(tmp_path, name, *sets, stop=lambda: None, resume=False):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    base = [f"data.path={corpus}", "model.hidden_size=8", "train.batch_size=4", "train.seq_len=12",
            "train.max_steps=6", "train.eval_every=3", "train.log_every=1", "train.sample_chars=0",
            "train.checkpoint_every=0"]
    run_dir = tmp_path / name
    cfg = resume_config(run_dir, sets) if resume else config.load(None, base + list(sets))
    train(cfg, run_dir, stop=stop, resume=resume)
    return run_dir


def orthogonal(H, rng):
    q, r = np.linalg.qr(rng.standard_normal((H, H)))
    return q * np.sign(np.diag(r))


def zero_input_model(s, Q, V=5, L=1, seed=0):
    """W_hh = s * Q, W_xh = 0 and b_h = 0: the pre-activation is exactly W_hh h_{t-1}."""
    spec = model.make_spec(V, Q.shape[0], L, False)
    params = model.init_params(spec, np.random.default_rng(seed), np.float64)
    params["layers.0.fwd.W_xh"][:] = 0.0
    params["layers.0.fwd.W_hh"][:] = s * Q
    return spec, params


# ---- spectral norms ----------------------------------------------------------------------------

def test_spectral_norm_matches_svd(rng):
    for W in (rng.standard_normal((16, 16)), 3.0 * orthogonal(12, rng), rng.standard_normal((8, 8)).astype(np.float32)):
        assert diagnose.spectral_norm(W) == pytest.approx(np.linalg.svd(W.astype(np.float64), compute_uv=False)[0], rel=1e-12)


def test_power_iteration_for_large_matrices_matches_svd(rng, monkeypatch):
    monkeypatch.setattr(diagnose, "EXACT_SVD_MAX", 4)  # force the power-iteration path on a 16 x 16 matrix
    W = rng.standard_normal((16, 16))
    assert diagnose.spectral_norm(W) == pytest.approx(np.linalg.svd(W, compute_uv=False)[0], rel=1e-9)


def test_spectral_norms_name_every_layer_and_direction(rng):
    spec = model.make_spec(6, 5, 2, True)
    params = model.init_params(spec, rng, np.float64, scale=0.7)
    sigmas = diagnose.spectral_norms(spec, params)
    assert list(sigmas) == ["layers.0.fwd", "layers.0.bwd", "layers.1.fwd", "layers.1.bwd"]
    assert all(s == pytest.approx(0.7) for s in sigmas.values())  # init: scaled orthogonal


# ---- the gradients themselves ------------------------------------------------------------------

def last_position_loss(spec, params, x, y, h0):
    """Sum over windows of the cross-entropy at the last position (what state_grads differentiates)."""
    logits, _, _ = model.forward(spec, params, x, h0)
    N, T = x.shape
    rows = slice((T - 1) * N, T * N)
    z = logits[rows] - logits[rows].max(axis=1, keepdims=True)
    return float(np.sum(np.log(np.exp(z).sum(axis=1)) - z[np.arange(N), y[:, -1]]))


def test_state_gradients_match_finite_differences(rng):
    spec = model.make_spec(6, 5, 1, False)
    params = model.init_params(spec, rng, np.float64, scale=0.9)
    x, y = rng.integers(0, 6, (3, 7)), rng.integers(0, 6, (3, 7))
    h0 = rng.uniform(-0.5, 0.5, (3, 5))
    dhs, cache = diagnose.state_grads(spec, params, x, y, {"fwd": [h0]})["layers.0.fwd"]
    hs = cache.hs
    numeric = numeric_gradient(lambda h: last_position_loss(spec, params, x, y, {"fwd": [h]}), h0)
    assert rel_error(dhs[0], numeric) < 1e-6, worst(dhs[0], numeric)
    for t in range(1, 7):  # dL/dh_t is dL/dh_0 of the same model restarted from h_t on the suffix
        restarted, _ = diagnose.state_grads(spec, params, x[:, t:], y[:, t:], {"fwd": [hs[t]]})["layers.0.fwd"]
        np.testing.assert_allclose(dhs[t], restarted[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("L, bidirectional", [(2, False), (2, True)])
def test_state_gradients_agree_with_model_backward(rng, L, bidirectional):
    """sum_t tanh'(a_t) * dL/dh_t is dL/db_h: checks every layer, the stacking and the cloze shift."""
    V, H, N, T = 6, 5, 3, 7
    spec = model.make_spec(V, H, L, bidirectional)
    params = model.init_params(spec, rng, np.float64)
    x = rng.integers(0, V, (N, T))
    y = None if bidirectional else rng.integers(0, V, (N, T))
    grads = diagnose.state_grads(spec, params, x, y)
    logits, _, cache = model.forward(spec, params, x)
    for d in ("fwd", "bwd") if bidirectional else ("fwd",):
        rows = (T - 1 if d == "fwd" else 0) * N + np.arange(N)
        ref, _ = model.backward(diagnose._last_position_dlogits(logits, model.targets(x, y), rows), cache)
        for l in range(L):
            dhs, cell_cache = grads[f"layers.{l}.{d}"]
            hs = cell_cache.hs
            db = ((1 - hs[1:] ** 2) * dhs[1:]).sum(axis=(0, 1))  # (H,)
            np.testing.assert_allclose(db, ref[f"layers.{l}.{d}.b_h"], rtol=1e-10, atol=1e-14)


# ---- the theory: per-step factor s * tanh' for W_hh = s * orthogonal -----------------------------

@pytest.mark.parametrize("s", [0.5, 0.9, 1.0, 1.5])
def test_linear_regime_decays_or_grows_at_rate_s(rng, s):
    """Zero input and h_0 = 0 keep every h_t = 0, so tanh' = 1 and each step multiplies the
    gradient by W_hh = s Q, whose action on any vector scales its norm by exactly s."""
    spec, params = zero_input_model(s, orthogonal(12, rng))
    x, y = rng.integers(0, 5, (4, 15)), rng.integers(0, 5, (4, 15))
    norms, stats = diagnose.gradient_flow(spec, params, x, y)["layers.0.fwd"]
    mean_tp, rms_tp = stats["mean tanh'"], stats["rms tanh'"]
    assert mean_tp == rms_tp == 1.0
    np.testing.assert_allclose(norms[1:] / norms[:-1], s, rtol=1e-10)
    assert diagnose.fit_factor(norms.mean(axis=1)) == pytest.approx(s, rel=1e-10)


def test_saturated_fixed_point_decays_at_s_times_tanh_prime(rng):
    """s = 2 > 1, yet the gradient vanishes: at the fixed point h* = tanh(s h*) every unit has the
    same tanh' = 1 - h*^2, and the per-step factor is s (1 - h*^2) ~ 0.166 exactly."""
    H, s = 12, 2.0
    u = np.ones(H) / np.sqrt(H)
    w = np.eye(H)[0] - u
    B = np.eye(H) - 2 * np.outer(w, w) / (w @ w)  # Householder: B e_1 = u
    Q = B @ np.block([[np.eye(1), np.zeros((1, H - 1))], [np.zeros((H - 1, 1)), orthogonal(H - 1, rng)]]) @ B
    np.testing.assert_allclose(Q @ u, u, atol=1e-12)  # a random orthogonal matrix that fixes u
    h_star = 1.0
    for _ in range(200):
        h_star = math.tanh(s * h_star)
    spec, params = zero_input_model(s, Q)
    x, y = rng.integers(0, 5, (3, 12)), rng.integers(0, 5, (3, 12))
    norms, stats = diagnose.gradient_flow(spec, params, x, y, {"fwd": [np.full((3, H), h_star)]})["layers.0.fwd"]
    mean_tp = stats["mean tanh'"]
    assert mean_tp == pytest.approx(1 - h_star ** 2, rel=1e-9)
    np.testing.assert_allclose(norms[1:] / norms[:-1], s * (1 - h_star ** 2), rtol=1e-8)
    assert diagnose.fit_factor(norms.mean(axis=1)) == pytest.approx(s * mean_tp, rel=1e-8)


@pytest.mark.parametrize("s", [1.5, 2.0])
def test_saturated_random_states_follow_the_measured_tanh_prime(rng, s):
    """With unequal tanh' across units a step scales the gradient g by s ||tanh' * g|| / ||g||;
    a random orthogonal W_hh spreads g over the units, so the factor is s * rms(tanh') (mean-field
    theory: Pennington et al. 2017), which the fit must match. s * mean(tanh') would understate it:
    the gradient survives through the unsaturated units."""
    spec, params = zero_input_model(s, orthogonal(16, rng))
    x, y = rng.integers(0, 5, (8, 20)), rng.integers(0, 5, (8, 20))
    norms, stats = diagnose.gradient_flow(spec, params, x, y, {"fwd": [rng.uniform(-1, 1, (8, 16))]})["layers.0.fwd"]
    mean_tp, rms_tp = stats["mean tanh'"], stats["rms tanh'"]
    assert 0.2 < mean_tp < 0.8  # really saturated, not the linear regime
    assert diagnose.fit_factor(norms.mean(axis=1)) == pytest.approx(s * rms_tp, rel=0.05)
    assert s * mean_tp < diagnose.fit_factor(norms.mean(axis=1))


# ---- the profile and its table -------------------------------------------------------------------

def test_windows_are_evenly_spaced_and_checked():
    ids = np.arange(100)
    x, y = diagnose.windows(ids, 4, 10, bidirectional=False)
    assert x[:, 0].tolist() == [0, 30, 59, 89] and (y == x + 1).all()
    x, y = diagnose.windows(ids, 3, 10, bidirectional=True)
    assert y is None and x[-1, -1] == 99
    with pytest.raises(DataError, match="at least 11"):
        diagnose.windows(ids[:10], 2, 10, bidirectional=False)


def test_profile_table_lists_every_distance_and_layer(rng):
    spec = model.make_spec(7, 6, 2, False)
    params = model.init_params(spec, rng, np.float32)
    prof = diagnose.profile(spec, params, rng.integers(0, 7, 500), K=5, T=9)
    assert prof.windows == 5 and set(prof.layers) == {"layers.0.fwd", "layers.1.fwd"}
    assert all(len(f.norms) == 10 and 0 < f.factor < 10 for f in prof.layers.values())
    table = diagnose.format_profile(prof)
    rows = [line.split() for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(10))
    assert "fitted factor/step" in table and "layers.1.fwd" in table
    assert json.loads(json.dumps(diagnose.profile_dict(prof)))["layers"]["layers.0.fwd"]["factor_per_step"] > 0


# ---- what the trainer logs ---------------------------------------------------------------------

def test_eval_records_carry_gradient_health(tmp_path):
    run = tiny_run(tmp_path, "clipped", "train.clip_norm=0.05")
    records = runlog.read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for prev, ev in zip([0, 3], evals):
        steps = [r for r in records if prev < r["step"] <= ev["step"]]
        assert ev["steps_since_eval"] == 3 and ev["clip_frac_since_eval"] == 1.0  # 0.05 clips every step
        assert ev["grad_norm_mean_since_eval"] == pytest.approx(np.mean([r["grad_norm"] for r in steps]), rel=1e-12)
        assert ev["grad_norm_max_since_eval"] == max(r["grad_norm"] for r in steps)
    W = checkpoint.load(run).params["layers.0.fwd.W_hh"]
    assert evals[-1]["w_hh_sigma"] == {"layers.0.fwd": pytest.approx(np.linalg.svd(W.astype(np.float64), compute_uv=False)[0])}
    unclipped = tiny_run(tmp_path, "unclipped", "train.clip_norm=0")
    assert all(r["clip_frac_since_eval"] == 0.0 for r in runlog.read_metrics(unclipped / "metrics.jsonl") if "val_loss" in r)


def test_resume_continues_the_gradient_health_sums_exactly(tmp_path):
    straight = runlog.read_metrics(tiny_run(tmp_path, "straight", "train.eval_every=4") / "metrics.jsonl")
    calls = iter(range(100))
    tiny_run(tmp_path, "resumed", "train.eval_every=4", stop=lambda: "SIGINT" if next(calls) == 4 else None)
    resumed = runlog.read_metrics(tiny_run(tmp_path, "resumed", resume=True) / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert resumed[-1]["steps_since_eval"] == 2  # step 5 from before the stop, step 6 after it
    assert strip(resumed) == strip(straight)


# ---- the command -------------------------------------------------------------------------------

def test_diagnose_command_prints_the_table_and_json(tmp_path):
    run = tiny_run(tmp_path, "vanilla")
    res = CliRunner().invoke(cli, ["diagnose", str(run), "-k", "3", "-T", "8"])
    assert res.exit_code == 0, res.output
    assert "mean |dL/dh|" in res.output and "sigma_max(W_hh)" in res.output and "layers.0.fwd" in res.output
    res = CliRunner().invoke(cli, ["diagnose", str(run / "checkpoints" / "last.npz"), "-k", "3", "-T", "8", "--json"])
    doc = json.loads(res.output)
    assert doc["windows"] == 3 and len(doc["layers"]["layers.0.fwd"]["mean_grad_norm"]) == 9


def test_diagnose_shows_both_directions_of_a_cloze_model(tmp_path):
    run = tiny_run(tmp_path, "cloze", "model.bidirectional=true")
    corpus = tmp_path / "other.txt"
    corpus.write_text(TEXT[:300], encoding="utf-8")
    res = CliRunner().invoke(cli, ["diagnose", str(run), "--corpus", str(corpus), "-k", "2"])
    assert res.exit_code == 0, res.output
    assert "layers.0.fwd" in res.output and "layers.0.bwd" in res.output and "(cloze)" in res.output
    res = CliRunner().invoke(cli, ["diagnose", str(run), "--corpus", str(tmp_path / "missing.txt")])
    assert res.exit_code == 1 and "no such file" in res.output
