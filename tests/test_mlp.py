"""SwiGLU, Phi-3 fused SwiGLU and GELU MLPs: NumPy vs torch twin vs transformers' own MLP modules."""
import math

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, Phi3Config
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.phi3.modeling_phi3 import Phi3MLP

from minivl import activations, mlp
from minivl.testing import assert_close, tolerance
from torch_impl import mlp as torch_mlp

DTYPES = ["float32", "float64"]
SHAPES = [(8, 16), (64, 172), (96, 256)]  # (hidden, intermediate)


def _abs_matmul(a, w):
    """|a|·|W|ᵀ in float64: the sum of absolute products that bounds a dot product's rounding error."""
    return np.abs(a.astype(np.float64)) @ np.abs(w.astype(np.float64)).T


def swiglu_error_scale(x, gate_w, up_w, down_w):
    """Forward error bound of down(silu(gate x)·up x), in units of eps, elementwise.

    Each matmul of length n errs by ≲ sqrt(n)·Σ|a||w| eps (Higham & Mary); silu is 1.1-Lipschitz,
    so h = silu(g)·u errs by ≲ 1.1·|u|·δg + |g|·δu (+1 ulp), and down() carries that through |W_down|
    before adding its own accumulation error.
    """
    x64 = x.astype(np.float64)
    g, u = x64 @ gate_w.astype(np.float64).T, x64 @ up_w.astype(np.float64).T
    h = activations.silu(g) * u
    sqrt_in, sqrt_inter = math.sqrt(x.shape[-1]), math.sqrt(gate_w.shape[0])
    delta_g, delta_u = sqrt_in * _abs_matmul(x, gate_w), sqrt_in * _abs_matmul(x, up_w)
    delta_h = 1.1 * np.abs(u) * delta_g + np.abs(g) * delta_u + 2 * np.abs(h)
    return np.abs(delta_h) @ np.abs(down_w.astype(np.float64)).T + sqrt_inter * _abs_matmul(h, down_w)


def _weights(rng, dtype, hidden, inter):
    gate = (rng.standard_normal((inter, hidden)) / math.sqrt(hidden)).astype(dtype)
    up = (rng.standard_normal((inter, hidden)) / math.sqrt(hidden)).astype(dtype)
    down = (rng.standard_normal((hidden, inter)) / math.sqrt(inter)).astype(dtype)
    x = rng.standard_normal((2, 5, hidden)).astype(dtype)
    return x, gate, up, down


def _load(module, **weights):
    module = module.to(next(iter(weights.values())).dtype)
    with torch.no_grad():
        for name, value in weights.items():
            module.get_submodule(name.rsplit(".", 1)[0]).get_parameter(name.rsplit(".", 1)[1]).copy_(value)
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inter", SHAPES)
def test_swiglu_numpy_vs_torch_twin_vs_llama_mlp(dtype, hidden, inter):
    rng = np.random.default_rng(hidden)
    x, gate, up, down = _weights(rng, dtype, hidden, inter)
    t = torch.from_numpy
    out = mlp.swiglu_mlp(x, gate, up, down)
    out_twin = torch_mlp.swiglu_mlp(t(x), t(gate), t(up), t(down))
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu", mlp_bias=False,
                         num_attention_heads=1, num_key_value_heads=1)
    llama = _load(LlamaMLP(config), **{"gate_proj.weight": t(gate), "up_proj.weight": t(up),
                                       "down_proj.weight": t(down)})
    with torch.no_grad():
        out_ref = llama(t(x))
    # tolerance: 2 × the forward error bound (each side is within it of the exact value)
    rtol, atol = tolerance(dtype, 0, atol_ulps=2, scale=swiglu_error_scale(x, gate, up, down))
    assert_close(out, out_twin, rtol=rtol, atol=atol, what=f"swiglu {dtype} numpy vs torch twin")
    assert_close(out, out_ref, rtol=rtol, atol=atol, what=f"swiglu {dtype} numpy vs LlamaMLP")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inter", SHAPES)
def test_fused_swiglu_numpy_vs_torch_twin_vs_phi3_mlp(dtype, hidden, inter):
    rng = np.random.default_rng(10 + hidden)
    x, gate, up, down = _weights(rng, dtype, hidden, inter)
    # Phi-3's gate_up_proj: rows [0, inter) are the gate, rows [inter, 2·inter) are up
    gate_up = np.concatenate([gate, up], axis=0)
    t = torch.from_numpy
    out = mlp.fused_swiglu_mlp(x, gate_up, down)
    out_twin = torch_mlp.fused_swiglu_mlp(t(x), t(gate_up), t(down))
    config = Phi3Config(hidden_size=hidden, intermediate_size=inter, hidden_act="silu",
                        num_attention_heads=1, num_key_value_heads=1)
    phi3 = _load(Phi3MLP(config), **{"gate_up_proj.weight": t(gate_up), "down_proj.weight": t(down)})
    with torch.no_grad():
        out_ref = phi3(t(x))
    rtol, atol = tolerance(dtype, 0, atol_ulps=2, scale=swiglu_error_scale(x, gate, up, down))
    assert_close(out, out_twin, rtol=rtol, atol=atol, what=f"fused swiglu {dtype} numpy vs torch twin")
    assert_close(out, out_ref, rtol=rtol, atol=atol, what=f"fused swiglu {dtype} numpy vs Phi3MLP")
    # the fused and the split forms are the same function: first half gate, second half up
    assert_close(out, mlp.swiglu_mlp(x, gate, up, down), rtol=rtol, atol=atol, what="fused vs split")
    swapped = mlp.fused_swiglu_mlp(x, np.concatenate([up, gate], axis=0), down)
    assert not np.allclose(swapped, out), "swapping the halves must change the result"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_mlp_numpy_vs_torch_twin_vs_clip_mlp(dtype, hidden, inter, approximate):
    rng = np.random.default_rng(20 + hidden)
    x, fc1, _, fc2 = _weights(rng, dtype, hidden, inter)
    b1, b2 = rng.standard_normal(inter).astype(dtype), rng.standard_normal(hidden).astype(dtype)
    t = torch.from_numpy
    out = mlp.gelu_mlp(x, fc1, b1, fc2, b2, approximate=approximate)
    out_twin = torch_mlp.gelu_mlp(t(x), t(fc1), t(b1), t(fc2), t(b2), approximate=approximate)
    # InternViT's InternMLP is fc2(act(fc1(x))) with biases, as CLIP's MLP is
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=1,
                              hidden_act="gelu_pytorch_tanh" if approximate else "gelu")
    clip = _load(CLIPMLP(config), **{"fc1.weight": t(fc1), "fc1.bias": t(b1), "fc2.weight": t(fc2),
                                     "fc2.bias": t(b2)})
    with torch.no_grad():
        out_ref = clip(t(x))
    # tolerance: as for SwiGLU: fc1's accumulation error through the 1.13-Lipschitz GELU, then fc2's
    x64 = x.astype(np.float64)
    h = x64 @ fc1.astype(np.float64).T + b1
    delta_h = 1.13 * (math.sqrt(hidden) * _abs_matmul(x, fc1) + np.abs(b1)) + 2 * np.abs(h)
    scale = delta_h @ np.abs(fc2.astype(np.float64)).T + math.sqrt(inter) * _abs_matmul(h, fc2) + np.abs(b2)
    rtol, atol = tolerance(dtype, 0, atol_ulps=2, scale=scale)
    assert_close(out, out_twin, rtol=rtol, atol=atol, what=f"gelu_mlp {dtype} numpy vs torch twin")
    assert_close(out, out_ref, rtol=rtol, atol=atol, what=f"gelu_mlp {dtype} numpy vs CLIPMLP")


def test_gelu_mlp_without_biases():
    """MPT no_bias=True: fc biases may be None."""
    rng = np.random.default_rng(5)
    x, fc1, _, fc2 = _weights(rng, "float64", 8, 16)
    expected = activations.gelu(x @ fc1.T) @ fc2.T
    # tolerance: float64, two short matmuls (n ≤ 16) in the same order: a few ulps of the sums
    rtol, atol = tolerance("float64", 8, scale=float(np.abs(expected).max()))
    assert_close(mlp.gelu_mlp(x, fc1, None, fc2, None), expected, rtol=rtol, atol=atol, what="no-bias gelu_mlp")
