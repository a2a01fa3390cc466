"""Load a checkpoint directory into the torch model its model_type names (mirror of minivl/loading.py).

    model = load_model("InternVL2-1B/", dtype="bfloat16", device="cuda", attn_implementation="flash")
    llm = load_model("InternVL2-1B/", component="language_model")
"""
from __future__ import annotations

import inspect
import os

from minivl.errors import DeviceError
from minivl.loading import plan_load, strip_prefix
from torch_impl.models.common import as_model_dtype, check_attn_implementation


def load_model(path, dtype="float32", device="cpu", attn_implementation="eager", component=None,
               allow_nonfinite=False):
    """Read `path` into the matching torch model (eval mode, no grad).

    dtype: float32 | float64 | bfloat16 | float16; device: 'cpu', 'cuda', ...;
    attn_implementation: eager (the reference's op order) | sdpa | flash (CUDA fp16/bf16) | triton.
    Int/bool weights, and NaN/inf ones unless allow_nonfinite=True, are a CheckpointError naming them.
    """
    from torch_impl.checkpoint import check_weights, load_state_dict
    from torch_impl.models import MODEL_REGISTRY

    check_attn_implementation(attn_implementation)
    check_device(device)
    torch_dtype = as_model_dtype(dtype)
    config, cls, prefix = plan_load(path, component, MODEL_REGISTRY)
    # read in the checkpoint's own dtype; from_state_dict casts once, after the prefix is stripped
    state_dict = strip_prefix(load_state_dict(path, device="cpu"), prefix)
    check_weights(state_dict, where=os.fspath(path), allow_nonfinite=allow_nonfinite)
    accepted = inspect.signature(cls.from_state_dict).parameters
    kwargs = {name: value for name, value in (("device", device), ("attn_implementation", attn_implementation))
              if name in accepted}
    return cls.from_state_dict(config, state_dict, torch_dtype, **kwargs)


def check_device(device, what: str = "device") -> None:
    """DeviceError, before any weights are read, for a device this torch cannot use (`what` names the argument)."""
    import torch

    cpu = f"{what} cpu" if what.startswith("--") else "device='cpu'"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"{what} {device!r} is not a device torch knows ({e}); use {cpu}, or cuda / cuda:N "
                          f"on a machine with an NVIDIA GPU") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "torch finds no CUDA GPU on this machine")
            raise DeviceError(f"{what} {device}: {why}; use {cpu}, or a CUDA build of torch on a machine "
                              f"with an NVIDIA GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            first = f"{what} cuda:0" if what.startswith("--") else "device='cuda:0'"
            raise DeviceError(f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0; use {first}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{what} {device}: this torch or machine has no Apple GPU (MPS); use {cpu}")
    elif parsed.type != "cpu":
        raise DeviceError(f"{what} {device!r}: torch_impl runs on cpu and cuda (mps where available), "
                          f"not on {parsed.type}")
