"""InternViT config, as InternVL's `InternVisionConfig` (configuration_intern_vit.py).

Import it from `minivl.config`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from minivl.config.base import BaseConfig, read_config_json
from minivl.errors import ConfigError


@dataclass(kw_only=True)
class InternVisionConfig(BaseConfig):
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
        # the position table has (image_size / patch_size)² patch rows: a remainder would be cut off
        check_tile_size(type(self).__name__, "image_size", self.image_size, self.patch_size)
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


def check_tile_size(owner: str, name: str, image_size: int, patch_size: int) -> None:
    """A tile side must be a whole number of patches: the patch conv would silently drop the rest."""
    if image_size % patch_size:
        lower, upper = image_size // patch_size * patch_size, (image_size // patch_size + 1) * patch_size
        raise ConfigError(f"{owner}: {name} ({image_size}) must be a multiple of vision_config.patch_size "
                          f"({patch_size}); use {lower or patch_size} or {upper}")
