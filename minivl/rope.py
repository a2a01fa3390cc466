"""Rotary position embeddings (RoPE, Su et al. 2021) and the context-extension variants InternVL meets.

A pair of dimensions (j, j + d/2) of every query and key is rotated by the angle p·ω_j, where p is
the token's position and ω_j = θ^(-2j/d) the pair's frequency. Then q_m·k_n depends on m − n only.

Layout: "rotate-half" (GPT-NeoX, Hugging Face, InternLM2, Phi-3): dimension j is paired with
j + d/2, NOT with j + 1 as in GPT-J / Meta's original / llama.cpp ("interleaved"). The two layouts
differ by a fixed permutation of the q/k projection rows: `interleaved_to_half` / `half_to_interleaved`.

The frequency recipes (`rope_init`) follow transformers 5.24's ROPE_INIT_FUNCTIONS, plus the two
Phi-3 remote-code recipes ('su', 'phi3_yarn') and InternLM2's stateful dynamic NTK
(`DynamicNTKRope`). The scalar half (validation, defaults, YaRN's ramp, the attention scaling) is
framework-free: minivl/rope_parameters.py, re-exported here and shared with torch_impl/rope.py; only
the array maths is written twice.

Precision: the reference builds inv_freq in float32 (`1 / θ ** (float32(arange(0, d, 2)) / d)`),
then angles float32(p)·ω_j (one rounding), then cos/sin in float32. `dtype=np.float32` (default)
follows those roundings; `dtype=np.float64` is the gold reference. Bit-exact agreement with torch is
impossible in float32: torch's vectorised pow is not correctly rounded (1 ulp off for a few
entries), and at position p an ulp of ω_j moves the angle by p·ω_j·6e-8 (8e-3 rad at p = 131072).
"""
from __future__ import annotations

import math

import numpy as np

from minivl.errors import ConfigError, GenerationError, ShapeError
# the framework-free half (validation, defaults, YaRN's ramp, the attention scaling), re-exported here
from minivl.rope_parameters import (ROPE_PARAMETER_NAMES, ROPE_TYPES, RopeParameters,  # noqa: F401
                                    rope_parameters, yarn_correction_dim, yarn_correction_range, yarn_get_mscale)


def _float_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ConfigError(f"RoPE frequencies are built in float32 (the reference) or float64 (gold), got {dtype}")
    return dtype


def rope_init(rope_type: str, head_dim: int, rope_theta: float, max_position_embeddings: int,
              seq_len: int | None = None, dtype=np.float32, **params) -> tuple[np.ndarray, float]:
    """Inverse frequencies ω and attention scaling s for one RoPE recipe (transformers' names).

    -> inv_freq [rotary_dim/2] in `dtype`, attention_scaling (Python float).
    `seq_len`: the length the frequencies are built for (dynamic: the longest sequence seen;
    longrope/su/phi3_yarn: max position + 1, long factors when > original_max_position_embeddings).
    float32 follows the reference's roundings; float64 is the gold reference.
    """
    rp = rope_parameters(rope_type, head_dim, rope_theta, max_position_embeddings, seq_len, **params)
    dtype = _float_dtype(dtype)
    d = rp.rotary_dim
    # exponent 2j/d for j = 0 … d/2−1, in the working dtype like the reference's float32(arange)/d
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(dtype) / dtype.type(d)
    # b^(2j/d): the wavelength of pair j divided by 2π
    pos_freqs = dtype.type(rp.rope_theta) ** exponent
    one = dtype.type(1.0)

    if rp.rope_type in ("default", "dynamic"):
        inv_freq = one / pos_freqs
    elif rp.rope_type == "linear":
        # position interpolation: ω_j / f (InternLM2 divides positions instead: same up to rounding)
        inv_freq = (one / pos_freqs) / dtype.type(rp.factor)
    elif rp.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(pos_freqs, rp, dtype)
    elif rp.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(one / pos_freqs, rp, dtype)
    else:  # longrope, su, phi3_yarn: ω_j = 1 / (λ_j · b^(2j/d))
        inv_freq = one / (np.asarray(rp.ext_factors, dtype=dtype) * pos_freqs)
    return inv_freq.astype(dtype, copy=False), rp.attention_scaling


def _yarn_inv_freq(pos_freqs: np.ndarray, rp: RopeParameters, dtype: np.dtype) -> np.ndarray:
    """YaRN: keep fast pairs (j ≤ low), divide slow pairs (j ≥ high) by f, blend linearly between."""
    extrapolation = dtype.type(1.0) / pos_freqs
    interpolation = dtype.type(1.0) / (dtype.type(rp.factor) * pos_freqs)
    low, high = rp.yarn_low, rp.yarn_high
    if low == high:
        high += 0.001  # avoid dividing by zero, as transformers does
    # γ_j = clip((j − low)/(high − low), 0, 1)
    ramp = np.clip((np.arange(rp.rotary_dim // 2, dtype=dtype) - dtype.type(low)) / dtype.type(high - low), 0, 1)
    extrapolation_factor = dtype.type(1.0) - ramp
    # ω_j = ω_interp·γ_j + ω_extrap·(1 − γ_j), with the reference's order of operations
    return interpolation * (dtype.type(1.0) - extrapolation_factor) + extrapolation * extrapolation_factor


def _llama3_inv_freq(inv_freq: np.ndarray, rp: RopeParameters, dtype: np.dtype) -> np.ndarray:
    """Llama 3.1: wavelengths above O/α divided by f, below O/β kept, smoothed in between."""
    O, f = rp.original_max_position_embeddings, dtype.type(rp.factor)
    low_f, high_f = rp.low_freq_factor, rp.high_freq_factor
    low_freq_wavelen, high_freq_wavelen = O / low_f, O / high_f
    # λ_j = 2π / ω_j
    wavelen = dtype.type(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > dtype.type(low_freq_wavelen), inv_freq / f, inv_freq)
    # σ = (O/λ − α) / (β − α); ω = (1 − σ)·ω/f + σ·ω
    smooth = (dtype.type(O) / wavelen - dtype.type(low_f)) / dtype.type(high_f - low_f)
    smoothed = (dtype.type(1.0) - smooth) * scaled / f + smooth * scaled
    is_medium = ~(wavelen < dtype.type(high_freq_wavelen)) & ~(wavelen > dtype.type(low_freq_wavelen))
    return np.where(is_medium, smoothed, scaled)


def rope_cos_sin(position_ids, inv_freq: np.ndarray, attention_scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables in the rotate-half layout, attention scaling folded in (Hugging Face).

    [..., n] positions, [d/2] -> cos [..., n, d], sin [..., n, d], in inv_freq's dtype.
    """
    inv_freq = np.asarray(inv_freq)
    if inv_freq.ndim != 1:
        raise ShapeError(f"inv_freq must be 1-D [rotary_dim/2] (got shape {inv_freq.shape})")
    # θ[p, j] = p·ω_j: positions cast to ω's dtype (float32 in the reference), one rounding
    freqs = np.asarray(position_ids).astype(inv_freq.dtype)[..., None] * inv_freq
    # rotate-half layout: pair j and j + d/2 share the angle θ_j
    emb = np.concatenate([freqs, freqs], axis=-1)
    # s multiplies both, so q·k (and the attention logits) scale by s²
    return np.cos(emb) * attention_scaling, np.sin(emb) * attention_scaling


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] -> [−x2, x1] on the last axis: the 90° turn of each (j, j + d/2) pair. [..., d] -> [..., d]"""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first cos.shape[-1] dims of each head; the rest pass through (Phi-3 partial rotary).

    [..., n, head_dim], [..., n, d], [..., n, d] -> [..., n, head_dim]   (d <= head_dim; pass
    cos[:, None] to broadcast over the head axis of [b, h, n, head_dim]). Computed in x's dtype.
    """
    rotary_dim = cos.shape[-1]
    if cos.shape != sin.shape or rotary_dim % 2 or rotary_dim > x.shape[-1]:
        raise ShapeError(f"apply_rope: cos {cos.shape} and sin {sin.shape} must match, with an even last axis "
                         f"<= head_dim of x {x.shape}; build them with rope_cos_sin for this head_dim")
    # the reference casts the tables to the activation dtype first, then rotates in that dtype
    cos, sin = cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    # x' = x·cos + rotate_half(x)·sin
    rotated = x_rot * cos + rotate_half(x_rot) * sin
    if x_pass.shape[-1] == 0:
        return rotated
    return np.concatenate([rotated, np.broadcast_to(x_pass, rotated.shape[:-1] + x_pass.shape[-1:])], axis=-1)


def apply_rope_fast(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """`apply_rope` bit for bit, in three passes where it makes five (a prefill's fast path).

    rotate_half(x)·sin = [−x₂·sin₁, x₁·sin₂] = [x₂, x₁]·[−sin₁, sin₂]: the same IEEE operations
    ((−a)·b is −(a·b)), with [x₂, x₁] a view of x (its two halves as an axis of 2, reversed)
    instead of rotate_half's negated copy, and the sign moved onto the small table (one row per
    position, shared by every head). So x' = x·cos, then x' += [x₂, x₁]·[−sin₁, sin₂]: two products
    and a sum, as `apply_rope`'s x·cos + rotate_half(x)·sin. tests/test_rope.py holds the two
    bit-equal (partial rotary, strided views, broadcast tables, bf16 and float64 included).
    Shapes and dtypes as `apply_rope`.
    """
    rotary_dim = cos.shape[-1]
    if cos.shape != sin.shape or rotary_dim % 2 or rotary_dim > x.shape[-1]:
        return apply_rope(x, cos, sin)  # its error names the mismatch
    cos, sin = cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False)
    half = rotary_dim // 2
    x_rot = x[..., :rotary_dim]
    # [x₂, x₁] and [−sin₁, sin₂], the halves as an axis of two
    swapped = x_rot.reshape(x_rot.shape[:-1] + (2, half))[..., ::-1, :]
    signed_sin = np.concatenate([-sin[..., :half], sin[..., half:]], axis=-1).reshape(sin.shape[:-1] + (2, half))
    rotated = x_rot * cos
    rotated += (swapped * signed_sin).reshape(rotated.shape)
    if rotary_dim == x.shape[-1]:
        return rotated
    return np.concatenate([rotated, np.broadcast_to(x[..., rotary_dim:], rotated.shape[:-1] + (x.shape[-1] - rotary_dim,))],
                          axis=-1)


class DynamicNTKRope:
    """InternLM2's stateful dynamic NTK RoPE (remote code, = transformers 4.37 Llama), not transformers 5.24's.

    The reference keeps a cos/sin table for t = 0 … max_seq_len_cached−1. When an attention call's
    kv_seq_len (cached past + current keys) exceeds the table and max_position_embeddings, it
    enlarges the base to b' = b·(f·L/M − (f−1))^(d/(d−2)) (Python float64), OVERWRITES inv_freq,
    and rebuilds the table. Nothing ever shrinks or resets: after one long sequence every later call,
    even a short one, keeps the enlarged base ("sticky"). Rows are gathered by position_ids from
    the table's first kv_seq_len rows. Rows are computed on demand here, which gives the same values
    (each row is cos(float32(t)·ω) either way) without holding a [32768, d] table.
    """

    def __init__(self, head_dim: int, rope_theta: float, max_position_embeddings: int, factor: float,
                 dtype=np.float32):
        rope_parameters("dynamic", head_dim, rope_theta, max_position_embeddings, factor=factor)  # validates
        self.head_dim, self.rope_theta, self.factor = head_dim, float(rope_theta), factor
        self.max_position_embeddings = max_position_embeddings
        self.dtype = _float_dtype(dtype)
        self.base = self.rope_theta
        self.inv_freq, _ = rope_init("default", head_dim, rope_theta, max_position_embeddings, dtype=self.dtype)
        self.max_seq_len_cached = max_position_embeddings

    def cos_sin(self, position_ids, kv_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """[..., n] positions, kv_seq_len = past + current keys -> cos, sin [..., n, head_dim]."""
        if kv_seq_len > self.max_seq_len_cached:
            self.max_seq_len_cached = kv_seq_len
            if kv_seq_len > self.max_position_embeddings:
                rp = rope_parameters("dynamic", self.head_dim, self.rope_theta, self.max_position_embeddings,
                                     seq_len=kv_seq_len, factor=self.factor)
                self.base = rp.rope_theta
                self.inv_freq, _ = rope_init("default", self.head_dim, self.base, self.max_position_embeddings,
                                             dtype=self.dtype)
        position_ids = np.asarray(position_ids)
        if position_ids.size and (position_ids.min() < 0 or position_ids.max() >= kv_seq_len):
            raise GenerationError(f"position ids must lie in [0, kv_seq_len={kv_seq_len}) for InternLM2's cached "
                                  f"RoPE table (got {position_ids.min()}..{position_ids.max()}); pass "
                                  "kv_seq_len = past length + current length and positions from 0")
        return rope_cos_sin(position_ids, self.inv_freq, 1.0)


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k projection rows from the interleaved (GPT-J, llama.cpp) to the rotate-half layout.

    [n_heads·D, ...] -> [n_heads·D, ...] (weight or bias): half row h·D + j·D/2 + i comes from
    interleaved row h·D + 2i + j, so pair (2i, 2i+1) becomes pair (i, i + D/2).
    """
    w = np.asarray(w)
    head_dim = _check_rows(w, n_heads)
    # [h, D/2, 2, ...] (pair i, member j) -> [h, 2, D/2, ...] (member j, pair i)
    per_pair = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
    return np.swapaxes(per_pair, 1, 2).reshape(w.shape)


def half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half`: rotate-half rows back to interleaved pairs. [n_heads·D, ...] -> same."""
    w = np.asarray(w)
    head_dim = _check_rows(w, n_heads)
    per_member = w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])
    return np.swapaxes(per_member, 1, 2).reshape(w.shape)


def _check_rows(w, n_heads: int) -> int:
    rows = w.shape[0] if w.ndim else 0
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise ShapeError(f"q/k projection has {rows} rows, not n_heads ({n_heads}) × an even head_dim; "
                         "pass the q or k weight [n_heads·head_dim, hidden] (or its bias) and its own head count")
    return rows // n_heads
