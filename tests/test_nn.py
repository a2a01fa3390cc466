"""minivl.nn (the NumPy module base) against torch.nn, its twin: names, loading, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from minivl import nn
from minivl.errors import CheckpointError
from minivl.models.common import Embedding, Linear, Norm


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = Linear(width, 2 * width, bias=True)
        self.norm = Norm(width, 1e-5)
        self.scale = nn.Parameter((width,))

    def forward(self, x):
        return self.proj(self.norm(x)) * 2.0


class Tiny(nn.Module):
    def __init__(self, width: int = 4, n_layers: int = 2):
        super().__init__()
        self.embed = Embedding(10, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(n_layers))
        self.head = Linear(width, 10, bias=False)


class TorchBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, 2 * width, bias=True)
        self.norm = torch.nn.Module()
        self.norm.weight = torch.nn.Parameter(torch.empty(width))
        self.scale = torch.nn.Parameter(torch.empty(width))


class TorchTiny(torch.nn.Module):
    def __init__(self, width: int = 4, n_layers: int = 2):
        super().__init__()
        self.embed = torch.nn.Embedding(10, width)
        self.layers = torch.nn.ModuleList(TorchBlock(width) for _ in range(n_layers))
        self.head = torch.nn.Linear(width, 10, bias=False)


def random_state(model, rng) -> dict:
    return {key: rng.standard_normal(p.shape).astype(np.float32) for key, p in model.state_dict().items()}


def test_keys_shapes_and_module_names_match_torch_nn():
    ours, theirs = Tiny(), TorchTiny()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: p.shape for k, p in ours.state_dict().items()} == \
        {k: tuple(p.shape) for k, p in theirs.state_dict().items()}
    assert [name for name, _ in ours.named_modules()] == [name for name, _ in theirs.named_modules()]
    assert ours.get_submodule("layers.1.proj") is ours.layers[1].proj
    assert len(ours.layers) == 2 and list(ours.layers) == [ours.layers[0], ours.layers[1]]
    # a declared parameter is a placeholder: shape and dtype, no data, and it refuses to be computed with
    weight = ours.layers[0].proj.weight
    assert isinstance(weight, nn.Parameter) and weight.shape == (8, 4) and weight.dtype == np.float32
    with pytest.raises(CheckpointError, match=r"declared but never loaded.*from_state_dict"):
        np.asarray(weight)


def test_load_state_dict_adopts_the_arrays_and_forward_uses_them():
    rng = np.random.default_rng(0)
    model = Tiny()
    state = random_state(model, rng)
    assert model.load_state_dict(state) == ([], [])
    assert model.layers[1].proj.bias is state["layers.1.proj.bias"]  # adopted, not copied (assign=True)
    assert all(model.state_dict()[k] is v for k, v in state.items())
    x = rng.standard_normal((3, 4)).astype(np.float32)
    block = model.layers[0]
    # the block by hand: proj(rms_norm(x)) · 2 with the loaded arrays
    normed = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * state["layers.0.norm.weight"]
    expected = (normed @ state["layers.0.proj.weight"].T + state["layers.0.proj.bias"]) * 2.0
    np.testing.assert_allclose(block(x), expected, rtol=1e-6, atol=1e-6)  # float32, a 4-wide dot: a few ulps
    np.testing.assert_array_equal(model.embed(np.array([[3, 1]])), state["embed.weight"][[[3, 1]]])


def test_one_error_lists_every_missing_unexpected_and_misshaped_tensor():
    rng = np.random.default_rng(0)
    model = Tiny()
    state = random_state(model, rng)
    del state["layers.0.scale"], state["head.weight"]
    state["layers.1.proj.extra"] = np.zeros(3, np.float32)
    state["embed.weight"] = np.zeros((11, 4), np.float32)
    with pytest.raises(CheckpointError) as info:
        model.load_state_dict(state)
    message = str(info.value)
    assert message.startswith("Tiny checkpoint: the checkpoint does not fit the model: "
                              "2 missing, 1 unexpected, 1 with the wrong shape tensors")
    for text in ("missing 2: head.weight, layers.0.scale", "unexpected 1: layers.1.proj.extra",
                 "embed.weight (checkpoint (11, 4), model (10, 4))"):
        assert text in message
    # nothing was adopted from a checkpoint that does not fit
    assert isinstance(model.layers[0].proj.weight, nn.Parameter)


def test_non_strict_load_reports_and_still_refuses_wrong_shapes():
    rng = np.random.default_rng(0)
    model = Tiny()
    state = random_state(model, rng)
    del state["head.weight"]
    state["stray"] = np.zeros(1)
    assert model.load_state_dict(state, strict=False) == (["head.weight"], ["stray"])
    assert model.embed.weight is state["embed.weight"]
    with pytest.raises(CheckpointError, match=r"wrong shape 1: embed.weight"):
        Tiny().load_state_dict({"embed.weight": np.zeros((2, 2))}, strict=False)


def test_tied_parameters_count_once_like_torch():
    model = Tiny()
    state = random_state(model, np.random.default_rng(0))
    state["head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    assert model.head.weight is model.embed.weight
    assert "head.weight" in model.state_dict()                       # state_dict lists every name
    assert "head.weight" not in dict(model.named_parameters())      # named_parameters each tensor once
    torch_model = TorchTiny()
    torch_model.head.weight = torch_model.embed.weight
    assert [k for k, _ in model.named_parameters()] == [k for k, _ in torch_model.named_parameters()]


def test_assignment_rules():
    class Forgot(nn.Module):
        def __init__(self):
            self.weight = nn.Parameter((2,))

    with pytest.raises(TypeError, match=r"super\(\).__init__\(\)"):
        Forgot()
    module = Linear(2, 3, bias=False)
    assert module.bias is None and list(module.state_dict()) == ["weight"]
    module.cache = np.zeros(3)  # a plain array attribute is not a parameter (no buffers here)
    assert list(module.state_dict()) == ["weight"]
    with pytest.raises(AttributeError, match="Linear has no attribute 'missing'"):
        module.missing
    with pytest.raises(NotImplementedError, match="Tiny defines no forward"):
        Tiny()(np.zeros(1))
