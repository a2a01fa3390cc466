"""Fused or separate projections: SmolLM2-135M's q|k|v and gate|up products as ONE GEMM per group
(`minivl/models/fused.py`: the weights concatenated at load) or one GEMM per module (what the
checkpoint stores and transformers runs), in NumPy (OpenBLAS) and in torch (MKL), for a range of
row counts m (1 = a decode step, 64 and 512 = prefills).

Every layer has weights of its own (30 layers, as the model: the products stream their weights
from memory instead of reusing one layer's from cache), the separate GEMMs read row blocks of the
fused matrix (views, as a fused model's modules hold them), and the two ways run in interleaved
rounds (each once a round, the median and the best kept), so that a slow minute of a shared
machine slows both alike. Before anything is timed the two ways' results are compared: equal to a
GEMM's summation order (OpenBLAS takes another kernel for a few rows, m = 2 to 5 here, and the fused
q|k|v then differs from the separate one by ~4 ulps); the last column says by how much.

A second table times the other half of the question, the weight's memory layout: the fused gate|up
matrix as the checkpoint stores it ([out, in], the rows of W contiguous) against the same values
stored [in, out], the same x·Wᵀ either way. BLAS libraries pick different kernels for the two.

    python3 benchmarks/projections.py                 # markdown table
    python3 benchmarks/projections.py --rows 1 64 --rounds 60
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import minivl  # noqa: E402,F401  (before NumPy loads OpenBLAS: it sets OpenBLAS's spin time, minivl/__init__.py)
import numpy as np  # noqa: E402

from machine import describe_machine  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, intermediate 1536, 30 layers
HIDDEN, GROUPS, LAYERS = 576, {"q|k|v": (576, 192, 192), "gate|up": (1536, 1536)}, 30


def layer_weights(framework: str, rng, layers: int = LAYERS) -> list:
    """Per layer, per group: (the fused [Σ out, in] matrix, [row-block views of it, one per module])."""
    weights = []
    for _ in range(layers):
        groups = {}
        for name, outs in GROUPS.items():
            fused = rng.standard_normal((sum(outs), HIDDEN), dtype=np.float32)
            if framework == "torch":
                import torch

                fused = torch.from_numpy(fused)
            ends = np.cumsum(outs)
            groups[name] = (fused, [fused[stop - out:stop] for out, stop in zip(outs, ends)])
        weights.append(groups)
    return weights


def runners(framework: str, layers: list, x, group: str) -> dict:
    """{'fused': all layers' products of `group` as one GEMM each, 'separate': one per module}."""
    if framework == "torch":
        import torch.nn.functional as F

        def product(x, weight):
            return F.linear(x, weight)
    else:
        def product(x, weight):
            return x @ weight.T

    def fused():
        return [product(x, layer[group][0]) for layer in layers]

    def separate():
        return [[product(x, view) for view in layer[group][1]] for layer in layers]

    return {"fused": fused, "separate": separate}


def layout_runners(framework: str, layers: list, x) -> dict:
    """{'[out, in]': gate|up as the checkpoint stores it, '[in, out]': the same values stored transposed}.

    Both compute x·Wᵀ with W of shape [out, in]; the second W is a transposed view of an [in, out]
    array, so BLAS reads the other memory order (a GEMV then walks the columns of W, not its rows).
    """
    stored = [layer["gate|up"][0] for layer in layers]
    if framework == "torch":
        import torch.nn.functional as F

        transposed = [w.t().contiguous().t() for w in stored]
        return {"[out, in]": lambda: [F.linear(x, w) for w in stored],
                "[in, out]": lambda: [F.linear(x, w) for w in transposed]}
    transposed = [np.ascontiguousarray(w.T).T for w in stored]
    return {"[out, in]": lambda: [x @ w.T for w in stored], "[in, out]": lambda: [x @ w.T for w in transposed]}


def interleaved(run: dict, rounds: int) -> dict:
    """{way: [seconds per round]}: every way once a round, in alternating order."""
    times = {way: [] for way in run}
    for round_ in range(rounds):
        for way in (list(run) if round_ % 2 else list(run)[::-1]):
            t0 = time.perf_counter()
            run[way]()
            times[way].append(time.perf_counter() - t0)
    return times


def ulps_apart(a: list, b: list) -> float:
    """The largest difference of two runs' outputs, in float32 ulps of each output's max |y|."""
    return max(float(np.abs(x - y).max() / np.abs(x).max() / np.finfo(np.float32).eps)
               for x, y in zip(map(np.asarray, a), map(np.asarray, b)))


def row(keys: list, times: dict, ulps: float, first: str, second: str, ratio: tuple | None = None) -> str:
    """One markdown row: the keys, each way's median (best) in ms, a ratio of medians (best), the difference."""
    med = {way: statistics.median(t) * 1e3 for way, t in times.items()}
    best = {way: min(t) * 1e3 for way, t in times.items()}
    top, bottom = ratio or (first, second)
    cells = ["NumPy" if keys[0] == "numpy" else "torch", *map(str, keys[1:])]
    cells += [f"{med[way]:.2f} ({best[way]:.2f})" for way in (first, second)]
    cells.append(f"{med[top] / med[bottom]:.2f}× ({best[top] / best[bottom]:.2f}×)")
    cells.append("bit-equal" if ulps == 0 else f"{ulps:.1f} ulps of max|y|")
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512], help="rows m of x [1, m, 576]")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds per row count")
    parser.add_argument("--layers", type=int, default=LAYERS, help="layers, each with weights of its own")
    parser.add_argument("--no-torch", action="store_true", help="NumPy only")
    args = parser.parse_args(argv)

    frameworks = ["numpy"] if args.no_torch else ["numpy", "torch"]
    rng = np.random.default_rng(0)
    weights = {framework: layer_weights(framework, rng, args.layers) for framework in frameworks}
    results, layouts = {}, {}
    for framework in frameworks:
        context = None
        if framework == "torch":
            import torch

            context = torch.inference_mode()
            context.__enter__()
        for m in args.rows:
            x = rng.standard_normal((1, m, HIDDEN), dtype=np.float32)
            if framework == "torch":
                x = torch.from_numpy(x)
            for group in GROUPS:
                run = runners(framework, weights[framework], x, group)
                separate = [np.concatenate([np.asarray(p) for p in parts], -1) for parts in run["separate"]()]
                ulps = ulps_apart(run["fused"](), separate)
                # the same numbers to a GEMM's summation order, or the timing compares different work
                # (tests/test_fast_decoder.py's tolerance for the fused model: 16 ulps of max|logits|)
                assert ulps <= 16, (framework, m, group, ulps)
                results[framework, m, group] = interleaved(run, args.rounds), ulps
            run = layout_runners(framework, weights[framework], x)
            ulps = ulps_apart(run["[out, in]"](), run["[in, out]"]())
            assert ulps <= 16, (framework, m, "layout", ulps)
            layouts[framework, m] = interleaved(run, args.rounds), ulps
        if context is not None:
            context.__exit__(None, None, None)

    print(f"SmolLM2-135M's projections over {args.layers} layers (weights of their own per layer), x [1, m, {HIDDEN}] "
          f"float32; median (best) of {args.rounds} interleaved rounds; "
          f"{describe_machine()}; load average {os.getloadavg()[0]:.1f} at the end.")
    print()
    print("| framework | m | group | fused (ms) | separate (ms) | fused ÷ separate, median (best) | fused − separate |")
    print("|---|---|---|---|---|---|---|")
    for (framework, m, group), (times, ulps) in results.items():
        print(row([framework, m, group], times, ulps, "fused", "separate"))
    print()
    print("The fused gate|up weight as the checkpoint stores it, [out, in], and the same values stored [in, out]:")
    print()
    print("| framework | m | [out, in] (ms) | [in, out] (ms) | [in, out] ÷ [out, in], median (best) | difference |")
    print("|---|---|---|---|---|---|")
    for (framework, m), (times, ulps) in layouts.items():
        print(row([framework, m], times, ulps, "[out, in]", "[in, out]", ratio=("[in, out]", "[out, in]")))

if __name__ == "__main__":
    main()
