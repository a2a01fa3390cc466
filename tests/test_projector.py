"""The mlp1 projector (minivl/projector.py, torch_impl/projector.py).

Three-way check: NumPy vs the torch twin, and both vs the reference's own modules
(nn.Sequential(nn.LayerNorm(4C), nn.Linear, nn.GELU(), nn.Linear) called module by module),
in float32 and float64.
"""
import numpy as np
import pytest
import torch
from torch import nn

from minivl.projector import MLP1_LAYER_NORM_EPS, Projector, mlp1_expected_shapes, projector_input_size
from minivl.testing import assert_close, tolerance
from torch_impl.projector import Projector as TorchProjector

C, D = 16, 24          # ViT width, LLM width; 4C = 64 after pixel shuffle with ratio 0.5


def reference_modules(state: dict, dtype) -> nn.Sequential:
    """The reference's mlp1, built from nn modules exactly as InternVLChatModel.__init__ does."""
    ref = nn.Sequential(nn.LayerNorm(4 * C), nn.Linear(4 * C, D), nn.GELU(), nn.Linear(D, D)).to(dtype)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return ref


def random_state(rng, dtype):
    state = {
        "0.weight": 1 + 0.1 * rng.standard_normal(4 * C), "0.bias": 0.1 * rng.standard_normal(4 * C),
        "1.weight": rng.standard_normal((D, 4 * C)) / 8, "1.bias": 0.1 * rng.standard_normal(D),
        "3.weight": rng.standard_normal((D, D)) / 5, "3.bias": 0.1 * rng.standard_normal(D),
    }
    return {name: value.astype(dtype) for name, value in state.items()}


@pytest.mark.parametrize("np_dtype, torch_dtype", [(np.float32, torch.float32), (np.float64, torch.float64)])
def test_numpy_torch_and_reference_modules_agree(np_dtype, torch_dtype, rng):
    state = random_state(rng, np_dtype)
    x = (3 * rng.standard_normal((2, 4, 4 * C)) + 0.5).astype(np_dtype)

    ours = Projector.from_state_dict({"mlp1." + k: v for k, v in state.items()}, dtype=np_dtype)(x)
    twin = TorchProjector(4 * C, D).to(torch_dtype)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x))
        reference = reference_modules(state, torch_dtype)(torch.from_numpy(x))
    assert ours.dtype == np_dtype and ours.shape == (2, 4, D)
    # LayerNorm over 64 features, two matmuls of depth 64 and 24 and an erf: each element is a sum of
    # <= 64 rounded products of O(1) terms, summed in a different order by BLAS and by NumPy; 64 ulps
    # of the dtype relative, and the same times the output scale (~2) absolute for values near 0.
    rtol, atol = tolerance(np_dtype, 64, 64, scale=2.0)
    c = assert_close(ours, reference, rtol=rtol, atol=atol, what="NumPy mlp1 vs nn.Sequential")
    print(f"mlp1 {np.dtype(np_dtype).name}: NumPy vs nn.Sequential {c}")
    assert_close(theirs, reference, rtol=rtol, atol=atol, what="torch mlp1 vs nn.Sequential")
    assert_close(ours, theirs, rtol=rtol, atol=atol, what="NumPy vs torch mlp1")


def test_eps_is_torch_default_not_the_vit_one(rng):
    # a near-constant input makes the variance tiny, so eps dominates: 1e-5 and 1e-6 differ visibly
    state = random_state(rng, np.float64)
    x = 1.0 + 1e-4 * rng.standard_normal((1, 1, 4 * C))
    y = Projector.from_state_dict({"mlp1." + k: v for k, v in state.items()}, dtype=np.float64)(x)
    ref = reference_modules(state, torch.float64)(torch.from_numpy(x)).detach().numpy()
    assert MLP1_LAYER_NORM_EPS == 1e-5
    rtol, atol = tolerance("float64", 64, 64, scale=2.0)
    assert_close(y, ref, rtol=rtol, atol=atol, what="mlp1 with a near-constant input")
    wrong = Projector.from_state_dict({"mlp1." + k: v for k, v in state.items()}, dtype=np.float64, eps=1e-6)(x)
    assert np.abs(wrong - ref).max() > 1e-3


def test_expected_shapes_and_state_dict_keys():
    shapes = mlp1_expected_shapes(C, 0.5, D)
    assert projector_input_size(1024, 0.5) == 4096
    twin = TorchProjector(4 * C, D)
    assert {"mlp1." + k: tuple(v.shape) for k, v in twin.state_dict().items()} == shapes
    assert sorted(shapes) == ["mlp1.0.bias", "mlp1.0.weight", "mlp1.1.bias", "mlp1.1.weight",
                              "mlp1.3.bias", "mlp1.3.weight"]
