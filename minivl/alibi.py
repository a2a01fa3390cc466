"""ALiBi, attention with linear biases (Press, Smith & Lewis, 2021), exactly as MPT builds it.

Instead of position embeddings, each head h adds −slope_h·(distance) to its attention scores.
MPT's `gen_slopes` / `build_alibi_bias` (and transformers' `build_mpt_alibi_tensor`) compute the
slopes in float32; we do the same so the biases agree bit for bit.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from minivl.errors import ConfigError


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8) -> np.ndarray:
    """Per-head ALiBi slopes, MPT `gen_slopes` semantics (alibi_bias_max honoured, float32).

    N = 2^ceil(log2 n); m_k = k·(a/N) for k = 1..N; slope_k = 1/2^(m_k); when n is not a power of
    two the even-k slopes (the geometric sequence for N/2 heads) come first, then the odd-k ones.
    () -> [n_heads] float32
    """
    _check_alibi_args(n_heads, alibi_bias_max)
    n_pow2 = 2 ** math.ceil(math.log2(n_heads))
    # m_k = k · (a / N), k = 1..N, in float32 like the reference
    m = np.arange(1, n_pow2 + 1, dtype=np.float32) * np.float32(alibi_bias_max / n_pow2)
    # slope_k = 1 / 2^(m_k)
    slopes = np.float32(1.0) / np.power(np.float32(2.0), m)
    if n_pow2 != n_heads:
        # Press et al.'s rule for n not a power of two: slopes of N/2 heads (k = 2, 4, ..., N),
        # then the in-between ones (k = 1, 3, ...), keep the first n
        slopes = np.concatenate([slopes[1::2], slopes[0::2]])[:n_heads]
    return slopes


def alibi_bias(n_heads: int, seq_len: int, alibi_bias_max: float = 8, full: bool = False) -> np.ndarray:
    """ALiBi additive bias, MPT `build_alibi_bias`: causal row form or the full symmetric matrix.

    full=False: bias[0, h, 0, j] = (j − (L−1))·slope_h. Every query row gets the same vector; for a
    causal query i this differs from the paper's −(i−j)·slope only by a per-row constant, which the
    softmax ignores. Slice the last t columns for t keys.
    full=True: bias[0, h, i, j] = −|i − j|·slope_h (non-causal / prefix-LM).
    () -> [1, n_heads, 1, L] (or [1, n_heads, L, L] if full), float32
    """
    slopes = alibi_slopes(n_heads, alibi_bias_max)
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise ConfigError(f"alibi_bias: seq_len (max_seq_len) must be an int >= 1, got {seq_len!r}")
    # relative key offsets j − (L−1) = 1−L, ..., 0, as integers (exact in float32 for any realistic L)
    offsets = np.arange(1 - seq_len, 1, dtype=np.int64)
    if full:
        # distance matrix −|j − i|, [L, L], in integers so the diagonal is +0 like the reference
        distance = -np.abs(offsets[None, :] - offsets[:, None])
        return distance.astype(np.float32)[None, None, :, :] * slopes[None, :, None, None]
    return offsets.astype(np.float32)[None, None, None, :] * slopes[None, :, None, None]


def _check_alibi_args(n_heads, alibi_bias_max) -> None:
    """ConfigError unless n_heads is a positive int and alibi_bias_max a positive number."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, numbers.Integral) or n_heads < 1:
        raise ConfigError(f"alibi: n_heads must be an int >= 1 (the config's n_heads), got {n_heads!r}")
    if isinstance(alibi_bias_max, bool) or not isinstance(alibi_bias_max, numbers.Real) or not alibi_bias_max > 0:
        raise ConfigError(f"alibi: alibi_bias_max must be a number > 0 (attn_config.alibi_bias_max, MPT "
                          f"default 8), got {alibi_bias_max!r}")
