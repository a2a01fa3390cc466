"""The fast paths of the vision tower beside the readable ones (minivl/activations.py, minivl/models/intern_vit.py):

* `gelu_fast`: erf by Abramowitz & Stegun 7.1.26, the formula torch's CPU kernel evaluates for
  float32, instead of scipy's scalar erf. Not the same math as `gelu`, so it is held to the float64
  formula with `gelu`'s own tolerance (tests/test_activations.py): rtol 8 ulps, atol 8 ulps·|x|.
  A&S's |error| <= 1.5e-7 ≈ 1.26 ulps of 1 in erf becomes <= 0.63 ulps·|x| in ½·(x + |x|·erf), plus
  the roundings of 21 float32 operations; the measured worst case is ~2.2 ulps·|x| (torch's order
  of the same formula: ~2.3).
  Its chunking is elementwise, so any chunk size gives the same bits;
* `residual_add` (x + branch·ls in branch's buffer) and `_layer_norm_inplace`: the same IEEE
  operations in the same order as the formula, held BIT-equal;
* the embeddings' cached position table: bit-equal to a fresh resize, recomputed when the grid,
  the dtype or the `position_embedding` array changes.
"""
import math

import numpy as np
import pytest
import torch

from minivl import activations
from minivl.activations import gelu, gelu_fast
from minivl.config import InternVisionConfig
from minivl.models.intern_vit import InternMLP, InternVisionModel, residual_add, resize_position_table
from minivl.testing import assert_close, tolerance
from minivl.tiny.vision import write_tiny_vit
from minivl.checkpoint import load_state_dict
from torch_impl import activations as torch_activations


def _gelu_grid():
    """Dense on [−12, 12], random normals, the tails, signed zeros and infinities."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-12, 12, 20001), rng.standard_normal(20000) * 4,
                        [-1e30, -1e4, -100.0, -30.0, -1e-30, -0.0, 0.0, 1e-30, 30.0, 100.0, 1e4, 1e30]])
    return x.astype(np.float32)


def _gelu_tolerance(x):
    return tolerance("float32", 8, atol_ulps=8, scale=np.abs(x.astype(np.float64)))


def test_gelu_fast_matches_the_float64_formula_within_gelus_tolerance():
    x = _gelu_grid()
    reference = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
    out = gelu_fast(x)
    assert out.dtype == np.float32 and out.shape == x.shape and np.isfinite(out).all()
    rtol, atol = _gelu_tolerance(x)
    assert_close(out, reference, rtol=rtol, atol=atol, what="gelu_fast vs float64 formula")
    # and within the same tolerance of the readable scipy-erf `gelu` it replaces in InternMLP
    assert_close(out, gelu(x).astype(np.float64), rtol=2 * rtol, atol=2 * atol, what="gelu_fast vs gelu")
    # the saturated tails are exact: gelu(x) = x for x ≫ 0, −0 for x ≪ 0
    tails = np.array([-1e4, 1e4, 1e30], np.float32)
    np.testing.assert_array_equal(gelu_fast(tails), np.array([0.0, 1e4, 1e30], np.float32))
    # and the infinities as the readable `gelu` gives them: gelu(+inf) = inf, gelu(−inf) = −inf·0 = NaN
    infinities = np.array([np.inf, -np.inf], np.float32)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(gelu_fast(infinities), gelu(infinities))


def test_gelu_fast_twin_is_torchs_own_gelu():
    """torch_impl's twin is F.gelu, whose float32 CPU erf is the same A&S formula (fma and Sleef's exp:
    a few ulps apart, the same tolerance as against the float64 formula)."""
    x = _gelu_grid()
    x = x[np.abs(x) < 1e20]  # torch's x·½·(1 + erf) overflows nothing here either, but stay in range
    twin = torch_activations.gelu_fast(torch.from_numpy(x))
    rtol, atol = _gelu_tolerance(x)
    assert_close(gelu_fast(x), twin, rtol=rtol, atol=atol, what="gelu_fast vs torch twin")


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_gelu_fast_chunking_is_bit_neutral_and_keeps_layout(chunk):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 41, 50)) * 3).astype(np.float32)
    x_before = x.copy()
    whole = gelu_fast(x, chunk=1 << 20)
    np.testing.assert_array_equal(gelu_fast(x, chunk=chunk), whole)
    # a non-contiguous view gives the values of its contiguous copy, in its own shape
    view = x.transpose(2, 0, 1)[:, :, ::2]
    np.testing.assert_array_equal(gelu_fast(view, chunk=chunk), gelu_fast(np.ascontiguousarray(view)))
    np.testing.assert_array_equal(x, x_before)  # the input is never written


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_gelu_fast_leaves_other_dtypes_to_gelu(dtype):
    x = (np.random.default_rng(2).standard_normal(500) * 4).astype(dtype)
    np.testing.assert_array_equal(gelu_fast(x), gelu(x))
    assert gelu_fast(x).dtype == np.dtype(dtype)


def test_gelu_fast_is_exported_by_both_packages():
    assert callable(activations.gelu_fast) and callable(torch_activations.gelu_fast)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_residual_add_is_bit_equal_to_the_formula_and_leaves_x_alone(dtype):
    rng = np.random.default_rng(3)
    x, branch = (rng.standard_normal((2, 9, 16)).astype(dtype) for _ in range(2))
    layer_scale = rng.standard_normal(16).astype(dtype)
    x_before, expected = x.copy(), x + branch * layer_scale
    np.testing.assert_array_equal(residual_add(x, branch.copy(), layer_scale), expected)
    np.testing.assert_array_equal(x, x_before)
    # a branch whose dtype differs from x's is not written into: the formula, promoted
    mixed = residual_add(x, branch.astype(np.float16), layer_scale)
    np.testing.assert_array_equal(mixed, x + branch.astype(np.float16) * layer_scale)


def test_intern_mlp_fast_gelu_matches_the_readable_mlp(tmp_path):
    """InternMLP (gelu_fast) against fc2(gelu(fc1(x))) with scipy's erf: the GELU difference passed
    through fc2 (I = 64 terms), so 8 ulps·sqrt(I) of |W2|·|gelu| on top of the GELU tolerance."""
    from minivl.linear import linear

    directory = write_tiny_vit(tmp_path / "vit", flavour="300m", dtype="float64")
    config = InternVisionConfig.from_pretrained(directory)
    model = InternVisionModel.from_state_dict(config, load_state_dict(directory), "float32")
    mlp = model.encoder.layers[0].mlp
    assert isinstance(mlp, InternMLP) and mlp.approximate is False
    x = np.random.default_rng(4).standard_normal((2, 17, config.hidden_size)).astype(np.float32)
    hidden = linear(x, mlp.fc1.weight, mlp.fc1.bias)
    readable = linear(gelu(hidden), mlp.fc2.weight, mlp.fc2.bias)
    magnitude = np.abs(gelu(hidden)).astype(np.float64) @ np.abs(mlp.fc2.weight.T).astype(np.float64)
    inter = config.intermediate_size
    rtol, atol = tolerance("float32", 8 * math.sqrt(inter), scale=magnitude + np.abs(hidden).max())
    assert_close(mlp(x), readable, rtol=rtol, atol=atol, what="InternMLP fast vs readable")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_position_table_cache_is_bit_equal_and_follows_its_inputs(tmp_path, dtype):
    directory = write_tiny_vit(tmp_path / "vit", flavour="300m", dtype="float64")
    config = InternVisionConfig.from_pretrained(directory)
    model = InternVisionModel.from_state_dict(config, load_state_dict(directory), dtype)
    embeddings = model.embeddings
    grid = config.image_size // config.patch_size

    def fresh(h, w, position):
        resized = resize_position_table(position[:, 1:], grid, h, w)
        return np.concatenate([position[:, :1], resized], axis=1).astype(dtype)

    first = embeddings.position_table(6, 3, dtype)
    np.testing.assert_array_equal(first, fresh(6, 3, embeddings.position_embedding))
    assert embeddings.position_table(6, 3, dtype) is first  # reused, not recomputed
    assert not first.flags.writeable  # shared by later forwards: read-only
    other = embeddings.position_table(3, 6, dtype)
    np.testing.assert_array_equal(other, fresh(3, 6, embeddings.position_embedding))
    assert embeddings.position_table(6, 3, np.float16).dtype == np.float16
    # a new position table (a reload assigns a new array) invalidates the cache
    embeddings.position_embedding = embeddings.position_embedding * 2
    np.testing.assert_array_equal(embeddings.position_table(6, 3, dtype), fresh(6, 3, embeddings.position_embedding))
    # the forward adds the cached table into its own token buffer, never into the cache
    pixels = np.random.default_rng(5).standard_normal((1, 3, 6 * 14, 3 * 14)).astype(dtype)
    tokens = embeddings(pixels)
    np.testing.assert_array_equal(embeddings(pixels), tokens)
    np.testing.assert_array_equal(embeddings.position_table(6, 3, dtype), fresh(6, 3, embeddings.position_embedding))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)], ids=["w+b", "w", "none"])
def test_layer_norm_in_place_steps_are_bit_equal_to_the_formula(dtype, affine):
    """minivl.norms.layer_norm writes its affine steps into its own centred buffer: the formula out of place."""
    from minivl.norms import layer_norm

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 7, 48)) * 3 + 1).astype(dtype)
    weight = rng.standard_normal(48).astype(dtype) if affine[0] else None
    bias = rng.standard_normal(48).astype(dtype) if affine[1] else None
    x_before = x.copy()
    mean = np.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    y = centred * (1.0 / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + 1e-6))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    np.testing.assert_array_equal(layer_norm(x, weight, bias, 1e-6), y)
    np.testing.assert_array_equal(x, x_before)
