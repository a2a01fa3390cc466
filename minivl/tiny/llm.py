"""Tiny random decoder checkpoints in the exact layouts (key names, config.json fields) of real releases.

    path = write_tiny_llm(tmp_path / "qwen2", "qwen2")           # InternVL2-1B's Qwen2, shrunk
    path = write_tiny_llm(tmp_path / "phi3", "phi3", dtype="bfloat16", sliding_window=8)

Families and what they copy:

| family      | like                                   | structure kept                                        |
|-------------|----------------------------------------|-------------------------------------------------------|
| internlm2   | InternVL2-2B's internlm2-chat-1_8b     | fused wqkv grouped per KV head, GQA (G=2), bias false, dynamic NTK rope_scaling (float factor), theta 1e6, eps 1e-5 |
| phi3        | InternVL2-4B's Phi-3-mini-128k         | fused qkv_proj / gate_up_proj, head_dim 96 so the 'su' short/long factor lists have the real 48 entries, M/O = 32 as 131072/4096 |
| qwen2       | InternVL2-1B's Qwen2-0.5B              | q/k/v bias, GQA with an odd group (6 heads / 2 KV), theta 1e6, eps 1e-6, untied head |
| llama       | SmolLM2 (Llama architecture)           | GQA, theta 1e5, tied embeddings (no lm_head.weight)    |
| mpt_alibi   | MPT-7B                                 | fused Wqkv, ALiBi, no_bias (no bias anywhere, LayerNorms included), tied unembedding |
| mpt_learned | llm-foundry MPT with learned positions | wpe table, biases, qk_ln                              |

Weights are random (seeded): embeddings N(0, 0.3²), projections N(0, 1/in), norm weights 1 + N(0, 0.1²),
biases N(0, 0.1²), scaled so logits have O(1) spread and greedy decoding makes varied choices.
Every config field can be overridden by keyword (nested `attn_config` keys are merged).
"""
from __future__ import annotations

import copy
import os

import numpy as np

FAMILIES = ("internlm2", "phi3", "qwen2", "llama", "mpt_alibi", "mpt_learned")

# the 48 (= head_dim/2) LongRoPE factors, shaped like Phi-3-mini-128k's: short ~1, long rising to ~60
_PHI3_SHORT = [round(1.0 + 0.05 * (j / 47) ** 2, 4) for j in range(48)]
_PHI3_LONG = [round(1.0 + 59.0 * (j / 47) ** 3, 4) for j in range(48)]

_CONFIGS = {
    "internlm2": {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2", "attn_implementation": "eager", "bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 48,
        "initializer_range": 0.02, "rms_norm_eps": 1e-5,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1000000,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": 300,
        "transformers_version": "4.37.2",
    },
    "phi3": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 32000 % 300, "pad_token_id": 32000 % 300,
        "embd_pdrop": 0.0, "hidden_act": "silu", "hidden_size": 192, "intermediate_size": 128,
        "initializer_range": 0.02, "max_position_embeddings": 1024, "original_max_position_embeddings": 32,
        "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"type": "su", "short_factor": _PHI3_SHORT, "long_factor": _PHI3_LONG},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "use_cache": True,
        "vocab_size": 300, "transformers_version": "4.40.2",
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": 151643 % 300, "eos_token_id": 151645 % 300, "hidden_act": "silu",
        "hidden_size": 96, "intermediate_size": 160, "initializer_range": 0.02,
        "max_position_embeddings": 128, "max_window_layers": 24, "num_attention_heads": 6,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": 131072, "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
        "vocab_size": 300, "transformers_version": "4.37.2",
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 128, "initializer_range": 0.041666666666666664,
        "max_position_embeddings": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "rope_theta": 100000.0, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 300,
        "transformers_version": "4.42.3",
    },
    "mpt_alibi": {
        "architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2,
        "expansion_ratio": 4, "max_seq_len": 64, "vocab_size": 300, "resid_pdrop": 0.0, "emb_pdrop": 0.0,
        "learned_pos_emb": False, "no_bias": True, "logit_scale": None, "norm_type": "low_precision_layernorm",
        "embedding_fraction": 1.0, "init_device": "cpu", "use_cache": False, "verbose": 0,
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0.0,
                        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                        "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
        "transformers_version": "4.28.1",
    },
}
# llm-foundry's learned-position MPT: the same sizes with a wpe table, biases and qk_ln
_CONFIGS["mpt_learned"] = {**_CONFIGS["mpt_alibi"], "learned_pos_emb": True, "no_bias": False,
                           "attn_config": {**_CONFIGS["mpt_alibi"]["attn_config"], "alibi": False, "qk_ln": True}}


def tiny_llm_config(family: str, **overrides) -> dict:
    """The config.json dict of a tiny `family` checkpoint, with overrides (attn_config merged)."""
    if family not in _CONFIGS:
        from minivl.errors import ConfigError

        raise ConfigError(f"write_tiny_llm: family must be one of {list(FAMILIES)}, got {family!r}")
    config = copy.deepcopy(_CONFIGS[family])
    for key, value in overrides.items():
        if key == "attn_config" and isinstance(value, dict):
            config["attn_config"].update(value)
        else:
            config[key] = value
    return config


def write_tiny_llm(directory, family: str, dtype: str = "float32", seed: int = 0, max_shard_bytes=None,
                   **config_overrides) -> str:
    """Write config.json + model.safetensors of a tiny random `family` model; returns the directory.

    dtype: float32 | float64 | bfloat16 | float16 (the stored tensors' dtype, also torch_dtype).
    """
    from minivl.auto_map import write_auto_map_modules
    from minivl.checkpoint import save_checkpoint
    from minivl.config import load_config

    config_dict = tiny_llm_config(family, **config_overrides)
    config_dict["torch_dtype"] = dtype
    config = load_config(config_dict)
    rng = np.random.default_rng(seed)
    shapes = _expected_shapes(config)
    tensors = {name: _init_tensor(rng, name, shape) for name, shape in shapes.items()}
    tensors = {name: _cast(t, dtype) for name, t in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    save_checkpoint(directory, config, tensors, max_shard_bytes=max_shard_bytes)
    write_auto_map_modules(directory)  # the .py files InternLM2's auto_map names (minivl/auto_map.py)
    return os.fspath(directory)


def _expected_shapes(config) -> dict:
    from minivl.loading import resolve_class
    from minivl.models import MODEL_REGISTRY

    return resolve_class(MODEL_REGISTRY, config.model_type).expected_shapes(config)


def _init_tensor(rng, name: str, shape: tuple) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(part in name for part in ("norm", "_ln", "ln_"))
    if leaf == "bias":
        return rng.normal(0.0, 0.1, shape)
    if is_norm:
        return 1.0 + rng.normal(0.0, 0.1, shape)
    if name.endswith(("embed_tokens.weight", "tok_embeddings.weight", "wpe.weight", "wte.weight")):
        # 0.3, not 1: a tied head unembeds with this table, and a larger spread makes every token
        # predict itself (logit |e|²); the norms rescale the residual stream anyway
        return rng.normal(0.0, 0.3, shape)
    # projections [out, in]: N(0, 1/in) keeps activations O(1) through the residual stream
    return rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), shape)


def _cast(tensor: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return tensor.astype(np.float32).astype(ml_dtypes.bfloat16)
    if dtype not in ("float32", "float64", "float16"):
        from minivl.errors import ConfigError

        raise ConfigError(f"write_tiny_llm: dtype must be float32, float64, bfloat16 or float16, got {dtype!r}")
    return tensor.astype(dtype)
