"""Normalisation layers: RMSNorm in its two rounding orders (HF vs MPT) and LayerNorm.

"Computed in float32" in the references means promote(x.dtype, float32) here, so a float64 run
stays float64 end to end while a bf16/fp16/fp32 run follows the reference's upcast exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minivl.norms import _check_norm_args


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm (Zhang & Sennrich, 2019) as HF Llama, InternLM2, Phi-3 and InternViT compute it.

    [..., d], [d] -> [..., d] (dtype: promotion of weight and x, as in the reference)
    """
    _check_norm_args("rms_norm", x, weight, None, eps)
    compute = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(compute)
    # var = mean(x²) over the feature axis; y = x · 1/sqrt(var + eps)   (eps inside the root)
    variance = (x32 * x32).mean(-1, keepdim=True)
    y = x32 * torch.rsqrt(variance + eps)
    # cast back to x.dtype BEFORE the weight multiply: the reference rounds twice in bf16 (pitfall 3)
    return weight * y.to(x.dtype)


def rms_norm_fast(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The twin of minivl's `rms_norm_fast` (which saves NumPy's temporaries and threads long inputs): `rms_norm`.

    [..., d], [d] -> [..., d]
    """
    return rms_norm(x, weight, eps)

def rms_norm_mpt(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm as MPT (llm-foundry `norm.py`) computes it: the weight is applied in float32, then one cast.

    [..., d], [d] or None -> [..., d] (x.dtype)
    """
    _check_norm_args("rms_norm_mpt", x, weight, None, eps)
    compute = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(compute)
    # y = x · 1/sqrt(mean(x²) + eps) · w, all in float32; a single rounding to x.dtype at the end
    y = x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(compute)
    return y.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm (Ba et al., 2016) as torch.nn.LayerNorm computes it: biased variance, eps inside the root.

    weight/bias may be None (MPT `no_bias=True` removes the LayerNorm bias too, pitfall 29).
    [..., d], [d] | None, [d] | None -> [..., d] (x.dtype; statistics and affine in float32, one rounding)
    """
    _check_norm_args("layer_norm", x, weight, bias, eps)
    # y = (x − μ) / sqrt(var + eps) · w + b with var = mean((x − μ)²); F.layer_norm is what
    # nn.LayerNorm calls, and it keeps its statistics in float32 for half inputs
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_fast(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The twin of minivl's `layer_norm_fast` (which saves NumPy's temporaries and threads long inputs): `layer_norm`.

    [..., d], [d] | None, [d] | None -> [..., d]
    """
    return layer_norm(x, weight, bias, eps)
