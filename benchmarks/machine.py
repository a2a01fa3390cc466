"""What this machine can do, measured now, in NumPy and in torch: the yardsticks for model timings.

* GEMM rate (GFLOP/s): C = A·B with square float32 matrices, 2·n³ flops per product. A prefill of
  many tokens is GEMM-bound, so its achieved GFLOP/s is read against this number.
* Memory read bandwidth (GB/s): y = W·x with a matrix far larger than the caches (GEMV: every
  byte of W is read once per product, 2 flops per 4 bytes, so it is bandwidth-bound). A cached
  decode step at batch 1 reads every weight once, exactly this access pattern.
* Elementwise exp (ns per element): y = e^x over 2^20 float32 numbers, one core (NumPy's ufuncs;
  torch with one thread, to compare kernels). Softmax and SiLU are passes like it: on a CPU
  whose exp is slow they weigh more against a prefill's GEMMs.

    python3 benchmarks/machine.py            # prints a markdown table
    from benchmarks.machine import machine_rates
    rates = machine_rates()                  # {"numpy": {"gemm_gflops": ..., "read_gbs": ...}, "torch": {...}}

Each rate is the best of several timed repeats over at least `min_seconds` (the max filters out
interference from other processes; these are "what the hardware gave us at its best" numbers).
"""
from __future__ import annotations

import time

import numpy as np


def _best_rate(run, work: float, min_seconds: float, min_repeats: int = 3) -> float:
    """max over repeats of work / seconds, repeating until min_seconds have elapsed."""
    run()  # warm-up: first-touch page faults, BLAS thread start, torch kernel selection
    best, start, repeats = 0.0, time.perf_counter(), 0
    while repeats < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        best = max(best, work / (time.perf_counter() - t0))
        repeats += 1
    return best


def gemm_gflops(framework: str = "numpy", n: int = 1024, dtype: str = "float32", min_seconds: float = 0.5) -> float:
    """GFLOP/s of an n×n by n×n matrix product (2·n³ flops)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    if framework == "torch":
        import torch

        a, b = torch.from_numpy(a), torch.from_numpy(b)
        out = torch.empty(n, n, dtype=a.dtype)
        run = lambda: torch.matmul(a, b, out=out)  # noqa: E731
    else:
        out = np.empty((n, n), dtype=dtype)
        run = lambda: np.matmul(a, b, out=out)  # noqa: E731
    return _best_rate(run, 2.0 * n ** 3, min_seconds) / 1e9


def read_bandwidth_gbs(framework: str = "numpy", megabytes: int = 256, dtype: str = "float32",
                       min_seconds: float = 0.5) -> float:
    """GB/s of streaming a `megabytes` matrix through y = W·x (each byte of W read once)."""
    itemsize = np.dtype(dtype).itemsize
    cols = 4096
    rows = megabytes * 2 ** 20 // (cols * itemsize)
    weight = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32).astype(dtype)
    x = np.ones(cols, dtype=dtype)
    if framework == "torch":
        import torch

        weight, x = torch.from_numpy(weight), torch.from_numpy(x)
        run = lambda: torch.mv(weight, x)  # noqa: E731
    else:
        run = lambda: weight @ x  # noqa: E731
    return _best_rate(run, float(weight.nbytes), min_seconds) / 1e9


def machine_rates(min_seconds: float = 0.5, gemm_n: int = 1024, megabytes: int = 256) -> dict:
    """{framework: {"gemm_gflops": float32 GEMM GFLOP/s, "read_gbs": float32 GEMV read GB/s}} for numpy and torch."""
    rates = {}
    for framework in ("numpy", "torch"):
        rates[framework] = {"gemm_gflops": gemm_gflops(framework, gemm_n, min_seconds=min_seconds),
                            "read_gbs": read_bandwidth_gbs(framework, megabytes, min_seconds=min_seconds)}
    return rates


def cpu_name() -> str:
    """The CPU's model name and its widest vector ISA (ratios differ between CPUs: the README's table
    names the one it ran on), from /proc/cpuinfo where there is one."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("asimd", "NEON")) if flag in flags), "")
    return f"{name}{f' ({isa})' if isa else ''}"


def describe_machine(torch_too: bool = True) -> str:
    """One line: CPU, core count and BLAS/torch threads, for the table's caption (torch_too=False: no
    torch, which it would import)."""
    import os

    line = f"{cpu_name()}, {os.cpu_count()} CPU cores visible"
    try:
        if torch_too:
            import torch

            line += f", torch {torch.__version__} with {torch.get_num_threads()} threads"
    except ImportError:
        pass
    return line + f", NumPy {np.__version__}"


def matmul_params(config) -> int:
    """Weights touched by matmuls per token: q, k, v, o, gate, up, down per layer, plus the LM head (tied or not, it is read once)."""
    hidden, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q = config.num_attention_heads * d
    kv = config.num_key_value_heads * d
    per_layer = hidden * q * 2 + hidden * kv * 2 + 3 * hidden * inter
    return config.num_hidden_layers * per_layer + config.vocab_size * hidden


def decoder_gemm_shapes(config, tokens: int, logits_positions: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every projection GEMM of one Llama/Qwen2 forward over `tokens` positions, as the
    model runs them: q|k|v as one GEMM and gate|up as one (fused at load, minivl/models/fused.py),
    o and down, per layer, then the LM head over `logits_positions` rows (1 for generation)."""
    hidden, inter, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    layer = [(tokens, hidden, q + 2 * kv), (tokens, q, hidden), (tokens, hidden, 2 * inter), (tokens, inter, hidden)]
    return layer * config.num_hidden_layers + [(logits_positions, hidden, config.vocab_size)]


def causal_attention_gemm_shapes(config, tokens: int, block: int = 128) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n) of the attention GEMMs a causal prefill cannot avoid, per layer: for each block
    of `block` queries, q·kᵀ and p·v against the keys up to the block's end (the masked half skipped)."""
    d, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    group = heads // kv_heads
    shapes = []
    for start in range(0, tokens, block):
        rows, keys = min(block, tokens - start), min(start + block, tokens)
        shapes += [(kv_heads, group * rows, d, keys), (kv_heads, group * rows, keys, d)]
    return shapes * config.num_hidden_layers


def time_gemms(gemms: list, framework: str = "numpy", repeats: int = 3, dtype: str = "float32",
               clock=time.perf_counter) -> float:
    """Best wall time of running these GEMMs back to back, operands preallocated: (m, k, n) is
    [m, k]·[n, k]ᵀ, a projection as `linear` computes it (x·Wᵀ, W stored [out, in]); (batch, m, k, n)
    a batched [m, k]·[k, n]. Every GEMM has operands of its own, so weights stream from memory as
    in a forward (a model's 30 layers never reuse one layer's weights from cache). The weights lie
    back to back in one allocation, as a loaded model's do (minivl/models/packing.py: one buffer,
    huge pages). The floor a forward built of them can reach."""
    rng = np.random.default_rng(0)
    weight_shapes = [(*batch, k, n) if batch else (n, k) for *batch, m, k, n in gemms]
    weights = np.empty(sum(int(np.prod(shape)) for shape in weight_shapes), dtype=dtype)
    operands, offset = [], 0
    for (*batch, m, k, n), weight_shape in zip(gemms, weight_shapes):
        a = rng.standard_normal((*batch, m, k), dtype=np.float32).astype(dtype)
        size = int(np.prod(weight_shape))
        b = weights[offset:offset + size].reshape(weight_shape)
        b[...] = rng.standard_normal(weight_shape, dtype=np.float32)
        offset += size
        if not batch:  # W [out, in], used transposed
            b = b.T
        operands.append((a, b, np.empty((*batch, m, n), dtype=dtype)))
    if framework == "torch":
        import torch

        operands = [tuple(torch.from_numpy(np.ascontiguousarray(x.T)).T if x.ndim == 2 and not x.flags.c_contiguous
                          else torch.from_numpy(x) for x in ops) for ops in operands]
        matmul = torch.matmul
    else:
        matmul = np.matmul

    def run():
        for a, b, out in operands:
            matmul(a, b, out=out)

    return time_best(run, repeats, clock)


def time_best(run, repeats: int, clock=time.perf_counter) -> float:
    """Best time of `repeats` calls after one warm-up (the minimum filters other processes out).

    clock: time.perf_counter (wall) or time.process_time (this process's CPU time, summed over its
    threads: blind to the time other processes hold the cores, the honest choice on a shared machine).
    """
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        run()
        best = min(best, clock() - t0)
    return best


def cpu_ticks(stat_text: str | None = None) -> dict | None:
    """The whole machine's CPU time so far, in clock ticks, by kind: {"busy", "idle", "steal"}, from
    /proc/stat's first line (Linux; None elsewhere, or where the file cannot be read).

    "steal" is time a virtual machine's CPUs were ready to run but the hypervisor ran something else
    (another tenant). On the shared 2-core VM of the README's latest table, timing SmolLM2's decode
    steps one by one with this read around each, the steps of 22 ms stretched to 46–60 ms when 5–7
    ticks (50–70 ms over the two CPUs) were stolen during them. Read before and after a run,
    `steal_percent` says how much of the run the machine did not have.
    """
    if stat_text is None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                stat_text = f.readline()
        except OSError:
            return None
    fields = stat_text.split()
    if len(fields) < 9 or fields[0] != "cpu" or not all(field.isdigit() for field in fields[1:9]):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    user, nice, system, idle, iowait, irq, softirq, steal = (int(field) for field in fields[1:9])
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def steal_percent(before: dict | None, after: dict | None) -> float | None:
    """The share of the machine's CPU time between two `cpu_ticks` readings that the hypervisor stole, in %."""
    if before is None or after is None:
        return None
    elapsed = sum(after[kind] - before[kind] for kind in ("busy", "idle", "steal"))
    return 100.0 * (after["steal"] - before["steal"]) / elapsed if elapsed > 0 else 0.0


def describe_steal(before: dict | None, after: dict | None) -> str:
    """A caption's clause: how much CPU time the hypervisor took during the run ('' where unknown)."""
    share = steal_percent(before, after)
    return "" if share is None else f"; the hypervisor stole {share:.1f} % of the CPU time during the run (/proc/stat)"


def exp_ns_per_element(framework: str = "numpy", n: int = 2 ** 20, min_seconds: float = 0.3) -> float:
    """Nanoseconds per element of float32 exp over n elements, one core, output preallocated."""
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    out = np.empty_like(x)
    if framework == "torch":
        import torch

        x, out = torch.from_numpy(x), torch.from_numpy(out)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rate = _best_rate(lambda: torch.exp(x, out=out), float(n), min_seconds)
        finally:
            torch.set_num_threads(threads)
    else:
        rate = _best_rate(lambda: np.exp(x, out=out), float(n), min_seconds)
    return 1e9 / rate


def markdown_table(rates: dict) -> str:
    lines = ["| | NumPy | torch |", "|---|---|---|",
             f"| float32 GEMM 1024³ (GFLOP/s) | {rates['numpy']['gemm_gflops']:.1f} | {rates['torch']['gemm_gflops']:.1f} |",
             f"| float32 GEMV read bandwidth (GB/s) | {rates['numpy']['read_gbs']:.1f} | {rates['torch']['read_gbs']:.1f} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_machine())
    print(markdown_table(machine_rates()))
    print(f"| float32 exp, one core (ns/element) | {exp_ns_per_element('numpy'):.2f} | {exp_ns_per_element('torch'):.2f} |")
