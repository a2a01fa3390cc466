"""minivl/flash.py (tiled online-softmax attention) against naive float64 attention, torch sdpa and its torch twin.

Tolerances. The output is a convex combination of rows of v, so its natural scale is max|v|;
the tiled version differs from the naive one only by rounding (summation order, the per-tile
rescaling by exp(m_old - m_new), exp of scores of magnitude up to ~|scale·q·k| + ALiBi ≈ 20,
whose relative rounding ~|score|·eps enters the small weights):
* NumPy float64 vs naive float64: rtol = atol/max|v| = 16 ulps of float64 (seen: <= 1.8 ulps).
* NumPy float32 vs naive float64 of the same float32 inputs: 32 ulps of float32 = 3.8e-6
  (seen: <= 1 ulp; float32 carries one more rounding per op than the float64 reference).
* lse: absolute error ~eps·(|max score| + log t): atol = the same ulps times max|lse| (seen: <= 1.6).
* torch twin vs NumPy: the same algorithm, same op order; only BLAS summation order differs:
  16 ulps (float64 and float32; seen: <= 1.3).
* vs torch sdpa (float64): 16 ulps of float64, as against the naive formula.
"""
import tracemalloc

import numpy as np
import pytest
import torch

from flash_reference import naive_attention, naive_varlen, random_inputs, sdpa_reference
from minivl.errors import ShapeError
from minivl.flash import flash_attention, flash_attention_varlen
from minivl.testing import assert_close, tolerance
import torch_impl.flash as torch_flash

ULPS = {"float64": 16, "float32": 32}

# (batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, block_q, block_k, options)
CASES = {
    "plain, blocks divide": (2, 4, 4, 64, 64, 16, 16, 16, {}),
    "plain, blocks do not divide": (2, 3, 3, 37, 53, 8, 16, 7, {}),
    "one block bigger than all": (1, 2, 2, 5, 9, 8, 64, 64, {}),
    "causal square": (2, 4, 2, 50, 50, 16, 16, 16, {"causal": True}),
    "causal, decode-like s < t": (2, 4, 1, 3, 45, 8, 2, 8, {"causal": True}),
    "causal, s > t: early rows see nothing": (1, 2, 2, 30, 20, 8, 8, 8, {"causal": True}),
    "GQA group 8 (MQA)": (1, 8, 1, 33, 33, 8, 8, 16, {"causal": True}),
    "GQA group 4": (2, 8, 2, 21, 29, 8, 4, 8, {}),
    "sliding window (w=7 -> left 6), causal": (2, 4, 2, 40, 40, 8, 8, 8, {"causal": True, "window_size": (6, 0)}),
    "window left 3 right 5": (1, 2, 1, 25, 31, 8, 8, 4, {"window_size": (3, 5)}),
    "window left only, non-causal": (1, 2, 2, 20, 20, 8, 4, 4, {"window_size": (2, -1)}),
    "ALiBi [h], causal": (2, 4, 4, 30, 30, 8, 8, 8, {"causal": True, "alibi": "heads"}),
    "ALiBi [b, h], non-causal, GQA": (2, 4, 2, 17, 26, 8, 8, 8, {"alibi": "batch"}),
    "ALiBi + window": (1, 4, 2, 24, 24, 8, 8, 8, {"causal": True, "window_size": (5, 0), "alibi": "heads"}),
    "softmax_scale, d_v != d": (1, 2, 2, 19, 19, 12, 8, 8, {"softmax_scale": 0.3, "v_dim": 5}),
}


def check_against_naive(out, lse, q, k, v, kwargs, dtype, what):
    ref_out, ref_lse = naive_attention(q, k, v, **kwargs)
    ulps = ULPS[np.dtype(dtype).name]
    rtol, atol = tolerance(dtype, ulps, scale=float(np.abs(v).max()))
    assert_close(out, ref_out, rtol=rtol, atol=atol, what=f"{what}: output")
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite), f"{what}: rows with no visible key differ"
    assert (lse[~finite] == -np.inf).all() and (out[~finite] == 0).all(), f"{what}: empty rows must be 0, lse -inf"
    lse_scale = float(np.abs(ref_lse[finite]).max()) if finite.any() else 1.0
    rtol, atol = tolerance(dtype, ulps, scale=lse_scale)
    assert_close(np.where(finite, lse, 0), np.where(finite, ref_lse, 0), rtol=rtol, atol=atol, what=f"{what}: lse")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_equals_naive_attention(name, dtype, rng):
    batch, n_heads, n_kv, q_len, kv_len, head_dim, block_q, block_k, options = CASES[name]
    q, k, v, kwargs = random_inputs(rng, batch, n_heads, n_kv, q_len, kv_len, head_dim, options, dtype)
    out, lse = flash_attention(q, k, v, block_q=block_q, block_k=block_k, **kwargs)
    assert out.dtype == dtype and out.shape == (batch, n_heads, q_len, options.get("v_dim", head_dim))
    assert lse.shape == (batch, n_heads, q_len) and lse.dtype == dtype  # computed in promote(dtype, float32)
    check_against_naive(out, lse, q, k, v, kwargs, dtype, name)


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_equal_naive(seed):
    """Random shapes, block sizes, GQA groups 1..8, causal/window/ALiBi combinations, float32 and float64."""
    rng = np.random.default_rng(100 + seed)
    n_kv, group = int(rng.integers(1, 3)), int(rng.integers(1, 9))
    q_len, kv_len = int(rng.integers(1, 48)), int(rng.integers(1, 48))
    options = {"causal": bool(rng.integers(2))}
    if rng.integers(2):
        options["window_size"] = (int(rng.integers(-1, 12)), int(rng.integers(-1, 12)))
    if rng.integers(2):
        options["alibi"] = "heads"
    dtype = (np.float32, np.float64)[seed % 2]
    q, k, v, kwargs = random_inputs(rng, int(rng.integers(1, 3)), n_kv * group, n_kv, q_len, kv_len,
                                  int(rng.choice([4, 8, 16])), options, dtype)
    out, lse = flash_attention(q, k, v, block_q=int(rng.integers(1, 20)), block_k=int(rng.integers(1, 20)), **kwargs)
    check_against_naive(out, lse, q, k, v, kwargs, dtype, f"seed {seed} {options}")


@pytest.mark.parametrize("name", ["causal, decode-like s < t", "GQA group 4", "window left 3 right 5",
                                  "ALiBi [b, h], non-causal, GQA", "causal, s > t: early rows see nothing"])
def test_equals_torch_sdpa(name, rng):
    """Second, independent reference: torch's sdpa (float64), visibility and ALiBi given as a float mask.

    16 float64 ulps, as against the naive formula; rows with no visible key are NaN in sdpa
    and are compared (as 0) in test_equals_naive_attention instead.
    """
    batch, n_heads, n_kv, q_len, kv_len, head_dim, block_q, block_k, options = CASES[name]
    q, k, v, kwargs = random_inputs(rng, batch, n_heads, n_kv, q_len, kv_len, head_dim, options, np.float64)
    out, _ = flash_attention(q, k, v, block_q=block_q, block_k=block_k, **kwargs)
    ref, rows = sdpa_reference(q, k, v, **kwargs)
    rtol, atol = tolerance(np.float64, ULPS["float64"], scale=float(np.abs(v).max()))
    assert_close(out[:, :, rows], ref[:, :, rows], rtol=rtol, atol=atol, what=f"{name} vs torch sdpa")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["plain, blocks do not divide", "causal, s > t: early rows see nothing",
                                  "ALiBi + window", "ALiBi [b, h], non-causal, GQA", "softmax_scale, d_v != d"])
def test_torch_twin_matches_numpy(name, dtype, rng):
    """torch_impl/flash.py is the same block loop: 16 ulps (only BLAS summation order may differ)."""
    batch, n_heads, n_kv, q_len, kv_len, head_dim, block_q, block_k, options = CASES[name]
    q, k, v, kwargs = random_inputs(rng, batch, n_heads, n_kv, q_len, kv_len, head_dim, options, dtype)
    out, lse = flash_attention(q, k, v, block_q=block_q, block_k=block_k, **kwargs)
    torch_kwargs = dict(kwargs)
    if "alibi_slopes" in kwargs:
        torch_kwargs["alibi_slopes"] = torch.from_numpy(kwargs["alibi_slopes"])
    t_out, t_lse = torch_flash.flash_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                               block_q=block_q, block_k=block_k, **torch_kwargs)
    assert t_out.dtype == torch.from_numpy(q).dtype
    rtol, atol = tolerance(dtype, 16, scale=float(np.abs(v).max()))
    assert_close(t_out, out, rtol=rtol, atol=atol, what=f"{name}: torch twin output")
    rtol, atol = tolerance(dtype, 16, scale=float(np.abs(lse[np.isfinite(lse)]).max()))
    assert_close(t_lse, lse, rtol=rtol, atol=atol, what=f"{name}: torch twin lse")


# packed batches: sequence lengths with empty and length-1 sequences
VARLEN = {
    "self-attention, causal": ([0, 1, 9, 0, 17], None, {"causal": True}),
    "cross lengths, non-causal, ALiBi per sequence": ([3, 0, 1, 12], [5, 0, 4, 12], {"alibi": "batch"}),
    "decode-like, causal, window": ([1, 2, 0, 4], [10, 2, 3, 20], {"causal": True, "window_size": (4, 0)}),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen_equals_naive_per_sequence(name, dtype, rng):
    q_lens, k_lens, options = VARLEN[name]
    k_lens = q_lens if k_lens is None else k_lens
    n_heads, n_kv, head_dim = 4, 2, 8
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(k_lens)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], n_heads, head_dim)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], n_kv, head_dim)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], n_kv, head_dim)).astype(dtype)
    kwargs = {key: options[key] for key in ("causal", "window_size") if key in options}
    if options.get("alibi"):
        kwargs["alibi_slopes"] = rng.uniform(0.05, 1.0, (len(q_lens), n_heads)).astype(np.float32)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), block_q=4, block_k=4, **kwargs)
    ref_out, ref_lse = naive_varlen(q, k, v, cu_q, cu_k, **kwargs)
    assert out.shape == q.shape and lse.shape == (n_heads, cu_q[-1])
    rtol, atol = tolerance(dtype, ULPS[np.dtype(dtype).name], scale=float(np.abs(v).max()))
    assert_close(out, ref_out, rtol=rtol, atol=atol, what=f"varlen {name}: output")
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    rtol, atol = tolerance(dtype, ULPS[np.dtype(dtype).name], scale=float(np.abs(ref_lse[finite]).max()))
    assert_close(lse[finite], ref_lse[finite], rtol=rtol, atol=atol, what=f"varlen {name}: lse")
    # the torch twin packs and unpacks the same way
    t_out, t_lse = torch_flash.flash_attention_varlen(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(cu_q),
        torch.from_numpy(cu_k), max(q_lens), max(k_lens), block_q=4, block_k=4,
        **{key: (torch.from_numpy(val) if isinstance(val, np.ndarray) else val) for key, val in kwargs.items()})
    rtol, atol = tolerance(dtype, 16, scale=float(np.abs(v).max()))
    assert_close(t_out, out, rtol=rtol, atol=atol, what=f"varlen {name}: torch twin")


def _peak_bytes(function, *args, **kwargs) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    function(*args, **kwargs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_peak_memory_is_linear_in_sequence_length():
    """Doubling n doubles the tiled version's peak (output + fixed tiles), far below the [h, n, n] scores.

    4 heads of 64 dims so that the output, not the fixed per-tile buffers, dominates the peak.
    The same harness on the naive formula sees the ~4x of an [n, n] score matrix, so it can fail.
    """
    rng = np.random.default_rng(0)
    n_heads, head_dim = 4, 64
    peaks = {}
    for n in (1024, 2048):
        q, k, v = (rng.standard_normal((1, n_heads, n, head_dim)).astype(np.float32) for _ in range(3))
        peaks[n] = _peak_bytes(flash_attention, q, k, v, causal=True, block_q=64, block_k=64)
        scores_bytes = n_heads * n * n * 4
        assert peaks[n] < scores_bytes / 8, (
            f"n={n}: peak {peaks[n]} B is not far below the [h, n, n] float32 scores ({scores_bytes} B)")
    ratio = peaks[2048] / peaks[1024]
    assert 1.6 < ratio < 2.4, f"tiled peak grew {ratio:.2f}x when n doubled (linear would be ~2x)"
    naive_peaks = {}
    for n in (256, 512):
        q, k, v = (rng.standard_normal((1, 1, n, 16)).astype(np.float32) for _ in range(3))
        naive_peaks[n] = _peak_bytes(naive_attention, q, k, v, causal=True)
    naive_ratio = naive_peaks[512] / naive_peaks[256]
    assert naive_ratio > 3.5, f"the harness should see the naive [n, n] growth (~4x), saw {naive_ratio:.2f}x"


@pytest.mark.parametrize("call, message", [
    (lambda a: flash_attention(a[:, :3], a, a), "multiple of n_kv_heads"),
    (lambda a: flash_attention(a[0], a[0], a[0]), "flash_attention_varlen"),
    (lambda a: flash_attention(a, a[..., :4], a), "head_dim"),
    (lambda a: flash_attention(a, a, a, window_size=(-2, 0)), "window_size"),
    (lambda a: flash_attention(a, a, a, window_size=4), "window_size"),
    (lambda a: flash_attention(a, a, a, block_q=0), "block_q"),
    (lambda a: flash_attention(a, a, a, alibi_slopes=np.ones(3)), "alibi_slopes"),
    (lambda a: flash_attention_varlen(a[0].transpose(1, 0, 2), a[0].transpose(1, 0, 2), a[0].transpose(1, 0, 2),
                                      np.array([0, 4, 9]), np.array([0, 4, 10]), 5, 6), "start at 0"),
    (lambda a: flash_attention_varlen(a[0].transpose(1, 0, 2), a[0].transpose(1, 0, 2), a[0].transpose(1, 0, 2),
                                      np.array([0, 4, 10]), np.array([0, 4, 10]), 5, 6), "max_seqlen"),
    (lambda a: flash_attention_varlen(a[0].transpose(1, 0, 2), a[0].transpose(1, 0, 2), a[0].transpose(1, 0, 2),
                                      np.array([0, 10]), np.array([0, 4, 10]), 10, 10), "numbers of sequences"),
])
def test_bad_input_raises_named_error(call, message):
    a = np.zeros((1, 4, 10, 8), dtype=np.float32)
    with pytest.raises(ShapeError, match=message):
        call(a)
