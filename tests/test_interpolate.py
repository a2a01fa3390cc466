"""minivl/interpolate.py (NumPy bicubic) against torch.nn.functional.interpolate, its reference.

The NumPy port follows torch's formulas and operation order, but torch's compiled CPU kernel
contracts multiply-adds into FMAs (one rounding instead of two) when it computes the source
coordinate, the cubic weights and the 4-tap sums, so the two agree to a few ulps, not bit for
bit. A weight can move by a few ulps of 1 and an output by a few ulps of max|x| — hence an atol
scaled by max|x|. At equal sizes every weight is exactly (0, 1, 0, 0): the resize must be exact.
"""
import numpy as np
import pytest
import torch

from minivl.errors import ShapeError
from minivl.interpolate import cubic_taps, interpolate_bicubic
from minivl.testing import assert_close, tolerance
from torch_impl.interpolate import interpolate_bicubic as torch_interpolate_bicubic

SIZES = [
    ((37, 37), (16, 16)),   # DINOv2's 518-px table to a 224-px input: down-sampling
    ((16, 16), (32, 32)),   # 224-px table to 448-px tiles: exact ×2 up-sampling
    ((32, 32), (40, 24)),   # non-square, up in one axis and down in the other
    ((4, 4), (9, 3)),       # tiny grid: most taps hit the clamped edges
    ((3, 5), (1, 1)),       # to a single pixel
    ((1, 1), (3, 3)),       # from a single pixel: every tap is the same pixel
    ((37, 37), (64, 64)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_matches_torch_bicubic(rng, dtype, in_size, out_size):
    x = rng.standard_normal((2, 5, *in_size)).astype(dtype)
    ours = interpolate_bicubic(x, out_size)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_size, mode="bicubic",
                                          align_corners=False)
    assert ours.dtype == dtype and ours.shape == tuple(ref.shape)
    # tolerance: torch fuses multiply-adds (see module docstring); measured worst case is
    # ~10 ulps of max|x| (32×32 -> 40×24). Allow 32 ulps of max|x| plus 32 ulps relative.
    rtol, atol = tolerance(dtype, 32, 32, scale=float(np.abs(x).max()))
    assert_close(ours, ref, rtol=rtol, atol=atol, what=f"bicubic {in_size}->{out_size}")
    # the torch twin is the same call
    assert_close(torch_interpolate_bicubic(torch.from_numpy(x), out_size), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identity_at_equal_size_is_exact(rng, dtype):
    x = rng.standard_normal((1, 7, 32, 32)).astype(dtype)
    ours = interpolate_bicubic(x, (32, 32))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(32, 32), mode="bicubic",
                                          align_corners=False).numpy()
    # tolerance 0: scale is exactly 1, t exactly 0, weights exactly (0, 1, 0, 0)
    np.testing.assert_array_equal(ours, x)
    np.testing.assert_array_equal(ref, x)


def test_cubic_weights_are_keys_a_minus_075():
    # half-way between two pixels the Keys kernel with A = −0.75 gives (−3/32, 19/32, 19/32, −3/32);
    # 2 -> 1: src = (0 + ½)·2 − ½ = ½. Exact binary fractions, so compare exactly.
    idx, w = cubic_taps(2, 1, np.float64)
    np.testing.assert_array_equal(w[0], [-3 / 32, 19 / 32, 19 / 32, -3 / 32])
    np.testing.assert_array_equal(idx[0], [0, 0, 1, 1])  # taps −1 and +2 clamped to the edges


def test_bad_input_raises_named_errors():
    with pytest.raises(ShapeError, match=r"\[n, c, h, w\]"):
        interpolate_bicubic(np.zeros((4, 4), np.float32), (2, 2))
    with pytest.raises(ShapeError, match="float32 or float64"):
        interpolate_bicubic(np.zeros((1, 1, 4, 4), np.int64), (2, 2))
    with pytest.raises(ShapeError, match="positive"):
        interpolate_bicubic(np.zeros((1, 1, 4, 4), np.float32), (0, 2))
    with pytest.raises(ShapeError, match=r"\[n, c, h, w\]"):
        torch_interpolate_bicubic(torch.zeros(4, 4), (2, 2))
