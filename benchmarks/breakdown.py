"""Where a NumPy forward's time goes, stage by stage, timed inside the model rather than in isolation.

A stage is a library function the models call: the projections' `linear`, the attention, `silu_mul`,
the RMS norms, RoPE (SmolLM2's prefill); decode_step's GEMVs, attention, norms, SiLU and RoPE (its
cached decode step); the attention, `gelu_fast`, the LayerNorms (`layer_norm_fast`) and the projections (DINOv2 at
448 px). For the length of a run each is wrapped with a timer (perf_counter before and after the
call, ~1 µs), the forwards run, and the table gives ms a forward for each stage and for the rest
("everything else": the embedding, reshapes, residual adds, the Python between the calls).

Timed inside the model, a pass over an activation costs what it costs after the GEMM that wrote it
(those caches already hold the GEMM's weights): in isolation, on data a loop keeps warm, the same
call can run twice as fast. The stages do not nest (no timed function calls another), so the
rows add up to the forward.

    python3 benchmarks/breakdown.py                  # SmolLM2 prefill 64 and 512, decode, DINOv2 448 px
    python3 benchmarks/breakdown.py --prompts 64 --repeats 20 --no-vision
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import minivl  # noqa: E402,F401  (before NumPy loads OpenBLAS: it sets OpenBLAS's spin time, minivl/__init__.py)
import numpy as np  # noqa: E402

from machine import describe_machine  # noqa: E402


def prefill_stages() -> dict:
    """{stage: (module, function name)} of a Llama/Qwen2 prefill (each looked up by the models at call time)."""
    from minivl import activations, attention_blocks, linear, norms, rope

    return {"projections and LM head (linear)": (linear, "linear"),
            "attention (causal_attention_blocks)": (attention_blocks, "causal_attention_blocks"),
            "silu_mul": (activations, "silu_mul"),
            "RMS norms (rms_norm_fast)": (norms, "rms_norm_fast"),
            "RoPE (apply_rope_fast)": (rope, "apply_rope_fast")}


def decode_stages() -> dict:
    """{stage: (module, function name)} of a cached decode step through `decode_layers`."""
    from minivl import linear
    from minivl.models import decode_step

    return {"the layers' GEMVs (_linear)": (decode_step, "_linear"),
            "LM head (linear)": (linear, "linear"),
            "attention (_attend)": (decode_step, "_attend"),
            "RMS norms (_rms_norm)": (decode_step, "_rms_norm"),
            "SiLU · up (_silu_mul)": (decode_step, "_silu_mul"),
            "RoPE (_rope)": (decode_step, "_rope"),
            "the plan (decode_plan)": (decode_step, "decode_plan")}


def vision_stages() -> dict:
    """{stage: (module, function name)} of an InternViT forward (intern_vit imports two of them by name)."""
    from minivl import linear, norms
    from minivl.models import intern_vit

    return {"projections (linear)": (linear, "linear"),
            "attention (attention_blocks)": (intern_vit, "attention_blocks"),
            "GELU (gelu_fast)": (intern_vit, "gelu_fast"),
            "LayerNorms (layer_norm_fast)": (norms, "layer_norm_fast")}


class Stages:
    """Each stage's function wrapped, while `installed`, to add its wall time to `totals[stage]` (and 1 to
    `calls[stage]`) inside a `measured()` block; outside such a block (a decode run's prefill) nothing counts."""

    def __init__(self, stages: dict):
        self.stages, self.totals, self.calls, self.seconds, self.counting = stages, Counter(), Counter(), 0.0, False

    def _timer(self, stage, function):
        def call(*args, **kwargs):
            if not self.counting:
                return function(*args, **kwargs)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[stage] += time.perf_counter() - start
                self.calls[stage] += 1
        return call

    @contextlib.contextmanager
    def installed(self):
        originals = {stage: getattr(module, name) for stage, (module, name) in self.stages.items()}
        try:
            for stage, (module, name) in self.stages.items():
                setattr(module, name, self._timer(stage, originals[stage]))
            yield self
        finally:
            for stage, (module, name) in self.stages.items():
                setattr(module, name, originals[stage])

    @contextlib.contextmanager
    def measured(self):
        """The part of a run that counts: its wall time and its stages' times."""
        self.counting, start = True, time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.counting = False


def breakdown(run, stages: dict, repeats: int, per_run: int = 1) -> tuple[float, dict, dict]:
    """(ms a forward, {stage: ms a forward}, {stage: calls a forward}) over `repeats` runs after one warm-up.

    run(measured) makes `per_run` forwards inside `with measured():` (a decode run's prefill stays outside).
    """
    run(contextlib.nullcontext)
    timing = Stages(stages)
    with timing.installed():
        for _ in range(repeats):
            run(timing.measured)
    forwards = repeats * per_run
    return (timing.seconds / forwards * 1e3, {stage: timing.totals[stage] / forwards * 1e3 for stage in stages},
            {stage: timing.calls[stage] / forwards for stage in stages})


def print_table(title: str, result: tuple) -> None:
    total, stages, calls = result
    print(f"\n{title}: {total:.1f} ms a forward\n")
    print("| stage | ms a forward | share | calls a forward |")
    print("|---|---|---|---|")
    for stage, ms in stages.items():
        print(f"| {stage} | {ms:.2f} | {ms / total:.0%} | {calls[stage]:g} |")
    rest = total - sum(stages.values())
    print(f"| everything else | {rest:.2f} | {rest / total:.0%} | |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 512], help="prefill lengths")
    parser.add_argument("--new-tokens", type=int, default=16, help="cached decode steps a run (after a 64-token prompt)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (after one warm-up)")
    parser.add_argument("--no-vision", action="store_true", help="leave DINOv2 out")
    parser.add_argument("--vision-size", type=int, default=448, help="DINOv2 input side in pixels (a multiple of 14)")
    args = parser.parse_args(argv)

    from minivl.weights.smollm2 import ensure_smollm2

    print(f"NumPy, float32, batch 1, each stage timed inside the model over {args.repeats} runs; {describe_machine(torch_too=False)}.")
    llm = minivl.load_model(ensure_smollm2(), dtype="float32")
    ids = np.arange(100, 100 + max(args.prompts + [64]), dtype=np.int64)[None]

    def prefill(length):
        def run(measured):
            with measured():
                llm(input_ids=ids[:, :length], use_cache=True, logits_to_keep=1)
        return run

    for length in args.prompts:
        print_table(f"SmolLM2-135M prefill of {length} tokens (logits_to_keep=1)",
                    breakdown(prefill(length), prefill_stages(), args.repeats))

    def decode(measured):
        cache = llm(input_ids=ids[:, :64], use_cache=True).past_key_values
        token = np.array([[100]], dtype=np.int64)
        with measured():
            for _ in range(args.new_tokens):
                out = llm(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)

    print_table(f"SmolLM2-135M cached decode step ({args.new_tokens} after a 64-token prompt)",
                breakdown(decode, decode_stages(), args.repeats, per_run=args.new_tokens))

    if not args.no_vision:
        from minivl.weights.dinov2 import dinov2_checkpoint

        vit = minivl.load_model(dinov2_checkpoint(), dtype="float32")
        pixels = np.random.default_rng(0).standard_normal((1, 3, args.vision_size, args.vision_size), dtype=np.float32)

        def vision(measured):
            with measured():
                vit(pixels)

        print_table(f"DINOv2-S/14 as InternViT at {args.vision_size} px", breakdown(vision, vision_stages(), args.repeats))


if __name__ == "__main__":
    main()
