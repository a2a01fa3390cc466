"""MPT config, as the llm-foundry `MPTConfig` vendored in InternVL's LLaVA sub-project.

Import it from `minivl.config`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from minivl.config.base import BaseConfig, is_number
from minivl.errors import ConfigError


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
class MPTConfig(BaseConfig):
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
            if not is_number(value) or not 0.0 <= value <= 1.0:
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
        if not is_number(self.embedding_fraction) or not 0 < self.embedding_fraction <= 1:
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
