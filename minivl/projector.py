"""The `mlp1` projector of InternVL: pixel-shuffled ViT features -> LLM embedding space.

`nn.Sequential(LayerNorm(4C), Linear(4C, D), GELU(), Linear(D, D))` in
`InternVLChatModel.__init__` (modeling_internvl_chat.py), so the checkpoint keys are
`mlp1.0.{weight,bias}` (LayerNorm), `mlp1.1.{weight,bias}` and `mlp1.3.{weight,bias}` (the
GELU at index 2 has no parameters). Two details that are easy to get wrong: the LayerNorm uses
PyTorch's default eps 1e-5 (not the ViT's 1e-6), and the GELU is the exact erf form.
"""
from __future__ import annotations

import numpy as np

from minivl import nn
from minivl.activations import gelu
from minivl.errors import CheckpointError
from minivl.linear import linear
from minivl.loading import strip_prefix
from minivl.models.common import Linear, Norm, as_model_dtype, build_model
from minivl.norms import layer_norm

# nn.LayerNorm's default eps: the reference never passes one (pitfall 4).
MLP1_LAYER_NORM_EPS = 1e-5
# where the projector sits in an InternVL chat checkpoint
PROJECTOR_PREFIX = "mlp1."


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
                         prefix: str = PROJECTOR_PREFIX) -> dict[str, tuple]:
    """Checkpoint tensor names and shapes of the projector (with `prefix`), from its declared parameters."""
    projector = Projector(projector_input_size(vit_hidden_size, downsample_ratio), llm_hidden_size)
    return {prefix + key: tuple(p.shape) for key, p in projector.state_dict().items()}


class GELU(nn.Module):
    """The exact erf GELU as a module without parameters: index 2 of the reference's Sequential."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        return gelu(x)


class Projector(nn.ModuleList):
    """LayerNorm(4C, eps 1e-5) -> Linear(4C, D) -> GELU -> Linear(D, D), keys 0/1/3 as the reference's Sequential.

    [..., 4C] -> [..., D]; the forward runs the functional `mlp1`, as torch_impl's twin does.
    """

    def __init__(self, input_size: int, llm_hidden_size: int, eps: float = MLP1_LAYER_NORM_EPS):
        super().__init__([Norm(input_size, eps, kind="layer", bias=True), Linear(input_size, llm_hidden_size, True),
                          GELU(), Linear(llm_hidden_size, llm_hidden_size, True)])

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = PROJECTOR_PREFIX, dtype="float32",
                        eps: float = MLP1_LAYER_NORM_EPS) -> "Projector":
        """Take the `prefix`-ed mlp1 tensors out of a (whole-model) state dict, cast to dtype.

        The sizes come from `{prefix}1.weight` [D, 4C]; every other tensor is checked against them.
        """
        fc1 = state_dict.get(prefix + "1.weight")
        if fc1 is None or np.ndim(fc1) != 2:
            raise CheckpointError(f"{prefix}1.weight, the projector's first Linear [D, 4C], is "
                                  f"{'missing' if fc1 is None else f'of shape {np.shape(fc1)}'}; the checkpoint "
                                  f"is not an InternVL chat checkpoint or is damaged: re-convert it")
        llm_hidden_size, input_size = np.shape(fc1)
        return build_model(cls, input_size, strip_prefix(state_dict, prefix), as_model_dtype(dtype),
                           llm_hidden_size=llm_hidden_size, eps=eps)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """[..., 4C] -> [..., D]"""
        return mlp1(x, self[0].weight, self[0].bias, self[1].weight, self[1].bias,
                    self[3].weight, self[3].bias, self[0].eps)
