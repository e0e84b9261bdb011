"""Checkpoint files: plain .npz that numpy reads without pickle, their entry names and metadata,
atomic writes, careful loading, and how a run directory resolves to a checkpoint."""
from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import yaml

from charrnn import checkpoint, model
from charrnn.errors import CheckpointError
from charrnn.optim import SLOTS

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
META_KEYS = {"format_version", "objective", "vocab", "unk", "config", "step", "best_val_loss"}


@pytest.fixture(scope="module")
def next_char_run(shared_run):
    return shared_run(TEXT, "train.max_steps=10", "train.eval_every=5")


@pytest.fixture(scope="module")
def cloze_run(shared_run, tiny):
    return shared_run(TEXT, *tiny.CLOZE, "train.max_steps=10", "train.eval_every=5")


def npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", ["last.npz", "best.npz"])
def test_loads_with_allow_pickle_false(next_char_run, name):
    entries = npz(next_char_run / "checkpoints" / name)
    meta = json.loads(str(entries["meta"][()]))
    assert entries["meta"].shape == () and entries["meta"].dtype.kind == "U"
    assert META_KEYS <= set(meta)
    assert all(a.dtype != object for a in entries.values())


def test_entry_names_of_a_next_char_checkpoint(next_char_run):
    entries = npz(next_char_run / "checkpoints" / "last.npz")
    meta = json.loads(str(entries["meta"][()]))
    shapes = model.param_shapes(model.make_spec(len(meta["vocab"]), 16, 1, False))
    params = {k for k in entries if "/" not in k and k != "meta"}
    assert params == set(shapes)
    for name, shape in shapes.items():
        assert entries[name].shape == shape and entries[name].dtype == np.float32
        for slot in ("m", "v"):  # adam
            assert entries[f"optim/{slot}/{name}"].shape == shape
    assert {k for k in entries if k.startswith("optim/")} == {f"optim/{s}/{n}" for s in ("m", "v") for n in shapes}
    assert {k for k in entries if k.startswith("state/")} == {"state/fwd/0"}  # the carried hidden state
    assert entries["state/fwd/0"].shape == (8, 16)


def test_meta_of_a_next_char_checkpoint(next_char_run):
    entries = npz(next_char_run / "checkpoints" / "last.npz")
    meta = json.loads(str(entries["meta"][()]))
    assert meta["format_version"] == checkpoint.FORMAT_VERSION == 2
    assert meta["objective"] == "next-char"
    train_text = TEXT[: len(TEXT) - int(len(TEXT) * 0.1)]
    assert meta["vocab"] == sorted(set(train_text)) and meta["unk"] is None
    assert meta["step"] == 10
    assert isinstance(meta["best_val_loss"], float) and meta["best_val_loss"] > 0
    assert meta["config"] == yaml.safe_load((next_char_run / "config.yaml").read_text(encoding="utf-8"))
    assert meta["config"]["train"]["max_steps"] == 10 and meta["config"]["model"]["hidden_size"] == 16


def test_cloze_checkpoint(cloze_run):
    entries = npz(cloze_run / "checkpoints" / "last.npz")
    meta = json.loads(str(entries["meta"][()]))
    assert meta["objective"] == "cloze"
    shapes = model.param_shapes(model.make_spec(len(meta["vocab"]), 16, 1, True))
    assert set(shapes) == {k for k in entries if "/" not in k} - {"meta"}
    assert "layers.0.bwd.W_hh" in entries
    assert not any(k.startswith("state/") for k in entries)  # cloze windows start from zero states


def optimizer_run(shared_run, optimizer):
    return shared_run(TEXT, "train.max_steps=2", f"train.optimizer={optimizer}", "train.lr=0.01", "train.momentum=0.9")


@pytest.mark.parametrize("optimizer", sorted(SLOTS))
def test_optimizer_state_entries(shared_run, optimizer):
    entries = npz(optimizer_run(shared_run, optimizer) / "checkpoints" / "last.npz")
    slots = {k.split("/")[1] for k in entries if k.startswith("optim/")}
    assert slots == set(SLOTS[optimizer])
    assert any(a.any() for k, a in entries.items() if k.startswith("optim/"))


@pytest.mark.parametrize("optimizer", sorted(SLOTS))
def test_a_checkpoint_of_each_optimizer_loads_with_its_slots(shared_run, optimizer):
    """The entries a checkpoint may hold come from their owners: the optimizer's slots from
    optim.SLOTS, parameters and carried states from the model spec."""
    ck = checkpoint.load(optimizer_run(shared_run, optimizer))
    assert set(ck.optim) == set(SLOTS[optimizer])
    for slot in SLOTS[optimizer]:
        assert {name: a.shape for name, a in ck.optim[slot].items()} == model.param_shapes(ck.spec)
        for name, a in ck.optim[slot].items():
            assert checkpoint.optim_entry(slot, name) == f"optim/{slot}/{name}" and a.dtype == ck.params[name].dtype
    assert set(ck.state) == set(ck.spec.dirs) and len(ck.state["fwd"]) == ck.spec.L


@pytest.mark.parametrize("optimizer, slot", [("adam", "momentum"), ("adam", "velocity"), ("sgd", "m"),
                                             ("rmsprop", "sum_sq")])
def test_an_unknown_optimizer_slot_is_refused(tmp_path, shared_run, optimizer, slot):
    """A slot no optimizer has, or another optimizer's slot: refused before anything is read."""
    src = optimizer_run(shared_run, optimizer) / "checkpoints" / "last.npz"
    bad = rewrite(src, tmp_path / "bad.npz", lambda e: {**e, f"optim/{slot}/out.b_o": np.zeros_like(e["out.b_o"])})
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(bad)
    assert f"unexpected entry 'optim/{slot}/out.b_o.npy'" in str(err.value) and optimizer in str(err.value)
    with pytest.raises(CheckpointError, match="unexpected entry"):
        checkpoint.load(bad, with_training_state=False)


def test_an_optimizer_slot_missing_a_parameter_is_refused(tmp_path, next_char_run):
    """Resuming from it would fail with a bare KeyError when the slot is flattened."""
    bad = rewrite(next_char_run / "checkpoints" / "last.npz", tmp_path / "bad.npz",
                  lambda e: {k: v for k, v in e.items() if k != "optim/m/out.b_o"})
    with pytest.raises(CheckpointError, match="optim/m has no entry for parameter out.b_o$"):
        checkpoint.load(bad)
    assert checkpoint.load(bad, with_training_state=False).optim == {}  # sample and eval read parameters only


def test_meta_roundtrips_non_ascii_vocabulary(shared_run):
    run = shared_run("春眠不觉晓，处处闻啼鸟。🌸🐦\n" * 60, "train.max_steps=2")
    meta = json.loads(str(npz(run / "checkpoints" / "last.npz")["meta"][()]))
    assert "🌸" in meta["vocab"] and "春" in meta["vocab"]


# ---- writing --------------------------------------------------------------------------------------------

def leftovers(directory):
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp") or
                  (p.name.startswith(".") and p.name != ".lock"))


def test_no_temporary_files_left_in_a_run(next_char_run, cloze_run):
    assert leftovers(next_char_run) == [] and leftovers(cloze_run) == []


def test_save_and_load_roundtrip(tmp_path, next_char_run):
    ck = checkpoint.load(next_char_run / "checkpoints" / "last.npz")
    out = tmp_path / "sub" / "copy.npz"
    checkpoint.save(out, ck.params, {k: v for k, v in ck.meta.items() if k != "format_version"}, ck.optim,
                    ck.state)
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.npz"]
    again = checkpoint.load(out)
    assert again.meta == ck.meta
    for name in ck.params:
        assert np.array_equal(again.params[name], ck.params[name])
    assert again.optim.keys() == ck.optim.keys() and again.state.keys() == ck.state.keys()
    assert checkpoint.load(out, with_training_state=False).optim == {}


def test_save_refuses_non_finite_parameters_and_leaves_the_old_file(tmp_path, next_char_run):
    ck = checkpoint.load(next_char_run / "checkpoints" / "last.npz")
    out = tmp_path / "dir" / "ck.npz"
    out.parent.mkdir()
    shutil.copy(next_char_run / "checkpoints" / "last.npz", out)
    before = out.read_bytes()
    params = dict(ck.params)
    params["out.b_o"] = params["out.b_o"].copy()
    params["out.b_o"][0] = np.nan
    with pytest.raises(CheckpointError, match="out.b_o"):
        checkpoint.save(out, params, ck.meta)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["ck.npz"]


# ---- careful loading ---------------------------------------------------------------------------------------

def rewrite(src, dst, change):
    """Copy checkpoint src to dst with its entries passed through change(dict) -> dict."""
    entries = npz(src)
    buf = io.BytesIO()
    np.savez(buf, **change(entries))
    dst.write_bytes(buf.getvalue())
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda e: {**e, "evil": np.array([{"a": 1}], dtype=object)}, "unexpected entry"),
    (lambda e: {k: v for k, v in e.items() if k != "out.W_ho"}, "missing parameter out.W_ho"),
    (lambda e: {k: v for k, v in e.items() if k != "meta"}, "no meta"),
    (lambda e: {**e, "meta": np.array(json.dumps({**json.loads(str(e["meta"][()])), "format_version": 99}))},
     "newer charrnn"),
    (lambda e: {**e, "out.b_o": e["out.b_o"][:-1]}, "shape"),
    (lambda e: {**e, "out.b_o": np.full_like(e["out.b_o"], np.inf)}, "NaN or Inf"),
    (lambda e: {**e, "meta": np.array("{not json")}, "not valid JSON"),
])
def test_load_rejects_bad_files_with_a_checkpoint_error(tmp_path, next_char_run, change, message):
    bad = rewrite(next_char_run / "checkpoints" / "last.npz", tmp_path / "bad.npz", change)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(bad)


def test_truncated_file_is_a_checkpoint_error(tmp_path, next_char_run):
    data = (next_char_run / "checkpoints" / "last.npz").read_bytes()
    bad = tmp_path / "cut.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.npz"):
        checkpoint.load(bad)


def test_declared_sizes_are_checked_before_reading(tmp_path, next_char_run):
    """A zip entry claiming more bytes than its parameter's shape allows is refused unread."""
    src = next_char_run / "checkpoints" / "last.npz"
    bad = tmp_path / "big.npz"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "out.b_o.npy":
                data = data + b"\0" * (1 << 20)
            zout.writestr(info.filename, data)
    with pytest.raises(CheckpointError, match="more than its shape allows"):
        checkpoint.load(bad)


# ---- run directory -> checkpoint ------------------------------------------------------------------------------

def test_run_directory_resolves_to_best_then_last(tmp_path, next_char_run, cli_invoke):
    run = tmp_path / "run"
    shutil.copytree(next_char_run, run)
    assert checkpoint.resolve(run) == run / "checkpoints" / "best.npz"
    by_dir = cli_invoke("eval", run, "--json")
    by_best = cli_invoke("eval", run / "checkpoints" / "best.npz", "--json")
    assert by_dir.exit_code == 0 and by_dir.stdout == by_best.stdout
    (run / "checkpoints" / "best.npz").unlink()
    assert checkpoint.resolve(run) == run / "checkpoints" / "last.npz"
    assert checkpoint.load(run).meta["step"] == 10
    (run / "checkpoints" / "last.npz").unlink()
    with pytest.raises(CheckpointError, match="no checkpoints/best.npz or checkpoints/last.npz"):
        checkpoint.resolve(run)


def test_a_checkpoint_file_resolves_to_itself(next_char_run):
    path = next_char_run / "checkpoints" / "last.npz"
    assert checkpoint.resolve(path) == path
    assert checkpoint.resolve(str(path)) == path


# ---- gated cells -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lstm_run(shared_run):
    return shared_run(TEXT, "model.cell=lstm", "model.num_layers=2", "train.max_steps=6", "train.eval_every=3")


def test_an_lstm_checkpoint_names_its_cell_and_carries_h_and_c(lstm_run):
    entries = npz(lstm_run / "checkpoints" / "last.npz")
    meta = json.loads(str(entries["meta"][()]))
    assert meta["format_version"] == 2 and meta["config"]["model"]["cell"] == "lstm"
    assert entries["layers.0.fwd.W_hh"].shape == (64, 16) and entries["layers.1.fwd.W_xh"].shape == (64, 16)
    for l in (0, 1):  # state/fwd/l is [h | c]: (N, 2H), the c half not a copy of h
        state = entries[f"state/fwd/{l}"]
        assert state.shape == (8, 32) and not np.array_equal(state[:, :16], state[:, 16:])
    ck = checkpoint.load(lstm_run)
    assert (ck.spec.cell, ck.spec.L, ck.spec.state_size) == ("lstm", 2, 32)


@pytest.mark.parametrize("cell, other", [("rnn", "lstm"), ("rnn", "gru"), ("lstm", "gru"), ("gru", "rnn")])
def test_a_cell_that_disagrees_with_the_shapes_is_refused(tmp_path, shared_run, cell, other):
    """The meta names one cell, the arrays have another's shapes: one line naming both."""
    src = shared_run(TEXT, f"model.cell={cell}", "train.max_steps=2", "train.eval_every=2")

    def relabel(e):
        meta = json.loads(str(e["meta"][()]))
        meta["config"]["model"]["cell"] = other
        return {**e, "meta": np.array(json.dumps(meta))}
    bad = rewrite(src / "checkpoints" / "last.npz", tmp_path / "bad.npz", relabel)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(bad)
    message = str(err.value)
    assert "\n" not in message and other in message and ("shape" in message or "unexpected entry" in message)


def test_an_unknown_cell_in_meta_is_refused(tmp_path, lstm_run):
    def relabel(e):
        meta = json.loads(str(e["meta"][()]))
        meta["config"]["model"]["cell"] = "transformer"
        return {**e, "meta": np.array(json.dumps(meta))}
    bad = rewrite(lstm_run / "checkpoints" / "last.npz", tmp_path / "bad.npz", relabel)
    with pytest.raises(CheckpointError, match="model.cell"):
        checkpoint.load(bad)
