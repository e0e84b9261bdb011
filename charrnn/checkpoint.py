"""Checkpoints: one .npz per checkpoint, readable with numpy.load(path, allow_pickle=False).

Entries:
    <parameter name>           e.g. layers.0.fwd.W_xh, out.W_ho (model.param_shapes)
    optim/<slot>/<name>        optimizer state per parameter (adam: m, v; sgd: velocity; ...)
    state/<direction>/<layer>  the recurrent state carried into the next training window: (N, k*H),
                               the cell's state blocks side by side (rnn, gru: h; lstm: [h | c],
                               so columns H..2H are the LSTM's c)
    meta                       a 0-d unicode array holding one JSON object (see README)

Format versions: 1 (vanilla cells only; its config has no model.cell) and 2 (model.cell names the
cell). Version-1 files load as rnn models, unchanged.

Nothing is ever unpickled. Loading checks everything before trusting it: the zip directory's
declared sizes against the shapes the metadata implies and their sum against the machine's
memory, each .npy header against its entry's size before anything is allocated (so a hostile
file cannot make us allocate gigabytes), the format version, the metadata (vocabulary, config),
every parameter's presence, shape and dtype, and that every array is finite. Writes go to a temporary file in the same directory, are fsynced and renamed over
the target, so a reader (or a crash) sees the old complete file or the new complete file.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from charrnn import atomic, config, model
from charrnn.errors import CharRNNError, CheckpointError
from charrnn.vocab import Vocab

FORMAT_VERSION = 2
META_MAX_BYTES = 64 << 20
HEADER_SLACK = 4096  # bytes an .npy header may add to the raw array data
FLOAT_DTYPES = ("float32", "float64")


class Checkpoint(NamedTuple):
    params: dict  # name -> array
    optim: dict  # slot -> {name: array}
    state: dict  # direction -> [array per layer]
    meta: dict
    path: Path
    spec: model.Spec  # the architecture, from meta


def resolve(target: str | Path) -> Path:
    """A checkpoint file, or a run directory meaning its best.npz, else its last.npz."""
    target = Path(target)
    if target.is_dir():
        for name in ("best.npz", "last.npz"):
            if (target / "checkpoints" / name).is_file():
                return target / "checkpoints" / name
        raise CheckpointError(f"{target}: no checkpoints/best.npz or checkpoints/last.npz in this run directory")
    if not target.exists():
        raise CheckpointError(f"{target}: no such checkpoint file or run directory")
    return target


# ---- writing --------------------------------------------------------------------------------------

def save(path: Path, params: dict, meta: dict, optim: dict | None = None, state: dict | None = None) -> None:
    """Write a checkpoint atomically. Refuses (CheckpointError) to write any non-finite value:
    parameters, optimizer state or carried hidden state."""
    arrays = dict(params)
    for slot, tensors in (optim or {}).items():
        arrays.update({f"optim/{slot}/{name}": a for name, a in tensors.items()})
    for d, layers in (state or {}).items():
        arrays.update({f"state/{d}/{l}": a for l, a in enumerate(layers)})
    bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: non-finite values in {', '.join(bad)}")
    arrays["meta"] = np.array(json.dumps({**meta, "format_version": FORMAT_VERSION}, ensure_ascii=False))
    atomic.write(Path(path), lambda f: np.savez(f, **arrays))


# ---- reading --------------------------------------------------------------------------------------

def _fail(path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def memory_limit() -> int:
    """The most bytes of arrays a checkpoint may ask us to allocate: this machine's memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def _read_entry(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy entry, its header checked before anything is allocated.

    np.lib.format.read_array would allocate whatever shape the header declares; here the
    header must describe no more data than the zip entry holds (its declared size, already
    checked against the metadata), and object dtypes (pickle) are refused outright.
    """
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise _fail(path, f"entry {info.filename} has .npy format version {version}, which charrnn does not write")
        if dtype.hasobject:
            raise _fail(path, f"entry {info.filename} holds Python objects; charrnn never unpickles, refusing to load it")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes > info.file_size:
            raise _fail(path, f"entry {info.filename} declares shape {shape} ({nbytes:,} bytes) in a "
                              f"{info.file_size:,}-byte entry; refusing to load it")
        buf = bytearray(nbytes)
        got = 0
        while got < nbytes and (n := f.readinto(memoryview(buf)[got:])):
            got += n
    if got != nbytes:
        raise _fail(path, f"entry {info.filename} is truncated ({got:,} of {nbytes:,} bytes)")
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


def _read_meta(path: Path, zf: zipfile.ZipFile) -> dict:
    try:
        info = zf.getinfo("meta.npy")
    except KeyError:
        raise _fail(path, "not a charrnn checkpoint (no meta entry)") from None
    if info.file_size > META_MAX_BYTES:
        raise _fail(path, f"meta entry is {info.file_size:,} bytes, more than a checkpoint's metadata can be")
    raw = _read_entry(path, zf, info)
    if raw.dtype.kind != "U" or raw.shape != ():
        raise _fail(path, "meta entry is not a JSON string")
    try:
        meta = json.loads(str(raw[()]))
    except json.JSONDecodeError as e:
        raise _fail(path, f"meta entry is not valid JSON ({e.msg} at position {e.pos})") from None
    except RecursionError:
        raise _fail(path, "meta entry is not valid JSON (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise _fail(path, "meta entry is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, "meta has no integer format_version")
    if version > FORMAT_VERSION:
        raise _fail(path, f"written by a newer charrnn (checkpoint format {version}, this charrnn reads up to "
                          f"{FORMAT_VERSION}); HINT: upgrade charrnn (pip install -U charrnn)")
    return meta


def read_meta(target: str | Path) -> dict:
    """Only the metadata of a checkpoint (or of a run directory's best/last): no arrays are read."""
    path = resolve(target)
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_meta(path, zf)
    except CheckpointError:
        raise
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise _fail(path, "not a valid .npz file (corrupted, truncated or unreadable)") from None


def spec_of_meta(meta: dict) -> model.Spec:
    """The architecture that checked metadata (vocab and model config) describes."""
    return model.spec_of_config(len(meta["vocab"]), config.from_dict(meta["config"], "meta").model)


def _check_meta(path: Path, meta: dict) -> None:
    """The parts of the metadata that loading and every command rely on: a valid config, a
    valid vocabulary and an objective that matches the model config."""
    try:
        cfg = config.from_dict(meta["config"], "meta")
        if not Vocab.from_json(meta).chars:
            raise _fail(path, "invalid meta (empty vocabulary)")
    except KeyError as e:
        raise _fail(path, f"meta lacks {e.args[0]!r}") from None
    except CheckpointError:
        raise
    except CharRNNError as e:
        raise _fail(path, f"invalid meta ({e})") from None
    except (TypeError, ValueError, AttributeError):
        raise _fail(path, "invalid meta (config must be a mapping, vocab a list of single characters)") from None
    objective = "cloze" if cfg.model.bidirectional else "next-char"
    if meta.get("objective", objective) != objective:
        raise _fail(path, f"invalid meta: objective {meta['objective']!r} does not match model.bidirectional="
                          f"{cfg.model.bidirectional}")


def _allowed_entries(meta: dict, spec: model.Spec, shapes: dict) -> dict:
    """Every entry a checkpoint with this metadata may hold, with its maximal size in bytes."""
    allowed = {f"{name}.npy": 8 * math.prod(s) for name, s in shapes.items()}
    for name, s in shapes.items():
        for slot in ("velocity", "sum_sq", "mean_sq", "m", "v"):
            allowed[f"optim/{slot}/{name}.npy"] = 8 * math.prod(s)
    for d in spec.dirs:
        for l in range(spec.L):
            allowed[f"state/{d}/{l}.npy"] = 8 * spec.state_size * int(meta["config"]["train"]["batch_size"])
    return {k: v + HEADER_SLACK for k, v in allowed.items()}


def load(target: str | Path, with_training_state: bool = True) -> Checkpoint:
    """Read and check a checkpoint (or a run directory's best/last). Raises CheckpointError."""
    path = resolve(target)
    try:
        with zipfile.ZipFile(path) as zf:
            meta = _read_meta(path, zf)
            _check_meta(path, meta)
            spec = spec_of_meta(meta)
            shapes = model.param_shapes(spec)
            allowed = _allowed_entries(meta, spec, shapes)
            for info in zf.infolist():
                if info.filename == "meta.npy":
                    continue
                if info.filename not in allowed:
                    raise _fail(path, f"unexpected entry {info.filename!r} for the {spec.cell} model its meta describes")
                if info.file_size > allowed[info.filename]:
                    raise _fail(path, f"entry {info.filename} declares {info.file_size:,} bytes, more than its shape allows; refusing to load it")
            wanted = [info for info in zf.infolist() if info.filename != "meta.npy"
                      and (with_training_state or info.filename[: -len(".npy")] in shapes)]
            need, limit = sum(info.file_size for info in wanted), memory_limit()
            if need > limit:
                raise _fail(path, f"its arrays need {need / 2**30:.1f} GiB, more than this machine's memory "
                                  f"({limit / 2**30:.1f} GiB); refusing to load it")
            arrays = {info.filename[: -len(".npy")]: _read_entry(path, zf, info) for info in wanted}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile):
        raise _fail(path, "not a valid .npz file (corrupted or truncated)") from None
    except (ValueError, EOFError, OSError, RuntimeError, NotImplementedError) as e:
        raise _fail(path, f"unreadable entry ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return _check(path, arrays, meta, spec)


def _check(path: Path, arrays: dict, meta: dict, spec: model.Spec) -> Checkpoint:
    shapes = model.param_shapes(spec)
    params, optim, state = {}, {}, {}
    dtype = None
    for name, shape in shapes.items():
        if name not in arrays:
            raise _fail(path, f"missing parameter {name}")
        a = arrays[name]
        if a.shape != tuple(shape):
            raise _fail(path, f"parameter {name} has shape {a.shape}, but its meta describes a {spec.cell} model "
                              f"that needs {tuple(shape)}")
        if a.dtype.name not in FLOAT_DTYPES or (dtype is not None and a.dtype != dtype):
            raise _fail(path, f"parameter {name} has dtype {a.dtype}, expected one float dtype (float32 or float64) for all")
        if not np.isfinite(a).all():
            raise _fail(path, f"parameter {name} holds NaN or Inf values")
        dtype = a.dtype
        params[name] = a
    for key, a in arrays.items():
        parts = key.split("/")
        if parts[0] == "optim":
            if a.shape != tuple(shapes[parts[2]]) or a.dtype != dtype:
                raise _fail(path, f"optimizer entry {key} has shape {a.shape} / dtype {a.dtype}, expected {tuple(shapes[parts[2]])} / {dtype}")
            optim.setdefault(parts[1], {})[parts[2]] = a
        elif parts[0] == "state":
            if a.ndim != 2 or a.shape[1] != spec.state_size or a.dtype != dtype:
                raise _fail(path, f"state entry {key} has shape {a.shape} / dtype {a.dtype}")
            state.setdefault(parts[1], {})[int(parts[2])] = a
        if parts[0] in ("optim", "state") and not np.isfinite(a).all():
            raise _fail(path, f"entry {key} holds NaN or Inf values")
    state = {d: [layers[l] for l in sorted(layers)] for d, layers in state.items()}
    return Checkpoint(params, optim, state, meta, path, spec)
