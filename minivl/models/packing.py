"""One buffer for all of a model's weights: every parameter a view into it, laid out in forward order.

A speed device, not semantics. A cached decode step at batch 1 reads every weight once, so it runs
at the rate memory streams into the GEMVs. Loaded one array at a time, a small model's weights are
hundreds of separate allocations, and NumPy asks the kernel for huge pages (2 MiB, one TLB entry
instead of 512) only for arrays of 4 MiB and more: most of SmolLM2's 1.3-3.5 MB projections stream
through 4 KiB pages. `pack_parameters` copies them, back to back in the order the forward reads
them, into one allocation that does get huge pages (on Linux with transparent huge pages in
`madvise` or `always` mode). benchmarks/ablation.py measures what it buys (its "weights not
packed" row: SmolLM2's cached decode step 7–10 % slower in two runs on the 2-core CI machine).

Values, shapes, names and `state_dict()` are unchanged; tied tensors stay one object; a
FusedProjection's matrix and the views its modules hold move together. `build_model` calls it
after `fuse_projections`. tests/test_packing.py holds a packed model equal, bit for bit, to the
same model unpacked.

NumPy packs at load; torch_impl does not (its `pack_parameters` stays, for a caller who measures a
gain). On an AMD EPYC (AVX-512, 2 cores), benchmarks/packing.py read torch_impl's SmolLM2 prefill of
64 tokens at 158 / 124 / 122 / 113 ms packed against 125 / 126 / 121 / 113 ms unpacked in four runs,
prefill 512 at 850 / 808 / 769 / 710 against 911 / 772 / 762 / 750 ms, and decode at 45.2 / 42.3 /
42.4 / 42.3 against 54.7 / 41.6 / 40.5 / 42.5 ms: no gain that holds, and once a 26 % loss, which four scratch runs before had shown too
(and which went away with transparent huge pages turned off). transformers does not pack either, so
an unpacked torch_impl compares with it on the same memory layout. NumPy's packing buys its decode
step the most (benchmarks/ablation.py, "weights not packed").
"""
from __future__ import annotations

import numpy as np

from minivl.models.fused import fused_projections

# each tensor starts on a cache line (and a SIMD register) boundary
ALIGNMENT = 64


def pack_parameters(model) -> np.ndarray | None:
    """Move every parameter of `model` (and its fused projections) into one new buffer; returns the buffer.

    The buffer holds each distinct storage once: a tensor that owns its data, or the matrix that
    fused views share. None when the model has no loaded parameters.
    """
    holders, projections = _holders(model), fused_projections(model)
    # a fused module's weight is a view of its FusedProjection's matrix: that matrix is the storage
    shared = {id(matrix): matrix for fused in projections for matrix in (fused.weight, fused.bias)
              if matrix is not None}
    storages = {}  # id(storage) -> storage, in first-use order (the forward's order)
    for _, _, value in holders:
        storage = _storage(value, shared)
        storages.setdefault(id(storage), storage)
    if not storages:
        return None
    offsets, size = {}, 0
    for key, storage in storages.items():
        offsets[key] = size
        size += -(-storage.nbytes // ALIGNMENT) * ALIGNMENT
    # one allocation (NumPy madvises any of 4 MiB or more for huge pages), started on an ALIGNMENT boundary
    raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
    shift = -raw.ctypes.data % ALIGNMENT
    buffer = raw[shift:shift + size]
    for key, storage in storages.items():
        # each storage C-contiguous in the buffer (a fused matrix already is, and its views keep their strides)
        np.ndarray(storage.shape, storage.dtype, buffer=buffer, offset=offsets[key])[...] = storage

    moved = {}  # id(old array) -> its view in the buffer: a tensor held twice stays one object

    def move(value):
        if id(value) not in moved:
            storage = _storage(value, shared)
            if storage is value:
                moved[id(value)] = np.ndarray(value.shape, value.dtype, buffer=buffer, offset=offsets[id(value)])
            else:  # a view of a fused (C-contiguous) matrix: the same offset and strides within the new copy
                start = value.__array_interface__["data"][0] - storage.__array_interface__["data"][0]
                moved[id(value)] = np.ndarray(value.shape, value.dtype, buffer=buffer,
                                              offset=offsets[id(storage)] + start, strides=value.strides)
        return moved[id(value)]

    for owner, name, value in holders:
        owner[name] = move(value)
    for fused in projections:
        fused.weight, fused.views = move(fused.weight), [move(view) for view in fused.views]
        if fused.bias is not None:
            fused.bias = move(fused.bias)
    return buffer


def _holders(model) -> list:
    """(parameter table, name, array) for every loaded parameter, in module order."""
    return [(module._parameters, name, value) for _, module in model.named_modules()
            for name, value in module._parameters.items() if isinstance(value, np.ndarray)]


def _storage(value: np.ndarray, shared: dict) -> np.ndarray:
    """The fused matrix `value` is a view of, else `value` itself (copied alone, whatever else it views)."""
    return shared.get(id(value.base), value)
