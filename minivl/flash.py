"""FlashAttention-2's forward pass (Dao, 2023), written as a readable block loop in NumPy.

Naive attention builds the whole score matrix ``S = q·kᵀ`` of shape ``[s, t]``, softmaxes it and
multiplies by ``v``: memory grows as ``s·t``. FlashAttention never builds ``S``. It walks over
blocks of ``block_q`` queries; for each it walks over blocks of ``block_k`` keys and keeps, per
query row, three running quantities (the "online softmax", Milakov & Gimelshein 2018):

* ``m``   the largest score seen so far,
* ``l``   the sum of ``exp(score - m)`` seen so far,
* ``acc`` the sum of ``exp(score - m)·v`` seen so far (not yet divided by ``l``).

When a new block raises the running max from ``m`` to ``m_new``, everything accumulated so far was
measured against the old max, so it is rescaled by ``alpha = exp(m - m_new)``. After the last key
block one division ``acc / l`` gives the softmax-weighted sum, and ``lse = m + log(l)`` is the
row's log-sum-exp (what a backward pass needs to recompute the probabilities). Memory is the
output plus one ``[block_q, block_k]`` score tile per head: linear in the sequence length.

Conventions are flash_attn's (``flash_attn_func`` / ``flash_attn_varlen_func``), so that this file
reads next to theirs:

* **bottom-right alignment.** With ``s`` queries and ``t`` keys, query ``i`` sits at absolute
  position ``i + t - s`` (the queries are the LAST ``s`` tokens, as when decoding with a KV cache).
* **causal**: key ``j`` is visible iff ``j <= i + t - s``. Key blocks entirely in the future of a
  query block are never visited.
* **window_size = (left, right)**: key ``j`` is visible iff
  ``i + t - s - left <= j <= i + t - s + right``; ``-1`` means unbounded on that side, and
  ``causal=True`` is the same as ``right = 0``. A Mistral/Qwen2 ``sliding_window = w`` (``w`` keys
  including the query itself) is ``window_size = (w - 1, 0)``. Blocks outside the band are skipped.
* **alibi_slopes** (``[n_heads]`` or ``[b, n_heads]``): flash_attn documents the bias
  ``-slope·|i + t - s - j|`` added to the SCALED score, and that is what is computed here, per block,
  from the slopes (no ``[s, t]`` bias tensor). flash_attn's CUDA kernel, when ``causal=True``, adds
  ``+slope·j`` instead: on visible keys (``j <= i + t - s``) the two differ by ``slope·(i + t - s)``,
  a constant per row, so the OUTPUT is identical but its returned ``lse`` is shifted by that
  constant. Ours is always the log-sum-exp of the documented scores. MPT's causal row form
  ``slope·(j - (t - 1))`` is the same up to a per-row constant too, so it gives the same output.
* **GQA/MQA**: ``n_heads`` query heads share ``n_kv_heads`` key/value heads; query head ``h`` reads
  kv head ``h // (n_heads // n_kv_heads)``. Done by viewing q as ``[b, n_kv, group, s, d]``, never by
  repeating k and v.
* **rows with no visible key** (a window or causal mask that hides all keys of a query, or an
  empty sequence): output 0, ``lse = -inf`` (the log of an empty sum). flash_attn also outputs 0
  but stores ``lse = +inf`` so that its backward's ``exp(score - lse)`` is 0.
* **varlen**: sequences are packed along the token axis, ``[total, n_heads, d]``, with
  ``cu_seqlens`` the cumulative lengths ``[0, len_0, len_0 + len_1, ...]``; each sequence is its own
  bottom-right-aligned attention problem.

Layout of the dense function is this project's ``[b, heads, seq, head_dim]`` (as in
``minivl.attention.scaled_dot_product_attention``); flash_attn's own dense layout is
``[b, seq, heads, head_dim]`` (transpose axes 1 and 2). The varlen layout is flash_attn's.
Arithmetic is in ``promote(q.dtype, float32)``; the output has q's dtype, ``lse`` the compute dtype.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ShapeError


def flash_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
                    softmax_scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                    alibi_slopes: np.ndarray | None = None, block_q: int = 64,
                    block_k: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Tiled attention with online softmax (FlashAttention-2 forward), flash_attn semantics.

    q [b, n_heads, s, d], k [b, n_kv_heads, t, d], v [b, n_kv_heads, t, d_v]
    -> out [b, n_heads, s, d_v], lse [b, n_heads, s]

    ``softmax_scale`` defaults to ``1/sqrt(d)``; ``block_q``/``block_k`` are the tile sizes (any
    positive integers; they need not divide ``s`` or ``t``: the last tile is simply shorter).
    """
    _check_dense(q, k, v, block_q, block_k)
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    group = n_heads // n_kv_heads
    compute_dtype = np.promote_types(q.dtype, np.float32)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    left, right = _window(window_size, causal)
    slopes = _alibi_view(alibi_slopes, batch, n_heads, n_kv_heads, compute_dtype)
    # query i sits at absolute position i + offset (bottom-right alignment)
    offset = kv_len - q_len

    # GQA as a view: query head h = kv_head·group + g reads kv head kv_head
    q_grouped = q.reshape(batch, n_kv_heads, group, q_len, head_dim).astype(compute_dtype, copy=False)
    k_grouped = k.astype(compute_dtype, copy=False)[:, :, None]  # [b, n_kv, 1, t, d]
    v_grouped = v.astype(compute_dtype, copy=False)[:, :, None]  # [b, n_kv, 1, t, d_v]
    out = np.zeros((batch, n_kv_heads, group, q_len, v_dim), dtype=compute_dtype)
    lse = np.full((batch, n_kv_heads, group, q_len), -np.inf, dtype=compute_dtype)

    for q_start in range(0, q_len, block_q):
        q_end = min(q_start + block_q, q_len)
        q_block = q_grouped[..., q_start:q_end, :]  # [b, n_kv, group, Bq, d]
        positions = np.arange(q_start, q_end) + offset  # absolute position of each query row
        row_max = np.full(q_block.shape[:-1], -np.inf, dtype=compute_dtype)  # m
        row_sum = np.zeros(q_block.shape[:-1], dtype=compute_dtype)  # l
        acc = np.zeros(q_block.shape[:-1] + (v_dim,), dtype=compute_dtype)  # Σ exp(s - m)·v

        for k_start, k_end in _visible_key_blocks(q_start + offset, q_end - 1 + offset, kv_len,
                                                  left, right, block_k):
            keys = np.arange(k_start, k_end)
            # S = (q·kᵀ)·scale for this tile only: [b, n_kv, group, Bq, Bk]
            scores = (q_block @ np.swapaxes(k_grouped[..., k_start:k_end, :], -1, -2)) * scale
            distance = positions[:, None] - keys[None, :]  # i + t - s - j, [Bq, Bk]
            if slopes is not None:
                # ALiBi: S_ij -= slope·|i + t - s - j|, built per tile from the slopes
                scores = scores - slopes * np.abs(distance).astype(compute_dtype)
            if not _tile_fully_visible(distance, left, right):
                # visible iff -right <= (i + t - s - j) <= left
                visible = (distance <= left) & (distance >= -right)
                scores = np.where(visible, scores, -np.inf)

            # online softmax: m_new = max(m, max_j S_ij)
            new_max = np.maximum(row_max, scores.max(axis=-1))
            # a row that has seen no visible key yet keeps m = -inf; shift it by 0 to avoid inf - inf
            shift = np.where(np.isneginf(new_max), 0.0, new_max)
            # P_ij = exp(S_ij - m_new); alpha = exp(m - m_new) rescales what was summed against m
            probs = np.exp(scores - shift[..., None])
            alpha = np.exp(row_max - shift)
            # l = alpha·l + Σ_j P_ij ;  acc = alpha·acc + P·v
            row_sum = alpha * row_sum + probs.sum(axis=-1)
            acc = alpha[..., None] * acc + probs @ v_grouped[..., k_start:k_end, :]
            row_max = new_max

        # one final division: out = acc / l  (rows that saw no visible key stay 0)
        seen = row_sum > 0
        out[..., q_start:q_end, :] = acc / np.where(seen, row_sum, 1.0)[..., None]
        # lse = m + log(l); -inf for rows with no visible key
        with np.errstate(divide="ignore"):
            lse[..., q_start:q_end] = np.where(seen, row_max + np.log(row_sum), -np.inf)

    out = out.reshape(batch, n_heads, q_len, v_dim).astype(q.dtype, copy=False)
    return out, lse.reshape(batch, n_heads, q_len)


def flash_attention_varlen(q: np.ndarray, k: np.ndarray, v: np.ndarray, cu_seqlens_q: np.ndarray,
                           cu_seqlens_k: np.ndarray, max_seqlen_q: int, max_seqlen_k: int, *,
                           causal: bool = False, softmax_scale: float | None = None,
                           window_size: tuple[int, int] = (-1, -1),
                           alibi_slopes: np.ndarray | None = None, block_q: int = 64,
                           block_k: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Attention over sequences packed along the token axis, as flash_attn_varlen_func.

    q [total_q, n_heads, d], k [total_k, n_kv_heads, d], v [total_k, n_kv_heads, d_v],
    cu_seqlens_q / cu_seqlens_k [n_seqs + 1] -> out [total_q, n_heads, d_v], lse [n_heads, total_q]

    Sequence ``i`` is ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` against
    ``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]``; tokens of different sequences never see each other.
    Lengths may be 0. ``max_seqlen_q/k`` must bound the lengths (flash_attn sizes its grid with them).
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    n_seqs = len(cu_seqlens_q) - 1
    n_heads = q.shape[1]
    compute_dtype = np.promote_types(q.dtype, np.float32)
    if alibi_slopes is not None:
        alibi_slopes = np.asarray(alibi_slopes)
        if alibi_slopes.shape not in ((n_heads,), (n_seqs, n_heads)):
            raise ShapeError(f"alibi_slopes must have shape ({n_heads},) or ({n_seqs}, {n_heads}) "
                             f"(one slope per head, optionally per sequence); got {alibi_slopes.shape}")
        alibi_slopes = np.broadcast_to(alibi_slopes, (n_seqs, n_heads))
    out = np.zeros((q.shape[0], n_heads, v.shape[2]), dtype=q.dtype)
    lse = np.full((n_heads, q.shape[0]), -np.inf, dtype=compute_dtype)
    # the loop over sequences is the outer level only: each one is a dense problem with batch 1
    for seq in range(n_seqs):
        q_lo, q_hi = int(cu_seqlens_q[seq]), int(cu_seqlens_q[seq + 1])
        k_lo, k_hi = int(cu_seqlens_k[seq]), int(cu_seqlens_k[seq + 1])
        if q_hi == q_lo:
            continue
        # [len, heads, d] -> [1, heads, len, d]
        seq_out, seq_lse = flash_attention(
            q[q_lo:q_hi].transpose(1, 0, 2)[None], k[k_lo:k_hi].transpose(1, 0, 2)[None],
            v[k_lo:k_hi].transpose(1, 0, 2)[None], causal=causal, softmax_scale=softmax_scale,
            window_size=window_size, block_q=block_q, block_k=block_k,
            alibi_slopes=None if alibi_slopes is None else alibi_slopes[seq])
        out[q_lo:q_hi] = seq_out[0].transpose(1, 0, 2)
        lse[:, q_lo:q_hi] = seq_lse[0]
    return out, lse


def _visible_key_blocks(first_position: int, last_position: int, kv_len: int, left: float,
                        right: float, block_k: int):
    """(start, end) of every key tile that some query at positions [first, last] can see.

    Tiles lie on the fixed grid 0, block_k, 2·block_k, ...; tiles wholly before the window of the
    first query or wholly after (right of) the last query's reach are skipped: that is the
    causal/window saving, half the tiles for causal self-attention.
    """
    lowest_key = max(0, first_position - left)  # window's left edge of the first query
    highest_key = min(kv_len - 1, last_position + right)  # causal/right edge of the last query
    if highest_key < lowest_key:
        return []
    first_tile = int(lowest_key) // block_k * block_k
    return [(start, min(start + block_k, kv_len))
            for start in range(first_tile, int(highest_key) + 1, block_k)]


def _tile_fully_visible(distance, left: float, right: float) -> bool:
    """True if every (query, key) pair of the tile is inside the window: no mask needed there.

    distance [Bq, Bk] = i + t - s - j (a NumPy array or a torch tensor: torch_impl shares this).
    """
    return bool(distance.max() <= left and distance.min() >= -right)


def _window(window_size, causal: bool) -> tuple[float, float]:
    """flash_attn (left, right) with -1 -> inf; causal clips right to 0."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(not isinstance(w, (int, np.integer)) or w < -1 for w in window_size)):
        raise ShapeError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = unbounded), "
                         f"as flash_attn; got {window_size!r}")
    left, right = (math.inf if w == -1 else int(w) for w in window_size)
    if causal:
        right = min(right, 0)
    return left, right


def _alibi_view(alibi_slopes, batch: int, n_heads: int, n_kv_heads: int, dtype):
    """Slopes [n_heads] or [b, n_heads] as [b|1, n_kv, group, 1, 1] to broadcast over a score tile."""
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes)
    if slopes.shape == (n_heads,):
        slopes = slopes[None]
    elif slopes.shape != (batch, n_heads):
        raise ShapeError(f"alibi_slopes must have shape ({n_heads},) or ({batch}, {n_heads}) "
                         f"(one slope per head, optionally per batch row); got {slopes.shape}")
    return slopes.astype(dtype).reshape(slopes.shape[0], n_kv_heads, n_heads // n_kv_heads, 1, 1)


def _check_blocks(block_q, block_k):
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ShapeError(f"{name} must be a positive int (a tile size); got {value!r}")


def _check_heads(n_heads: int, n_kv_heads: int, head_dim: int, k_dim: int, k_shape, v_shape):
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ShapeError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads} "
                         f"(GQA groups query heads over kv heads)")
    if k_dim != head_dim:
        raise ShapeError(f"q and k head_dim differ ({head_dim} vs {k_dim}); q·kᵀ needs them equal")
    if tuple(k_shape[:-1]) != tuple(v_shape[:-1]):
        raise ShapeError(f"k {tuple(k_shape)} and v {tuple(v_shape)} must agree on all but the last axis")


def _check_dense(q, k, v, block_q, block_k):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"flash_attention takes q [b, n_heads, s, d], k/v [b, n_kv_heads, t, d]; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape} (for packed sequences use "
                         f"flash_attention_varlen)")
    if k.shape[0] != q.shape[0]:
        raise ShapeError(f"q batch {q.shape[0]} != k batch {k.shape[0]}")
    _check_heads(q.shape[1], k.shape[1], q.shape[3], k.shape[3], k.shape, v.shape)
    _check_blocks(block_q, block_k)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ShapeError(f"flash_attention_varlen takes packed q [total_q, n_heads, d], "
                         f"k/v [total_k, n_kv_heads, d]; got q {q.shape}, k {k.shape}, v {v.shape}")
    _check_heads(q.shape[1], k.shape[1], q.shape[2], k.shape[2], k.shape, v.shape)
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        cu = np.asarray(cu)
        if cu.ndim != 1 or cu.size < 2 or not np.issubdtype(cu.dtype, np.integer):
            raise ShapeError(f"{name} must be a 1-D integer array [0, len_0, len_0+len_1, ...] of "
                             f"n_seqs + 1 entries; got dtype {cu.dtype}, shape {cu.shape}")
        lengths = np.diff(cu)
        if cu[0] != 0 or cu[-1] != total or (lengths < 0).any():
            raise ShapeError(f"{name} must start at 0, never decrease and end at the packed length "
                             f"{total}; got {cu.tolist()}")
        if lengths.max() > max_len:
            raise ShapeError(f"a sequence has {int(lengths.max())} tokens but max_seqlen "
                             f"for {name} is {max_len}: pass the true maximum length")
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ShapeError(f"cu_seqlens_q and cu_seqlens_k describe different numbers of sequences "
                         f"({len(cu_seqlens_q) - 1} vs {len(cu_seqlens_k) - 1})")
