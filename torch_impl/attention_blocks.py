"""Attention in blocks of queries: the fast paths beside `scaled_dot_product_attention` (torch_impl/attention.py).

The twin of minivl/attention_blocks.py: the same blocks, one after another (torch's kernels
thread each block themselves), each `scaled_dot_product_attention` on its slice (torch's softmax
is one fused pass already, so the NumPy file's late-normalized kernel has no twin here).
"""
from __future__ import annotations

import torch

from minivl.attention import check_additive
from torch_impl.attention import scaled_dot_product_attention


def causal_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor, bias=None,
                            block_q: int = 128, **attention_options) -> torch.Tensor:
    """Fast path of `scaled_dot_product_attention` for a causal mask: query blocks skip the keys they cannot see.

    The twin of minivl.attention.causal_attention_blocks (see its docstring): block [i0, i1) of the
    queries reads only the keys [0, t − s + i1) unless its skipped keys are not all hidden or one
    of its rows has no visible key left; each block is `scaled_dot_product_attention` on its slice.
    q [b, H, s, d], k/v [b, K, t, d], mask/bias broadcastable to [b, H, s, t] -> [b, H, s, d]
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    check_additive("mask", mask, (q.shape[0], q.shape[1], q_len, kv_len))
    if q_len <= block_q or mask.shape[-2] != q_len:  # one block, or a mask without per-query rows
        return scaled_dot_product_attention(q, k, v, mask=mask, bias=bias, **attention_options)
    hidden = torch.finfo(mask.dtype).min  # the masks' fill value (doubly masked entries are −inf)
    out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    for start in range(0, q_len, block_q):
        stop = min(start + block_q, q_len)
        block_mask = mask[..., start:stop, :]
        # the block's last query sits at position t − s + stop − 1: keys from t − s + stop on are hidden
        keys = kv_len - q_len + stop
        if bool((block_mask[..., keys:] > hidden).any()) or not bool((block_mask[..., :keys].amax(dim=-1) > hidden).all()):
            keys = kv_len
        block_bias = None if bias is None else _block(bias, start, stop, keys)
        out[:, :, start:stop] = scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], mask=block_mask[..., :keys], bias=block_bias,
            **attention_options)
    return out


def attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_q: int | None = None,
                     **attention_options) -> torch.Tensor:
    """Fast path of `scaled_dot_product_attention` without a mask (a ViT's): one block of queries at a time.

    The twin of minivl.attention_blocks.attention_blocks, the same result: torch's kernels thread
    each call themselves, so where NumPy runs one head's tiles on every core at once, this runs
    blocks of block_q (None: 256) queries over all heads one after another, each holding
    [b, heads, block_q, t] scores (per-head tiles would hand torch's threads products too small).
    q [b, H, s, d], k/v [b, K, t, d] -> [b, H, s, d]
    """
    block_q = 256 if block_q is None else block_q
    q_len = q.shape[2]
    masked = any(attention_options.get(name) is not None for name in ("mask", "bias"))
    if q_len <= block_q or masked or attention_options.get("is_causal") or attention_options.get("return_probs"):
        return scaled_dot_product_attention(q, k, v, **attention_options)  # one block, or rows that are not alike
    out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    for start in range(0, q_len, block_q):
        rows = slice(start, start + block_q)
        out[:, :, rows] = scaled_dot_product_attention(q[:, :, rows], k, v, **attention_options)
    return out


def _block(additive: torch.Tensor, start: int, stop: int, keys: int) -> torch.Tensor:
    """Rows start:stop (unless broadcast over queries) and the first `keys` columns of an additive [.., s, t] term."""
    rows = additive[..., start:stop, :] if additive.shape[-2] > 1 else additive
    return rows[..., :keys] if additive.shape[-1] > 1 else rows
