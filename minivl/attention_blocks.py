"""Attention in blocks of queries: the fast paths beside `scaled_dot_product_attention` (minivl/attention.py).

A prefill or a ViT attends with s queries at once; the reference holds all [b, heads, s, t]
scores and passes over them five times (max, −max, exp, Σ, ÷). Here the queries go in blocks,
on every core at once (minivl/threads.py):

* `causal_attention_blocks`: a block never computes the keys a causal mask hides from it;
* `attention_blocks`: an unmasked (ViT) attention, one head's queries at a time;
* in float32 each block (or tile) runs `_late_normalized_attention`, which moves Σ and ÷ after p·v and
  drops the max pass when the scores are small enough not to need it.

Each is held to the reference by tests/test_attention_fast.py (and one thread against two by
tests/test_threads.py).
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np

from minivl.attention import check_additive, check_attention_options, check_qkv, scaled_dot_product_attention
from minivl.threads import num_threads, parallel


def causal_attention_blocks(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, mask: np.ndarray, bias=None,
                            block_q: int = 128, **attention_options) -> np.ndarray:
    """Fast path of `scaled_dot_product_attention` for a causal mask: query blocks skip the keys they cannot see.

    Under a causal mask (bottom-right aligned, as `build_attention_mask` builds it, padding and
    sliding window included) query i sees no key past p_i = t − s + i, so the block of queries
    [i0, i1) needs only the keys [0, t − s + i1): the masked upper triangle is never computed and
    no [b, heads, s, t] score tensor is ever held (a block holds [b, heads, block_q, t] at most).
    Each block is `scaled_dot_product_attention` itself on its slice, so the result equals the
    full call up to the summation order of the softmax denominators (a skipped key adds
    e^(min − max) = 0 exactly); in float32 each block of 256 keys or more runs
    `_late_normalized_attention` instead, within the float64 truth's error bound (a block with
    fewer keys, or a single block of fewer than 32 queries, stays the plain call: there the
    kernel's fixed costs, a copy of v, two norms and the mask's row maxima, outweigh the passes
    it saves, `_KERNEL_MIN_KEYS`, `_KERNEL_MIN_QUERIES`). A block whose
    skipped keys are not all hidden (a mask that is not causal) or that has a row with no visible
    key left (a left-pad query, which the reference spreads evenly over the keys masked once:
    a padded future key is masked twice, −inf) uses every key, so any mask gives the full call's
    result.
    The blocks are independent and run at once on every core (minivl/threads.py).
    tests/test_attention_fast.py holds the two equal, tests/test_threads.py one thread and two.
    q [b, H, s, d], k/v [b, K, t, d], mask/bias broadcastable to [b, H, s, t] -> [b, H, s, d]
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    check_additive("mask", mask, (q.shape[0], q.shape[1], q_len, kv_len))
    fast = _fast_kernel_applies(q, v, attention_options)
    fast = fast and kv_len >= _KERNEL_MIN_KEYS  # (some block has enough keys for the kernel)
    one_block = q_len <= block_q and not (fast and q_len >= _KERNEL_MIN_QUERIES)
    if one_block or mask.shape[-2] != q_len:  # one plain block, or a mask without per-query rows
        return scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, **attention_options)
    if fast:  # one copy of v as [v | 1] for all blocks (a prefill's; a decode step takes the plain call)
        kernel, v_ones = _fast_kernel(q, k, v, attention_options)
    hidden = np.finfo(mask.dtype).min  # the masks' fill value (doubly masked entries are −inf)
    out = np.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype)

    def attend_block(start: int, stop: int) -> None:
        block_mask = mask[..., start:stop, :]
        # the block's last query sits at position t − s + stop − 1: keys from t − s + stop on are hidden
        keys = kv_len - q_len + stop
        if np.any(block_mask[..., keys:] > hidden) or not np.all(block_mask[..., :keys].max(axis=-1) > hidden):
            keys = kv_len
        block_bias = None if bias is None else _block(bias, start, stop, keys)
        if fast and keys >= _KERNEL_MIN_KEYS:
            # the block's first query sits at t − s + start: every query of it sees the keys up to there, and
            # under a causal mask without padding their mask is 0, which the kernel need not add
            seen = kv_len - q_len + start + 1
            mask_from = seen if block_mask.shape[-1] == kv_len and not np.any(block_mask[..., :seen]) else 0
            kernel(q[:, :, start:stop], k[:, :, :keys], v_ones[:, :, :keys], mask=block_mask[..., :keys],
                   bias=block_bias, mask_from=mask_from, out=out[:, :, start:stop])
        else:
            out[:, :, start:stop] = scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], mask=block_mask[..., :keys], bias=block_bias,
                **attention_options)

    # those with most keys first, so the last block to start is a short one
    starts = range(0, q_len, block_q)
    parallel((partial(attend_block, start, min(start + block_q, q_len)) for start in reversed(starts)), calls_blas=True)
    return out


def attention_blocks(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, block_q: int | None = None,
                     **attention_options) -> np.ndarray:
    """Fast path of `scaled_dot_product_attention` without a mask (a ViT's): tiles of one head's queries on every core at once.

    Each query's row of attention reads every key of its head and nothing else, so the tile
    (batch item i, KV head j, queries [r0, r1)) is the full call on q[i, heads of j, r0:r1] with
    k[i, j], v[i, j] (a GQA group's query heads share their KV head's tile). The tiles run at once
    (minivl/threads.py), each holding [group, block_q, t] scores, where the full call holds
    [b, heads, s, t] (InternVL's 7 tiles of 1025 tokens in a 300M ViT: 470 MB of float32 per layer,
    through every softmax pass). By default a tile takes a head's every query while its scores stay
    within `_TILE_SCORES` (a 448-px ViT's [1025, 1025], 4 MB: the q·kᵀ and p·v products are as large
    as they can be, and the scores are read back while still in the caches), and the queries are cut
    in more blocks only for longer inputs or when there are fewer (item, head) pairs than cores.
    Measured on one DINOv2 layer (6 heads, 1025 tokens, 2 cores): 12.3 ms against 13.6 for blocks of
    256 queries over all heads at once; for 7 tiles, 85 against 125 ms.
    float32 tiles run `_late_normalized_attention` (no Σ or ÷ pass over the scores, nor a max pass
    when they are small; within the float64 truth's error bound, tests/test_attention_fast.py);
    other dtypes run the full call on their slice, equal to it up to the GEMM's accumulation order
    (tests/test_threads.py). A single tile of `_ONE_CALL_QUERIES` queries or fewer is the full call.
    block_q: queries per tile (None: as above).
    q [b, H, s, d], k/v [b, K, t, d] -> [b, H, s, d]
    """
    batch, n_heads, q_len = q.shape[:3]
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    masked = any(attention_options.get(name) is not None for name in ("mask", "bias"))
    if masked or attention_options.get("is_causal") or attention_options.get("return_probs") or n_heads % max(n_kv_heads, 1):
        return scaled_dot_product_attention(q, k, v, **attention_options)  # rows that are not alike (or checked there)
    group = n_heads // n_kv_heads
    if block_q is None:
        block_q = _tile_queries(batch * n_kv_heads, q_len, group * kv_len)
    if batch * n_kv_heads == 1 and q_len <= max(block_q, _ONE_CALL_QUERIES):
        return scaled_dot_product_attention(q, k, v, **attention_options)  # one tile: the call itself
    out = np.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype)
    if _fast_kernel_applies(q, v, attention_options):
        kernel, v_ones = _fast_kernel(q, k, v, attention_options)

        def attend_tile(item: int, kv_head: int, rows: slice) -> None:
            heads, one = slice(kv_head * group, (kv_head + 1) * group), slice(kv_head, kv_head + 1)
            kernel(q[item:item + 1, heads, rows], k[item:item + 1, one], v_ones[item:item + 1, one],
                   out=out[item:item + 1, heads, rows])
    else:
        def attend_tile(item: int, kv_head: int, rows: slice) -> None:
            heads, one = slice(kv_head * group, (kv_head + 1) * group), slice(kv_head, kv_head + 1)
            out[item:item + 1, heads, rows] = scaled_dot_product_attention(
                q[item:item + 1, heads, rows], k[item:item + 1, one], v[item:item + 1, one], **attention_options)

    tiles = ((item, kv_head, slice(start, start + block_q))
             for item in range(batch) for kv_head in range(n_kv_heads) for start in range(0, q_len, block_q))
    parallel((partial(attend_tile, *tile) for tile in tiles), calls_blas=True)
    return out


def _tile_queries(pairs: int, q_len: int, scores_per_query: int) -> int:
    """`attention_blocks`' default queries per tile: all of them while a tile's scores fit `_TILE_SCORES`,
    and at least as many tiles as cores (`pairs` = batch items × KV heads)."""
    blocks = max(-(-q_len * scores_per_query // _TILE_SCORES), -(-num_threads() // max(pairs, 1)), 1)
    return max(-(-q_len // blocks), 1)


# `attention_blocks`' largest default tile of scores: 2^21 floats, 8 MB of float32. Measured on DINOv2
# layers (6 heads, d = 64, 2 cores): at 1025 tokens and 7 tiles, one head's whole [1025, 1025] took 85
# ms against 89 for 2 blocks of it and 101 for blocks of 256; at 2048 tokens, blocks of 1024 or 683
# queries took 45 ms against 48 for all 2048 and 49 for 256
_TILE_SCORES = 1 << 21
# a single tile of this many queries or fewer is the plain call: too small for the hand-off to pay
_ONE_CALL_QUERIES = 256


# a block with fewer keys takes the plain call, not `_late_normalized_attention`: its fixed costs (the
# norms of q and k, [v | 1], the mask's row maxima, a strided division) outweigh the passes it saves
# over a small score tensor. In SmolLM2's prefill (benchmarks/ablation.py's model, in-model timings):
# at 64 and 128 tokens the plain call took 0.76× and 0.90× the kernel's attention time; blocks of 256
# keys and more were as fast or faster with the kernel
_KERNEL_MIN_KEYS = 256
# nor does a single block of fewer queries (a decode step's one query would copy the cache into [v | 1])
_KERNEL_MIN_QUERIES = 32

# `_late_normalized_attention`'s float32 limits: e^±80 (5.5e34, 1.8e−35) are normal float32 numbers,
# e^−87.4 and below are subnormals or 0, and a sum of t terms up to e^B stays below float32's
# largest 3.4e38 = e^88.7 while B <= 88 − ln t
_NORMAL_EXP_LIMIT = 80.0


def _late_normalized_attention(q: np.ndarray, k: np.ndarray, v_ones: np.ndarray, *, key_norm: float,
                              scale=None, scale_mode: str = "divide", mask=None, bias=None, mask_from: int = 0,
                              out=None) -> np.ndarray:
    """Fast float32 kernel of a block: `scaled_dot_product_attention` with softmax's Σ and ÷ moved after p·v.

    * out = (e·[v | 1])[:d] / (e·[v | 1])[d]: the row sums come out of the p·v GEMM as an extra
      column of ones (v_ones = [v | 1]), so neither Σ nor ÷ makes a pass over the [.., s, t] scores
      (flash attention's order, minivl/flash.py);
    * when no score can pass ±B, B = min(80, 88 − ln t) (|score| <= |q_i|·max_j |k_j|·scale by
      Cauchy–Schwarz, key_norm = max_j |k_j|), there is no bias, and a mask's best entry in each
      row lies in [bound − B, 0] (a causal mask: 0 on every row's visible keys), e = exp(score)
      unshifted: softmax does not depend on the shift, e^±B is a normal float32 and a row's sum
      stays finite, so the max pass and the subtraction go too;
    * otherwise e = exp(score − max) as the reference, and unmasked shifted scores below −80 are
      raised to −80: e^(−87.4 … −103) are float32 subnormals, on which x86's exp and GEMM run
      several times slower (a ViT's first layer has some), and the raise moves an output by
      t·e^−80·max|v| at most;
    * a divisor √d that is a power of two (d = 64, 256: 8, 16) divides q before the q·kᵀ GEMM
      instead of the [.., s, t] scores after it: (q/8)·k is (q·k)/8 to the last bit (a power of two
      scales every product and partial sum exactly) while no score is near float32's overflow
      (checked by the bound) or its subnormals (below 1e−38, far under a score's rounding error);
    * mask_from: the mask's first mask_from columns are known to be 0 (the keys every query of a
      causal block sees, `causal_attention_blocks` checks), so only the rest is added: x + 0 = x.
    Rounds differently from the reference (no probabilities are formed); tests/test_attention_fast.py
    holds both within the forward error bound of the float64 truth. For float32 q, k, v only: a
    half-precision model rounds its probabilities to its dtype before p·v, which this never forms.
    q [b, H, s, d], k [b, K, t, d], v_ones [b, K, t, d + 1] -> [b, H, s, d] (into `out` if given)
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    q_grouped = q.reshape(batch, n_kv_heads, n_heads // n_kv_heads * q_len, head_dim)
    if scale_mode == "divide":
        divisor = math.sqrt(head_dim) if scale is None else 1.0 / scale
        scale = 1.0 / divisor
    elif scale is None:
        scale = head_dim ** -0.5
    # |score| <= |q_i|·|k_j|·scale (Cauchy–Schwarz), with 1 % to spare for rounding
    q_norm = _key_norm(q)
    bound = 1.01 * q_norm * key_norm * abs(scale)
    # the reference's scores, op for op (scale_mode: see scaled_dot_product_attention)
    if scale_mode == "scale_q":
        scores = (q_grouped * scale) @ np.swapaxes(k, -1, -2)
    elif scale_mode == "divide" and math.frexp(divisor)[0] == 0.5 and 1.01 * q_norm * key_norm < _EXACT_SCALING_LIMIT:
        scores = (q_grouped / divisor) @ np.swapaxes(k, -1, -2)  # = (q·kᵀ)/divisor, bit for bit (docstring)
    else:
        scores = q_grouped @ np.swapaxes(k, -1, -2)
        if scale_mode == "divide":
            scores /= divisor
        else:
            scores *= scale
    scores = scores.reshape(batch, n_heads, q_len, kv_len)
    if mask is None or mask.shape[-1] != kv_len or not 0 < mask_from < kv_len:
        mask_from = 0  # (a mask broadcast over the keys has no columns to skip)
    elif mask_from:
        mask = mask[..., mask_from:]
    with np.errstate(over="ignore"):
        if bias is not None:
            scores += bias
        if mask is not None:
            scores[..., mask_from:] += mask
    limit = min(_NORMAL_EXP_LIMIT, 88.0 - math.log(max(kv_len, 1)))
    unshifted = bound <= limit and bias is None
    if unshifted and mask is not None:  # each row's best masked score within [−limit, bound]: its e^score is normal
        row_best = np.max(mask, axis=-1)
        if mask_from:  # and the keys before mask_from, whose mask is 0
            row_best = np.maximum(row_best, 0.0)
        unshifted = np.max(row_best) <= 0 and bound - np.min(row_best) <= limit
    if not unshifted:
        scores -= np.max(scores, axis=-1, keepdims=True)
        if mask is None and 2 * bound > _NORMAL_EXP_LIMIT:  # a row may span more than 80: keep e normal
            np.maximum(scores, -_NORMAL_EXP_LIMIT, out=scores)
    np.exp(scores, out=scores)
    # [e·v | e·1] in one GEMM per KV head, then the division on [.., s, d] only
    sums = (scores.reshape(batch, n_kv_heads, -1, kv_len) @ v_ones).reshape(batch, n_heads, q_len, head_dim + 1)
    return np.divide(sums[..., :head_dim], sums[..., head_dim:], out=out)


# below this bound on |q_i|·|k_j| no partial sum of q·kᵀ nears float32's largest 3.4e38 even multiplied by 16
_EXACT_SCALING_LIMIT = 1e37


def _fast_kernel(q, k, v, attention_options) -> tuple:
    """(`_late_normalized_attention` bound to max_j |k_j| and the call's scale options, [v | 1]), inputs checked."""
    check_qkv(q, k, v)
    check_attention_options(attention_options.get("scale_mode", "divide"), attention_options.get("softmax_dtype"))
    options = {name: attention_options[name] for name in ("scale", "scale_mode") if name in attention_options}
    return partial(_late_normalized_attention, key_norm=_key_norm(k), **options), _with_ones(v)


def _key_norm(k: np.ndarray) -> float:
    """max_j |k_j| over every head and key (the Cauchy–Schwarz factor of `_late_normalized_attention`).

    The squares are summed in k's float32: a sum of d positive terms is within d·2⁻²⁴ of its value
    (4e−6 at d = 64), far inside the bound's 1 % margin; a sum past float32's range is inf, which
    sends the block to the shifted exp, as a NaN does. (float64 sums cost 4× as much here.)
    """
    return float(np.sqrt(np.max(np.einsum("...d,...d->...", k, k), initial=0.0)))


def _with_ones(v: np.ndarray) -> np.ndarray:
    """[v | 1]: v with a column of ones after its last feature, for `_late_normalized_attention`. [.., d] -> [.., d + 1]"""
    v_ones = np.empty(v.shape[:-1] + (v.shape[-1] + 1,), dtype=v.dtype)
    v_ones[..., :-1], v_ones[..., -1] = v, 1
    return v_ones


def _fast_kernel_applies(q, v, attention_options) -> bool:
    """True when `_late_normalized_attention` may stand in for the reference: float32 throughout, no probabilities."""
    softmax_dtype = attention_options.get("softmax_dtype", "float32")
    compute = q.dtype if softmax_dtype is None else np.promote_types(q.dtype, np.dtype(softmax_dtype))
    return (q.dtype == v.dtype == compute == np.float32 and not attention_options.get("return_probs")
            and not attention_options.get("is_causal"))


def _block(additive: np.ndarray, start: int, stop: int, keys: int) -> np.ndarray:
    """Rows start:stop (unless broadcast over queries) and the first `keys` columns of an additive [.., s, t] term."""
    rows = additive[..., start:stop, :] if additive.shape[-2] > 1 else additive
    return rows[..., :keys] if additive.shape[-1] > 1 else rows
