"""glibc's malloc, set to keep the memory a layer frees for the next layer instead of returning it.

A forward allocates and frees arrays of the same large sizes layer after layer: a 448-px ViT's
[1025, 1536] float32 MLP activations are 6.3 MB, a head's [1025, 1025] scores 4.2 MB. glibc's
malloc gives the free memory at the top of a heap back to the kernel once there is more of it
than its trim threshold, and serves a block above its mmap threshold with an mmap of its own,
unmapped when freed. Both thresholds start at 128 KiB; glibc raises the mmap threshold to the
size of each larger mmapped block freed (up to 32 MiB) and the trim threshold to twice that, so a
ViT layer that frees more than two of its largest blocks at once still hands them back. Every page
handed back and taken again is a page fault when it is first written: in a process without torch,
DINOv2 at 448 px took 22 000 to 24 000 minor faults a forward on a 2-core VM, and none with the
thresholds fixed as below (best of 5: 446–466 ms a forward against 422–447;
`benchmarks/vision.py --numpy-only`). A 512-token SmolLM2 prefill took less than one fault a
forward either way.

`keep_freed_memory` fixes the two thresholds where glibc's own adjustment ends for large blocks
and turns the mmapped blocks off altogether: every block comes from a heap and goes back to it,
and a heap keeps up to 1 GiB free at its top. The mmap threshold cannot be raised past 32 MiB
(glibc refuses), and InternVL hands its ViT an image's tiles at once: at 7 tiles DINOv2's
[7175, 1536] MLP activations are 44 MB, mmapped and unmapped in every layer, ~22 000 faults a
forward (3.4–3.6 s); with no mmapped blocks and the heap's top kept, none (3.1–3.2 s). 13 tiles
free more than 256 MiB at once (9 700 faults a forward with a 256 MiB trim threshold, none with
512 MiB: 5.7 s against 6.3–6.7 s with mmapped blocks); an InternViT-300M's activations are
2.7× DINOv2's, hence 1 GiB (one forward each on a 2-core VM; `benchmarks/vision.py --numpy-only
--batch 7` counts the faults). It changes no computed value, only where memory comes from; the process
keeps up to 1 GiB a heap that a default glibc would have returned.

`import minivl` calls it on glibc (Linux), unless the user has chosen: MINIVL_MALLOC=system, or
any of glibc's own MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_ in the
environment (glibc read those at start-up and they stay). tests/test_allocator.py holds that a
freed block comes back without page faults, and that each choice is respected.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 32 * 2 ** 20   # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: its dynamic threshold's ceiling
MMAP_MAX = 0                    # no block is mmapped: larger ones come from the heap too
TRIM_THRESHOLD = 2 ** 30        # a heap keeps this much free at its top (module docstring)

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

# glibc's own environment tunables: when the user set one, malloc is theirs to configure
USER_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_fixed = False  # set by a successful keep_freed_memory(): what thresholds_fixed() reports


def keep_freed_memory(environ=None) -> bool:
    """Fix glibc malloc's mmap and trim thresholds, no mmapped blocks (module docstring); True when set, False when left alone.

    Left alone: not glibc (macOS, Windows, musl), MINIVL_MALLOC=system, or one of USER_CHOICES set.
    """
    environ = os.environ if environ is None else environ
    if environ.get("MINIVL_MALLOC", "").strip().lower() == "system" or any(name in environ for name in USER_CHOICES):
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success; setting either threshold also stops glibc's dynamic adjustment
    global _fixed
    fixed = (bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, MMAP_MAX))
             and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    _fixed = _fixed or fixed
    return fixed


def thresholds_fixed() -> bool:
    """True when keep_freed_memory has set the thresholds in this process (`import minivl` calls it)."""
    return _fixed


def _glibc_mallopt():
    """glibc's mallopt(int, int) -> int, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has a mallopt that does nothing  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt
