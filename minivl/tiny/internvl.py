"""Tiny random InternVL chat checkpoints in the exact layouts of the InternVL2 releases (for tests and lessons).

    path = write_tiny_internvl(tmp_path / "vl", llm="qwen2")              # like InternVL2-1B
    path = write_tiny_internvl(tmp_path / "vl", llm="internlm2")          # like InternVL2-2B
    path = write_tiny_internvl(tmp_path / "vl", llm="phi3")               # like InternVL2-4B
    path = write_tiny_internvl(tmp_path / "vl", llm="internlm2", vision="6b")   # like InternVL2-26B

| llm       | vision (default) | template       | released model it copies          |
|-----------|------------------|----------------|-----------------------------------|
| qwen2     | 300m             | Hermes-2       | InternVL2-1B (Qwen2-0.5B)         |
| internlm2 | 300m             | internlm2-chat | InternVL2-2B (internlm2-chat-1.8b) |
| phi3      | 300m             | phi3-chat      | InternVL2-4B (Phi-3-mini-128k)    |

The directory holds config.json (the real InternVLChatConfig fields: template, ps_version 'v2',
downsample_ratio 0.5, select_layer -1, force_image_size, dynamic tiling settings, nested
vision_config / llm_config), model.safetensors with `vision_model.*`, `mlp1.*`, `language_model.*`,
and a tokenizer (tokenizer.json + tokenizer_config.json). Tiles are 56 px (patch 14 -> a 4×4
grid -> 4 image tokens per tile after the 0.5 pixel shuffle), so a test runs in milliseconds.

The real InternVL tokenizers cannot be downloaded here, so the tokenizer is a tiny byte-level
BPE (every UTF-8 byte a token, no merges) with the special tokens of all four templates and the
nine tokens InternVL adds, at the END of the vocabulary as in the releases (`<img>` = V0,
`</img>` = V0+1, `<IMG_CONTEXT>` = V0+2).
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from minivl.conversation import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from minivl.errors import ConfigError
from minivl.tiny.vision import DTYPES

# ids 0..9: the base tokenizer's control tokens (a union of the InternLM2 / Qwen2 / Phi-3 ones)
BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                       "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# added by InternVL's fine-tuning script, in this order, after the base vocabulary (spec 6.6)
INTERNVL_SPECIAL_TOKENS = [IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, "<quad>", "</quad>",
                           "<ref>", "</ref>", "<box>", "</box>"]

LLM_SETTINGS = {
    # template, tokenizer roles (bos / eos / pad), whether the tokenizer prepends <s>
    "qwen2": dict(template="Hermes-2", bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False),
    "internlm2": dict(template="internlm2-chat", bos="<s>", eos="</s>", pad="</s>", add_bos=True),
    "phi3": dict(template="phi3-chat", bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", add_bos=True),
}
VISION_FLAVOURS = ("300m", "6b")


def tiny_internvl_vocab() -> list[str]:
    """Token strings in id order: control tokens, the 256 byte symbols, then InternVL's nine tokens."""
    from tokenizers import pre_tokenizers

    return BASE_SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()) + INTERNVL_SPECIAL_TOKENS


def build_tiny_tokenizer():
    """A byte-level BPE `tokenizers.Tokenizer` with no merges and the InternVL special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tiny_internvl_vocab())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in BASE_SPECIAL_TOKENS + INTERNVL_SPECIAL_TOKENS])
    return tokenizer


def write_tiny_tokenizer(directory, llm: str = "qwen2") -> str:
    """tokenizer.json + tokenizer_config.json (roles and add_bos_token of the `llm` family) into directory."""
    settings = LLM_SETTINGS[llm]
    os.makedirs(directory, exist_ok=True)
    build_tiny_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    config = {"bos_token": settings["bos"], "eos_token": settings["eos"], "pad_token": settings["pad"],
              "unk_token": "<unk>", "add_bos_token": settings["add_bos"], "add_eos_token": False,
              "padding_side": "left", "additional_special_tokens": INTERNVL_SPECIAL_TOKENS,
              "model_max_length": 8192}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return os.fspath(directory)


def tiny_internvl_config(llm: str = "qwen2", vision: str = "300m", image_size: int = 56, template=None,
                         **overrides) -> dict:
    """The config.json dict of a tiny InternVL chat checkpoint (nested vision_config and llm_config)."""
    from minivl.tiny.llm import tiny_llm_config
    from minivl.tiny.vision import tiny_vit_config

    if llm not in LLM_SETTINGS:
        raise ConfigError(f"write_tiny_internvl: llm must be one of {sorted(LLM_SETTINGS)}, got {llm!r}")
    if vision not in VISION_FLAVOURS:
        raise ConfigError(f"write_tiny_internvl: vision must be one of {list(VISION_FLAVOURS)}, got {vision!r}")
    settings = LLM_SETTINGS[llm]
    vocab = tiny_internvl_vocab()
    ids = {token: i for i, token in enumerate(vocab)}
    # the LLM's special-token ids follow the tokenizer; the vocabulary is resized to len(tokenizer)
    # as InternVL's fine-tuning does; 512 positions hold the byte-level prompt with its system message
    llm_config = tiny_llm_config(llm, vocab_size=len(vocab), bos_token_id=ids.get(settings["bos"]),
                                 eos_token_id=ids[settings["eos"]], pad_token_id=ids[settings["pad"]],
                                 **({"max_position_embeddings": 512} if llm != "phi3" else {}))
    vision_config = tiny_vit_config(vision, image_size=image_size).to_dict()
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": image_size,
        "llm_config": llm_config,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": template or settings["template"],
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": vision_config,
        "transformers_version": "4.37.2",
    }
    config.update(overrides)
    return config


def write_tiny_internvl(directory, llm: str = "qwen2", vision: str = "300m", dtype: str = "float32", seed: int = 0,
                        image_size: int = 56, template=None, **overrides) -> str:
    """Write a tiny random InternVL chat checkpoint (config, weights, tokenizer); returns the directory.

    dtype: float32 | float64 | bfloat16 | float16 (the stored tensors, also torch_dtype).
    overrides: top-level config.json keys (e.g. select_layer=-2, ps_version='v1', system_message='...').
    """
    from minivl.auto_map import write_auto_map_modules
    from minivl.checkpoint import load_state_dict, save_checkpoint
    from minivl.config import InternVLChatConfig
    from minivl.projector import mlp1_expected_shapes
    from minivl.tiny.llm import write_tiny_llm
    from minivl.tiny.vision import tiny_vit_tensors

    if dtype not in DTYPES:
        raise ConfigError(f"write_tiny_internvl: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    config_dict = tiny_internvl_config(llm, vision, image_size, template, torch_dtype=dtype, **overrides)
    config = InternVLChatConfig.from_dict(config_dict)
    rng = np.random.default_rng(seed)

    tensors = {"vision_model." + name: t for name, t in tiny_vit_tensors(config.vision_config, seed).items()}
    for name, shape in mlp1_expected_shapes(config.vision_config.hidden_size, config.downsample_ratio,
                                            config.llm_config.hidden_size).items():
        if name.startswith("mlp1.0."):      # LayerNorm: weight ~1, bias ~0
            tensors[name] = (1.0 if name.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            tensors[name] = 0.1 * rng.standard_normal(shape)
        else:                               # Linear [out, in]: N(0, 1/in) keeps the image tokens O(1)
            tensors[name] = rng.standard_normal(shape) / np.sqrt(shape[1])
    # the LLM: the decoder helper's tiny family, written in float64 and read back (no rounding)
    llm_overrides = {k: v for k, v in config_dict["llm_config"].items()}
    family = llm_overrides.pop("model_type")
    with tempfile.TemporaryDirectory() as scratch:
        write_tiny_llm(scratch, family, dtype="float64", seed=seed + 1, **llm_overrides)
        tensors.update({"language_model." + name: t for name, t in load_state_dict(scratch).items()})

    tensors = {name: _cast(np.asarray(t, dtype=np.float64), dtype) for name, t in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    save_checkpoint(directory, config, tensors)
    write_tiny_tokenizer(directory, llm)
    write_auto_map_modules(directory)  # the .py files the auto_map names (minivl/auto_map.py)
    return os.fspath(directory)


def _cast(tensor: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return tensor.astype(np.float32).astype(ml_dtypes.bfloat16)
    return tensor.astype(dtype)
