"""`charrnn plot` and `charrnn diagnose --plot`: PNG files, and the message when matplotlib is absent."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import config, diagnose, model, plot
from charrnn.cli import cli
from charrnn.train import train

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!\n" * 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def two_runs(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    dirs = []
    for name, clip in (("clip5", 5), ("noclip", 0)):
        cfg = config.load(None, [f"data.path={corpus}", "model.hidden_size=8", "train.batch_size=4", "train.seq_len=12",
                                 "train.max_steps=6", "train.eval_every=3", "train.log_every=1", "train.sample_chars=0",
                                 f"train.clip_norm={clip}", "train.lr_schedule=cosine"])
        train(cfg, tmp_path / "runs" / name)
        dirs.append(tmp_path / "runs" / name)
    return dirs


def is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("x", ["step", "chars", "time"])
def test_plot_writes_a_png_for_several_runs(two_runs, tmp_path, x):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs" / f"runs-{x}.png"
    res = CliRunner().invoke(cli, ["plot", *map(str, two_runs), "-o", str(out), "--x", x])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out) and is_png(out)


def test_runs_without_metrics_are_left_out_or_refused(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    fresh = tmp_path / "runs" / "fresh"
    fresh.mkdir()
    path, skipped = plot.plot_runs([two_runs[0], fresh], tmp_path / "one.png")
    assert skipped == ["fresh"] and is_png(path)
    res = CliRunner().invoke(cli, ["plot", str(fresh), "-o", str(tmp_path / "none.png")])
    assert res.exit_code == 1 and "no metrics.jsonl records" in res.output


def test_diagnose_plot_writes_a_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "flow.png"
    res = CliRunner().invoke(cli, ["diagnose", str(two_runs[0]), "-k", "2", "-T", "6", "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert is_png(out)


def test_profile_plot_of_a_cloze_model(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    spec = model.make_spec(6, 5, 1, True)
    prof = diagnose.profile(spec, model.init_params(spec, rng, np.float64), rng.integers(0, 6, 200), K=3, T=8)
    assert is_png(plot.plot_profile(prof, tmp_path / "cloze.png"))


def test_missing_matplotlib_says_how_to_install_it(two_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = CliRunner().invoke(cli, ["plot", str(two_runs[0]), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 1
    assert "matplotlib is not installed: pip install 'charrnn[plot]'" in res.output
    assert not (tmp_path / "x.png").exists()
