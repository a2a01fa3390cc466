"""Peak memory and time: minivl's tiled FlashAttention (NumPy) against naive attention at 1k, 4k, 16k tokens.

    python3 benchmarks/flash_attention.py [--lengths 1024 4096 16384] [--head-dim 64] [--block 256]

One batch row, ONE head, float32, one BLAS thread, self-attention (s = t), non-causal, so both do the same
arithmetic. Naive attention holds the [n, n] float32 score matrix (16k tokens: 1 GiB per head;
it is written with in-place exp and division so that it holds one, not three, such matrices,
the kindest naive version). Peak memory is measured with tracemalloc (NumPy reports its buffers
to it), excluding the inputs, in a run separate from the timed run. Prints a markdown table;
saves nothing. Use --skip-naive-above N to leave naive out where it would not fit in memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

# one BLAS thread: on a small shared machine OpenBLAS threads oversubscribe the cores and make the
# tiled version's many small GEMMs up to 50x slower; one thread is also the fair comparison
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minivl.flash import flash_attention  # noqa: E402


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q·kᵀ/sqrt(d))·v with the whole score matrix: [b, h, n, d] x3 -> [b, h, n, d]"""
    scores = (q @ np.swapaxes(k, -1, -2)) * np.float32(q.shape[-1] ** -0.5)  # [b, h, n, n]
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores @ v


def measure(function, *args, **kwargs) -> tuple[float, int]:
    """(seconds of one timed call, peak bytes traced during a second call)."""
    start = time.perf_counter()
    function(*args, **kwargs)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    tracemalloc.reset_peak()
    function(*args, **kwargs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=256, help="block_q = block_k of the tiled version")
    parser.add_argument("--skip-naive-above", type=int, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"1 batch row, 1 head, head_dim {args.head_dim}, float32, non-causal; tiles {args.block}x{args.block}\n")
    print("| tokens | naive time | naive peak | tiled time | tiled peak | peak ratio naive/tiled | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        q, k, v = (rng.standard_normal((1, 1, n, args.head_dim)).astype(np.float32) for _ in range(3))
        tiled_time, tiled_peak = measure(flash_attention, q, k, v, block_q=args.block, block_k=args.block)
        tiled_out, _ = flash_attention(q, k, v, block_q=args.block, block_k=args.block)
        if args.skip_naive_above is not None and n > args.skip_naive_above:
            print(f"| {n} | (skipped) | (needs {mib(4 * n * n)}) | {tiled_time:.2f} s | {mib(tiled_peak)} | – | – |")
            continue
        naive_time, naive_peak = measure(naive_attention, q, k, v)
        diff = float(np.abs(naive_attention(q, k, v) - tiled_out).max())
        print(f"| {n} | {naive_time:.2f} s | {mib(naive_peak)} | {tiled_time:.2f} s | {mib(tiled_peak)} | "
              f"{naive_peak / tiled_peak:,.0f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
