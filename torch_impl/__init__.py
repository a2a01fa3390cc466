"""torch_impl: the PyTorch mirror of minivl, with fast attention backends (sdpa, flash, triton)."""

__version__ = "0.1.0"


def load_model(path, dtype="float32", device="cpu", attn_implementation="eager", component=None,
               allow_nonfinite=False):
    """Load a checkpoint directory into the matching torch model (nn.Module, eval mode).

    allow_nonfinite=True loads NaN/inf weights (refused by default: a CheckpointError names them).
    """
    from torch_impl.loading import load_model as _load_model

    return _load_model(path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                       component=component, allow_nonfinite=allow_nonfinite)
