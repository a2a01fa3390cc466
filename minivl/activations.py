"""Elementwise nonlinearities: SiLU (SwiGLU decoders), exact GELU (InternViT, MPT) and tanh-GELU.

Each computes in promote(x.dtype, float32) and rounds once back to x.dtype, which is what torch's
kernels do for bf16/fp16 inputs (and a no-op for float32/float64).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish (Elfwing et al., 2017; Ramachandran et al., 2017): x·σ(x), torch.nn.functional.silu.

    [...] -> [...]
    """
    compute = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(compute, copy=False)
    # silu(x) = x / (1 + e^(−x)); e^(−x) = inf for very negative x gives the correct limit −0
    with np.errstate(over="ignore"):
        y = x32 / (1.0 + np.exp(-x32))
    return y.astype(x.dtype, copy=False)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) · up, SwiGLU's gated product, bit for bit as `silu(gate) * up` but in one buffer.

    The same operations in the same order, each written into the buffer `silu` would have
    allocated anew (a prefill's [s, intermediate] temporaries are the largest after the scores).
    [...], [...] -> [...]
    """
    if np.promote_types(gate.dtype, np.float32) != gate.dtype or up.dtype != gate.dtype:
        return silu(gate) * up  # a half-precision gate upcasts: the buffers differ in dtype
    # e^(−x), then 1 + e^(−x), then x / (1 + e^(−x)), then · up, all in `out`
    out = np.negative(gate)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU (Hendrycks & Gimpel, 2016), HF ACT2FN['gelu'] = torch gelu(approximate='none').

    [...] -> [...]
    """
    compute = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(compute, copy=False)
    # gelu(x) = x · Φ(x) = x · ½ · (1 + erf(x / √2))
    y = x32 * 0.5 * (1.0 + erf(x32 * (1.0 / math.sqrt(2.0))))
    return y.astype(x.dtype, copy=False)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """Tanh-approximated GELU (Hendrycks & Gimpel, 2016), torch gelu(approximate='tanh'), HF 'gelu_pytorch_tanh'.

    [...] -> [...]
    """
    compute = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(compute, copy=False)
    # gelu(x) ≈ ½ · x · (1 + tanh(√(2/π) · (x + 0.044715·x³)))
    inner = math.sqrt(2.0 / math.pi) * (x32 + 0.044715 * x32 * x32 * x32)
    y = 0.5 * x32 * (1.0 + np.tanh(inner))
    return y.astype(x.dtype, copy=False)
