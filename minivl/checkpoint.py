"""Checkpoint I/O: the safetensors format read and written in plain NumPy, plus sharded directories.

A `.safetensors` file (Hugging Face's format) is three things back to back:

    [8 bytes: N, little-endian uint64][N bytes: JSON header][data: raw little-endian tensor bytes]

The header maps each tensor name to `{"dtype": "BF16", "shape": [2, 3], "data_offsets": [begin, end]}`,
offsets counted from the start of the data block; an optional `"__metadata__"` holds string pairs.
No pickle, so loading never runs code. A checkpoint directory is `config.json` plus either
`model.safetensors` or shards `model-0000k-of-0000n.safetensors` listed in
`model.safetensors.index.json` (`{"metadata": {"total_size": ...}, "weight_map": {name: file}}`).

bfloat16 has no NumPy dtype of its own: `ml_dtypes.bfloat16` gives one, bit-exact, without torch.
"""
from __future__ import annotations

import json
import mmap as mmaplib
import os
import re

import ml_dtypes
import numpy as np

from minivl.errors import CheckpointError

__all__ = ["read_safetensors", "write_safetensors", "load_state_dict", "save_checkpoint", "check_state_dict",
           "SAFETENSORS_DTYPES", "SINGLE_FILE", "INDEX_FILE"]

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
# the reference implementation refuses headers above 100 MB; a larger length means a corrupt file
_MAX_HEADER_BYTES = 100_000_000
_FIX = "re-download or re-convert the checkpoint"


def _corrupt(path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; the file is truncated or corrupt: {_FIX}")


# ----------------------------------------------------------------------------------------------
# one .safetensors file
# ----------------------------------------------------------------------------------------------

def _read_header(path: str, file_size: int) -> tuple[dict, int]:
    """Parse the length prefix and JSON header. Returns (header dict, offset of the data block)."""
    if file_size < 8:
        raise _corrupt(path, f"only {file_size} bytes, less than the 8-byte header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise _corrupt(path, f"header length {header_len} is larger than the file ({file_size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"the header is a JSON {type(header).__name__}, not an object")
    return header, 8 + header_len


def _tensor_entry(path: str, name: str, entry, data_size: int) -> tuple[np.dtype, tuple, int, int]:
    """Check one header entry against the format and the file; returns (dtype, shape, begin, end)."""
    if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= set(entry)):
        raise _corrupt(path, f"tensor {name!r} has header entry {entry!r}, not {{dtype, shape, data_offsets}}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which minivl does not read "
                              f"(it reads {sorted(SAFETENSORS_DTYPES)}); {_FIX} in one of those")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise _corrupt(path, f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    dtype, (begin, end) = SAFETENSORS_DTYPES[code], offsets
    if not 0 <= begin <= end <= data_size:
        raise _corrupt(path, f"tensor {name!r} has data_offsets [{begin}, {end}] outside the "
                             f"{data_size}-byte data block")
    # bytes = prod(shape) · itemsize
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != n_bytes:
        raise _corrupt(path, f"tensor {name!r} of shape {shape} {code} needs {n_bytes} bytes but its "
                             f"data_offsets [{begin}, {end}] hold {end - begin}")
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | os.PathLike, *, mmap: bool = True, with_metadata: bool = False):
    """Read every tensor of a .safetensors file into NumPy arrays (bf16 as `ml_dtypes.bfloat16`).

    With `mmap=True` (default) the arrays are read-only views into a memory map of the file, so a
    multi-GB checkpoint costs no RAM until used (`.astype` / `.copy()` to get your own array).
    Returns `{name: array}`, or `({name: array}, metadata)` with `with_metadata=True`.
    Raises CheckpointError naming the file for a missing, truncated or corrupt file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such safetensors file")
    file_size = os.path.getsize(path)
    header, data_start = _read_header(path, file_size)
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _corrupt(path, f"__metadata__ must map strings to strings, got {metadata!r}")
    data_size = file_size - data_start
    entries = {name: _tensor_entry(path, name, entry, data_size) for name, entry in header.items()}

    if data_size == 0:  # an empty data block cannot be memory-mapped
        data = np.zeros(0, dtype=np.uint8)
    elif mmap:
        with open(path, "rb") as f:
            mapped = mmaplib.mmap(f.fileno(), 0, access=mmaplib.ACCESS_READ)
        # the arrays keep the map alive; it closes when the last of them is gone
        data = np.frombuffer(mapped, dtype=np.uint8, count=data_size, offset=data_start)
    else:
        with open(path, "rb") as f:
            f.seek(data_start)
            data = np.frombuffer(f.read(), dtype=np.uint8)
    tensors = {name: data[begin:end].view(dtype).reshape(shape)
               for name, (dtype, shape, begin, end) in entries.items()}
    return (tensors, metadata) if with_metadata else tensors


def _safetensors_code(name: str, array: np.ndarray) -> str:
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _CODE_OF_DTYPE:
        raise CheckpointError(f"tensor {name!r} has dtype {array.dtype}, which safetensors files in minivl "
                              f"cannot hold; cast it to one of {sorted(str(d) for d in _CODE_OF_DTYPE)}")
    return _CODE_OF_DTYPE[dtype]


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> str:
    """Write `{name: np.ndarray}` as a .safetensors file readable by the `safetensors` package.

    Tensors are laid out biggest itemsize first (then by name), after a header padded to a multiple
    of 8 bytes, so every tensor's data starts aligned to its itemsize, as safetensors lays them out.
    The file is written to a temporary name and renamed, so a crash never leaves a half file.
    """
    path = os.fspath(path)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(f"{path}: metadata must map strings to strings (got {metadata!r})")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"{path}: tensor name {name!r} is not allowed; use a non-empty string key")
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: tensor {name!r} is a {type(value).__name__}, not a NumPy array; "
                                  f"convert it with np.asarray (torch: torch_impl.checkpoint.save_checkpoint)")
        arrays[name] = value
    codes = {name: _safetensors_code(name, array) for name, array in arrays.items()}
    order = sorted(arrays, key=lambda name: (-arrays[name].dtype.itemsize, name))

    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name in order:
        n_bytes = arrays[name].nbytes
        header[name] = {"dtype": codes[name], "shape": list(arrays[name].shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # pad with spaces so the data block starts at a multiple of 8 bytes
    header_bytes += b" " * (-(8 + len(header_bytes)) % 8)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name in order:
            array = arrays[name]
            # the format is little-endian whatever the machine
            little = array.astype(array.dtype.newbyteorder("<"), copy=False) if array.dtype.byteorder == ">" else array
            f.write(np.ascontiguousarray(little).tobytes())
    os.replace(tmp_path, path)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index_path}: not valid JSON ({err}); {_FIX}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index_path}: needs a 'weight_map' object mapping tensor names to shard files; {_FIX}")
    return weight_map


def load_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint: a directory (single file or shards + index) or one .safetensors file.

    Returns `{name: array}` in the file's dtypes (bf16 as `ml_dtypes.bfloat16`), memory-mapped.
    """
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        if directory.endswith(PICKLE_SUFFIXES):
            _refuse_pickles(os.path.dirname(os.path.abspath(directory)) or ".")
        return read_safetensors(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory or file")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = _read_index(index_path)
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index_path}: lists shard {shard!r}, which is missing from {directory}; {_FIX}")
            tensors.update(read_safetensors(shard_path))
        absent = sorted(name for name, shard in weight_map.items() if name not in tensors)
        if absent:
            raise CheckpointError(f"{index_path}: {len(absent)} tensors listed in the index are in no shard "
                                  f"({_name_list(absent)}); {_FIX}")
        return tensors
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return read_safetensors(single)
    _refuse_pickles(directory)
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}; a checkpoint directory holds "
                          f"config.json and one of those")


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


def save_checkpoint(directory: str | os.PathLike, config, tensors: dict, max_shard_bytes: int | None = None) -> str:
    """Write a checkpoint directory: config.json and model.safetensors, or shards + index.

    `config` is a minivl config (anything with `to_dict`), a plain dict, or None to write no
    config.json. Files carry `{"format": "pt"}` metadata, which transformers requires. Older
    model*.safetensors files and index of this directory are removed first so they cannot mix.
    Returns the directory.
    """
    directory = os.fspath(directory)
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0):
        raise CheckpointError(f"max_shard_bytes must be a positive integer or None (got {max_shard_bytes!r})")
    os.makedirs(directory, exist_ok=True)
    if config is not None:
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)
            f.write("\n")
    for old in os.listdir(directory):
        if old in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(old):
            os.remove(os.path.join(directory, old))

    groups = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(groups) == 1:
        write_safetensors(os.path.join(directory, SINGLE_FILE), tensors, metadata)
        return directory
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(directory, shard), {name: tensors[name] for name in names}, metadata)
        weight_map.update({name: shard for name in names})
    index = {"metadata": {"total_size": sum(int(t.nbytes) for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory


# ----------------------------------------------------------------------------------------------
# does a state dict fit a model?
# ----------------------------------------------------------------------------------------------

_MAX_LISTED = 20


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def check_state_dict(tensors: dict, expected: dict, where: str = "") -> None:
    """Raise ONE CheckpointError listing every missing, unexpected and mis-shaped tensor.

    `tensors`: `{name: array}` (anything with `.shape`: NumPy arrays, torch tensors);
    `expected`: `{name: shape tuple}` from the model's `expected_shapes(config)`.
    Each list shows the first 20 names and a count of the rest.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(name for name in set(expected) & set(tensors)
                         if tuple(tensors[name].shape) != tuple(expected[name]))
    if not (missing or unexpected or wrong_shape):
        return
    counts = ", ".join(f"{n} {what}" for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"),
                                                      (len(wrong_shape), "with the wrong shape")) if n)
    lines = [f"{where + ': ' if where else ''}the checkpoint does not fit the model: {counts} tensors"]
    if missing:
        lines.append(f"  missing {len(missing)}: {_name_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)}: {_name_list(unexpected)}")
    if wrong_shape:
        shapes = [f"{name} (checkpoint {tuple(tensors[name].shape)}, model {tuple(expected[name])})"
                  for name in wrong_shape]
        lines.append(f"  wrong shape {len(wrong_shape)}: {_name_list(shapes)}")
    lines.append("  fix: check that config.json belongs to these weights (sizes, layer count, qkv_bias, "
                 "LLM architecture), or re-convert the checkpoint")
    raise CheckpointError("\n".join(lines))
