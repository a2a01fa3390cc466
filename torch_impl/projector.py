"""The `mlp1` projector of InternVL in torch: pixel-shuffled ViT features -> LLM embedding space.

Mirror of minivl/projector.py. `Projector` is an `nn.Sequential` of the reference's four modules,
so its state-dict keys are exactly `0.*`, `1.*`, `3.*` (`mlp1.0/1/3` inside the chat model);
its forward runs the functional `mlp1` so the two packages read line for line alike.
"""
from __future__ import annotations

import torch
from torch import nn

from minivl.projector import MLP1_LAYER_NORM_EPS, mlp1_expected_shapes, projector_input_size  # noqa: F401
from torch_impl.activations import gelu
from torch_impl.linear import linear
from torch_impl.norms import layer_norm


def mlp1(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, fc1_weight: torch.Tensor,
         fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
         eps: float = MLP1_LAYER_NORM_EPS) -> torch.Tensor:
    """y = W₃·GELU(W₁·LayerNorm(x) + b₁) + b₃, InternVL's projector.

    [..., 4C], [4C], [4C], [D, 4C], [D], [D, D], [D] -> [..., D]
    """
    hidden = layer_norm(x, norm_weight, norm_bias, eps)
    hidden = gelu(linear(hidden, fc1_weight, fc1_bias))
    return linear(hidden, fc2_weight, fc2_bias)


class Projector(nn.Sequential):
    """LayerNorm(4C, eps 1e-5) -> Linear(4C, D) -> GELU -> Linear(D, D), keys 0/1/3 as the reference."""

    def __init__(self, input_size: int, llm_hidden_size: int, eps: float = MLP1_LAYER_NORM_EPS):
        super().__init__(nn.LayerNorm(input_size, eps=eps), nn.Linear(input_size, llm_hidden_size),
                         nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 4C] -> [..., D]"""
        return mlp1(x, self[0].weight, self[0].bias, self[1].weight, self[1].bias,
                    self[3].weight, self[3].bias, self.eps)
