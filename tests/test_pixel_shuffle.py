"""Pixel shuffle (minivl/pixel_shuffle.py, torch_impl/pixel_shuffle.py) against its closed form.

The closed form (spec 2.10) is evaluated here with explicit index arithmetic, one output element at
a time, independently of the reshape/transpose chain under test. Pixel shuffle only moves values,
so every comparison is exact (bit-identical), in any dtype.
"""
import warnings

import numpy as np
import pytest
import torch

from minivl.errors import ConfigError, ShapeError
from minivl.pixel_shuffle import num_image_token, pixel_shuffle
from torch_impl.pixel_shuffle import pixel_shuffle as torch_pixel_shuffle


def closed_form(x, r, version):
    """Z[n, r2, c2, m] = X[n, r·r2 + dr, r·c2 + dc, ch] with m = (dr·r + dc)·C + ch; v1 transposes the grid."""
    n, rows, cols, channels = x.shape
    out_rows, out_cols = rows // r, cols // r
    z = np.zeros((n, out_rows, out_cols, channels * r * r), dtype=x.dtype)
    for b in range(n):
        for r2 in range(out_rows):
            for c2 in range(out_cols):
                for m in range(channels * r * r):
                    dr, rest = divmod(m, r * channels)
                    dc, ch = divmod(rest, channels)
                    z[b, r2, c2, m] = x[b, r * r2 + dr, r * c2 + dc, ch]
    return z if version == "v2" else z.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("shape, ratio", [((2, 4, 4, 3), 0.5), ((1, 6, 4, 2), 0.5), ((1, 8, 4, 2), 0.25),
                                          ((3, 2, 2, 5), 0.5)])
def test_matches_closed_form_and_torch(shape, ratio, version, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    r = int(round(1 / ratio))
    expected = closed_form(x, r, version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = pixel_shuffle(x, ratio, version)
        got_torch = torch_pixel_shuffle(torch.from_numpy(x), ratio, version)
    # pure data movement: exact equality, not a tolerance
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_torch.numpy(), expected)
    assert got.dtype == dtype


def test_channel_packing_is_tl_tr_bl_br():
    # a 2×2 grid whose token (row, col) carries the value 10·row + col in its single channel
    x = np.array([[[[0.0], [1.0]], [[10.0], [11.0]]]])
    np.testing.assert_array_equal(pixel_shuffle(x, 0.5, "v2"), [[[[0.0, 1.0, 10.0, 11.0]]]])


def test_v2_keeps_the_grid_and_v1_transposes_it():
    # 4×2 grid (rows × cols) of 1-channel tokens: v2 gives a 2×1 grid, v1 a 1×2 grid
    x = np.arange(8, dtype=np.float64).reshape(1, 4, 2, 1)
    assert pixel_shuffle(x, 0.5, "v2").shape == (1, 2, 1, 4)
    with pytest.warns(UserWarning, match="transposed"):
        assert pixel_shuffle(x, 0.5, "v1").shape == (1, 1, 2, 4)


def test_num_image_token():
    assert num_image_token(448, 14, 0.5) == 256
    assert num_image_token(56, 14, 0.5) == 4
    assert num_image_token(224, 14, 0.25) == 16


@pytest.mark.parametrize("ratio", [0, -0.5, 0.3, 1.5])
def test_num_image_token_refuses_a_ratio_that_is_not_one_over_a_whole_number(ratio):
    # describe-image --downsample-ratio 0 used to print "0 image tokens"
    with pytest.raises(ConfigError, match="downsample_ratio") as info:
        num_image_token(448, 14, ratio)
    assert repr(ratio) in str(info.value) and "InternVL uses 0.5" in str(info.value)


def test_errors():
    with pytest.raises(ShapeError, match="divisible"):
        pixel_shuffle(np.zeros((1, 3, 4, 2)), 0.5)
    with pytest.raises(ShapeError, match="rows, cols"):
        pixel_shuffle(np.zeros((4, 4, 2)), 0.5)
    with pytest.raises(ConfigError, match="ps_version"):
        pixel_shuffle(np.zeros((1, 4, 4, 2)), 0.5, "v3")
    with pytest.raises(ConfigError, match="downsample_ratio"):
        pixel_shuffle(np.zeros((1, 4, 4, 2)), 0.3)
    with pytest.raises(ShapeError, match="divisible"):
        torch_pixel_shuffle(torch.zeros(1, 4, 6, 2), 0.25)
