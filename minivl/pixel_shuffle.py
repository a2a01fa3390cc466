"""Pixel shuffle of InternVL: merge each r×r block of ViT patch tokens into one wider token.

With downsample ratio s = 0.5 (r = 1/s = 2) a 32×32 grid of C-wide patch features becomes a
16×16 grid of 4C-wide features, so a 448-px tile costs the LLM 256 tokens instead of 1024.
Follows `InternVLChatModel.pixel_shuffle` (modeling_internvl_chat.py) step for step: the same
three reshapes/transposes give the same channel packing. Closed form, for s = 0.5 and
m = dr·2C + dc·C + ch (dr, dc ∈ {0, 1}):

    v2:  Z[n, r2, c2, m] = X[n, 2·r2 + dr, 2·c2 + dc, ch]     (token r2·(cols/2) + c2)
    v1:  the same blocks, but the output grid is transposed: Z[n, c2, r2, m] holds block (r2, c2)

so the merged vector is [top-left | top-right | bottom-left | bottom-right]. Every InternVL
1.5 / 2 / 2.5 release uses v2; v1 is kept because old checkpoints were trained with it.
"""
from __future__ import annotations

import warnings

import numpy as np

from minivl.errors import ConfigError, ShapeError


def merge_factor(scale_factor: float) -> int:
    """r = 1/s as an int (2 for InternVL's 0.5), or ConfigError if 1/s is not a whole number."""
    if not isinstance(scale_factor, (int, float)) or scale_factor <= 0 or scale_factor > 1:
        raise ConfigError(f"downsample_ratio must be a float in (0, 1] (got {scale_factor!r}); InternVL uses 0.5")
    factor = round(1.0 / scale_factor)
    if abs(factor * scale_factor - 1.0) > 1e-9:
        raise ConfigError(f"downsample_ratio must be 1/r for a whole number r (got {scale_factor!r}); "
                          "InternVL uses 0.5")
    return factor


def num_image_token(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """LLM tokens per tile, InternVL's formula: int((image_size // patch_size)² · downsample_ratio²).

    256 for 448 px, 14, 0.5. The one place this count is computed (config, CLI and lessons use it);
    InternVLChatConfig also checks that this float formula equals the (side/r)² tokens the shuffle makes.
    """
    merge_factor(downsample_ratio)  # a ratio of 0 or 0.3 is a ConfigError here, not "0 tokens"
    return int((image_size // patch_size) ** 2 * (downsample_ratio ** 2))


def check_grid(x_shape, scale_factor: float, ps_version: str) -> int:
    """Validate a [n, rows, cols, C] feature grid for pixel shuffle; return the merge factor r."""
    if ps_version not in ("v1", "v2"):
        raise ConfigError(f"ps_version must be 'v1' or 'v2' (got {ps_version!r}); InternVL 1.5 and later use 'v2'")
    factor = merge_factor(scale_factor)
    if len(x_shape) != 4:
        raise ShapeError(f"pixel_shuffle expects [n, rows, cols, C] features, got shape {tuple(x_shape)}")
    _, rows, cols, _ = x_shape
    if rows % factor or cols % factor:
        raise ShapeError(f"pixel_shuffle with downsample_ratio {scale_factor} needs rows and cols divisible "
                         f"by {factor}, got a {rows}×{cols} grid; use tiles whose patch grid is a multiple of {factor}")
    return factor


def pixel_shuffle(x: np.ndarray, scale_factor: float = 0.5, ps_version: str = "v2") -> np.ndarray:
    """Space-to-depth merge of r×r token blocks, InternVL's convention (module docstring).

    [n, rows, cols, C] -> [n, rows·s, cols·s, C/s²]   (v1: [n, cols·s, rows·s, C/s²], transposed grid)
    """
    check_grid(x.shape, scale_factor, ps_version)
    n, rows, cols, channels = x.shape
    # glue each run of 1/s neighbouring columns along channels: [n, rows, cols·s, C/s]
    x = x.reshape(n, rows, int(cols * scale_factor), int(channels / scale_factor))
    # swap the grid axes: [n, cols·s, rows, C/s]
    x = x.transpose(0, 2, 1, 3)
    # glue each run of 1/s neighbouring rows along channels: [n, cols·s, rows·s, C/s²]
    x = x.reshape(n, int(cols * scale_factor), int(rows * scale_factor),
                  int(channels / (scale_factor * scale_factor)))
    if ps_version == "v1":
        warnings.warn("In ps_version 'v1', the height and width have not been swapped back, "
                      "which results in a transposed image.", stacklevel=2)
        return np.ascontiguousarray(x)
    # v2 swaps the grid back to [n, rows·s, cols·s, C/s²]
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
