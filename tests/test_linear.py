"""minivl.linear vs torch_impl.linear vs torch.nn.Linear, float32 and float64."""
import math

import numpy as np
import pytest
import torch

from minivl.linear import linear
from minivl.testing import assert_close, tolerance
from torch_impl.linear import linear as torch_linear

DTYPES = ["float32", "float64"]


def matmul_error_scale(x, weight):
    """sqrt(n)·(|x|·|W|ᵀ): rounding error of x·Wᵀ is below ~this many eps (Higham & Mary's
    probabilistic bound for a length-n dot product), elementwise."""
    n = weight.shape[1]
    return math.sqrt(n) * (np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_linear_numpy_matches_torch_twin_and_nn_linear(dtype, seed):
    rng = np.random.default_rng(seed)
    n_in, n_out = int(rng.integers(1, 300)), int(rng.integers(1, 200))
    lead = tuple(int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 4))))
    x = rng.standard_normal(lead + (n_in,)).astype(dtype)
    weight = (rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)).astype(dtype)
    bias = rng.standard_normal(n_out).astype(dtype) if seed % 2 else None

    out = linear(x, weight, bias)
    out_torch = torch_linear(torch.from_numpy(x), torch.from_numpy(weight),
                             None if bias is None else torch.from_numpy(bias))
    module = torch.nn.Linear(n_in, n_out, bias=bias is not None, dtype=getattr(torch, dtype))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            module.bias.copy_(torch.from_numpy(bias))
        out_module = module(torch.from_numpy(x))
    assert out.shape == lead + (n_out,) and out.dtype == np.dtype(dtype)

    # tolerance: both sides round the same n_in-term dot products in a different summation order
    # (BLAS blocking), so each may be off by ~sqrt(n)·eps·Σ|x||w|; 2 such errors, plus 2 ulps for
    # the bias add (rtol)
    scale = matmul_error_scale(x, weight) + (0 if bias is None else np.abs(bias))
    rtol, atol = tolerance(dtype, 2, atol_ulps=2, scale=scale)
    assert_close(out, out_torch, rtol=rtol, atol=atol, what=f"linear {dtype} numpy vs torch twin")
    assert_close(out, out_module, rtol=rtol, atol=atol, what=f"linear {dtype} numpy vs nn.Linear")


def test_linear_float32_is_close_to_float64_truth():
    """The float32 result is within the dot-product error bound of the exact (float64) value."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5, 512))
    weight = rng.standard_normal((64, 512)) / math.sqrt(512)
    # the truth is computed without the code under test: float64 einsum, ~1e-16 relative, far below
    # the float32 error being bounded
    truth = np.einsum("...i,oi->...o", x, weight)
    out32 = linear(x.astype(np.float32), weight.astype(np.float32))
    assert out32.dtype == np.float32
    # tolerance: inputs rounded to float32 (1 ulp each, so ~2 ulps of every product) and the float32
    # dot-product accumulation (~sqrt(n)·eps·Σ|x||w|): 2·eps·scale covers both
    x32, w32 = x.astype(np.float32), weight.astype(np.float32)
    rtol, atol = tolerance("float32", 0, atol_ulps=2, scale=matmul_error_scale(x32, w32))
    assert_close(out32, truth, rtol=rtol, atol=atol, what="linear float32 vs float64")
