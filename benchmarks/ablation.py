"""What each NumPy fast path buys: SmolLM2-135M (prefill 512, cached decode) and DINOv2-S/14 at 448 px
with one fast path turned off at a time, measured in interleaved rounds (every row once a round, the
best of each kept), so that a slow minute of a shared machine slows every row alike.

The ratio column is paired: in every round each row runs right next to an "all on" run of its own
(row first in even rounds, "all on" first in odd ones), and a row's ratio is the median over the
rounds of row ÷ its partner, with the lowest and highest in brackets. A shared VM's speed drifts by
10 % and more within minutes; a pair shares the minute, so the drift divides out, where the ratio
of two rows' best times mixes two minutes. The ms columns are each row's best time.

Rows, each against "all on":

* no float32 attention kernel: each query block runs the reference softmax (max, −max, exp, Σ, ÷)
  instead of `_late_normalized_attention` (minivl/attention_blocks.py);
* no query blocks: attention is the reference's one full-score call, masked half included;
* one thread: MINIVL_NUM_THREADS=1, every softmax and activation pass on one core
  (minivl/threads.py; BLAS keeps its own threads);
* no flat decode step: each cached token runs the layers' own forward instead of
  `decode_layers` (minivl/models/decode_step.py);
* weights not packed: `pack_parameters` skipped at load, each weight its own allocation
  (minivl/models/packing.py);
* plain norms and apply_rope: the readable functions (four new arrays a norm, five passes a
  rotation) where the models call `rms_norm_fast`, `layer_norm_fast` and `apply_rope_fast` (bit-equal
  to them);
* caller waits on the pool: `parallel` as it was before the caller took pieces itself, every piece
  handed to the pool's workers while the caller sleeps (minivl/threads.py).

The fused projections, `logits_to_keep=1` and the in-place updates stay on in every row: they are
how the models are written, not switches. The switches are made here by replacing the named
function for the duration of a row; the library has no such options.

    python3 benchmarks/ablation.py              # markdown table
    python3 benchmarks/ablation.py --repeats 5
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import minivl  # noqa: E402,F401  (before NumPy loads OpenBLAS: it sets OpenBLAS's spin time, minivl/__init__.py)
import numpy as np  # noqa: E402

from machine import cpu_ticks, describe_machine, describe_steal, time_best  # noqa: E402
from smollm2 import bench_decode, bench_prefill  # noqa: E402


@contextlib.contextmanager
def replaced(module, name: str, value):
    """module.name = value inside the block, restored after it."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def environment(name: str, value: str):
    original = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if original is None:
            del os.environ[name]
        else:
            os.environ[name] = original


def pool_only(tasks, calls_blas: bool = False) -> list:
    """minivl.threads.parallel without the caller taking pieces: all go to the pool, the caller waits."""
    from concurrent.futures import wait

    from minivl import threads

    tasks = list(tasks)
    workers = threads.num_threads()
    if workers == 1 or len(tasks) <= 1 or getattr(threads._worker, "active", False):
        return [task() for task in tasks]
    with threads._one_blas_thread_each() if calls_blas else contextlib.nullcontext():
        futures = [threads._get_pool(workers).submit(threads._run_as_worker, task) for task in tasks]
        wait(futures)
        return [future.result() for future in futures]


def switches() -> dict:
    """Row name -> a context that turns one fast path off (None: all on)."""
    from minivl import activations, attention_blocks, norms, rope, threads
    from minivl.models import decode_step, intern_vit

    reference = attention_blocks.scaled_dot_product_attention

    def full_call(q, k, v, *, block_q=None, **options):
        return reference(q, k, v, **options)

    return {
        "all fast paths on": contextlib.nullcontext,
        "no float32 attention kernel": lambda: replaced(attention_blocks, "_fast_kernel_applies", lambda *a: False),
        "no query blocks (full-score attention)": lambda: _both(
            replaced(attention_blocks, "causal_attention_blocks", full_call),  # looked up at each call
            replaced(intern_vit, "attention_blocks", full_call)),  # imported by name there
        "one thread (MINIVL_NUM_THREADS=1)": lambda: environment("MINIVL_NUM_THREADS", "1"),
        "no flat decode step": lambda: replaced(decode_step, "decode_plan", lambda *a: None),
        "plain norms and apply_rope": lambda: _both(  # each looked up at each call
            replaced(norms, "rms_norm_fast", norms.rms_norm), replaced(norms, "layer_norm_fast", norms.layer_norm),
            replaced(rope, "apply_rope_fast", rope.apply_rope)),
        "caller waits on the pool": lambda: _both(  # imported by name in each module that hands out pieces
            replaced(threads, "parallel", pool_only), replaced(attention_blocks, "parallel", pool_only),
            replaced(activations, "parallel", pool_only)),
    }


@contextlib.contextmanager
def _both(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def load(path, packed: bool):
    """minivl.load_model, with `pack_parameters` skipped when not packed."""
    from minivl.models import common

    with contextlib.nullcontext() if packed else replaced(common, "pack_parameters", lambda model: None):
        return minivl.load_model(path, dtype="float32")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds (every row once a round, each next to an all-on run of its own)")
    parser.add_argument("--prompt", type=int, default=512, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed after a 64-token prompt")
    args = parser.parse_args(argv)

    from minivl.weights.dinov2 import dinov2_checkpoint
    from minivl.weights.smollm2 import ensure_smollm2

    llm_path, vit_path = ensure_smollm2(), dinov2_checkpoint()
    models = {packed: (load(llm_path, packed), load(vit_path, packed)) for packed in (True, False)}
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, models[True][0].config.vocab_size, (1, args.prompt))
    short = prompt[:, :64]
    pixels = rng.standard_normal((1, 3, 448, 448), dtype=np.float32)

    def measure(llm, vit) -> tuple:
        return (bench_prefill(llm, np.asarray, prompt, 1), bench_decode(llm, np.asarray, short, args.new_tokens, 1),
                time_best(lambda: vit(pixels), 1))

    rows = {name: (switch, True) for name, switch in switches().items()}
    rows["weights not packed"] = (contextlib.nullcontext, False)
    base_name = "all fast paths on"

    def run_row(name):
        switch, packed = rows[name]
        with switch():
            return measure(*models[packed])

    ticks = cpu_ticks()
    times, partners = paired_rounds(run_row, list(rows), base_name, args.repeats)
    steal = describe_steal(ticks, cpu_ticks())
    best = {name: tuple(np.min(times[name], axis=0)) for name in rows}
    ratios = paired_ratios(times, partners)

    print(f"NumPy, float32, batch 1: SmolLM2-135M prefill {args.prompt} (logits_to_keep=1) and cached decode "
          f"({args.new_tokens} steps after 64 tokens), DINOv2-S/14 at 448 px (1025 tokens); best of {args.repeats} "
          f"interleaved rounds (decode: a run's median step), each row paired with an all-on run in every round; "
          f"{describe_machine()}; load average {os.getloadavg()[0]:.1f} at the end{steal}.")
    print()
    print(f"| | prefill {args.prompt} (ms) | decode (ms/token) | ViT 448 px (ms) | ÷ its paired all-on run, median "
          f"(lowest–highest) of {args.repeats}: prefill, decode, ViT |")
    print("|---|---|---|---|---|")
    for name, (prefill, decode, vit) in best.items():
        cells = ", ".join(f"{median:.2f}× ({low:.2f}–{high:.2f})" for median, low, high in ratios.get(name, ()))
        print(f"| {name} | {prefill * 1e3:.0f} | {decode * 1e3:.1f} | {vit * 1e3:.0f} | {cells or '1×'} |")


def paired_rounds(run_row, names: list, base_name: str, rounds: int) -> tuple[dict, dict]:
    """(times, partners): times[name] = the row's runs, partners[name] = the all-on run next to each of them.

    In each round every row runs once, next to an all-on run of its own: the row first in even rounds,
    all on first in odd ones, so that neither side always gets the warmer or the cooler machine. The
    all-on row's own times are every partner run. run_row(name) -> a tuple of times, one per workload.
    """
    times, partners = {name: [] for name in names}, {name: [] for name in names if name != base_name}
    for round_index in range(rounds):
        for name in partners:
            order = (name, base_name) if round_index % 2 == 0 else (base_name, name)
            measured = {side: run_row(side) for side in order}
            times[name].append(measured[name])
            partners[name].append(measured[base_name])
            times[base_name].append(measured[base_name])
    return times, partners


def paired_ratios(times: dict, partners: dict) -> dict:
    """{name: [(median, lowest, highest) of run ÷ its partner over the rounds, one per workload]} for each paired row."""
    ratios = {}
    for name, runs in partners.items():
        quotients = np.array(times[name]) / np.array(runs)  # [rounds, workloads]
        ratios[name] = [(float(np.median(column)), float(column.min()), float(column.max())) for column in quotients.T]
    return ratios


if __name__ == "__main__":
    main()
