"""`minivl parity DIR`: load one checkpoint into minivl (NumPy) and torch_impl, run the same prompt
through both, and print a per-layer table of their disagreement; exit 1 if any layer differs.

    minivl parity path/to/checkpoint --ids 1,2,3,4
    minivl parity path/to/checkpoint --prompt "Hello" --dtype float64
    minivl parity InternVL2-1B/ --component language_model

Rows: the embedding output, each block's output, the final norm, the logits. Each is compared with
the tolerance the test suite uses: |numpy − torch| <= ulps·eps(dtype)·(max|torch| + |torch|), default
64 ulps (the two packages run the same ops in the same order; only summation orders and last-ulp
transcendental differences separate them, measured below 15 ulps on every family).
"""
from __future__ import annotations

import os

import numpy as np

from minivl.errors import ConfigError

DEFAULT_ULPS = 64


def register(subparsers) -> None:
    parser = subparsers.add_parser("parity", help="per-layer NumPy vs torch comparison of a checkpoint",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="checkpoint directory (config.json + model.safetensors)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ids", help="comma-separated token ids (default: 1..16)")
    source.add_argument("--prompt", help="text, encoded with the directory's tokenizer.json")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--ulps", type=float, default=DEFAULT_ULPS,
                        help=f"tolerance in ulps of each tensor's max |value| (default {DEFAULT_ULPS})")
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

        token_ids = Tokenizer.from_file(tokenizer_path).encode(prompt).ids
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
    rows = []
    for name, a, r in zip(names, list(numpy_out.hidden_states) + [numpy_out.logits],
                          list(torch_out.hidden_states) + [torch_out.logits]):
        ref = to_numpy(r)
        rtol, atol = tolerance(dtype, ulps, ulps, scale=float(np.abs(ref).max()))
        rows.append((name, compare(a, ref, rtol, atol)))
    return rows


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

    directory = os.fspath(args.directory)
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
