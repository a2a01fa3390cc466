"""InternViT, the vision encoder of InternVL (InternVL `modeling_intern_vit.py`), in NumPy.

A pre-norm ViT (Dosovitskiy et al., 2021) with CaiT-style layer scale (Touvron et al., 2021):

    x₀ = [cls ; patches(pixel_values)] + position_table            (embeddings)
    h  = x + ls1 · attn(norm1(x))                                   (each of L layers)
    x' = h + ls2 · mlp(norm2(h))
    last_hidden_state = x_L                                         (NO final norm)

Two flavours share this file (spec 8.3):

* 300M (InternViT-300M-448px, InternVL2-1B…8B): LayerNorm blocks, qkv bias, no qk-norm;
* 6B (InternViT-6B-448px, InternVL2-26B…): RMSNorm blocks, no qkv bias, qk-norm = ONE RMSNorm
  over all C = heads·head_dim channels of q (and of k), not one per head (pitfall 2).

Reference orderings kept on purpose: q is multiplied by head_dim^-½ BEFORE q·kᵀ (pitfall 7); the
softmax runs in the model dtype (no float32 upcast, pitfall 8); each pre-norm output is cast back
to the residual dtype; the position table is resized with torch's bicubic keyed to
`config.image_size` (minivl/interpolate.py, pitfalls 19-20) and the cls position is never resized.
`hidden_states[0]` is the embedding output, so `hidden_states[i]` is the output of layer i (pitfall 6).

DINOv2 checkpoints converted by minivl/weights/dinov2.py carry one labelled extra, a final
LayerNorm (`final_norm.weight/bias`, config key `final_norm`); it is applied only when
`forward(..., apply_final_norm=True)` asks for it, because InternViT itself has none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minivl.attention import scaled_dot_product_attention
from minivl.config import InternVisionConfig
from minivl.errors import CheckpointError, ConfigError, ShapeError
from minivl.interpolate import interpolate_bicubic
from minivl.linear import linear
from minivl.mlp import gelu_mlp
from minivl.norms import layer_norm, rms_norm

# prefix of the vision tower inside an InternVL chat checkpoint (spec 8.1)
VISION_PREFIX = "vision_model."
# config.json key of the DINOv2 extra; its value describes the norm (see minivl/weights/dinov2.py)
FINAL_NORM_KEY = "final_norm"


@dataclass
class VisionOutput:
    """What InternVisionModel.forward returns (the reference's BaseModelOutputWithPooling).

    last_hidden_state [b, 1+n, C]; pooler_output [b, C] (the cls token of it);
    hidden_states: L+1 arrays [b, 1+n, C] (embeddings, then each layer) or None;
    attentions: L arrays [b, heads, 1+n, 1+n] of softmax probabilities or None.
    """

    last_hidden_state: np.ndarray
    pooler_output: np.ndarray
    hidden_states: tuple | None = None
    attentions: tuple | None = None


# ----------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------

def patch_embed(pixel_values: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The stride-p p×p patch convolution, written as one matmul over flattened patches.

    A Conv2d whose kernel equals its stride sees each non-overlapping patch exactly once, so it is
    `linear(patch_vector, weight.reshape(C, 3·p·p))` with patches in row-major order.
    [b, 3, H, W], [C, 3, p, p], [C] -> [b, (H/p)·(W/p), C]
    """
    b, channels, height, width = pixel_values.shape
    hidden, _, p, _ = weight.shape
    h, w = height // p, width // p
    # [b, 3, h, p, w, p] -> [b, h, w, 3, p, p]: one row per patch, features in the conv's (c, y, x) order
    patches = pixel_values.reshape(b, channels, h, p, w, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, h * w, channels * p * p)
    return linear(patches, weight.reshape(hidden, channels * p * p), bias)


def resize_position_table(position_embedding: np.ndarray, grid: int, h: int, w: int) -> np.ndarray:
    """The patch part of the position table resized to an h×w grid (InternVL `_get_pos_embed`).

    Bicubic with torch's semantics, computed in promote(dtype, float32), cast back.
    [1, grid², C] -> [1, h·w, C]
    """
    _, n, hidden = position_embedding.shape
    if n != grid * grid:
        raise ShapeError(f"position table has {n} patch rows but config image_size/patch_size gives a "
                         f"{grid}×{grid} grid ({grid * grid} rows); fix image_size in config.json")
    if (h, w) == (grid, grid):
        return position_embedding  # scale 1: torch's bicubic is an exact identity here
    compute = np.promote_types(position_embedding.dtype, np.float32)
    # [1, g², C] -> [1, g, g, C] -> [1, C, g, g], the layout F.interpolate resizes
    table = position_embedding.astype(compute).reshape(1, grid, grid, hidden).transpose(0, 3, 1, 2)
    table = interpolate_bicubic(table, (h, w))
    # [1, C, h, w] -> [1, C, h·w] -> [1, h·w, C]
    return table.reshape(1, hidden, h * w).transpose(0, 2, 1).astype(position_embedding.dtype)


def vision_embeddings(pixel_values: np.ndarray, params: dict, config: InternVisionConfig) -> np.ndarray:
    """Class token + patch tokens + position table (InternVL `InternVisionEmbeddings`).

    [b, 3, H, W] -> [b, 1 + (H/p)·(W/p), C]
    """
    weight = params["embeddings.patch_embedding.weight"]
    p = config.patch_size
    patches = patch_embed(pixel_values, weight, params["embeddings.patch_embedding.bias"])
    b = pixel_values.shape[0]
    h, w = pixel_values.shape[2] // p, pixel_values.shape[3] // p
    cls = np.broadcast_to(params["embeddings.class_embedding"], (b, 1, weight.shape[0]))
    tokens = np.concatenate([cls.astype(weight.dtype), patches], axis=1)
    position = params["embeddings.position_embedding"]
    # the cls position (row 0) is never interpolated; rows 1… are resized to the input grid
    table = np.concatenate([position[:, :1], resize_position_table(position[:, 1:], config.image_size // p, h, w)],
                           axis=1)
    return tokens + table.astype(weight.dtype)


# ----------------------------------------------------------------------------------------------
# one encoder layer
# ----------------------------------------------------------------------------------------------

def intern_attention(x: np.ndarray, layer: dict, config: InternVisionConfig, output_attentions: bool = False):
    """Bidirectional multi-head self-attention with fused [Q|K|V] and optional qk-norm (InternAttention, naive path).

    [b, n, C] -> [b, n, C] (and probabilities [b, heads, n, n] if asked, else None)
    """
    b, n, hidden = x.shape
    heads, head_dim = config.num_attention_heads, hidden // config.num_attention_heads
    qkv = linear(x, layer["attn.qkv.weight"], layer.get("attn.qkv.bias"))
    # output feature o = part·C + head·D + d with part 0/1/2 = q/k/v: three plain blocks
    q, k, v = qkv[..., :hidden], qkv[..., hidden:2 * hidden], qkv[..., 2 * hidden:]
    if config.qk_normalization:
        # ONE RMSNorm over all C channels of q (and of k), not per head (pitfall 2)
        q = rms_norm(q, layer["attn.q_norm.weight"], config.layer_norm_eps)
        k = rms_norm(k, layer["attn.k_norm.weight"], config.layer_norm_eps)
    # [b, n, C] -> [b, n, heads, D] -> [b, heads, n, D]
    q, k, v = (t.reshape(b, n, heads, head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))
    # softmax((q · D^-½) @ kᵀ) @ v, softmax in the model dtype: InternViT's order (pitfalls 7, 8)
    result = scaled_dot_product_attention(q, k, v, scale=head_dim ** -0.5, scale_mode="scale_q",
                                          softmax_dtype=None, return_probs=output_attentions)
    out, probs = result if output_attentions else (result, None)
    # [b, heads, n, D] -> [b, n, C]
    out = out.transpose(0, 2, 1, 3).reshape(b, n, hidden)
    return linear(out, layer["attn.proj.weight"], layer["attn.proj.bias"]), probs


def block_norm(x: np.ndarray, layer: dict, name: str, config: InternVisionConfig) -> np.ndarray:
    """norm1 / norm2: RMSNorm (6B) or LayerNorm (300M), output cast back to the residual dtype.

    [b, n, C] -> [b, n, C]
    """
    if config.norm_type == "rms_norm":
        y = rms_norm(x, layer[f"{name}.weight"], config.layer_norm_eps)
    else:
        y = layer_norm(x, layer[f"{name}.weight"], layer[f"{name}.bias"], config.layer_norm_eps)
    return y.astype(x.dtype)


def encoder_layer(x: np.ndarray, layer: dict, config: InternVisionConfig, output_attentions: bool = False):
    """One InternVisionEncoderLayer: pre-norm attention and MLP branches, each scaled by its layer scale.

    [b, n, C] -> [b, n, C] (and attention probabilities or None)
    """
    attn_out, probs = intern_attention(block_norm(x, layer, "norm1", config), layer, config, output_attentions)
    # h = x + attn(norm1(x)) · ls1
    h = x + attn_out * layer["ls1"]
    # out = h + mlp(norm2(h)) · ls2, exact erf GELU
    mlp_out = gelu_mlp(block_norm(h, layer, "norm2", config), layer["mlp.fc1.weight"], layer["mlp.fc1.bias"],
                       layer["mlp.fc2.weight"], layer["mlp.fc2.bias"],
                       approximate="tanh" if config.hidden_act == "gelu_pytorch_tanh" else False)
    return h + mlp_out * layer["ls2"], probs


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------

class InternVisionModel:
    """InternViT with weights held as NumPy arrays under their checkpoint names.

    forward: pixel_values [b, 3, H, W] -> VisionOutput (last_hidden_state [b, 1+(H/p)·(W/p), C], ...)
    """

    def __init__(self, config: InternVisionConfig, params: dict[str, np.ndarray], dtype="float32"):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.params = params
        # per-layer dicts with the names after "encoder.layers.{i}."
        self.layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"encoder.layers.{i}."
            self.layers.append({k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})

    @staticmethod
    def expected_shapes(config: InternVisionConfig) -> dict[str, tuple]:
        """Every tensor of the checkpoint (without the `vision_model.` prefix) and its shape (spec 8.1)."""
        config = _as_config(config)
        C, inter, p = config.hidden_size, config.intermediate_size, config.patch_size
        grid = config.image_size // p
        shapes = {
            "embeddings.class_embedding": (1, 1, C),
            "embeddings.patch_embedding.weight": (C, config.num_channels, p, p),
            "embeddings.patch_embedding.bias": (C,),
            "embeddings.position_embedding": (1, grid * grid + 1, C),
        }
        for i in range(config.num_hidden_layers):
            layer = f"encoder.layers.{i}."
            shapes[layer + "attn.qkv.weight"] = (3 * C, C)
            if config.qkv_bias:
                shapes[layer + "attn.qkv.bias"] = (3 * C,)
            if config.qk_normalization:
                shapes[layer + "attn.q_norm.weight"] = (C,)
                shapes[layer + "attn.k_norm.weight"] = (C,)
            shapes[layer + "attn.proj.weight"] = (C, C)
            shapes[layer + "attn.proj.bias"] = (C,)
            shapes[layer + "mlp.fc1.weight"] = (inter, C)
            shapes[layer + "mlp.fc1.bias"] = (inter,)
            shapes[layer + "mlp.fc2.weight"] = (C, inter)
            shapes[layer + "mlp.fc2.bias"] = (C,)
            for norm in ("norm1", "norm2"):
                shapes[layer + f"{norm}.weight"] = (C,)
                if config.norm_type == "layer_norm":
                    shapes[layer + f"{norm}.bias"] = (C,)
            shapes[layer + "ls1"] = (C,)
            shapes[layer + "ls2"] = (C,)
        if final_norm_spec(config) is not None:
            shapes["final_norm.weight"] = (C,)
            shapes["final_norm.bias"] = (C,)
        return shapes

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32") -> "InternVisionModel":
        """Build from checkpoint tensors (bare InternViT keys, or an InternVL checkpoint's `vision_model.*`)."""
        from minivl.checkpoint import check_state_dict
        from minivl.models.common import as_model_dtype

        config = _as_config(config)
        dtype = as_model_dtype(dtype)
        tensors = strip_vision_prefix(state_dict)
        check_state_dict(tensors, cls.expected_shapes(config), where="InternVisionModel")
        # bf16/fp16 tensors (ml_dtypes) are upcast on load
        params = {name: np.ascontiguousarray(np.asarray(t).astype(dtype)) for name, t in tensors.items()}
        return cls(config, params, dtype)

    def embeddings(self, pixel_values: np.ndarray) -> np.ndarray:
        """[b, 3, H, W] -> [b, 1+(H/p)·(W/p), C] (hidden_states[0])."""
        return vision_embeddings(self._check_pixels(pixel_values), self.params, self.config)

    def forward(self, pixel_values: np.ndarray, output_hidden_states: bool = False,
                output_attentions: bool = False, apply_final_norm: bool = False) -> VisionOutput:
        """[b, 3, H, W] -> VisionOutput; H and W multiples of patch_size (other sizes resize the position table).

        apply_final_norm=True applies a converted checkpoint's extra final LayerNorm (DINOv2) to
        last_hidden_state / pooler_output only; hidden_states stay the raw layer outputs.
        """
        x = self.embeddings(pixel_values)
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = encoder_layer(x, layer, self.config, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        if apply_final_norm:
            x = self.final_norm(x)
        return VisionOutput(last_hidden_state=x, pooler_output=x[:, 0],
                            hidden_states=tuple(hidden_states) if output_hidden_states else None,
                            attentions=tuple(attentions) if output_attentions else None)

    __call__ = forward

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """The DINOv2 extra final LayerNorm, [b, n, C] -> [b, n, C]; CheckpointError if this checkpoint has none."""
        spec = final_norm_spec(self.config)
        if spec is None:
            raise CheckpointError("this InternViT checkpoint has no final norm (InternViT never has one; only "
                                  "DINOv2 checkpoints converted by minivl.weights.dinov2 carry final_norm.*); "
                                  "call forward without apply_final_norm")
        return layer_norm(x, self.params["final_norm.weight"], self.params["final_norm.bias"], spec["eps"])

    def _check_pixels(self, pixel_values) -> np.ndarray:
        pixel_values = np.asarray(pixel_values)
        p = self.config.patch_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ShapeError(f"pixel_values must be [batch, {self.config.num_channels}, height, width], got shape "
                             f"{pixel_values.shape}; add a batch axis with x[None] for one image")
        if pixel_values.shape[2] % p or pixel_values.shape[3] % p or pixel_values.shape[2] == 0:
            raise ShapeError(f"pixel_values height and width must be positive multiples of patch_size={p}, got "
                             f"{pixel_values.shape[2]}×{pixel_values.shape[3]}; resize the image (InternVL "
                             f"tiles are {self.config.image_size} px)")
        if not np.issubdtype(pixel_values.dtype, np.floating):
            raise ShapeError(f"pixel_values must be normalised floats, got {pixel_values.dtype}; run the "
                             f"image through minivl.preprocess first")
        # the reference feeds pixels in the patch-conv weight dtype
        return pixel_values.astype(self.dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# helpers shared with torch_impl
# ----------------------------------------------------------------------------------------------

def _as_config(config) -> InternVisionConfig:
    if isinstance(config, InternVisionConfig):
        return config
    if isinstance(config, dict):
        return InternVisionConfig.from_dict(config.get("vision_config", config))
    raise ConfigError(f"expected an InternVisionConfig or a config dict, got {type(config).__name__}")


def final_norm_spec(config: InternVisionConfig) -> dict | None:
    """The `final_norm` extra of a converted DINOv2 config ({"type": "layer_norm", "eps": ...}) or None."""
    spec = config.extra.get(FINAL_NORM_KEY)
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "layer_norm" or "eps" not in spec:
        raise ConfigError(f"config key {FINAL_NORM_KEY!r} must be {{'type': 'layer_norm', 'eps': <float>}} "
                          f"(written by minivl.weights.dinov2), got {spec!r}; remove it or re-convert")
    return spec


def strip_vision_prefix(state_dict: dict) -> dict:
    """Bare InternViT keys: an InternVL chat checkpoint's `vision_model.*` tensors lose the prefix, the rest is dropped."""
    if any(k.startswith(VISION_PREFIX) for k in state_dict):
        return {k[len(VISION_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VISION_PREFIX)}
    return dict(state_dict)
