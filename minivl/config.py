"""Model configs: dataclasses whose field names ARE the keys of a checkpoint's config.json.

Each class follows one reference config class, with its defaults and its validation:

* `InternVisionConfig`  InternVL `configuration_intern_vit.py`    model_type 'intern_vit_6b'  (here)
* `InternVLChatConfig`  InternVL `configuration_internvl_chat.py` model_type 'internvl_chat'  (here)
* `InternLM2Config`     InternVL `configuration_internlm2.py`     model_type 'internlm2'  (_config_llm.py)
* `Phi3Config`          InternVL `configuration_phi3.py`          model_type 'phi3'       (_config_llm.py)
* `LlamaConfig`, `Qwen2Config`  transformers 4.37.2, the version InternVL pins   (_config_llm.py)
* `MPTConfig`           InternVL's vendored llm-foundry MPT       model_type 'mpt'        (_config_mpt.py)

`_config_base.py` holds what they share: from_dict / to_dict / from_pretrained / save_pretrained.

Keys a class does not know are kept in `extra` and written back by `to_dict`, so
`from_dict(d).to_dict()` keeps every key of `d`. Every bad value raises `ConfigError` naming the
field, the value, what is allowed and, where there is one, the fix.

    cfg = load_config("InternVL2-2B/")          # picks the class from model_type
    cfg.llm_config.head_dim, cfg.num_image_token  # 128, 256
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from minivl._config_base import _Config, _describe, _is_int, _is_number, read_config_json
from minivl._config_llm import InternLM2Config, LlamaConfig, Phi3Config, Qwen2Config, _DecoderConfig
from minivl._config_mpt import MPTConfig
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
