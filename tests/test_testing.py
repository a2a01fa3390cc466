"""The parity helper itself must be able to fail, and must say where."""
import numpy as np
import pytest

from minivl.testing import assert_close, compare, eps, tolerance


def test_tolerance_is_ulps_of_the_dtype():
    assert tolerance("float32", 4) == (4 * np.finfo(np.float32).eps, 4 * np.finfo(np.float32).eps)
    assert tolerance(np.float64, 2, 0, scale=10.0) == (2 * np.finfo(np.float64).eps, 0.0)
    assert eps("bfloat16") == 2.0**-7 and eps("torch.float16") == np.finfo(np.float16).eps


def test_assert_close_fails_outside_and_names_the_worst_element():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    bad = ref.copy()
    bad[1, 0] += 1e-3
    with pytest.raises(AssertionError, match=r"at \(1, 0\)"):
        assert_close(bad, ref, rtol=1e-6, atol=1e-6, what="x")
    assert assert_close(ref * (1 + 1e-7), ref, rtol=1e-6, atol=0).ok


def test_array_tolerances_and_special_values():
    ref = np.array([1.0, np.nan, np.inf, 0.0])
    got = np.array([1.0 + 1e-9, np.nan, np.inf, 2e-9])
    assert compare(got, ref, rtol=np.array([1e-8, 0, 0, 0]), atol=np.array([0, 0, 0, 1e-8])).ok
    result = compare(np.array([1.0, 1.0, np.inf, 0.0]), ref, rtol=0.0, atol=np.zeros(4))
    assert not result.ok and result.n_bad == 1  # NaN vs 1.0 is a difference
    assert "DIFF" in str(result)
    # a finite value against an infinite reference is a difference even with a relative tolerance
    assert not compare(np.array([1.0]), np.array([np.inf]), rtol=0.5, atol=0.0).ok  # array tolerances format without error
    with pytest.raises(AssertionError, match="shape mismatch"):
        compare(np.ones(3), np.ones(4), rtol=0, atol=0)


def test_an_infinite_tolerance_is_refused():
    # an inf in the output under test, used as the tolerance's scale, would otherwise pass everything
    with pytest.raises(ValueError, match="tolerance must be finite"):
        compare(np.ones(2), np.ones(2), rtol=1e-6, atol=np.inf)
