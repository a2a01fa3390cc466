"""The fast attention paths beside the readable ones (minivl/attention.py, torch_impl/attention.py):

* `_softmax_inplace` and the in-place score updates of `scaled_dot_product_attention`: the same IEEE
  operations in the same order as the formula, so they are held BIT-equal to the formula written
  out of place here;
* `causal_attention_blocks`: query blocks that skip the keys a causal mask hides. It equals
  `scaled_dot_product_attention` up to the summation order of the softmax denominator and of
  p·v (the skipped keys add exact zeros, but a shorter sum is blocked differently by BLAS), so
  the tolerance is that of two orderings of a length-t sum: rtol 8 ulps, atol (sqrt(t) + 16) ulps
  of (p·|v|) per output element, the p·v term of tests/test_attention.py's error bound;
* `_late_normalized_attention`, the float32 kernel each block runs: e = exp(score) (unshifted when
  no score can pass ±80) or exp(score − max), then (e·[v | 1])[:d] / (e·[v | 1])[d]. It forms no
  probabilities, so it is held to the naive float64 truth of tests/test_attention.py within that
  file's forward error bound plus one more length-t sum (the denominator now comes out of the
  GEMM): (2·max δ + 2·sqrt(t) + 4)·(p·|v|) ulps;
* the preallocated `KVCache`: no copy of the cache per decode step.
"""
import math
import tracemalloc

import numpy as np
import pytest
import torch

from minivl import attention as A
from minivl import attention_blocks as AB
from minivl.alibi import alibi_bias
from minivl.testing import assert_close, tolerance
from torch_impl import attention as T
from torch_impl import attention_blocks as TB
from test_attention import attention_error_scale, naive_attention, visible_pattern

DTYPES = ["float32", "float64"]


def formula_softmax(scores, softmax_dtype):
    """The softmax as minivl.attention.softmax writes it, out of place."""
    compute = scores.dtype if softmax_dtype is None else np.promote_types(scores.dtype, np.dtype(softmax_dtype))
    x = scores.astype(compute)
    exp = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp / np.sum(exp, axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype,softmax_dtype", [("float32", "float32"), ("float32", None), ("float64", "float32"),
                                                 ("float32", "float64"), ("float64", None)])
def test_inplace_softmax_is_bit_equal_to_the_formula(dtype, softmax_dtype):
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((2, 3, 7, 33)) * 8).astype(dtype)
    scores[0, 0, :, 20:] = np.finfo(dtype).min  # masked entries, as causal_mask fills them
    scores[1, 2, 3, :5] = -np.inf  # doubly masked
    expected = formula_softmax(scores, softmax_dtype)
    for got in (A.softmax(scores, softmax_dtype), A._softmax_inplace(scores.copy(), softmax_dtype)):
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_mode", A.SCALE_MODES)
def test_inplace_attention_is_bit_equal_to_the_formula(dtype, scale_mode):
    """scaled_dot_product_attention updates its score tensor in place; this writes every step out of place."""
    rng = np.random.default_rng(1)
    b, h, kv, s, t, d = 2, 6, 2, 5, 9, 96
    q = rng.standard_normal((b, h, s, d)).astype(dtype)
    k, v = (rng.standard_normal((b, kv, t, d)).astype(dtype) for _ in range(2))
    attention_mask = np.ones((b, t), dtype=np.int64)
    attention_mask[0, :3] = 0
    mask = A.build_attention_mask(attention_mask, s, t - s, dtype)
    bias = alibi_bias(h, t).astype(dtype)
    softmax_dtype = None if scale_mode == "scale_q" else "float32"

    qg, kt = q.reshape(b, kv, (h // kv) * s, d), np.swapaxes(k, -1, -2)
    if scale_mode == "divide":
        scores = (qg @ kt) / math.sqrt(d)
    elif scale_mode == "scale_q":
        scores = (qg * d ** -0.5) @ kt
    else:
        scores = (qg @ kt) * (1.0 / math.sqrt(d))
    with np.errstate(over="ignore"):
        scores = scores.reshape(b, h, s, t) + bias + mask
    probs = formula_softmax(scores, softmax_dtype).astype(v.dtype)
    expected = (probs.reshape(b, kv, (h // kv) * s, t) @ v).reshape(b, h, s, d)

    got, got_probs = A.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, scale_mode=scale_mode,
                                                    softmax_dtype=softmax_dtype, return_probs=True)
    np.testing.assert_array_equal(got_probs, probs)
    np.testing.assert_array_equal(got, expected)


def _case(rng, dtype, b, h, kv, s, past, d, pad, window):
    t = past + s
    q = rng.standard_normal((b, h, s, d)).astype(dtype)
    k, v = (rng.standard_normal((b, kv, t, d)).astype(dtype) for _ in range(2))
    attention_mask = None
    if pad:
        attention_mask = np.ones((b, t), dtype=np.int64)
        attention_mask[0, :pad] = 0  # left padding: some query rows see no real key at all
    mask = A.build_attention_mask(attention_mask, s, past, dtype, sliding_window=window)
    return q, k, v, mask


def _blocked_tolerance(dtype, probs, v, group):
    # two orderings of the length-t sums in the denominator and in p·v
    t = v.shape[2]
    pv = probs.astype(np.float64) @ np.repeat(np.abs(v.astype(np.float64)), group, axis=1)
    return tolerance(dtype, 8, atol_ulps=math.sqrt(t) + 16, scale=pv)


@pytest.fixture(params=["kernel from 256 keys", "kernel for every block"])
def kernel_min_keys(request, monkeypatch):
    """The blocks as the models run them (float32 blocks of 256 keys or more through the kernel), and
    with every float32 block through it: these cases' blocks are smaller than that."""
    if request.param == "kernel for every block":
        monkeypatch.setattr(AB, "_KERNEL_MIN_KEYS", 0)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,kv,s,past,pad,window,block_q", [
    (1, 9, 3, 37, 0, 0, None, 8),      # SmolLM2's 9 query / 3 KV heads, a prefill in 5 blocks
    (2, 6, 2, 23, 0, 5, None, 4),      # left padding: the first blocks keep every key
    (2, 4, 4, 19, 6, 0, None, 5),      # a chunk after a cached past
    (1, 8, 2, 30, 0, 0, 7, 6),         # sliding window (Qwen2)
    (2, 4, 1, 16, 3, 4, 5, 3),         # all of it, MQA
    (1, 4, 2, 10, 0, 0, None, 64),     # one block: the plain call
])
def test_causal_blocks_equal_full_attention(dtype, b, h, kv, s, past, pad, window, block_q, kernel_min_keys):
    rng = np.random.default_rng(s + past)
    q, k, v, mask = _case(rng, dtype, b, h, kv, s, past, 64, pad, window)
    full, probs = A.scaled_dot_product_attention(q, k, v, mask=mask, return_probs=True)
    rtol, atol = _blocked_tolerance(dtype, probs, v, h // kv)
    blocked = AB.causal_attention_blocks(q, k, v, mask=mask, block_q=block_q)
    assert_close(blocked, full, rtol=rtol, atol=atol, what="NumPy blocks vs full")
    tq, tk, tv, tmask = (torch.from_numpy(x) for x in (q, k, v, mask))
    t_blocked = TB.causal_attention_blocks(tq, tk, tv, mask=tmask, block_q=block_q)
    t_full = T.scaled_dot_product_attention(tq, tk, tv, mask=tmask)
    assert_close(t_blocked, t_full.numpy(), rtol=rtol, atol=atol, what="torch blocks vs torch full")
    assert_close(t_blocked, blocked, rtol=rtol, atol=2 * atol, what="torch blocks vs NumPy blocks")


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_blocks_with_alibi_bias_and_multiply_scale(dtype, kernel_min_keys):
    """MPT's path: ALiBi bias [1, H, 1, t] sliced per block, scale multiplied after the matmul."""
    rng = np.random.default_rng(3)
    q, k, v, mask = _case(rng, dtype, 1, 8, 8, 21, 0, 32, 0, None)
    bias = alibi_bias(8, 21).astype(dtype)
    options = dict(bias=bias, scale_mode="multiply")
    full, probs = A.scaled_dot_product_attention(q, k, v, mask=mask, return_probs=True, **options)
    rtol, atol = _blocked_tolerance(dtype, probs, v, 1)
    assert_close(AB.causal_attention_blocks(q, k, v, mask=mask, block_q=4, **options), full, rtol=rtol, atol=atol)


def test_causal_blocks_fall_back_on_a_mask_that_is_not_causal():
    """A bidirectional padding mask with per-query rows: every block must keep every key (nothing is skipped)."""
    rng = np.random.default_rng(4)
    s = 12
    q = rng.standard_normal((1, 2, s, 16)).astype(np.float64)
    k, v = (rng.standard_normal((1, 2, s, 16)) for _ in range(2))
    mask = np.broadcast_to(A.padding_mask(np.ones((1, s), dtype=np.int64), np.float64), (1, 1, s, s)).copy()
    mask[..., 0, -1] = np.finfo(np.float64).min  # not causal: row 0 sees later keys
    full, probs = A.scaled_dot_product_attention(q, k, v, mask=mask, return_probs=True)
    # Not bit-equal: a block's [3, t] products and the full call's [12, t] may take different BLAS
    # kernels, whose sums round differently in the last bit (AMD EPYC's OpenBLAS did, an Intel
    # Xeon's did not). The same dtype-aware bound as the causal cases above: 8 ulps of p·|v| plus
    # sqrt(t) + 16 ulps for the reordered length-t sums.
    rtol, atol = _blocked_tolerance(np.float64, probs, v, 1)
    assert_close(AB.causal_attention_blocks(q, k, v, mask=mask, block_q=3), full, rtol=rtol, atol=atol)
    # the bound tells a skipped key from rounding: dropping the keys a causal mask would hide
    # (what a block that trusted the mask's shape would do) moves the output far outside it
    causal_only = np.minimum(mask, A.causal_mask(s, s, np.float64))  # min, not +: no min + min overflow
    skipped = A.scaled_dot_product_attention(q, k, v, mask=causal_only)
    assert np.any(np.abs(skipped - full) > atol + rtol * np.abs(full))


def test_causal_blocks_never_hold_the_full_score_tensor(monkeypatch):
    """A 1024-token prefill with 4 heads: the full score tensor is 16 MiB in float32; a block of 128
    queries holds at most 2 MiB of scores (the softmax works in place), two threads two blocks at once."""
    monkeypatch.setenv("MINIVL_NUM_THREADS", "2")
    rng = np.random.default_rng(5)
    s, h = 1024, 4
    q = rng.standard_normal((1, h, s, 16), dtype=np.float32)
    k, v = (rng.standard_normal((1, h, s, 16), dtype=np.float32) for _ in range(2))
    mask = A.build_attention_mask(None, s, 0, np.float32)
    full_scores = h * s * s * 4
    tracemalloc.start()
    try:
        AB.causal_attention_blocks(q, k, v, mask=mask, block_q=128)
        _, peak_blocks = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        A.scaled_dot_product_attention(q, k, v, mask=mask)
        _, peak_full = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_full >= full_scores  # the measurement sees the full tensor when there is one
    assert peak_blocks < full_scores / 3, f"blocked attention peaked at {peak_blocks / 2**20:.1f} MiB"



def _kernel(q, k, v, **options):
    return AB._late_normalized_attention(q, k, AB._with_ones(v), key_norm=AB._key_norm(k), **options)


def _kernel_tolerance(q, k, v, probs, scale):
    """The reference's forward error bound plus one more length-t sum, in float32 ulps (module docstring)."""
    group, t = q.shape[1] // k.shape[1], k.shape[2]
    pv = probs @ np.repeat(np.abs(v.astype(np.float64)), group, axis=1)
    return tolerance("float32", 4, atol_ulps=2, scale=attention_error_scale(q, k, v, probs, scale) + math.sqrt(t) * pv)


def _bound(q, k, scale):
    """The kernel's Cauchy–Schwarz bound on |score|, recomputed here to say which regime a case is in."""
    norms = [np.sqrt((x.astype(np.float64) ** 2).sum(-1)).max() for x in (q, k)]
    return norms[0] * norms[1] * scale


@pytest.mark.parametrize("scale_mode", A.SCALE_MODES)
@pytest.mark.parametrize("spread,regime", [
    (1.5, "unshifted"),   # |score| <= 80 for sure: exp(score) directly, no max pass
    (8.0, "shifted"),     # scores may pass 80: exp(score − max)
    (24.0, "floored"),    # rows span more than 87.4 (and reach past e^88.7, float32 overflow, unshifted): e^(score − max) would be subnormal, floored at e^−80
])
def test_late_normalized_kernel_is_within_the_truths_bound(scale_mode, spread, regime):
    rng = np.random.default_rng(8)
    b, h, kv, s, t, d = 1, 6, 2, 40, 300, 64
    q = (rng.standard_normal((b, h, s, d)) * spread).astype(np.float32)
    k, v = (rng.standard_normal((b, kv, t, d)).astype(np.float32) for _ in range(2))
    scale = d ** -0.5
    limit = min(80, 88 - math.log(t))
    truth, probs = naive_attention(q, k, v, scale=scale)
    spans = (np.log(probs.max(-1)) - np.log(probs.min(-1))).max()  # the widest row, e^(max − min)
    assert {"unshifted": 1.01 * _bound(q, k, scale) <= limit, "shifted": 1.01 * _bound(q, k, scale) > limit,
            "floored": spans > 88}[regime], "the case is not in the regime it is meant to test"
    got = _kernel(q, k, v, scale_mode=scale_mode)
    rtol, atol = _kernel_tolerance(q, k, v, probs, scale)
    assert_close(got, truth, rtol=rtol, atol=atol, what=f"kernel ({regime}, {scale_mode}) vs float64 truth")
    reference = A.scaled_dot_product_attention(q, k, v, scale_mode=scale_mode)
    assert_close(got, reference, rtol=2 * rtol, atol=2 * atol, what="kernel vs the reference")


@pytest.mark.parametrize("case", ["causal", "left padding", "alibi", "mask above 0", "large scores"])
def test_late_normalized_kernel_with_masks_and_biases(case):
    """Masks and biases that must keep the max pass (a row that sees no key, a bias, a mask entry above
    0, scores that may pass 80) and one that need not (causal): an unshifted exp would overflow or
    divide 0 by 0 there, so these fail if the kernel picked its regime wrongly."""
    rng = np.random.default_rng(9)
    b, h, kv, s, past, d = 2, 4, 2, 24, 8, 64
    t = past + s
    q = rng.standard_normal((b, h, s, d)).astype(np.float32) * (30 if case == "large scores" else 1)
    k, v = (rng.standard_normal((b, kv, t, d)).astype(np.float32) for _ in range(2))
    attention_mask = np.ones((b, t), dtype=np.int64)
    if case == "left padding":
        attention_mask[0, :past + 3] = 0  # the first 3 queries of row 0 see no key at all
    mask = A.build_attention_mask(attention_mask, s, past, np.float32)
    visible = visible_pattern(b, s, t, attention_mask)
    bias = alibi_bias(h, t).astype(np.float32) if case == "alibi" else None
    if case == "mask above 0":
        mask = mask.copy()
        mask[..., 5] = np.where(mask[..., 5] == 0, 100.0, mask[..., 5])  # an additive boost of key 5
        bias_truth = np.where(np.broadcast_to(mask, (b, 1, s, t)) > 0, 100.0, 0.0)
    else:
        bias_truth = bias
    with np.errstate(invalid="ignore"):  # the truth of a row that sees no key is NaN; replaced below
        truth, probs = naive_attention(q, k, v, visible, bias=bias_truth)
    got = _kernel(q, k, v, mask=mask, bias=bias)
    reference = A.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias)
    # a row with no visible key: the reference spreads it evenly over the keys masked once (finite
    # mask; a key both padded and in the future is masked twice, −inf)
    rows = visible.any(-1)[:, None, :, None]
    once = np.broadcast_to(np.isfinite(mask), (b, h, s, t)).astype(np.float64)
    spread = once / once.sum(-1, keepdims=True)
    even = spread @ np.repeat(v.astype(np.float64), h // kv, axis=1)
    truth, probs = np.where(rows, truth, even), np.where(rows, probs, spread)
    rtol, atol = _kernel_tolerance(q, k, v, probs, d ** -0.5)
    assert_close(got, truth, rtol=rtol, atol=atol, what=f"kernel vs float64 truth [{case}]")
    assert_close(got, reference, rtol=2 * rtol, atol=2 * atol, what=f"kernel vs the reference [{case}]")


def test_blocks_run_the_kernel_in_float32_prefill_only(monkeypatch):
    """float32 blocks of 256 keys or more go through the kernel; float64, blocks with fewer keys, a decode
    step (one query, whose [v | 1] would copy the cache every step) and a single block of fewer than 32
    queries through the reference."""
    calls = []
    kernel = AB._late_normalized_attention
    monkeypatch.setattr(AB, "_late_normalized_attention", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    rng = np.random.default_rng(10)
    for dtype, s, t in (("float32", 300, 300), ("float64", 300, 300), ("float32", 1, 300), ("float32", 64, 64),
                        ("float32", 16, 80), ("float32", 64, 300), ("float32", 16, 300)):
        q = rng.standard_normal((1, 9, s, 64)).astype(dtype)
        k, v = (rng.standard_normal((1, 3, t, 64)).astype(dtype) for _ in range(2))
        mask = A.build_attention_mask(None, s, t - s, dtype)
        calls.clear()
        AB.causal_attention_blocks(q, k, v, mask=mask)
        # 300 queries: 3 blocks, of 128, 256 and 300 keys: the last two through the kernel; 64 queries
        # after 236 cached keys: one block, through the kernel; 64 alone, 16 and 1: the plain call
        expected = {("float32", 300, 300): [(1, 9, 44, 64), (1, 9, 128, 64)], ("float32", 64, 300): [(1, 9, 64, 64)]}
        assert sorted(calls) == expected.get((dtype, s, t), []), (dtype, s, t, calls)
        if s < 256:
            continue  # attention_blocks' single block is the plain call
        calls.clear()
        AB.attention_blocks(q, k, v, scale_mode="scale_q", softmax_dtype=None)
        # one tile per KV head: its group's 3 query heads, all 300 queries
        assert calls == ([(1, 3, 300, 64)] * 3 if (dtype, s) == ("float32", 300) else []), (dtype, s, calls)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_q", [None, 128, 7])
def test_attention_blocks_tiles_cover_every_item_head_and_query_once(monkeypatch, dtype, block_q):
    """`attention_blocks` cuts a GQA attention in (batch item, KV head, query block) tiles: each tile reads
    its own item's KV head with that head's query group, and together they write every output once.
    Checked against the float64 truth within the kernel's bound, and in float64 (the plain call on each
    slice) against the full call within two orderings of its sums (rtol 8 ulps, atol (sqrt(t) + 16)
    ulps of p·|v|, as tests/test_threads.py); the tiles' shapes pin the default cut."""
    monkeypatch.setattr(AB, "num_threads", lambda: 2)
    rng = np.random.default_rng(12)
    b, h, kv, s, d = 2, 6, 2, 300, 32
    q = (rng.standard_normal((b, h, s, d)) * 1.5).astype(dtype)
    k, v = (rng.standard_normal((b, kv, s, d)).astype(dtype) for _ in range(2))
    tiles = []
    attend = A.scaled_dot_product_attention if dtype == "float64" else AB._late_normalized_attention
    name = "scaled_dot_product_attention" if dtype == "float64" else "_late_normalized_attention"
    monkeypatch.setattr(AB, name, lambda q_tile, *a, **kw: tiles.append(q_tile.shape) or attend(q_tile, *a, **kw))
    got = AB.attention_blocks(q, k, v, block_q=block_q, scale_mode="scale_q", softmax_dtype=None)
    truth, probs = naive_attention(q, k, v, scale=d ** -0.5)
    rtol, atol = _kernel_tolerance(q, k, v, probs, d ** -0.5)
    assert_close(got, truth, rtol=rtol, atol=atol, what=f"tiles ({dtype}, block_q={block_q}) vs float64 truth")
    if dtype == "float64":  # and the plain call on each slice is the full call up to its sums' order, in float64 ulps
        full = A.scaled_dot_product_attention(q, k, v, scale_mode="scale_q", softmax_dtype=None)
        pv = probs @ np.repeat(np.abs(v), h // kv, axis=1)
        rtol, atol = tolerance("float64", 8, atol_ulps=math.sqrt(s) + 16, scale=pv)
        assert_close(got, full, rtol=rtol, atol=atol, what=f"tiles (block_q={block_q}) vs the full call")
    rows = s if block_q is None else block_q  # by default a head's every query: 3·300 scores a query fit one tile
    blocks = -(-s // rows)
    assert len(tiles) == b * kv * blocks
    assert sorted(tiles) == sorted([(1, h // kv, min(rows, s - start), d) for start in range(0, s, rows)] * b * kv)


def test_attention_blocks_default_tile_fits_its_score_budget_and_the_cores(monkeypatch):
    """A head's whole rows while [group, s, t] fits `_TILE_SCORES`; longer inputs in blocks that fit;
    more blocks when there are fewer (item, KV head) pairs than cores."""
    monkeypatch.setattr(AB, "num_threads", lambda: 2)
    assert AB._tile_queries(6, 1025, 1025) == 1025                 # DINOv2 at 448 px: one tile per head
    assert AB._tile_queries(1, 1025, 1025) == 513                  # one head, two cores: two blocks
    assert AB._tile_queries(6, 4096, 4096) == 512                  # 4096² scores: blocks of 512·4096 = 2^21
    assert 512 * 4096 <= AB._TILE_SCORES and AB._tile_queries(6, 4096, 4096) * 4096 <= AB._TILE_SCORES
    monkeypatch.setattr(AB, "num_threads", lambda: 16)
    assert AB._tile_queries(6, 1025, 1025) == 342                  # 6 heads on 16 cores: 3 blocks each


@pytest.mark.parametrize("module,wrap,address", [
    (A, np.asarray, lambda x: x.__array_interface__["data"][0]),
    (T, torch.from_numpy, lambda x: x.data_ptr()),
])
def test_kv_cache_writes_in_place_and_grows_geometrically(module, wrap, address):
    """100 decode steps after a 5-token prefill: the cache moves only when its capacity doubles
    (16, 32, 64, 128: 3 moves), never per step, and holds exactly what concatenation would."""
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((1, 2, 105, 8))
    values = rng.standard_normal((1, 2, 105, 8))
    cache = module.KVCache()
    k_all, _ = cache.update(0, wrap(keys[:, :, :5].copy()), wrap(values[:, :, :5].copy()))
    addresses = {address(k_all)}
    earlier = np.asarray(k_all).copy()
    for step in range(5, 105):
        k_all, v_all = cache.update(0, wrap(keys[:, :, step:step + 1].copy()), wrap(values[:, :, step:step + 1].copy()))
        addresses.add(address(k_all))
    assert len(addresses) == 4, f"the cache moved {len(addresses) - 1} times in 100 steps"
    np.testing.assert_array_equal(np.asarray(k_all), keys)
    np.testing.assert_array_equal(np.asarray(v_all), values)
    np.testing.assert_array_equal(earlier, keys[:, :, :5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_bit_equal_to_silu_times_up(dtype):
    """The one-buffer SwiGLU product against the formula, including e^(−x) overflow (x = −100 -> −0)."""
    from minivl.activations import silu, silu_mul
    from torch_impl.activations import silu_mul as torch_silu_mul

    rng = np.random.default_rng(7)
    gate = (rng.standard_normal((3, 17, 40)) * 6).astype(dtype)
    gate[0, 0, :4] = [-100.0, -1000.0, 88.0, 0.0]
    up = rng.standard_normal((3, 17, 40)).astype(dtype)
    expected = silu(gate) * up
    np.testing.assert_array_equal(silu_mul(gate, up), expected)
    rtol, atol = tolerance(dtype, 4, scale=float(np.abs(expected).max()))
    assert_close(torch_silu_mul(torch.from_numpy(gate), torch.from_numpy(up)), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("head_dim", [64, 256, 48])
def test_kernel_divides_q_by_a_power_of_two_divisor_bit_for_bit(head_dim, monkeypatch):
    """sqrt(d) = 8 or 16 divides q before q·kᵀ instead of the scores after it: exact (a power of two
    scales every product and partial sum without rounding), so the kernel's output is the same bit
    for bit with the shortcut turned off (sqrt(48) is no power of two: both runs divide the scores).
    Scores near overflow (the bound past _EXACT_SCALING_LIMIT) keep the reference's order."""
    rng = np.random.default_rng(head_dim)
    q = rng.standard_normal((1, 6, 40, head_dim)).astype(np.float32) * 3
    k, v = (rng.standard_normal((1, 2, 70, head_dim)).astype(np.float32) for _ in range(2))
    mask = A.build_attention_mask(None, 40, 30, np.float32)
    for scale_mode in ("divide", "multiply"):
        shortcut = _kernel(q, k, v, mask=mask, scale_mode=scale_mode)
        with monkeypatch.context() as patch:
            patch.setattr(AB, "_EXACT_SCALING_LIMIT", 0.0)
            plain = _kernel(q, k, v, mask=mask, scale_mode=scale_mode)
        np.testing.assert_array_equal(shortcut.view(np.uint32), plain.view(np.uint32))
    exact = (q.reshape(1, 2, -1, head_dim) / np.float32(8)) @ np.swapaxes(k, -1, -2)
    np.testing.assert_array_equal(exact, (q.reshape(1, 2, -1, head_dim) @ np.swapaxes(k, -1, -2)) / np.float32(8))


@pytest.mark.parametrize("case", ["causal", "left padding", "window", "past keys"])
def test_kernel_adds_only_the_mask_columns_that_are_not_zero(case, monkeypatch):
    """A causal block's first keys are seen by every query of it, their mask is 0, and the kernel
    skips adding them (mask_from): the output is the same bit for bit as with the whole mask added
    (x + 0 = x; a −0 score becomes +0, and e^−0 = e^+0). causal_attention_blocks passes mask_from
    only where those columns are 0: with padding or a window hiding early keys it passes 0."""
    rng = np.random.default_rng(11)
    b, h, kv, s, d = 2, 4, 2, 300, 64
    past = 40 if case == "past keys" else 0
    t = past + s
    q = rng.standard_normal((b, h, s, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, kv, t, d)).astype(np.float32) for _ in range(2))
    attention_mask = np.ones((b, t), dtype=np.int64)
    if case == "left padding":
        attention_mask[0, :7] = 0
    mask = A.build_attention_mask(attention_mask, s, past, np.float32,
                                  sliding_window=100 if case == "window" else None)
    seen = []
    kernel = AB._late_normalized_attention

    def recording(*args, mask_from=0, **kwargs):
        seen.append(mask_from)
        got = kernel(*args, mask_from=mask_from, **kwargs)
        whole = kernel(*args, mask_from=0, **kwargs)
        np.testing.assert_array_equal(got.view(np.uint32), whole.view(np.uint32))
        return got

    monkeypatch.setattr(AB, "_late_normalized_attention", recording)
    monkeypatch.setattr(AB, "_KERNEL_MIN_KEYS", 0)  # every block through the kernel, the first (128 keys) too
    monkeypatch.setenv("MINIVL_NUM_THREADS", "1")
    AB.causal_attention_blocks(q, k, v, mask=mask)
    starts = range(0, s, 128)
    expected = [0] * 3 if case in ("left padding", "window") else [t - s + start + 1 for start in starts]
    assert sorted(seen) == sorted(expected), (case, seen)
