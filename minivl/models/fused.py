"""Fused projections: Linear modules that read one input, computed with ONE GEMM.

`build_model` calls `fuse_projections(model)` after loading; Llama's (and Qwen2's) attention and MLP
then fuse q/k/v and gate/up, and their forward calls `project`. torch_impl/models/fused.py is the
same file in PyTorch.
"""
from __future__ import annotations

import numpy as np


class FusedProjection:
    """Several Linear modules that read the same input, their weights (and biases) views of ONE matrix.

    A speed device, not semantics: `project` then computes them with one GEMM instead of one per
    module (Llama's q/k/v, gate/up; fewer, larger GEMMs run nearer the machine's rate, and a decode
    step makes fewer calls). The modules keep their names, shapes and values, so state_dict() is
    unchanged. tests/test_fast_decoder.py holds the fused and separate paths equal.
    """

    def __init__(self, linears):
        self.weight = np.concatenate([linear.weight for linear in linears])
        self.bias = np.concatenate([linear.bias for linear in linears]) if linears[0].bias is not None else None
        ends = np.cumsum([linear.weight.shape[0] for linear in linears])
        self.bounds = list(zip([0, *ends[:-1]], ends))
        for linear, (start, stop) in zip(linears, self.bounds):
            linear.weight = self.weight[start:stop]
            if self.bias is not None:
                linear.bias = self.bias[start:stop]
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
    from minivl.linear import linear as affine

    fused = getattr(linears[0], "fused", None)
    if fused is None or not fused.serves(linears):
        return [linear(x) for linear in linears]
    y = affine(x, fused.weight, fused.bias)
    return [y[..., start:stop] for start, stop in fused.bounds]


def fused_projections(model) -> list:
    """Each FusedProjection that the modules of `model` hold, once (a framework-free walk: torch_impl imports it)."""
    found = {}
    for _, module in model.named_modules():
        fused = module.__dict__.get("fused")
        if fused is not None:
            found.setdefault(id(fused), fused)
    return list(found.values())


def fuse_projections(model) -> None:
    """Call `fuse_projections()` of every module that defines it (after loading: the weights are real)."""
    for _, module in model.named_modules():
        if hasattr(type(module), "fuse_projections"):
            module.fuse_projections()
