"""The `mlp1` projector of InternVL in torch: pixel-shuffled ViT features -> LLM embedding space.

Mirror of minivl/projector.py. `Projector` is an `nn.Sequential` of the reference's four modules
(LayerNorm, Linear, GELU, Linear, as the shared Norm / Linear leaves), so its state-dict keys are
exactly `0.*`, `1.*`, `3.*` (`mlp1.0/1/3` inside the chat model); its forward runs the functional
`mlp1` so the two packages read line for line alike.
"""
from __future__ import annotations

import torch
from torch import nn

from minivl.errors import CheckpointError
from minivl.loading import strip_prefix
from minivl.projector import (MLP1_LAYER_NORM_EPS, PROJECTOR_PREFIX, mlp1_expected_shapes,  # noqa: F401
                              projector_input_size)
from torch_impl.activations import gelu
from torch_impl.linear import linear
from torch_impl.models.common import Linear, Norm, as_model_dtype, build_model
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


class GELU(nn.Module):
    """The exact erf GELU as a module without parameters: index 2 of the reference's Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x)


class Projector(nn.Sequential):
    """LayerNorm(4C, eps 1e-5) -> Linear(4C, D) -> GELU -> Linear(D, D), keys 0/1/3 as the reference's Sequential.

    [..., 4C] -> [..., D]; the forward runs the functional `mlp1`, as minivl's twin does.
    """

    def __init__(self, input_size: int, llm_hidden_size: int, eps: float = MLP1_LAYER_NORM_EPS):
        super().__init__(Norm(input_size, eps, kind="layer", bias=True), Linear(input_size, llm_hidden_size, True),
                         GELU(), Linear(llm_hidden_size, llm_hidden_size, True))

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = PROJECTOR_PREFIX, dtype="float32", device="cpu",
                        eps: float = MLP1_LAYER_NORM_EPS) -> "Projector":
        """Take the `prefix`-ed mlp1 tensors out of a (whole-model) state dict, cast to dtype on device."""
        fc1 = state_dict.get(prefix + "1.weight")
        if fc1 is None or len(fc1.shape) != 2:
            raise CheckpointError(f"{prefix}1.weight, the projector's first Linear [D, 4C], is "
                                  f"{'missing' if fc1 is None else f'of shape {tuple(fc1.shape)}'}; the checkpoint "
                                  f"is not an InternVL chat checkpoint or is damaged: re-convert it")
        llm_hidden_size, input_size = fc1.shape
        return build_model(cls, input_size, strip_prefix(state_dict, prefix), as_model_dtype(dtype), device,
                           llm_hidden_size=llm_hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 4C] -> [..., D]"""
        return mlp1(x, self[0].weight, self[0].bias, self[1].weight, self[1].bias,
                    self[3].weight, self[3].bias, self[0].eps)
