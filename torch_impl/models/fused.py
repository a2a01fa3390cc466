"""Fused projections in PyTorch: the mirror of minivl/models/fused.py."""
from __future__ import annotations

import torch
from torch import nn

from minivl.models.fused import fused_projections  # noqa: F401  (framework-free: written once)


class FusedProjection:
    """Several Linear modules that read the same input, their weights (and biases) views of ONE matrix.

    The mirror of minivl.models.fused.FusedProjection: `project` computes them with one GEMM; the
    modules keep their names, shapes and values (each Parameter a view into the fused storage).
    """

    def __init__(self, linears):
        self.weight = torch.cat([linear.weight for linear in linears])
        self.bias = torch.cat([linear.bias for linear in linears]) if linears[0].bias is not None else None
        ends = torch.tensor([linear.weight.shape[0] for linear in linears]).cumsum(0).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends))
        for linear, (start, stop) in zip(linears, self.bounds):
            linear.weight = nn.Parameter(self.weight[start:stop], requires_grad=False)
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias[start:stop], requires_grad=False)
            linear.fused = self
        self.views = [linear.weight for linear in linears]

    def serves(self, linears) -> bool:
        """True while these are still the fused modules, in order, holding the views (no reload since)."""
        return len(linears) == len(self.views) and all(linear.weight is view for linear, view in zip(linears, self.views))


def fuse_linears(*linears) -> None:
    """Make these Linear modules (same input width, all biased or none) one FusedProjection."""
    if len({linear.weight.shape[1] for linear in linears}) == 1 and len({linear.bias is None for linear in linears}) == 1:
        FusedProjection(linears)


def project(x, *linears) -> list:
    """[linear(x) for linear in linears], as one GEMM split by columns when they are one FusedProjection."""
    from torch_impl.linear import linear as affine

    fused = getattr(linears[0], "fused", None)
    if fused is None or not fused.serves(linears):
        return [linear(x) for linear in linears]
    y = affine(x, fused.weight, fused.bias)
    return [y[..., start:stop] for start, stop in fused.bounds]


def fuse_projections(model) -> None:
    """Call `fuse_projections()` of every module that defines it (after loading: the weights are real)."""
    for _, module in model.named_modules():
        if hasattr(type(module), "fuse_projections"):
            module.fuse_projections()
