"""`minivl perplexity FILE`: how surprised SmolLM2-135M is by a text file, exp(mean -log p(token | past)).

Sliding windows of --context tokens, --stride apart, when the text is longer than the context
(Hugging Face's scheme, see minivl/perplexity.py). NumPy by default, `--backend torch` for torch_impl.
"""
from __future__ import annotations

import time
from pathlib import Path

from minivl_cli.commands._checks import check_int, checkpoint_directory
from minivl_cli.commands.chat import add_model_arguments, checkpoint_model_type, load_lm
from minivl.errors import ConfigError, GenerationError, NonFiniteError


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
    args.model_dir = checkpoint_directory("--model-dir", args.model_dir)
    check_int("--context", args.context, 1, 2**20, "e.g. 1024; it is capped at the model's positions anyway",
              error=GenerationError)
    if args.stride is not None:
        check_int("--stride", args.stride, 1, 2**20, "leave it out for context // 2", error=GenerationError)
    if args.context == 1:
        raise GenerationError("--context must be at least 2 tokens (got 1): a window needs one token to condition "
                              "on and one to score; e.g. 1024")
    path = Path(args.file)
    if not path.is_file():
        why = ("it is a directory" if path.is_dir() else "it does not exist" if not path.exists()
               else "it is a device, pipe or other special file")
        raise GenerationError(f"{path} is not a file: {why}; pass the path of a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(f"{path} is not UTF-8 text ({e}); convert it first, e.g. with iconv") from None
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # name the file (a read error names none)
    kind = checkpoint_model_type(args.model_dir)
    if kind in ("internvl_chat", "intern_vit_6b"):
        raise ConfigError(f"--model-dir {args.model_dir} is an {kind!r} checkpoint; perplexity scores a text-only "
                          f"language model: pass a decoder checkpoint (llama, qwen2, internlm2, phi3, mpt), e.g. the "
                          f"LLM an InternVL checkpoint nests, saved on its own")
    model, tokenizer, _ = load_lm(args)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise GenerationError(f"{path} encodes to {len(ids)} token{'s' if len(ids) != 1 else ''}; perplexity needs at "
                              f"least 2 (one to condition on, one to score): pass a longer text")
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
