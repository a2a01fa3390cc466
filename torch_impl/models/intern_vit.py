"""InternViT, the vision encoder of InternVL (InternVL `modeling_intern_vit.py`), in PyTorch.

The mirror of minivl/models/intern_vit.py: the same classes with the same attributes, named after
the checkpoint keys (read that file's docstring for the math and the module tree), so the same
safetensors load into both and `state_dict()` keys are the checkpoint keys. Differences from the
NumPy file are only the framework: the patch embedding runs the reference's conv2d, and
attention can run on other backends:

* "eager": the reference's naive path (scale q first, softmax in the model dtype), op for op the
  NumPy file;
* "sdpa":  torch.nn.functional.scaled_dot_product_attention (same math, fused kernel, own rounding);
* "flash": FlashAttention-2: CUDA and float16/bfloat16 only, exactly as the reference's flash ViT
  asserts (pitfall 22); "triton": the project's Triton kernel.
All four go through torch_impl.attention.scaled_dot_product_attention(backend=...).
`output_attentions=True` always takes the eager path for the probabilities, as transformers does.
Loading is the decoders' (`build_model`: meta-device build, dtype cast, strict load).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import conv2d

from minivl.config import InternVisionConfig
from minivl.errors import ShapeError
from minivl.models.intern_vit import (FINAL_NORM_KEY, NORM_KINDS, VISION_PREFIX, as_vision_config,  # noqa: F401
                                      check_final_norm, check_pixel_values, final_norm_spec, strip_vision_prefix)
from torch_impl.attention import scaled_dot_product_attention
from torch_impl.attention_blocks import attention_blocks
from torch_impl.interpolate import interpolate_bicubic
from torch_impl.mlp import gelu_mlp
from torch_impl.models.common import (Linear, Norm, as_model_dtype, build_model, check_attn_implementation,
                                      declared_shapes)

@dataclass
class VisionOutput:
    """last_hidden_state [b, 1+n, C]; pooler_output [b, C]; hidden_states (L+1) / attentions (L) or None."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple | None = None
    attentions: tuple | None = None


# ----------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------

def patch_embed(pixel_values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The stride-p p×p patch convolution, the reference's Conv2d. [b, 3, H, W], [C, 3, p, p], [C] -> [b, h·w, C]"""
    # [b, C, h, w] -> [b, h·w, C], tokens row-major
    return conv2d(pixel_values, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)


def resize_position_table(position_embedding: torch.Tensor, grid: int, h: int, w: int) -> torch.Tensor:
    """The patch part of the position table resized to h×w with torch bicubic, in promote(dtype, float32).

    [1, grid², C] -> [1, h·w, C]
    """
    _, n, hidden = position_embedding.shape
    if n != grid * grid:
        raise ShapeError(f"position table has {n} patch rows but config image_size/patch_size gives a "
                         f"{grid}×{grid} grid ({grid * grid} rows); fix image_size in config.json")
    if (h, w) == (grid, grid):
        return position_embedding  # scale 1: torch's bicubic is an exact identity here
    compute = torch.promote_types(position_embedding.dtype, torch.float32)
    # [1, g², C] -> [1, g, g, C] -> [1, C, g, g], the layout F.interpolate resizes
    table = position_embedding.to(compute).reshape(1, grid, grid, hidden).permute(0, 3, 1, 2)
    table = interpolate_bicubic(table, (h, w))
    # [1, C, h, w] -> [1, C, h·w] -> [1, h·w, C]
    return table.reshape(1, hidden, h * w).permute(0, 2, 1).to(position_embedding.dtype)


class PatchEmbedding(nn.Module):
    """The reference's Conv2d(3, C, kernel p, stride p): weight [C, 3, p, p], bias [C]. [b, 3, H, W] -> [b, h·w, C]"""

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(hidden_size, num_channels, patch_size, patch_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return patch_embed(pixel_values, self.weight, self.bias)


class InternVisionEmbeddings(nn.Module):
    """Class token + patch tokens + position table (InternVL `InternVisionEmbeddings`).

    [b, 3, H, W] -> [b, 1 + (H/p)·(W/p), C]
    """

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        C, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, C), requires_grad=False)
        self.patch_embedding = PatchEmbedding(config.num_channels, C, p)
        grid = config.image_size // p
        self.position_embedding = nn.Parameter(torch.empty(1, grid * grid + 1, C), requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        target_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(target_dtype))  # [b, h·w, C]
        b, p = pixel_values.shape[0], self.config.patch_size
        h, w = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        cls = self.class_embedding.expand(b, 1, patches.shape[-1]).to(target_dtype)
        tokens = torch.cat([cls, patches], dim=1)
        return tokens + self.position_table(h, w, target_dtype)

    def position_table(self, h: int, w: int, dtype) -> torch.Tensor:
        """[cls position ; patch positions resized to h×w] in dtype, [1, 1 + h·w, C] (NumPy caches it)."""
        position = self.position_embedding
        grid = self.config.image_size // self.config.patch_size
        # the cls position (row 0) is never interpolated; rows 1… are resized to the input grid
        table = torch.cat([position[:, :1], resize_position_table(position[:, 1:], grid, h, w)], dim=1)
        return table.to(dtype)


# ----------------------------------------------------------------------------------------------
# one encoder layer
# ----------------------------------------------------------------------------------------------

def attend(q, k, v, scale: float, output_attentions: bool, attn_implementation: str = "eager"):
    """softmax((q·scale) @ kᵀ) @ v, softmax in the model dtype: InternViT's order (pitfalls 7, 8).

    [b, h, n, d] ×3 -> [b, h, n, d] (and probabilities [b, h, n, n] if asked, else None).
    The probabilities exist only on the eager path, so output_attentions runs eager whatever the backend.
    """
    if output_attentions:
        return scaled_dot_product_attention(q, k, v, scale=scale, scale_mode="scale_q", softmax_dtype=None,
                                            return_probs=True, backend="eager")
    if attn_implementation == "eager":  # the same attention in blocks of queries (attention_blocks)
        return attention_blocks(q, k, v, scale=scale, scale_mode="scale_q", softmax_dtype=None), None
    return scaled_dot_product_attention(q, k, v, scale=scale, scale_mode="scale_q", softmax_dtype=None,
                                        backend=attn_implementation), None


class InternAttention(nn.Module):
    """Bidirectional multi-head self-attention with fused [Q|K|V] and optional qk-norm (InternAttention).

    [b, n, C] -> [b, n, C] (and probabilities [b, heads, n, n] if asked, else None)
    """

    def __init__(self, config: InternVisionConfig, attn_implementation: str = "eager"):
        super().__init__()
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = C // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.qk_normalization = config.qk_normalization
        self.attn_implementation = attn_implementation
        self.qkv = Linear(C, 3 * C, bias=config.qkv_bias)
        if config.qk_normalization:
            # ONE RMSNorm over all C channels of q (and of k), not one per head (pitfall 2)
            self.q_norm = Norm(C, config.layer_norm_eps, kind="rms")
            self.k_norm = Norm(C, config.layer_norm_eps, kind="rms")
        self.proj = Linear(C, C, bias=True)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        b, n, C = x.shape
        qkv = self.qkv(x)
        # output feature o = part·C + head·D + d with part 0/1/2 = q/k/v: three plain blocks
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        # [b, n, C] -> [b, n, heads, D] -> [b, heads, n, D]
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out, probs = attend(q, k, v, self.scale, output_attentions, self.attn_implementation)
        # [b, heads, n, D] -> [b, n, C]
        out = out.transpose(1, 2).reshape(b, n, C)
        return self.proj(out), probs


class InternMLP(nn.Module):
    """fc2(gelu(fc1(x))), exact erf GELU (tanh for 'gelu_pytorch_tanh'). [b, n, C] -> [b, n, C]"""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else False
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                        approximate=self.approximate)


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm attention and MLP branches, each scaled by its layer scale. [b, n, C] -> [b, n, C]

    norm1 / norm2: RMSNorm (6B) or LayerNorm (300M); their output is cast back to the residual dtype.
    """

    def __init__(self, config: InternVisionConfig, attn_implementation: str = "eager"):
        super().__init__()
        C = config.hidden_size
        self.attn = InternAttention(config, attn_implementation)
        self.mlp = InternMLP(config)
        self.norm1 = Norm(C, config.layer_norm_eps, **NORM_KINDS[config.norm_type])
        self.norm2 = Norm(C, config.layer_norm_eps, **NORM_KINDS[config.norm_type])
        self.ls1 = nn.Parameter(torch.empty(C), requires_grad=False)
        self.ls2 = nn.Parameter(torch.empty(C), requires_grad=False)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        attn_out, probs = self.attn(self.norm1(x).to(x.dtype), output_attentions)
        # h = x + attn(norm1(x)) · ls1
        h = residual_add(x, attn_out, self.ls1)
        # out = h + mlp(norm2(h)) · ls2
        return residual_add(h, self.mlp(self.norm2(h).to(h.dtype)), self.ls2), probs


def residual_add(x: torch.Tensor, branch: torch.Tensor, layer_scale: torch.Tensor) -> torch.Tensor:
    """x + branch · layer_scale (NumPy writes it into branch's buffer). [b, n, C], [b, n, C], [C] -> [b, n, C]"""
    return x + branch * layer_scale


class InternVisionEncoder(nn.Module):
    """L encoder layers. [b, n, C] -> (last [b, n, C], hidden_states (L+1) or None, attentions (L) or None)"""

    def __init__(self, config: InternVisionConfig, attn_implementation: str = "eager"):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, attn_implementation)
                                    for _ in range(config.num_hidden_layers))

    def forward(self, inputs_embeds: torch.Tensor, output_hidden_states: bool = False,
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

    def __init__(self, config: InternVisionConfig, attn_implementation: str = "eager"):
        super().__init__()
        config = as_vision_config(config)
        self.config = config
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config, attn_implementation)
        spec = final_norm_spec(config)
        self.final_norm = Norm(config.hidden_size, spec["eps"], kind="layer", bias=True) if spec else None

    @classmethod
    def expected_shapes(cls, config) -> dict[str, tuple]:
        """Every tensor of the checkpoint (without the `vision_model.` prefix) and its shape, from the declared parameters."""
        return declared_shapes(cls, as_vision_config(config))

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager") -> "InternVisionModel":
        """Build from checkpoint tensors (NumPy or torch; bare keys or an InternVL checkpoint's `vision_model.*`)."""
        return build_model(cls, as_vision_config(config), strip_vision_prefix(state_dict), as_model_dtype(dtype),
                           device, attn_implementation=attn_implementation)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False, apply_final_norm: bool = False) -> VisionOutput:
        """[b, 3, H, W] -> VisionOutput; H and W multiples of patch_size (other sizes resize the position table).

        apply_final_norm=True applies a converted checkpoint's extra final LayerNorm (DINOv2) to
        last_hidden_state / pooler_output only; hidden_states stay the raw layer outputs.
        """
        check_pixel_values(tuple(pixel_values.shape), pixel_values.is_floating_point(), pixel_values.dtype,
                           self.config)
        x = self.embeddings(pixel_values)
        x, hidden_states, attentions = self.encoder(x, output_hidden_states, output_attentions)
        if apply_final_norm:
            check_final_norm(self.final_norm)
            x = self.final_norm(x)
        return VisionOutput(last_hidden_state=x, pooler_output=x[:, 0], hidden_states=hidden_states,
                            attentions=attentions)
