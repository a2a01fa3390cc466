"""`minivl trace` writes every stage of one InternVL forward pass to a file; `minivl diff` compares two.

    minivl trace InternVL2-1B/ --image cat.jpg --prompt "Describe the image." --out minivl.safetensors
    python tools/trace_transformers.py InternVL2-1B-hf/ --image cat.jpg --prompt "..." --out hf.safetensors
    minivl diff hf.safetensors minivl.safetensors     # names the first stage where they part, and where

The trace format and the stages are described in minivl/trace.py. `diff A B` treats B as the
reference (the tolerance is scaled by B's values) and exits 1 when a stage is outside it.
"""
from __future__ import annotations

import json
import os
import platform

from minivl.errors import ConfigError, NonFiniteError, TraceError


def register(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="write every stage of an InternVL forward pass (safetensors)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="InternVL chat checkpoint (config.json, model.safetensors, tokenizer.json) "
                                          "or a bare InternViT checkpoint")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", default="Describe the image.", help="the user's question (default: %(default)s)")
    parser.add_argument("--out", required=True, help="trace file to write (.safetensors)")
    parser.add_argument("--backend", choices=("numpy", "torch"), default="numpy")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--max-num", type=int, default=None,
                        help="most tiles (default: the config's max_dynamic_patch)")
    parser.set_defaults(func=run_trace)

    diff = subparsers.add_parser("diff", help="compare two traces stage by stage; name the first divergence",
                                 description="Compare trace A with reference trace B stage by stage.")
    diff.add_argument("a", help="trace under test")
    diff.add_argument("b", help="reference trace")
    diff.add_argument("--ulps", type=float, default=None,
                      help="tolerance in ulps of the coarser dtype (default: 512 for float32/64, 16 for bf16/fp16)")
    diff.set_defaults(func=run_diff)


def versions(backend: str) -> dict:
    import numpy

    import minivl

    found = {"minivl": getattr(minivl, "__version__", "unknown"), "numpy": numpy.__version__,
             "python": platform.python_version()}
    if backend == "torch":
        import torch

        found["torch"] = torch.__version__
    return found


def load_backend(directory: str, backend: str, dtype: str, attn_implementation: str = "eager"):
    """(model, as_input) for the NumPy package or torch_impl; as_input turns NumPy inputs into the model's."""
    import numpy as np

    if backend == "numpy":
        import minivl.loading

        return minivl.loading.load_model(directory, dtype=dtype), np.asarray
    try:
        import torch

        import torch_impl.loading
    except ImportError as error:
        raise ConfigError(f"--backend torch needs torch ({error}); install the CPU wheel with "
                          "`pip install torch==2.13.0`") from None
    return (torch_impl.loading.load_model(directory, dtype=dtype, attn_implementation=attn_implementation),
            torch.from_numpy)


def model_kind(directory: str) -> str:
    from minivl.config import load_config

    model_type = load_config(directory).model_type
    if model_type not in ("internvl_chat", "intern_vit_6b"):
        raise ConfigError(f"{directory!r} is a {model_type!r} checkpoint; trace and the per-stage parity need an "
                          "InternVL chat checkpoint (model_type internvl_chat) or a bare InternViT (intern_vit_6b); "
                          "for a text-only LLM use `minivl parity DIR --ids ...`")
    return model_type


def bare_vit_pixels(model, image, dtype: str):
    """One tile at the ViT's own image_size (no tiling: a bare ViT has no tile grid)."""
    from minivl.preprocess import load_image

    pixel_values, _ = load_image(image, max_num=1, image_size=model.config.image_size, use_thumbnail=False)
    return pixel_values.astype(dtype)


def compute_stages(directory: str, backend: str, model, as_input, image, prompt: str, max_num, dtype: str) -> dict:
    """Every stage of this checkpoint for one image (+ prompt), under torch.no_grad for the torch backend."""
    import contextlib

    from minivl import trace

    context = contextlib.nullcontext()
    if backend == "torch":
        import torch

        context = torch.no_grad()
    with context:
        if model_kind(directory) == "intern_vit_6b":
            return trace.bare_vit_stages(model, bare_vit_pixels(model, image, dtype), as_input)
        pixel_values, grid, input_ids, _ = trace.internvl_inputs(directory, model, image, prompt, max_num, dtype)
        return trace.internvl_stages(model, pixel_values, input_ids, grid, as_input)


def first_nonfinite_stage(stages: dict) -> str | None:
    """'name (n NaN, m inf of k)' for the first float stage, in forward order, that holds NaN or inf."""
    import numpy as np

    from minivl.testing import to_numpy

    for name, value in stages.items():
        x = to_numpy(value)
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            return f"{name} ({int(np.isnan(x).sum())} NaN, {int(np.isinf(x).sum())} inf of {x.size})"
    return None


def _config_max_num(directory: str) -> int:
    """The tile limit `minivl trace` uses by default: max_dynamic_patch, or 1 for a static-size config / a bare ViT."""
    from minivl.config import load_config

    config = load_config(directory)
    if config.model_type != "internvl_chat":
        return 1
    return config.max_dynamic_patch if config.dynamic_image_size else 1


def run_trace(args) -> int:
    from minivl import trace
    from minivl.preprocess import MAX_TILES
    from minivl_cli.commands._checks import check_int, output_file

    if args.max_num is not None:
        check_int("--max-num", args.max_num, 1, MAX_TILES, "the released models use 12")
    output_file("--out", args.out, example="trace.safetensors")
    directory = os.fspath(args.directory)
    model_kind(directory)
    model, as_input = load_backend(directory, args.backend, args.dtype)
    stages = compute_stages(directory, args.backend, model, as_input, args.image, args.prompt, args.max_num, args.dtype)
    metadata = {"producer": f"minivl ({'NumPy' if args.backend == 'numpy' else 'torch_impl'})",
                "dtype": args.dtype, "versions": json.dumps(versions(args.backend)),
                "config_sha256": trace.config_sha256(directory), "checkpoint": os.path.abspath(directory),
                "image": os.path.abspath(args.image), "prompt": args.prompt,
                "max_num": str(args.max_num or _config_max_num(directory))}
    trace.save_trace(args.out, trace.Trace(stages, metadata))
    grid = stages["tile_grid"].tolist()
    print(f"wrote {len(stages)} stages to {args.out} ({metadata['producer']}, {args.dtype}, "
          f"grid {grid[0]}×{grid[1]}, {len(stages['pixel_values'])} tiles)")
    broken = first_nonfinite_stage(stages)
    if broken is not None:  # the trace is written (it shows where), but the run did compute NaN/inf
        raise NonFiniteError(f"the forward pass computed NaN/inf from stage {broken} on (the trace {args.out} "
                             f"holds it); the weights or inputs are far out of range: check the checkpoint")
    return 0


def run_diff(args) -> int:
    from minivl import trace

    if args.ulps is not None:
        from minivl_cli.commands._checks import check_float

        check_float("--ulps", args.ulps, 0.0, 1e6, "leave it out for 512 (float32/64) or 16 (bf16/fp16); 0 asks for "
                    "bit-equal stages")
    a, b = trace.load_trace(args.a), trace.load_trace(args.b)
    if a.metadata.get("config_sha256") and b.metadata.get("config_sha256") and \
            a.metadata["config_sha256"] != b.metadata["config_sha256"]:
        print("note: the two traces come from different config.json files (config_sha256 differs)")
    for label, path, one in (("A", args.a, a), ("B", args.b, b)):
        broken = first_nonfinite_stage(one.stages)
        if broken is not None:  # NaN where the other trace has NaN too counts as agreement: say it
            print(f"note: {label} ({path}) holds NaN/inf from stage {broken} on")
    rows = trace.diff_traces(a, b, args.ulps)
    dtype = trace.coarser_dtype(a.dtype, b.dtype)
    ulps = trace.DEFAULT_ULPS.get(dtype, 512.0) if args.ulps is None else args.ulps
    print(f"A: {args.a} ({a.metadata.get('producer', '?')}, {a.dtype})")
    print(f"B: {args.b} ({b.metadata.get('producer', '?')}, {b.dtype}), the reference")
    print(f"tolerance: {ulps:g} ulps of {dtype}, relative and of each stage's max |B|")
    print(trace.format_rows(rows))
    first = trace.first_divergence(rows)
    if first is None:
        compared = sum(row.status == "OK" for row in rows)
        if compared == 0:
            raise TraceError(f"{args.a} and {args.b} share no stage names; nothing was compared")
        print(f"all {compared} shared stages agree")
        return 0
    print(trace.describe_divergence(first))
    return 1
