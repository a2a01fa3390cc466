"""`minivl trace` writes every stage of one forward pass to a file; `minivl diff` compares two.

    minivl trace InternVL2-1B/ --image cat.jpg --prompt "Describe the image." --out minivl.safetensors
    python tools/trace_transformers.py InternVL2-1B-hf/ --inputs minivl.safetensors --out hf.safetensors
    minivl diff hf.safetensors minivl.safetensors     # names the first stage where they part, and where

    minivl trace ~/.cache/minivl/smollm2-135m-instruct --prompt "The capital of France is" --out lm.safetensors

The second is a text-only LLM (Llama, Qwen2, InternLM2, Phi-3, MPT): no --image; the prompt is
tokenized with the directory's tokenizer (BOS where the checkpoint asks for one), or given as --ids.

The trace format and the stages are described in minivl/trace.py. `diff A B` treats B as the
reference (the tolerance is scaled by B's values) and exits 1 when a stage is outside it.
"""
from __future__ import annotations

import json
import os
import platform

from minivl.errors import ConfigError, NonFiniteError, TraceError


DEFAULT_PROMPT, DEFAULT_TEXT = "Describe the image.", "The capital of France is"
VISION_KINDS = ("internvl_chat", "intern_vit_6b")


def register(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="write every stage of an InternVL (or text-only LLM) forward "
                                                 "pass (safetensors)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="InternVL chat checkpoint (config.json, model.safetensors, tokenizer.json), "
                                          "a bare InternViT checkpoint, or a text-only LLM checkpoint")
    parser.add_argument("--image", help="image file (InternVL and InternViT checkpoints; none for a text-only LLM)")
    parser.add_argument("--prompt", default=None,
                        help=f"the user's question (InternVL, default: {DEFAULT_PROMPT!r}) or the text (an LLM, "
                             f"default: {DEFAULT_TEXT!r})")
    parser.add_argument("--ids", help="a text-only LLM's input as comma-separated token ids instead of --prompt "
                                      "(for a checkpoint without a tokenizer)")
    parser.add_argument("--decode", type=int, default=None, metavar="N",
                        help="also prefill all but the last N tokens into a KV cache and feed those N one at a time, "
                             "recorded as decode.* stages (generation's path; an LLM or InternVL's language model)")
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
    """The checkpoint's model_type: InternVL, a bare InternViT, or a text-only LLM minivl has a class for."""
    from minivl.config import load_config
    from minivl.models import MODEL_REGISTRY

    model_type = load_config(directory).model_type
    if model_type not in MODEL_REGISTRY:
        llms = ", ".join(sorted(set(MODEL_REGISTRY) - set(VISION_KINDS)))
        raise ConfigError(f"{directory!r} is a {model_type!r} checkpoint, which minivl has no model for; trace takes "
                          f"an InternVL chat checkpoint, a bare InternViT or a text-only LLM ({llms})")
    return model_type


def check_inputs_fit(kind: str, image, ids) -> None:
    """--image for InternVL and InternViT, never for an LLM; --ids for an LLM only."""
    if kind in VISION_KINDS and image is None:
        raise ConfigError(f"a {kind} checkpoint needs --image PATH (the picture its stages are computed for)")
    if kind not in VISION_KINDS and image is not None:
        raise ConfigError(f"a {kind!r} checkpoint is a text-only LLM: it takes no --image (leave it out, or pass "
                          f"an InternVL chat checkpoint)")
    if kind in VISION_KINDS and ids is not None:
        raise ConfigError("--ids is for text-only LLMs; an InternVL prompt is built from --prompt and the image tokens")


def text_ids(directory: str, prompt: str | None, ids: str | None, vocab_size: int):
    """[1, t] int64: --ids as given, else the prompt through the directory's tokenizer (BOS where it asks)."""
    import numpy as np

    from minivl.errors import CheckpointError
    from minivl.tokenizer import load_tokenizer

    if ids is not None:
        if prompt is not None:
            raise ConfigError("pass the text as --prompt or as --ids, not both")
        try:
            token_ids = [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--ids must be comma-separated integers, e.g. 1,2,3 (got {ids!r})") from None
    else:
        try:
            tokenizer = load_tokenizer(directory)
        except CheckpointError as error:
            raise ConfigError(f"{error}; or pass the token ids with --ids 1,2,3") from None
        token_ids = tokenizer.encode(DEFAULT_TEXT if prompt is None else prompt, add_special_tokens=True)
    if not token_ids:
        raise ConfigError("the input is no tokens; pass a longer --prompt or some --ids")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}) of this checkpoint")
    return np.asarray([token_ids], dtype=np.int64)


def bare_vit_pixels(model, image, dtype: str):
    """One tile at the ViT's own image_size (no tiling: a bare ViT has no tile grid)."""
    from minivl.preprocess import load_image

    pixel_values, _ = load_image(image, max_num=1, image_size=model.config.image_size, use_thumbnail=False)
    return pixel_values.astype(dtype)


def compute_stages(directory: str, backend: str, model, as_input, image, prompt: str | None, max_num, dtype: str,
                   ids: str | None = None, decode: int | None = None) -> dict:
    """Every stage of this checkpoint for one image (+ prompt), or an LLM's for one text, under torch.no_grad
    for the torch backend."""
    import contextlib

    from minivl import trace

    context = contextlib.nullcontext()
    if backend == "torch":
        import torch

        context = torch.no_grad()
    with context:
        kind = model_kind(directory)
        if kind == "intern_vit_6b":
            return trace.bare_vit_stages(model, bare_vit_pixels(model, image, dtype), as_input)
        if kind != "internvl_chat":
            input_ids = text_ids(directory, prompt, ids, model.config.vocab_size)
            stages = trace.decoder_stages(model, input_ids, as_input)
            if decode is not None:
                if not 1 <= decode < input_ids.shape[1]:
                    raise ConfigError(f"--decode {decode}: the input has {input_ids.shape[1]} tokens, so N must be in "
                                      f"[1, {input_ids.shape[1] - 1}] (at least one token is the prefill)")
                stages.update(trace.decoder_decode_stages(model, input_ids, decode, as_input))
            return stages
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        pixel_values, grid, input_ids, _ = trace.internvl_inputs(directory, model, image, prompt, max_num, dtype)
        if decode is not None and not 1 <= decode < input_ids.shape[1]:
            raise ConfigError(f"--decode {decode}: the prompt has {input_ids.shape[1]} tokens, so N must be in "
                              f"[1, {input_ids.shape[1] - 1}]")
        try:
            return trace.internvl_stages(model, pixel_values, input_ids, grid, as_input, decode_steps=decode or 0)
        except TraceError as error:
            raise ConfigError(f"--decode {decode}: {error}") from None


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
    kind = model_kind(directory)
    check_inputs_fit(kind, args.image, args.ids)
    if kind not in VISION_KINDS and args.max_num is not None:
        raise ConfigError("--max-num limits an image's tiles; a text-only LLM has none (leave it out)")
    if kind == "intern_vit_6b" and args.decode is not None:
        raise ConfigError("--decode traces a language model's cached steps; a bare InternViT has none")
    model, as_input = load_backend(directory, args.backend, args.dtype)
    stages = compute_stages(directory, args.backend, model, as_input, args.image, args.prompt, args.max_num, args.dtype,
                            ids=args.ids, decode=args.decode)
    metadata = {"producer": f"minivl ({'NumPy' if args.backend == 'numpy' else 'torch_impl'})",
                "dtype": args.dtype, "versions": json.dumps(versions(args.backend)),
                "config_sha256": trace.config_sha256(directory), "checkpoint": os.path.abspath(directory)}
    if kind in VISION_KINDS:
        metadata.update(image=os.path.abspath(args.image), prompt=DEFAULT_PROMPT if args.prompt is None else args.prompt,
                        max_num=str(args.max_num or _config_max_num(directory)))
    else:
        metadata.update(model_type=kind, prompt="" if args.ids is not None else
                        (DEFAULT_TEXT if args.prompt is None else args.prompt))
    if args.decode is not None:
        metadata["decode_steps"] = str(args.decode)
    trace.save_trace(args.out, trace.Trace(stages, metadata))
    if kind in VISION_KINDS:
        grid = stages["tile_grid"].tolist()
        what = f"grid {grid[0]}×{grid[1]}, {len(stages['pixel_values'])} tiles"
    else:
        what = f"{type(model).__name__}, {stages['input_ids'].shape[1]} tokens"
    if args.decode is not None:
        what += f", the last {args.decode} through the KV cache"
    print(f"wrote {len(stages)} stages to {args.out} ({metadata['producer']}, {args.dtype}, {what})")
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
