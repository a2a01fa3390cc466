"""Bicubic resizing with PyTorch's semantics: the mirror of minivl/interpolate.py.

Here it is simply `F.interpolate(mode="bicubic", align_corners=False)`, the call InternViT's
`_get_pos_embed` makes (A = −0.75, half-pixel coordinates, edge-clamped taps, no antialias).
minivl/interpolate.py writes the same kernel out in NumPy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minivl.errors import ShapeError

# Keys' cubic-convolution coefficient PyTorch hard-codes for mode="bicubic"
CUBIC_A = -0.75


def interpolate_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torch's bicubic resize, align_corners=False, no antialias.

    [n, c, h_in, w_in] -> [n, c, h_out, w_out], same float dtype.
    """
    if x.ndim != 4:
        raise ShapeError(f"interpolate_bicubic expects [n, c, h, w], got shape {tuple(x.shape)}; "
                         f"add the missing batch/channel axes with x[None] or reshape")
    if x.dtype not in (torch.float32, torch.float64):
        raise ShapeError(f"interpolate_bicubic computes in float32 or float64, got {x.dtype}; "
                         f"cast first (the reference resizes position tables in float32)")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ShapeError(f"interpolate_bicubic output size must be positive, got {size}")
    return F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)
