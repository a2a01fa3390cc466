"""ALiBi, attention with linear biases (Press, Smith & Lewis, 2021), exactly as MPT builds it.

Instead of position embeddings, each head h adds −slope_h·(distance) to its attention scores.
MPT's `gen_slopes` / `build_alibi_bias` (and transformers' `build_mpt_alibi_tensor`) compute the
slopes in float32; we do the same so the biases agree bit for bit.
"""
from __future__ import annotations

import math
import numbers

import torch

from minivl.alibi import _check_alibi_args
from minivl.errors import ConfigError


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8, device=None) -> torch.Tensor:
    """Per-head ALiBi slopes, MPT `gen_slopes` semantics (alibi_bias_max honoured, float32).

    N = 2^ceil(log2 n); m_k = k·(a/N) for k = 1..N; slope_k = 1/2^(m_k); when n is not a power of
    two the even-k slopes (the geometric sequence for N/2 heads) come first, then the odd-k ones.
    () -> [n_heads] float32
    """
    _check_alibi_args(n_heads, alibi_bias_max)
    n_pow2 = 2 ** math.ceil(math.log2(n_heads))
    # m_k = k · (a / N), k = 1..N, in float32 like the reference
    m = torch.arange(1, n_pow2 + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n_pow2)
    # slope_k = 1 / 2^(m_k)
    slopes = 1.0 / torch.pow(2, m)
    if n_pow2 != n_heads:
        # Press et al.'s rule for n not a power of two: slopes of N/2 heads (k = 2, 4, ..., N),
        # then the in-between ones (k = 1, 3, ...), keep the first n
        slopes = torch.cat([slopes[1::2], slopes[0::2]])[:n_heads]
    return slopes


def alibi_bias(n_heads: int, seq_len: int, alibi_bias_max: float = 8, full: bool = False,
               device=None) -> torch.Tensor:
    """ALiBi additive bias, MPT `build_alibi_bias`: causal row form or the full symmetric matrix.

    full=False: bias[0, h, 0, j] = (j − (L−1))·slope_h. Every query row gets the same vector; for a
    causal query i this differs from the paper's −(i−j)·slope only by a per-row constant, which the
    softmax ignores. Slice the last t columns for t keys.
    full=True: bias[0, h, i, j] = −|i − j|·slope_h (non-causal / prefix-LM).
    () -> [1, n_heads, 1, L] (or [1, n_heads, L, L] if full), float32
    """
    slopes = alibi_slopes(n_heads, alibi_bias_max, device=device)
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise ConfigError(f"alibi_bias: seq_len (max_seq_len) must be an int >= 1, got {seq_len!r}")
    # relative key offsets j − (L−1) = 1−L, ..., 0, as integers (exact in float32 for any realistic L)
    offsets = torch.arange(1 - seq_len, 1, dtype=torch.int64, device=device)
    if full:
        # distance matrix −|j − i|, [L, L], in integers so the diagonal is +0 like the reference
        distance = -(offsets[None, :] - offsets[:, None]).abs()
        return distance.to(torch.float32)[None, None, :, :] * slopes[None, :, None, None]
    return offsets.to(torch.float32)[None, None, None, :] * slopes[None, :, None, None]
