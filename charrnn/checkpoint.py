"""Checkpoints: one .npz per checkpoint, readable with numpy.load(path, allow_pickle=False).

Entries:
    <parameter name>           e.g. layers.0.fwd.W_xh, out.W_ho (model.param_shapes)
    optim/<slot>/<name>        optimizer state per parameter, the configured optimizer's slots
                               (optim.SLOTS: adam m, v; sgd velocity; ...)
    state/<direction>/<layer>  the recurrent state carried into the next training window: (N, k*H),
                               the cell's state blocks side by side (rnn, gru: h; lstm: [h | c],
                               so columns H..2H are the LSTM's c)
    meta                       a 0-d unicode array holding one JSON object (README.md, "Checkpoint format")

Format versions: 1 (vanilla cells only; its config has no model.cell) and 2 (model.cell names the
cell). Version-1 files load as rnn models, unchanged.

A checkpoint may come from a stranger, so nothing is ever unpickled and every size is bounded
before anything is decompressed, parsed or allocated:
  - the zip directory: only stored or deflated entries (zipfile inflates bzip2 and lzma data
    without a bound on the output), and no more inflation than real arrays show (charrnn writes
    entries uncompressed; float weights that numpy.savez_compressed deflates shrink by a few
    percent; only all-zero arrays shrink more, and INFLATE_ALLOWANCE covers those);
  - the meta entry: at most what a vocabulary of every Unicode character plus a config can take,
    with a bounded number of lists, objects and items, counted before the JSON is parsed;
  - its fields against META_FIELDS (types and ranges, as config values are checked), its config
    (config.from_dict) and vocabulary; the model it describes, with one training window, must fit
    this machine's memory, since every command allocates from those numbers;
  - the entries: names and declared sizes against the shapes meta implies, their sum against
    memory, each .npy header against its entry's size, then every parameter's shape, dtype and
    finiteness.
Writes go to a temporary file in the same directory, are fsynced and renamed over the target, so a
reader (or a crash) sees the old complete file or the new complete file.
"""
from __future__ import annotations

import json
import math
import os
import stat
import zipfile
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable

import numpy as np

from charrnn import atomic, config, model
from charrnn.errors import CharRNNError, CheckpointError
from charrnn.optim import SLOTS as OPTIMIZER_SLOTS
from charrnn.vocab import MAX_SIZE as MAX_VOCAB, Vocab

FORMAT_VERSION = 2
HEADER_SLACK = 4096  # bytes an .npy header may add to the raw array data
FLOAT_DTYPES = ("float32", "float64")
# The meta entry as save() writes it (json.dumps, ensure_ascii=False): a vocabulary entry takes at
# most 10 characters ('"\u001f", ', control characters being escaped); everything else (the config
# with its paths, the generator state, counters) far less than META_OTHER_CHARS.
META_OTHER_CHARS = 1 << 20
META_MAX_CHARS = 10 * MAX_VOCAB + META_OTHER_CHARS
META_MAX_BYTES = 4 * META_MAX_CHARS + HEADER_SLACK  # a '<U' array: 4 bytes per character
# Counted in the text before parsing, strings included: json.loads turns each list, object and item
# into a Python object, and a few megabytes of '[],' or '{},' would take gigabytes. charrnn's meta
# has about a dozen lists and objects, and an item per vocabulary entry plus a few hundred.
META_MAX_CONTAINERS = 256
META_MAX_ITEMS = MAX_VOCAB + 4096
COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
MAX_RATIO = 16  # declared / compressed size that an entry of real (non-zero) floats stays under
INFLATE_ALLOWANCE = 32 << 20  # bytes in all that entries may inflate beyond MAX_RATIO (zero arrays)
READ_CHUNK = 16 << 20


class Checkpoint(NamedTuple):
    params: dict  # name -> array
    optim: dict  # slot -> {name: array}
    state: dict  # direction -> [array per layer]
    meta: dict
    path: Path
    spec: model.Spec  # the architecture, from meta


def present(path: str | Path) -> bool:
    """Whether a checkpoint file is at path: False when nothing is there, CheckpointError (one line
    saying what is there instead) for a directory, a link to nothing, a FIFO or device. Links to a
    file are followed: reading through them cannot harm, and users link best.npz to a step."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise CheckpointError(f"{path} is a symbolic link to a missing file ({os.readlink(path)}); point it "
                                  "at a checkpoint or remove it") from None
        return False
    except OSError as e:  # ELOOP (links in a circle), EACCES on a directory above it, ...
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if stat.S_ISREG(st.st_mode):
        return True
    what = ("a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
    raise CheckpointError(f"{path} is {what}, not a checkpoint file; move it away and put a checkpoint file in its place")


def resolve(target: str | Path) -> Path:
    """A checkpoint file, or a run directory meaning its best.npz, else its last.npz."""
    target = Path(target)
    if target.is_dir():
        checkpoints = target / "checkpoints"
        if not checkpoints.is_dir():
            raise CheckpointError(f"{target} is a directory, not a checkpoint file or a run directory (no "
                                  "checkpoints/best.npz or checkpoints/last.npz in it); name a .npz file or a run directory")
        for name in ("best.npz", "last.npz"):
            if present(checkpoints / name):
                return checkpoints / name
        raise CheckpointError(f"{target}: no checkpoints/best.npz or checkpoints/last.npz in this run directory")
    if not present(target):
        raise CheckpointError(f"{target}: no such checkpoint file or run directory")
    return target


# ---- writing --------------------------------------------------------------------------------------

def optim_entry(slot: str, name: str) -> str:
    """The entry of optimizer slot `slot` (optim.SLOTS) for parameter `name`."""
    return f"optim/{slot}/{name}"


def state_entry(direction: str, layer: int) -> str:
    """The entry of the hidden state carried by layer `layer` of tower `direction` (Spec.dirs)."""
    return f"state/{direction}/{layer}"


def save(path: Path, params: dict, meta: dict, optim: dict | None = None, state: dict | None = None) -> None:
    """Write a checkpoint atomically. Refuses (CheckpointError) to write any non-finite value:
    parameters, optimizer state or carried hidden state."""
    arrays = dict(params)
    for slot, tensors in (optim or {}).items():
        arrays.update({optim_entry(slot, name): a for name, a in tensors.items()})
    for d, layers in (state or {}).items():
        arrays.update({state_entry(d, l): a for l, a in enumerate(layers)})
    bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: non-finite values in {', '.join(bad)}")
    arrays["meta"] = np.array(json.dumps({**meta, "format_version": FORMAT_VERSION}, ensure_ascii=False))
    atomic.write(Path(path), lambda f: np.savez(f, **arrays))


# ---- the metadata's fields: one declared schema, one validator --------------------------------

class Field(NamedTuple):
    test: Callable[[Any], bool]
    want: str  # what the value must be, for the message


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _is_real(v) -> bool:
    # an int is finite (math.isfinite would overflow on a huge one); a float must be checked
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)


def _is_char(v) -> bool:
    return isinstance(v, str) and len(v) == 1


def nullable(f: Field) -> Field:
    return Field(lambda v: v is None or f.test(v), f"{f.want}, or null")


def accumulator(counts: tuple, sums: tuple) -> Field:
    """A mapping of running sums as the trainer keeps them: counts and float sums by name (the
    float sums exist once a finite step was counted)."""
    def test(v) -> bool:
        return (isinstance(v, dict) and set(v) <= {*counts, *sums}
                and all(_is_count(v[k]) for k in counts if k in v) and all(_is_real(v[k]) for k in sums if k in v)
                and (not v.get("finite") or all(k in v for k in sums)))
    return Field(test, f"a mapping of {', '.join(counts + sums)} to numbers")


COUNT = Field(_is_count, "a non-negative integer")
REAL = Field(_is_real, "a finite number")
SECONDS = Field(lambda v: _is_real(v) and v >= 0, "a non-negative number")
# what sample, eval, diagnose, runs and --init-from read from meta, checked whenever present
# (format_version, config and the vocabulary's order have their own checks and messages)
META_FIELDS = {
    "objective": Field(lambda v: v in ("next-char", "cloze"), "next-char or cloze"),
    "vocab": Field(lambda v: isinstance(v, list) and 0 < len(v) <= MAX_VOCAB and all(map(_is_char, v)),
                   f"a list of 1 to {MAX_VOCAB:,} single characters"),
    "unk": nullable(Field(_is_char, "a single character")),
    "config": Field(lambda v: isinstance(v, dict), "a mapping of config sections"),
    "step": COUNT, "best_step": nullable(COUNT), "chars_seen": COUNT,
    "best_val_loss": nullable(REAL), "elapsed_s": SECONDS,
}


def _shown(value) -> str:
    """A value for a one-line message: short, and never the repr of a huge container."""
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'mapping'} of {len(value):,} items"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def invalid_fields(doc: dict, schema: dict, required: bool = False) -> list[str]:
    """'name = value: must be ...' (or 'name missing') for every field of doc that schema refuses;
    fields that are absent count only when required."""
    bad = []
    for name, f in schema.items():
        if name not in doc:
            if required:
                bad.append(f"{name} missing")
        elif not f.test(doc[name]):
            bad.append(f"{name} = {_shown(doc[name])}: must be {f.want}")
    return bad


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
        # in chunks: a zip entry's readinto(b) reads len(b) bytes into a second buffer first
        while got < nbytes and (n := f.readinto(memoryview(buf)[got : got + READ_CHUNK])):
            got += n
    if got != nbytes:
        raise _fail(path, f"entry {info.filename} is truncated ({got:,} of {nbytes:,} bytes)")
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


def _check_members(path: Path, zf: zipfile.ZipFile) -> None:
    """Before anything is decompressed: every entry stored or deflated, and none inflating more than
    real arrays do, so that a small file cannot make us decompress gigabytes."""
    for info in zf.infolist():
        if info.compress_type not in COMPRESSIONS:
            raise _fail(path, f"entry {info.filename} uses zip compression method {info.compress_type}; charrnn "
                              "reads stored or deflated entries only (as numpy.savez and savez_compressed write)")
    over = [(info.file_size - MAX_RATIO * info.compress_size, info) for info in zf.infolist()]
    if sum(max(0, n) for n, _ in over) > INFLATE_ALLOWANCE:
        worst = max(over, key=lambda pair: pair[0])[1]
        raise _fail(path, f"entry {worst.filename} declares {worst.file_size:,} bytes in {worst.compress_size:,} "
                          f"compressed ones, far more than arrays of weights compress (a zip bomb?); refusing to "
                          "load it (a recompressed checkpoint loads once saved again with numpy.savez)")


def _parse_meta(path: Path, text: str) -> Any:
    """json.loads, once a count of brackets and separators shows the parse stays small."""
    containers, items = text.count("[") + text.count("{"), text.count(",") + text.count(":")
    if containers > META_MAX_CONTAINERS or items > META_MAX_ITEMS:
        raise _fail(path, f"meta entry is not valid JSON metadata ({containers:,} lists and objects, {items:,} items: "
                          f"more than a vocabulary of at most {MAX_VOCAB:,} characters and a config need)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, f"meta entry is not valid JSON ({e.msg} at position {e.pos})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more digits than int() converts
        raise _fail(path, f"meta entry is not valid JSON ({str(e).splitlines()[0]})") from None


def _read_meta(path: Path, zf: zipfile.ZipFile) -> dict:
    try:
        info = zf.getinfo("meta.npy")
    except KeyError:
        raise _fail(path, "not a charrnn checkpoint (no meta entry)") from None
    if info.file_size > META_MAX_BYTES:
        raise _fail(path, f"meta entry is {info.file_size:,} bytes, more than a checkpoint's metadata can be "
                          f"({META_MAX_BYTES:,})")
    raw = _read_entry(path, zf, info)
    if raw.dtype.kind != "U" or raw.shape != ():
        raise _fail(path, "meta entry is not a JSON string")
    # decoded from the entry's buffer, which then goes, rather than through a numpy string: one
    # copy of the text instead of three before the parse allocates (surrogatepass: save() stores
    # whatever json.dumps wrote, lone surrogates included)
    codec = "utf-32-be" if raw.dtype.str.startswith(">") else "utf-32-le"
    text = str(raw.reshape(1).view(np.uint8).data, codec, "surrogatepass").rstrip("\0")
    del raw
    meta = _parse_meta(path, text)
    if not isinstance(meta, dict):
        raise _fail(path, "meta entry is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, "meta has no integer format_version")
    if version > FORMAT_VERSION:
        raise _fail(path, f"written by a newer charrnn (checkpoint format {version}, this charrnn reads up to "
                          f"{FORMAT_VERSION}); HINT: upgrade charrnn (pip install -U charrnn)")
    return meta


def _open(path: Path, read: Callable[[zipfile.ZipFile], Any]) -> Any:
    """read(zip file) with every way a file can fail to be a readable zip as one CheckpointError."""
    try:
        with zipfile.ZipFile(path) as zf:
            _check_members(path, zf)
            return read(zf)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile):
        raise _fail(path, "not a valid .npz file (corrupted or truncated)") from None
    except MemoryError:
        raise _fail(path, "not enough free memory to load it; close other programs or use a larger machine") from None
    except (ValueError, EOFError, OSError, RuntimeError, NotImplementedError) as e:
        raise _fail(path, f"unreadable entry ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def read_meta(target: str | Path) -> dict:
    """Only the metadata of a checkpoint (or of a run directory's best/last), checked as load()
    checks it: no arrays are read."""
    path = resolve(target)

    def read(zf):
        meta = _read_meta(path, zf)
        _check_meta(path, meta)
        return meta
    return _open(path, read)


def spec_of_meta(meta: dict) -> model.Spec:
    """The architecture that checked metadata (vocab and model config) describes."""
    return model.spec_of_config(len(meta["vocab"]), config.from_dict(meta["config"], "meta").model)


def _check_meta(path: Path, meta: dict) -> config.Config:
    """The parts of the metadata that loading and every command rely on: the fields' types, a
    valid config, a valid vocabulary, an objective that matches the model config, and a model that
    this machine can hold. Returns the config."""
    for key in ("vocab", "config"):
        if key not in meta:
            raise _fail(path, f"meta lacks {key!r}")
    bad = invalid_fields(meta, META_FIELDS)
    if bad:
        raise _fail(path, f"invalid meta ({bad[0]}); the file is damaged or was not written by charrnn")
    try:
        cfg = config.from_dict(meta["config"], "meta")
        Vocab.from_json(meta)
    except CharRNNError as e:
        raise _fail(path, f"invalid meta ({e})") from None
    except (TypeError, ValueError, AttributeError):
        raise _fail(path, "invalid meta (config must be a mapping, vocab a list of single characters)") from None
    objective = "cloze" if cfg.model.bidirectional else "next-char"
    if meta.get("objective", objective) != objective:
        raise _fail(path, f"invalid meta: objective {meta['objective']!r} does not match model.bidirectional="
                          f"{cfg.model.bidirectional}")
    _check_footprint(path, model.spec_of_config(len(meta["vocab"]), cfg.model), cfg)
    return cfg


def _check_footprint(path: Path, spec: model.Spec, cfg: config.Config) -> None:
    """Refuse a model that cannot fit this machine before any command allocates from meta's numbers:
    its parameters and the activations of one training window (train.batch_size x train.seq_len
    characters, each holding at least every layer's state and the V logits), in float32. The
    trainer held at least as much, so a checkpoint trained on a machine like this one passes."""
    params = sum(math.prod(s) for s in model.param_shapes(spec).values())
    per_char = len(spec.dirs) * spec.L * spec.state_size + spec.V
    need, limit = 4 * (params + cfg.train.batch_size * cfg.train.seq_len * per_char), memory_limit()
    if need > limit:
        raise _fail(path, f"its meta describes a model needing at least {need / 2**30:,.1f} GiB ({params:,} parameters, "
                          f"windows of {cfg.train.batch_size:,} x {cfg.train.seq_len:,} characters), more than this "
                          f"machine's memory ({limit / 2**30:.1f} GiB); refusing to load it")


def _allowed_entries(spec: model.Spec, train: config.TrainConfig) -> dict:
    """Every entry a checkpoint of this model and training config may hold (without ".npy"), with
    its largest size in bytes: each parameter (model.param_shapes), the slots of the configured
    optimizer for each (optim.SLOTS), and each tower layer's carried state (Spec.dirs, Spec.L,
    the cell's state_size) for train.batch_size streams."""
    shapes = model.param_shapes(spec)
    allowed = {name: 8 * math.prod(s) for name, s in shapes.items()}
    for slot in OPTIMIZER_SLOTS[train.optimizer]:
        allowed.update({optim_entry(slot, name): 8 * math.prod(s) for name, s in shapes.items()})
    for d in spec.dirs:
        allowed.update({state_entry(d, l): 8 * spec.state_size * train.batch_size for l in range(spec.L)})
    return allowed


def _wanted_entries(path: Path, zf: zipfile.ZipFile, spec: model.Spec, train: config.TrainConfig,
                    with_training_state: bool) -> list[zipfile.ZipInfo]:
    """The entries to read, each checked against the shapes meta implies and all together against
    this machine's memory, before any is read."""
    shapes = model.param_shapes(spec)
    allowed = {f"{name}.npy": size + HEADER_SLACK for name, size in _allowed_entries(spec, train).items()}
    for info in zf.infolist():
        if info.filename == "meta.npy":
            continue
        if info.filename not in allowed:
            raise _fail(path, f"unexpected entry {info.filename!r} for the {spec.cell} model trained with "
                              f"{train.optimizer} that its meta describes")
        if info.file_size > allowed[info.filename]:
            raise _fail(path, f"entry {info.filename} declares {info.file_size:,} bytes, more than its shape allows; "
                              "refusing to load it")
    wanted = [info for info in zf.infolist() if info.filename != "meta.npy"
              and (with_training_state or info.filename[: -len(".npy")] in shapes)]
    need, limit = sum(info.file_size for info in wanted), memory_limit()
    if need > limit:
        raise _fail(path, f"its arrays need {need / 2**30:.1f} GiB, more than this machine's memory "
                          f"({limit / 2**30:.1f} GiB); refusing to load it")
    return wanted


def load(target: str | Path, with_training_state: bool = True) -> Checkpoint:
    """Read and check a checkpoint (or a run directory's best/last). Raises CheckpointError."""
    path = resolve(target)

    def read(zf):
        meta = _read_meta(path, zf)
        cfg = _check_meta(path, meta)
        spec = model.spec_of_config(len(meta["vocab"]), cfg.model)
        wanted = _wanted_entries(path, zf, spec, cfg.train, with_training_state)
        arrays = {info.filename[: -len(".npy")]: _read_entry(path, zf, info) for info in wanted}
        return arrays, meta, spec
    return _check(path, *_open(path, read))


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
                raise _fail(path, f"optimizer entry {key} has shape {a.shape} / dtype {a.dtype}, "
                                  f"expected {tuple(shapes[parts[2]])} / {dtype}")
            optim.setdefault(parts[1], {})[parts[2]] = a
        elif parts[0] == "state":
            if a.ndim != 2 or a.shape[1] != spec.state_size or a.dtype != dtype:
                raise _fail(path, f"state entry {key} has shape {a.shape} / dtype {a.dtype}")
            state.setdefault(parts[1], {})[int(parts[2])] = a
        if parts[0] in ("optim", "state") and not np.isfinite(a).all():
            raise _fail(path, f"entry {key} holds NaN or Inf values")
    for slot, tensors in optim.items():  # a slot is the state of every parameter or of none
        missing = [name for name in shapes if name not in tensors]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise _fail(path, f"optimizer state optim/{slot} has no entry for parameter {missing[0]}{more}")
    state = {d: [layers[l] for l in sorted(layers)] for d, layers in state.items()}
    return Checkpoint(params, optim, state, meta, path, spec)
