"""FlashAttention-2's forward pass (Dao, 2023) as a readable block loop: the torch twin of minivl/flash.py.

Same algorithm, same names, same flash_attn conventions (bottom-right alignment, window_size,
alibi_slopes, varlen packing, lse = -inf for rows with no visible key); see minivl/flash.py for
the derivation. This file is for reading and for parity tests, not for speed: the fast
implementation of the same block structure is the Triton kernel in torch_impl/triton_attention.py.
The shape checks and the tile bookkeeping (pure Python on integers) are shared with minivl.
"""
from __future__ import annotations

import math

import torch

from minivl.flash import (_check_dense, _check_varlen, _tile_fully_visible, _visible_key_blocks,
                          _window)
from minivl.errors import ShapeError


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                    alibi_slopes: torch.Tensor | None = None, block_q: int = 64,
                    block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled attention with online softmax (FlashAttention-2 forward), flash_attn semantics.

    q [b, n_heads, s, d], k [b, n_kv_heads, t, d], v [b, n_kv_heads, t, d_v]
    -> out [b, n_heads, s, d_v], lse [b, n_heads, s]
    """
    _check_dense(q, k, v, block_q, block_k)
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    group = n_heads // n_kv_heads
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    left, right = _window(window_size, causal)
    slopes = _alibi_view(alibi_slopes, batch, n_heads, n_kv_heads, compute_dtype)
    # query i sits at absolute position i + offset (bottom-right alignment)
    offset = kv_len - q_len

    # GQA as a view: query head h = kv_head·group + g reads kv head kv_head
    q_grouped = q.reshape(batch, n_kv_heads, group, q_len, head_dim).to(compute_dtype)
    k_grouped = k.to(compute_dtype)[:, :, None]  # [b, n_kv, 1, t, d]
    v_grouped = v.to(compute_dtype)[:, :, None]  # [b, n_kv, 1, t, d_v]
    out = q.new_zeros((batch, n_kv_heads, group, q_len, v_dim), dtype=compute_dtype)
    lse = q.new_full((batch, n_kv_heads, group, q_len), -math.inf, dtype=compute_dtype)

    for q_start in range(0, q_len, block_q):
        q_end = min(q_start + block_q, q_len)
        q_block = q_grouped[..., q_start:q_end, :]  # [b, n_kv, group, Bq, d]
        positions = torch.arange(q_start, q_end, device=q.device) + offset
        row_max = q_block.new_full(q_block.shape[:-1], -math.inf)  # m
        row_sum = q_block.new_zeros(q_block.shape[:-1])  # l
        acc = q_block.new_zeros(q_block.shape[:-1] + (v_dim,))  # Σ exp(s - m)·v

        for k_start, k_end in _visible_key_blocks(q_start + offset, q_end - 1 + offset, kv_len,
                                                  left, right, block_k):
            keys = torch.arange(k_start, k_end, device=q.device)
            # S = (q·kᵀ)·scale for this tile only: [b, n_kv, group, Bq, Bk]
            scores = (q_block @ k_grouped[..., k_start:k_end, :].transpose(-1, -2)) * scale
            distance = positions[:, None] - keys[None, :]  # i + t - s - j, [Bq, Bk]
            if slopes is not None:
                # ALiBi: S_ij -= slope·|i + t - s - j|, built per tile from the slopes
                scores = scores - slopes * distance.abs().to(compute_dtype)
            if not _tile_fully_visible(distance, left, right):
                # visible iff -right <= (i + t - s - j) <= left
                visible = (distance <= left) & (distance >= -right)
                scores = scores.masked_fill(~visible, -math.inf)

            # online softmax: m_new = max(m, max_j S_ij)
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            # a row that has seen no visible key yet keeps m = -inf; shift it by 0 to avoid inf - inf
            shift = torch.where(torch.isneginf(new_max), 0.0, new_max)
            # P_ij = exp(S_ij - m_new); alpha = exp(m - m_new) rescales what was summed against m
            probs = torch.exp(scores - shift[..., None])
            alpha = torch.exp(row_max - shift)
            # l = alpha·l + Σ_j P_ij ;  acc = alpha·acc + P·v
            row_sum = alpha * row_sum + probs.sum(dim=-1)
            acc = alpha[..., None] * acc + probs @ v_grouped[..., k_start:k_end, :]
            row_max = new_max

        # one final division: out = acc / l  (rows that saw no visible key stay 0)
        seen = row_sum > 0
        out[..., q_start:q_end, :] = acc / torch.where(seen, row_sum, 1.0)[..., None]
        # lse = m + log(l); -inf for rows with no visible key
        lse[..., q_start:q_end] = torch.where(seen, row_max + torch.log(row_sum), -math.inf)

    out = out.reshape(batch, n_heads, q_len, v_dim).to(q.dtype)
    return out, lse.reshape(batch, n_heads, q_len)


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           softmax_scale: float | None = None,
                           window_size: tuple[int, int] = (-1, -1),
                           alibi_slopes: torch.Tensor | None = None, block_q: int = 64,
                           block_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over sequences packed along the token axis, as flash_attn_varlen_func.

    q [total_q, n_heads, d], k [total_k, n_kv_heads, d], v [total_k, n_kv_heads, d_v],
    cu_seqlens_q / cu_seqlens_k [n_seqs + 1] -> out [total_q, n_heads, d_v], lse [n_heads, total_q]
    """
    cu_seqlens_q, cu_seqlens_k = torch.as_tensor(cu_seqlens_q).cpu(), torch.as_tensor(cu_seqlens_k).cpu()
    _check_varlen(q, k, v, cu_seqlens_q.numpy(), cu_seqlens_k.numpy(), max_seqlen_q, max_seqlen_k)
    n_seqs = len(cu_seqlens_q) - 1
    n_heads = q.shape[1]
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    if alibi_slopes is not None:
        alibi_slopes = torch.as_tensor(alibi_slopes)
        if tuple(alibi_slopes.shape) not in ((n_heads,), (n_seqs, n_heads)):
            raise ShapeError(f"alibi_slopes must have shape ({n_heads},) or ({n_seqs}, {n_heads}) "
                             f"(one slope per head, optionally per sequence); got {tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.expand(n_seqs, n_heads)
    out = q.new_zeros((q.shape[0], n_heads, v.shape[2]))
    lse = q.new_full((n_heads, q.shape[0]), -math.inf, dtype=compute_dtype)
    # the loop over sequences is the outer level only: each one is a dense problem with batch 1
    for seq in range(n_seqs):
        q_lo, q_hi = int(cu_seqlens_q[seq]), int(cu_seqlens_q[seq + 1])
        k_lo, k_hi = int(cu_seqlens_k[seq]), int(cu_seqlens_k[seq + 1])
        if q_hi == q_lo:
            continue
        # [len, heads, d] -> [1, heads, len, d]
        seq_out, seq_lse = flash_attention(
            q[q_lo:q_hi].transpose(0, 1)[None], k[k_lo:k_hi].transpose(0, 1)[None],
            v[k_lo:k_hi].transpose(0, 1)[None], causal=causal, softmax_scale=softmax_scale,
            window_size=window_size, block_q=block_q, block_k=block_k,
            alibi_slopes=None if alibi_slopes is None else alibi_slopes[seq])
        out[q_lo:q_hi] = seq_out[0].transpose(0, 1)
        lse[:, q_lo:q_hi] = seq_lse[0]
    return out, lse


def _alibi_view(alibi_slopes, batch: int, n_heads: int, n_kv_heads: int, dtype):
    """Slopes [n_heads] or [b, n_heads] as [b|1, n_kv, group, 1, 1] to broadcast over a score tile."""
    if alibi_slopes is None:
        return None
    slopes = torch.as_tensor(alibi_slopes)
    if tuple(slopes.shape) == (n_heads,):
        slopes = slopes[None]
    elif tuple(slopes.shape) != (batch, n_heads):
        raise ShapeError(f"alibi_slopes must have shape ({n_heads},) or ({batch}, {n_heads}) "
                         f"(one slope per head, optionally per batch row); got {tuple(slopes.shape)}")
    return slopes.to(dtype).reshape(slopes.shape[0], n_kv_heads, n_heads // n_kv_heads, 1, 1)
