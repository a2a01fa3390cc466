"""Pixel shuffle of InternVL in torch: merge each r×r block of ViT patch tokens into one wider token.

Mirror of minivl/pixel_shuffle.py (see there for the closed form); the same view/permute steps
as `InternVLChatModel.pixel_shuffle` in modeling_internvl_chat.py.
"""
from __future__ import annotations

import warnings

import torch

from minivl.pixel_shuffle import check_grid, merge_factor, num_image_token  # noqa: F401  (framework-free)


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """Space-to-depth merge of r×r token blocks, InternVL's convention.

    [n, rows, cols, C] -> [n, rows·s, cols·s, C/s²]   (v1: [n, cols·s, rows·s, C/s²], transposed grid)
    """
    check_grid(tuple(x.shape), scale_factor, ps_version)
    n, rows, cols, channels = x.shape
    # glue each run of 1/s neighbouring columns along channels: [n, rows, cols·s, C/s]
    x = x.reshape(n, rows, int(cols * scale_factor), int(channels / scale_factor))
    # swap the grid axes: [n, cols·s, rows, C/s]
    x = x.permute(0, 2, 1, 3).contiguous()
    # glue each run of 1/s neighbouring rows along channels: [n, cols·s, rows·s, C/s²]
    x = x.view(n, int(cols * scale_factor), int(rows * scale_factor),
               int(channels / (scale_factor * scale_factor)))
    if ps_version == "v1":
        warnings.warn("In ps_version 'v1', the height and width have not been swapped back, "
                      "which results in a transposed image.", stacklevel=2)
        return x
    # v2 swaps the grid back to [n, rows·s, cols·s, C/s²]
    return x.permute(0, 2, 1, 3).contiguous()
