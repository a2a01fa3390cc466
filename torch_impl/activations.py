"""Elementwise nonlinearities: SiLU (SwiGLU decoders), exact GELU (InternViT, MPT) and tanh-GELU.

torch's kernels compute half inputs in float32 and round once, which is what the NumPy twins spell
out with promote(x.dtype, float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / swish (Elfwing et al., 2017; Ramachandran et al., 2017): x·σ(x), torch.nn.functional.silu.

    [...] -> [...]
    """
    # silu(x) = x / (1 + e^(−x))
    return F.silu(x)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, SwiGLU's gated product (the twin of minivl's one-buffer version). [...], [...] -> [...]"""
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU (Hendrycks & Gimpel, 2016), HF ACT2FN['gelu'] = torch gelu(approximate='none').

    [...] -> [...]
    """
    # gelu(x) = x · ½ · (1 + erf(x / √2))
    return F.gelu(x, approximate="none")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Tanh-approximated GELU (Hendrycks & Gimpel, 2016), torch gelu(approximate='tanh'), HF 'gelu_pytorch_tanh'.

    [...] -> [...]
    """
    # gelu(x) ≈ ½ · x · (1 + tanh(√(2/π) · (x + 0.044715·x³)))
    return F.gelu(x, approximate="tanh")


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """The twin of minivl's `gelu_fast`: F.gelu itself, whose CPU float32 erf is the A&S 7.1.26 that one spells out.

    [...] -> [...]
    """
    return F.gelu(x, approximate="none")
