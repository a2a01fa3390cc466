"""SmolLM2-135M-Instruct (real weights, float32) in NumPy, torch_impl and transformers: prefill of 64
and 512 tokens and cached decode per token, each as a RATIO to what this machine allows, measured in
the same run (benchmarks/machine.py):

* prefill ÷ its GEMMs: the forward's time over the time of the same matrix products alone
  (projections over every prompt token, q|k|v and gate|up each one GEMM as the model fuses them,
  the causal half of the attention products, the LM head over the one position generation needs),
  run back to back on preallocated operands;
* decode ÷ bandwidth floor: a cached step at batch 1 reads every weight once (134.5 M matmul
  parameters, 538 MB in float32, the tied head included) plus the KV cache; bytes ÷ the GEMV read
  bandwidth is the floor no implementation can beat;
* ÷ transformers: the same work in transformers (torch CPU) in the same run.

    python3 benchmarks/smollm2.py              # markdown table for the README
    python3 benchmarks/smollm2.py --repeats 5 --new-tokens 32 --long 8192
    OPENBLAS_NUM_THREADS=1 python3 benchmarks/smollm2.py --torch-threads 1   # on a shared machine

Prefill asks for the last position's logits only (`logits_to_keep=1`, transformers' name) where the
model takes it, as generation does; perplexity needs them all.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import minivl  # noqa: E402,F401  (before NumPy loads OpenBLAS: it sets OpenBLAS's spin time, minivl/__init__.py)
import numpy as np  # noqa: E402

from machine import (causal_attention_gemm_shapes, cpu_ticks, decoder_gemm_shapes, describe_machine, describe_steal,  # noqa: E402
                     machine_rates, matmul_params, time_best, time_gemms)


def forward_kwargs(model) -> dict:
    """Generation's prefill needs the last position's logits only; ask for just that where the model can."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def cache_name(model) -> str:
    """The KV cache's argument and output name: `cache` in transformers >= 5.24 (its `past_key_values`
    is deprecated, to be removed in 5.40), `past_key_values` in minivl and torch_impl."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def bench_prefill(model, to_input, ids: np.ndarray, repeats: int) -> float:
    kwargs = forward_kwargs(model)
    return time_best(lambda: model(input_ids=to_input(ids), use_cache=True, **kwargs), repeats)


def decode_steps(model, to_input, ids: np.ndarray, new_tokens: int, clock=time.perf_counter,
                 stolen: list | None = None) -> list[float]:
    """Seconds of each of `new_tokens` cached decode steps after a prefill of `ids`, one timing a step.

    stolen: each step's stolen CPU ticks (`machine.cpu_ticks`, read outside the timed span) are
    appended to it (None where /proc/stat cannot be read).
    """
    kwargs = forward_kwargs(model)
    out = model(input_ids=to_input(ids), use_cache=True, **kwargs)
    key = cache_name(model)
    cache, token = getattr(out, key), to_input(ids[:, -1:])
    steps = []
    for _ in range(new_tokens):
        before = cpu_ticks() if stolen is not None else None
        t0 = clock()
        out = model(input_ids=token, use_cache=True, **{key: cache})
        steps.append(clock() - t0)
        if stolen is not None:
            after = cpu_ticks()
            stolen.append(None if before is None or after is None else after["steal"] - before["steal"])
        cache = getattr(out, key)
    return steps


def bench_decode(model, to_input, ids: np.ndarray, new_tokens: int, repeats: int, clock=time.perf_counter,
                 runs: list | None = None) -> float:
    """Seconds per cached decode step after a prefill of `ids`: the median step of a run of new_tokens
    steps, the best of `repeats` runs (after one warm-up run).

    The median, not the mean: on a shared VM the hypervisor now and then takes the CPUs away in the
    middle of a step (steal time), and that step takes two or three times as long as the others;
    a mean folds those steps into the model's time (with a mean, one run here read 28 ms a token and
    the next 22). runs: each timed run is appended to it as (step seconds, stolen ticks a step), and
    `main` prints how many steps stood out and how many of those had ticks stolen. Every model's
    steps are timed the same way.
    """
    decode_steps(model, to_input, ids, new_tokens, clock)
    best = float("inf")
    for _ in range(repeats):
        stolen = [] if runs is not None else None
        steps = decode_steps(model, to_input, ids, new_tokens, clock, stolen)
        if runs is not None:
            runs.append((steps, stolen))
        best = min(best, float(np.median(steps)))
    return best


def long_prefill_peak(model, ids: np.ndarray) -> tuple[float, float]:
    """(seconds, peak MiB traced by tracemalloc) of one NumPy prefill of `ids`, logits of the last position only."""
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=True, **forward_kwargs(model))
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return seconds, peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 512], help="prefill lengths")
    parser.add_argument("--new-tokens", type=int, default=16, help="cached decode steps timed (after a 64-token prompt)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each model and yardstick once a round; best kept)")
    parser.add_argument("--long", type=int, default=0, help="also one NumPy prefill of this many tokens "
                                                             "(e.g. 8192): time and tracemalloc peak")
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers out")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice); with OPENBLAS_NUM_THREADS=1 in "
                             "the environment, a 1-thread run that other processes disturb less")
    args = parser.parse_args(argv)

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

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
    reference = None
    if not args.no_transformers:
        try:
            import transformers

            hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            reference = f"transformers {transformers.__version__}"
            models[reference] = (hf, torch.from_numpy, "torch")
        except ImportError:
            pass

    config = models["NumPy"][0].config
    params = matmul_params(config)
    # real text, so the numbers are those of a real prompt (any ids would time the same)
    with open(os.path.join(os.path.dirname(HERE), "tests", "data", "english.txt"), encoding="utf-8") as f:
        text_ids = Tokenizer.from_file(path).encode(f.read())
    longest = max(args.prompts + [args.long])
    text_ids = (text_ids * (longest // len(text_ids) + 1))[:longest]
    prompts = {P: np.asarray([text_ids[:P]], dtype=np.int64) for P in args.prompts}
    decode_prompt = prompts[min(args.prompts)]

    # the floor's GEMV reads as many bytes as a decode step does (not a matrix that fits this
    # machine's last-level cache: a VM may report hundreds of MiB of L3)
    floor_megabytes = -(-params * 4 // 2 ** 20)
    decode_gemvs = decoder_gemm_shapes(config, 1, 1)
    # the GEMMs a prefill cannot avoid, alone: projections over P tokens, the causal half of the
    # attention products, the LM head over the one position generation needs
    prefill_gemms = {P: decoder_gemm_shapes(config, P, 1) + causal_attention_gemm_shapes(config, P) for P in args.prompts}
    inf = float("inf")
    gemms, gemvs = {P: inf for P in args.prompts}, inf
    results = {name: ({P: inf for P in args.prompts}, inf) for name in models}
    decode_runs = {name: [] for name in models}  # every timed decode run's step times
    ticks = cpu_ticks()
    with torch.inference_mode():
        rates = machine_rates(min_seconds=0.3, megabytes=floor_megabytes)
        # rounds: every model and every yardstick once per round, the best of each kept, so that a
        # slow minute of this shared machine slows all of them alike instead of one
        for _ in range(args.repeats):
            gemvs = min(gemvs, time_gemms(decode_gemvs, "numpy", 1))
            gemms = {P: min(gemms[P], time_gemms(shapes, "numpy", 1)) for P, shapes in prefill_gemms.items()}
            for name, (model, to_input, _) in models.items():
                prefill, decode = results[name]
                prefill = {P: min(prefill[P], bench_prefill(model, to_input, ids, 1)) for P, ids in prompts.items()}
                decode = min(decode, bench_decode(model, to_input, decode_prompt, args.new_tokens, 1, runs=decode_runs[name]))
                results[name] = (prefill, decode)
        # measured again after the models: on a shared machine any single measurement is an underestimate
        after = machine_rates(min_seconds=0.3, megabytes=floor_megabytes)
        rates = {fw: {key: max(rates[fw][key], after[fw][key]) for key in rates[fw]} for fw in rates}
    steal = describe_steal(ticks, cpu_ticks())

    P0 = decode_prompt.shape[1]
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (P0 + args.new_tokens / 2) * 4
    decode_bytes = params * 4 + kv_bytes
    floor = {fw: decode_bytes / (rates[fw]["read_gbs"] * 1e9) for fw in rates}

    print(f"SmolLM2-135M-Instruct, float32, batch 1: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads; {params / 1e6:.1f} M matmul parameters "
          f"({params * 4 / 1e6:.0f} MB); decode = {args.new_tokens} cached steps after a {P0}-token prompt; "
          f"best of {args.repeats} interleaved rounds (decode: a run's median step); {describe_machine()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end{steal}.")
    print()
    head = "| |" + "".join(f" prefill {P} (ms) | ÷ its GEMMs |" for P in args.prompts)
    head += " decode (ms/token) | ÷ bandwidth floor |" + (f" ÷ {reference} (prefill {'/'.join(map(str, args.prompts))}, decode) |" if reference else "")
    print(head)
    print("|---|" + "---|---|" * len(args.prompts) + "---|---|" + ("---|" if reference else ""))
    for name, (prefill, decode) in results.items():
        framework = models[name][2]
        row = f"| {name} |" + "".join(f" {prefill[P] * 1e3:.0f} | {prefill[P] / gemms[P]:.2f}× |" for P in args.prompts)
        row += f" {decode * 1e3:.1f} | {decode / floor[framework]:.2f}× |"
        if reference:
            ref_prefill, ref_decode = results[reference]
            row += " " + " / ".join(f"{prefill[P] / ref_prefill[P]:.2f}×" for P in args.prompts) + f", {decode / ref_decode:.2f}× |"
        print(row)
    print("| the same GEMMs alone, NumPy |" + "".join(f" {gemms[P] * 1e3:.0f} | 1× |" for P in args.prompts)
          + f" {floor['numpy'] * 1e3:.1f} (floor: {decode_bytes / 1e6:.0f} MB at {rates['numpy']['read_gbs']:.1f} GB/s) | 1× |"
          + (" |" if reference else ""))
    print("| the decode's GEMVs alone, NumPy |" + " | |" * len(args.prompts) + f" {gemvs * 1e3:.1f} ({params * 4 / gemvs / 1e9:.1f} GB/s) | "
          f"{gemvs / floor['numpy']:.2f}× |" + (" |" if reference else ""))
    print(f"\nmachine: NumPy GEMM 1024³ {rates['numpy']['gemm_gflops']:.1f} GFLOP/s, GEMV read of {floor_megabytes} MiB "
          f"{rates['numpy']['read_gbs']:.1f} GB/s; torch GEMM {rates['torch']['gemm_gflops']:.1f} GFLOP/s, GEMV read "
          f"{rates['torch']['read_gbs']:.1f} GB/s (torch floor {floor['torch'] * 1e3:.1f} ms/token). NumPy decode ÷ its "
          f"own GEMVs: {results['NumPy'][1] / gemvs:.2f}×")
    print("\ndecode steps that took over 1.5× their run's median (a mean per token would have counted them; "
          "ticks stolen: /proc/stat's steal moved during the step): "
          + "; ".join(f"{name} {outliers(runs)}" for name, runs in decode_runs.items()))
    if args.long:
        ids = np.asarray([text_ids[:args.long]], dtype=np.int64)
        seconds, peak = long_prefill_peak(models["NumPy"][0], ids)
        heads_n_n = config.num_attention_heads * args.long ** 2 * 4 / 2 ** 20
        print(f"\nNumPy prefill of {args.long} tokens: {seconds:.1f} s, tracemalloc peak {peak:.0f} MiB "
              f"(one [heads, n, n] float32 score tensor would be {heads_n_n:.0f} MiB)")


def outliers(runs: list) -> str:
    """'k of n steps (up to x.x× the median; j with ticks stolen)': the steps of these runs (bench_decode's
    `runs`) over 1.5× their own run's median, and how many of them the hypervisor took ticks from."""
    slow = [(step / float(np.median(steps)), ticks) for steps, stolen in runs
            for step, ticks in zip(steps, stolen) if step > 1.5 * float(np.median(steps))]
    total = sum(len(steps) for steps, _ in runs)
    if not slow:
        return f"0 of {total}"
    known = [ticks for _, ticks in slow if ticks is not None]
    robbed = f"; {sum(ticks > 0 for ticks in known)} with ticks stolen" if known else ""
    return f"{len(slow)} of {total} (up to {max(ratio for ratio, _ in slow):.1f}× the median{robbed})"


if __name__ == "__main__":
    main()
