"""Does a state dict fit a model, and are its tensors usable weights? Each answer is ONE error.

`check_state_dict` lists every missing, unexpected and mis-shaped tensor against the model's
expected shapes; `check_weights` every tensor that is no float (int, bool) or holds NaN/inf.
The loaders run both; `minivl.checkpoint` re-exports them.
"""
from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np

from minivl.errors import CheckpointError

__all__ = ["check_state_dict", "check_weights", "name_list"]

_FIX = "re-download or re-convert the checkpoint"

_MAX_LISTED = 20


def _capped(items: list[str]) -> list[str]:
    """The first 20 items, and a count of the rest."""
    return items[:_MAX_LISTED] + ([f"... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else [])


def name_list(names: list[str], separator: str = ", ") -> str:
    """The names joined, the first 20 and a count of the rest."""
    return separator.join(_capped(names))


def _is_float(tensor) -> bool:
    """A floating dtype (bf16 included) in NumPy or torch."""
    dtype = tensor.dtype
    if isinstance(dtype, np.dtype):
        return dtype.kind == "f" or dtype == ml_dtypes.bfloat16
    return bool(getattr(dtype, "is_floating_point", False))


def check_state_dict(tensors: Mapping, expected: dict, where: str = "") -> None:
    """Raise ONE CheckpointError listing every missing, unexpected and mis-shaped tensor.

    `tensors`: `{name: array}` (anything with `.shape`: NumPy arrays, torch tensors);
    `expected`: `{name: shape tuple}` from the model's `expected_shapes(config)`.
    Each list shows the first 20 names and a count of the rest.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(name for name in set(expected) & set(tensors)
                         if tuple(tensors[name].shape) != tuple(expected[name]))
    if not (missing or unexpected or wrong_shape):
        return
    counts = ", ".join(f"{n} {what}" for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"),
                                                      (len(wrong_shape), "with the wrong shape")) if n)
    lines = [f"{where + ': ' if where else ''}the checkpoint does not fit the model: {counts} tensors"]
    if missing:
        lines.append(f"  missing {len(missing)}: {name_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)}: {name_list(unexpected)}")
    if wrong_shape:
        shapes = [f"{name} (checkpoint {tuple(tensors[name].shape)}, model {tuple(expected[name])})"
                  for name in wrong_shape]
        lines.append(f"  wrong shape {len(wrong_shape)}: {name_list(shapes)}")
    lines.append("  fix: check that config.json belongs to these weights (sizes, layer count, qkv_bias, "
                 "LLM architecture), or re-convert the checkpoint")
    raise CheckpointError("\n".join(lines))


def _nonfinite_counts(tensor) -> tuple[int, int]:
    """(number of NaN, number of ±inf) of a NumPy array or torch tensor; one pass when all is finite."""
    if isinstance(tensor, np.ndarray):
        if np.isfinite(tensor).all():
            return 0, 0
        return int(np.isnan(tensor).sum()), int(np.isinf(tensor).sum())
    if bool(tensor.isfinite().all()):
        return 0, 0
    return int(tensor.isnan().sum()), int(tensor.isinf().sum())


def check_weights(tensors: Mapping, where: str = "", allow_nonfinite: bool = False) -> None:
    """Raise ONE CheckpointError naming every tensor that is not a usable model weight:

    * not floating point (int, bool): every weight of a minivl model is a float, so such a tensor
      means a wrong or broken file, and it is not cast to float silently;
    * holding NaN or ±inf (unless allow_nonfinite): such weights make every logit NaN, and greedy
      decoding then picks token 0 without a word.

    The loaders run it on every checkpoint (`load_model(..., allow_nonfinite=False)`).
    """
    not_float, not_finite = [], []
    for name in sorted(tensors):
        tensor = tensors[name]
        if not _is_float(tensor):
            not_float.append(f"{name} ({tensor.dtype})")
        elif not allow_nonfinite:
            n_nan, n_inf = _nonfinite_counts(tensor)
            if n_nan or n_inf:
                not_finite.append(f"{name} ({n_nan} NaN, {n_inf} inf of {int(np.prod(tensor.shape))})")
    problems = []
    if not_float:
        problems.append(f"{len(not_float)} weight tensors are not floating point: {name_list(not_float)} (weights "
                        f"are float16, bfloat16, float32 or float64; check that the file is this model's weights)")
    if not_finite:
        problems.append(f"{len(not_finite)} weight tensors are not finite: {name_list(not_finite)} (pass "
                        f"allow_nonfinite=True to load them anyway)")
    if problems:
        raise CheckpointError(f"{where + ': ' if where else ''}{'; '.join(problems)}; the checkpoint is damaged or "
                              f"not a model's: {_FIX}")
