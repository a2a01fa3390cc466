"""Elementwise nonlinearities: SiLU (SwiGLU decoders), exact GELU (InternViT, MPT) and tanh-GELU.

Each computes in promote(x.dtype, float32) and rounds once back to x.dtype, which is what torch's
kernels do for bf16/fp16 inputs (and a no-op for float32/float64).
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
from scipy.special import erf

from minivl.threads import num_threads, parallel, split

# below this many elements an activation stays on the caller's thread: a hand-off costs ~10 µs, and a
# short pass right after a GEMM runs while OpenBLAS's idle worker still spins on the other core
# (a 64-token prefill's [64, 1536] SiLU gained nothing from a second thread)
_PARALLEL_MIN_ELEMENTS = 1 << 18


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
    if np.promote_types(gate.dtype, np.float32) != gate.dtype or up.dtype != gate.dtype or up.shape != gate.shape:
        return silu(gate) * up  # a half-precision gate upcasts (the buffers differ in dtype), or up broadcasts
    out = np.empty(gate.shape, gate.dtype)
    if gate.size < _PARALLEL_MIN_ELEMENTS:  # a decode step's one row: no hand-off
        _silu_mul_into(gate, up, out)
        return out
    # rows of a prefill's [s, intermediate] on every core at once (minivl/threads.py)
    rows = [a.reshape(-1, gate.shape[-1]) for a in (gate, up, out)]
    pieces = split(len(rows[2]), num_threads(), minimum=-(-_PARALLEL_MIN_ELEMENTS // max(gate.shape[-1], 1)))
    parallel(partial(_silu_mul_into, *(a[piece] for a in rows)) for piece in pieces)
    return out


def _silu_mul_into(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    """out = silu(gate) · up: e^(−x), then 1 + e^(−x), then x / (1 + e^(−x)), then · up, all in `out`."""
    np.negative(gate, out=out)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU (Hendrycks & Gimpel, 2016), HF ACT2FN['gelu'] = torch gelu(approximate='none').

    [...] -> [...]
    """
    compute = np.promote_types(x.dtype, np.float32)
    x32 = x.astype(compute, copy=False)
    # gelu(x) = x · Φ(x) = x · ½ · (1 + erf(x / √2))
    y = x32 * 0.5 * (1.0 + erf(x32 * (1.0 / math.sqrt(2.0))))
    return y.astype(x.dtype, copy=False)


# Abramowitz & Stegun 7.1.26 (Hastings): for a >= 0, erf(a) ≈ 1 − (p1·t + … + p5·t⁵)·e^(−a²) with
# t = 1/(1 + p·a), |error| <= 1.5e-7. torch's CPU kernel evaluates exactly this for float32
# (aten/src/ATen/cpu/vec/vec512/vec512_float.h, Vectorized<float>::erf), so F.gelu does too.
ERF_P = 0.3275911
ERF_COEFFICIENTS = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # p5 … p1, Horner order


def gelu_fast(x: np.ndarray, chunk: int = 1 << 17) -> np.ndarray:
    """`gelu` for float32 with torch CPU's own erf (A&S 7.1.26, vectorisable), cache-sized chunk by chunk.

    scipy's erf is a scalar loop (~20 ns an element, most of a ViT layer's non-GEMM time); this is
    21 vectorised passes of the same formula, rearranged as ½·(x + |x|·erf(|x|/√2)) with
    erf(a) = 1 − (e^(−a²)·t)·r (`_gelu_fast_chunk`), over `chunk` elements at a time so that the
    passes run in the L2 cache. It differs from `gelu` by at most A&S's 1.5e-7 in erf, i.e. ~0.6
    ulp·|x| in the output, plus the passes' roundings (tests/test_vision_fast.py), and from torch's
    F.gelu, the same erf in another order, by as little. Other dtypes: `gelu` itself (float64 needs
    a real erf).
    [...] -> [...]
    """
    if x.dtype != np.float32:
        return gelu(x)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)

    def gelu_span(span: slice) -> None:  # one thread's share, chunk by chunk, with scratch buffers of its own
        t, r = np.empty(min(chunk, flat[span].size), np.float32), np.empty(min(chunk, flat[span].size), np.float32)
        for start in range(span.start, span.stop, chunk):  # chunks of one flat array: no per-token loop
            stop = min(start + chunk, span.stop)
            _gelu_fast_chunk(flat[start:stop], out[start:stop], t[:stop - start], r[:stop - start])

    # contiguous shares of the flat array on every core at once (minivl/threads.py)
    parallel(partial(gelu_span, span) for span in split(flat.size, num_threads(), minimum=max(chunk, _PARALLEL_MIN_ELEMENTS)))
    return out.reshape(x.shape)


def _gelu_fast_chunk(x: np.ndarray, z: np.ndarray, t: np.ndarray, r: np.ndarray) -> None:
    """z = gelu(x) by A&S 7.1.26, t and r scratch buffers of x's size. [n], [n], [n], [n] -> None

    x·Φ(x) = ½·(x + |x|·erf(|x|/√2)) for either sign of x (erf is odd: x·erf(x/√2) = |x|·erf(|x|/√2)),
    which needs no sign of erf: 21 cheap passes where torch's order, x·½·(1 + sign(x)·erf(|x|/√2)),
    took 24 here, two of them bit operations (NumPy's copysign is a scalar loop), and 1.33× the time
    (1025 × 1536, two threads). Zeros: −0, and a negative x whose GELU underflows, give +0 where
    torch gives −0 (x + |x|·erf = −0 + 0). x = +inf gives inf·1 + inf = inf as `gelu` does (torch's
    F.gelu: NaN), −inf gives NaN as both do.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # x² = inf for |x| > 1e19: e^(−inf) = 0; −inf + inf
        # r = |x|, t = 1 / (1 + p·|x|/√2)
        np.abs(x, out=r)
        np.multiply(r, ERF_P / math.sqrt(2.0), out=t)
        t += 1.0
        np.divide(1.0, t, out=t)
        # z = ((((p5·t + p4)·t + p3)·t + p2)·t + p1)·t
        p5, p4, p3, p2, p1 = ERF_COEFFICIENTS
        np.multiply(t, p5, out=z)
        for coefficient in (p4, p3, p2, p1):  # four Horner steps, not a loop over data
            z += coefficient
            z *= t
        # 1 − erf(|x|/√2) = z·e^(−x²/2), so erf(|x|/√2) = 1 − z·e^(−x²/2)
        np.multiply(x, -0.5, out=t)
        t *= x
        np.exp(t, out=t)
        z *= t
        np.subtract(1.0, z, out=z)
        # gelu(x) = ½·(x + |x|·erf(|x|/√2))
        z *= r
        z += x
        z *= 0.5


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
