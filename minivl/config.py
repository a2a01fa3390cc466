"""Model configs: dataclasses whose field names ARE the keys of a checkpoint's config.json.

Each class follows one reference config class, with its defaults and its validation:

* `InternVisionConfig`  InternVL `configuration_intern_vit.py`    model_type 'intern_vit_6b'
* `InternVLChatConfig`  InternVL `configuration_internvl_chat.py` model_type 'internvl_chat'
* `InternLM2Config`     InternVL `configuration_internlm2.py`     model_type 'internlm2'
* `Phi3Config`          InternVL `configuration_phi3.py`          model_type 'phi3'
* `MPTConfig`           InternVL's vendored llm-foundry MPT       model_type 'mpt'
* `LlamaConfig`, `Qwen2Config`  transformers 4.37.2 (the version InternVL pins)

Keys a class does not know are kept in `extra` and written back by `to_dict`, so
`from_dict(d).to_dict()` keeps every key of `d`. Every bad value raises `ConfigError` naming the
field, the value, what is allowed and, where there is one, the fix.

    cfg = load_config("InternVL2-2B/")          # picks the class from model_type
    cfg.llm_config.head_dim, cfg.num_image_token  # 128, 256
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from minivl._config_base import (_Config, _describe, _is_int, _is_number, _write_config_json,  # noqa: F401
                                 read_config_json)
from minivl.errors import ConfigError

__all__ = [
    "ConfigError",
    "InternVisionConfig",
    "InternLM2Config",
    "Phi3Config",
    "MPTConfig",
    "LlamaConfig",
    "Qwen2Config",
    "InternVLChatConfig",
    "CONFIG_CLASSES",
    "load_config",
    "read_config_json",
]

# ----------------------------------------------------------------------------------------------
# vision encoder
# ----------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class InternVisionConfig(_Config):
    """InternViT (300M and 6B), as InternVL's `InternVisionConfig`. Defaults are the 6B-224px ones."""

    model_type: ClassVar[str] = "intern_vit_6b"
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = True
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1

    def validate(self) -> None:
        for name in ("num_channels", "patch_size", "image_size", "hidden_size", "num_attention_heads",
                     "intermediate_size", "num_hidden_layers"):
            self._check_int(name)
        # head_dim = hidden_size / heads must be exact (the reference raises too)
        self._check_divides("hidden_size", "num_attention_heads")
        self._check_choice("norm_type", ("rms_norm", "layer_norm"))
        # minivl implements these activations (exact erf GELU is the reference's 'gelu')
        self._check_choice("hidden_act", ("gelu", "gelu_pytorch_tanh"))
        self._check_positive_number("layer_norm_eps")
        for name in ("dropout", "drop_path_rate", "attention_dropout"):
            self._check_probability(name)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_pretrained(cls, dir_or_file: str | os.PathLike) -> "InternVisionConfig":
        """Also accepts a chat checkpoint: its nested `vision_config` is used, as the reference does."""
        config_dict, path = read_config_json(dir_or_file)
        if isinstance(config_dict.get("vision_config"), dict):
            config_dict = config_dict["vision_config"]
        return cls._from_file_dict(config_dict, path)


# ----------------------------------------------------------------------------------------------
# decoder LLMs
# ----------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class _DecoderConfig(_Config):
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
        if not (isinstance(value, list) and all(_is_number(v) for v in value)):
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
class InternLM2Config(_DecoderConfig):
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
        if not isinstance(factor, float) or factor < 1.0:
            fix = f"write {float(factor)}" if _is_int(factor) and factor >= 1 else ""
            raise self._rope_error("factor", factor, "a float >= 1.0", fix)

    def rope_kwargs(self) -> dict:
        """default, ('linear', factor) or ('dynamic', factor): the model uses DynamicNTKRope for the last."""
        if self.rope_scaling is None:
            return self._rope_base("default")
        return self._rope_base(self.rope_scaling["type"], factor=self.rope_scaling["factor"])


@dataclass(kw_only=True)
class Phi3Config(_DecoderConfig):
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
        if "factor" in scaling and (not _is_number(scaling["factor"]) or scaling["factor"] < 1.0):
            raise self._rope_error("factor", scaling["factor"], "a number >= 1.0")
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
class LlamaConfig(_HFRopeScalingMixin, _DecoderConfig):
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
            if not isinstance(factor, float) or factor <= 1.0:
                fix = f"write {float(factor)}" if _is_int(factor) and factor > 1 else ""
                raise self._rope_error("factor", factor, "a float > 1.0", fix)
        else:
            self._check_newer_rope_scaling()

    def rope_kwargs(self) -> dict:
        if self.rope_scaling is None:
            return self._rope_base("default")
        return self._newer_rope_kwargs()


@dataclass(kw_only=True)
class Qwen2Config(_HFRopeScalingMixin, _DecoderConfig):
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


# ----------------------------------------------------------------------------------------------
# MPT (InternVL's vendored llm-foundry copy)
# ----------------------------------------------------------------------------------------------

MPT_ATTN_CONFIG_DEFAULTS = {
    "attn_type": "multihead_attention", "attn_pdrop": 0.0, "attn_impl": "triton", "qk_ln": False,
    "clip_qkv": None, "softmax_scale": None, "prefix_lm": False, "attn_uses_sequence_id": False,
    "alibi": False, "alibi_bias_max": 8,
}
MPT_INIT_CONFIG_DEFAULTS = {
    "name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu", "init_div_is_residual": True,
    "emb_init_std": None, "emb_init_uniform_lim": None, "init_std": None, "init_gain": 0.0,
}


@dataclass(kw_only=True)
class MPTConfig(_Config):
    """MPT, as the llm-foundry `MPTConfig` vendored in InternVL's LLaVA sub-project.

    `attn_config` / `init_config` keys missing from config.json are filled from the defaults,
    and `_validate_config`'s rules are applied. Position information comes from ALiBi
    (`attn_config["alibi"]`) or learned `wpe` embeddings (`learned_pos_emb`), never RoPE.
    The keys `name` and `loss_fn` are dropped, as the reference's `__init__` drops them.
    """

    model_type: ClassVar[str] = "mpt"
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: int = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = True
    attn_config: dict | None = None
    init_device: str = "cpu"
    logit_scale: float | str | None = None
    no_bias: bool = False
    verbose: int = 0
    embedding_fraction: float = 1.0
    norm_type: str = "low_precision_layernorm"
    use_cache: bool = False
    init_config: dict | None = None

    def validate(self) -> None:
        for dropped in ("name", "loss_fn"):
            self.extra.pop(dropped, None)
        for name in ("d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size"):
            self._check_int(name)
        for name, defaults in (("attn_config", MPT_ATTN_CONFIG_DEFAULTS), ("init_config", MPT_INIT_CONFIG_DEFAULTS)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise self._error(name, value, "a dict (or null for the defaults)")
            setattr(self, name, {**copy.deepcopy(defaults), **(value or {})})
        attn = self.attn_config
        self._check_divides("d_model", "n_heads")
        for name, value in (("attn_config.attn_pdrop", attn["attn_pdrop"]), ("resid_pdrop", self.resid_pdrop),
                            ("emb_pdrop", self.emb_pdrop)):
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise self._error(name, value, "a number in [0, 1]")
        if attn["attn_impl"] not in ("torch", "flash", "triton"):
            raise self._error("attn_config.attn_impl", attn["attn_impl"], "one of ['torch', 'flash', 'triton']")
        # MPT of this version has no grouped-query option
        if attn["attn_type"] not in ("multihead_attention", "multiquery_attention"):
            raise self._error("attn_config.attn_type", attn["attn_type"],
                              "one of ['multihead_attention', 'multiquery_attention']")
        for flag in ("prefix_lm", "alibi", "attn_uses_sequence_id"):
            if attn[flag] and attn["attn_impl"] not in ("torch", "triton"):
                raise self._error("attn_config.attn_impl", attn["attn_impl"], f"'torch' or 'triton' when "
                                  f"attn_config.{flag} is set", "flash attention builds no bias or prefix mask")
        if not _is_number(self.embedding_fraction) or not 0 < self.embedding_fraction <= 1:
            raise self._error("embedding_fraction", self.embedding_fraction, "a number in (0, 1]")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise self._error("logit_scale", self.logit_scale, "a number, null or 'inv_sqrt_d_model'")
        if self.init_config.get("name") is None:
            raise self._error("init_config.name", None, "an init function name such as 'kaiming_normal_'")
        if not self.learned_pos_emb and not attn["alibi"]:
            raise ConfigError("MPTConfig: positional information must come from learned_pos_emb=true or "
                              "attn_config.alibi=true (got both false); set one of them")
        self._check_choice("norm_type", ("layernorm", "low_precision_layernorm", "rmsnorm", "low_precision_rmsnorm"))

    @property
    def head_dim(self) -> int:
        """D = d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def num_key_value_heads(self) -> int:
        """1 for multi-query attention, n_heads for multi-head."""
        return 1 if self.attn_config["attn_type"] == "multiquery_attention" else self.n_heads

    def rope_kwargs(self) -> None:
        """MPT has no RoPE (ALiBi or learned positions): always None."""
        return None


# ----------------------------------------------------------------------------------------------
# the chat model: vision encoder + projector + LLM
# ----------------------------------------------------------------------------------------------

LLM_CONFIG_BY_ARCHITECTURE = {
    "LlamaForCausalLM": LlamaConfig,
    "InternLM2ForCausalLM": InternLM2Config,
    "Phi3ForCausalLM": Phi3Config,
    "Qwen2ForCausalLM": Qwen2Config,
}


@dataclass(kw_only=True)
class InternVLChatConfig(_Config):
    """InternVL 1.5 / 2 / 2.5 chat model, as InternVL's `InternVLChatConfig`.

    `llm_config["architectures"][0]` picks the LLM class (Llama, InternLM2, Phi3 or Qwen2);
    there is no default LLM: a config without llm_config is refused, as the reference refuses it.
    `tie_word_embeddings` is forced False on this config AND on llm_config, whatever config.json
    says, so the LM head is always its own tensor. `hidden_size` is llm_config's.
    """

    model_type: ClassVar[str] = "internvl_chat"
    vision_config: InternVisionConfig | dict | None = None
    llm_config: _DecoderConfig | dict | None = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    pad2square: bool = False
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    hidden_size: int | None = None
    tie_word_embeddings: bool = False

    def validate(self) -> None:
        if self.vision_config is None:
            self.vision_config = InternVisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = _nested("vision_config", InternVisionConfig, self.vision_config)
        elif not isinstance(self.vision_config, InternVisionConfig):
            raise self._error("vision_config", self.vision_config, "a dict or an InternVisionConfig")
        self.llm_config = self._build_llm_config(self.llm_config)
        # the reference overwrites both, whatever config.json says (CIC:77-79)
        self.tie_word_embeddings = False
        self.llm_config.tie_word_embeddings = False
        self.hidden_size = self.llm_config.hidden_size
        if not _is_number(self.downsample_ratio) or not 0 < self.downsample_ratio <= 1:
            raise self._error("downsample_ratio", self.downsample_ratio, "a number in (0, 1], e.g. 0.5")
        self._check_choice("ps_version", ("v1", "v2"), "all InternVL 1.5/2/2.5 releases use 'v2'")
        if self.force_image_size is not None:
            self._check_int("force_image_size")
        if not _is_int(self.select_layer):
            raise self._error("select_layer", self.select_layer, "an integer index into the ViT hidden states")
        for name in ("min_dynamic_patch", "max_dynamic_patch"):
            self._check_int(name)
        side = self.image_size // self.vision_config.patch_size
        # pixel shuffle folds (1/r)² neighbouring patches into one token: the grid must split evenly
        if (side * self.downsample_ratio) != int(side * self.downsample_ratio):
            raise ConfigError(f"InternVLChatConfig: the {side}x{side} patch grid of a {self.image_size}px tile "
                              f"cannot be pixel-shuffled by downsample_ratio {self.downsample_ratio}; "
                              f"change force_image_size or downsample_ratio")

    @staticmethod
    def _build_llm_config(llm_config):
        allowed = sorted(LLM_CONFIG_BY_ARCHITECTURE)
        if isinstance(llm_config, tuple(LLM_CONFIG_BY_ARCHITECTURE.values())):
            return llm_config
        if not isinstance(llm_config, dict):
            raise ConfigError(f"InternVLChatConfig: llm_config must be a dict whose architectures[0] is one of "
                              f"{allowed} (got {_describe(llm_config)})")
        architectures = llm_config.get("architectures") or [""]
        architecture = architectures[0] if isinstance(architectures, list) else architectures
        if architecture not in LLM_CONFIG_BY_ARCHITECTURE:
            raise ConfigError(f"InternVLChatConfig: llm_config.architectures[0] must be one of {allowed} "
                              f"(got {architecture!r}); minivl has no other LLM for InternVL")
        return _nested("llm_config", LLM_CONFIG_BY_ARCHITECTURE[architecture], llm_config)

    @property
    def image_size(self) -> int:
        """Tile side in pixels: force_image_size, else the ViT's native image_size."""
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens per tile: (image_size/patch_size)² patches, pixel-shuffled by downsample_ratio in each axis."""
        return int((self.image_size // self.vision_config.patch_size) ** 2 * (self.downsample_ratio ** 2))


def _nested(name: str, cls, config_dict: dict):
    """Build a nested config, prefixing its errors with where it sits."""
    try:
        return cls.from_dict(config_dict)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None


CONFIG_CLASSES = {cls.model_type: cls for cls in (InternVisionConfig, InternVLChatConfig, InternLM2Config,
                                                   Phi3Config, MPTConfig, LlamaConfig, Qwen2Config)}


def load_config(path_or_dict: str | os.PathLike | dict):
    """Build the config class named by `model_type`, from a dict, a config.json or a checkpoint directory."""
    if isinstance(path_or_dict, dict):
        config_dict, where = path_or_dict, "config dict"
    else:
        config_dict, where = read_config_json(path_or_dict)
    model_type = config_dict.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where}: no model_type key; minivl picks the config class from it "
                          f"(one of {sorted(CONFIG_CLASSES)})")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported; "
                          f"minivl knows {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[model_type]
    return cls.from_dict(config_dict) if isinstance(path_or_dict, dict) else cls._from_file_dict(config_dict, where)
