"""Write a minivl trace (minivl/trace.py) of transformers' InternVL port, through forward hooks.

    minivl trace InternVL2-1B/ --image cat.jpg --prompt "Describe the image." --out minivl.safetensors
    python tools/trace_transformers.py InternVL2-1B-hf/ --inputs minivl.safetensors --out hf.safetensors
    minivl diff hf.safetensors minivl.safetensors

A recipe for any other implementation: run it on the same inputs, save each stage under the names
below, and `minivl diff` names the first stage where it parts from minivl. This one loads an
`InternVLForConditionalGeneration` directory (the transformers layout: model.vision_tower.*,
model.multi_modal_projector.*, model.language_model.*, lm_head.*), takes the tile grid, pixel_values
and input_ids from a trace written by `minivl trace` (`--inputs`, so that the model stages are
compared on identical inputs; with `--image-processor` the tiles come from transformers' own
image processor instead, so the diff also checks its tiling and normalisation), and records:

    vision_model.embeddings           <- model.vision_tower.embeddings (output)
    vision_model.encoder.layers.{i}   <- model.vision_tower.encoder.layer[i] (output)
    select_layer                      <- the layer `vision_feature_layer` picks, cls token dropped
    pixel_shuffle                     <- model.multi_modal_projector (input)
    mlp1                              <- model.multi_modal_projector (output)
    inputs_embeds                     <- model.language_model (inputs_embeds argument)
    language_model.model.layers.{i}   <- model.language_model.layers[i] (output)
    language_model.model.norm         <- model.language_model.norm (output)
    logits                            <- the forward's logits
    decode.*                          <- with `--decode N` in the trace: the same LLM stages for the last N
                                         prompt tokens, one at a time through transformers' KV cache

transformers implements pixel shuffle v2 only, `vision_feature_select_strategy="default"` (drop
cls) and the Qwen2 / Llama language models of InternVL 2.5 / 3; InternLM2 and Phi-3 are not in it.

A text-only trace (`minivl trace LLM_DIR --prompt TEXT`: input_ids and no pixel_values) is run
through `AutoModelForCausalLM` instead (Llama, Qwen2, Phi-3, MPT; InternLM2 is remote code, not in
transformers), its input_ids taken from the trace, and records, under the module paths of
transformers' own tree (Llama's: model.embed_tokens, model.layers.{i}, model.norm; MPT's:
transformer.wte, transformer.blocks.{i}, transformer.norm_f), the input embedding's output, each
layer's output, the final norm's output and the logits; when the trace has decode.* stages
(`--decode N`), the same again for N steps through transformers' own KV cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from minivl import trace  # noqa: E402
from minivl.errors import TraceError  # noqa: E402


def _output_tensor(output):
    """A module's output: the tensor itself, or the first element of a tuple / ModelOutput."""
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output


def hf_stages(model, pixel_values: np.ndarray, input_ids: np.ndarray, grid) -> dict:
    """Run InternVLForConditionalGeneration.forward once with hooks; -> stages in minivl's order."""
    import torch

    inner = model.model
    captured, handles = {}, []

    def keep(name):
        def hook(module, args, output):
            captured[name] = _output_tensor(output).detach()
        return hook

    def keep_input(name):
        def hook(module, args):
            captured[name] = args[0].detach()
        return hook

    def keep_embeds(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"].detach()

    vision = inner.vision_tower
    layers = inner.language_model.layers
    handles.append(vision.embeddings.register_forward_hook(keep("vision_model.embeddings")))
    for i, layer in enumerate(vision.encoder.layer):
        handles.append(layer.register_forward_hook(keep(f"vision_model.encoder.layers.{i}")))
    handles.append(inner.multi_modal_projector.register_forward_pre_hook(keep_input("pixel_shuffle")))
    handles.append(inner.multi_modal_projector.register_forward_hook(keep("mlp1")))
    handles.append(inner.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True))
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(keep(f"language_model.model.layers.{i}")))
    handles.append(inner.language_model.norm.register_forward_hook(keep("language_model.model.norm")))
    dtype = next(model.parameters()).dtype
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(np.array(input_ids)),
                           pixel_values=torch.from_numpy(np.array(pixel_values)).to(dtype),
                           use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()

    n_vit = len(vision.encoder.layer)
    vit_hidden = [captured["vision_model.embeddings"]] + [captured[f"vision_model.encoder.layers.{i}"]
                                                         for i in range(n_vit)]
    stages = {"tile_grid": np.asarray(grid, dtype=np.int64), "pixel_values": pixel_values}
    stages.update({name: captured[name] for name in
                   ["vision_model.embeddings"] + [f"vision_model.encoder.layers.{i}" for i in range(n_vit)]})
    # get_image_features: hidden_states[vision_feature_layer] (last_hidden_state for -1), cls dropped
    stages["select_layer"] = vit_hidden[model.config.vision_feature_layer][:, 1:]
    stages["pixel_shuffle"] = captured["pixel_shuffle"]
    stages["mlp1"] = captured["mlp1"]
    stages["input_ids"] = input_ids
    stages["image_token_positions"] = np.flatnonzero(input_ids.reshape(-1) == model.config.image_token_id)
    stages["inputs_embeds"] = captured["inputs_embeds"]
    for i in range(len(layers)):
        stages[f"language_model.model.layers.{i}"] = captured[f"language_model.model.layers.{i}"]
    stages["language_model.model.norm"] = captured["language_model.model.norm"]
    stages["logits"] = logits
    return {name: trace.as_array(value) for name, value in stages.items()}


def _decoder_modules(model) -> list:
    """[(stage name, module)]: the input embedding, each layer, the final norm, under transformers' module paths."""
    names = {id(module): name for name, module in model.named_modules()}
    base = model.base_model
    embed = model.get_input_embeddings()
    layers = next((getattr(base, n) for n in ("layers", "blocks", "h") if hasattr(base, n)), None)
    norm = next((getattr(base, n) for n in ("norm", "norm_f", "ln_f") if hasattr(base, n)), None)
    if layers is None or norm is None:
        raise TraceError(f"{type(model).__name__}: found no layer list (layers/blocks/h) or final norm "
                         f"(norm/norm_f/ln_f) under {type(base).__name__}; add its names here")
    return ([(names[id(embed)], embed)] + [(f"{names[id(layers)]}.{i}", layer) for i, layer in enumerate(layers)]
            + [(names[id(norm)], norm)])


def _hooked_forward(model, modules: list, **kwargs):
    """(the forward's output, {stage name: that module's output}) of one forward with hooks on `modules`."""
    import torch

    captured, handles = {}, []

    def keep(name):
        def hook(module, args, output):
            captured[name] = _output_tensor(output).detach()
        return hook

    for name, module in modules:
        handles.append(module.register_forward_hook(keep(name)))
    try:
        with torch.no_grad():
            out = model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


def _cached_steps(model, modules: list, step_ids, cache) -> dict:
    """{decode.<stage>: [b, n, ·]}: the n ids of step_ids [b, n] one at a time through `cache`, each step's
    hooked module outputs and logits concatenated along the sequence axis."""
    import torch

    key = _cache_key(model)
    rows = {name: [] for name, _ in modules + [("logits", None)]}
    for k in range(step_ids.shape[1]):
        out, captured = _hooked_forward(model, modules, input_ids=step_ids[:, k:k + 1], use_cache=True,
                                        **{key: cache})
        cache = getattr(out, key)
        for name, _ in modules:
            rows[name].append(captured[name])
        rows["logits"].append(out.logits)
    return {trace.DECODE_PREFIX + name: torch.cat(parts, dim=1) for name, parts in rows.items()}


def hf_decoder_stages(model, input_ids: np.ndarray, decode_steps: int = 0) -> dict:
    """Run a transformers causal LM once with hooks; -> input_ids, embedding, layers, final norm, logits
    (and, with decode_steps, the decode.* stages: a prefill of all but the last N ids, then N cached steps)."""
    import torch

    modules = _decoder_modules(model)
    ids = torch.from_numpy(np.array(input_ids))
    out, captured = _hooked_forward(model, modules, input_ids=ids, use_cache=False)
    stages = {"input_ids": np.asarray(input_ids, dtype=np.int64)}
    stages.update({name: captured[name] for name, _ in modules})
    stages["logits"] = out.logits
    if decode_steps:
        key = _cache_key(model)
        t = ids.shape[1]
        with torch.no_grad():
            cache = getattr(model(input_ids=ids[:, :t - decode_steps], use_cache=True), key)
        stages.update(_cached_steps(model, modules, ids[:, t - decode_steps:], cache))
    return {name: trace.as_array(value) for name, value in stages.items()}


def load_hf_decoder(directory: str, dtype: str):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype), attn_implementation="eager", local_files_only=True).eval()


def _cache_key(model) -> str:
    """transformers 5.2x names the KV cache `cache` (argument and output); earlier releases `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_decode_stages(model, pixel_values: np.ndarray, input_ids: np.ndarray, steps: int) -> dict:
    """InternVL's decode.* stages: the prompt but its last `steps` tokens (image included) into transformers'
    KV cache, then those tokens one at a time; each step's merged embedding, LLM layers, norm and logits."""
    import torch

    inner = model.model
    modules = [(f"language_model.model.layers.{i}", layer) for i, layer in enumerate(inner.language_model.layers)]
    modules.append(("language_model.model.norm", inner.language_model.norm))
    key, ids = _cache_key(model), torch.from_numpy(np.array(input_ids))
    dtype = next(model.parameters()).dtype
    t = ids.shape[1]
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :t - steps], pixel_values=torch.from_numpy(np.array(pixel_values)).to(
            dtype), use_cache=True), key)
    embeds = []

    def keep_embeds(module, args, kwargs):
        embeds.append(kwargs["inputs_embeds"].detach())

    handle = inner.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True)
    try:
        steps_stages = _cached_steps(model, modules, ids[:, t - steps:], cache)
    finally:
        handle.remove()
    stages = {"decode.inputs_embeds": torch.cat(embeds, dim=1), **steps_stages}
    return {name: trace.as_array(value) for name, value in stages.items()}


def hf_tiles(model, image_path: str, max_num: int, dtype: str):
    """(grid, pixel_values) from transformers' own InternVL image processor (GotOcr2, the PIL backend).

    Tiles of image_size px, at most max_num, thumbnail when there is more than one, ImageNet
    mean/std as InternVL normalises; the grid is the processor's get_optimal_tiled_canvas.
    """
    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (GotOcr2ImageProcessorPil,
                                                                           get_optimal_tiled_canvas)

    from minivl.preprocess import NORMALIZATIONS

    size = model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    mean, std = NORMALIZATIONS["imagenet"]
    processor = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True, min_patches=1,
                                         max_patches=max_num, image_mean=list(mean), image_std=list(std))
    with Image.open(image_path) as image:
        image = image.convert("RGB")
        pixel_values = processor(images=image, return_tensors="np")["pixel_values"]
        width, height = image.size
    grid = get_optimal_tiled_canvas((height, width), (size, size), 1, max_num) if max_num > 1 else (1, 1)
    return grid, np.asarray(pixel_values).astype(dtype)


def load_hf(directory: str, dtype: str):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.InternVLForConditionalGeneration.from_pretrained(
        directory, dtype=getattr(torch, dtype), attn_implementation="eager", local_files_only=True).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="an InternVLForConditionalGeneration checkpoint directory (or, for a text-only "
                                          "trace, a causal LM's)")
    parser.add_argument("--inputs", required=True, help="a trace from `minivl trace` whose tile_grid, pixel_values "
                                                        "and input_ids are fed to transformers")
    parser.add_argument("--out", required=True, help="trace file to write")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="default: the --inputs trace's dtype")
    parser.add_argument("--image-processor", action="store_true",
                        help="tile and normalise the trace's image with transformers' own image processor "
                             "(GotOcr2ImageProcessorPil) instead of reusing the trace's pixel_values")
    args = parser.parse_args(argv)
    import torch
    import transformers

    source = trace.load_trace(args.inputs)
    if "input_ids" in source.stages and "pixel_values" not in source.stages:  # a text-only LLM's trace
        if args.image_processor:
            raise TraceError(f"{args.inputs!r} is a text-only LLM's trace: there is no image to process")
        dtype = args.dtype or source.dtype
        model = load_hf_decoder(args.directory, dtype)
        decode_steps = int(source.metadata.get("decode_steps", 0))
        stages = hf_decoder_stages(model, np.asarray(source.stages["input_ids"]), decode_steps)
        producer = f"transformers {transformers.__version__} {type(model).__name__}"
        metadata = {"producer": producer, "dtype": dtype, "config_sha256": trace.config_sha256(args.directory),
                    "versions": json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                            "numpy": np.__version__}),
                    "checkpoint": os.path.abspath(args.directory), "inputs_from": os.path.abspath(args.inputs),
                    "prompt": source.metadata.get("prompt", "")}
        if decode_steps:
            metadata["decode_steps"] = str(decode_steps)
        trace.save_trace(args.out, trace.Trace(stages, metadata))
        print(f"wrote {len(stages)} stages to {args.out} ({producer}, {dtype})")
        return 0
    missing = [name for name in ("tile_grid", "pixel_values", "input_ids") if name not in source.stages]
    if missing:
        raise TraceError(f"{args.inputs!r} lacks the input stages {missing}; write it with `minivl trace`")
    dtype = args.dtype or source.dtype
    model = load_hf(args.directory, dtype)
    grid, pixel_values = source.stages["tile_grid"].tolist(), np.asarray(source.stages["pixel_values"])
    if args.image_processor:
        if not source.metadata.get("image") or not source.metadata.get("max_num"):
            raise TraceError(f"{args.inputs!r} does not record its image and max_num; write it with `minivl trace`")
        grid, pixel_values = hf_tiles(model, source.metadata["image"], int(source.metadata["max_num"]), dtype)
        if len(pixel_values) != len(source.stages["pixel_values"]):
            print(f"note: transformers' processor made {len(pixel_values)} tiles, the trace's prompt has room for "
                  f"{len(source.stages['pixel_values'])}; the forward will refuse the mismatch", file=sys.stderr)
    stages = hf_stages(model, pixel_values, np.asarray(source.stages["input_ids"]), grid)
    decode_steps = int(source.metadata.get("decode_steps", 0))
    if decode_steps:
        stages.update(hf_decode_stages(model, pixel_values, np.asarray(source.stages["input_ids"]), decode_steps))
    metadata = {"producer": f"transformers {transformers.__version__} InternVLForConditionalGeneration",
                "dtype": dtype, "config_sha256": trace.config_sha256(args.directory),
                "versions": json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                        "numpy": np.__version__}),
                "checkpoint": os.path.abspath(args.directory), "inputs_from": os.path.abspath(args.inputs),
                "pixels_from": "GotOcr2ImageProcessorPil" if args.image_processor else "the --inputs trace",
                "prompt": source.metadata.get("prompt", ""), "image": source.metadata.get("image", "")}
    if decode_steps:
        metadata["decode_steps"] = str(decode_steps)
    trace.save_trace(args.out, trace.Trace(stages, metadata))
    print(f"wrote {len(stages)} stages to {args.out} ({metadata['producer']}, {dtype})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TraceError as err:
        print(f"trace_transformers: TraceError: {err}", file=sys.stderr)
        sys.exit(1)
