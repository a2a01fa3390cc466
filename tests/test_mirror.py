"""The mirror rule, enforced for the models: torch_impl/models/X.py and minivl/models/X.py define the same
public classes and functions, the same class members, and build the same module tree with the same
parameter names (the checkpoint's keys). The only one-sided names are torch's backend switches (ALLOWED)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import pytest
import torch

import minivl
import minivl.nn
import torch_impl
import torch_impl.models
from minivl.checkpoint import load_state_dict
from minivl.tiny.llm import FAMILIES

# torch-only names, each a backend concern NumPy has no use for
ALLOWED_TORCH_ONLY = {
    "ATTN_IMPLEMENTATIONS",         # eager | sdpa | flash | triton
    "check_attn_implementation",
}
ALLOWED_TORCH_ONLY_MEMBERS = {"device", "set_attn_implementation"}
FRAMEWORK_BASES = (minivl.nn.Module, torch.nn.Module, object)


def twin_modules() -> list:
    names = [info.name for info in pkgutil.iter_modules(torch_impl.models.__path__)]
    return [name for name in sorted(names) if importlib.util.find_spec(f"minivl.models.{name}") is not None]


def public_names(module, twin=None) -> dict:
    """Public classes/functions defined in `module` (or imported from its twin: shared logic) and its constants."""
    homes = {module.__name__} | ({twin.__name__} if twin else set())
    out = {}
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ in homes:
            out[name] = obj
        elif name.isupper() and not inspect.ismodule(obj):  # constants, not `F` = torch.nn.functional
            out[name] = obj
    return out


def members(cls) -> set:
    """Public names of a class and its bases, up to the framework's Module."""
    names = set()
    for klass in cls.__mro__:
        if klass in FRAMEWORK_BASES:
            break
        names |= {name for name in vars(klass) if not name.startswith("_")}
    return names


@pytest.mark.parametrize("name", twin_modules())
def test_twin_modules_define_the_same_public_names_and_members(name):
    torch_module = importlib.import_module(f"torch_impl.models.{name}")
    numpy_module = importlib.import_module(f"minivl.models.{name}")
    theirs, ours = public_names(torch_module, numpy_module), public_names(numpy_module)
    assert sorted(set(ours) - set(theirs)) == [], f"{name}: defined in minivl only"
    assert sorted(set(theirs) - set(ours) - ALLOWED_TORCH_ONLY) == [], f"{name}: defined in torch_impl only"
    for cls_name in sorted(set(ours) & set(theirs)):
        numpy_cls, torch_cls = ours[cls_name], theirs[cls_name]
        if not inspect.isclass(numpy_cls) or numpy_cls is torch_cls:
            continue
        assert inspect.isclass(torch_cls), f"{name}.{cls_name} is a class in minivl only"
        numpy_members, torch_members = members(numpy_cls), members(torch_cls)
        assert sorted(numpy_members - torch_members) == [], f"{name}.{cls_name}: members in minivl only"
        assert sorted(torch_members - numpy_members - ALLOWED_TORCH_ONLY_MEMBERS) == [], \
            f"{name}.{cls_name}: members in torch_impl only"


def test_the_models_package_lists_the_same_classes():
    numpy_registry = importlib.import_module("minivl.models").MODEL_REGISTRY
    torch_registry = torch_impl.models.MODEL_REGISTRY
    assert {k: v.replace("minivl.", "torch_impl.") for k, v in numpy_registry.items()} == torch_registry
    assert set(twin_modules()) >= {path.split(":")[0].rsplit(".", 1)[1] for path in torch_registry.values()}


@pytest.mark.parametrize("family", FAMILIES)
def test_both_packages_build_the_same_tree_with_the_checkpoint_keys(tiny_llms, family):
    path = tiny_llms[family]
    ours, theirs = minivl.load_model(path), torch_impl.load_model(path)
    # the same module under the same name, class for class
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in theirs.named_modules()]
    # the same parameters, in the same order and shapes, and they ARE the checkpoint's tensors by name
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    stored = load_state_dict(path)
    tied = type(ours).tied_weights(ours.config)
    assert set(ours.state_dict()) == set(stored) | set(tied)
    for key, array in stored.items():
        np.testing.assert_array_equal(ours.state_dict()[key], np.asarray(array, dtype=np.float32))
        np.testing.assert_array_equal(theirs.state_dict()[key].numpy(), ours.state_dict()[key])
    assert type(ours).expected_shapes(ours.config) == type(theirs).expected_shapes(theirs.config) == \
        {key: tuple(array.shape) for key, array in stored.items()}
    for target, source in tied.items():
        assert ours.state_dict()[target] is ours.state_dict()[source]
        assert theirs.get_parameter(target) is theirs.get_parameter(source)
