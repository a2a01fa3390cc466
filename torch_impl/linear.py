"""The affine map every projection uses, in torch's Linear layout (weight is [out, in])."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minivl.linear import check_linear_args


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ + b, with W stored as [out, in] exactly as torch.nn.Linear and the checkpoints store it.

    [..., in], [out, in], [out] -> [..., out]
    """
    check_linear_args(x, weight, bias)
    # y = x·Wᵀ + b: F.linear is what nn.Linear (and so every reference model) calls
    return F.linear(x, weight, bias)
