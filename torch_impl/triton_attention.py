"""FlashAttention-2 forward as a Triton kernel: the block loop of minivl/flash.py, one program per tile.

Each Triton program owns one block of ``BLOCK_M`` query rows of one (batch row, head). It loads
that q tile once, then walks over the key/value tiles of ``BLOCK_N`` keys that the block can see,
keeping the online-softmax state in registers: running max ``m``, running sum ``l`` and the
unnormalised accumulator ``acc``; a new max rescales ``l`` and ``acc`` by ``exp(m_old - m_new)``;
one division ``acc / l`` at the end. Read it next to ``minivl.flash.flash_attention``: the loop
body is line for line the same, only "a tile" is now what one program holds.

Features and conventions (flash_attn's, as in minivl/flash.py):

* bottom-right alignment: query ``i`` sits at position ``i + t - s``;
* ``causal`` and ``window_size=(left, right)`` with ``-1`` = unbounded; key tiles wholly outside
  the band are never loaded (the loop bounds skip them);
* GQA/MQA: program for query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``, no repeat;
* ``alibi_slopes`` ``[n_heads]`` or ``[b, n_heads]`` fp32: ``-slope·|i + t - s - j|`` added to the
  scaled score, computed in the kernel from the slopes;
* additive ``bias`` and ``mask`` (broadcastable to ``[b, n_heads, s, t]``, as
  ``torch_impl.attention.scaled_dot_product_attention`` takes them): loaded tile by tile through
  stride-0 broadcast views, never expanded in memory. This is how the models' masks get in
  (causal with a past offset, left-padding key masks, MPT's ALiBi bias); with an additive mask
  every key tile is visited (the kernel cannot know which tiles the mask empties), so pass
  ``causal=True`` as well when the mask is causal to get the tile skipping back;
* varlen: ``triton_attention_varlen`` takes flash_attn's packed ``[total, heads, d]`` layout and
  ``cu_seqlens``; one program per (sequence, head, query tile), the grid sized by ``max_seqlen_q``.

Arithmetic: scores, softmax state and accumulator in float32 (fp16/bf16 inputs: ``P`` is cast to
v's dtype before ``P·v``, as FlashAttention does); fp32 ``tl.dot`` uses IEEE precision, not TF32.
float64 inputs are refused (use the eager/sdpa backends for a float64 run). Rows with no visible
key give output 0 and ``lse = -inf``.

Where it runs: CUDA tensors, compiled. CPU tensors only under Triton's interpreter, which executes
the same kernel source with NumPy (slow: for tests and reading). The interpreter is chosen when
``@triton.jit`` runs, i.e. ``TRITON_INTERPRET=1`` must be in the environment before triton is first
imported in the process (triton.language's own helpers such as ``tl.zeros`` are jit functions
too, so the choice cannot be made later per call); otherwise CPU tensors get a DeviceError.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from minivl.errors import ConfigError, DeviceError, ShapeError
from minivl.flash import _window


@triton.jit
def _flash_forward_kernel(
        Q, K, V, Out, Lse, Bias, Mask, Slopes, CuSeqlensQ, CuSeqlensK,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_lb, stride_lh, stride_ls,
        stride_bb, stride_bh, stride_bs, stride_bt,
        stride_mb, stride_mh, stride_ms, stride_mt,
        stride_slope_b, stride_slope_h,
        n_heads, group, q_len, kv_len, head_dim, v_dim, scale, window_left, window_right,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
        VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: query tile ``pid_m`` of head ``h`` of batch row (or packed sequence) ``b``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // group  # GQA: query head h reads kv head h // group

    if VARLEN:
        # packed tokens: sequence b occupies rows cu[b] .. cu[b+1] of the token axis
        q_first = tl.load(CuSeqlensQ + b)
        k_first = tl.load(CuSeqlensK + b)
        seqlen_q = tl.load(CuSeqlensQ + b + 1) - q_first
        seqlen_k = tl.load(CuSeqlensK + b + 1) - k_first
        q_base = Q + q_first * stride_qs + h * stride_qh
        k_base = K + k_first * stride_ks + kv_h * stride_kh
        v_base = V + k_first * stride_vs + kv_h * stride_vh
        o_base = Out + q_first * stride_os + h * stride_oh
        l_base = Lse + q_first * stride_ls + h * stride_lh
    else:
        seqlen_q = q_len
        seqlen_k = kv_len
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + kv_h * stride_kh
        v_base = V + b * stride_vb + kv_h * stride_vh
        o_base = Out + b * stride_ob + h * stride_oh
        l_base = Lse + b * stride_lb + h * stride_lh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this tile
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_valid = offs_m < seqlen_q
    # query i sits at absolute position i + t - s (bottom-right alignment)
    positions = offs_m + (seqlen_k - seqlen_q)

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * stride_slope_b + h * stride_slope_h).to(tl.float32)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # m
    row_sum = tl.zeros([BLOCK_M], tl.float32)  # l
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # Σ exp(s - m)·v

    # key tiles some row of this block can see: [first_pos - left, last_pos + right], on the tile grid
    lowest_key = tl.maximum(pid_m * BLOCK_M + seqlen_k - seqlen_q - window_left, 0)
    highest_key = tl.minimum((pid_m + 1) * BLOCK_M - 1 + seqlen_k - seqlen_q + window_right, seqlen_k - 1)
    for k_start in range(lowest_key // BLOCK_N * BLOCK_N, highest_key + 1, BLOCK_N):
        offs_n = k_start + tl.arange(0, BLOCK_N)
        col_valid = offs_n < seqlen_k
        k_tile = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=col_valid[None, :] & (offs_d[:, None] < head_dim), other=0.0)  # kᵀ [D, N]
        # S = (q·kᵀ)·scale for this tile: [BLOCK_M, BLOCK_N]
        scores = tl.dot(q, k_tile, input_precision=DOT_PRECISION) * scale
        distance = positions[:, None] - offs_n[None, :]  # i + t - s - j
        if HAS_ALIBI:
            # ALiBi: S_ij -= slope·|i + t - s - j|
            scores -= slope * tl.abs(distance).to(tl.float32)
        tile_valid = row_valid[:, None] & col_valid[None, :]
        if HAS_BIAS:
            scores += tl.load(Bias + b * stride_bb + h * stride_bh + offs_m[:, None] * stride_bs
                              + offs_n[None, :] * stride_bt, mask=tile_valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            scores += tl.load(Mask + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_ms
                              + offs_n[None, :] * stride_mt, mask=tile_valid, other=0.0).to(tl.float32)
        # visible iff the key exists and -right <= (i + t - s - j) <= left
        visible = col_valid[None, :] & (distance <= window_left) & (distance >= -window_right)
        scores = tl.where(visible, scores, float("-inf"))

        # online softmax: m_new = max(m, max_j S_ij)
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # rows with no visible key so far keep m = -inf: shift them by 0 to avoid inf - inf
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        # P = exp(S - m_new); alpha = exp(m - m_new) rescales what was summed against m
        probs = tl.exp(scores - shift[:, None])
        alpha = tl.exp(row_max - shift)
        v_tile = tl.load(v_base + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                         mask=col_valid[:, None] & (offs_dv[None, :] < v_dim), other=0.0)
        # l = alpha·l + Σ_j P_ij ;  acc = alpha·acc + P·v
        row_sum = row_sum * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        row_max = new_max

    # one final division: out = acc / l (rows with no visible key stay 0); lse = m + log(l)
    seen = row_sum > 0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("-inf"))
    tl.store(o_base + offs_m[:, None] * stride_os + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_valid[:, None] & (offs_dv[None, :] < v_dim))
    tl.store(l_base + offs_m * stride_ls, lse, mask=row_valid)


# True when TRITON_INTERPRET=1 was set before triton was imported: @triton.jit then interprets
INTERPRETED = isinstance(_flash_forward_kernel, InterpretedFunction)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     scale: float | None = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1),
                     alibi_slopes: torch.Tensor | None = None, return_lse: bool = False,
                     block_m: int = 64, block_n: int = 64, **ignored):
    """FlashAttention-2 forward in Triton; drop-in for torch_impl.attention's eager attention.

    q [b, n_heads, s, d], k [b, n_kv_heads, t, d], v [b, n_kv_heads, t, d_v],
    mask/bias additive, broadcastable to [b, n_heads, s, t] -> out [b, n_heads, s, d_v]
    (and lse [b, n_heads, s] float32 if ``return_lse``).

    ``scale`` defaults to ``1/sqrt(d)`` and multiplies q·kᵀ in float32 (the eager path's
    ``scale_mode`` only changes where that product is rounded). Keyword arguments of the eager
    signature that do not change the result here (``scale_mode``, ``softmax_dtype``) are
    accepted and ignored; ``return_probs=True`` is refused: the kernel never forms probabilities.
    """
    if ignored.get("return_probs"):
        raise ConfigError("attn_implementation='triton' cannot return attention probabilities "
                          "(it never forms them); use attn_implementation='eager' for output_attentions")
    _check_inputs(q, k, v, 4)
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    out = q.new_empty((batch, n_heads, q_len, v_dim))
    lse = q.new_empty((batch, n_heads, q_len), dtype=torch.float32)
    extras = [_broadcast_view(t, (batch, n_heads, q_len, kv_len), name)
              for t, name in ((bias, "bias"), (mask, "mask"))]
    slopes = _slopes(alibi_slopes, batch, n_heads, q.device)
    _launch(q, k, v, out, lse, extras, slopes, None, None,
            q.stride(), k.stride(), v.stride(), out.stride(), lse.stride(),
            batch, n_heads, n_heads // n_kv_heads, q_len, kv_len, head_dim, v_dim,
            scale, causal, window_size, block_m, block_n)
    return (out, lse) if return_lse else out


def triton_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, *, scale: float | None = None,
                            causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                            alibi_slopes: torch.Tensor | None = None, block_m: int = 64,
                            block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length sequences, as flash_attn_varlen_func (no additive mask: use cu_seqlens).

    q [total_q, n_heads, d], k [total_k, n_kv_heads, d], v [total_k, n_kv_heads, d_v],
    cu_seqlens_q / cu_seqlens_k [n_seqs + 1] int32 -> out [total_q, n_heads, d_v], lse [n_heads, total_q]
    """
    from minivl.flash import _check_varlen
    _check_inputs(q, k, v, 3)
    _check_varlen(q, k, v, cu_seqlens_q.cpu().numpy(), cu_seqlens_k.cpu().numpy(),
                  max_seqlen_q, max_seqlen_k)
    n_seqs = cu_seqlens_q.numel() - 1
    n_heads, head_dim, v_dim = q.shape[1], q.shape[2], v.shape[2]
    out = q.new_zeros((q.shape[0], n_heads, v_dim))
    lse = q.new_full((n_heads, q.shape[0]), -math.inf, dtype=torch.float32)
    slopes = _slopes(alibi_slopes, n_seqs, n_heads, q.device)
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    # packed [total, heads, d]: no batch stride, the sequence start comes from cu_seqlens
    q_strides = (0, q.stride(1), q.stride(0), q.stride(2))
    k_strides = (0, k.stride(1), k.stride(0), k.stride(2))
    v_strides = (0, v.stride(1), v.stride(0), v.stride(2))
    o_strides = (0, out.stride(1), out.stride(0), out.stride(2))
    l_strides = (0, lse.stride(0), lse.stride(1))
    _launch(q, k, v, out, lse, [None, None], slopes, cu_q, cu_k,
            q_strides, k_strides, v_strides, o_strides, l_strides,
            n_seqs, n_heads, n_heads // k.shape[1], int(max_seqlen_q), int(max_seqlen_k), head_dim,
            v_dim, scale, causal, window_size, block_m, block_n)
    return out, lse


def _launch(q, k, v, out, lse, extras, slopes, cu_q, cu_k, q_strides, k_strides, v_strides,
            o_strides, l_strides, batch, n_heads, group, q_len, kv_len, head_dim, v_dim, scale,
            causal, window_size, block_m, block_n):
    """Grid (query tiles, batch·heads); unbounded window sides become a reach no distance exceeds."""
    left, right = _window(window_size, causal)
    unbounded = q_len + kv_len + 1  # |i + t - s - j| < s + t always
    left = unbounded if left == math.inf else int(left)
    right = unbounded if right == math.inf else int(right)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ShapeError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile); got {value!r}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    (bias, bias_strides), (mask, mask_strides) = extras[0] or (None, (0,) * 4), extras[1] or (None, (0,) * 4)
    slopes_tensor, slope_strides = slopes or (None, (0, 0))
    _check_device(q)
    kernel = _flash_forward_kernel
    # placeholders for absent optional pointers (never read: the constexpr flags are off)
    grid = (triton.cdiv(max(q_len, 1), block_m), batch * n_heads)
    kernel[grid](
        q, k, v, out, lse, bias if bias is not None else q, mask if mask is not None else q,
        slopes_tensor if slopes_tensor is not None else lse,
        cu_q if cu_q is not None else lse, cu_k if cu_k is not None else lse,
        *q_strides, *k_strides, *v_strides, *o_strides, *l_strides, *bias_strides, *mask_strides,
        *slope_strides, n_heads, group, q_len, kv_len, head_dim, v_dim, scale, left, right,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HAS_ALIBI=slopes_tensor is not None,
        VARLEN=cu_q is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(v_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _check_inputs(q, k, v, ndim):
    from minivl.flash import _check_heads
    if q.ndim != ndim or k.ndim != ndim or v.ndim != ndim:
        layout = ("q [b, n_heads, s, d], k/v [b, n_kv_heads, t, d]" if ndim == 4
                  else "packed q [total_q, n_heads, d], k/v [total_k, n_kv_heads, d]")
        raise ShapeError(f"triton attention takes {layout}; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    n_heads_axis = 1
    _check_heads(q.shape[n_heads_axis], k.shape[n_heads_axis], q.shape[-1], k.shape[-1],
                 tuple(k.shape), tuple(v.shape))
    if ndim == 4 and k.shape[0] != q.shape[0]:
        raise ShapeError(f"q batch {q.shape[0]} != k batch {k.shape[0]}")
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ShapeError(f"attn_implementation='triton' takes q, k, v of one dtype among float32, "
                         f"float16, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype} "
                         f"(use 'eager' or 'sdpa' for a float64 run)")
    if not (q.device == k.device == v.device):
        raise ConfigError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def _check_device(q):
    """Compiled kernels need CUDA tensors; the interpreter needs CPU tensors."""
    if INTERPRETED and q.device.type != "cpu":
        raise DeviceError(f"Triton is in interpreter mode (TRITON_INTERPRET=1): it runs CPU tensors "
                          f"only; got tensors on {q.device}. Unset TRITON_INTERPRET to compile for CUDA")
    if not INTERPRETED and not q.is_cuda:
        raise DeviceError(f"attn_implementation='triton' needs CUDA tensors (got {q.device}); on the CPU "
                          f"it runs only under Triton's interpreter: set TRITON_INTERPRET=1 before triton "
                          f"is first imported, or use attn_implementation='eager'/'sdpa'")


def _broadcast_view(tensor, full_shape, name):
    """(view, strides) of an additive tensor broadcast to [b, n_heads, s, t] with stride-0 axes, or None."""
    if tensor is None:
        return None
    try:
        view = tensor.expand(*([1] * (4 - tensor.ndim)), *tensor.shape).expand(full_shape)
    except RuntimeError:
        raise ShapeError(f"{name} of shape {tuple(tensor.shape)} does not broadcast to "
                         f"[b, n_heads, s, t] = {list(full_shape)}") from None
    return view, view.stride()


def _slopes(alibi_slopes, batch, n_heads, device):
    """(slopes fp32, (stride_b, stride_h)) for [n_heads] (batch stride 0) or [b, n_heads]; or None."""
    if alibi_slopes is None:
        return None
    slopes = torch.as_tensor(alibi_slopes, device=device, dtype=torch.float32)
    if tuple(slopes.shape) == (n_heads,):
        return slopes, (0, slopes.stride(0))
    if tuple(slopes.shape) == (batch, n_heads):
        return slopes, slopes.stride()
    raise ShapeError(f"alibi_slopes must have shape ({n_heads},) or ({batch}, {n_heads}); "
                     f"got {tuple(slopes.shape)}")
