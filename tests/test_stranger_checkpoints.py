"""Checkpoints from strangers choose nothing: issue 11.

Three classes, each one test parametrized over examples:
  - bombs: a small file that would make charrnn decompress, parse or allocate far more than its
    size (deflated zeros in legitimate shapes, bzip2/lzma entries whose declared size is small,
    metadata of millions of empty lists, a model or window larger than any machine) is refused
    with one line, exit 1, in a process whose peak memory stays small;
  - hostile meta values: every field that a command reads from meta has the wrong type or range;
    one line, exit 1, never a traceback, with the --init-from hint exactly when the weights
    are still usable (the field is one only --resume reads);
  - what is there instead of a checkpoint or a run: a directory, a dangling link or a FIFO named
    last.npz, a directory that never was a run; each is named for what it is.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from charrnn import checkpoint, runlog

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
REPO = Path(__file__).resolve().parent.parent
MEMORY_CAP = 2 << 30  # address space of the child: a bomb that got through ends in MemoryError, not in swap
PEAK_RSS_MAX = 200 << 20  # room to read the largest bomb file here (46 MB), far from what the bombs cost unchecked


@pytest.fixture(scope="module")
def source(shared_run):
    return shared_run(TEXT, "train.max_steps=4", "train.eval_every=2")


# ---- building files -------------------------------------------------------------------------------

def entries(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def meta_of(e: dict) -> dict:
    return json.loads(str(e["meta"][()]))


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_zip(path: Path, members: dict, method=zipfile.ZIP_STORED) -> Path:
    """members: name -> bytes, or (bytes, n) for those bytes followed by n zero bytes (streamed)."""
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in members.items():
            head, zeros = data if isinstance(data, tuple) else (data, 0)
            with z.open(name, "w", force_zip64=True) as f:
                f.write(head)
                block = bytes(1 << 22)
                while zeros > 0:
                    f.write(block[: min(zeros, len(block))])
                    zeros -= len(block)
    return path


def declare_size(path: Path, name: str, size: int) -> None:
    """Rewrite the zip directory's uncompressed size of one entry (its data stays as it is)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while at >= 0:
        length = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46 : at + 46 + length] == name.encode():
            struct.pack_into("<I", raw, at + 24, size)
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(raw))


def big_model_meta(meta: dict, hidden: int) -> dict:
    return {**meta, "config": {**meta["config"], "model": {**meta["config"]["model"], "hidden_size": hidden}}}


def parameters_of(meta: dict, prefix: str = "") -> dict:
    """Every parameter of the (rnn, one-layer) model meta describes, as a header and that many zeros."""
    H, V = meta["config"]["model"]["hidden_size"], len(meta["vocab"])
    shapes = {"layers.0.fwd.W_xh": (H, V), "layers.0.fwd.W_hh": (H, H), "layers.0.fwd.b_h": (H,),
              "out.W_ho": (V, H), "out.b_o": (V,)}
    return {f"{prefix}{name}.npy": (npy_header(s), 4 * int(np.prod(s))) for name, s in shapes.items()}


def deflated_zeros(good: Path, out: Path, optimizer: bool = False) -> Path:
    """A 4096-unit model (64 MiB of W_hh) of zeros, deflated: about 70 KB."""
    e = entries(good)
    meta = big_model_meta(meta_of(e), 4096)
    members = {"meta.npy": npy(np.array(json.dumps(meta))), **parameters_of(meta)}
    if optimizer:
        members.update(parameters_of(meta, "optim/m/"))
    return write_zip(out, members, zipfile.ZIP_DEFLATED)


def meta_text(e: dict, unit: str, chars: int) -> str:
    """The real metadata with a list of `unit` repeated to about `chars` characters added."""
    doc = json.dumps(meta_of(e))
    return doc[:-1] + ', "padding": [' + unit * (chars // len(unit)) + "0]}"


def meta_bomb(good: Path, out: Path, unit: str, chars: int, method=zipfile.ZIP_STORED) -> Path:
    e = entries(good)
    members = {"meta.npy": npy(np.array(meta_text(e, unit, chars))),
               **{f"{k}.npy": npy(v) for k, v in e.items() if k != "meta"}}
    return write_zip(out, members, method)


def other_method(good: Path, out: Path, method) -> Path:
    """out.b_o as a bzip2 or lzma entry of 128 MiB of zeros (a few KB compressed) whose directory
    declares the size of the real out.b_o: zipfile hands such data to the decompressor whole,
    whatever the declared size."""
    e = entries(good)
    legit = npy(e["out.b_o"])
    write_zip(out, {f"{k}.npy": npy(v) for k, v in e.items() if k != "out.b_o"})
    with zipfile.ZipFile(out, "a", compression=method) as z, z.open("out.b_o.npy", "w") as f:
        f.write(legit)
        for _ in range(32):
            f.write(bytes(4 << 20))
    declare_size(out, "out.b_o.npy", len(legit))
    return out


def meta_only(good: Path, out: Path, **model_or_train) -> Path:
    """The real entries with meta's config changed (keys model.* / train.*)."""
    e = entries(good)
    meta = meta_of(e)
    for key, value in model_or_train.items():
        section, name = key.split("__")
        meta["config"][section][name] = value
    return write_zip(out, {"meta.npy": npy(np.array(json.dumps(meta))),
                           **{f"{k}.npy": npy(v) for k, v in e.items() if k != "meta"}})


# name -> (make(good, out) -> out, what the one line must say)
BOMBS = {
    "deflated-zero-weights": (lambda g, o: deflated_zeros(g, o), "zip bomb"),
    "deflated-zero-optimizer-state": (lambda g, o: deflated_zeros(g, o, optimizer=True), "zip bomb"),
    "deflated-meta-of-empty-lists": (lambda g, o: meta_bomb(g, o, "[],", 12_000_000, zipfile.ZIP_DEFLATED), "zip bomb"),
    "bzip2-entry-declaring-its-legit-size": (lambda g, o: other_method(g, o, zipfile.ZIP_BZIP2), "compression method"),
    "lzma-entry-declaring-its-legit-size": (lambda g, o: other_method(g, o, zipfile.ZIP_LZMA), "compression method"),
    "stored-meta-of-empty-lists": (lambda g, o: meta_bomb(g, o, "[],", 12_000_000), "lists and objects"),
    "stored-meta-of-empty-objects": (lambda g, o: meta_bomb(g, o, "{},", 12_000_000), "lists and objects"),
    "stored-meta-of-numbers": (lambda g, o: meta_bomb(g, o, "1.5,", 12_000_000), "items"),
    "stored-meta-of-strings": (lambda g, o: meta_bomb(g, o, '"\u4e00",', 12_000_000), "items"),
    "model-larger-than-any-memory": (lambda g, o: meta_only(g, o, model__hidden_size=16384, model__num_layers=64,
                                                            model__cell="lstm"), "more than this machine's memory"),
    "window-larger-than-any-memory": (lambda g, o: meta_only(g, o, train__seq_len=10**5, train__batch_size=10**5,
                                                             model__hidden_size=4096, model__num_layers=8),
                                      "more than this machine's memory"),
}

# runs `charrnn ARGS` under an address-space cap, then records the child's peak RSS (KiB) in a file
CHILD = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2); "
         "from charrnn.cli import main; sys.argv = ['charrnn', *sys.argv[2:]]; main()")
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def run_measured(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, int]:
    """(the finished `charrnn ARGS` process, its peak resident memory in bytes)."""
    rss = tmp_path / "peak-rss-kib"
    p = subprocess.run([sys.executable, "-c", WRAPPER, str(rss), sys.executable, "-c", CHILD, str(MEMORY_CAP),
                        *map(str, args)], capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"})
    return p, int(rss.read_text()) * 1024


@pytest.mark.parametrize("kind", list(BOMBS))
def test_a_bomb_is_refused_before_it_costs_memory(source, tmp_path, kind):
    make, fragment = BOMBS[kind]
    bomb = make(source / "checkpoints" / "last.npz", tmp_path / f"{kind}.npz")
    p, peak = run_measured(tmp_path, "sample", bomb, "--seed", "1", "--length", "5")
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(bomb) in err and fragment in err, err
    assert p.stdout == b""
    assert peak < PEAK_RSS_MAX, f"peak RSS {peak / 2**20:.0f} MiB"


def test_the_same_checkpoint_recompressed_still_loads(source, tmp_path):
    """numpy.savez_compressed of a real checkpoint (weights, optimizer state and hidden state) is
    no bomb: it loads, to the same arrays."""
    good = source / "checkpoints" / "last.npz"
    squeezed = tmp_path / "compressed.npz"
    np.savez_compressed(squeezed, **entries(good))
    a, b = checkpoint.load(good), checkpoint.load(squeezed)
    assert a.meta == b.meta and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


def test_the_meta_cap_follows_from_what_meta_can_hold(tmp_path):
    """The largest metadata charrnn can write, a vocabulary of every code point (control characters
    escaped, lone surrogates included) and a config with long paths, fits under the cap and passes
    the count before parsing; a checkpoint of such a model saves and loads."""
    vocab = [chr(c) for c in range(checkpoint.MAX_VOCAB)]
    cfg = {"data": {"path": "/" + "\\" * 4000, "cache_dir": "\x01" * 4000}, "model": {"hidden_size": 1},
           "train": {"batch_size": 1, "seq_len": 2, "dtype": "float32"}}
    meta = {"objective": "next-char", "vocab": vocab, "unk": None, "config": cfg, "step": 0}
    text = json.dumps({**meta, "format_version": checkpoint.FORMAT_VERSION}, ensure_ascii=False)
    assert 4 * len(text) + checkpoint.HEADER_SLACK <= checkpoint.META_MAX_BYTES
    assert checkpoint._parse_meta(tmp_path, text)["vocab"] == vocab
    V = len(vocab)
    params = {"layers.0.fwd.W_xh": np.ones((1, V), np.float32), "layers.0.fwd.W_hh": np.ones((1, 1), np.float32),
              "layers.0.fwd.b_h": np.zeros(1, np.float32), "out.W_ho": np.ones((V, 1), np.float32),
              "out.b_o": np.zeros(V, np.float32)}
    checkpoint.save(tmp_path / "every-character.npz", params, meta)
    assert checkpoint.load(tmp_path / "every-character.npz").meta["vocab"] == vocab


# ---- hostile meta values ----------------------------------------------------------------------------

def rng_state(**changes) -> dict:
    state = np.random.default_rng(0).bit_generator.state
    inner = {k: changes.pop(k) for k in ("state", "inc") if k in changes}
    return {**state, **changes, "state": {**state["state"], **inner}}


MISSING = object()
# fields that sample, eval, diagnose, runs and --init-from read: the file is invalid for every command
EVERY_COMMAND = [
    ("step", "4"), ("step", -1), ("step", 2.5), ("step", True), ("step", 2**70), ("step", None),
    ("objective", "gpt"), ("objective", None), ("vocab", "\n .abcdefghijklmnopqrstuvwxyz\ufffd"),
    ("vocab", {"a": 1}), ("vocab", [["a"]]), ("vocab", ["ab"]), ("vocab", [1, 2]), ("unk", 5), ("unk", "xy"),
    ("unk", ["\ufffd"]), ("best_val_loss", "low"), ("best_val_loss", float("nan")), ("best_val_loss", float("inf")),
    ("best_step", -2), ("chars_seen", "many"), ("elapsed_s", -1.0), ("elapsed_s", None), ("config", [1]),
]
# fields only --resume reads: the weights stay usable through --init-from
RESUME_ONLY = [
    ("updates", None), ("pos", 2**64), ("pos", "80"), ("skips", -1), ("last_finite_loss", "x"), ("rng", MISSING),
    ("rng", rng_state(state=-1)), ("rng", rng_state(inc=2**128)), ("rng", rng_state(has_uint32=2)),
    ("rng", rng_state(uinteger=-5)), ("rng", {**rng_state(), "bit_generator": "MT19937"}), ("rng", "PCG64"),
    ("acc", {"steps": "x"}), ("acc", {"bogus": 1}), ("acc", {"steps": 3, "finite": 2}), ("acc", [1]),
    ("eval_acc", {"finite": 1, "norm_sum": "x", "norm_max": 1.0}), ("eval_acc", {"steps": 2, "finite": 1}),
]
COMMANDS = ["sample", "eval", "diagnose", "init-from", "resume", "runs"]
CASES = ([(f, v, c) for f, v in EVERY_COMMAND for c in COMMANDS]
         + [(f, v, c) for f, v in RESUME_ONLY for c in ("resume", "sample")])


def case_id(field, value, command) -> str:
    shown = "missing" if value is MISSING else json.dumps(value)[:24]
    return f"{field}={shown}-{command}"


@pytest.mark.parametrize("field, value, command", CASES, ids=[case_id(*c) for c in CASES])
def test_a_hostile_meta_value_is_one_line_exit_1(cli_invoke, source, tmp_path, tiny, field, value, command):
    run = tmp_path / "run"
    shutil.copytree(source, run)
    (run / "checkpoints" / "best.npz").unlink()
    last = run / "checkpoints" / "last.npz"
    e = entries(last)
    meta = {k: v for k, v in meta_of(e).items() if k != field}
    if value is not MISSING:
        meta[field] = value
    np.savez(last, **{**e, "meta": np.array(json.dumps(meta))})
    corpus = run.parent / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    args = {"sample": ("sample", last, "--seed", "1", "--length", "5"), "eval": ("eval", last, "--corpus", corpus),
            "diagnose": ("diagnose", last, "--corpus", corpus, "-k", "2", "-T", "8"),
            "init-from": ("train", *tiny.args(corpus), "--run-dir", tmp_path / "new", "--init-from", last),
            "resume": ("train", "--resume", run), "runs": ("runs", tmp_path, "--json")}[command]
    r = cli_invoke(*args)
    if command == "runs":  # a table of runs reports the broken one and goes on
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
        (row,) = [row for row in json.loads(r.stdout) if row["name"] == "run"]
        assert row["state"] == "failed" and field in (row["error"] or ""), row
        return
    if field in dict(RESUME_ONLY) and command == "sample":  # the weights are fine
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)  # handled, not a crash
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], r.stderr
    assert ("--init-from" in lines[0]) == (field in dict(RESUME_ONLY)), lines[0]


# ---- what is there instead of a checkpoint, or of a run ------------------------------------------------

def make_in_place_of_last(run: Path, what: str) -> None:
    last = run / "checkpoints" / "last.npz"
    last.unlink()
    if what == "directory":
        last.mkdir()
    elif what == "dangling-link":
        last.symlink_to(run / "checkpoints" / "gone.npz")
    else:
        os.mkfifo(last)


# (what is at checkpoints/last.npz, the command) -> the one line must say
INSTEAD = {
    "directory": "last.npz is a directory, not a checkpoint file",
    "dangling-link": "last.npz is a symbolic link to a missing file",
    "fifo": "last.npz is a named pipe (FIFO), not a checkpoint file",
}
RUNS = {
    "empty-directory": (lambda d: d.mkdir(), "it is an empty directory, not a charrnn run directory", "--run-dir"),
    "foreign-directory": (lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")),
                          "it is not a charrnn run directory", "--run-dir NEW_DIR"),
    "missing-directory": (lambda d: None, "no such run directory", "start a new run there with --run-dir"),
    # kept: a real run killed before its first checkpoint (what runlog.create makes)
    "killed-before-its-first-checkpoint": (lambda d: runlog.create(runlog.RunDir(d)),
                                           "the run stopped before it saved its first checkpoint",
                                           "start it again with the same command"),
}
MESSAGE_CASES = ([(w, c) for w in INSTEAD for c in ("resume", "sample-run", "sample-file")]
                 + [(w, "resume") for w in RUNS])


@pytest.mark.parametrize("what, command", MESSAGE_CASES, ids=[f"{w}-{c}" for w, c in MESSAGE_CASES])
def test_what_is_there_is_named(cli_invoke, source, tmp_path, no_hang, what, command):
    run = tmp_path / "run"
    if what in INSTEAD:
        shutil.copytree(source, run)
        (run / "checkpoints" / "best.npz").unlink()
        make_in_place_of_last(run, what)
        says, hint = INSTEAD[what], ""
    else:
        make, says, hint = RUNS[what]
        make(run)
    args = {"resume": ("train", "--resume", run), "sample-run": ("sample", run, "--seed", "1"),
            "sample-file": ("sample", run / "checkpoints" / "last.npz", "--seed", "1")}[command]
    r = cli_invoke(*args)
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0] and hint in lines[0], r.stderr
    assert "stopped before" not in lines[0] or what == "killed-before-its-first-checkpoint"
