"""Checkpoint I/O: safetensors files through the `safetensors` package, plus sharded directories.

A `.safetensors` file (Hugging Face's format) is three things back to back:

    [8 bytes: N, little-endian uint64][N bytes: JSON header][data: raw little-endian tensor bytes]

The header maps each tensor name to `{"dtype": "BF16", "shape": [2, 3], "data_offsets": [begin, end]}`,
offsets counted from the start of the data block; an optional `"__metadata__"` holds string pairs.
No pickle, so loading never runs code. A checkpoint directory is `config.json` plus either
`model.safetensors` or shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json` (`{"metadata": {"total_size": ...}, "weight_map": {name: file}}`).

The `safetensors` package parses and checks the header (sizes against shapes, the data block
covered exactly once, so no two tensors share bytes) and writes the files; its NumPy backend gives
bf16 as `ml_dtypes.bfloat16` (NumPy has no bf16 of its own), bit-exact, without torch.
What minivl adds on top:

* lazy reading: `SafetensorsFile` opens a file with `safe_open` and hands out read-only views into
  a memory map of it, so a checkpoint costs no RAM until the model casts its weights (one copy);
* a CheckpointError for every broken file that names the file and the fix (two overlapping
  tensors by name), and the refusal of pickle checkpoints (.bin/.pt), which run code when loaded;
* the shard-index checks of a sharded directory;
* atomic writes: every tensor is checked first, the files go to a staging path and are renamed
  into place (minivl/staging.py), so the previous checkpoint stays loadable until then;
* re-exported from minivl/state_dict.py: `check_state_dict` (does a state dict fit a model: ONE
  error listing every missing, unexpected and mis-shaped tensor) and `check_weights` (ONE error
  naming every int/bool or NaN/inf weight).
"""
from __future__ import annotations

import json
import mmap as mmaplib
import os
import re
import secrets
import shutil
from collections import ChainMap
from collections.abc import Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from minivl.errors import CheckpointError, ConfigError
from minivl.files import check_output_file
from minivl.staging import fsync_file, make_staging_dir, sweep_stale
from minivl.state_dict import check_state_dict, check_weights, name_list  # noqa: F401  (re-exported)

__all__ = ["SafetensorsFile", "read_safetensors", "write_safetensors", "load_state_dict", "open_checkpoint",
           "save_checkpoint", "check_state_dict", "check_weights", "SAFETENSORS_DTYPES", "SINGLE_FILE",
           "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# safetensors dtype code -> NumPy dtype, every one little-endian as the format stores it
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_FIX = "re-download or re-convert the checkpoint"


# ----------------------------------------------------------------------------------------------
# one .safetensors file
# ----------------------------------------------------------------------------------------------

def _overlapping_tensors(path: str) -> list[str]:
    """Pairs of tensors whose byte ranges overlap, read from the header by hand.

    Only used to explain a file the package refused: it says "invalid offset", not which tensors.
    """
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        spans = sorted((tuple(entry["data_offsets"]), name) for name, entry in header.items()
                       if name != "__metadata__")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []
    return [f"{first!r} {list(a)} and {second!r} {list(b)}"
            for (a, first), (b, second) in zip(spans, spans[1:]) if b[0] < a[1]]


def _open(path: str, framework: str):
    """safe_open, its SafetensorError turned into a CheckpointError naming the file and the fix."""
    try:
        return safe_open(path, framework=framework)
    except SafetensorError as err:
        overlaps = _overlapping_tensors(path) if "invalid offset" in str(err) else []
        if overlaps:
            raise CheckpointError(f"{path}: tensors {'; '.join(overlaps)} overlap in the data block (two tensors "
                                  f"would share bytes), which the format forbids; the file was written wrongly "
                                  f"or is corrupt: {_FIX}") from None
        raise CheckpointError(f"{path}: {err}; the file is truncated or corrupt: {_FIX}") from None


class SafetensorsFile(Mapping):
    """The tensors of one .safetensors file, `{name: array}`, each read only when looked up.

    `safe_open` checks the header: sizes against shapes, and the tensors back to back in offset
    order, the data block covered exactly once (no gap, no overlap, no trailing byte).
    framework="pt": the package's torch tensors, which are backed by its memory map (no copy).
    framework="numpy": each array is a read-only view into a memory map of the file, at the
    offsets that checked layout implies, so nothing is copied until the model casts a weight.
    (The package's NumPy `get_tensor` would copy each tensor out of its map, and the model's cast
    copy it a second time; `read_safetensors(..., mmap=False)` uses it, and tests hold the two
    readers bit-equal.) `.shapes`, `.dtypes` (safetensors codes) and `.metadata` come from the header.
    """

    def __init__(self, path: str | os.PathLike, framework: str = "numpy"):
        self.path = os.fspath(path)
        self.framework = framework
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such safetensors file")
        with open(self.path, "rb") as f:
            opened = os.fstat(f.fileno())
            self._handle = _open(self.path, framework)
            if os.stat(self.path).st_ino != opened.st_ino:
                raise CheckpointError(f"{self.path}: the file was replaced while it was being opened (a conversion "
                                      f"or save finishing now?); load it again")
            names = self._handle.offset_keys()  # in data order
            slices = {name: self._handle.get_slice(name) for name in names}
            self.dtypes = {name: piece.get_dtype() for name, piece in slices.items()}
            self.shapes = {name: tuple(piece.get_shape()) for name, piece in slices.items()}
            unreadable = {name: code for name, code in self.dtypes.items() if code not in SAFETENSORS_DTYPES}
            if unreadable:
                name, code = next(iter(unreadable.items()))
                more = f" (and {len(unreadable) - 1} more tensors)" if len(unreadable) > 1 else ""
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {code!r}{more}, which minivl does "
                                      f"not read (it reads {sorted(SAFETENSORS_DTYPES)}); {_FIX} in one of those")
            self.metadata = self._handle.metadata() or {}
            if framework == "numpy":
                self._spans, self._data = self._map(f, names, opened.st_size)

    def _map(self, f, names: list[str], file_size: int):
        """(name -> (begin, end) in the data block, the data block as a read-only uint8 memory map)."""
        spans, offset = {}, 0
        for name in names:
            # bytes = prod(shape) · itemsize, tensors back to back (the layout safe_open checked)
            n_bytes = int(np.prod(self.shapes[name], dtype=np.int64)) * SAFETENSORS_DTYPES[self.dtypes[name]].itemsize
            spans[name] = (offset, offset + n_bytes)
            offset += n_bytes
        if offset == 0:  # an empty data block cannot be memory-mapped
            return spans, np.zeros(0, dtype=np.uint8)
        mapped = mmaplib.mmap(f.fileno(), 0, access=mmaplib.ACCESS_READ)
        # the data block ends the file; the views keep the map alive, it closes with the last of them
        return spans, np.frombuffer(mapped, dtype=np.uint8, count=offset, offset=file_size - offset)

    def __getitem__(self, name: str):
        if name not in self.shapes:
            raise KeyError(name)
        if self.framework != "numpy":
            return self._handle.get_tensor(name)
        begin, end = self._spans[name]
        return self._data[begin:end].view(SAFETENSORS_DTYPES[self.dtypes[name]]).reshape(self.shapes[name])

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


def read_safetensors(path: str | os.PathLike, *, mmap: bool = True, with_metadata: bool = False):
    """Every tensor of a .safetensors file as NumPy arrays (bf16 as `ml_dtypes.bfloat16`).

    mmap=True (default): a `SafetensorsFile`, read-only views into the memory-mapped file, which
    cost no RAM until used (`.astype` / `.copy()` for an array of your own); mmap=False: a dict of
    arrays of their own, every tensor read now by the package's NumPy backend. Returns `{name: array}`, or
    `({name: array}, metadata)` with `with_metadata=True`.
    Raises CheckpointError naming the file for a missing, truncated or corrupt file.
    """
    tensors = SafetensorsFile(path)
    metadata = tensors.metadata
    if not mmap:
        # the package's own reader: each tensor copied out of its map into an array of its own
        tensors = {name: tensors._handle.get_tensor(name) for name in tensors}
    return (tensors, metadata) if with_metadata else tensors


def _checked_arrays(tensors: Mapping, where: str) -> dict[str, np.ndarray]:
    """Every tensor checked BEFORE anything is written -> {name: little-endian C-contiguous array}.

    One CheckpointError lists every tensor that a safetensors file in minivl cannot hold.
    """
    problems, arrays = [], {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            problems.append(f"tensor name {name!r} is not allowed (use a non-empty string other than '__metadata__')")
        elif not isinstance(value, np.ndarray):
            problems.append(f"tensor {name!r} is a {type(value).__name__}, not a NumPy array (convert it with "
                            f"np.asarray; torch tensors: torch_impl.checkpoint.save_checkpoint)")
        elif value.dtype.newbyteorder("<") not in _CODE_OF_DTYPE and value.dtype not in _CODE_OF_DTYPE:
            problems.append(f"tensor {name!r} has dtype {value.dtype}, which safetensors files in minivl cannot hold "
                            f"(cast it to one of {sorted(str(d) for d in _CODE_OF_DTYPE)})")
        else:
            # the format is little-endian whatever the machine, and stores each tensor as one dense run
            little = value.astype(value.dtype.newbyteorder("<"), copy=False) if value.dtype.byteorder == ">" else value
            # (not np.ascontiguousarray: it turns a 0-d array into shape (1,))
            arrays[name] = little if little.flags.c_contiguous else little.copy(order="C")
    if problems:
        raise CheckpointError(f"{where}: nothing was written, {len(problems)} tensors cannot be saved: "
                              + name_list(problems, separator="; "))
    return arrays


def _new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 without the process's umask bits."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_error(path: str, err: SafetensorError) -> Exception:
    """The package's write failure as an OSError naming `path` when the OS refused (its text carries
    'os error N': disk full, read-only, ...), else a CheckpointError."""
    match = re.search(r"os error (\d+)", str(err))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code), path)  # OSError picks the subclass of the errno
    return CheckpointError(f"{path}: the safetensors package could not write the file ({err}); nothing was "
                           f"written under that name")


def write_safetensors(path: str | os.PathLike, tensors: Mapping, metadata: dict | None = None) -> str:
    """Write `{name: np.ndarray}` as a .safetensors file (the `safetensors` package lays it out).

    Atomic: every tensor is checked first, the bytes go to a staging file next to `path`, which is
    flushed to disk and renamed over `path`; a crash never leaves a half file under that name.
    """
    path = check_output_file(path)
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"{path}: tensors must be a mapping {{name: np.ndarray}} (got {type(tensors).__name__})")
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(f"{path}: metadata must map strings to strings (got {metadata!r})")
    arrays = _checked_arrays(tensors, path)
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    sweep_stale(parent)
    staging = os.path.join(parent, f".{name}.staging.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        try:
            save_file(arrays, staging, metadata=metadata)
        except SafetensorError as err:
            raise _write_error(path, err) from None
        os.chmod(staging, _new_file_mode())  # the package writes mode 0600; a checkpoint is an ordinary file
        fsync_file(staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# a checkpoint directory
# ----------------------------------------------------------------------------------------------

def _refuse_pickles(directory: str) -> None:
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json"))
    if pickles:
        raise CheckpointError(
            f"{directory}: holds pickle checkpoint files ({', '.join(pickles)}) and no {SINGLE_FILE}. minivl does "
            f"not load pickles: unpickling can run arbitrary code and needs torch. Convert once, where torch "
            f"is installed: python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('pytorch_model.bin', map_location='cpu', weights_only=True); "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, 'model.safetensors', metadata={{'format': 'pt'}})\" "
            f"(once per shard for a sharded checkpoint, then write {INDEX_FILE})")


def _read_index(index_path: str) -> dict:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{index_path}: not valid JSON ({type(err).__name__}: {err}); {_FIX}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index_path}: needs a 'weight_map' object mapping tensor names to shard files; {_FIX}")
    return weight_map


def _check_shards(index_path: str, weight_map: dict, shards: list[SafetensorsFile]) -> None:
    """The index and its shards must agree: each listed tensor in exactly the shard the index names."""
    found: dict[str, list[str]] = {}
    for shard in shards:
        for name in shard:
            found.setdefault(name, []).append(os.path.basename(shard.path))
    absent = sorted(name for name in weight_map if name not in found)
    if absent:
        raise CheckpointError(f"{index_path}: {len(absent)} tensors listed in the index are in no shard "
                              f"({name_list(absent)}); {_FIX}")
    twice = sorted(f"{name} ({', '.join(files)})" for name, files in found.items() if len(files) > 1)
    if twice:
        raise CheckpointError(f"{index_path}: {len(twice)} tensors are in more than one shard ({name_list(twice)}), "
                              f"so which one loads is ambiguous; {_FIX}")
    moved = sorted(f"{name} (index: {weight_map[name]}, found in {found[name][0]})" for name in weight_map
                   if found[name][0] != weight_map[name])
    if moved:
        raise CheckpointError(f"{index_path}: {len(moved)} tensors are not in the shard the index names "
                              f"({name_list(moved)}); the index belongs to other shards: {_FIX}")


def open_checkpoint(directory: str | os.PathLike, framework: str = "numpy") -> list[SafetensorsFile]:
    """The safetensors files of a checkpoint (a directory, single file or shards + index, or one
    file), opened lazily, after the pickle refusal and the shard-index checks."""
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        if directory.endswith(PICKLE_SUFFIXES):
            _refuse_pickles(os.path.dirname(os.path.abspath(directory)) or ".")
        return [SafetensorsFile(directory, framework)]
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory or file")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = _read_index(index_path)
        shards = []
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index_path}: lists shard {shard!r}, which is missing from {directory}; {_FIX}")
            shards.append(SafetensorsFile(shard_path, framework))
        _check_shards(index_path, weight_map, shards)
        return shards
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return [SafetensorsFile(single, framework)]
    if os.path.exists(single):
        raise CheckpointError(f"{single} is a directory or other non-file, not a safetensors file; {_FIX}")
    _refuse_pickles(directory)
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}; a checkpoint directory holds "
                          f"config.json and one of those")


def load_state_dict(directory: str | os.PathLike) -> Mapping:
    """All tensors of a checkpoint: a directory (single file or shards + index) or one .safetensors file.

    Returns `{name: array}` in the file's dtypes (bf16 as `ml_dtypes.bfloat16`), read-only views
    into the memory-mapped files (one mapping over all shards).
    """
    shards = open_checkpoint(directory)
    return shards[0] if len(shards) == 1 else ChainMap(*shards)


_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _shards(tensors: dict, max_shard_bytes: int | None) -> list[list[str]]:
    """Split names (sorted) into consecutive groups of at most max_shard_bytes; a bigger tensor sits alone."""
    groups, size = [[]], 0
    for name in sorted(tensors):
        n_bytes = tensors[name].nbytes
        if max_shard_bytes is not None and groups[-1] and size + n_bytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n_bytes
    return groups


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(_json_text(obj, path))


def _json_text(obj, where: str) -> str:
    """obj as the standard JSON transformers writes (indented, sorted keys); CheckpointError when JSON cannot hold it."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:  # an object json cannot write; NaN/inf, which standard JSON has not
        raise CheckpointError(f"{where}: the config cannot be written as JSON ({err}); keep to strings, numbers, "
                              f"booleans, null, lists and dicts, with finite numbers") from None


def _write_weights(staging: str, arrays: dict, groups: list[list[str]]) -> list[str]:
    """model.safetensors, or shards + index, into `staging`; returns the file names, index last."""
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(groups) == 1:
        write_safetensors(os.path.join(staging, SINGLE_FILE), arrays, metadata)
        return [SINGLE_FILE]
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(staging, shard), {name: arrays[name] for name in names}, metadata)
        weight_map.update({name: shard for name in names})
    index = {"metadata": {"total_size": sum(int(t.nbytes) for t in arrays.values())}, "weight_map": weight_map}
    _write_json(os.path.join(staging, INDEX_FILE), index)
    return sorted(set(weight_map.values())) + [INDEX_FILE]


def save_checkpoint(directory: str | os.PathLike, config, tensors: Mapping, max_shard_bytes: int | None = None) -> str:
    """Write a checkpoint directory: config.json and model.safetensors, or shards + index.

    `config` is a minivl config (anything with `to_dict`), a plain dict, or None to write no
    config.json. Atomic: every tensor is checked first (a bad one changes nothing on disk), all
    files are written into a staging directory inside `directory`, then renamed into place, the
    weights first and config.json last; weight files of an older checkpoint that the new one does
    not have (shards, index) are removed after that, so old and new files never mix. Until the
    renames the previous checkpoint stays loadable; a staging directory left by a killed writer
    is swept by the next save. Returns the directory.
    """
    directory = os.fspath(directory)
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes <= 0):
        raise CheckpointError(f"max_shard_bytes must be a positive integer or None (got {max_shard_bytes!r})")
    if not str(directory).strip():
        raise ConfigError("the checkpoint directory is empty; pass the path of the directory to write")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{directory!r} exists and is not a directory; pass a directory path for the checkpoint "
                              f"(or move the file away)")
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"{directory}: tensors must be a mapping {{name: np.ndarray}} "
                              f"(got {type(tensors).__name__})")
    if not (config is None or hasattr(config, "to_dict") or isinstance(config, Mapping)):
        raise CheckpointError(f"{directory}: config must be a minivl config, a dict or None (got {type(config).__name__})")
    arrays = _checked_arrays(tensors, directory)
    config_dict = None if config is None else (config.to_dict() if hasattr(config, "to_dict") else dict(config))
    if config_dict is not None:
        _json_text(config_dict, os.path.join(directory, "config.json"))  # refused before anything is written
    os.makedirs(directory, exist_ok=True)
    sweep_stale(directory)
    staging = str(make_staging_dir(directory, "checkpoint"))
    try:
        written = _write_weights(staging, arrays, _shards(arrays, max_shard_bytes))
        if config_dict is not None:
            _write_json(os.path.join(staging, "config.json"), config_dict)
        old = [f for f in os.listdir(directory) if f in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(f)]
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        # the index first: while it exists the loader reads the shards it lists
        for name in sorted(set(old) - set(written), key=lambda f: f != INDEX_FILE):
            os.remove(os.path.join(directory, name))
        if config_dict is not None:
            os.replace(os.path.join(staging, "config.json"), os.path.join(directory, "config.json"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
