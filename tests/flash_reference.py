"""Independent references for the FlashAttention tests (tests/test_flash.py, tests/test_triton_attention.py).

Written from flash_attn's documented semantics, NOT from minivl/flash.py: the whole [s, t] score
matrix in float64, K/V repeated for GQA, masks as explicit boolean matrices. Slow and simple on
purpose. A second reference is torch's own scaled_dot_product_attention.
"""
from __future__ import annotations

import numpy as np


def visible_matrix(q_len: int, kv_len: int, causal: bool, window_size=(-1, -1)) -> np.ndarray:
    """[s, t] bool: key j visible to query i, flash_attn rules (bottom-right aligned, -1 = unbounded)."""
    position = np.arange(q_len)[:, None] + kv_len - q_len
    key = np.arange(kv_len)[None, :]
    left, right = window_size
    visible = np.ones((q_len, kv_len), dtype=bool)
    if left >= 0:
        visible &= key >= position - left
    if right >= 0:
        visible &= key <= position + right
    if causal:
        visible &= key <= position
    return visible


def naive_attention(q, k, v, *, causal=False, window_size=(-1, -1), alibi_slopes=None,
                    softmax_scale=None, additive=None):
    """softmax(q·kᵀ·scale - slope·|i + t - s - j| + additive, over visible keys)·v, all in float64.

    q [b, h, s, d], k/v [b, h_kv, t, d] -> out [b, h, s, d_v], lse [b, h, s]
    Rows with no visible key: out 0, lse -inf.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, n_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    group = n_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    scores = np.einsum("bhsd,bhtd->bhst", q, k) * scale
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=np.float64), (batch, n_heads))
        distance = np.abs(np.arange(q_len)[:, None] + kv_len - q_len - np.arange(kv_len)[None, :])
        scores = scores - slopes[:, :, None, None] * distance
    if additive is not None:
        scores = scores + np.asarray(additive, dtype=np.float64)
    visible = visible_matrix(q_len, kv_len, causal, window_size)
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True) if kv_len else np.full(scores.shape[:-1] + (1,), -np.inf)
    any_visible = np.isfinite(row_max)
    shifted = np.exp(scores - np.where(any_visible, row_max, 0.0))
    total = shifted.sum(axis=-1, keepdims=True)
    probs = np.where(any_visible, shifted / np.where(any_visible, total, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(any_visible, row_max + np.log(total), -np.inf)[..., 0]
    return probs @ v, lse


def naive_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
    """Packed q [total_q, h, d], k/v [total_k, h_kv, d] -> out [total_q, h, d_v], lse [h, total_q]."""
    slopes = options.pop("alibi_slopes", None)
    n_seqs = len(cu_seqlens_q) - 1
    out = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for seq in range(n_seqs):
        q_lo, q_hi = cu_seqlens_q[seq], cu_seqlens_q[seq + 1]
        k_lo, k_hi = cu_seqlens_k[seq], cu_seqlens_k[seq + 1]
        seq_slopes = None if slopes is None else np.broadcast_to(slopes, (n_seqs, q.shape[1]))[seq]
        o, l = naive_attention(q[q_lo:q_hi].transpose(1, 0, 2)[None], k[k_lo:k_hi].transpose(1, 0, 2)[None],
                               v[k_lo:k_hi].transpose(1, 0, 2)[None], alibi_slopes=seq_slopes, **options)
        out[q_lo:q_hi] = o[0].transpose(1, 0, 2)
        lse[:, q_lo:q_hi] = l[0]
    return out, lse


def sdpa_reference(q, k, v, *, causal=False, window_size=(-1, -1), alibi_slopes=None, softmax_scale=None):
    """torch.nn.functional.scaled_dot_product_attention in float64 with the visibility and ALiBi as a float mask.

    Returns (out [b, h, s, d_v] as NumPy, rows_with_a_visible_key [s] bool): sdpa gives NaN on
    rows where every key is hidden, so callers compare only the other rows.
    """
    import torch

    q, k, v = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (q, k, v))
    batch, n_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    visible = visible_matrix(q_len, kv_len, causal, window_size)
    bias = np.zeros((batch, n_heads, q_len, kv_len))
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=np.float64), (batch, n_heads))
        distance = np.abs(np.arange(q_len)[:, None] + kv_len - q_len - np.arange(kv_len)[None, :])
        bias = bias - slopes[:, :, None, None] * distance
    attn_mask = torch.as_tensor(np.where(visible, bias, -np.inf))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=softmax_scale, enable_gqa=k.shape[1] != n_heads)
    return out.numpy(), visible.any(axis=1)


def random_inputs(rng, batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, options, dtype, scale_name="softmax_scale"):
    """Random q, k, v in dtype and the kernel keyword arguments for one case's `options` (causal,
    window_size, the scale under `scale_name`, v_dim, alibi 'heads' [h] or 'batch' [b, h] slopes)."""
    v_dim = options.get("v_dim", head_dim)
    q = rng.standard_normal((batch, n_heads, q_len, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, n_kv_heads, kv_len, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, n_kv_heads, kv_len, v_dim)).astype(dtype)
    kwargs = {key: options[key] for key in ("causal", "window_size", scale_name) if key in options}
    if options.get("alibi") == "heads":
        kwargs["alibi_slopes"] = rng.uniform(0.05, 1.0, n_heads).astype(np.float32)
    elif options.get("alibi") == "batch":
        kwargs["alibi_slopes"] = rng.uniform(0.05, 1.0, (batch, n_heads)).astype(np.float32)
    return q, k, v, kwargs
