"""Model configs: dataclasses whose field names ARE the keys of a checkpoint's config.json.

Each class follows one reference config class, with its defaults and its validation:

* `InternVisionConfig`  InternVL `configuration_intern_vit.py`    model_type 'intern_vit_6b'  (vision.py)
* `InternVLChatConfig`  InternVL `configuration_internvl_chat.py` model_type 'internvl_chat'  (chat.py)
* `InternLM2Config`     InternVL `configuration_internlm2.py`     model_type 'internlm2'  (decoders.py)
* `Phi3Config`          InternVL `configuration_phi3.py`          model_type 'phi3'       (decoders.py)
* `LlamaConfig`, `Qwen2Config`  transformers 4.37.2, the version InternVL pins   (decoders.py)
* `MPTConfig`           InternVL's vendored llm-foundry MPT       model_type 'mpt'        (mpt.py)

`base.py` holds what they share (`BaseConfig`): from_dict / to_dict / from_pretrained / save_pretrained.

Keys a class does not know are kept in `extra` and written back by `to_dict`, so
`from_dict(d).to_dict()` keeps every key of `d`. Every bad value raises `ConfigError` naming the
field, the value, what is allowed and, where there is one, the fix.

    cfg = load_config("InternVL2-2B/")          # picks the class from model_type
    cfg.llm_config.head_dim, cfg.num_image_token  # 128, 256
"""
from __future__ import annotations

import os

from minivl.config.base import BaseConfig, read_config_json
from minivl.config.chat import LLM_CONFIG_BY_ARCHITECTURE, InternVLChatConfig
from minivl.config.decoders import DecoderConfig, InternLM2Config, LlamaConfig, Phi3Config, Qwen2Config
from minivl.config.mpt import MPTConfig
from minivl.config.vision import InternVisionConfig
from minivl.errors import ConfigError

__all__ = [
    "ConfigError",
    "BaseConfig",
    "DecoderConfig",
    "InternVisionConfig",
    "InternLM2Config",
    "Phi3Config",
    "MPTConfig",
    "LlamaConfig",
    "Qwen2Config",
    "InternVLChatConfig",
    "LLM_CONFIG_BY_ARCHITECTURE",
    "CONFIG_CLASSES",
    "load_config",
    "read_config_json",
]

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
