"""Feed-forward blocks: SwiGLU (InternLM2, Llama, Qwen2, Phi-3 fused) and GELU MLP (InternViT, MPT)."""
from __future__ import annotations

import numpy as np

from minivl.activations import gelu, gelu_tanh, silu_mul
from minivl.errors import ConfigError, ShapeError
from minivl.linear import linear


def swiglu_mlp(x: np.ndarray, gate_weight: np.ndarray, up_weight: np.ndarray, down_weight: np.ndarray) -> np.ndarray:
    """SwiGLU feed-forward (Shazeer, 2020) as HF LlamaMLP / InternLM2 (w1 = gate, w3 = up, w2 = down).

    [..., hidden], [inter, hidden], [inter, hidden], [hidden, inter] -> [..., hidden]
    """
    _check_pair("swiglu_mlp", "gate_weight", gate_weight, "up_weight", up_weight)
    _check_down("swiglu_mlp", down_weight, gate_weight.shape[0])
    # down( silu(gate(x)) · up(x) ), no biases
    return linear(silu_mul(linear(x, gate_weight), linear(x, up_weight)), down_weight)


def fused_swiglu_mlp(x: np.ndarray, gate_up_weight: np.ndarray, down_weight: np.ndarray) -> np.ndarray:
    """Phi-3's SwiGLU with one fused `gate_up_proj`: the first half of the outputs is the gate, the second up.

    [..., hidden], [2·inter, hidden], [hidden, inter] -> [..., hidden]
    """
    if gate_up_weight.ndim != 2 or gate_up_weight.shape[0] % 2:
        raise ShapeError(f"fused_swiglu_mlp: gate_up_weight must be [2·intermediate, hidden] with an even "
                         f"number of rows, got {tuple(gate_up_weight.shape)}; for separate gate/up "
                         f"weights use swiglu_mlp")
    intermediate = gate_up_weight.shape[0] // 2
    _check_down("fused_swiglu_mlp", down_weight, intermediate)
    gate_up = linear(x, gate_up_weight)
    # chunk(2, dim=-1): [..., :inter] is the gate, [..., inter:] is up (MP3:262-273)
    gate, up = gate_up[..., :intermediate], gate_up[..., intermediate:]
    return linear(silu_mul(gate, up), down_weight)


def gelu_mlp(x: np.ndarray, fc1_weight: np.ndarray, fc1_bias: np.ndarray | None, fc2_weight: np.ndarray,
             fc2_bias: np.ndarray | None, approximate: bool | str = False) -> np.ndarray:
    """Two-layer GELU MLP: InternViT `InternMLP` (fc1/fc2) and MPT's FFN (up_proj/down_proj), exact erf GELU.

    approximate=True (or "tanh") selects the tanh GELU instead.
    [..., hidden], [inter, hidden], [inter], [hidden, inter], [hidden] -> [..., hidden]
    """
    if approximate not in (False, True, "none", "tanh"):
        raise ConfigError(f"gelu_mlp: approximate must be False/'none' (exact erf) or True/'tanh', got "
                         f"{approximate!r}")
    activation = gelu_tanh if approximate in (True, "tanh") else gelu
    if fc1_weight.ndim == 2:
        _check_down("gelu_mlp", fc2_weight, fc1_weight.shape[0], name="fc2_weight")
    # fc2( gelu( fc1(x) ) )
    return linear(activation(linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def _check_pair(fn, name_a, a, name_b, b) -> None:
    """gate and up projections must be the same [inter, hidden] matrix shape."""
    if a.ndim != 2 or tuple(a.shape) != tuple(b.shape):
        raise ShapeError(f"{fn}: {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must both be "
                         f"[intermediate, hidden]; check that the checkpoint keys were not swapped")


def _check_down(fn, down_weight, intermediate, name="down_weight") -> None:
    """down projection must map intermediate back to hidden: [hidden, inter]."""
    if down_weight.ndim != 2 or down_weight.shape[1] != intermediate:
        raise ShapeError(f"{fn}: {name} must be [hidden, {intermediate}] (torch Linear layout [out, in]), "
                         f"got {tuple(down_weight.shape)}; a [{intermediate}, hidden] weight needs a transpose")
