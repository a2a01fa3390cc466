"""What a RoPE config means: every rope_type's parameters validated and its scalars resolved.

`rope_parameters(rope_type, head_dim, rope_theta, max_position_embeddings, seq_len=None, **params)`
checks a config's RoPE parameters (transformers' names, ROPE_PARAMETER_NAMES) and returns the
`RopeParameters` that `rope_init` turns into frequencies: the rotary dim, the base actually used
(dynamic NTK's enlarged b'), the attention scaling, YaRN's ramp ends, the LongRoPE factor list for
this seq_len. Plain Python floats, no arrays: minivl/rope.py and torch_impl/rope.py both build on
it, and re-export these names, so `minivl.rope.rope_parameters` is the same function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minivl.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "su", "phi3_yarn")

# transformers' rope_parameters names; anything else is a typo and is refused
ROPE_PARAMETER_NAMES = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
                        "mscale", "mscale_all_dim", "attention_factor", "short_factor", "long_factor",
                        "low_freq_factor", "high_freq_factor", "partial_rotary_factor")

_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
    "su": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "phi3_yarn": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class RopeParameters:
    """Everything `rope_init` needs besides arrays, resolved and validated (shared with torch_impl).

    `rope_theta` is the base actually used (dynamic NTK: the enlarged base b'); `ext_factors` is
    the LongRoPE list chosen for this seq_len; `yarn_low`/`yarn_high` the ramp ends.
    """

    rope_type: str
    rotary_dim: int
    rope_theta: float
    attention_scaling: float
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    yarn_low: float | None = None
    yarn_high: float | None = None
    ext_factors: tuple | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max_position_embeddings: int) -> float:
    """Pair index whose wavelength 2π·b^(2j/d) fits `num_rotations` times into O (YaRN, Peng et al. 2023)."""
    # c(r) = d·ln(O / (2π r)) / (2 ln b)
    return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_max_position_embeddings: int, truncate: bool = True) -> tuple[float, float]:
    """(low, high) ends of YaRN's ramp: floor/ceil when truncating, clamped to [0, dim − 1] (transformers)."""
    low = yarn_correction_dim(beta_fast, dim, base, original_max_position_embeddings)
    high = yarn_correction_dim(beta_slow, dim, base, original_max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature g(s) = 0.1·m·ln(s) + 1 for s > 1, else 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _factor_list(name: str, values, rope_type: str, half: int) -> tuple:
    _require(isinstance(values, (list, tuple)) and all(isinstance(v, (int, float)) for v in values),
             f"rope {rope_type}: {name} must be a list of {half} numbers (got {type(values).__name__})")
    _require(len(values) == half, f"rope {rope_type}: {name} must have rotary_dim/2 = {half} entries "
             f"(got {len(values)}); check head_dim and partial_rotary_factor against the checkpoint")
    _require(all(v > 0 for v in values), f"rope {rope_type}: every {name} entry must be > 0")
    return tuple(float(v) for v in values)


def rope_parameters(rope_type: str, head_dim: int, rope_theta: float, max_position_embeddings: int,
                    seq_len: int | None = None, **params) -> RopeParameters:
    """Validate a RoPE config and resolve every scalar: defaults, attention scaling, YaRN ramp, b'.

    Params use transformers' names (ROPE_PARAMETER_NAMES); a None value means "absent", as in a
    config.json with nulls. Raises ConfigError naming the parameter and the fix. The checks every
    type shares run here; `_RESOLVERS[rope_type]` then resolves that type's own scalars.
    """
    _require(rope_type in ROPE_TYPES, f"unknown rope_type {rope_type!r}; use one of {', '.join(ROPE_TYPES)}")
    unknown = sorted(set(params) - set(ROPE_PARAMETER_NAMES))
    _require(not unknown, f"unknown RoPE parameter(s) {unknown} for rope_type {rope_type!r}; "
             f"allowed names are {', '.join(ROPE_PARAMETER_NAMES)}")
    p = {k: v for k, v in params.items() if v is not None}
    missing = [k for k in _REQUIRED.get(rope_type, ()) if k not in p]
    _require(not missing, f"rope_type {rope_type!r} needs {missing}; add them to rope_scaling/rope_parameters")
    _require(isinstance(head_dim, (int, np.integer)) and head_dim > 0 and head_dim % 2 == 0,
             f"head_dim must be a positive even integer so dimensions pair up (got {head_dim!r})")
    _require(rope_theta > 0, f"rope_theta must be > 0 (got {rope_theta!r})")
    _require(max_position_embeddings > 0, f"max_position_embeddings must be > 0 (got {max_position_embeddings!r})")
    partial = float(p.get("partial_rotary_factor", 1.0))
    _require(0.0 < partial <= 1.0, f"partial_rotary_factor must be in (0, 1] (got {partial})")
    # rotary dim d = int(D·pr), the first d dims of each head rotate (Phi-3 convention)
    dim = int(head_dim * partial)
    _require(dim >= 2 and dim % 2 == 0, f"rotary dim int(head_dim·partial_rotary_factor) = {dim} must be even "
             f"and >= 2 (head_dim {head_dim}, partial_rotary_factor {partial})")
    if "factor" in p and rope_type in ("linear", "dynamic", "yarn", "llama3", "longrope"):
        _require(isinstance(p["factor"], (int, float)) and p["factor"] >= 1.0,
                 f"rope {rope_type}: factor must be a number >= 1.0 (got {p['factor']!r})")
    request = _RopeRequest(rope_type, dim, float(rope_theta), max_position_embeddings, seq_len, p)
    return _RESOLVERS[rope_type](request)


@dataclass(frozen=True)
class _RopeRequest:
    """A validated rope_parameters call: what each per-type resolver reads."""

    rope_type: str
    rotary_dim: int
    base: float
    max_position_embeddings: int
    seq_len: int | None
    params: dict

    def result(self, **resolved) -> RopeParameters:
        return RopeParameters(rope_type=self.rope_type, rotary_dim=self.rotary_dim, **resolved)

    def original_max_position_embeddings(self) -> int:
        """O; yarn, longrope and llama3 default it to M, as transformers' standardize_rope_params does."""
        O = self.params.get("original_max_position_embeddings", self.max_position_embeddings)
        _require(isinstance(O, (int, np.integer)) and O > 0,
                 f"original_max_position_embeddings must be a positive integer (got {O!r})")
        return int(O)


def _resolve_default(r: _RopeRequest) -> RopeParameters:
    return r.result(rope_theta=r.base, attention_scaling=1.0)


def _resolve_linear(r: _RopeRequest) -> RopeParameters:
    return r.result(rope_theta=r.base, attention_scaling=1.0, factor=r.params["factor"])


def _resolve_dynamic(r: _RopeRequest) -> RopeParameters:
    d, f, M = r.rotary_dim, r.params["factor"], r.max_position_embeddings
    _require(d > 2, f"rope dynamic: rotary dim must be > 2 for the exponent d/(d−2) (got {d})")
    # L = max(seq_len, M): the base only ever grows past the trained length
    L = M if r.seq_len is None else max(r.seq_len, M)
    # b' = b·(f·L/M − (f − 1))^(d/(d−2)), in Python float64 (transformers called directly, InternLM2)
    enlarged = r.base * ((f * L / M) - (f - 1)) ** (d / (d - 2))
    return r.result(rope_theta=enlarged, attention_scaling=1.0, factor=f)


def _resolve_yarn(r: _RopeRequest) -> RopeParameters:
    p, O = r.params, r.original_max_position_embeddings()
    f = p.get("factor", r.max_position_embeddings / O)
    if "attention_factor" in p:
        scaling = float(p["attention_factor"])
    elif p.get("mscale") and p.get("mscale_all_dim"):
        # DeepSeek style: s = g(f, mscale) / g(f, mscale_all_dim)
        scaling = float(yarn_get_mscale(f, p["mscale"]) / yarn_get_mscale(f, p["mscale_all_dim"]))
    else:
        scaling = yarn_get_mscale(f)
    # 0 or None means "the paper's default" (transformers reads them with `or`)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
    low, high = yarn_correction_range(beta_fast, beta_slow, r.rotary_dim, r.base, O, p.get("truncate", True))
    return r.result(rope_theta=r.base, attention_scaling=scaling, factor=f, yarn_low=low, yarn_high=high,
                    original_max_position_embeddings=O)


def _resolve_llama3(r: _RopeRequest) -> RopeParameters:
    O = r.original_max_position_embeddings()
    low_f, high_f = r.params["low_freq_factor"], r.params["high_freq_factor"]
    _require(high_f > low_f, f"rope llama3: high_freq_factor ({high_f}) must exceed low_freq_factor ({low_f})")
    return r.result(rope_theta=r.base, attention_scaling=1.0, factor=r.params["factor"], low_freq_factor=low_f,
                    high_freq_factor=high_f, original_max_position_embeddings=O)


def _ext_factors(r: _RopeRequest, O: int) -> tuple:
    """LongRoPE family: the long factors once the sequence is longer than O (L = O+1 is long, L = O short)."""
    half = r.rotary_dim // 2
    short = _factor_list("short_factor", r.params["short_factor"], r.rope_type, half)
    long = _factor_list("long_factor", r.params["long_factor"], r.rope_type, half)
    return long if (r.seq_len is not None and r.seq_len > O) else short


def _resolve_longrope(r: _RopeRequest) -> RopeParameters:
    p, O = r.params, r.original_max_position_embeddings()
    ext = _ext_factors(r, O)
    f = p.get("factor", r.max_position_embeddings / O)
    if "attention_factor" in p:
        scaling = float(p["attention_factor"])
    else:
        # s = sqrt(1 + ln f / ln O) for f > 1
        scaling = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(O))
    return r.result(rope_theta=r.base, attention_scaling=scaling, factor=f, ext_factors=ext,
                    original_max_position_embeddings=O)


def _resolve_phi3(r: _RopeRequest) -> RopeParameters:
    """Phi-3 remote code ('su', 'phi3_yarn'): the scale is always M/O, and it accepts no factor/attention_factor."""
    O = r.original_max_position_embeddings()
    ext = _ext_factors(r, O)
    extra = sorted({"factor", "attention_factor"} & set(r.params))
    _require(not extra, f"rope_type {r.rope_type!r} (Phi-3 remote code) takes no {extra}: its scale is always "
             f"max_position_embeddings/original_max_position_embeddings; use rope_type 'longrope' to set them")
    scale = r.max_position_embeddings / O
    if r.rope_type == "su":
        # s = sqrt(1 + ln(M/O) / ln O)
        scaling = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(O))
    else:
        # Phi-3's "yarn" is not YaRN: s = 0.1·ln(M/O) + 1, same factor lists as su
        scaling = 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0
    return r.result(rope_theta=r.base, attention_scaling=scaling, factor=scale, ext_factors=ext,
                    original_max_position_embeddings=O)


# one resolver per rope_type (the ROPE_TYPES, in that order), after rope_parameters' shared checks
_RESOLVERS = {
    "default": _resolve_default,
    "linear": _resolve_linear,
    "dynamic": _resolve_dynamic,
    "yarn": _resolve_yarn,
    "longrope": _resolve_longrope,
    "llama3": _resolve_llama3,
    "su": _resolve_phi3,
    "phi3_yarn": _resolve_phi3,
}
