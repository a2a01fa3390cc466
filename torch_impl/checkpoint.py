"""Checkpoint I/O for torch_impl: the same files and checks as `minivl.checkpoint`, read as torch tensors.

`minivl.checkpoint.open_checkpoint` does the pickle refusal and the shard-index checks and opens
each file with the `safetensors` package, here with framework="pt": its torch tensors are backed by
the memory-mapped file itself, so the bytes are copied at most once, by a cast to `dtype` or the
move to `device`. Writing converts to NumPy (bf16 through an int16 bit view, no rounding) and
goes through minivl's atomic writer.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import torch

from minivl import checkpoint as np_checkpoint
from minivl.checkpoint import check_state_dict, check_weights, read_safetensors, write_safetensors  # noqa: F401
from minivl.errors import CheckpointError

__all__ = ["load_state_dict", "save_checkpoint", "check_state_dict", "check_weights", "read_safetensors",
           "write_safetensors", "to_torch", "to_numpy"]

_DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def _torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"dtype must be None, a torch dtype or one of {sorted(_DTYPE_NAMES)} (got {dtype!r})")
    return _DTYPE_NAMES[dtype]


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A NumPy array (bf16 included) as a torch tensor with the same bits, in memory of its own."""
    if array.dtype == ml_dtypes.bfloat16:
        # same 16 bits, reinterpreted: no float round trip
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU copy of a torch tensor as NumPy, bf16 as `ml_dtypes.bfloat16` (same bits)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def load_state_dict(directory: str | os.PathLike, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint as torch tensors; floating ones cast to `dtype` if given.

    Integer and bool tensors keep their dtype. `dtype`: None (keep the file's), a torch dtype, or
    "float32" / "float64" / "float16" / "bfloat16".
    """
    target = _torch_dtype(dtype)
    state_dict = {}
    for shard in np_checkpoint.open_checkpoint(directory, framework="pt"):
        for name, tensor in shard.items():
            if target is not None and tensor.is_floating_point():
                tensor = tensor.to(target)
            state_dict[name] = tensor.to(device)
    return state_dict


def save_checkpoint(directory: str | os.PathLike, config, tensors: dict, max_shard_bytes: int | None = None) -> str:
    """Write torch tensors (or NumPy arrays) as a checkpoint directory, as `minivl.checkpoint.save_checkpoint`."""
    arrays = {name: to_numpy(t) if isinstance(t, torch.Tensor) else t for name, t in tensors.items()}
    return np_checkpoint.save_checkpoint(directory, config, arrays, max_shard_bytes)
