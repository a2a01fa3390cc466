"""The part of `torch.nn` that minivl's models use, in NumPy: modules that hold named parameters.

torch_impl has no twin of this file because its twin IS `torch.nn`: a NumPy model here and its
torch model in torch_impl are written the same way (`super().__init__()`, attributes named after
the checkpoint keys, `forward`), so the two files read side by side.

What is here, and nothing more:

* `Parameter(shape, dtype)`: a DECLARED tensor, shape and dtype but no data (what torch's meta
  device gives). A model is built from its config with placeholders, so the shapes a checkpoint
  must have come from the declared parameters, never from a hand-kept table;
* `Module`: parameters and child modules registered by attribute assignment, `__call__` runs
  `forward`, `named_parameters()`, `named_modules()`, `get_submodule()`, `state_dict()` (dotted
  checkpoint keys) and `load_state_dict(state_dict, strict=True)`, which raises ONE
  CheckpointError listing every missing, unexpected and mis-shaped tensor. Loading ADOPTS the
  given arrays (torch's `assign=True`): the caller casts them to the model dtype first;
* `ModuleList`: children named "0", "1", ... (`model.layers.3.` in a key).

No autograd, no buffers, no hooks, no devices, no train/eval modes: inference only.
"""
from __future__ import annotations

import numpy as np

from minivl.checkpoint import check_state_dict
from minivl.errors import CheckpointError


class Parameter:
    """A declared, not yet loaded tensor: its shape and dtype, no data. load_state_dict replaces it."""

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __array__(self, *args, **kwargs):
        raise CheckpointError(f"a parameter of shape {self.shape} was declared but never loaded; build the model "
                              f"with from_state_dict (or call load_state_dict) before running it")

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, not loaded)"


class Module:
    """Base class of every NumPy model part (the subset of torch.nn.Module described above)."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})  # name -> Parameter placeholder | np.ndarray
        object.__setattr__(self, "_modules", {})     # name -> Module

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise TypeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        if isinstance(value, Parameter) or (name in self._parameters and isinstance(value, np.ndarray)):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # called only when ordinary lookup fails: the registered parameters and children
        for table in ("_parameters", "_modules"):
            entries = self.__dict__.get(table, {})
            if name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} defines no forward")

    def named_modules(self, prefix: str = ""):
        """(dotted name, module) for this module and every descendant, each module once."""
        seen = set()

        def walk(module, name):
            if id(module) in seen:
                return
            seen.add(id(module))
            yield name, module
            for child_name, child in module._modules.items():
                yield from walk(child, f"{name}.{child_name}" if name else child_name)

        yield from walk(self, prefix)

    def named_parameters(self, prefix: str = ""):
        """(dotted checkpoint key, array) for every parameter, a shared (tied) one only once, as torch."""
        seen = set()
        for key, value in self.state_dict(prefix).items():
            if id(value) not in seen:
                seen.add(id(value))
                yield key, value

    def state_dict(self, prefix: str = "") -> dict:
        """{dotted checkpoint key: array (or Parameter placeholder)}; a tied tensor appears under each of its names."""
        out = {}
        for name, value in self._parameters.items():
            out[prefix + name] = value
        for name, child in self._modules.items():
            out.update(child.state_dict(f"{prefix}{name}."))
        return out

    def get_submodule(self, path: str) -> "Module":
        """'model.layers.0.self_attn' -> that module."""
        module = self
        for name in path.split(".") if path else []:
            if name not in module._modules:
                raise AttributeError(f"{type(module).__name__} has no submodule {name!r} (looking up {path!r})")
            module = module._modules[name]
        return module

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        """Adopt {checkpoint key: array}, as torch's load_state_dict(..., assign=True).

        Every mis-shaped tensor, and with strict every missing and unexpected one, is listed in ONE
        CheckpointError. Returns (missing keys, unexpected keys), both empty when strict.
        """
        expected = {key: tuple(value.shape) for key, value in self.state_dict().items()}
        if strict:
            check_state_dict(state_dict, expected, where=f"{type(self).__name__} checkpoint")
        else:
            check_state_dict({k: state_dict[k] for k in expected if k in state_dict},
                             {k: expected[k] for k in expected if k in state_dict}, where=type(self).__name__)
        for key, value in state_dict.items():
            if key in expected:
                path, _, name = key.rpartition(".")
                self.get_submodule(path)._parameters[name] = value
        return sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))


class ModuleList(Module):
    """Child modules named "0", "1", ... in order: the `layers.{i}.` of a checkpoint key."""

    def __init__(self, modules=()):
        super().__init__()
        for i, module in enumerate(modules):
            self._modules[str(i)] = module

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())
