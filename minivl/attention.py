"""Scaled dot-product attention (Vaswani et al., 2017) with GQA, additive masks and a KV cache.

One function serves every model in minivl; the reference models differ only in details that this
function exposes as arguments (pitfalls 7 and 8):

* where the 1/sqrt(d) scale is applied (`scale_mode`): divide q·kᵀ (InternLM2, Phi-3, Llama,
  Qwen2), multiply q first (InternViT), or multiply q·kᵀ afterwards (MPT) — the three round
  differently unless sqrt(d) is a power of two;
* the softmax precision (`softmax_dtype`): float32 upcast for the LLMs, model dtype for InternViT.

Grouped-query attention (Ainslie et al., 2023) never copies K/V: query head h reads KV head
h // group, so the `group` query heads that share a KV head are stacked into one block of
group·s rows and one matmul serves them all.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from minivl.errors import ConfigError, ShapeError

SCALE_MODES = ("divide", "scale_q", "multiply")


def scaled_dot_product_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, mask=None, bias=None,
                                 scale: float | None = None, scale_mode: str = "divide",
                                 softmax_dtype: str | None = "float32", return_probs: bool = False,
                                 is_causal: bool = False):
    """softmax(q·kᵀ·scale + bias + mask)·v, in the eager op order of the reference named by scale_mode.

    mask, bias: additive, broadcastable to [b, n_heads, s, t]; bias is added before mask.
    is_causal: also apply `causal_mask(s, t)` (bottom-right aligned), without the caller building it.
    scale: defaults to 1/sqrt(d) (`d ** -0.5` for "scale_q", as InternViT writes it; the two differ
    in the last bit for d = 96, 128); "divide" with an explicit scale divides by 1/scale.
    softmax_dtype: "float32" = softmax in promote(scores dtype, float32) then cast to v's dtype;
    None = softmax in the scores' own dtype.
    q [b, n_heads, s, d], k/v [b, n_kv_heads, t, d] -> [b, n_heads, s, d]
    (and probs [b, n_heads, s, t] in v's dtype if return_probs)
    """
    batch, n_heads, q_len, head_dim = check_qkv(q, k, v)
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    check_attention_options(scale_mode, softmax_dtype)
    scores_shape = (batch, n_heads, q_len, kv_len)
    for name, additive in (("mask", mask), ("bias", bias)):
        check_additive(name, additive, scores_shape)

    # GQA as a reshape: heads kv·g … kv·g+g−1 share KV head kv, so [b, h, s, d] -> [b, n_kv, g·s, d]
    q_grouped = q.reshape(batch, n_kv_heads, group * q_len, head_dim)
    k_transposed = np.swapaxes(k, -1, -2)  # [b, n_kv, d, t], a view
    # the score tensor is ours alone, so each step below updates it in place (same rounding, no copies)
    if scale_mode == "divide":
        # scores = (q·kᵀ) / sqrt(d)   (InternLM2 MIL:407, Phi-3 MP3:386, Llama, Qwen2)
        divisor = math.sqrt(head_dim) if scale is None else 1.0 / scale
        scores = q_grouped @ k_transposed
        scores /= divisor
    elif scale_mode == "scale_q":
        # scores = (q · d^-½)·kᵀ   (InternViT MIV:220: the scale multiplies q BEFORE the matmul)
        scale = head_dim ** -0.5 if scale is None else scale
        scores = (q_grouped * scale) @ k_transposed
    else:
        # scores = (q·kᵀ) · (1/sqrt(d))   (MPT MPT-A:34: multiply after the matmul)
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        scores = q_grouped @ k_transposed
        scores *= scale
    scores = scores.reshape(scores_shape)  # [b, n_heads, s, t], a view

    # bias (ALiBi) first, then the mask: MPT adds attn_bias before masking (MPT-A:35-54)
    if bias is not None:
        scores = _add(scores, bias)
    with np.errstate(over="ignore"):  # min + min = −inf on doubly masked entries: harmless
        if mask is not None:
            scores = _add(scores, mask)
        if is_causal:
            scores = _add(scores, causal_mask(q_len, kv_len, scores.dtype))

    probs = _softmax_inplace(scores, softmax_dtype).astype(v.dtype, copy=False)
    # out = p·v, again one matmul per KV head over the stacked group
    out = probs.reshape(batch, n_kv_heads, group * q_len, kv_len) @ v
    out = out.reshape(batch, n_heads, q_len, head_dim)
    return (out, probs) if return_probs else out


def softmax(scores: np.ndarray, softmax_dtype: str | None = "float32") -> np.ndarray:
    """Numerically safe softmax over the last axis, in promote(scores, softmax_dtype) or scores' dtype.

    [..., t] -> [..., t]
    """
    compute = scores.dtype if softmax_dtype is None else np.promote_types(scores.dtype, np.dtype(softmax_dtype))
    x = scores.astype(compute)
    # softmax(x) = e^(x − max x) / Σ e^(x − max x); subtracting the row max keeps e^· <= 1
    exp = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp / np.sum(exp, axis=-1, keepdims=True)


def _softmax_inplace(scores: np.ndarray, softmax_dtype: str | None) -> np.ndarray:
    """`softmax`, op for op and bit for bit, reusing `scores`' memory when no upcast is needed.

    The attention score tensor is the largest array of a forward; `softmax` above reads as the
    formula and makes four temporaries of its size, this makes none. Held equal bit for bit by
    tests/test_attention_fast.py.
    """
    compute = scores.dtype if softmax_dtype is None else np.promote_types(scores.dtype, np.dtype(softmax_dtype))
    x = scores.astype(compute, copy=False)
    x -= np.max(x, axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= np.sum(x, axis=-1, keepdims=True)
    return x


def _add(scores: np.ndarray, additive: np.ndarray) -> np.ndarray:
    """scores + additive, in place when the sum keeps scores' shape and dtype (it is a temporary)."""
    if np.result_type(scores, additive) == scores.dtype:
        scores += additive
        return scores
    return scores + additive


def causal_mask(q_len: int, kv_len: int, dtype, sliding_window: int | None = None) -> np.ndarray:
    """Additive causal mask, bottom-right aligned for cached decode, with an optional sliding window.

    Query i sits at absolute position p_i = kv_len − q_len + i. Key j is visible iff
    p_i − w < j <= p_i (w = sliding_window; no lower bound without one). Visible: 0, hidden:
    finfo(dtype).min (the reference's fill value, not −inf, so no row is ever all −inf).
    () -> [q_len, kv_len]
    """
    _check_lengths(q_len, kv_len)
    _check_window(sliding_window)
    dtype = np.dtype(dtype)
    positions = (kv_len - q_len) + np.arange(q_len)[:, None]  # p_i, [q_len, 1]
    keys = np.arange(kv_len)[None, :]  # j, [1, kv_len]
    visible = keys <= positions
    if sliding_window is not None:
        visible &= keys > positions - sliding_window
    # both branches already in dtype: no float64 [q_len, kv_len] temporary (an 8k prefill's mask is 256 MiB)
    return np.where(visible, dtype.type(0), np.finfo(dtype).min)


def padding_mask(attention_mask: np.ndarray, dtype) -> np.ndarray:
    """Additive key-padding mask from a 0/1 mask (1 = real token, 0 = pad), as transformers expands it.

    [b, t] -> [b, 1, 1, t] (0 where attended, finfo(dtype).min at pads)
    """
    attention_mask = np.asarray(attention_mask)
    if attention_mask.ndim != 2:
        raise ShapeError(f"padding_mask: attention_mask must be 2-D [batch, kv_len] of 0/1, got shape "
                         f"{attention_mask.shape}; pass the tokenizer's attention_mask")
    if not np.isin(attention_mask, (0, 1)).all():
        raise ShapeError("padding_mask: attention_mask must hold only 0 (pad) and 1 (token), got values "
                         f"{np.unique(attention_mask)[:8].tolist()}; an additive mask is already expanded")
    dtype = np.dtype(dtype)
    # (1 − m) · finfo.min, written as a select so 0·min never becomes −0 and 1·min stays exact
    return np.where(attention_mask.astype(bool), 0.0, np.finfo(dtype).min).astype(dtype)[:, None, None, :]


def build_attention_mask(attention_mask: np.ndarray | None, q_len: int, past_len: int, dtype,
                         sliding_window: int | None = None) -> np.ndarray:
    """Causal + padding mask as the reference adds them (MIL:844-865): the decoder's 4-D mask.

    attention_mask [b, past_len + q_len] (or None) -> [b, 1, q_len, past_len + q_len] ([1, 1, ...] if None)
    """
    if isinstance(past_len, bool) or not isinstance(past_len, numbers.Integral) or past_len < 0:
        raise ShapeError(f"build_attention_mask: past_len must be an int >= 0 (the cache length), got {past_len!r}")
    kv_len = past_len + q_len
    causal = causal_mask(q_len, kv_len, dtype, sliding_window)[None, None]
    if attention_mask is None:
        return causal
    attention_mask = np.asarray(attention_mask)
    if attention_mask.ndim != 2 or attention_mask.shape[1] != kv_len:
        raise ShapeError(f"build_attention_mask: attention_mask must be [batch, past_len + q_len] = "
                         f"[b, {kv_len}], got {attention_mask.shape}; it covers the cached tokens too")
    # summed, not masked_fill: a doubly masked entry overflows to −inf, as in the reference
    with np.errstate(over="ignore"):
        return causal + padding_mask(attention_mask, dtype)


class KVCache:
    """Per-layer key/value cache: post-RoPE, pre-GQA-expansion tensors grown along the sequence axis.

    Layout [b, n_kv_heads, t, d] per layer, like InternLM2's legacy tuples and HF DynamicCache.
    Each layer's keys and values live in one preallocated buffer whose capacity doubles when it is
    full, so a decode step writes its new column in place instead of concatenating (copying) the
    whole cache; `key_cache[i]` / `value_cache[i]` are views of the filled part.
    """

    def __init__(self):
        self.key_cache: list[np.ndarray] = []
        self.value_cache: list[np.ndarray] = []
        self._buffers: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, layer_idx: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append this step's k, v for one layer and return everything cached for it.

        [b, n_kv, s, d], [b, n_kv, s, d] -> ([b, n_kv, past + s, d], [b, n_kv, past + s, d])
        """
        _check_cache_entry(self, layer_idx, k, v)
        past = self.get_seq_length(layer_idx)
        length = past + k.shape[2]
        if layer_idx == len(self._buffers) or length > self._buffers[layer_idx][0].shape[2]:
            # capacity: at least double, so t tokens cost O(t) copies in all, not O(t²)
            capacity = max(length, 2 * past, 16)
            grown = tuple(np.empty(x.shape[:2] + (capacity,) + x.shape[3:], dtype=x.dtype) for x in (k, v))
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


# ----------------------------------------------------------------------------- input checks
# Written on duck-typed arrays (shape, ndim, dtype) so torch_impl reuses them unchanged.

def check_qkv(q, k, v) -> tuple[int, int, int, int]:
    """ShapeError unless q [b, h, s, d], k/v [b, n_kv, t, d] with h % n_kv == 0 and one dtype; returns (b, h, s, d)."""
    for name, x, layout in (("q", q, "[b, n_heads, s, d]"), ("k", k, "[b, n_kv_heads, t, d]"),
                            ("v", v, "[b, n_kv_heads, t, d]")):
        if x.ndim != 4:
            raise ShapeError(f"attention: {name} must be 4-D {layout}, got shape {tuple(x.shape)}; "
                             f"split heads with reshape(b, s, n, d) and move the head axis to 1")
    if tuple(k.shape) != tuple(v.shape):
        raise ShapeError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape "
                         f"[b, n_kv_heads, t, d]")
    batch, n_heads, _, head_dim = q.shape
    if k.shape[0] != batch:
        raise ShapeError(f"attention: q has batch {batch} but k/v have batch {k.shape[0]} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)}); a cache from another batch?")
    if k.shape[3] != head_dim:
        raise ShapeError(f"attention: head_dim differs: q {tuple(q.shape)} has d={head_dim}, k/v "
                         f"{tuple(k.shape)} have d={k.shape[3]}; check hidden_size / num_attention_heads")
    if k.shape[1] < 1 or n_heads % k.shape[1]:
        raise ShapeError(f"attention: n_heads={n_heads} (q {tuple(q.shape)}) is not a multiple of "
                         f"n_kv_heads={k.shape[1]} (k {tuple(k.shape)}); GQA needs num_attention_heads "
                         f"% num_key_value_heads == 0")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                         f"cast them to the model dtype")
    return batch, n_heads, q.shape[2], head_dim


def check_attention_options(scale_mode, softmax_dtype) -> None:
    """ConfigError for an unknown scale_mode or softmax_dtype."""
    if scale_mode not in SCALE_MODES:
        raise ConfigError(f"attention: scale_mode must be one of {SCALE_MODES} (divide: InternLM2/Phi-3/"
                          f"Llama/Qwen2, scale_q: InternViT, multiply: MPT), got {scale_mode!r}")
    if softmax_dtype is not None and str(softmax_dtype).replace("torch.", "") not in ("float32", "float64"):
        raise ConfigError(f"attention: softmax_dtype must be 'float32' (LLMs), 'float64' or None "
                          f"(model dtype, InternViT), got {softmax_dtype!r}")


def check_additive(name, additive, scores_shape) -> None:
    """ShapeError unless an additive mask/bias broadcasts to the scores' [b, n_heads, s, t] without growing it."""
    if additive is None:
        return
    shape = tuple(additive.shape)
    ok = len(shape) <= 4 and all(m in (1, n) for m, n in zip(shape[::-1], scores_shape[::-1]))
    if not ok:
        raise ShapeError(f"attention: {name} of shape {shape} does not broadcast to the scores "
                         f"[b, n_heads, s, t] = {scores_shape}; build it for t = past + current keys "
                         f"(slice an ALiBi bias to its last t columns)")


def _check_lengths(q_len, kv_len) -> None:
    for name, n in (("q_len", q_len), ("kv_len", kv_len)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ShapeError(f"causal_mask: {name} must be an int >= 0, got {n!r}")
    if kv_len < q_len:
        raise ShapeError(f"causal_mask: kv_len={kv_len} < q_len={q_len}; kv_len counts the cached past "
                         f"plus the current queries, so it is at least q_len")


def _check_window(sliding_window) -> None:
    if sliding_window is None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral) or sliding_window < 1:
        raise ConfigError(f"sliding_window must be None or an int >= 1 (the config's sliding_window), "
                          f"got {sliding_window!r}")


def _check_cache_entry(cache, layer_idx, k, v) -> None:
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, numbers.Integral) or not 0 <= layer_idx <= len(cache):
        raise ShapeError(f"KVCache.update: layer_idx {layer_idx!r} out of order: {len(cache)} layers are "
                         f"cached, so layer_idx must be in 0..{len(cache)} (fill layers in order)")
    if k.ndim != 4 or tuple(k.shape) != tuple(v.shape):
        raise ShapeError(f"KVCache.update: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"[b, n_kv_heads, s, d]")
    if layer_idx < len(cache):
        cached = cache.key_cache[layer_idx]
        if (cached.shape[0], cached.shape[1], cached.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]) \
                or cached.dtype != k.dtype:
            raise ShapeError(f"KVCache.update: layer {layer_idx} holds {tuple(cached.shape)} {cached.dtype}, "
                             f"cannot append {tuple(k.shape)} {k.dtype}; batch, heads, head_dim and dtype "
                             f"must match (start a new cache for a new prompt)")
