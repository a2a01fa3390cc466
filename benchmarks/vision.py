"""DINOv2-S/14 (real weights, as an InternViT) at 448 px in NumPy and torch_impl, as a ratio to the
same matrix products run alone in the same run (benchmarks/machine.py):

* the patch embedding as one GEMM ([patches, 3·14·14] · [3·14·14, C]);
* per layer: qkv, the attention products q·kᵀ and p·v over every token pair (a ViT attends
  bidirectionally, nothing to skip), proj, fc1, fc2.

    python3 benchmarks/vision.py               # markdown table for the README
    python3 benchmarks/vision.py --size 224 --repeats 5
    python3 benchmarks/vision.py --batch 7     # an image's 7 tiles at once, as InternVL's ViT runs them
    python3 benchmarks/vision.py --clock cpu   # CPU time of this process: for a shared machine
    python3 benchmarks/vision.py --numpy-only  # torch never imported: the process `minivl describe-image` is

Each row also counts the page faults of a forward (getrusage's minor faults, averaged over the
rounds after the first): memory handed back to the kernel by one layer and faulted in again by the next. torch's own
large frees move glibc's malloc thresholds for the whole process, so a NumPy forward in a process
that has run torch is not the one a torch-free process runs: `--numpy-only` measures that one
(`MINIVL_MALLOC=system` leaves glibc's thresholds as they are, minivl/allocator.py).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import minivl  # noqa: E402,F401  (before NumPy loads OpenBLAS: it sets OpenBLAS's spin time, minivl/__init__.py)
import numpy as np  # noqa: E402

from machine import cpu_ticks, describe_machine, describe_steal, time_best, time_gemms  # noqa: E402


def vit_gemm_shapes(config, height: int, width: int, batch: int = 1) -> list[tuple]:
    """(m, k, n) / (batch, m, k, n) of every matrix product of one ViT forward over `batch` images:
    a projection's rows are every image's tokens, an attention product is one per (image, head)."""
    C, p, heads = config.hidden_size, config.patch_size, config.num_attention_heads
    patches = (height // p) * (width // p)
    tokens, d = patches + 1, C // heads
    rows, pairs = batch * tokens, batch * heads
    layer = [(rows, C, 3 * C), (pairs, tokens, d, tokens), (pairs, tokens, tokens, d), (rows, C, C),
             (rows, C, config.intermediate_size), (rows, config.intermediate_size, C)]
    return [(batch * patches, config.num_channels * p * p, C)] + layer * config.num_hidden_layers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=448, help="square input side in pixels (a multiple of 14)")
    parser.add_argument("--batch", type=int, default=1,
                        help="images a forward (InternVL's ViT sees an image's tiles at once: 7 for a 4:3 "
                             "photo at max_num 6, up to 13 at max_num 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (blind to other processes on a shared "
                             "machine; sums threads, so run with one BLAS/torch thread)")
    parser.add_argument("--numpy-only", action="store_true",
                        help="leave torch out of the process (never imported): NumPy as a torch-free process runs it")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import minivl
    from minivl.weights.dinov2 import dinov2_checkpoint

    path = dinov2_checkpoint()
    numpy_model = minivl.load_model(path, dtype="float32")
    config = numpy_model.config
    if args.batch < 1:
        parser.error(f"--batch must be 1 or more, got {args.batch}")
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
    models = {"NumPy": (numpy_model, np.asarray)}
    frameworks = ("numpy",)
    no_grad = contextlib.nullcontext()
    if not args.numpy_only:
        import torch

        import torch_impl

        for backend in ("eager", "sdpa"):
            models[f"torch_impl {backend}"] = (torch_impl.load_model(path, dtype="float32", attn_implementation=backend),
                                               torch.from_numpy)
        frameworks, no_grad = ("numpy", "torch"), torch.inference_mode()
    shapes = vit_gemm_shapes(config, args.size, args.size, args.batch)
    gemms = {fw: float("inf") for fw in frameworks}
    times = {name: float("inf") for name in models}
    faults = {name: [] for name in models}  # per round
    ticks = cpu_ticks()
    with no_grad:
        # rounds: every model and both GEMM yardsticks once per round, the best of each kept, so that
        # a slow minute of this shared machine slows all of them alike. --numpy-only: the model's
        # rounds first, then the yardstick's, whose large frees would move glibc's thresholds too
        for _ in range(args.repeats):
            if not args.numpy_only:
                gemms = {fw: min(t, time_gemms(shapes, fw, 1, clock=clock)) for fw, t in gemms.items()}
            for name, (model, to_input) in models.items():
                before = _minor_faults()
                times[name] = min(times[name], time_best(lambda: model(to_input(pixels)), 1, clock))
                faults[name].append(_minor_faults() - before)
        if args.numpy_only:
            gemms["numpy"] = min(time_gemms(shapes, "numpy", 1, clock=clock) for _ in range(args.repeats))
    steal = describe_steal(ticks, cpu_ticks())

    tokens = (args.size // config.patch_size) ** 2 + 1
    print(f"DINOv2-S/14 as InternViT, float32, batch {args.batch}, {args.size}×{args.size} px = {tokens} tokens, "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads; "
          f"best of {args.repeats} {'rounds, the GEMMs after the model' if args.numpy_only else 'interleaved rounds'}, "
          f"{args.clock} time; {describe_machine(torch_too=not args.numpy_only)}; "
          f"load average {os.getloadavg()[0]:.1f} at the end{steal}.")
    print()
    print("| | forward (ms) | the same GEMMs alone (ms) | ÷ its GEMMs | page faults a forward |")
    print("|---|---|---|---|---|")
    for name, seconds in times.items():
        fw = "numpy" if name == "NumPy" else "torch"
        # a round is time_best's warm-up and one timed call: two forwards; the first round (the
        # process's first forwards: all of its memory is new) is left out when there are others
        steady = faults[name][1:] or faults[name]
        print(f"| {name} | {seconds * 1e3:.0f} | {gemms[fw] * 1e3:.0f} ({'NumPy' if fw == 'numpy' else 'torch'}) | "
              f"{seconds / gemms[fw]:.2f}× | {sum(steady) / (2 * len(steady)):.0f} |")
    if args.numpy_only:
        from minivl.allocator import thresholds_fixed

        print(f"\ntorch not imported; malloc's thresholds: "
              f"{'fixed by minivl/allocator.py' if thresholds_fixed() else 'as the C library left them (MINIVL_MALLOC=system, a MALLOC_* tunable, or not glibc)'}.")


def _minor_faults() -> int:
    """Page faults this process has taken so far that needed no disk (fresh or returned memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


if __name__ == "__main__":
    main()
