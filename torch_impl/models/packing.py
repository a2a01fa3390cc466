"""One buffer for all of a model's weights, in PyTorch: the mirror of minivl/models/packing.py (see its docstring).

On the CPU, every parameter becomes a view into one huge-page-backed allocation, laid out in the
order the forward reads them; tied Parameters stay one object, and a FusedProjection's matrix and
its modules' views move together. On another device it does nothing (its allocator is not the
CPU's page tables). tests/test_packing.py holds a packed model equal, bit for bit, to the unpacked one.

Not called at load (minivl/models/packing.py says why: on the machine measured, torch's GEMMs gained
nothing that held from the packed buffer); benchmarks/packing.py calls it to measure it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from torch_impl.models.fused import fused_projections

# each tensor starts on a cache line (and a SIMD register) boundary
ALIGNMENT = 64


def pack_parameters(model) -> torch.Tensor | None:
    """Move every parameter of `model` (and its fused projections) into one new CPU buffer; returns the buffer.

    The buffer holds each distinct storage once: a tensor of its own, or the matrix that fused
    views share. None when the model has no parameters or any of them is not on the CPU.
    """
    holders, projections = _holders(model), fused_projections(model)
    if not holders or any(value.device.type != "cpu" for _, _, value in holders):
        return None
    # a fused module's weight is a view of its FusedProjection's matrix: that matrix is the storage
    shared = {matrix.untyped_storage().data_ptr(): matrix for fused in projections
              for matrix in (fused.weight, fused.bias) if matrix is not None}
    storages = {}  # id(storage) -> storage, in first-use order (the forward's order)
    for _, _, value in holders:
        storage = _storage(value, shared)
        storages.setdefault(id(storage), storage)
    offsets, size = {}, 0
    for key, storage in storages.items():
        offsets[key] = size
        size += -(-storage.numel() * storage.element_size() // ALIGNMENT) * ALIGNMENT
    # one allocation made by NumPy (madvised for huge pages), started on an ALIGNMENT boundary
    raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
    shift = -raw.ctypes.data % ALIGNMENT
    buffer = torch.from_numpy(raw)[shift:shift + size]
    copies = {}
    for key, storage in storages.items():
        nbytes = storage.numel() * storage.element_size()
        # each storage C-contiguous in the buffer (a fused matrix already is, and its views keep their strides)
        copies[key] = buffer[offsets[key]:offsets[key] + nbytes].view(storage.dtype).view(storage.shape)
        copies[key].copy_(storage)

    moved = {}  # id(old tensor) -> its view in the buffer: a Parameter held twice stays one object

    def move(value):
        if id(value) not in moved:
            storage = _storage(value, shared)
            copy = copies[id(storage)]
            if storage is not value:  # a view of a fused matrix: the same offset and strides within the copy
                start = (value.data_ptr() - storage.data_ptr()) // value.element_size()
                copy = copy.as_strided(value.shape, value.stride(), copy.storage_offset() + start)
            moved[id(value)] = nn.Parameter(copy, requires_grad=False) if isinstance(value, nn.Parameter) else copy
        return moved[id(value)]

    with torch.no_grad():
        for owner, name, value in holders:
            owner[name] = move(value)
        for fused in projections:
            fused.weight, fused.views = move(fused.weight), [move(view) for view in fused.views]
            if fused.bias is not None:
                fused.bias = move(fused.bias)
    return buffer


def _holders(model) -> list:
    """(parameter table, name, tensor) for every parameter, in module order."""
    return [(module._parameters, name, value) for module in model.modules()
            for name, value in module._parameters.items() if value is not None]


def _storage(value: torch.Tensor, shared: dict) -> torch.Tensor:
    """The fused matrix `value` is a view of, else `value` itself (copied alone, whatever else it views)."""
    return shared.get(value.untyped_storage().data_ptr(), value)
