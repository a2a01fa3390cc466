"""SmolLM2-135M-Instruct (real weights, float32) in NumPy, torch_impl and transformers: prefill of 64
and 512 tokens and cached decode per token, next to the machine's GEMM rate and memory-read bandwidth
measured in the same run (benchmarks/machine.py).

    python3 benchmarks/smollm2.py              # markdown table for the README
    python3 benchmarks/smollm2.py --repeats 5 --new-tokens 32

How to read it:
* a prefill of P tokens is matmul-bound: achieved GFLOP/s = (2·matmul params·P + attention
  4·P²·hidden per layer) / time, against the machine's GEMM rate;
* a cached decode step at batch 1 reads every weight once (134.5 M matmul parameters, 538 MB in
  float32, the tied lm head included) plus the KV cache: achieved GB/s = bytes / time, against the
  machine's GEMV read bandwidth. 538 MB / read bandwidth is the floor no implementation can beat.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from machine import describe_machine, machine_rates, matmul_params, time_best  # noqa: E402


def bench_prefill(model, to_input, ids: np.ndarray, repeats: int) -> float:
    return time_best(lambda: model(input_ids=to_input(ids), use_cache=True), repeats)


def bench_decode(model, to_input, ids: np.ndarray, new_tokens: int, repeats: int) -> float:
    """Seconds per cached decode step after a prefill of `ids` (best of `repeats` runs of new_tokens steps)."""

    def decode():
        out = model(input_ids=to_input(ids), use_cache=True)
        cache, token = out.past_key_values, to_input(ids[:, -1:])
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        return (time.perf_counter() - t0) / new_tokens

    decode()
    return min(decode() for _ in range(repeats))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 512], help="prefill lengths")
    parser.add_argument("--new-tokens", type=int, default=16, help="cached decode steps timed (after a 64-token prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers out")
    args = parser.parse_args(argv)

    import torch

    import minivl
    import torch_impl.loading
    from minivl.tokenizer import Tokenizer
    from minivl.weights.smollm2 import ensure_smollm2

    path = ensure_smollm2()
    models = {"NumPy": (minivl.load_model(path, dtype="float32"), np.asarray, "numpy"),
              "torch_impl eager": (torch_impl.loading.load_model(path, dtype="float32", attn_implementation="eager"),
                                   torch.from_numpy, "torch"),
              "torch_impl sdpa": (torch_impl.loading.load_model(path, dtype="float32", attn_implementation="sdpa"),
                                  torch.from_numpy, "torch")}
    if not args.no_transformers:
        try:
            import transformers

            hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            models[f"transformers {transformers.__version__}"] = (hf, torch.from_numpy, "torch")
        except ImportError:
            pass
    rates = machine_rates(min_seconds=0.3)

    config = models["NumPy"][0].config
    params = matmul_params(config)
    # real text, so the numbers are those of a real prompt (any ids would time the same)
    with open(os.path.join(os.path.dirname(HERE), "tests", "data", "english.txt"), encoding="utf-8") as f:
        text_ids = Tokenizer.from_file(path).encode(f.read())
    text_ids = (text_ids * (max(args.prompts) // len(text_ids) + 1))[: max(args.prompts)]
    prompts = {P: np.asarray([text_ids[:P]], dtype=np.int64) for P in args.prompts}
    decode_prompt = prompts[min(args.prompts)]

    results = {}
    with torch.inference_mode():
        for name, (model, to_input, _) in models.items():
            prefill = {P: bench_prefill(model, to_input, ids, args.repeats) for P, ids in prompts.items()}
            decode = bench_decode(model, to_input, decode_prompt, args.new_tokens, args.repeats)
            results[name] = (prefill, decode)

    P0 = decode_prompt.shape[1]
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (P0 + args.new_tokens / 2) * 4
    decode_bytes = params * 4 + kv_bytes

    def prefill_gflops(P, seconds):
        return (2.0 * params * P + 4.0 * P * P * config.hidden_size * config.num_hidden_layers) / seconds / 1e9

    print(f"SmolLM2-135M-Instruct, float32, batch 1: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads; {params / 1e6:.1f} M matmul parameters "
          f"({params * 4 / 1e6:.0f} MB); decode = {args.new_tokens} cached steps after a {P0}-token prompt; "
          f"best of {args.repeats}; {describe_machine()}.")
    print()
    head = "| |" + "".join(f" prefill {P} (ms) | GFLOP/s, % of GEMM |" for P in args.prompts)
    head += " decode (ms/token) | tokens/s | GB/s, % of read BW |"
    print(head)
    print("|---|" + "---|---|" * len(args.prompts) + "---|---|---|")
    for name, (prefill, decode) in results.items():
        framework = models[name][2]
        row = f"| {name} |"
        for P in args.prompts:
            g = prefill_gflops(P, prefill[P])
            row += f" {prefill[P] * 1e3:.0f} | {g:.1f}, {100 * g / rates[framework]['gemm_gflops']:.0f}% |"
        gbs = decode_bytes / decode / 1e9
        row += f" {decode * 1e3:.1f} | {1 / decode:.1f} | {gbs:.1f}, {100 * gbs / rates[framework]['read_gbs']:.0f}% |"
        print(row)
    for framework in ("numpy", "torch"):
        floor = decode_bytes / (rates[framework]["read_gbs"] * 1e9)
        print(f"| machine, {'NumPy' if framework == 'numpy' else 'torch'} |"
              + "".join(f" | {rates[framework]['gemm_gflops']:.1f} GFLOP/s (GEMM 1024³) |" for _ in args.prompts)
              + f" {floor * 1e3:.1f} (bandwidth floor) | | {rates[framework]['read_gbs']:.1f} GB/s (GEMV 256 MB) |")


if __name__ == "__main__":
    main()
