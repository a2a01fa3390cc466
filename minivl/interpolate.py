"""Bicubic resizing with PyTorch's semantics, written out in NumPy.

InternViT stores its position table for one native grid (e.g. 32×32 for 448-px images) and
resizes it with `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` whenever
the input grid differs (InternVL `_get_pos_embed`; DINOv2 does the same). This module reproduces
that kernel, NOT Pillow's bicubic (which antialiases and uses a = −0.5; see preprocess.py):

* cubic convolution (Keys, 1981) with coefficient A = −0.75;
* half-pixel source coordinates, src = (dst + 0.5)·(in/out) − 0.5, not clamped;
* four taps floor(src)−1 … floor(src)+2, indices clamped to [0, in−1] (edge replication);
* no antialiasing when shrinking; separable: first along the width, then along the height,
  each a left-to-right sum of four products, all in the array's dtype (float32 stays float32).

At equal sizes the weights are exactly (0, 1, 0, 0) and the resize is an exact identity.
"""
from __future__ import annotations

import numpy as np

from minivl.errors import ShapeError

# Keys' cubic-convolution coefficient as PyTorch uses it (OpenCV's value; Pillow uses −0.5)
CUBIC_A = -0.75


def cubic_weights(t: np.ndarray, A: float = CUBIC_A) -> np.ndarray:
    """Weights of the four taps at offsets −1, 0, +1, +2 for a fractional position t in [0, 1).

    [n] -> [n, 4]; evaluated in t's dtype with PyTorch's operation order.
    """
    dtype = t.dtype
    A = dtype.type(A)
    one = dtype.type(1.0)

    def near(x):  # |x| <= 1:  ((A+2)·x − (A+3))·x² + 1
        return ((A + 2) * x - (A + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2:  ((A·x − 5A)·x + 8A)·x − 4A
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    s = one - t
    return np.stack([far(t + one), near(t), near(s), far(s + one)], axis=-1)


def cubic_taps(in_size: int, out_size: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bicubic (align_corners=False) along one axis.

    -> indices [out_size, 4] int64 (clamped to [0, in_size−1]), weights [out_size, 4] dtype
    """
    dtype = np.dtype(dtype)
    # scale = in / out, computed in the working dtype like torch's opmath
    scale = dtype.type(in_size) / dtype.type(out_size)
    dst = np.arange(out_size, dtype=dtype)
    # src = (dst + ½)·scale − ½ ; for cubic it is NOT clamped at 0 (unlike bilinear)
    src = scale * (dst + dtype.type(0.5)) - dtype.type(0.5)
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    # t = src − floor(src), clamped to [0, 1] as torch's guard_index_and_lambda does
    t = np.clip(src - base.astype(dtype), 0, 1).astype(dtype)
    indices = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return indices, cubic_weights(t)


def _resize_last_axis(x: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[..., in] -> [..., out]: out = ((x[i0]·w0 + x[i1]·w1) + x[i2]·w2) + x[i3]·w3, in order."""
    out = x[..., indices[:, 0]] * weights[:, 0]
    for tap in range(1, 4):  # four taps, not a loop over data
        out = out + x[..., indices[:, tap]] * weights[:, tap]
    return out


def interpolate_bicubic(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch.nn.functional.interpolate(x, size, mode="bicubic", align_corners=False), in NumPy.

    [n, c, h_in, w_in] -> [n, c, h_out, w_out], same float dtype (float32 or float64).
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ShapeError(f"interpolate_bicubic expects [n, c, h, w], got shape {x.shape}; "
                         f"add the missing batch/channel axes with x[None] or reshape")
    if x.dtype not in (np.float32, np.float64):
        raise ShapeError(f"interpolate_bicubic computes in float32 or float64, got {x.dtype}; "
                         f"cast first (the reference resizes position tables in float32)")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ShapeError(f"interpolate_bicubic output size must be positive, got {size}")
    in_h, in_w = x.shape[-2:]
    idx_w, w_w = cubic_taps(in_w, out_w, x.dtype)
    idx_h, w_h = cubic_taps(in_h, out_h, x.dtype)
    # width pass on every input row, then the height pass: torch's nesting (height outer)
    rows = _resize_last_axis(x, idx_w, w_w)  # [n, c, h_in, w_out]
    cols = _resize_last_axis(np.swapaxes(rows, -1, -2), idx_h, w_h)  # [n, c, w_out, h_out]
    return np.ascontiguousarray(np.swapaxes(cols, -1, -2))
