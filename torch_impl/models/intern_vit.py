"""InternViT, the vision encoder of InternVL (InternVL `modeling_intern_vit.py`), in PyTorch.

The mirror of minivl/models/intern_vit.py; read that file's docstring for the math. The module
tree reproduces the checkpoint key names (`embeddings.*`, `encoder.layers.{i}.attn.qkv`, …), so the
same safetensors load into both. Differences from the NumPy file are only the framework: the patch
embedding is the reference's Conv2d, and attention can run on other backends:

* "eager": the reference's naive path (scale q first, softmax in the model dtype), op for op the
  NumPy file;
* "sdpa":  torch.nn.functional.scaled_dot_product_attention (same math, fused kernel, own rounding);
* "flash": FlashAttention-2: CUDA and float16/bfloat16 only, exactly as the reference's flash ViT
  asserts (pitfall 22); "triton": the project's Triton kernel.
All four go through torch_impl.attention.scaled_dot_product_attention(backend=...).
`output_attentions=True` always takes the eager path for the probabilities, as transformers does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minivl.config import InternVisionConfig
from minivl.errors import CheckpointError, ConfigError, ShapeError
from minivl.models.intern_vit import (FINAL_NORM_KEY, VISION_PREFIX, _as_config, final_norm_spec,  # noqa: F401
                                      strip_vision_prefix)
from minivl.models.intern_vit import InternVisionModel as _NumpyInternVisionModel
from torch_impl.attention import BACKENDS, scaled_dot_product_attention
from torch_impl.interpolate import interpolate_bicubic
from torch_impl.linear import linear
from torch_impl.mlp import gelu_mlp
from torch_impl.norms import layer_norm, rms_norm

ATTN_IMPLEMENTATIONS = BACKENDS  # eager | sdpa | flash | triton
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


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

def resize_position_table(position_embedding: torch.Tensor, grid: int, h: int, w: int) -> torch.Tensor:
    """The patch part of the position table resized to h×w with torch bicubic, in promote(dtype, float32).

    [1, grid², C] -> [1, h·w, C]
    """
    _, n, hidden = position_embedding.shape
    if n != grid * grid:
        raise ShapeError(f"position table has {n} patch rows but config image_size/patch_size gives a "
                         f"{grid}×{grid} grid ({grid * grid} rows); fix image_size in config.json")
    if (h, w) == (grid, grid):
        return position_embedding  # scale 1: bicubic is an exact identity here
    compute = torch.promote_types(position_embedding.dtype, torch.float32)
    table = position_embedding.to(compute).reshape(1, grid, grid, hidden).permute(0, 3, 1, 2)
    table = interpolate_bicubic(table, (h, w))
    return table.reshape(1, hidden, h * w).permute(0, 2, 1).to(position_embedding.dtype)


class InternVisionEmbeddings(nn.Module):
    """Class token + Conv2d patch tokens + position table. [b, 3, H, W] -> [b, 1+(H/p)·(W/p), C]"""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        C, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, C))
        self.patch_embedding = nn.Conv2d(config.num_channels, C, kernel_size=p, stride=p)
        grid = config.image_size // p
        self.position_embedding = nn.Parameter(torch.zeros(1, grid * grid + 1, C))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        target_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(target_dtype))  # [b, C, h, w]
        b, _, h, w = patches.shape
        # [b, C, h, w] -> [b, h·w, C], tokens row-major
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(b, 1, -1).to(target_dtype)
        tokens = torch.cat([cls, patches], dim=1)
        position = self.position_embedding
        grid = self.config.image_size // self.config.patch_size
        table = torch.cat([position[:, :1], resize_position_table(position[:, 1:], grid, h, w)], dim=1)
        return tokens + table.to(target_dtype)


# ----------------------------------------------------------------------------------------------
# one encoder layer
# ----------------------------------------------------------------------------------------------

class InternRMSNorm(nn.Module):
    """HF-order RMSNorm (normalise in float32, cast back, then × weight). [..., C] -> [..., C]"""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class InternLayerNorm(nn.Module):
    """torch.nn.LayerNorm's math with the same parameter names. [..., C] -> [..., C]"""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


NORM2FN = {"rms_norm": InternRMSNorm, "layer_norm": InternLayerNorm}


def attend(q, k, v, scale: float, attn_implementation: str, output_attentions: bool):
    """softmax((q·scale) @ kᵀ) @ v on the chosen backend. [b, h, n, d] ×3 -> [b, h, n, d] (+ probs or None)

    The probabilities exist only on the eager path, so output_attentions runs eager whatever the backend.
    """
    backend = "eager" if output_attentions else attn_implementation
    result = scaled_dot_product_attention(q, k, v, scale=scale, scale_mode="scale_q", softmax_dtype=None,
                                          return_probs=output_attentions, backend=backend)
    return result if output_attentions else (result, None)


class InternAttention(nn.Module):
    """Fused-[Q|K|V] bidirectional attention with optional qk-norm over all C channels. [b, n, C] -> [b, n, C]"""

    def __init__(self, config: InternVisionConfig, attn_implementation: str = "eager"):
        super().__init__()
        C = config.hidden_size
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = C // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_implementation = attn_implementation
        self.qkv = nn.Linear(C, 3 * C, bias=config.qkv_bias)
        if config.qk_normalization:
            self.q_norm = InternRMSNorm(C, config.layer_norm_eps)
            self.k_norm = InternRMSNorm(C, config.layer_norm_eps)
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        b, n, C = x.shape
        qkv = linear(x, self.qkv.weight, self.qkv.bias)
        # [Q | K | V] blocks, heads contiguous inside each
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        if self.config.qk_normalization:
            # ONE RMSNorm over all C channels (pitfall 2)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out, probs = attend(q, k, v, self.scale, self.attn_implementation, output_attentions)
        out = out.transpose(1, 2).reshape(b, n, C)
        return linear(out, self.proj.weight, self.proj.bias), probs


class InternMLP(nn.Module):
    """fc2(gelu(fc1(x))), exact erf GELU. [b, n, C] -> [b, n, C]"""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.approximate = "tanh" if config.hidden_act == "gelu_pytorch_tanh" else False
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                        approximate=self.approximate)


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm attention and MLP branches with layer scale. [b, n, C] -> [b, n, C]"""

    def __init__(self, config: InternVisionConfig, attn_implementation: str = "eager"):
        super().__init__()
        C = config.hidden_size
        self.attn = InternAttention(config, attn_implementation)
        self.mlp = InternMLP(config)
        self.norm1 = NORM2FN[config.norm_type](C, config.layer_norm_eps)
        self.norm2 = NORM2FN[config.norm_type](C, config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(C))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(C))

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        attn_out, probs = self.attn(self.norm1(x).to(x.dtype), output_attentions)
        # h = x + attn(norm1(x)) · ls1
        h = x + attn_out * self.ls1
        # out = h + mlp(norm2(h)) · ls2
        return h + self.mlp(self.norm2(h).to(h.dtype)) * self.ls2, probs


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig, attn_implementation: str = "eager"):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, attn_implementation)
                                    for _ in range(config.num_hidden_layers))


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------

class InternVisionModel(nn.Module):
    """InternViT. forward: pixel_values [b, 3, H, W] -> VisionOutput (last_hidden_state [b, 1+(H/p)·(W/p), C], ...)"""

    def __init__(self, config: InternVisionConfig, attn_implementation: str = "eager"):
        super().__init__()
        config = _as_config(config)
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)} for InternViT, "
                              f"got {attn_implementation!r}")
        self.config = config
        self.attn_implementation = attn_implementation
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config, attn_implementation)
        spec = final_norm_spec(config)
        self.final_norm = InternLayerNorm(config.hidden_size, spec["eps"]) if spec is not None else None

    expected_shapes = staticmethod(_NumpyInternVisionModel.expected_shapes)

    @classmethod
    def from_state_dict(cls, config, state_dict: dict, dtype="float32", device="cpu",
                        attn_implementation: str = "eager") -> "InternVisionModel":
        """Build from checkpoint tensors (NumPy or torch; bare keys or an InternVL checkpoint's `vision_model.*`)."""
        from minivl.checkpoint import check_state_dict

        config = _as_config(config)
        torch_dtype = _DTYPES.get(str(dtype).replace("torch.", ""))
        if torch_dtype is None:
            raise ConfigError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        tensors = strip_vision_prefix(state_dict)
        check_state_dict(tensors, cls.expected_shapes(config), where="InternVisionModel")
        with torch.device("meta"):
            model = cls(config, attn_implementation)
        model.load_state_dict({k: _to_tensor(v, torch_dtype, device) for k, v in tensors.items()},
                              strict=True, assign=True)
        return model.eval()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False, apply_final_norm: bool = False) -> VisionOutput:
        """[b, 3, H, W] -> VisionOutput; apply_final_norm applies a DINOv2 checkpoint's extra LayerNorm."""
        p = self.config.patch_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ShapeError(f"pixel_values must be [batch, {self.config.num_channels}, height, width], got shape "
                             f"{tuple(pixel_values.shape)}; add a batch axis with x[None] for one image")
        if pixel_values.shape[2] % p or pixel_values.shape[3] % p or pixel_values.shape[2] == 0:
            raise ShapeError(f"pixel_values height and width must be positive multiples of patch_size={p}, got "
                             f"{pixel_values.shape[2]}×{pixel_values.shape[3]}; resize the image (InternVL "
                             f"tiles are {self.config.image_size} px)")
        x = self.embeddings(pixel_values)
        hidden_states, attentions = [x], []
        for layer in self.encoder.layers:
            x, probs = layer(x, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        if apply_final_norm:
            if self.final_norm is None:
                raise CheckpointError("this InternViT checkpoint has no final norm (only DINOv2 checkpoints "
                                      "converted by minivl.weights.dinov2 carry final_norm.*); call forward "
                                      "without apply_final_norm")
            x = self.final_norm(x)
        return VisionOutput(last_hidden_state=x, pooler_output=x[:, 0],
                            hidden_states=tuple(hidden_states) if output_hidden_states else None,
                            attentions=tuple(attentions) if output_attentions else None)


def _to_tensor(value, dtype: torch.dtype, device) -> torch.Tensor:
    """A NumPy array (ml_dtypes bf16 included) or tensor as a contiguous tensor of dtype on device."""
    if not isinstance(value, torch.Tensor):
        import numpy as np

        array = np.asarray(value)
        if array.dtype.kind == "V" or str(array.dtype) == "bfloat16":
            array = array.astype(np.float32)  # ml_dtypes bf16 -> exact float32 first
        value = torch.from_numpy(np.array(array, copy=True, order="C"))  # memory-mapped arrays are read-only
    return value.to(device=device, dtype=dtype).contiguous()
