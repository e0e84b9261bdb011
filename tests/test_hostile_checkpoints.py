"""Hostile and broken checkpoints through every command that reads one: `sample`, `eval`,
`train --init-from` and `train --resume`. Each must exit 1 with one line naming the file and
the problem, never a traceback, never unpickle, never allocate what a header claims, and never
change a file on disk."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from charrnn import checkpoint

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source(shared_run):
    return shared_run(TEXT, "train.max_steps=4", "train.eval_every=2")


def entries(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def with_meta(e: dict, **changes) -> dict:
    """Entries with meta keys replaced; a__b__c=v sets meta["a"]["b"]["c"] = v."""
    meta = json.loads(str(e["meta"][()]))
    for key, value in changes.items():
        *path, last = key.split("__")
        node = meta
        for part in path:
            node = node[part]
        node[last] = value
    return {**e, "meta": np.array(json.dumps(meta))}


def replace_member(src: bytes, name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename == name else zin.read(info))
    return out.getvalue()


def npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def plain_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    return out.getvalue()


# name -> (make(original bytes, original entries) -> hostile bytes, what the message must say)
HOSTILE = {
    "object-array-as-parameter": (lambda b, e: npz_bytes({**e, "out.b_o": np.array([{"a": 1}], dtype=object)}),
                                  "Python objects"),
    "object-array-extra-entry": (lambda b, e: npz_bytes({**e, "evil": np.array([print], dtype=object)}), "unexpected entry"),
    "truncated": (lambda b, e: b[: len(b) // 2], "not a valid .npz"),
    "truncated-to-header": (lambda b, e: b[:100], "not a valid .npz"),
    "empty-file": (lambda b, e: b"", "not a valid .npz"),
    "random-bytes": (lambda b, e: np.random.default_rng(0).bytes(5000), "not a valid .npz"),
    "flipped-bytes": (lambda b, e: b[:200] + bytes(x ^ 0xFF for x in b[200:400]) + b[400:], "last.npz"),
    "plain-zip": (lambda b, e: plain_zip(), "not a charrnn checkpoint"),
    "missing-parameter": (lambda b, e: npz_bytes({k: v for k, v in e.items() if k != "out.W_ho"}), "missing parameter out.W_ho"),
    "wrong-shape": (lambda b, e: npz_bytes({**e, "out.W_ho": e["out.W_ho"][:, :-1]}), "shape"),
    "wrong-dtype-int": (lambda b, e: npz_bytes({**e, "out.b_o": e["out.b_o"].astype(np.int32)}), "dtype"),
    "wrong-dtype-float16": (lambda b, e: npz_bytes({**e, "out.b_o": e["out.b_o"].astype(np.float16)}), "dtype"),
    "nan-parameter": (lambda b, e: npz_bytes({**e, "out.b_o": np.full_like(e["out.b_o"], np.nan)}), "NaN or Inf"),
    "future-format": (lambda b, e: npz_bytes(with_meta(e, format_version=99)), "newer charrnn"),
    "format-version-not-int": (lambda b, e: npz_bytes(with_meta(e, format_version="1")), "format_version"),
    "meta-invalid-json": (lambda b, e: npz_bytes({**e, "meta": np.array("{not json")}), "not valid JSON"),
    "meta-json-list": (lambda b, e: npz_bytes({**e, "meta": np.array("[1, 2]")}), "not a JSON object"),
    "meta-deeply-nested": (lambda b, e: npz_bytes({**e, "meta": np.array("[" * 100000 + "]" * 100000)}), "not valid JSON"),
    "meta-not-text": (lambda b, e: npz_bytes({**e, "meta": np.zeros(3)}), "not a JSON string"),
    "meta-missing": (lambda b, e: npz_bytes({k: v for k, v in e.items() if k != "meta"}), "no meta"),
    "meta-bad-config": (lambda b, e: npz_bytes(with_meta(e, config__model__hidden_size=-3)), "invalid meta"),
    "meta-config-not-mapping": (lambda b, e: npz_bytes(with_meta(e, config="fast")), "invalid meta"),
    "meta-vocab-not-chars": (lambda b, e: npz_bytes(with_meta(e, vocab=[1, 2, 3])), "invalid meta"),
    "meta-vocab-empty": (lambda b, e: npz_bytes(with_meta(e, vocab=[])), "invalid meta"),
    "meta-objective-mismatch": (lambda b, e: npz_bytes(with_meta(e, objective="cloze")), "objective"),
    "member-declares-huge-size": (lambda b, e: replace_member(b, "out.b_o.npy", npy_header((e["out.b_o"].size,))
                                                              + b"\0" * (1 << 20)), "more than its shape allows"),
    "header-declares-huge-shape": (lambda b, e: replace_member(b, "out.b_o.npy", npy_header((10**12,)) + b"\0" * 64),
                                   "refusing to load it"),
    "meta-header-huge-string": (lambda b, e: replace_member(b, "meta.npy", npy_header((), "<U100000000") + b"\0" * 64),
                                "last.npz"),
    "npy-version-3": (lambda b, e: replace_member(b, "out.b_o.npy", b"\x93NUMPY\x03\x00" + b"\0" * 64), "format version"),
}
COMMANDS = ["sample", "eval", "init-from", "resume"]
# entries that only --resume reads (sample, eval and --init-from read parameters only)
TRAINING_STATE = {
    "inf-optimizer-state": (lambda b, e: npz_bytes({**e, "optim/v/out.b_o": np.full_like(e["out.b_o"], np.inf)}),
                            "NaN or Inf"),
    "object-array-as-optimizer-state": (lambda b, e: npz_bytes({**e, "optim/m/out.b_o": np.array([None], dtype=object)}),
                                        "Python objects"),
    "nan-hidden-state": (lambda b, e: npz_bytes({**e, "state/fwd/0": np.full_like(e["state/fwd/0"], np.nan)}), "NaN or Inf"),
    "hidden-state-wrong-shape": (lambda b, e: npz_bytes({**e, "state/fwd/0": e["state/fwd/0"][:, :-1]}), "state entry"),
}
CASES = [(kind, command) for kind in HOSTILE for command in COMMANDS] + [(kind, "resume") for kind in TRAINING_STATE]


def invoke(cli_invoke, command, bad: Path, run: Path, tmp_path: Path, tiny):
    if command == "sample":
        return cli_invoke("sample", bad, "--seed", "1", "--length", "5")
    if command == "eval":
        return cli_invoke("eval", bad, "--json")
    if command == "init-from":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(TEXT, encoding="utf-8")
        return cli_invoke("train", *tiny.args(corpus), "--run-dir", tmp_path / "new-run", "--init-from", bad)
    return cli_invoke("train", "--resume", run)


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind, command", CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_hostile_checkpoint_is_one_line_exit_1(cli_invoke, source, tmp_path, tiny, kind, command):
    make, fragment = {**HOSTILE, **TRAINING_STATE}[kind]
    good = source / "checkpoints" / "last.npz"
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "checkpoints" / "best.npz").unlink()  # the hostile last.npz is the only candidate for --resume
    bad = run / "checkpoints" / "last.npz"
    bad.write_bytes(make(good.read_bytes(), entries(good)))
    before = snapshot(run)
    r = invoke(cli_invoke, command, bad, run, tmp_path, tiny)
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)  # handled, not a crash
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(bad) in lines[0] and fragment in lines[0], lines[0]
    assert r.stdout == ""
    assert snapshot(run) == before  # nothing on disk changed, not even a lock or failed.txt ...
    assert not (tmp_path / "new-run").exists()  # ... and --init-from made no run directory


def test_the_memory_bound_is_checked_before_reading(cli_invoke, source, monkeypatch):
    """A checkpoint whose arrays would need more than the machine's memory is refused unread."""
    path = source / "checkpoints" / "last.npz"
    monkeypatch.setattr(checkpoint, "memory_limit", lambda: 1000)
    read = checkpoint._read_entry

    def read_meta_only(path, zf, info):
        assert info.filename == "meta.npy", f"read {info.filename} although the bound was exceeded"
        return read(path, zf, info)

    monkeypatch.setattr(checkpoint, "_read_entry", read_meta_only)
    with pytest.raises(checkpoint.CheckpointError, match="more than this machine's memory"):
        checkpoint.load(path)
    r = cli_invoke("sample", path, "--seed", "1")
    assert r.exit_code == 1 and "more than this machine's memory" in r.stderr and len(r.stderr.splitlines()) == 1


def test_the_default_memory_bound_is_the_physical_memory():
    limit = checkpoint.memory_limit()
    assert limit == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") > 0


def test_a_huge_shape_claim_allocates_nothing_in_a_real_process(source, tmp_path):
    """In a separate process with a 1 GiB address-space limit: a header claiming 4 TB is refused
    with the one-line error (had it been allocated, the process would die with MemoryError)."""
    good = source / "checkpoints" / "last.npz"
    bad = tmp_path / "claims-4tb.npz"
    bad.write_bytes(HOSTILE["header-declares-huge-shape"][0](good.read_bytes(), entries(good)))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from charrnn.cli import main; sys.argv = ['charrnn', 'eval', sys.argv[1]]; main()")
    p = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"})
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "claims-4tb.npz" in err and "refusing to load it" in err


def test_resume_uses_best_when_it_is_newer_than_last(cli_invoke, source, tmp_path):
    """A run killed after an evaluation improved (best.npz written) but before its next last.npz
    continues from best.npz: the newest complete checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(source, run)
    ck = checkpoint.load(run / "checkpoints" / "best.npz")
    assert ck.meta["step"] == 4
    older = {k: v for k, v in ck.meta.items() if k != "format_version"}
    checkpoint.save(run / "checkpoints" / "last.npz", ck.params, {**older, "step": 2}, ck.optim, ck.state)
    r = cli_invoke("train", "--resume", run, "--set", "train.max_steps=6")
    assert r.exit_code == 0, r.output
    assert "resuming from best.npz (step 4), which is newer than last.npz" in r.stderr
    assert checkpoint.load(run / "checkpoints" / "last.npz").meta["step"] == 6


def test_resume_with_an_unreadable_last_names_the_other_checkpoints(cli_invoke, source, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "checkpoints" / "last.npz").write_bytes(b"garbage")
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1
    assert "last.npz: not a valid .npz" in r.stderr and "copy it over" in r.stderr and "best.npz" in r.stderr


# fields only --resume reads: the weights stay usable, hence the --init-from hint; fields that every
# command reads (step, elapsed_s, best_val_loss: runs, diagnose) make the whole file invalid
@pytest.mark.parametrize("change, what, hint", [
    (dict(step="4"), "step", "invalid meta"), (dict(pos=-1), "pos", "--init-from"),
    (dict(elapsed_s=None), "elapsed_s", "invalid meta"), (dict(best_val_loss="low"), "best_val_loss", "invalid meta"),
    (dict(acc=[1]), "acc", "--init-from"), (dict(rng={"state": 1}), "random generator", "--init-from"),
])
def test_resume_refuses_an_invalid_training_state(cli_invoke, source, tmp_path, change, what, hint):
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "checkpoints" / "best.npz").unlink()
    last = run / "checkpoints" / "last.npz"
    last.write_bytes(npz_bytes(with_meta(entries(last), **change)))
    before = snapshot(run)
    r = cli_invoke("train", "--resume", run)
    assert r.exit_code == 1, r.output
    assert len(r.stderr.splitlines()) == 1 and what in r.stderr and hint in r.stderr, r.stderr
    assert {k: v for k, v in snapshot(run).items() if k.name != ".lock"} == \
        {k: v for k, v in before.items() if k.name != ".lock"}
