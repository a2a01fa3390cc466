"""silu, exact gelu, tanh gelu: NumPy vs torch twin vs torch.nn.functional vs Python's math library."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivl import activations
from minivl.testing import assert_close, tolerance
from torch_impl import activations as torch_activations

DTYPES = ["float32", "float64"]
NAMES = ["silu", "gelu", "gelu_tanh"]
TORCH_REFERENCE = {
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def _math_reference(name, x):
    """The textbook formulas, evaluated with Python's own libm in float64, one scalar at a time."""
    if name == "silu":
        return x / (1.0 + math.exp(-x)) if x > -700 else 0.0
    if name == "gelu":
        return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _grid(dtype):
    """Dense on [−12, 12], plus the tails and signed zeros where the formulas saturate."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-12, 12, 2001), rng.standard_normal(2000) * 4,
                        [-1e4, -100.0, -30.0, -1e-30, -0.0, 0.0, 1e-30, 30.0, 100.0, 1e4]])
    return x.astype(dtype)


def _tol(dtype, x):
    # tolerance: each value is a handful of correctly-or-nearly-rounded libm calls (exp, erf, tanh)
    # and products: 8 ulps relative. For x ≪ 0, gelu = x·½(1 + erf(x/√2)) cancels in 1 + erf: an
    # erf that is 1 ulp off becomes an absolute error ~eps·|x|, hence atol = 8 ulps × |x|
    return tolerance(dtype, 8, atol_ulps=8, scale=np.abs(x.astype(np.float64)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_numpy_vs_torch_twin_vs_functional(name, dtype):
    x = _grid(dtype)
    out = getattr(activations, name)(x)
    out_twin = getattr(torch_activations, name)(torch.from_numpy(x))
    out_ref = TORCH_REFERENCE[name](torch.from_numpy(x))
    assert out.dtype == np.dtype(dtype) and np.isfinite(out).all()
    rtol, atol = _tol(dtype, x)
    assert_close(out, out_twin, rtol=rtol, atol=atol, what=f"{name} {dtype} numpy vs torch twin")
    assert_close(out, out_ref, rtol=rtol, atol=atol, what=f"{name} {dtype} numpy vs torch.nn.functional")


@pytest.mark.parametrize("name", NAMES)
def test_float64_numpy_vs_python_math(name):
    """An implementation-independent check: Python's math module (scalar libm calls)."""
    x = _grid("float64")
    out = getattr(activations, name)(x)
    expected = np.array([_math_reference(name, float(v)) for v in x])
    rtol, atol = _tol("float64", x)
    assert_close(out, expected, rtol=rtol, atol=atol, what=f"{name} float64 vs math")


@pytest.mark.parametrize("name", NAMES)
def test_bf16_torch_twin_and_numpy_round_once(name):
    """torch's bf16 kernels compute in float32 and round once: within ½ bf16 ulp of the float64 value
    (plus a float32 ulp's worth of slack); the NumPy twin on ml_dtypes bf16 does the same."""
    x = _grid("float32")
    x = x[np.abs(x) < 1e3]
    x_bf16 = torch.from_numpy(x).to(torch.bfloat16)
    exact = getattr(activations, name)(x_bf16.double().numpy())
    out_twin = getattr(torch_activations, name)(x_bf16)
    out_numpy = getattr(activations, name)(x_bf16.float().numpy().astype(ml_dtypes.bfloat16))
    # tolerance: one rounding to bf16 is ≤ ½ ulp ≤ 2^-8 relative; 1 bf16 ulp leaves room for the
    # float32 intermediate, plus the absolute cancellation term of _tol in float32
    rtol, _ = tolerance("bfloat16", 1)
    _, atol = _tol("float32", x)
    assert_close(out_twin, exact, rtol=rtol, atol=atol, what=f"{name} bf16 torch vs float64")
    assert_close(out_numpy.astype(np.float64), exact, rtol=rtol, atol=atol, what=f"{name} bf16 numpy vs float64")


def test_known_values():
    """Literal values: silu(0)=0, silu(1)=1/(1+e⁻¹), gelu(1)=Φ(1)=0.8413447460685429, tails."""
    assert activations.silu(np.array([0.0]))[0] == 0.0
    assert activations.silu(np.array([1.0]))[0] == pytest.approx(0.7310585786300049, rel=1e-15)
    assert activations.gelu(np.array([1.0]))[0] == pytest.approx(0.8413447460685429, rel=1e-15)
    assert activations.gelu_tanh(np.array([1.0]))[0] == pytest.approx(0.8411919906082768, rel=1e-15)
    big = np.array([-1e4, 1e4], dtype=np.float32)
    np.testing.assert_array_equal(activations.silu(big), [0.0, 1e4])
    np.testing.assert_array_equal(activations.gelu(big), [0.0, 1e4])
