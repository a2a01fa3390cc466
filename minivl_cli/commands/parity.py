"""`minivl parity DIR`: load one checkpoint into minivl (NumPy) and torch_impl, run the same prompt
through both, and print a per-layer table of their disagreement; exit 1 if any layer differs.

    minivl parity path/to/checkpoint --ids 1,2,3,4
    minivl parity path/to/checkpoint --prompt "Hello" --dtype float64
    minivl parity InternVL2-1B/ --image cat.jpg --prompt "Describe the image."
    minivl parity InternViT-300M-448px/ --image cat.jpg
    minivl parity InternVL2-1B/ --component language_model

On an InternVL chat checkpoint (or a bare InternViT) the table has one row per stage of the
forward pass (minivl/trace.py): tiles, ViT embeddings, every ViT layer, the select_layer output,
pixel shuffle, mlp1, the token ids, the merged input embeddings, every LLM layer, the final norm,
the logits; without --image a fixed synthetic picture is used. Tolerance there: 512 ulps (the
InternVL chat test's budget; the ledger docs/parity.md measures under 20).

Rows: the embedding output, each block's output, the final norm, the logits. Each is compared with
the tolerance the test suite uses: |numpy − torch| <= ulps·eps(dtype)·(max|torch| + |torch|), default
64 ulps (the two packages run the same ops in the same order; only summation orders and last-ulp
transcendental differences separate them, measured below 15 ulps on every family).
"""
from __future__ import annotations

import os

import numpy as np

from minivl.errors import ConfigError, NonFiniteError
from minivl_cli.commands._checks import check_float, check_int

DEFAULT_ULPS = 64
IMAGE_ULPS = 512
MAX_ULPS = 1e6


def register(subparsers) -> None:
    parser = subparsers.add_parser("parity", help="per-layer NumPy vs torch comparison of a checkpoint",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="checkpoint directory (config.json + model.safetensors)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ids", help="comma-separated token ids (default: 1..16)")
    source.add_argument("--prompt", help="text, encoded with the directory's tokenizer.json")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--image", help="image file for an InternVL / InternViT checkpoint (default: a synthetic one)")
    parser.add_argument("--max-num", type=int, default=None, help="most tiles (default: the config's)")
    parser.add_argument("--ulps", type=float, default=None,
                        help=f"tolerance in ulps of each tensor's max |value| (default {DEFAULT_ULPS}; "
                             f"{IMAGE_ULPS} for the stages of an image pipeline)")
    parser.add_argument("--component", choices=("language_model",), default=None,
                        help="load only the LLM of an InternVL chat checkpoint")
    parser.add_argument("--attn", dest="attn_implementation", default="eager",
                        choices=("eager", "sdpa", "flash", "triton"), help="torch attention backend")
    parser.set_defaults(func=run)


def prompt_ids(directory: str, ids: str | None, prompt: str | None, vocab_size: int) -> list[int]:
    """Token ids from --ids, or --prompt through tokenizer.json, or the default 1..16."""
    if prompt is not None:
        tokenizer_path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_path):
            raise ConfigError(f"--prompt needs a tokenizer.json in {directory}; there is none, so pass token ids "
                              f"with --ids 1,2,3")
        from tokenizers import Tokenizer

        from minivl.tokenizer import check_text

        token_ids = Tokenizer.from_file(tokenizer_path).encode(check_text(prompt, "--prompt")).ids
    elif ids is not None:
        try:
            token_ids = [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--ids must be comma-separated integers, e.g. 1,2,3 (got {ids!r})") from None
    else:
        token_ids = [i % vocab_size for i in range(1, 17)]
    if not token_ids:
        raise ConfigError("the prompt encodes to no tokens; pass a longer --prompt or some --ids")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ConfigError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return token_ids


def compare_layers(numpy_out, torch_out, dtype: str, ulps: float):
    """[(name, Comparison)] for embedding, each block, final norm, logits."""
    from minivl.testing import compare, tolerance, to_numpy

    names = (["embedding"] + [f"block {i}" for i in range(len(numpy_out.hidden_states) - 2)]
             + ["final norm", "logits"])
    pairs = [(name, np.asarray(a), to_numpy(r)) for name, a, r in
             zip(names, list(numpy_out.hidden_states) + [numpy_out.logits],
                 list(torch_out.hidden_states) + [torch_out.logits])]
    check_finite_layers(pairs)
    rows = []
    for name, a, ref in pairs:
        rtol, atol = tolerance(dtype, ulps, ulps, scale=float(np.abs(ref).max()))
        rows.append((name, compare(a, ref, rtol, atol)))
    return rows


def check_finite_layers(pairs) -> None:
    """NonFiniteError naming the first layer where either package's output holds NaN/inf: a tolerance
    cannot be scaled from a NaN, and a NaN there is the model's failure, not a disagreement."""
    for name, a, ref in pairs:
        broken = [package for package, x in (("minivl (NumPy)", a), ("torch_impl", ref)) if not np.isfinite(x).all()]
        if broken:
            raise NonFiniteError(f"the {name} output of {' and '.join(broken)} holds NaN/inf, so nothing from there "
                                 f"on can be compared: the weights are finite but the computation overflows (weights "
                                 f"or inputs far out of range); check the checkpoint, or try --dtype float64")


def format_table(rows) -> str:
    lines = ["| layer | max abs | max rel | tolerance (atol + rtol·|ref|) | |",
             "|---|---|---|---|---|"]
    for name, c in rows:
        lines.append(f"| {name} | {c.max_abs:.3e} | {c.max_rel:.3e} | {c.atol:.1e} + {c.rtol:.1e}·|ref| | "
                     f"{'OK' if c.ok else 'DIFF'} |")
    return "\n".join(lines)


def run(args) -> int:
    try:
        import torch

        import torch_impl.loading
    except ImportError as error:
        raise ConfigError(f"minivl parity compares against torch_impl, which needs torch ({error}); "
                          f"install the CPU wheel with `pip install torch==2.13.0` (a bare `torch` may pull a CUDA build)") from None
    import minivl.loading
    from minivl.config import load_config

    if args.ulps is not None:
        check_float("--ulps", args.ulps, 0.0, MAX_ULPS, f"the default is {DEFAULT_ULPS} ({IMAGE_ULPS} for an image "
                    f"pipeline); 0 asks for bit-equal outputs")
    directory = os.fspath(args.directory)
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory!r} is not a directory; pass a checkpoint directory holding config.json")
    model_type = load_config(directory).model_type
    if model_type == "intern_vit_6b" or (model_type == "internvl_chat" and args.component is None):
        return run_image_pipeline(args, directory, model_type)
    if args.image is not None:
        raise ConfigError(f"--image needs an InternVL chat checkpoint or a bare InternViT; {directory!r} is a "
                          f"{model_type!r} checkpoint{' loaded as its language_model' if args.component else ''}")
    args.ulps = DEFAULT_ULPS if args.ulps is None else args.ulps
    numpy_model = minivl.loading.load_model(directory, dtype=args.dtype, component=args.component)
    torch_model = torch_impl.loading.load_model(directory, dtype=args.dtype, component=args.component,
                                                attn_implementation=args.attn_implementation)
    config = numpy_model.config
    ids = np.array([prompt_ids(directory, args.ids, args.prompt, config.vocab_size)], dtype=np.int64)
    numpy_out = numpy_model(ids, output_hidden_states=True)
    torch_out = torch_model(torch.tensor(ids, device=torch_model.device), output_hidden_states=True)
    rows = compare_layers(numpy_out, torch_out, args.dtype, args.ulps)
    print(f"{type(numpy_model).__name__} from {directory}, {ids.shape[1]} tokens, {args.dtype}, "
          f"torch attn {args.attn_implementation}, tolerance {args.ulps:g} ulps of each tensor's max |value|")
    print(format_table(rows))
    n_diff = sum(not c.ok for _, c in rows)
    print("all layers agree" if n_diff == 0 else f"{n_diff} of {len(rows)} rows DIFFER "
          f"(first: {next(name for name, c in rows if not c.ok)})")
    return 0 if n_diff == 0 else 1


def run_image_pipeline(args, directory: str, model_type: str) -> int:
    """The per-stage table of an InternVL chat checkpoint or a bare InternViT: NumPy vs torch_impl."""
    from minivl import trace
    from minivl_cli.commands.trace import compute_stages, first_nonfinite_stage, load_backend

    if args.ids is not None:
        raise ConfigError("--ids is for text-only checkpoints; an InternVL prompt is built from --prompt and the "
                          "chat template (or pass --component language_model to check the LLM alone)")
    if args.max_num is not None:
        from minivl.preprocess import MAX_TILES

        check_int("--max-num", args.max_num, 1, MAX_TILES, "the released models use 12")
    ulps = IMAGE_ULPS if args.ulps is None else args.ulps
    image = args.image if args.image is not None else trace.synthetic_image()
    prompt = args.prompt if args.prompt is not None else "Describe the image."
    stages = {}
    for backend in ("numpy", "torch"):
        model, as_input = load_backend(directory, backend, args.dtype, args.attn_implementation)
        stages[backend] = compute_stages(directory, backend, model, as_input, image, prompt, args.max_num, args.dtype)
    for backend, package in (("numpy", "minivl (NumPy)"), ("torch", "torch_impl")):
        broken = first_nonfinite_stage(stages[backend])
        if broken is not None:  # NaN in both would compare as equal: the model's failure, not agreement
            raise NonFiniteError(f"{package} computed NaN/inf from stage {broken} on; the weights are finite "
                                 f"but the computation overflows (weights or inputs far out of range): check the "
                                 f"checkpoint, or try --dtype float64")
    rows = trace.compare_stages(stages["numpy"], stages["torch"], args.dtype, ulps)
    what = "InternVL chat" if model_type == "internvl_chat" else "InternViT"
    grid = stages["numpy"]["tile_grid"].tolist()
    print(f"{what} from {directory}, image {args.image or '(synthetic 100×60)'}, grid {grid[0]}×{grid[1]}, "
          f"{len(stages['numpy']['pixel_values'])} tiles, {args.dtype}, torch attn {args.attn_implementation}, "
          f"tolerance {ulps:g} ulps of each stage's max |value|")
    print(trace.format_rows(rows))
    first = trace.first_divergence(rows)
    if first is None:
        print(f"all {len(rows)} stages agree")
        return 0
    n_diff = sum(row.status == "DIFF" for row in rows)
    print(f"{n_diff} of {len(rows)} stages DIFFER; {trace.describe_divergence(first)}")
    return 1
