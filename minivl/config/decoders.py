"""Decoder-LLM configs: InternLM2, Phi-3 (InternVL's vendored classes), Llama and Qwen2 (transformers 4.37.2).

Import them from `minivl.config`. Each keeps its reference class's defaults and rope_scaling
validation; `head_dim`, `num_key_value_groups` and `rope_kwargs()` are what the models use.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from minivl.config.base import BaseConfig, is_int, is_number
from minivl.errors import ConfigError


@dataclass(kw_only=True)
class DecoderConfig(BaseConfig):
    """Fields and checks shared by the HF-style decoders (InternLM2, Phi-3, Llama, Qwen2)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            self._check_int(name)
        # K = None means one KV head per query head (plain multi-head attention)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check_int("num_key_value_heads")
        self._check_divides("hidden_size", "num_attention_heads")
        # GQA: each KV head serves G = H / K query heads
        self._check_divides("num_attention_heads", "num_key_value_heads")
        self._check_choice("hidden_act", ("silu",), "minivl's SwiGLU MLP implements silu only")
        self._check_positive_number("rms_norm_eps")
        self._check_positive_number("rope_theta")
        self._check_rope_parameters_agree()

    def _check_rope_parameters_agree(self) -> None:
        """A transformers >= 5 'rope_parameters' dict must not say something the fields do not.

        Llama and Qwen2 read it into rope_theta / rope_scaling first; InternLM2 and Phi-3 (remote
        code, 4.x layout) do not, so a differing one would otherwise be silently ignored.
        """
        params = self.extra.get("rope_parameters")
        if not isinstance(params, dict):
            return
        theta = params.get("rope_theta", self.rope_theta)
        kind = params.get("rope_type", params.get("type", "default"))
        if theta != self.rope_theta or (kind != "default" and self.rope_scaling is None):
            raise ConfigError(f"{type(self).__name__}: rope_parameters {params!r} (the transformers >= 5 layout) "
                              f"is not read for {self.model_type}; write rope_theta at the top level and "
                              f"rope_scaling in the 4.x form this class documents")

    @property
    def head_dim(self) -> int:
        """D = hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_groups(self) -> int:
        """G = H / K query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def _rope_base(self, rope_type: str, **params) -> dict:
        return dict(rope_type=rope_type, head_dim=self.head_dim, rope_theta=self.rope_theta,
                    max_position_embeddings=self.max_position_embeddings, **params)

    def rope_kwargs(self) -> dict:
        """Keyword arguments for `minivl.rope.rope_init` that reproduce this config's RoPE."""
        return self._rope_base("default")

    # -- rope_scaling checks ----------------------------------------------------------------------
    def _rope_error(self, key: str, value: Any, allowed: str, fix: str = "") -> ConfigError:
        return self._error(f"rope_scaling.{key}", value, allowed, fix)

    def _check_factor_list(self, key: str) -> None:
        """short_factor / long_factor: one number per frequency pair, so head_dim/2 of them."""
        value, n_pairs = self.rope_scaling.get(key), self.head_dim // 2
        if not (isinstance(value, list) and all(is_number(v) for v in value)):
            raise self._rope_error(key, value, f"a list of {n_pairs} numbers")
        if len(value) != n_pairs:
            raise self._rope_error(key, value, f"a list of length head_dim // 2 = {n_pairs} "
                                   f"(got length {len(value)})")

    def _check_rope_scaling_keys(self, required: set, optional: set = frozenset()) -> None:
        keys = set(self.rope_scaling)
        missing, unknown = required - keys, keys - required - set(optional)
        if missing or unknown:
            raise ConfigError(
                f"{type(self).__name__}: rope_scaling must have exactly the keys {sorted(required)}"
                + (f" (optionally {sorted(optional)})" if optional else "")
                + f" (got {sorted(keys)}: missing {sorted(missing)}, unexpected {sorted(unknown)})")


@dataclass(kw_only=True)
class InternLM2Config(DecoderConfig):
    """InternLM2 / InternLM2.5, as InternVL's vendored `InternLM2Config`.

    The defaults are the reference class's, NOT the released checkpoints': `bias=True`,
    `rms_norm_eps=1e-6`, `rope_theta=10000`, `vocab_size=103168` here versus bias false, 1e-5,
    1e6 and 92553 in InternVL2 configs. Always build from the checkpoint's llm_config.

    rope_scaling: None, or exactly `{"type": "linear"|"dynamic", "factor": <Python float >= 1>}`;
    an int factor such as 2 is rejected, as the reference rejects it.
    """

    model_type: ClassVar[str] = "internlm2"
    vocab_size: int = 103168
    pad_token_id: int | None = 0
    bias: bool = True
    rope_theta: float = 10000
    attn_implementation: str | None = "eager"

    def validate(self) -> None:
        super().validate()
        if self.attn_implementation is None:
            self.attn_implementation = "eager"
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or len(scaling) != 2:
            raise self._error("rope_scaling", scaling, "None or a dict with exactly two keys, type and factor",
                              'e.g. {"type": "dynamic", "factor": 2.0}')
        if scaling.get("type") not in ("linear", "dynamic"):
            raise self._rope_error("type", scaling.get("type"), "one of ['linear', 'dynamic']")
        factor = scaling.get("factor")
        # the reference tests isinstance(factor, float): JSON 2 is an int and is refused
        if not isinstance(factor, float) or not is_number(factor) or factor < 1.0:
            fix = f"write {float(factor)}" if is_int(factor) and factor >= 1 else ""
            raise self._rope_error("factor", factor, "a float >= 1.0", fix)

    def rope_kwargs(self) -> dict:
        """default, ('linear', factor) or ('dynamic', factor): the model uses DynamicNTKRope for the last."""
        if self.rope_scaling is None:
            return self._rope_base("default")
        return self._rope_base(self.rope_scaling["type"], factor=self.rope_scaling["factor"])


@dataclass(kw_only=True)
class Phi3Config(DecoderConfig):
    """Phi-3 (InternVL2-4B's LLM), as InternVL's vendored `Phi3Config` (transformers ~4.40 era).

    rope_scaling: None, or exactly `{"type": "su"|"yarn", "short_factor": [...], "long_factor": [...]}`
    with head_dim/2 numbers in each list. transformers' later name 'longrope' is rejected here,
    as the vendored class rejects it; 'su' is the same scheme. 'yarn' is Phi-3's own variant (same
    factor lists, magnitude 0.1·ln(M/O)+1), not YaRN.
    """

    model_type: ClassVar[str] = "phi3"
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    pad_token_id: int | None = 32000
    eos_token_id: int | list | None = 32000
    sliding_window: int | None = None

    def validate(self) -> None:
        super().validate()
        self._check_int("original_max_position_embeddings")
        for name in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
            self._check_probability(name)
        if self.sliding_window is not None:
            self._check_int("sliding_window")
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict) or len(scaling) != 3:
            raise self._error("rope_scaling", scaling,
                              "None or a dict with exactly three keys, type, short_factor and long_factor")
        kind = scaling.get("type")
        if kind not in ("su", "yarn"):
            fix = ("'longrope' is transformers' later name for 'su', which this Phi-3 class "
                   "(InternVL's) accepts instead: write \"type\": \"su\"") if kind == "longrope" else ""
            raise self._rope_error("type", kind, "one of ['su', 'yarn']", fix)
        self._check_factor_list("short_factor")
        self._check_factor_list("long_factor")

    def rope_kwargs(self) -> dict:
        """default, or 'su' / 'phi3_yarn' with both factor lists and original_max_position_embeddings."""
        if self.rope_scaling is None:
            return self._rope_base("default")
        rope_type = {"su": "su", "yarn": "phi3_yarn"}[self.rope_scaling["type"]]
        return self._rope_base(rope_type,
                               short_factor=list(self.rope_scaling["short_factor"]),
                               long_factor=list(self.rope_scaling["long_factor"]),
                               original_max_position_embeddings=self.original_max_position_embeddings)


# transformers' newer rope_type names (beyond 4.37.2): required and optional rope_scaling keys
_NEWER_ROPE_TYPES = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": ({"factor"}, {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                          "mscale", "mscale_all_dim", "truncate"}),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "longrope": ({"short_factor", "long_factor"}, {"factor", "attention_factor",
                                                   "original_max_position_embeddings"}),
}


@dataclass(kw_only=True)
class _HFRopeScalingMixin:
    """rope_scaling as newer transformers read it: `rope_type` (or `type`) plus that type's parameters."""

    def _check_newer_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        type_key = "rope_type" if "rope_type" in scaling else "type"
        kind = scaling.get(type_key)
        if kind not in _NEWER_ROPE_TYPES:
            raise self._rope_error(type_key, kind, f"one of {sorted(_NEWER_ROPE_TYPES)}")
        required, optional = _NEWER_ROPE_TYPES[kind]
        # {'type', 'rope_type'} may both be present when a config was re-saved by newer transformers
        self._check_rope_scaling_keys(required | {type_key}, optional | ({"type", "rope_type"} - {type_key}))
        if "factor" in scaling and (not is_number(scaling["factor"]) or scaling["factor"] < 1.0):
            raise self._rope_error("factor", scaling["factor"], "a number >= 1.0")
        for key, value in scaling.items():  # beta_fast, low_freq_factor, attention_factor, ...
            if isinstance(value, float) and not math.isfinite(value):
                raise self._rope_error(key, value, "a finite number")
        if kind == "longrope":
            self._check_factor_list("short_factor")
            self._check_factor_list("long_factor")

    def _newer_rope_kwargs(self) -> dict:
        params = {k: copy.deepcopy(v) for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")}
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        return self._rope_base(kind, **params)

    def _read_rope_parameters(self) -> None:
        """Accept transformers >= 5's layout, which puts rope_theta and the scaling in one dict.

        `"rope_parameters": {"rope_type": "llama3", "factor": 8.0, ..., "rope_theta": 5e5}` becomes
        rope_theta plus rope_scaling; the dict itself stays in `extra`, so a round trip keeps it.
        Ignoring it instead would silently run the model with the default base 10000.
        """
        params = self.extra.get("rope_parameters")
        if params is None:
            return
        if not isinstance(params, dict):
            raise self._error("rope_parameters", params, "a dict like {'rope_type': 'default', 'rope_theta': 1e6}")
        params = copy.deepcopy(params)
        theta = params.pop("rope_theta", None)
        if theta is not None:
            default_theta = type(self).__dataclass_fields__["rope_theta"].default
            if self.rope_theta not in (theta, default_theta):
                raise ConfigError(f"{type(self).__name__}: rope_theta ({self.rope_theta}) disagrees with "
                                  f"rope_parameters.rope_theta ({theta}); keep one of them")
            self.rope_theta = theta
        is_default = params.get("rope_type", params.get("type", "default")) == "default"
        scaling = None if is_default and set(params) <= {"rope_type", "type"} else params
        if self.rope_scaling is not None and self.rope_scaling != scaling:
            raise ConfigError(f"{type(self).__name__}: rope_scaling ({self.rope_scaling!r}) disagrees with "
                              f"rope_parameters ({self.extra['rope_parameters']!r}); keep one of them")
        self.rope_scaling = scaling

    def _check_head_dim(self) -> None:
        if "head_dim" in self.extra and self.extra["head_dim"] != self.head_dim:
            raise ConfigError(f"{type(self).__name__}: head_dim must equal hidden_size // num_attention_heads "
                              f"= {self.head_dim} (got {self.extra['head_dim']!r}); minivl, like transformers "
                              f"4.37.2, derives head_dim from those two")


@dataclass(kw_only=True)
class LlamaConfig(_HFRopeScalingMixin, DecoderConfig):
    """Llama, as transformers 4.37.2's `LlamaConfig` (InternVL2-40B/76B's LLM).

    rope_scaling, 4.37.2 form: exactly `{"type": "linear"|"dynamic", "factor": <Python float > 1>}`.
    Beyond 4.37.2, minivl also accepts transformers' newer `rope_type` forms (with `rope_type` or
    `type` naming one of default, linear, dynamic, yarn, llama3, longrope, plus that type's own
    parameters), so a Llama 3.1 config (`rope_type: llama3`) loads; those parameters are passed
    through to `rope_init` unchanged.
    """

    model_type: ClassVar[str] = "llama"
    pretraining_tp: int = 1
    attention_bias: bool = False
    attention_dropout: float = 0.0

    def validate(self) -> None:
        self._read_rope_parameters()
        super().validate()
        self._check_head_dim()
        self._check_int("pretraining_tp")
        self._check_probability("attention_dropout")
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise self._error("rope_scaling", scaling, "None or a dict")
        if "rope_type" not in scaling and scaling.get("type") in ("linear", "dynamic"):
            # the 4.37.2 form, checked exactly as 4.37.2 checks it
            self._check_rope_scaling_keys({"type", "factor"})
            factor = scaling["factor"]
            if not isinstance(factor, float) or not is_number(factor) or factor <= 1.0:
                fix = f"write {float(factor)}" if is_int(factor) and factor > 1 else ""
                raise self._rope_error("factor", factor, "a float > 1.0", fix)
        else:
            self._check_newer_rope_scaling()

    def rope_kwargs(self) -> dict:
        if self.rope_scaling is None:
            return self._rope_base("default")
        return self._newer_rope_kwargs()


@dataclass(kw_only=True)
class Qwen2Config(_HFRopeScalingMixin, DecoderConfig):
    """Qwen2 / Qwen2.5, as transformers 4.37.2's `Qwen2Config` (InternVL2-1B, InternVL2.5-1B/4B/38B/78B).

    transformers 4.37.2 has no rope_scaling for Qwen2 and silently IGNORES one in config.json
    (InternVL3 configs carry `{"type": "dynamic", "factor": 2.0}`). minivl validates it like
    newer transformers and `rope_kwargs` honours it, as newer transformers do; 'dynamic' only
    changes anything beyond max_position_embeddings.
    """

    model_type: ClassVar[str] = "qwen2"
    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    attention_dropout: float = 0.0

    def validate(self) -> None:
        self._read_rope_parameters()
        super().validate()
        self._check_head_dim()
        self._check_probability("attention_dropout")
        self._check_int("max_window_layers", minimum=0)
        if self.sliding_window is not None:
            self._check_int("sliding_window")
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict):
            raise self._error("rope_scaling", self.rope_scaling, "None or a dict")
        self._check_newer_rope_scaling()

    def rope_kwargs(self) -> dict:
        """default unless rope_scaling is given (4.37.2 would ignore it; see the class docstring)."""
        if self.rope_scaling is None:
            return self._rope_base("default")
        return self._newer_rope_kwargs()
