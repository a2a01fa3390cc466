"""The parity tests hold on other CPUs: rerun here with the kernels an AVX2 machine and a pre-FMA (SSE4.2) machine would run.

The tolerances are meant to hold on any CPU, but one machine only ever runs its own kernels: on an
AVX-512 CPU, OpenBLAS, NumPy's ufuncs (exp, sin, cos, ...) and torch all pick AVX-512 code, whose last
bits differ from their AVX2 code, and the AVX2 code's from the SSE code's (which has no FMA: every
a·b + c rounds twice). Each library lets the user choose a narrower kernel, so this machine can stand
in for the others:

* OpenBLAS: OPENBLAS_CORETYPE (Haswell: AVX2 + FMA; Nehalem: SSE4.2);
* NumPy: NPY_DISABLE_CPU_FEATURES (its X86_V4 = AVX-512 and X86_V3 = AVX2 + FMA dispatch targets);
* torch: ATEN_CPU_CAPABILITY (avx2 / default) for its vectorised ops, MKL_ENABLE_INSTRUCTIONS for MKL.

Each profile first checks, in a fresh interpreter, that every library took the narrower kernels
(a profile that silently ran the native ones would test nothing), then runs the numerics-heavy test
files in a child pytest. Only the profiles narrower than this CPU's own kernels run: on an AVX2
machine without AVX-512 the avx2_fma profile's kernels are the native ones (checked: the probe reads
the same with and without its settings), so the rest of the suite already is that run, and a child
would repeat two minutes of it bit for bit. The whole suite passed under both profiles on an AMD EPYC (AVX-512) when
this was written; the child runs the files where the last bits decide (components, the blocked and
flash attention, every model family against torch_impl and transformers, the real SmolLM2 and DINOv2
weights, the parity ledger), about a minute each on 2 cores.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

NUMERICS_TESTS = ["test_activations.py", "test_alibi.py", "test_attention.py", "test_attention_fast.py",
                  "test_flash.py", "test_linear.py", "test_norms.py", "test_rope.py", "test_vision_fast.py",
                  "test_fast_decoder.py", "test_models_decoders.py", "test_models_transformers.py",
                  "test_intern_vit.py", "test_dinov2.py", "test_smollm2.py", "test_conformance.py",
                  "test_parity_ledger.py", "test_internvl_chat.py"]

# name -> (CPU flags it needs, OpenBLAS core, torch capability, MKL instructions, NumPy targets it disables)
PROFILES = {
    "avx2_fma": ({"avx2", "fma"}, "Haswell", "AVX2", "AVX2", ["X86_V4", "AVX512_ICL", "AVX512_SPR"]),
    "sse42_no_fma": ({"sse4_2"}, "Nehalem", "DEFAULT", "SSE4_2", ["X86_V3", "X86_V4", "AVX512_ICL", "AVX512_SPR"]),
}
# name -> the CPU flag of the next wider kernels: without it, this CPU's own kernels ARE the
# profile's (an AVX2 machine without AVX-512 runs OpenBLAS Haswell, torch AVX2 and NumPy X86_V3
# natively), so the rest of the suite is already that profile's run and a child would repeat it
WIDER = {"avx2_fma": "avx512f", "sse42_no_fma": "avx2"}

PROBE = """
import json, numpy, threadpoolctl, torch
from numpy._core._multiarray_umath import __cpu_features__
print(json.dumps({"openblas": [i.get("architecture") for i in threadpoolctl.threadpool_info()
                               if i["internal_api"] == "openblas"],
                  "torch": torch.backends.cpu.get_cpu_capability(),
                  "numpy_enabled": sorted(name for name, on in __cpu_features__.items() if on)}))
"""


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def profile_environment(name: str) -> dict:
    from numpy._core._multiarray_umath import __cpu_features__

    _, core, capability, mkl, targets = PROFILES[name]
    env = {key: value for key, value in os.environ.items() if key not in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    env.update(OPENBLAS_CORETYPE=core, ATEN_CPU_CAPABILITY=capability.lower(), MKL_ENABLE_INSTRUCTIONS=mkl,
               # NumPy refuses to disable a target this CPU does not have: only those it has
               NPY_DISABLE_CPU_FEATURES=" ".join(t for t in targets if __cpu_features__.get(t)))
    return env


def narrower_profiles(flags: set) -> list:
    """The profiles whose kernels differ from what a CPU with these flags runs natively: those below it.

    An AVX-512 CPU: both; an AVX2 CPU: sse42_no_fma only (its own kernels are avx2_fma's, which the
    rest of the suite runs); an SSE4.2 CPU: sse42_no_fma, the one profile it can run.
    """
    narrower = [name for name in sorted(PROFILES) if WIDER[name] in flags]
    return narrower or ["sse42_no_fma"]


def probe_kernels(env: dict) -> dict:
    """{openblas, torch, numpy_enabled}: the kernels a fresh interpreter with this environment picks."""
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout.strip().splitlines()[-1])


def test_a_profile_is_rerun_only_where_it_is_not_this_cpus_own():
    avx512 = {"sse4_2", "avx2", "fma", "avx512f", "avx512bw"}
    assert narrower_profiles(avx512) == ["avx2_fma", "sse42_no_fma"]
    assert narrower_profiles(avx512 - {"avx512f", "avx512bw"}) == ["sse42_no_fma"]
    assert narrower_profiles({"sse4_2"}) == ["sse42_no_fma"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only: the profiles name x86 kernels")
@pytest.mark.parametrize("name", narrower_profiles(cpu_flags()))
def test_the_numerics_tests_pass_with_another_cpus_kernels(name):
    needs = PROFILES[name][0]
    missing = needs - cpu_flags()
    assert not missing, f"this CPU lacks {sorted(missing)}: the {name} kernels cannot run here"
    env = profile_environment(name)
    took = probe_kernels(env)
    _, core, capability, _, targets = PROFILES[name]
    assert took["openblas"] == [core], took
    assert took["torch"] == capability, took
    assert not set(targets) & set(took["numpy_enabled"]), took  # NumPy dispatches to none of them
    if WIDER[name] in cpu_flags():  # a narrower profile: some library runs other kernels than natively
        assert took != probe_kernels({key: value for key, value in os.environ.items()
                                      if key not in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}), took
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            *(os.path.join(HERE, test) for test in NUMERICS_TESTS)],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    tail = "\n".join(child.stdout.strip().splitlines()[-25:])
    assert child.returncode == 0, f"with the {name} kernels:\n{tail}\n{child.stderr[-2000:]}"
