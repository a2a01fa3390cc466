"""minivl: InternVL written out in plain NumPy. Importing it never imports torch."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# NumPy's OpenBLAS keeps each of its worker threads spinning for 2^28 cycles (~0.1 s) after a GEMM,
# holding a core that minivl's own threads (minivl/threads.py) need for the softmax and activation
# passes between GEMMs; 2^20 cycles (~0.4 ms) still bridges the gaps between a decode step's GEMVs.
# OpenBLAS reads this once, when NumPy loads it: set here only if NumPy is not loaded yet and the
# user has not chosen (benchmarks/smollm2.py and vision.py measure the effect).
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

# glibc's malloc keeps the memory a layer frees for the next one instead of returning it to the
# kernel and faulting it back in (23 000 page faults a 448-px ViT forward otherwise; minivl/allocator.py)
from minivl.allocator import keep_freed_memory as _keep_freed_memory  # noqa: E402

_keep_freed_memory()


def load_model(path, dtype="float32", component=None, allow_nonfinite=False):
    """Load a checkpoint directory (config.json + safetensors) into the matching NumPy model.

    component="language_model" (or "vision_model") loads one part of an InternVL checkpoint alone.
    allow_nonfinite=True loads NaN/inf weights (refused by default: a CheckpointError names them).
    """
    from minivl.loading import load_model as _load_model

    return _load_model(path, dtype=dtype, component=component, allow_nonfinite=allow_nonfinite)
