"""What packing the weights into one huge-page buffer does (minivl/models/packing.py and its torch twin):
SmolLM2-135M (float32, batch 1) prefill of 64 and 512 tokens and cached decode, each package's model
packed and unpacked, next to transformers, in interleaved rounds (every row once a round, the best
of each kept), so that a slow minute of a shared machine slows every row alike.

NumPy packs at load; torch_impl does not (this script measured its GEMMs slower on the packed
buffer): here each package loads its model both ways, packing explicitly with `pack_parameters`.
One more torch_impl row gives every fused q|k|v and gate|up module a weight of its own, so that
`project` runs the separate GEMMs transformers runs (torch_impl fuses them at load, as NumPy does;
benchmarks/projections.py times the two ways on the products alone, where a whole-model run is too noisy).

    python3 benchmarks/packing.py               # markdown table
    python3 benchmarks/packing.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import minivl  # noqa: E402,F401  (before NumPy loads OpenBLAS: it sets OpenBLAS's spin time, minivl/__init__.py)
import numpy as np  # noqa: E402

from machine import cpu_ticks, describe_machine, describe_steal  # noqa: E402
from smollm2 import bench_decode, bench_prefill  # noqa: E402


def transparent_huge_pages() -> str:
    """The kernel's THP mode ('madvise', 'always', 'never'), the bracketed word of its setting."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="rounds (every row once a round; best kept)")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed after a 64-token prompt")
    args = parser.parse_args(argv)

    import torch
    import transformers

    import minivl.models.common
    import minivl.models.packing
    import torch_impl
    import torch_impl.models.common
    import torch_impl.models.packing
    from minivl.weights.smollm2 import ensure_smollm2

    path = ensure_smollm2()

    def load(package, packed: bool):
        module, common, packing = ((minivl, minivl.models.common, minivl.models.packing) if package == "numpy" else
                                   (torch_impl, torch_impl.models.common, torch_impl.models.packing))
        original = getattr(common, "pack_parameters", None)  # NumPy's build_model packs, torch_impl's does not
        common.pack_parameters = lambda model: None
        try:
            model = module.load_model(path, dtype="float32", **({} if package == "numpy" else
                                                                 {"attn_implementation": "sdpa"}))
        finally:
            if original is None:
                del common.pack_parameters
            else:
                common.pack_parameters = original
        if packed:
            packing.pack_parameters(model)
        return model

    def separate(model):
        """Each fused module's weight a tensor of its own: `project` then runs one GEMM per module."""
        for _, module in model.named_modules():
            if getattr(module, "fused", None) is not None:
                module.weight = torch.nn.Parameter(module.weight.clone(), requires_grad=False)
                if module.bias is not None:
                    module.bias = torch.nn.Parameter(module.bias.clone(), requires_grad=False)
        return model

    rows = {"NumPy, packed (as loaded)": (load("numpy", True), np.asarray),
            "NumPy, unpacked": (load("numpy", False), np.asarray),
            "torch_impl sdpa, packed": (load("torch", True), torch.from_numpy),
            "torch_impl sdpa, unpacked (as loaded)": (load("torch", False), torch.from_numpy),
            "torch_impl sdpa, unpacked, projections separate": (separate(load("torch", False)), torch.from_numpy),
            f"transformers {transformers.__version__}": (
                transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), torch.from_numpy)}
    rng = np.random.default_rng(0)
    prompts = {P: rng.integers(0, 49152, (1, P)) for P in (64, 512)}
    best = {name: [float("inf")] * 3 for name in rows}
    ticks = cpu_ticks()
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, (model, wrap) in rows.items():
                times = (bench_prefill(model, wrap, prompts[64], 1), bench_prefill(model, wrap, prompts[512], 1),
                         bench_decode(model, wrap, prompts[64], args.new_tokens, 1))
                best[name] = [min(a, b) for a, b in zip(best[name], times)]
    steal = describe_steal(ticks, cpu_ticks())

    print(f"SmolLM2-135M-Instruct, float32, batch 1, prefill (logits_to_keep=1) and cached decode ({args.new_tokens} "
          f"steps after 64 tokens); best of {args.repeats} interleaved rounds (decode: a run's median step); transparent huge pages: "
          f"{transparent_huge_pages()}; {describe_machine()}; load average {os.getloadavg()[0]:.1f} at the end{steal}.")
    print()
    print("| | prefill 64 (ms) | prefill 512 (ms) | decode (ms/token) |")
    print("|---|---|---|---|")
    for name, (p64, p512, decode) in best.items():
        print(f"| {name} | {p64 * 1e3:.0f} | {p512 * 1e3:.0f} | {decode * 1e3:.1f} |")


if __name__ == "__main__":
    main()
