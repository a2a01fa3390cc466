"""Prefill and cached decode of a mid-size random Qwen2-like decoder, in NumPy and torch, next to the
machine's own GEMM and memory-bandwidth rates measured in the same run (benchmarks/machine.py).

    python3 benchmarks/decoder.py                      # markdown table for the README
    python3 benchmarks/decoder.py --family internlm2   # the same sizes as InternLM2 (wqkv grouped per KV head)
    python3 benchmarks/decoder.py --layers 24 --hidden 896 --heads 14 --kv-heads 2 --intermediate 4864
    OPENBLAS_NUM_THREADS=1 python3 benchmarks/decoder.py --torch-threads 1   # on a loaded machine

On a machine shared with other jobs, multi-threaded BLAS/OpenMP spin-waits stall on every small
decode op (measured here: 26 ms for one [1, 8, 1, 135] attention with 2 torch threads under load,
0.25 ms with 1), so the single-threaded command gives the meaningful numbers there.

Default model: 8 layers, hidden 512, 8 heads / 2 KV heads (GQA, head_dim 64), MLP 1536, vocab 8192,
float32 (33.6 M matmul parameters, 134 MB): big enough that the matmuls, not Python, set the time,
small enough to run in well under a minute on 2 cores.

How to read it:
* prefill of P tokens is matmul-bound: achieved GFLOP/s = (2·matmul params·P + causal attention
  4·P²·hidden per layer) / time, against the machine's GEMM rate;
* one cached decode step at batch 1 reads every weight once (plus the KV cache): achieved GB/s =
  bytes read / time, against the machine's GEMV read bandwidth.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import minivl  # noqa: E402,F401  (before NumPy loads OpenBLAS: it sets OpenBLAS's spin time, minivl/__init__.py)
import numpy as np  # noqa: E402

from machine import describe_machine, machine_rates, matmul_params, time_best  # noqa: E402


def build_checkpoint(directory, args) -> str:
    from minivl.tiny.llm import write_tiny_llm

    return write_tiny_llm(directory, args.family, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                          intermediate_size=args.intermediate, vocab_size=args.vocab,
                          max_position_embeddings=4096, seed=1)


def bench(model, to_input, ids: np.ndarray, new_tokens: int, repeats: int):
    """(prefill seconds, decode seconds per token), best of `repeats`."""
    prefill = time_best(lambda: model(to_input(ids), use_cache=True), repeats)

    def decode():
        out = model(to_input(ids), use_cache=True)
        cache, token = out.past_key_values, ids[:, -1:]
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(to_input(token), past_key_values=cache, use_cache=True)
        return (time.perf_counter() - t0) / new_tokens

    decode()
    return prefill, min(decode() for _ in range(repeats))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2", choices=["qwen2", "llama", "internlm2"],
                        help="the architecture of the random decoder (minivl/tiny/llm.py), at the sizes below")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=128, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=16, help="cached decode steps timed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice); on a loaded machine 1 "
                             "thread avoids OpenMP spin-wait stalls on small decode ops")
    args = parser.parse_args(argv)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    import minivl
    import torch_impl

    rates_before = machine_rates(min_seconds=0.3, megabytes=128)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(os.path.join(tmp, f"{args.family}_like"), args)
        numpy_model = minivl.load_model(path, dtype="float32")
        torch_model = torch_impl.load_model(path, dtype="float32", attn_implementation="eager")
        torch_sdpa = torch_impl.load_model(path, dtype="float32", attn_implementation="sdpa")
    config = numpy_model.config
    params = matmul_params(config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt))
    P = args.prompt
    prefill_flops = 2.0 * params * P + 4.0 * P * P * config.hidden_size * config.num_hidden_layers
    # a decode step reads every matmul weight once plus the KV cache (K and V, [kv_heads, ~P, d] per layer)
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (P + args.new_tokens / 2) * 4
    decode_bytes = params * 4 + kv_bytes

    from minivl.models import decode_step

    results = {}
    with torch.inference_mode():
        for name, model, to_input in (("NumPy", numpy_model, np.asarray), ("torch eager", torch_model, torch.from_numpy),
                                      ("torch sdpa", torch_sdpa, torch.from_numpy)):
            results[name] = bench(model, to_input, ids, args.new_tokens, args.repeats)
        plan, decode_step.decode_plan = decode_step.decode_plan, lambda *a: None
        try:
            results["NumPy, no flat decode step"] = bench(numpy_model, np.asarray, ids, args.new_tokens, args.repeats)
        finally:
            decode_step.decode_plan = plan
    # measured before AND after the model runs, best of both: other processes on a shared machine make
    # any single measurement an underestimate
    rates_after = machine_rates(min_seconds=0.3, megabytes=128)
    rates = {fw: {key: max(rates_before[fw][key], rates_after[fw][key]) for key in rates_before[fw]}
             for fw in rates_before}

    print(f"{args.family} random decoder: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads, MLP {config.intermediate_size}, "
          f"vocab {config.vocab_size}; {params / 1e6:.1f} M matmul parameters ({params * 4 / 1e6:.0f} MB float32); "
          f"batch 1, prompt {P}, {args.new_tokens} cached decode steps; {describe_machine()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end of the run (other processes share these cores).")
    print()
    print("| | prefill (ms) | prefill tokens/s | prefill GFLOP/s | % of GEMM | decode (ms/token) | decode GB/s | % of read BW |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (prefill, decode) in results.items():
        framework = "numpy" if name.startswith("NumPy") else "torch"
        gflops = prefill_flops / prefill / 1e9
        gbs = decode_bytes / decode / 1e9
        print(f"| {name} | {prefill * 1e3:.1f} | {P / prefill:.0f} | {gflops:.1f} | "
              f"{100 * gflops / rates[framework]['gemm_gflops']:.0f}% | {decode * 1e3:.2f} | {gbs:.1f} | "
              f"{100 * gbs / rates[framework]['read_gbs']:.0f}% |")
    print(f"| machine, NumPy | | | {rates['numpy']['gemm_gflops']:.1f} (GEMM 1024³) | | | "
          f"{rates['numpy']['read_gbs']:.1f} (GEMV 128 MB) | |")
    print(f"| machine, torch | | | {rates['torch']['gemm_gflops']:.1f} (GEMM 1024³) | | | "
          f"{rates['torch']['read_gbs']:.1f} (GEMV 128 MB) | |")


if __name__ == "__main__":
    main()
