"""Shared test fixtures. Tests import minivl and torch_impl from the repository root."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


CUDA_SKIP_REASON = "needs a CUDA GPU; CI has none"
requires_cuda = pytest.mark.skipif(not cuda_available(), reason=CUDA_SKIP_REASON)

# no silent skips in CI: with CI=true every skip but "needs a CUDA GPU" fails (tests/ci_policy.py)
from ci_policy import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401  (hooks)


@pytest.fixture
def rng():
    """A fresh seeded generator per test, so every test is reproducible on its own."""
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_llms(tmp_path_factory) -> dict:
    """{family: directory} of `write_tiny_llm(dir, family)` (seed 0) for every family, written once per
    session for the decoder tests that only read them (test_mirror, test_models_*, test_generate)."""
    from minivl.tiny.llm import FAMILIES, write_tiny_llm

    root = tmp_path_factory.mktemp("tiny_llms")
    return {family: write_tiny_llm(root / family, family) for family in FAMILIES}
