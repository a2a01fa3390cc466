"""`minivl perplexity FILE`: how surprised SmolLM2-135M is by a text file, exp(mean -log p(token | past)).

Sliding windows of --context tokens, --stride apart, when the text is longer than the context
(Hugging Face's scheme, see minivl/perplexity.py). NumPy by default, `--backend torch` for torch_impl.
"""
from __future__ import annotations

import time
from pathlib import Path

from minivl_cli.commands._checks import check_int
from minivl_cli.commands.chat import add_model_arguments, load_lm
from minivl.errors import GenerationError, NonFiniteError


def register(subparsers) -> None:
    parser = subparsers.add_parser("perplexity", help="perplexity of SmolLM2-135M on a text file",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a UTF-8 text file")
    add_model_arguments(parser)
    parser.add_argument("--context", type=int, default=1024, help="window length in tokens (default 1024)")
    parser.add_argument("--stride", type=int, default=None,
                        help="distance between window starts (default: context // 2)")
    parser.set_defaults(func=run)


def run(args) -> int:
    check_int("--context", args.context, 1, 2**20, "e.g. 1024; it is capped at the model's positions anyway",
              error=GenerationError)
    if args.stride is not None:
        check_int("--stride", args.stride, 1, 2**20, "leave it out for context // 2", error=GenerationError)
    path = Path(args.file)
    if not path.is_file():
        raise GenerationError(f"{path} is not a file; pass the path of a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(f"{path} is not UTF-8 text ({e}); convert it first, e.g. with iconv") from None
    model, tokenizer, _ = load_lm(args)
    ids = tokenizer.encode(text)
    limit = getattr(model.config, "max_position_embeddings", args.context)
    context = min(args.context, len(ids), limit)
    stride = args.stride if args.stride is not None else max(1, context // 2)
    if args.backend == "numpy":
        from minivl.perplexity import perplexity
    else:
        from torch_impl.perplexity import perplexity
    start = time.perf_counter()
    result = perplexity(model, ids, context=context, stride=min(stride, context))
    seconds = time.perf_counter() - start
    if result.nll != result.nll:  # NaN: the weights or the computation broke, not a property of the text
        raise NonFiniteError(f"the mean negative log-likelihood over {path} is NaN: the model's logits are not "
                             f"finite; check the checkpoint (minivl.checkpoint.check_weights) or use --dtype float64")
    print(f"perplexity {result.perplexity:.3f}  (mean NLL {result.nll:.4f} nats over {result.n_tokens} tokens, "
          f"{result.n_windows} window(s) of {context} tokens, stride {min(stride, context)}; "
          f"backend {args.backend} {args.dtype}; {seconds:.1f} s)")
    return 0
