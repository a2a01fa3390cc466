"""Tiny random InternViT checkpoints in the exact key layout and config.json of the real releases.

    write_tiny_vit(dir, flavour="300m")   # LayerNorm, qkv bias, no qk-norm (InternViT-300M-448px)
    write_tiny_vit(dir, flavour="6b")     # RMSNorm, qk-norm, no qkv bias   (InternViT-6B-448px)

Only the sizes are small. The 6B flavour uses head_dim 12 so that head_dim^-½ is not a power of
two and the reference's "scale q first" order is actually exercised (pitfall 7). Weights are drawn
with std 1/sqrt(fan_in) and layer scales of about max(initializer_factor, 0.5), so every layer
changes the residual stream visibly and a wrong component cannot hide.
"""
from __future__ import annotations

import os

import numpy as np

from minivl.config import InternVisionConfig
from minivl.errors import ConfigError

FLAVOURS = {
    # released InternViT-300M-448px: layer_norm, qkv_bias, no qk-norm, ls init 1.0 (spec 8.3)
    "300m": dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=3,
                 norm_type="layer_norm", qkv_bias=True, qk_normalization=False, initializer_factor=1.0),
    # released InternViT-6B-448px: rms_norm, qk-norm, no qkv bias, ls init 0.1
    "6b": dict(hidden_size=72, num_attention_heads=6, intermediate_size=288, num_hidden_layers=3,
               norm_type="rms_norm", qkv_bias=False, qk_normalization=True, initializer_factor=0.1),
}
DTYPES = ("float32", "float64", "bfloat16", "float16")


def tiny_vit_config(flavour: str = "300m", image_size: int = 56, **overrides) -> InternVisionConfig:
    """The InternVisionConfig of a tiny model of one flavour (patch 14; image_size 56 = a 4×4 grid)."""
    if flavour not in FLAVOURS:
        raise ConfigError(f"flavour must be one of {list(FLAVOURS)}, got {flavour!r}")
    fields = dict(FLAVOURS[flavour], patch_size=14, image_size=image_size, hidden_act="gelu",
                  layer_norm_eps=1e-6, use_flash_attn=False, architectures=["InternVisionModel"])
    fields.update(overrides)
    return InternVisionConfig.from_dict(fields)


def tiny_vit_tensors(config: InternVisionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float64 tensors for every key of InternVisionModel.expected_shapes(config)."""
    from minivl.models.intern_vit import InternVisionModel

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in InternVisionModel.expected_shapes(config).items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("ls1", "ls2")):
            # layer scale per channel, at least 0.5: the 6B's 0.1 init would hide a wrong branch
            value = max(config.initializer_factor, 0.5) * (1.0 + 0.2 * rng.standard_normal(shape))
        elif "norm" in name and leaf == "weight":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif leaf == "bias":
            value = 0.1 * rng.standard_normal(shape)
        elif name == "embeddings.patch_embedding.weight":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif name.startswith("embeddings."):
            value = 0.5 * rng.standard_normal(shape)  # class token and position table
        else:  # Linear weights [out, in]
            value = rng.standard_normal(shape) / np.sqrt(shape[1])
        tensors[name] = value
    return tensors


def write_tiny_vit(directory, flavour: str = "300m", dtype: str = "float32", seed: int = 0,
                   image_size: int = 56, **overrides) -> str:
    """Write config.json + model.safetensors of a tiny random InternViT; returns the directory."""
    from minivl.checkpoint import save_checkpoint

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    config = tiny_vit_config(flavour, image_size=image_size, torch_dtype=dtype, **overrides)
    tensors = tiny_vit_tensors(config, seed)
    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        np_dtype = np.dtype(dtype)
    tensors = {name: value.astype(np_dtype) for name, value in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    save_checkpoint(directory, config, tensors)
    return os.fspath(directory)
