"""Parity checking with a dtype-aware tolerance: |actual − ref| <= atol + rtol·|ref|.

rtol comes from the dtype's machine epsilon times a number of ulps that each test states and
justifies; atol is the same idea for values near zero (it is scaled by the typical magnitude of the
reference, not a global constant). Works on NumPy arrays and, by duck typing, on torch tensors,
so minivl never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # ml_dtypes gives NumPy a real bfloat16
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a hard dependency
    ml_dtypes = None
    _BF16 = None

_EPS = {
    "float64": float(np.finfo(np.float64).eps),  # 2.2e-16
    "float32": float(np.finfo(np.float32).eps),  # 1.19e-7
    "float16": float(np.finfo(np.float16).eps),  # 9.8e-4
    "bfloat16": 2.0**-7,  # 7.8e-3: 8 bits of significand
}


def dtype_name(dtype) -> str:
    """'float32' for np.float32, np.dtype('float32'), torch.float32 or the string itself."""
    if isinstance(dtype, str):
        return dtype.replace("torch.", "")
    name = str(dtype)
    if name.startswith("torch."):
        return name[len("torch."):]
    return np.dtype(dtype).name


def eps(dtype) -> float:
    """Machine epsilon of a float dtype given in any of NumPy, torch or string form."""
    name = dtype_name(dtype)
    if name not in _EPS:
        raise ValueError(f"no epsilon known for dtype {name!r}; use one of {sorted(_EPS)}")
    return _EPS[name]


def tolerance(dtype, rtol_ulps: float, atol_ulps: float | None = None, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) = (rtol_ulps·eps, atol_ulps·eps·scale); scale is the reference's typical magnitude."""
    e = eps(dtype)
    atol_ulps = rtol_ulps if atol_ulps is None else atol_ulps
    return rtol_ulps * e, atol_ulps * e * scale


def to_numpy(x) -> np.ndarray:
    """NumPy float64 view of a NumPy array, a Python number or a torch tensor (any device/dtype)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x).astype(np.float64)


@dataclass
class Comparison:
    """Result of comparing two arrays: the worst errors and where they are."""

    max_abs: float
    max_rel: float
    worst_index: tuple
    n_bad: int
    n_total: int
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.n_bad == 0

    def __str__(self) -> str:
        status = "OK" if self.ok else f"DIFF ({self.n_bad}/{self.n_total} outside)"
        # rtol/atol may be arrays (an elementwise error bound): show their largest value
        rtol, atol = float(np.max(self.rtol)), float(np.max(self.atol))
        return (f"max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e} at {self.worst_index}, "
                f"tol {atol:.1e} + {rtol:.1e}·|ref|: {status}")


def compare(actual, reference, rtol: float, atol: float) -> Comparison:
    """Compare elementwise with tolerance atol + rtol·|ref| (NaN only matches NaN at the same place)."""
    if not (np.all(np.isfinite(rtol)) and np.all(np.isfinite(atol))):
        raise ValueError(f"tolerance must be finite (rtol={rtol}, atol={atol}); compute its scale from the "
                         "reference, not from the output under test")
    a, r = to_numpy(actual), to_numpy(reference)
    if a.shape != r.shape:
        raise AssertionError(f"shape mismatch: actual {a.shape} vs reference {r.shape}")
    if a.size == 0:
        return Comparison(0.0, 0.0, (), 0, 0, rtol, atol)
    both_nan = np.isnan(a) & np.isnan(r)
    both_inf = np.isinf(a) & np.isinf(r) & (np.sign(a) == np.sign(r))
    same_special = both_nan | both_inf
    with np.errstate(invalid="ignore"):
        err = np.where(same_special, 0.0, np.abs(a - r))
        err = np.where(np.isnan(err), np.inf, err)
        # a NaN or inf reference allows no slack: it must be matched exactly (handled above)
        allowed = atol + rtol * np.where(np.isfinite(r), np.abs(r), 0.0)
        rel = err / np.maximum(np.abs(r), np.finfo(np.float64).tiny)
    bad = err > allowed
    worst = np.unravel_index(int(np.argmax(err - allowed)), a.shape)
    return Comparison(float(err.max()), float(rel.max()), tuple(int(i) for i in worst),
                      int(bad.sum()), int(a.size), rtol, atol)


def assert_close(actual, reference, *, rtol: float, atol: float, what: str = "") -> Comparison:
    """Raise AssertionError naming the worst element unless |actual − ref| <= atol + rtol·|ref| everywhere."""
    c = compare(actual, reference, rtol, atol)
    if not c.ok:
        a, r = to_numpy(actual), to_numpy(reference)
        raise AssertionError(f"{what or 'arrays'} differ: {c}; "
                             f"actual {a[c.worst_index]!r} vs reference {r[c.worst_index]!r}")
    return c
