"""Normalisation layers: RMSNorm in its two rounding orders (HF vs MPT) and LayerNorm.

"Computed in float32" in the references means promote(x.dtype, float32) here, so a float64 run
stays float64 end to end while a float32 (or bf16, via ml_dtypes) run follows the reference's
upcast exactly.
"""
from __future__ import annotations

import numbers
from functools import partial

import numpy as np

from minivl.errors import ConfigError, ShapeError


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Root-mean-square norm (Zhang & Sennrich, 2019) as HF Llama, InternLM2, Phi-3 and InternViT compute it.

    [..., d], [d] -> [..., d] (dtype: promotion of weight and x, as in the reference)
    """
    _check_norm_args("rms_norm", x, weight, None, eps)
    compute = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(compute, copy=False)
    # var = mean(x²) over the feature axis; y = x · 1/sqrt(var + eps)   (eps inside the root)
    variance = np.mean(x32 * x32, axis=-1, keepdims=True)
    y = x32 * (1.0 / np.sqrt(variance + eps))
    # cast back to x.dtype BEFORE the weight multiply: the reference rounds twice in bf16 (pitfall 3)
    return weight * y.astype(x.dtype, copy=False)


def rms_norm_fast(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """`rms_norm` bit for bit, for float32/float64 x and weight, in one output buffer (the models' fast path).

    The same operations on the same numbers: x·x, its row sums (np.mean is np.add.reduce, then a
    division by the count), + eps, √, 1/·, x·(1/√·), weight·y; each written into the buffer the
    result needs, where `rms_norm` allocates four arrays of x's size. Rows are independent, so
    the rows of a long input run on every core at once (minivl/threads.py), the same calls on each.
    Any other case (another dtype, a non-contiguous x, whose product NumPy would sum in another
    order) is `rms_norm` itself. tests/test_norms.py holds the two bit-equal.
    [..., d], [d] -> [..., d]
    """
    _check_norm_args("rms_norm", x, weight, None, eps)
    if not (weight is not None and x.dtype == weight.dtype and x.dtype in (np.float32, np.float64) and x.flags.c_contiguous and x.size):
        return rms_norm(x, weight, eps)
    from minivl.threads import num_threads, parallel, split

    out = np.empty_like(x)
    rows, out_rows = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])

    def normalize(piece: slice) -> None:
        x_piece, y = rows[piece], out_rows[piece]
        np.multiply(x_piece, x_piece, out=y)
        variance = np.add.reduce(y, axis=-1, keepdims=True)
        variance /= x.shape[-1]
        variance += eps
        np.sqrt(variance, out=variance)
        np.divide(1.0, variance, out=variance)
        np.multiply(x_piece, variance, out=y)
        y *= weight

    minimum = -(-_PARALLEL_MIN_ELEMENTS // x.shape[-1])  # rows in a piece
    parallel(partial(normalize, piece) for piece in split(len(rows), num_threads(), minimum=minimum))
    return out


# a thread's share of a norm is at least this many elements: a 512-token prefill's [512, 576] norm ran
# faster on one thread (0.31 ms) than on two (0.36), a [1025, 576] one faster on two (0.48-0.53 ms
# against 0.72-0.75; 2-core Xeon)
_PARALLEL_MIN_ELEMENTS = 1 << 18


def rms_norm_mpt(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """RMSNorm as MPT (llm-foundry `norm.py`) computes it: the weight is applied in float32, then one cast.

    [..., d], [d] or None -> [..., d] (x.dtype)
    """
    _check_norm_args("rms_norm_mpt", x, weight, None, eps)
    compute = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(compute, copy=False)
    # y = x · 1/sqrt(mean(x²) + eps) · w, all in float32; a single rounding to x.dtype at the end
    y = x32 * (1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    if weight is not None:
        y = y * weight.astype(compute, copy=False)
    return y.astype(x.dtype, copy=False)


def layer_norm(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """LayerNorm (Ba et al., 2016) as torch.nn.LayerNorm computes it: biased variance, eps inside the root.

    weight/bias may be None (MPT `no_bias=True` removes the LayerNorm bias too, pitfall 29).
    [..., d], [d] | None, [d] | None -> [..., d] (x.dtype; statistics and affine in float32, one rounding)
    """
    _check_norm_args("layer_norm", x, weight, bias, eps)
    compute = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(compute, copy=False)
    mean = np.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    # biased variance: mean((x − μ)²), divided by d not d − 1
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    # y = (x − μ) / sqrt(var + eps) · w + b, each step written into `centred` (our own buffer)
    y = centred
    y *= 1.0 / np.sqrt(variance + eps)
    if weight is not None:
        y *= weight.astype(compute, copy=False)
    if bias is not None:
        y += bias.astype(compute, copy=False)
    return y.astype(x.dtype, copy=False)


def layer_norm_fast(x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float) -> np.ndarray:
    """`layer_norm` bit for bit, for float32/float64 x (and weight, bias), in one output buffer (the models' fast path).

    The same operations on the same numbers: the row sums of x (np.mean is np.add.reduce, then a
    division by the count), x − μ, its squares and their row sums, + eps, √, 1/·, (x − μ)·(1/√·),
    ·weight, +bias; each written into the output or into one scratch buffer for the squares, where
    `layer_norm` allocates four arrays of x's size. Rows are independent,
    so the rows of a long input (a ViT's 1025 tokens) run on every core at once
    (minivl/threads.py), the same calls on each. Any other case (another dtype, a non-contiguous
    x) is `layer_norm` itself. tests/test_norms.py holds the two bit-equal.
    [..., d], [d] | None, [d] | None -> [..., d]
    """
    _check_norm_args("layer_norm", x, weight, bias, eps)
    same_dtype = all(param is None or param.dtype == x.dtype for param in (weight, bias))
    if not (same_dtype and x.dtype in (np.float32, np.float64) and x.flags.c_contiguous and x.size):
        return layer_norm(x, weight, bias, eps)
    from minivl.threads import num_threads, parallel, split

    d = x.shape[-1]
    out, scratch = np.empty_like(x), np.empty_like(x)  # (allocated here, not in the threads: malloc's own arenas)
    rows, out_rows, scratch_rows = x.reshape(-1, d), out.reshape(-1, d), scratch.reshape(-1, d)

    def normalize(piece: slice) -> None:
        x_piece, y, squares = rows[piece], out_rows[piece], scratch_rows[piece]
        # μ = Σx / d, then y = x − μ
        mean = np.add.reduce(x_piece, axis=-1, keepdims=True)
        mean /= d
        np.subtract(x_piece, mean, out=y)
        # var = Σ(x − μ)² / d (biased), then 1/√(var + eps)
        np.multiply(y, y, out=squares)
        variance = np.add.reduce(squares, axis=-1, keepdims=True)
        variance /= d
        variance += eps
        np.sqrt(variance, out=variance)
        np.divide(1.0, variance, out=variance)
        # y = (x − μ)·(1/√(var + eps))·w + b
        y *= variance
        if weight is not None:
            y *= weight
        if bias is not None:
            y += bias

    minimum = -(-_LAYER_NORM_MIN_ELEMENTS // d)  # rows in a piece
    parallel(partial(normalize, piece) for piece in split(len(rows), num_threads(), minimum=minimum))
    return out


# a thread's share of a LayerNorm is at least this many elements: handing half to the second core costs
# ~0.2 ms on a 2-core VM here, so [683, 384] (262k elements) took 0.49 ms on one thread and on two, a
# 448-px DINOv2's [1025, 384] 0.77 ms on one and 0.61 on two, [512, 384] 0.34 on one and 0.43 on two
_LAYER_NORM_MIN_ELEMENTS = 1 << 17


def _check_norm_args(name, x, weight, bias, eps) -> None:
    """ShapeError for a weight/bias that is not [d] with d = x.shape[-1]; ConfigError for a bad eps."""
    if x.ndim < 1:
        raise ShapeError(f"{name}: x must have a feature axis, got a scalar; pass [..., d]")
    d = x.shape[-1]
    for what, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (d,):
            raise ShapeError(f"{name}: {what} must have shape ({d},) to match x {tuple(x.shape)}, got "
                             f"{tuple(param.shape)}; norms act on the last axis only")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ConfigError(f"{name}: eps must be a number >= 0 (the config's rms_norm_eps / layer_norm_eps), "
                          f"got {eps!r}")
