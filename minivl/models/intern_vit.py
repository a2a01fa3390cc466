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

Speed without new math (tests/test_vision_fast.py): the resized position table is cached per grid,
the residual adds reuse the branch's buffer, and InternMLP's erf GELU is `gelu_fast` (torch CPU's
own float32 erf, vectorised; scipy's scalar erf was the largest non-GEMM cost of a layer).

DINOv2 checkpoints converted by minivl/weights/dinov2.py carry one labelled extra, a final
LayerNorm (`final_norm.weight/bias`, config key `final_norm`); it is applied only when
`forward(..., apply_final_norm=True)` asks for it, because InternViT itself has none.

The module tree is the checkpoint's key tree (torch_impl/models/intern_vit.py has the same classes
and attributes), so `state_dict()` keys are the checkpoint keys:

    InternVisionModel
    ├── embeddings          InternVisionEmbeddings: class_embedding, patch_embedding.{weight,bias},
    │                       position_embedding
    ├── encoder.layers[i]   InternVisionEncoderLayer: norm1, attn (InternAttention: qkv, q_norm, k_norm,
    │                       proj), ls1, norm2, mlp (InternMLP: fc1, fc2), ls2
    └── final_norm          DINOv2 checkpoints only (None otherwise)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minivl import nn
from minivl.activations import gelu_fast
from minivl.attention import scaled_dot_product_attention
from minivl.attention_blocks import attention_blocks
from minivl.config import InternVisionConfig
from minivl.errors import CheckpointError, ConfigError, ShapeError
from minivl.interpolate import interpolate_bicubic
from minivl.linear import linear
from minivl.mlp import gelu_mlp
from minivl.models.common import Linear, Norm, as_model_dtype, build_model, declared_shapes

# prefix of the vision tower inside an InternVL chat checkpoint (spec 8.1)
VISION_PREFIX = "vision_model."
# config.json key of the DINOv2 extra; its value describes the norm (see minivl/weights/dinov2.py)
FINAL_NORM_KEY = "final_norm"
# config.norm_type -> the Norm leaf: RMSNorm (6B, weight only) or LayerNorm (300M, weight and bias)
NORM_KINDS = {"rms_norm": dict(kind="rms"), "layer_norm": dict(kind="layer", bias=True)}


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


class PatchEmbedding(nn.Module):
    """The reference's Conv2d(3, C, kernel p, stride p): weight [C, 3, p, p], bias [C]. [b, 3, H, W] -> [b, h·w, C]"""

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter((hidden_size, num_channels, patch_size, patch_size))
        self.bias = nn.Parameter((hidden_size,))

    def forward(self, pixel_values: np.ndarray) -> np.ndarray:
        return patch_embed(pixel_values, self.weight, self.bias)


class InternVisionEmbeddings(nn.Module):
    """Class token + patch tokens + position table (InternVL `InternVisionEmbeddings`).

    [b, 3, H, W] -> [b, 1 + (H/p)·(W/p), C]
    """

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        C, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter((1, 1, C))
        self.patch_embedding = PatchEmbedding(config.num_channels, C, p)
        grid = config.image_size // p
        self.position_embedding = nn.Parameter((1, grid * grid + 1, C))
        self._table_cache = None  # (position_embedding, h, w, dtype, table): the last resized table

    def position_table(self, h: int, w: int, dtype) -> np.ndarray:
        """[cls position ; patch positions resized to h×w] in dtype, [1, 1 + h·w, C].

        The resize depends only on the weights and the grid, so the last one is kept and reused
        while `position_embedding` is the same array (a reload assigns a new one).
        """
        position = self.position_embedding
        cached = self._table_cache
        if cached is not None and cached[0] is position and cached[1:4] == (h, w, np.dtype(dtype)):
            return cached[4]
        grid = self.config.image_size // self.config.patch_size
        # the cls position (row 0) is never interpolated; rows 1… are resized to the input grid
        table = np.concatenate([position[:, :1], resize_position_table(position[:, 1:], grid, h, w)], axis=1)
        table = table.astype(dtype, copy=False)
        table.flags.writeable = False  # shared by every later forward: nobody may write into it
        self._table_cache = (position, h, w, np.dtype(dtype), table)
        return table

    def forward(self, pixel_values: np.ndarray) -> np.ndarray:
        target_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.astype(target_dtype, copy=False))  # [b, h·w, C]
        b, p = pixel_values.shape[0], self.config.patch_size
        h, w = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        cls = np.broadcast_to(self.class_embedding, (b, 1, patches.shape[-1])).astype(target_dtype)
        tokens = np.concatenate([cls, patches], axis=1)
        tokens += self.position_table(h, w, target_dtype)  # tokens is a fresh buffer: add in place
        return tokens


# ----------------------------------------------------------------------------------------------
# one encoder layer
# ----------------------------------------------------------------------------------------------

def attend(q, k, v, scale: float, output_attentions: bool):
    """softmax((q·scale) @ kᵀ) @ v, softmax in the model dtype: InternViT's order (pitfalls 7, 8).

    [b, h, n, d] ×3 -> [b, h, n, d] (and probabilities [b, h, n, n] if asked, else None)
    """
    if output_attentions:
        return scaled_dot_product_attention(q, k, v, scale=scale, scale_mode="scale_q", softmax_dtype=None,
                                            return_probs=True)
    # the same attention in blocks of queries, all at once on every core (attention_blocks)
    return attention_blocks(q, k, v, scale=scale, scale_mode="scale_q", softmax_dtype=None), None


class InternAttention(nn.Module):
    """Bidirectional multi-head self-attention with fused [Q|K|V] and optional qk-norm (InternAttention, naive path).

    [b, n, C] -> [b, n, C] (and probabilities [b, heads, n, n] if asked, else None)
    """

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = C // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.qk_normalization = config.qk_normalization
        self.qkv = Linear(C, 3 * C, bias=config.qkv_bias)
        if config.qk_normalization:
            # ONE RMSNorm over all C channels of q (and of k), not one per head (pitfall 2)
            self.q_norm = Norm(C, config.layer_norm_eps, kind="rms")
            self.k_norm = Norm(C, config.layer_norm_eps, kind="rms")
        self.proj = Linear(C, C, bias=True)

    def forward(self, x: np.ndarray, output_attentions: bool = False):
        b, n, C = x.shape
        qkv = self.qkv(x)
        # output feature o = part·C + head·D + d with part 0/1/2 = q/k/v: three plain blocks
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        # [b, n, C] -> [b, n, heads, D] -> [b, heads, n, D]
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))
        out, probs = attend(q, k, v, self.scale, output_attentions)
        # [b, heads, n, D] -> [b, n, C]
        out = out.transpose(0, 2, 1, 3).reshape(b, n, C)
        return self.proj(out), probs


class InternMLP(nn.Module):
    """fc2(gelu(fc1(x))), exact erf GELU (tanh for 'gelu_pytorch_tanh'). [b, n, C] -> [b, n, C]"""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else False
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.approximate:
            return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                            approximate=self.approximate)
        # fc2(gelu(fc1(x))), the erf GELU as `gelu_fast`: torch CPU's own float32 erf, vectorised
        # (scipy's scalar erf was the largest non-GEMM cost of a ViT layer); float64 keeps scipy's
        return self.fc2(gelu_fast(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm attention and MLP branches, each scaled by its layer scale. [b, n, C] -> [b, n, C]

    norm1 / norm2: RMSNorm (6B) or LayerNorm (300M); their output is cast back to the residual dtype.
    """

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        C = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = Norm(C, config.layer_norm_eps, **NORM_KINDS[config.norm_type])
        self.norm2 = Norm(C, config.layer_norm_eps, **NORM_KINDS[config.norm_type])
        self.ls1 = nn.Parameter((C,))
        self.ls2 = nn.Parameter((C,))

    def forward(self, x: np.ndarray, output_attentions: bool = False):
        attn_out, probs = self.attn(self.norm1(x).astype(x.dtype, copy=False), output_attentions)
        # h = x + attn(norm1(x)) · ls1, in attn_out's fresh buffer (a·ls1 + x is x + a·ls1 bit for bit)
        h = residual_add(x, attn_out, self.ls1)
        # out = h + mlp(norm2(h)) · ls2
        return residual_add(h, self.mlp(self.norm2(h).astype(h.dtype, copy=False)), self.ls2), probs


def residual_add(x: np.ndarray, branch: np.ndarray, layer_scale: np.ndarray) -> np.ndarray:
    """x + branch · layer_scale, written into `branch` (a fresh buffer of the layer) when the dtypes allow.

    [b, n, C], [b, n, C], [C] -> [b, n, C]
    """
    if not branch.dtype == x.dtype == np.result_type(branch, layer_scale):
        return x + branch * layer_scale
    branch *= layer_scale
    branch += x
    return branch


class InternVisionEncoder(nn.Module):
    """L encoder layers. [b, n, C] -> (last [b, n, C], hidden_states (L+1) or None, attentions (L) or None)"""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, inputs_embeds: np.ndarray, output_hidden_states: bool = False,
                output_attentions: bool = False):
        x = inputs_embeds
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        return (x, tuple(hidden_states) if output_hidden_states else None,
                tuple(attentions) if output_attentions else None)


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------

class InternVisionModel(nn.Module):
    """InternViT. forward: pixel_values [b, 3, H, W] -> VisionOutput (last_hidden_state [b, 1+(H/p)·(W/p), C], ...)"""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        config = as_vision_config(config)
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        spec = final_norm_spec(config)
        self.final_norm = Norm(config.hidden_size, spec["eps"], kind="layer", bias=True) if spec else None

    @classmethod
    def expected_shapes(cls, config) -> dict[str, tuple]:
        """Every tensor of the checkpoint (without the `vision_model.` prefix) and its shape, from the declared parameters."""
        return declared_shapes(cls, as_vision_config(config))

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32") -> "InternVisionModel":
        """Build from checkpoint tensors (bare InternViT keys, or an InternVL checkpoint's `vision_model.*`).

        bf16/fp16 tensors (ml_dtypes) are upcast on load; one CheckpointError lists every bad tensor.
        """
        return build_model(cls, as_vision_config(config), strip_vision_prefix(state_dict), as_model_dtype(dtype))

    @property
    def dtype(self) -> np.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def forward(self, pixel_values: np.ndarray, output_hidden_states: bool = False,
                output_attentions: bool = False, apply_final_norm: bool = False) -> VisionOutput:
        """[b, 3, H, W] -> VisionOutput; H and W multiples of patch_size (other sizes resize the position table).

        apply_final_norm=True applies a converted checkpoint's extra final LayerNorm (DINOv2) to
        last_hidden_state / pooler_output only; hidden_states stay the raw layer outputs.
        """
        pixel_values = np.asarray(pixel_values)
        check_pixel_values(pixel_values.shape, np.issubdtype(pixel_values.dtype, np.floating), pixel_values.dtype,
                           self.config)
        x = self.embeddings(pixel_values)
        x, hidden_states, attentions = self.encoder(x, output_hidden_states, output_attentions)
        if apply_final_norm:
            check_final_norm(self.final_norm)
            x = self.final_norm(x)
        return VisionOutput(last_hidden_state=x, pooler_output=x[:, 0], hidden_states=hidden_states,
                            attentions=attentions)


# ----------------------------------------------------------------------------------------------
# framework-free helpers, shared with torch_impl
# ----------------------------------------------------------------------------------------------

def as_vision_config(config) -> InternVisionConfig:
    """An InternVisionConfig from itself, a vision config dict or a chat config dict (its vision_config)."""
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


def check_final_norm(final_norm) -> None:
    """apply_final_norm=True on a checkpoint without one is a CheckpointError."""
    if final_norm is None:
        raise CheckpointError("this InternViT checkpoint has no final norm (InternViT never has one; only "
                              "DINOv2 checkpoints converted by minivl.weights.dinov2 carry final_norm.*); "
                              "call forward without apply_final_norm")


def check_pixel_values(shape, is_float: bool, dtype, config: InternVisionConfig) -> None:
    """pixel_values must be normalised floats [b, num_channels, H, W], H and W positive multiples of patch_size."""
    p = config.patch_size
    if len(shape) != 4 or shape[1] != config.num_channels:
        raise ShapeError(f"pixel_values must be [batch, {config.num_channels}, height, width], got shape "
                         f"{tuple(shape)}; add a batch axis with x[None] for one image")
    if shape[2] % p or shape[3] % p or 0 in (shape[2], shape[3]):
        raise ShapeError(f"pixel_values height and width must be positive multiples of patch_size={p}, got "
                         f"{shape[2]}×{shape[3]}; resize the image (InternVL tiles are {config.image_size} px)")
    if not is_float:
        raise ShapeError(f"pixel_values must be normalised floats, got {dtype}; run the image through "
                         f"minivl.preprocess first")


def strip_vision_prefix(state_dict: dict) -> dict:
    """Bare InternViT keys: an InternVL chat checkpoint's `vision_model.*` tensors lose the prefix, the rest is dropped."""
    from minivl.loading import strip_prefix

    if any(k.startswith(VISION_PREFIX) for k in state_dict):
        return strip_prefix(state_dict, VISION_PREFIX)
    return dict(state_dict)
