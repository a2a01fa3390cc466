"""minivl/allocator.py: after `import minivl`, glibc reuses the memory a layer frees instead of faulting it back in.

The check is the page-fault count itself (getrusage's minor faults), in fresh processes: a loop
that allocates, writes and frees five 3 MB arrays, as a layer's temporaries are, faults its pages
in again on every round under glibc's defaults (15 MB freed at once is more than twice the 3 MB
blocks its dynamic trim threshold follows) and not at all with the thresholds fixed. 3 MB stays
under the 4 MB from which NumPy asks for huge pages, so each round's fresh memory is ~3800 faults
where the kernel gives huge pages only when asked (transparent_hugepage "madvise", the default).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minivl import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc = pytest.mark.skipif(allocator._glibc_mallopt() is None, reason="glibc's malloc only (Linux)")

LAYER_LOOP = """
import resource, sys, minivl, numpy as np
megabytes, count = int(sys.argv[1]), int(sys.argv[2])
def layer():
    blocks = [np.empty(megabytes * 2 ** 20 // 4, np.float32) for _ in range(count)]
    for block in blocks:
        block.fill(1.0)  # every page written, as a layer's outputs are
for _ in range(3):
    layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    layer()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_round(megabytes: int = 3, count: int = 5, **env) -> float:
    environ = {key: value for key, value in os.environ.items()
               if key not in allocator.USER_CHOICES + ("MINIVL_MALLOC",)}
    result = subprocess.run([sys.executable, "-c", LAYER_LOOP, str(megabytes), str(count)],
                            env=dict(environ, **env), cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return float(result.stdout)


@glibc
def test_a_layer_reuses_freed_memory_without_page_faults():
    # a round writes 15 MB = 3840 pages: with the thresholds fixed none is new; Python's own
    # bookkeeping may touch a page or two
    assert faults_per_round() < 20
    # the same loop with glibc's defaults faults them in again every round (the test's premise:
    # without it, the assertion above could not fail): ~3800 here, with 4 KiB pages; a kernel with
    # transparent huge pages "always" may back the 2 MiB-aligned parts with huge pages, which
    # leaves at least the 15 MB's unaligned ends, some 260 pages, faulting
    assert faults_per_round(MINIVL_MALLOC="system") > 100


@glibc
def test_blocks_past_glibcs_mmap_ceiling_are_reused_too():
    """Three 40 MB blocks a round, as a 7-tile ViT layer's [7175, 1536] activations: past the 32 MiB
    that glibc's mmap threshold can be raised to, so only turning mmapped blocks off keeps them. None
    faults again with `import minivl`'s setting. Under glibc's defaults, and under the thresholds alone
    (32 MiB mmap, 64 MiB trim: this module's setting before it turned mmap off, set here through
    glibc's own tunables), each block is a fresh mapping every round: at least 20 faults each with
    NumPy's huge pages (40 MB / 2 MiB), some 10 000 without."""
    assert faults_per_round(40, 3) < 20
    assert faults_per_round(40, 3, MINIVL_MALLOC="system") > 50
    assert faults_per_round(40, 3, MALLOC_MMAP_THRESHOLD_=str(32 * 2 ** 20), MALLOC_TRIM_THRESHOLD_=str(64 * 2 ** 20)) > 50


def test_a_users_choice_is_left_alone():
    assert allocator.keep_freed_memory({"MINIVL_MALLOC": "system"}) is False
    assert allocator.keep_freed_memory({"MINIVL_MALLOC": " System "}) is False
    for name in allocator.USER_CHOICES:  # glibc read the user's own tunable at start-up: it stays
        assert allocator.keep_freed_memory({name: "1048576"}) is False


@glibc
def test_on_glibc_the_thresholds_are_set():
    assert allocator.keep_freed_memory({}) is True
    assert allocator.keep_freed_memory({"MINIVL_MALLOC": ""}) is True


def test_elsewhere_nothing_is_set(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator._glibc_mallopt() is None
    assert allocator.keep_freed_memory({}) is False
