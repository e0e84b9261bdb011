"""`charrnn runs`: the table of runs, their state (running, finished, interrupted, failed) and order."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from charrnn import config, runlog, runs
from charrnn.cli import cli
from charrnn.train import resume_config, train

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!\n" * 30


def tiny_run(base, name, *sets, stop=lambda: None):
    corpus = base.parent / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    cfg = config.load(None, [f"data.path={corpus}", "model.hidden_size=8", "train.batch_size=4", "train.seq_len=12",
                             "train.max_steps=6", "train.eval_every=2", "train.log_every=1", "train.sample_chars=0",
                             "train.checkpoint_every=0", *sets])
    train(cfg, base / name, stop=stop)
    return base / name


def stop_after(n):
    calls = iter(range(1000))
    return lambda: "SIGTERM" if next(calls) == n - 1 else None


def raise_after(n):
    calls = iter(range(1000))

    def stop():
        if next(calls) == n - 1:
            raise RuntimeError("disk on fire")
    return stop


@pytest.fixture
def base(tmp_path):
    """runs/ with a finished, an interrupted and two failed runs."""
    base = tmp_path / "runs"
    tiny_run(base, "finished")
    tiny_run(base, "wider", "model.hidden_size=12", "model.num_layers=2", "train.max_steps=4")
    tiny_run(base, "stopped", stop=stop_after(3))
    with pytest.raises(RuntimeError):
        tiny_run(base, "crashed", stop=raise_after(3))
    empty = runlog.RunDir(base / "no-checkpoint")
    runlog.create(empty)
    runlog.write_text(empty.config, "train:\n  max_steps: 6\n")
    runlog.append_metrics(empty, {"step": 1, "train_loss": 3.0})
    (base / "not-a-run").mkdir()
    return base


def test_states_and_progress(base):
    info = {r.name: r for r in runs.list_runs(base)}
    assert set(info) == {"finished", "wider", "stopped", "crashed", "no-checkpoint"}
    assert {n: r.state for n, r in info.items()} == {"finished": "finished", "wider": "finished", "stopped": "interrupted",
                                                      "crashed": "failed", "no-checkpoint": "failed"}
    assert (info["finished"].steps, info["finished"].max_steps, info["stopped"].steps) == (6, 6, 3)
    assert info["finished"].chars_seen == 6 * 4 * 12 and info["stopped"].chars_seen == 3 * 4 * 12
    assert "RuntimeError: disk on fire" in info["crashed"].error and info["crashed"].steps == 3
    assert (info["finished"].kind, info["finished"].layers, info["finished"].hidden) == ("vanilla", 1, 8)
    assert (info["wider"].kind, info["wider"].layers, info["wider"].hidden) == ("stacked", 2, 12)
    V = len(set(TEXT))  # every character occurs in the training part
    assert info["finished"].params == 8 * V + 8 * 8 + 8 + V * 8 + V
    assert info["finished"].objective == "next-char" and info["finished"].chars_per_sec > 0


def test_best_validation_is_the_minimum_and_sorts_the_table(base):
    infos = runs.list_runs(base)
    for r in infos:
        evals = [m for m in runlog.read_metrics(base / r.name / "metrics.jsonl") if "val_bpc" in m]
        if evals:
            best = min(evals, key=lambda m: m["val_bpc"])
            assert (r.best_val_bpc, r.best_step) == (best["val_bpc"], best["step"])
    bpcs = [r.best_val_bpc for r in infos]
    known = [b for b in bpcs if b is not None]
    assert known == sorted(known) and bpcs[len(known):] == [None] * (len(bpcs) - len(known))


def test_a_locked_run_is_running_and_resume_finishes_it(base):
    run = runlog.RunDir(base / "stopped")
    runlog.lock(run)  # what a live `charrnn train` holds
    try:
        assert runs.run_info(run.root).state == "running"
    finally:
        runlog.unlock(run)
    assert runs.run_info(run.root).state == "interrupted"
    train(resume_config(run.root), run.root, resume=True)
    assert runs.run_info(run.root).state == "finished"


def test_resume_clears_the_failed_marker(base):
    train(resume_config(base / "crashed"), base / "crashed", resume=True)
    info = runs.run_info(base / "crashed")
    assert (info.state, info.steps, info.error) == ("finished", 6, None)


def test_runs_command_table_and_json(base):
    res = CliRunner().invoke(cli, ["runs", str(base)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["name", "model", "params"]
    row = next(line for line in lines if line.startswith("stopped"))
    assert "rnn 1x8" in row and "3/6" in row and row.rstrip().endswith("interrupted")
    doc = json.loads(CliRunner().invoke(cli, ["runs", str(base), "--json"]).output)
    assert [d["name"] for d in doc] == [r.name for r in runs.list_runs(base)]
    assert {d["name"]: d["state"] for d in doc}["finished"] == "finished"
    single = json.loads(CliRunner().invoke(cli, ["runs", str(base / "finished"), "--json"]).output)
    assert [d["name"] for d in single] == ["finished"]  # a run directory itself lists just that run


def test_runs_command_on_missing_or_empty_directories(tmp_path):
    res = CliRunner().invoke(cli, ["runs", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "no such directory" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(cli, ["runs", str(tmp_path / "empty"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == []
