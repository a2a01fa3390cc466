"""InternVL chat config, as InternVL's `InternVLChatConfig` (configuration_internvl_chat.py).

Import it from `minivl.config`. It nests an `InternVisionConfig` and one decoder config, picked by
`llm_config["architectures"][0]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from minivl.config.base import BaseConfig, describe, is_int, is_number
from minivl.config.decoders import DecoderConfig, InternLM2Config, LlamaConfig, Phi3Config, Qwen2Config
from minivl.config.vision import InternVisionConfig, check_tile_size
from minivl.errors import ConfigError
from minivl.pixel_shuffle import merge_factor, num_image_token

LLM_CONFIG_BY_ARCHITECTURE = {
    "LlamaForCausalLM": LlamaConfig,
    "InternLM2ForCausalLM": InternLM2Config,
    "Phi3ForCausalLM": Phi3Config,
    "Qwen2ForCausalLM": Qwen2Config,
}


@dataclass(kw_only=True)
class InternVLChatConfig(BaseConfig):
    """InternVL 1.5 / 2 / 2.5 chat model, as InternVL's `InternVLChatConfig`.

    `llm_config["architectures"][0]` picks the LLM class (Llama, InternLM2, Phi3 or Qwen2);
    there is no default LLM: a config without llm_config is refused, as the reference refuses it.
    `tie_word_embeddings` is forced False on this config AND on llm_config, whatever config.json
    says, so the LM head is always its own tensor. `hidden_size` is llm_config's.
    """

    model_type: ClassVar[str] = "internvl_chat"
    vision_config: InternVisionConfig | dict | None = None
    llm_config: DecoderConfig | dict | None = None
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
            self.vision_config = nested_config("vision_config", InternVisionConfig, self.vision_config)
        elif not isinstance(self.vision_config, InternVisionConfig):
            raise self._error("vision_config", self.vision_config, "a dict or an InternVisionConfig")
        self.llm_config = self._build_llm_config(self.llm_config)
        # the reference overwrites both, whatever config.json says (CIC:77-79)
        self.tie_word_embeddings = False
        self.llm_config.tie_word_embeddings = False
        self.hidden_size = self.llm_config.hidden_size
        if not is_number(self.downsample_ratio) or not 0 < self.downsample_ratio <= 1:
            raise self._error("downsample_ratio", self.downsample_ratio, "a number in (0, 1], e.g. 0.5")
        self._check_choice("ps_version", ("v1", "v2"), "all InternVL 1.5/2/2.5 releases use 'v2'")
        if self.force_image_size is not None:
            self._check_int("force_image_size")
            check_tile_size(type(self).__name__, "force_image_size", self.force_image_size,
                            self.vision_config.patch_size)
        self._check_select_layer()
        for name in ("min_dynamic_patch", "max_dynamic_patch"):
            self._check_int(name)
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ConfigError(f"InternVLChatConfig: min_dynamic_patch ({self.min_dynamic_patch}) must be <= "
                              f"max_dynamic_patch ({self.max_dynamic_patch}), or no tile grid qualifies; "
                              f"swap them or lower min_dynamic_patch")
        self._check_token_grid()

    def _check_select_layer(self) -> None:
        """select_layer indexes the ViT's L+1 hidden states (embeddings, then layer 1…L), so -(L+1) … L."""
        if not is_int(self.select_layer):
            raise self._error("select_layer", self.select_layer, "an integer index into the ViT hidden states")
        layers = self.vision_config.num_hidden_layers
        if not -(layers + 1) <= self.select_layer <= layers:
            raise ConfigError(f"InternVLChatConfig: select_layer ({self.select_layer}) is deeper than the ViT: "
                              f"vision_config.num_hidden_layers is {layers}, so select_layer must be in "
                              f"[{-(layers + 1)}, {layers}]; use -1 for the last layer or fix num_hidden_layers")

    def _check_token_grid(self) -> None:
        """Pixel shuffle folds r×r patches (r = 1/downsample_ratio) into one token: r must divide the grid."""
        patch_size = self.vision_config.patch_size
        side = self.image_size // patch_size
        try:
            factor = merge_factor(self.downsample_ratio)
        except ConfigError:
            factor = None
        merge_factors = _merge_factors(self.image_size, patch_size)
        # the count check again with the ratio as written: 1/r within merge_factor's 1e-9 may still round apart
        if factor not in merge_factors or self.num_image_token != (side // factor) ** 2:
            allowed = ", ".join(f"{1 / r:g}" for r in merge_factors)
            raise ConfigError(f"InternVLChatConfig: the {side}x{side} patch grid of a {self.image_size}px tile "
                              f"cannot be pixel-shuffled by downsample_ratio {self.downsample_ratio}: it must be "
                              f"1/r for a whole number r dividing {side} (here one of {allowed}); change "
                              f"force_image_size or downsample_ratio")

    @staticmethod
    def _build_llm_config(llm_config):
        allowed = sorted(LLM_CONFIG_BY_ARCHITECTURE)
        if isinstance(llm_config, tuple(LLM_CONFIG_BY_ARCHITECTURE.values())):
            return llm_config
        if not isinstance(llm_config, dict):
            raise ConfigError(f"InternVLChatConfig: llm_config must be a dict whose architectures[0] is one of "
                              f"{allowed} (got {describe(llm_config)})")
        architectures = llm_config.get("architectures") or [""]
        architecture = architectures[0] if isinstance(architectures, list) else architectures
        if architecture not in LLM_CONFIG_BY_ARCHITECTURE:
            raise ConfigError(f"InternVLChatConfig: llm_config.architectures[0] must be one of {allowed} "
                              f"(got {architecture!r}); minivl has no other LLM for InternVL")
        return nested_config("llm_config", LLM_CONFIG_BY_ARCHITECTURE[architecture], llm_config)

    @property
    def image_size(self) -> int:
        """Tile side in pixels: force_image_size, else the ViT's native image_size."""
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens per tile: (image_size/patch_size)² patches, pixel-shuffled by downsample_ratio in each axis."""
        return num_image_token(self.image_size, self.vision_config.patch_size, self.downsample_ratio)


def _merge_factors(image_size: int, patch_size: int) -> list[int]:
    """Merge factors r that split the tile's side×side patch grid into whole r×r blocks AND that the
    reference counts right: its int(side²·(1/r)²) tokens per tile (num_image_token) is one short
    for some r after float rounding (28 patches, r = 7: 15, not 16), so prompt and features differ."""
    side = image_size // patch_size
    return [r for r in range(1, side + 1)
            if side % r == 0 and num_image_token(image_size, patch_size, 1 / r) == (side // r) ** 2]


def nested_config(name: str, cls, config_dict: dict):
    """Build a nested config, prefixing its errors with where it sits."""
    try:
        return cls.from_dict(config_dict)
    except ConfigError as err:
        raise ConfigError(f"{name}: {err}") from None
