"""Scaled dot-product attention (Vaswani et al., 2017) with GQA, additive masks and a KV cache.

`backend="eager"` is the NumPy twin op for op (minivl/attention.py); the other backends are the
fast paths a real deployment uses, and they round differently:

* "sdpa": torch.nn.functional.scaled_dot_product_attention. GQA via `enable_gqa=True` (no repeat
  in our code); mask + bias are passed as one additive float mask in q's dtype. Its own scale
  order applies (the math kernel multiplies q and k by √scale each), so `scale_mode` is ignored.
* "flash": the FlashAttention-2 kernel (flash_attn's `flash_attn_func` if installed, else torch's
  FLASH_ATTENTION sdpa backend). CUDA and fp16/bf16 only; no additive mask or bias, only
  `is_causal` (bottom-right aligned, like flash_attn >= 2.1).
* "triton": `torch_impl.triton_attention.triton_attention` (the project's FlashAttention-2 kernel,
  additive mask/bias allowed, `causal` bottom-right aligned), imported lazily.
"""
from __future__ import annotations

import math
import numbers

import torch

from minivl.attention import (_check_cache_entry, _check_lengths, _check_window, check_additive,
                              check_attention_options, check_qkv)
from minivl.errors import ConfigError, DeviceError, ShapeError

BACKENDS = ("eager", "sdpa", "flash", "triton")


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask=None, bias=None,
                                 scale: float | None = None, scale_mode: str = "divide",
                                 softmax_dtype: str | torch.dtype | None = "float32", return_probs: bool = False,
                                 is_causal: bool = False, backend: str = "eager"):
    """softmax(q·kᵀ·scale + bias + mask)·v, in the eager op order of the reference named by scale_mode.

    mask, bias: additive, broadcastable to [b, n_heads, s, t]; bias is added before mask.
    is_causal: also apply `causal_mask(s, t)` (bottom-right aligned), without the caller building it.
    scale: defaults to 1/sqrt(d) (`d ** -0.5` for "scale_q", as InternViT writes it; the two differ
    in the last bit for d = 96, 128); "divide" with an explicit scale divides by 1/scale.
    softmax_dtype: "float32" = softmax in promote(scores dtype, float32) then cast to v's dtype;
    None = softmax in the scores' own dtype.
    backend: "eager" | "sdpa" | "flash" | "triton" (see the module docstring).
    q [b, n_heads, s, d], k/v [b, n_kv_heads, t, d] -> [b, n_heads, s, d]
    (and probs [b, n_heads, s, t] in v's dtype if return_probs; eager only)
    """
    batch, n_heads, q_len, head_dim = check_qkv(q, k, v)
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    check_attention_options(scale_mode, softmax_dtype)
    scores_shape = (batch, n_heads, q_len, kv_len)
    for name, additive in (("mask", mask), ("bias", bias)):
        check_additive(name, additive, scores_shape)
    if backend not in BACKENDS:
        raise ConfigError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "eager":
        if return_probs:
            raise ConfigError(f"attention: return_probs needs backend='eager'; the {backend} kernel never "
                              f"forms the probability matrix")
        return _FAST_BACKENDS[backend](q, k, v, mask, bias, scale, is_causal)

    # GQA as a reshape: heads kv·g … kv·g+g−1 share KV head kv, so [b, h, s, d] -> [b, n_kv, g·s, d]
    q_grouped = q.reshape(batch, n_kv_heads, group * q_len, head_dim)
    k_transposed = k.transpose(-1, -2)  # [b, n_kv, d, t], a view
    if scale_mode == "divide":
        # scores = (q·kᵀ) / sqrt(d)   (InternLM2 MIL:407, Phi-3 MP3:386, Llama, Qwen2)
        divisor = math.sqrt(head_dim) if scale is None else 1.0 / scale
        scores = (q_grouped @ k_transposed) / divisor
    elif scale_mode == "scale_q":
        # scores = (q · d^-½)·kᵀ   (InternViT MIV:220: the scale multiplies q BEFORE the matmul)
        scale = head_dim ** -0.5 if scale is None else scale
        scores = (q_grouped * scale) @ k_transposed
    else:
        # scores = (q·kᵀ) · (1/sqrt(d))   (MPT MPT-A:34: multiply after the matmul)
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        scores = (q_grouped @ k_transposed) * scale
    scores = scores.reshape(scores_shape)  # [b, n_heads, s, t], a view

    # bias (ALiBi) first, then the mask: MPT adds attn_bias before masking (MPT-A:35-54)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores + mask  # min + min = −inf on doubly masked entries: harmless
    if is_causal:
        scores = scores + causal_mask(q_len, kv_len, scores.dtype, device=scores.device)

    probs = softmax(scores, softmax_dtype).to(v.dtype)
    # out = p·v, again one matmul per KV head over the stacked group
    out = probs.reshape(batch, n_kv_heads, group * q_len, kv_len) @ v
    out = out.reshape(batch, n_heads, q_len, head_dim)
    return (out, probs) if return_probs else out


def softmax(scores: torch.Tensor, softmax_dtype: str | torch.dtype | None = "float32") -> torch.Tensor:
    """Numerically safe softmax over the last axis, in promote(scores, softmax_dtype) or scores' dtype.

    [..., t] -> [..., t]
    """
    if softmax_dtype is None:
        return torch.softmax(scores, dim=-1)
    if isinstance(softmax_dtype, str):
        softmax_dtype = getattr(torch, softmax_dtype)
    # softmax(x) = e^(x − max x) / Σ e^(x − max x), computed after upcasting x (MIL:423)
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, softmax_dtype))


def causal_mask(q_len: int, kv_len: int, dtype, sliding_window: int | None = None, device=None) -> torch.Tensor:
    """Additive causal mask, bottom-right aligned for cached decode, with an optional sliding window.

    Query i sits at absolute position p_i = kv_len − q_len + i. Key j is visible iff
    p_i − w < j <= p_i (w = sliding_window; no lower bound without one). Visible: 0, hidden:
    finfo(dtype).min (the reference's fill value, not −inf, so no row is ever all −inf).
    () -> [q_len, kv_len]
    """
    _check_lengths(q_len, kv_len)
    _check_window(sliding_window)
    dtype = _torch_dtype(dtype)
    positions = (kv_len - q_len) + torch.arange(q_len, device=device)[:, None]  # p_i, [q_len, 1]
    keys = torch.arange(kv_len, device=device)[None, :]  # j, [1, kv_len]
    visible = keys <= positions
    if sliding_window is not None:
        visible &= keys > positions - sliding_window
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def padding_mask(attention_mask: torch.Tensor, dtype) -> torch.Tensor:
    """Additive key-padding mask from a 0/1 mask (1 = real token, 0 = pad), as transformers expands it.

    [b, t] -> [b, 1, 1, t] (0 where attended, finfo(dtype).min at pads)
    """
    attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.ndim != 2:
        raise ShapeError(f"padding_mask: attention_mask must be 2-D [batch, kv_len] of 0/1, got shape "
                         f"{tuple(attention_mask.shape)}; pass the tokenizer's attention_mask")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ShapeError("padding_mask: attention_mask must hold only 0 (pad) and 1 (token), got values "
                         f"{torch.unique(attention_mask)[:8].tolist()}; an additive mask is already expanded")
    dtype = _torch_dtype(dtype)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    # (1 − m) · finfo.min, written as a select so 0·min never becomes −0 and 1·min stays exact
    return torch.where(attention_mask.bool(), zero, torch.finfo(dtype).min)[:, None, None, :]


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, past_len: int, dtype,
                         sliding_window: int | None = None) -> torch.Tensor:
    """Causal + padding mask as the reference adds them (MIL:844-865): the decoder's 4-D mask.

    attention_mask [b, past_len + q_len] (or None) -> [b, 1, q_len, past_len + q_len] ([1, 1, ...] if None)
    """
    if isinstance(past_len, bool) or not isinstance(past_len, numbers.Integral) or past_len < 0:
        raise ShapeError(f"build_attention_mask: past_len must be an int >= 0 (the cache length), got {past_len!r}")
    kv_len = past_len + q_len
    device = attention_mask.device if isinstance(attention_mask, torch.Tensor) else None
    causal = causal_mask(q_len, kv_len, dtype, sliding_window, device=device)[None, None]
    if attention_mask is None:
        return causal
    attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.ndim != 2 or attention_mask.shape[1] != kv_len:
        raise ShapeError(f"build_attention_mask: attention_mask must be [batch, past_len + q_len] = "
                         f"[b, {kv_len}], got {tuple(attention_mask.shape)}; it covers the cached tokens too")
    # summed, not masked_fill: a doubly masked entry overflows to −inf, as in the reference
    return causal + padding_mask(attention_mask, dtype)


class KVCache:
    """Per-layer key/value cache: post-RoPE, pre-GQA-expansion tensors grown along the sequence axis.

    Layout [b, n_kv_heads, t, d] per layer, like InternLM2's legacy tuples and HF DynamicCache.
    Each layer's keys and values live in one preallocated buffer whose capacity doubles when it is
    full, so a decode step writes its new column in place instead of concatenating (copying) the
    whole cache; `key_cache[i]` / `value_cache[i]` are views of the filled part.
    """

    def __init__(self):
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v for one layer and return everything cached for it.

        [b, n_kv, s, d], [b, n_kv, s, d] -> ([b, n_kv, past + s, d], [b, n_kv, past + s, d])
        """
        _check_cache_entry(self, layer_idx, k, v)
        past = self.get_seq_length(layer_idx)
        length = past + k.shape[2]
        if layer_idx == len(self._buffers) or length > self._buffers[layer_idx][0].shape[2]:
            # capacity: at least double, so t tokens cost O(t) copies in all, not O(t²)
            capacity = max(length, 2 * past, 16)
            grown = tuple(x.new_empty(x.shape[:2] + (capacity,) + x.shape[3:]) for x in (k, v))
            if past:
                grown[0][:, :, :past], grown[1][:, :, :past] = self.key_cache[layer_idx], self.value_cache[layer_idx]
            if layer_idx == len(self._buffers):
                self._buffers.append(grown)
                self.key_cache.append(None)
                self.value_cache.append(None)
            else:
                self._buffers[layer_idx] = grown
        key_buffer, value_buffer = self._buffers[layer_idx]
        key_buffer[:, :, past:length], value_buffer[:, :, past:length] = k, v
        self.key_cache[layer_idx], self.value_cache[layer_idx] = key_buffer[:, :, :length], value_buffer[:, :, :length]
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions for a layer (0 before its first update)."""
        return self.key_cache[layer_idx].shape[2] if layer_idx < len(self.key_cache) else 0

    def __len__(self) -> int:
        return len(self.key_cache)


# ----------------------------------------------------------------------------- fast backends

def _sdpa(q, k, v, mask, bias, scale, is_causal):
    """torch's fused kernel; mask and bias folded into one additive mask in q's dtype."""
    q_len, kv_len = q.shape[2], k.shape[2]
    additive = _fold_additive(q, mask, bias)
    use_is_causal = False
    if is_causal and q_len > 1:
        if additive is None and q_len == kv_len:
            # torch's is_causal is top-left aligned; with s == t that is the same as bottom-right
            use_is_causal = True
        else:
            causal = causal_mask(q_len, kv_len, q.dtype, device=q.device)
            additive = causal if additive is None else _clamp_to(additive + causal, q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=additive, is_causal=use_is_causal, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1])


def _flash(q, k, v, mask, bias, scale, is_causal):
    """FlashAttention-2: flash_attn's kernel if installed, else torch's FLASH_ATTENTION sdpa backend."""
    if not q.is_cuda:
        raise DeviceError(f"attention: backend='flash' needs CUDA tensors, got q on {q.device}; use "
                          f"backend='sdpa' or 'eager' on CPU")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ShapeError(f"attention: backend='flash' needs float16 or bfloat16 inputs, got {q.dtype}; "
                         f"cast the model (dtype='bfloat16') or use backend='sdpa'/'eager' for float32")
    if mask is not None or bias is not None:
        raise ConfigError("attention: backend='flash' takes no additive mask or bias; pass is_causal=True "
                          "for a causal mask, or use backend='sdpa'/'eager' for padding masks and ALiBi")
    q_len, kv_len = q.shape[2], k.shape[2]
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    if flash_attn_func is not None:
        # flash_attn wants [b, s, heads, d]; its causal mask is bottom-right aligned; GQA is native
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              softmax_scale=scale, causal=is_causal)
        return out.transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    attn_mask, use_is_causal = None, False
    if is_causal and q_len > 1:
        if q_len == kv_len:
            use_is_causal = True
        else:
            attn_mask = causal_lower_right(q_len, kv_len)  # never materialised for the flash kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=use_is_causal, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1])


def _triton(q, k, v, mask, bias, scale, is_causal):
    """The project's Triton kernel, imported only when asked for."""
    try:
        from torch_impl.triton_attention import triton_attention
    except ImportError as error:
        raise ConfigError(f"attention: backend='triton' needs torch_impl/triton_attention.py with a "
                          f"triton_attention function and the triton package ({error}); use 'sdpa'") from error
    # the kernel's `causal` is bottom-right aligned like ours, and lets it skip future key tiles
    return triton_attention(q, k, v, mask=mask, bias=bias, scale=scale, causal=is_causal)


_FAST_BACKENDS = {"sdpa": _sdpa, "flash": _flash, "triton": _triton}


def _fold_additive(q, mask, bias):
    """mask + bias as one additive tensor in q's dtype (what sdpa accepts), hidden entries >= finfo.min."""
    if mask is None and bias is None:
        return None
    total = mask if bias is None else (bias if mask is None else bias + mask)
    return _clamp_to(total, q.dtype)


def _clamp_to(additive, dtype):
    """Round an additive mask to dtype without turning finfo(float32).min into −inf (a NaN row in sdpa)."""
    return additive.clamp(min=torch.finfo(dtype).min).to(dtype)


def _torch_dtype(dtype) -> torch.dtype:
    """torch.float32 from torch.float32, 'float32' or np.float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    import numpy as np

    return getattr(torch, np.dtype(dtype).name)
