"""The affine map every projection uses, in torch's Linear layout (weight is [out, in])."""
from __future__ import annotations

import numpy as np

from minivl.errors import ShapeError


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x·Wᵀ + b, with W stored as [out, in] exactly as torch.nn.Linear and the checkpoints store it.

    [..., in], [out, in], [out] -> [..., out]
    """
    check_linear_args(x, weight, bias)
    # y = x·Wᵀ: one matmul over all leading axes (batch, tokens) at once
    y = x @ weight.T
    if bias is not None:
        y += bias  # y is the product's fresh array: add in place (the same sum, no second [..., out] array)
    return y


def check_linear_args(x, weight, bias, name: str = "linear") -> None:
    """Raise ShapeError naming the mismatch if x, weight, bias cannot form x·Wᵀ + b."""
    if weight.ndim != 2:
        raise ShapeError(f"{name}: weight must be 2-D [out, in] (torch Linear layout), got shape "
                         f"{tuple(weight.shape)}; pass the checkpoint tensor as stored, not reshaped")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"{name}: x has {x.shape[-1] if x.ndim else 'no'} features (shape {tuple(x.shape)}) "
                         f"but weight [out, in] = {tuple(weight.shape)} expects in={weight.shape[1]}; "
                         f"if the weight is [in, out] transpose it first")
    if x.dtype != weight.dtype:
        raise ShapeError(f"{name}: x is {x.dtype} but weight is {weight.dtype}; cast the weights to the "
                         f"model dtype when loading (a silent promotion would hide a precision bug)")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ShapeError(f"{name}: bias must have shape ({weight.shape[0]},) to match weight "
                             f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ShapeError(f"{name}: bias is {bias.dtype} but weight is {weight.dtype}; load both in the "
                             f"model dtype")
