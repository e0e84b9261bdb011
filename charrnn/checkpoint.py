"""Checkpoints: one .npz per checkpoint, readable with numpy.load(path, allow_pickle=False).

Entries:
    <parameter name>           e.g. layers.0.fwd.W_xh, out.W_ho (model.param_shapes)
    optim/<slot>/<name>        optimizer state per parameter (adam: m, v; sgd: velocity; ...)
    state/<direction>/<layer>  the hidden state carried into the next training window
    meta                       a 0-d unicode array holding one JSON object (see README)

Nothing is ever unpickled. Loading checks everything before trusting it: the zip directory's
declared sizes against the shapes the metadata implies (so a hostile file cannot make us
allocate gigabytes), the format version, every parameter's presence, shape, dtype and
finiteness. Writes go to a temporary file in the same directory, are fsynced and renamed over
the target, so a reader (or a crash) sees the old complete file or the new complete file.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from charrnn.errors import CheckpointError
from charrnn.model import param_shapes

FORMAT_VERSION = 1
META_MAX_BYTES = 64 << 20
HEADER_SLACK = 4096  # bytes an .npy header may add to the raw array data
FLOAT_DTYPES = ("float32", "float64")


class Checkpoint(NamedTuple):
    params: dict  # name -> array
    optim: dict  # slot -> {name: array}
    state: dict  # direction -> [array per layer]
    meta: dict
    path: Path


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
    """Write a checkpoint atomically. Refuses (CheckpointError) to write a non-finite parameter."""
    bad = [name for name, a in params.items() if not np.isfinite(a).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: non-finite values in {', '.join(bad)}")
    arrays = dict(params)
    for slot, tensors in (optim or {}).items():
        arrays.update({f"optim/{slot}/{name}": a for name, a in tensors.items()})
    for d, layers in (state or {}).items():
        arrays.update({f"state/{d}/{l}": a for l, a in enumerate(layers)})
    arrays["meta"] = np.array(json.dumps({**meta, "format_version": FORMAT_VERSION}, ensure_ascii=False))
    atomic_save_npz(Path(path), arrays)


def atomic_save_npz(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---- reading --------------------------------------------------------------------------------------

def _fail(path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def _read_meta(path: Path, zf: zipfile.ZipFile) -> dict:
    try:
        info = zf.getinfo("meta.npy")
    except KeyError:
        raise _fail(path, "not a charrnn checkpoint (no meta entry)") from None
    if info.file_size > META_MAX_BYTES:
        raise _fail(path, f"meta entry is {info.file_size:,} bytes, more than a checkpoint's metadata can be")
    with zf.open(info) as f:
        raw = np.lib.format.read_array(f, allow_pickle=False)
    if raw.dtype.kind != "U" or raw.shape != ():
        raise _fail(path, "meta entry is not a JSON string")
    try:
        meta = json.loads(str(raw[()]))
    except json.JSONDecodeError as e:
        raise _fail(path, f"meta entry is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(meta, dict):
        raise _fail(path, "meta entry is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int):
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


def expected_shapes(meta: dict) -> dict:
    """Parameter shapes that the metadata (vocab and model config) implies."""
    try:
        model = meta["config"]["model"]
        return param_shapes(len(meta["vocab"]), int(model["hidden_size"]), int(model["num_layers"]), bool(model["bidirectional"]))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError("meta lacks vocab or config.model (hidden_size, num_layers, bidirectional)") from None


def _allowed_entries(meta: dict, shapes: dict) -> dict:
    """Every entry a checkpoint with this metadata may hold, with its maximal size in bytes."""
    allowed = {f"{name}.npy": 8 * math.prod(s) for name, s in shapes.items()}
    for name, s in shapes.items():
        for slot in ("velocity", "sum_sq", "mean_sq", "m", "v"):
            allowed[f"optim/{slot}/{name}.npy"] = 8 * math.prod(s)
    H = int(meta["config"]["model"]["hidden_size"])
    for d in ("fwd", "bwd"):
        for l in range(int(meta["config"]["model"]["num_layers"])):
            allowed[f"state/{d}/{l}.npy"] = 8 * H * int(meta["config"]["train"]["batch_size"])
    return {k: v + HEADER_SLACK for k, v in allowed.items()}


def load(target: str | Path, with_training_state: bool = True) -> Checkpoint:
    """Read and check a checkpoint (or a run directory's best/last). Raises CheckpointError."""
    path = resolve(target)
    try:
        with zipfile.ZipFile(path) as zf:
            meta = _read_meta(path, zf)
            try:
                shapes = expected_shapes(meta)
                allowed = _allowed_entries(meta, shapes)
            except CheckpointError as e:
                raise _fail(path, str(e)) from None
            except (KeyError, TypeError, ValueError):
                raise _fail(path, "meta lacks config.train.batch_size") from None
            for info in zf.infolist():
                if info.filename == "meta.npy":
                    continue
                if info.filename not in allowed:
                    raise _fail(path, f"unexpected entry {info.filename!r}")
                if info.file_size > allowed[info.filename]:
                    raise _fail(path, f"entry {info.filename} declares {info.file_size:,} bytes, more than its shape allows; refusing to load it")
            arrays = {}
            for info in zf.infolist():
                name = info.filename[: -len(".npy")]
                if name != "meta" and (with_training_state or name in shapes):
                    with zf.open(info) as f:
                        arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
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
    return _check(path, arrays, meta, shapes)


def _check(path: Path, arrays: dict, meta: dict, shapes: dict) -> Checkpoint:
    params, optim, state = {}, {}, {}
    dtype = None
    for name, shape in shapes.items():
        if name not in arrays:
            raise _fail(path, f"missing parameter {name}")
        a = arrays[name]
        if a.shape != tuple(shape):
            raise _fail(path, f"parameter {name} has shape {a.shape}, expected {tuple(shape)}")
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
            if a.ndim != 2 or a.shape[1] != shapes["layers.0.fwd.W_hh"][0] or a.dtype != dtype:
                raise _fail(path, f"state entry {key} has shape {a.shape} / dtype {a.dtype}")
            state.setdefault(parts[1], {})[int(parts[2])] = a
    state = {d: [layers[l] for l in sorted(layers)] for d, layers in state.items()}
    return Checkpoint(params, optim, state, meta, path)
