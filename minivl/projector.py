"""The `mlp1` projector of InternVL: pixel-shuffled ViT features -> LLM embedding space.

`nn.Sequential(LayerNorm(4C), Linear(4C, D), GELU(), Linear(D, D))` in
`InternVLChatModel.__init__` (modeling_internvl_chat.py), so the checkpoint keys are
`mlp1.0.{weight,bias}` (LayerNorm), `mlp1.1.{weight,bias}` and `mlp1.3.{weight,bias}` (the
GELU at index 2 has no parameters). Two details that are easy to get wrong: the LayerNorm uses
PyTorch's default eps 1e-5 (not the ViT's 1e-6), and the GELU is the exact erf form.
"""
from __future__ import annotations

import numpy as np

from minivl.activations import gelu
from minivl.linear import linear
from minivl.norms import layer_norm

# nn.LayerNorm's default eps: the reference never passes one (pitfall 4).
MLP1_LAYER_NORM_EPS = 1e-5


def mlp1(x: np.ndarray, norm_weight: np.ndarray, norm_bias: np.ndarray, fc1_weight: np.ndarray,
         fc1_bias: np.ndarray, fc2_weight: np.ndarray, fc2_bias: np.ndarray,
         eps: float = MLP1_LAYER_NORM_EPS) -> np.ndarray:
    """y = W₃·GELU(W₁·LayerNorm(x) + b₁) + b₃, InternVL's projector.

    [..., 4C], [4C], [4C], [D, 4C], [D], [D, D], [D] -> [..., D]
    """
    hidden = layer_norm(x, norm_weight, norm_bias, eps)
    hidden = gelu(linear(hidden, fc1_weight, fc1_bias))
    return linear(hidden, fc2_weight, fc2_bias)


def projector_input_size(vit_hidden_size: int, downsample_ratio: float) -> int:
    """4C for ratio 0.5: the pixel shuffle packs int(1/ratio)² patch features into one token."""
    return vit_hidden_size * int(1 / downsample_ratio) ** 2


def mlp1_expected_shapes(vit_hidden_size: int, downsample_ratio: float, llm_hidden_size: int,
                         prefix: str = "mlp1.") -> dict[str, tuple]:
    """Checkpoint tensor names and shapes of the projector (with `prefix`, default 'mlp1.')."""
    width = projector_input_size(vit_hidden_size, downsample_ratio)
    return {
        f"{prefix}0.weight": (width,), f"{prefix}0.bias": (width,),
        f"{prefix}1.weight": (llm_hidden_size, width), f"{prefix}1.bias": (llm_hidden_size,),
        f"{prefix}3.weight": (llm_hidden_size, llm_hidden_size), f"{prefix}3.bias": (llm_hidden_size,),
    }


class Projector:
    """The mlp1 weights and their forward pass; `Projector(tensors)` takes the six `0/1/3` tensors."""

    def __init__(self, tensors: dict[str, np.ndarray], eps: float = MLP1_LAYER_NORM_EPS):
        self.norm_weight, self.norm_bias = tensors["0.weight"], tensors["0.bias"]
        self.fc1_weight, self.fc1_bias = tensors["1.weight"], tensors["1.bias"]
        self.fc2_weight, self.fc2_bias = tensors["3.weight"], tensors["3.bias"]
        self.eps = eps

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, np.ndarray], prefix: str = "mlp1.", dtype="float32") -> "Projector":
        """Take the `prefix`-ed mlp1 tensors out of a (whole-model) state dict, cast to dtype."""
        names = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
        return cls({name: np.asarray(state_dict[prefix + name]).astype(dtype) for name in names})

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """[..., 4C] -> [..., D]"""
        return mlp1(x, self.norm_weight, self.norm_bias, self.fc1_weight, self.fc1_bias,
                    self.fc2_weight, self.fc2_bias, self.eps)
