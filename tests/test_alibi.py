"""MPT ALiBi: slopes and biases vs transformers' build_mpt_alibi_tensor, the Press et al. recipe,
the spec's worked examples, and the softmax shift invariance the causal row form relies on."""
import math

import numpy as np
import pytest
import torch
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from minivl import alibi
from minivl.attention import causal_mask, scaled_dot_product_attention
from minivl.testing import assert_close, tolerance
from torch_impl import alibi as torch_alibi

HEAD_COUNTS = [1, 2, 3, 4, 6, 8, 12, 16, 20, 32, 40]


@pytest.mark.parametrize("alibi_bias_max", [8, 16])
@pytest.mark.parametrize("n_heads", HEAD_COUNTS)
def test_bias_bitwise_equal_to_transformers_build_mpt_alibi_tensor(n_heads, alibi_bias_max):
    seq_len = 37
    reference = build_mpt_alibi_tensor(n_heads, seq_len, alibi_bias_max=alibi_bias_max)  # [n, 1, L]
    out = alibi.alibi_bias(n_heads, seq_len, alibi_bias_max)
    out_torch = torch_alibi.alibi_bias(n_heads, seq_len, alibi_bias_max)
    assert out.shape == (1, n_heads, 1, seq_len) and out.dtype == np.float32
    assert out_torch.shape == (1, n_heads, 1, seq_len) and out_torch.dtype == torch.float32
    # tolerance: none — same float32 operations (k·(a/N), 1/2^m, int offset × slope)
    np.testing.assert_array_equal(out[0], reference.numpy())
    assert torch.equal(out_torch[0], reference)


def _press_slopes(n):
    """Press et al. (2021) slopes in float64, written from the paper: for a power of two n,
    a geometric sequence starting at and multiplied by 2^(−8/n); otherwise the slopes of the
    nearest lower power of two p, followed by every other slope of 2p heads, up to n."""
    def geometric(p):
        start = 2.0 ** (-8.0 / p)
        return [start ** (i + 1) for i in range(p)]

    p = 2 ** int(math.floor(math.log2(n)))
    if p == n:
        return geometric(n)
    return geometric(p) + geometric(2 * p)[0::2][: n - p]


@pytest.mark.parametrize("n_heads", HEAD_COUNTS)
def test_slopes_match_press_et_al_float64_recipe(n_heads):
    expected = np.array(_press_slopes(n_heads))
    # tolerance: the reference rounds k·(a/N) and 1/2^m to float32 (exact for power-of-two N, then
    # ≤ 1 float32 ulp from pow): 2 float32 ulps relative
    rtol, atol = tolerance("float32", 2, atol_ulps=0)
    assert_close(alibi.alibi_slopes(n_heads), expected, rtol=rtol, atol=atol, what=f"slopes n={n_heads}")
    assert_close(torch_alibi.alibi_slopes(n_heads), expected, rtol=rtol, atol=atol, what=f"torch slopes n={n_heads}")


def test_worked_examples_from_the_paper_and_spec():
    """Literal values (spec 3.4, rope-alibi-notes §3): n=8, n=12 and n=3 with the default a=8."""
    np.testing.assert_array_equal(alibi.alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])
    n12 = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    # tolerance: the four irrational slopes are float32 roundings of 2^-(k+½): 1 float32 ulp
    rtol, atol = tolerance("float32", 1, atol_ulps=0)
    assert_close(alibi.alibi_slopes(12), n12, rtol=rtol, atol=atol, what="n=12 slopes")
    np.testing.assert_array_equal(alibi.alibi_slopes(3), [1 / 16, 1 / 256, 1 / 4])
    np.testing.assert_array_equal(alibi.alibi_slopes(1), [1 / 256])
    # a = 16 squares every power-of-two slope: n=4 -> 2^-4, 2^-8, 2^-12, 2^-16
    np.testing.assert_array_equal(alibi.alibi_slopes(4, alibi_bias_max=16), [2.0 ** -4, 2.0 ** -8, 2.0 ** -12, 2.0 ** -16])


def test_causal_row_and_full_bias_values():
    """Row form (j − (L−1))·slope; full form −|i − j|·slope: symmetric, zero diagonal."""
    n_heads, seq_len = 6, 9
    slopes = alibi.alibi_slopes(n_heads).astype(np.float64)
    row = alibi.alibi_bias(n_heads, seq_len)
    full = alibi.alibi_bias(n_heads, seq_len, full=True)
    j = np.arange(seq_len)
    expected_row = (j - (seq_len - 1))[None, :] * slopes[:, None]
    expected_full = -np.abs(j[:, None] - j[None, :])[None] * slopes[:, None, None]
    # tolerance: one float32 rounding of an integer × float32 slope: ½ float32 ulp relative
    rtol, atol = tolerance("float32", 1, atol_ulps=0)
    assert_close(row[0, :, 0, :], expected_row, rtol=rtol, atol=atol, what="causal row bias")
    assert_close(full[0], expected_full, rtol=rtol, atol=atol, what="full bias")
    assert full.shape == (1, n_heads, seq_len, seq_len) and full.dtype == np.float32
    np.testing.assert_array_equal(full, np.swapaxes(full, -1, -2))
    assert not np.signbit(np.diagonal(full, axis1=-2, axis2=-1)).any()  # +0 like the reference
    np.testing.assert_array_equal(full, torch_alibi.alibi_bias(n_heads, seq_len, full=True).numpy())


@pytest.mark.parametrize("n_heads", [3, 12, 40])
def test_odd_bias_max_torch_and_numpy_agree_to_one_ulp(n_heads):
    """For a ≠ 8, 16, torch.pow(2, m) and NumPy's float32 power can differ by 1 ulp (neither is
    correctly rounded for every m), and 1/x can round that to 2 ulps of the slope: 2 ulps, not bitwise."""
    rtol, atol = tolerance("float32", 2, atol_ulps=0)
    assert_close(alibi.alibi_slopes(n_heads, 5.5), torch_alibi.alibi_slopes(n_heads, 5.5), rtol=rtol, atol=atol,
                 what="slopes a=5.5")


def test_causal_row_bias_equals_paper_bias_after_softmax():
    """(j − (L−1))·m and the paper's −(i − j)·m differ by a per-row constant, so with a causal mask
    the attention probabilities are the same: this is why MPT can build one row for all queries."""
    rng = np.random.default_rng(0)
    n_heads, seq_len, d = 4, 11, 16
    q, k, v = (rng.standard_normal((1, n_heads, seq_len, d)) for _ in range(3))
    mask = causal_mask(seq_len, seq_len, np.float64)
    row_bias = alibi.alibi_bias(n_heads, seq_len).astype(np.float64)
    paper_bias = alibi.alibi_bias(n_heads, seq_len, full=True).astype(np.float64)  # −|i−j|m; = −(i−j)m where visible
    _, p_row = scaled_dot_product_attention(q, k, v, mask=mask, bias=row_bias, scale_mode="multiply",
                                            return_probs=True)
    _, p_paper = scaled_dot_product_attention(q, k, v, mask=mask, bias=paper_bias, scale_mode="multiply",
                                              return_probs=True)
    # tolerance: float64, the shift changes the rounding of exp(x − max) only: tens of ulps
    rtol, atol = tolerance("float64", 32)
    assert_close(p_row, p_paper, rtol=rtol, atol=atol, what="row vs paper ALiBi probabilities")
    # and ALiBi really biases: the probabilities differ from plain causal attention
    _, p_plain = scaled_dot_product_attention(q, k, v, mask=mask, scale_mode="multiply", return_probs=True)
    assert np.abs(p_plain - p_row).max() > 1e-3
