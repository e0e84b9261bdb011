"""The training modules' public pieces: build_trainer (what bench times) takes exactly train()'s
steps; the interval sums are named types saved in checkpoint meta as the same JSON mappings;
library messages give advice in the caller's terms (Python for str(error), the command line for
the CLI and its progress reporter)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from charrnn import checkpoint, dataset, errors, runlog
from charrnn.errors import CheckpointError, ConfigError, DataError, UsageError
from charrnn.progress import Reporter
from charrnn.resume import resume_config
from charrnn.train import train
from charrnn.trainer import GradSums, IntervalSums, StepResult, Trainer, build_trainer

WORDS = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 40


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus, tiny):
    """A finished tiny run (read-only for the tests)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny.config(corpus, "train.max_steps=6", "train.eval_every=3", "train.log_every=2"), run)
    return run


def test_a_built_trainer_takes_the_steps_train_takes(tmp_path, corpus, tiny):
    """Six steps of build_trainer(...).step() give bit for bit the parameters, optimizer state
    and counters of train() with train.max_steps=6."""
    cfg = tiny.config(corpus, "train.max_steps=6", "train.eval_every=0", "model.dropout=0.2")
    built = build_trainer(cfg, dataset.load(cfg.data))
    assert isinstance(built, Trainer) and built.ctx.run is None
    results = [built.step() for _ in range(6)]
    assert all(isinstance(r, StepResult) and r.finite for r in results)
    train(cfg, tmp_path / "run")
    ck = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.npz")
    for name, value in ck.params.items():
        assert np.array_equal(built.state.params[name], value), name
    for slot, flat in built.state.opt.items():
        for name, view in built.ctx.layout.views(flat).items():
            assert np.array_equal(view, ck.optim[slot][name]), f"{slot}/{name}"
    assert (built.state.step, built.state.pos, built.state.chars_seen) == (6, ck.meta["pos"], ck.meta["chars_seen"])
    assert built.state.rng.bit_generator.state == ck.meta["rng"]


def test_build_trainer_reports_the_batch_size_it_uses(write_text, tiny):
    corpus = write_text("abcdefghij" * 3)
    cfg = tiny.config(corpus)
    warnings = []
    built = build_trainer(cfg, dataset.load(cfg.data), lambda kind, r: warnings.append((kind, r["message"])))
    assert built.ctx.cfg.train.batch_size == built.ctx.N < cfg.train.batch_size
    assert warnings and warnings[0][0] == "warning" and "too short" in warnings[0][1]


def step(loss, norm, clipped=False, finite=True):
    return StepResult(loss, norm, clipped, 1e-3, finite, False)


def test_interval_sums_are_saved_as_the_mappings_checkpoints_hold():
    acc, grads = IntervalSums(), GradSums()
    assert acc.to_json() == {} and grads.to_json() == {}
    skipped = step(float("nan"), float("inf"), finite=False)
    acc.add(skipped, 128)
    grads.add(skipped)
    assert acc.to_json() == {"steps": 1, "chars": 128, "clipped": 0}  # no float sums before a finite step
    assert grads.to_json() == {"steps": 1, "clipped": 0}
    for s in (step(2.0, 3.0, clipped=True), step(1.0, 5.0)):
        acc.add(s, 128)
        grads.add(s)
    assert acc.to_json() == {"steps": 3, "chars": 384, "clipped": 1, "loss_sum": 3.0, "finite": 2, "norm_max": 5.0}
    assert grads.to_json() == {"steps": 3, "clipped": 1, "finite": 2, "norm_sum": 8.0, "norm_max": 5.0}
    assert IntervalSums.from_json(json.loads(json.dumps(acc.to_json()))) == acc
    assert GradSums.from_json(json.loads(json.dumps(grads.to_json()))) == grads
    # what resume checks the meta against accepts exactly these mappings
    from charrnn.resume import RESUME_FIELDS
    assert RESUME_FIELDS["acc"].test(acc.to_json()) and RESUME_FIELDS["eval_acc"].test(grads.to_json())


def test_checkpoint_meta_keeps_the_sums_as_json_mappings(tmp_path, corpus, tiny):
    """Stopped after step 3 (logged at step 2, never evaluated): last.npz holds one step of
    logging sums and three of gradient sums, as JSON mappings, and a resume starts from them."""
    calls = iter(range(1, 100))
    cfg = tiny.config(corpus, "train.log_every=2", "train.eval_every=0", "train.max_steps=4")
    train(cfg, tmp_path / "run", stop=lambda: "SIGTERM" if next(calls) == 3 else None)
    meta = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.npz").meta
    assert meta["step"] == 3
    assert list(meta["acc"]) == ["steps", "chars", "clipped", "loss_sum", "finite", "norm_max"]
    assert (meta["acc"]["steps"], meta["acc"]["chars"], meta["acc"]["finite"]) == (1, 8 * 16, 1)
    assert list(meta["eval_acc"]) == ["steps", "clipped", "finite", "norm_sum", "norm_max"]
    assert (meta["eval_acc"]["steps"], meta["eval_acc"]["finite"]) == (3, 3)
    assert meta["eval_acc"]["norm_max"] <= meta["eval_acc"]["norm_sum"]
    train(resume_config(tmp_path / "run"), tmp_path / "run", resume=True)
    last = runlog.read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["step"] == 4 and last["clip_frac"] in (0.0, 0.5, 1.0)


# ---- messages: facts from the library, advice spelled by the front end -----------------------------

def spelled(e: errors.CharRNNError, python: str, cli: str) -> None:
    """str(e) gives the Python advice and no command-line flag; e.render("cli") the flag."""
    assert python in str(e) and "--" not in str(e), str(e)
    assert cli in e.render("cli"), e.render("cli")
    assert len(str(e).splitlines()) == 1 and len(e.render("cli").splitlines()) == 1


def test_resume_refusal_of_a_model_change_advises_in_python_terms(finished):
    with pytest.raises(ConfigError) as e:
        resume_config(finished, ["model.hidden_size=32"])
    spelled(e.value, "resume=True) cannot change model.hidden_size", "--resume cannot change model.hidden_size")
    assert "init_from=" in str(e.value) and "--init-from" in e.value.render("cli")


def test_resume_of_a_missing_directory_advises_run_dir(tmp_path):
    with pytest.raises(CheckpointError) as e:
        resume_config(tmp_path / "nope")
    spelled(e.value, f"run_dir='{tmp_path / 'nope'}'", f"--run-dir {tmp_path / 'nope'}")


def test_a_second_run_in_a_used_directory_advises_resume(finished, corpus, tiny):
    with pytest.raises(UsageError) as e:
        train(tiny.config(corpus), finished)
    spelled(e.value, f"run_dir='{finished}', resume=True)", f"--resume {finished} or choose another --run-dir")


def test_init_from_a_checkpoint_of_another_vocabulary(finished, tmp_path, write_text, tiny):
    other = write_text("0123456789 " * 300)
    last = finished / "checkpoints" / "last.npz"
    with pytest.raises(DataError) as e:
        train(tiny.config(other), tmp_path / "new", init_from=str(last))
    spelled(e.value, f"init_from='{last}': its vocabulary does not match", f"--init-from {last}: its vocabulary")
    assert not (tmp_path / "new").exists()


def test_resume_from_a_checkpoint_with_a_broken_generator_state(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    last = run / "checkpoints" / "last.npz"
    ck = checkpoint.load(last)
    meta = {**ck.meta, "rng": {"bit_generator": "PCG64", "state": {"state": 1, "inc": 2},
                               "has_uint32": 0, "uinteger": 2**32}}
    checkpoint.save(last, ck.params, meta, ck.optim, ck.state)
    (run / "checkpoints" / "best.npz").unlink()
    with pytest.raises(CheckpointError) as e:
        train(resume_config(run), run, resume=True)
    spelled(e.value, f"init_from='{last}'", f"start a new run from its weights with --init-from {last}")


def test_the_progress_reporter_spells_warnings_for_the_command_line():
    stream = io.StringIO()
    with Reporter(stream, bar=False) as report:
        report("warning", {"message": f"weights kept; start a new run with {errors.option('init_from', 'w.npz')}"})
    assert stream.getvalue() == "warning: weights kept; start a new run with --init-from w.npz\n"


def test_a_non_finite_loss_advises_the_set_option(tmp_path, corpus, tiny):
    cfg = tiny.config(corpus, "train.lr=1e30", "train.clip_norm=0", "train.dtype=float32")
    with pytest.raises(errors.TrainingError) as e:
        train(cfg, tmp_path / "run")
    cli = e.value.render("cli")
    assert "--set train.on_nonfinite=skip" in cli and f"--init-from {tmp_path / 'run' / 'checkpoints' / 'last.npz'}" in cli
    assert "--" not in str(e.value) and "init_from=" in str(e.value)
