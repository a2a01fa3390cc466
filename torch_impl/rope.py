"""Rotary position embeddings in PyTorch: the mirror of minivl/rope.py (same names, same semantics).

Rotate-half layout (pairs j, j + d/2), as Hugging Face, InternLM2 and Phi-3. The scalar half of
every recipe (validation, defaults, YaRN's ramp ends, attention scaling, the dynamic-NTK base) is
framework-free and imported from minivl/rope_parameters.py; only the tensor maths is written here,
in the same order of operations as transformers 5.24 so a float32 run on CPU matches it bit for bit.
Works on any device; `dtype` is torch.float32 (the reference's rounding) or torch.float64 (gold).
"""
from __future__ import annotations

import math

import torch

from minivl.errors import ConfigError, GenerationError, ShapeError
from minivl.rope_parameters import (  # the framework-free half, re-exported under the same names
    ROPE_PARAMETER_NAMES,
    ROPE_TYPES,
    RopeParameters,
    rope_parameters,
    yarn_correction_dim,
    yarn_correction_range,
    yarn_get_mscale,
)

__all__ = ["ROPE_PARAMETER_NAMES", "ROPE_TYPES", "RopeParameters", "rope_parameters", "yarn_correction_dim",
           "yarn_correction_range", "yarn_get_mscale", "rope_init", "rope_cos_sin", "rotate_half", "apply_rope",
           "DynamicNTKRope", "interleaved_to_half", "half_to_interleaved"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
           torch.float64: torch.float64}


def _float_dtype(dtype) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"RoPE frequencies are built in float32 (the reference) or float64 (gold), got {dtype}")
    return _DTYPES[dtype]


def rope_init(rope_type: str, head_dim: int, rope_theta: float, max_position_embeddings: int,
              seq_len: int | None = None, dtype=torch.float32, device=None, **params) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ω and attention scaling s for one RoPE recipe (transformers' names).

    -> inv_freq [rotary_dim/2] in `dtype` on `device`, attention_scaling (Python float).
    `seq_len`: the length the frequencies are built for (dynamic: the longest sequence seen;
    longrope/su/phi3_yarn: max position + 1, long factors when > original_max_position_embeddings).
    """
    rp = rope_parameters(rope_type, head_dim, rope_theta, max_position_embeddings, seq_len, **params)
    dtype = _float_dtype(dtype)
    d = rp.rotary_dim
    # exponent 2j/d for j = 0 … d/2−1: float(arange(0, d, 2)) / d, as the reference
    exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).to(dtype) / d
    # b^(2j/d): the wavelength of pair j divided by 2π (b is rounded to `dtype` first, as in the reference)
    pos_freqs = rp.rope_theta ** exponent

    if rp.rope_type in ("default", "dynamic"):
        inv_freq = 1.0 / pos_freqs
    elif rp.rope_type == "linear":
        # position interpolation: ω_j / f (InternLM2 divides positions instead: same up to rounding)
        inv_freq = (1.0 / pos_freqs) / rp.factor
    elif rp.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(pos_freqs, rp)
    elif rp.rope_type == "llama3":
        inv_freq = _llama3_inv_freq(1.0 / pos_freqs, rp)
    else:  # longrope, su, phi3_yarn: ω_j = 1 / (λ_j · b^(2j/d))
        inv_freq = 1.0 / (torch.tensor(rp.ext_factors, dtype=dtype, device=device) * pos_freqs)
    return inv_freq.to(dtype), rp.attention_scaling


def _yarn_inv_freq(pos_freqs: torch.Tensor, rp: RopeParameters) -> torch.Tensor:
    """YaRN: keep fast pairs (j ≤ low), divide slow pairs (j ≥ high) by f, blend linearly between."""
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rp.factor * pos_freqs)
    low, high = rp.yarn_low, rp.yarn_high
    if low == high:
        high += 0.001  # avoid dividing by zero, as transformers does
    # γ_j = clip((j − low)/(high − low), 0, 1)
    j = torch.arange(rp.rotary_dim // 2, dtype=pos_freqs.dtype, device=pos_freqs.device)
    ramp = torch.clamp((j - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    # ω_j = ω_interp·γ_j + ω_extrap·(1 − γ_j), with the reference's order of operations
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def _llama3_inv_freq(inv_freq: torch.Tensor, rp: RopeParameters) -> torch.Tensor:
    """Llama 3.1: wavelengths above O/α divided by f, below O/β kept, smoothed in between."""
    O, f = rp.original_max_position_embeddings, rp.factor
    low_f, high_f = rp.low_freq_factor, rp.high_freq_factor
    low_freq_wavelen, high_freq_wavelen = O / low_f, O / high_f
    # λ_j = 2π / ω_j
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / f, inv_freq)
    # σ = (O/λ − α) / (β − α); ω = (1 − σ)·ω/f + σ·ω
    smooth = (O / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / f + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(position_ids, inv_freq: torch.Tensor,
                 attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables in the rotate-half layout, attention scaling folded in (Hugging Face).

    [..., n] positions, [d/2] -> cos [..., n, d], sin [..., n, d], in inv_freq's dtype and device.
    """
    if inv_freq.ndim != 1:
        raise ShapeError(f"inv_freq must be 1-D [rotary_dim/2] (got shape {tuple(inv_freq.shape)})")
    position_ids = torch.as_tensor(position_ids, device=inv_freq.device)
    # the reference computes the table with autocast off, in ω's dtype (float32)
    with torch.autocast(device_type=inv_freq.device.type, enabled=False):
        # θ[p, j] = p·ω_j: positions cast to ω's dtype, one rounding
        freqs = position_ids[..., None].to(inv_freq.dtype) * inv_freq
        # rotate-half layout: pair j and j + d/2 share the angle θ_j
        emb = torch.cat((freqs, freqs), dim=-1)
        # s multiplies both, so q·k (and the attention logits) scale by s²
        return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [−x2, x1] on the last axis: the 90° turn of each (j, j + d/2) pair. [..., d] -> [..., d]"""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head; the rest pass through (Phi-3 partial rotary).

    [..., n, head_dim], [..., n, d], [..., n, d] -> [..., n, head_dim]   (d <= head_dim; pass
    cos[:, None] to broadcast over the head axis of [b, h, n, head_dim]). Computed in x's dtype.
    """
    rotary_dim = cos.shape[-1]
    if cos.shape != sin.shape or rotary_dim % 2 or rotary_dim > x.shape[-1]:
        raise ShapeError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must match, with an even "
                         f"last axis <= head_dim of x {tuple(x.shape)}; build them with rope_cos_sin for this head_dim")
    # the reference casts the tables to the activation dtype first, then rotates in that dtype
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    # x' = x·cos + rotate_half(x)·sin
    rotated = (x_rot * cos) + (rotate_half(x_rot) * sin)
    if x_pass.shape[-1] == 0:
        return rotated
    return torch.cat((rotated, x_pass.expand(*rotated.shape[:-1], x_pass.shape[-1])), dim=-1)


def apply_rope_fast(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The twin of minivl's `apply_rope_fast` (which drops NumPy's extra passes and copies): `apply_rope` itself.

    [..., n, head_dim], [..., n, d], [..., n, d] -> [..., n, head_dim]
    """
    return apply_rope(x, cos, sin)

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
                 dtype=torch.float32, device=None):
        rope_parameters("dynamic", head_dim, rope_theta, max_position_embeddings, factor=factor)  # validates
        self.head_dim, self.rope_theta, self.factor = head_dim, float(rope_theta), factor
        self.max_position_embeddings = max_position_embeddings
        self.dtype, self.device = _float_dtype(dtype), device
        self.base = self.rope_theta
        self.inv_freq, _ = rope_init("default", head_dim, rope_theta, max_position_embeddings, dtype=self.dtype,
                                     device=device)
        self.max_seq_len_cached = max_position_embeddings

    def cos_sin(self, position_ids, kv_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., n] positions, kv_seq_len = past + current keys -> cos, sin [..., n, head_dim]."""
        if kv_seq_len > self.max_seq_len_cached:
            self.max_seq_len_cached = kv_seq_len
            if kv_seq_len > self.max_position_embeddings:
                rp = rope_parameters("dynamic", self.head_dim, self.rope_theta, self.max_position_embeddings,
                                     seq_len=kv_seq_len, factor=self.factor)
                self.base = rp.rope_theta
                self.inv_freq, _ = rope_init("default", self.head_dim, self.base, self.max_position_embeddings,
                                             dtype=self.dtype, device=self.device)
        position_ids = torch.as_tensor(position_ids)
        if position_ids.numel() and (int(position_ids.min()) < 0 or int(position_ids.max()) >= kv_seq_len):
            raise GenerationError(f"position ids must lie in [0, kv_seq_len={kv_seq_len}) for InternLM2's cached "
                                  f"RoPE table (got {int(position_ids.min())}..{int(position_ids.max())}); pass "
                                  "kv_seq_len = past length + current length and positions from 0")
        return rope_cos_sin(position_ids, self.inv_freq, 1.0)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from the interleaved (GPT-J, llama.cpp) to the rotate-half layout.

    [n_heads·D, ...] -> [n_heads·D, ...] (weight or bias): half row h·D + j·D/2 + i comes from
    interleaved row h·D + 2i + j, so pair (2i, 2i+1) becomes pair (i, i + D/2).
    """
    head_dim = _check_rows(w, n_heads)
    # [h, D/2, 2, ...] (pair i, member j) -> [h, 2, D/2, ...] (member j, pair i)
    per_pair = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
    return per_pair.transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`: rotate-half rows back to interleaved pairs. [n_heads·D, ...] -> same."""
    head_dim = _check_rows(w, n_heads)
    per_member = w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])
    return per_member.transpose(1, 2).reshape(w.shape)


def _check_rows(w: torch.Tensor, n_heads: int) -> int:
    rows = w.shape[0] if w.ndim else 0
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise ShapeError(f"q/k projection has {rows} rows, not n_heads ({n_heads}) × an even head_dim; "
                         "pass the q or k weight [n_heads·head_dim, hidden] (or its bias) and its own head count")
    return rows // n_heads
