"""Per-stage traces of an InternVL forward pass, and the diff that names where two runs part ways.

A trace is a safetensors file: one tensor per stage, in pipeline order, plus metadata. The stages
of an InternVL chat checkpoint (names follow the checkpoint's module tree where there is a module):

    tile_grid                           [2] int64: (columns, rows) of the dynamic tiling
    pixel_values                        [n, 3, s, s]: the normalised tiles (thumbnail last)
    vision_model.embeddings             [n, 1+P, C]: patch + cls + position embeddings
    vision_model.encoder.layers.{i}     [n, 1+P, C]: output of ViT layer i
    select_layer                        [n, P, C]: hidden_states[select_layer] with the cls token dropped
    pixel_shuffle                       [n, P/4, 4C]: after pixel shuffle (the mlp1 input)
    mlp1                                [n, P/4, D]: image tokens in LLM space
    input_ids                           [b, t] int64: the prompt, <IMG_CONTEXT> tokens included
    image_token_positions               [k] int64: flat positions of the <IMG_CONTEXT> tokens
    inputs_embeds                       [b, t, D]: token embeddings with the image tokens spliced in
    language_model.model.layers.{i}     [b, t, D]: output of LLM layer i
    language_model.model.norm           [b, t, D]: after the final norm
    logits                              [b, t, vocab]

With `decode_steps = N` (metadata; `minivl trace DIR --decode N`, an LLM or an InternVL chat
checkpoint) the trace also holds the cached generation path: a prefill of the first t − N tokens, then the last N tokens fed one at a
time through the KV cache, each step's outputs concatenated along the sequence axis:

    decode.{embedding, each layer, final norm, logits}    [b, N, ·]: row k = cached step k
    (InternVL: decode.inputs_embeds, decode.language_model.model.layers.{i}, decode.language_model.model.norm,
    decode.logits; the prefill reads the merged text + image embeddings, the steps are text tokens)

Row k of a decode stage computes the same function as row t − N + k of the prefill stage (the
tests hold the two equal to a GEMM's and a softmax's summation order), so a port whose prefill
agrees but whose generation does not (a RoPE offset, a KV cache in the wrong layout) parts from
minivl at a decode.* stage.

A bare InternViT checkpoint gives tile_grid, pixel_values, `embeddings` and `encoder.layers.{i}`
(its own key names). A text-only LLM (Llama, Qwen2, InternLM2, Phi-3, MPT: the one a port of
InternVL's language model starts from) gives, again under its checkpoint's module names:

    input_ids                           [b, t] int64: the prompt
    model.embed_tokens                  [b, t, D]: the token embeddings (InternLM2: model.tok_embeddings,
                                        MPT: transformer.wte, learned positions added)
    model.layers.{i}                    [b, t, D]: output of layer i (MPT: transformer.blocks.{i})
    model.norm                          [b, t, D]: after the final norm (MPT: transformer.norm_f)
    logits                              [b, t, vocab]
 Metadata: format, producer, dtype, versions, config_sha256, prompt, image and
the stage order (safetensors sorts its keys). The stage functions take any model with minivl's
public API (the NumPy one or torch_impl's, duck-typed), so this module never imports torch.

`diff_traces(candidate, reference)` compares stage by stage: integer stages exactly, float stages
with |a − r| <= atol + rtol·|r|, rtol = U·eps, atol = U·eps·max|r| of the stage, U in ulps of the
coarser of the two dtypes (DEFAULT_ULPS). The first stage outside its tolerance is where the
candidate diverges; later stages inherit the error, so the report names the first one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from minivl.errors import TraceError
from minivl.testing import compare, eps, to_numpy, tolerance

FORMAT = "minivl-trace/1"
# Stage budget in ulps of the dtype (rtol) and of the stage's max |value| (atol): the InternVL chat
# test's NumPy-vs-torch budget (tests/test_internvl_chat.py). A half-precision trace gets fewer ulps:
# each of its roundings is already 2^-8 relative.
DEFAULT_ULPS = {"float64": 512.0, "float32": 512.0, "bfloat16": 16.0, "float16": 16.0}
INT_STAGES = ("tile_grid", "input_ids", "image_token_positions")


@dataclass
class Trace:
    """Stages in pipeline order (name -> array) and string metadata."""

    stages: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        return self.metadata.get("dtype", "float32")


# ----------------------------------------------------------------------------- computing stages

def as_array(x) -> np.ndarray:
    """A NumPy array in the run's own precision (a torch tensor without importing torch; bf16 -> float32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def vision_stages(vision_model, pixel_values, as_input=np.asarray, prefix: str = "") -> tuple[dict, tuple]:
    """({prefix+'embeddings', prefix+'encoder.layers.{i}'}, the ViT's hidden_states) from output_hidden_states.

    pixel_values [n, 3, s, s] -> (dict of [n, 1+P, C] NumPy arrays, the model's own hidden_states,
    which internvl_stages continues from); `as_input` turns a NumPy array into what the model takes
    (torch.from_numpy for torch_impl).
    """
    hidden_states = vision_model(as_input(pixel_values), output_hidden_states=True).hidden_states
    stages = {prefix + "embeddings": as_array(hidden_states[0])}
    for i, h in enumerate(hidden_states[1:]):
        stages[prefix + f"encoder.layers.{i}"] = as_array(h)
    return stages, hidden_states


def internvl_stages(model, pixel_values: np.ndarray, input_ids: np.ndarray, grid, as_input=np.asarray,
                    decode_steps: int = 0) -> dict:
    """Every stage of InternVLChatModel.forward, computed through the model's public pieces.

    Same steps as `extract_feature` + `forward` (vision_model with output_hidden_states, drop cls,
    pixel_shuffle, mlp1, embed_with_images, language_model with output_hidden_states), so a stage
    here is the value the forward pass computes. model.img_context_token_id must be set.
    decode_steps N: also the language model's decode.* stages (`decoder_decode_stages`): the merged
    embeddings of all but the last N tokens prefilled into a KV cache, then those N text tokens one
    at a time (none of them may be an image token).
    """
    stages = {"tile_grid": np.asarray(grid, dtype=np.int64), "pixel_values": np.asarray(pixel_values)}
    vision, hidden_states = vision_stages(model.vision_model, pixel_values, as_input, "vision_model.")
    stages.update(vision)
    selected = hidden_states[model.select_layer][:, 1:]                    # drop the cls token
    n, n_patches, width = selected.shape
    side = math.isqrt(n_patches)
    stages["select_layer"] = as_array(selected)
    shuffled = model.pixel_shuffle(selected.reshape(n, side, side, width), model.downsample_ratio)
    tokens = shuffled.reshape(n, -1, shuffled.shape[-1])
    stages["pixel_shuffle"] = as_array(tokens)
    features = model.mlp1(tokens)
    stages["mlp1"] = as_array(features)
    input_ids = np.asarray(input_ids, dtype=np.int64)
    stages["input_ids"] = input_ids
    stages["image_token_positions"] = np.flatnonzero(input_ids.reshape(-1) == model.img_context_token_id)
    embeds = model.embed_with_images(as_input(input_ids), features, keep_graph_form=True)
    out = model.language_model.forward(inputs_embeds=embeds, output_hidden_states=True)
    llm_hidden = out.hidden_states
    stages["inputs_embeds"] = as_array(llm_hidden[0])
    for i, h in enumerate(llm_hidden[1:-1]):
        stages[f"language_model.model.layers.{i}"] = as_array(h)
    stages["language_model.model.norm"] = as_array(llm_hidden[-1])
    stages["logits"] = as_array(out.logits)
    if decode_steps:
        t = input_ids.shape[1]
        if len(stages["image_token_positions"]) and stages["image_token_positions"][-1] >= t - decode_steps:
            raise TraceError(f"the last {decode_steps} tokens of the prompt include image tokens; the cached steps "
                             f"feed text tokens only (at most {t - 1 - int(stages['image_token_positions'][-1])})")
        names = ["inputs_embeds", *[f"language_model.model.layers.{i}" for i in range(len(llm_hidden) - 2)],
                 "language_model.model.norm"]
        stages.update(decoder_decode_stages(model.language_model, input_ids, decode_steps, as_input,
                                            inputs_embeds=embeds, names=names))
    return stages


def decoder_stages(model, input_ids: np.ndarray, as_input=np.asarray) -> dict:
    """input_ids and every stage of a text-only decoder's forward, named by the model's own module paths.

    One `forward(input_ids, output_hidden_states=True)`: its hidden_states are the embedding, each
    block's output and the final norm (L + 2 tensors), so a stage here is what the forward computes.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    out = model.forward(input_ids=as_input(input_ids), output_hidden_states=True)
    hidden = out.hidden_states
    stages = {"input_ids": input_ids, model.embed_path: as_array(hidden[0])}
    for i, h in enumerate(hidden[1:-1]):
        stages[f"{model.layers_path}.{i}"] = as_array(h)
    stages[model.norm_path] = as_array(hidden[-1])
    stages["logits"] = as_array(out.logits)
    return stages


DECODE_PREFIX = "decode."


def decoder_decode_stages(model, input_ids: np.ndarray, steps: int, as_input=np.asarray, inputs_embeds=None,
                          names: list | None = None) -> dict:
    """The decode.* stages: a prefill of input_ids[:, :t−steps] into a KV cache, then one cached forward per
    remaining token, each step's embedding, layers, final norm and logits concatenated along the sequence axis.

    [b, t] ids -> {decode.<stage>: [b, steps, ·]}, named as `decoder_stages` names the prefill's, or by
    `names` (embedding, each layer, final norm). inputs_embeds [b, t, D] (the model's own array or tensor):
    the prefill reads its first t − steps rows instead of embedding the ids (InternVL's image tokens).
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    t = input_ids.shape[1]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < t:
        raise TraceError(f"decode steps must be an int in [1, {t - 1}] for a {t}-token input (the rest is the "
                         f"prefill), got {steps!r}")
    prefill = ({"inputs_embeds": inputs_embeds[:, :t - steps]} if inputs_embeds is not None else
               {"input_ids": as_input(input_ids[:, :t - steps])})
    cache = model.forward(**prefill, use_cache=True).past_key_values
    if names is None:
        n_layers = len(model.get_submodule(model.layers_path))
        names = [model.embed_path, *[f"{model.layers_path}.{i}" for i in range(n_layers)], model.norm_path]
    rows = {name: [] for name in [*names, "logits"]}
    for k in range(t - steps, t):
        out = model.forward(input_ids=as_input(input_ids[:, k:k + 1]), past_key_values=cache, use_cache=True,
                            output_hidden_states=True)
        cache = out.past_key_values
        for name, h in zip(names, out.hidden_states):
            rows[name].append(as_array(h))
        rows["logits"].append(as_array(out.logits))
    return {DECODE_PREFIX + name: np.concatenate(parts, axis=1) for name, parts in rows.items()}


def bare_vit_stages(vision_model, pixel_values: np.ndarray, as_input=np.asarray) -> dict:
    """tile_grid (1, 1), pixel_values and every ViT stage of a bare InternViT checkpoint."""
    stages = {"tile_grid": np.asarray((1, 1), dtype=np.int64), "pixel_values": np.asarray(pixel_values)}
    stages.update(vision_stages(vision_model, pixel_values, as_input)[0])
    return stages


# ----------------------------------------------------------------------------- the file

def config_sha256(directory) -> str:
    """sha256 of the checkpoint's config.json, canonicalised (sorted keys), so formatting does not matter."""
    path = os.path.join(os.fspath(directory), "config.json")
    with open(path, encoding="utf-8") as f:
        canonical = json.dumps(json.load(f), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def save_trace(path, trace: Trace) -> str:
    """Write a trace as safetensors (atomically); the stage order goes into the metadata."""
    from minivl.checkpoint import write_safetensors

    if not trace.stages:
        raise TraceError(f"refusing to write {os.fspath(path)!r}: the trace has no stages")
    metadata = {k: str(v) for k, v in trace.metadata.items()}
    metadata.update(format=FORMAT, stages=json.dumps(list(trace.stages)))
    tensors = {name: np.ascontiguousarray(value) for name, value in trace.stages.items()}
    return write_safetensors(path, tensors, metadata=metadata)


def load_trace(path) -> Trace:
    """Read a trace written by save_trace (or by any tool that follows the same format)."""
    from minivl.checkpoint import read_safetensors
    from minivl.errors import CheckpointError

    path = os.fspath(path)
    if os.path.isdir(path):
        raise TraceError(f"trace file {path!r} is a directory; pass the .safetensors file `minivl trace` wrote")
    if not os.path.isfile(path):
        raise TraceError(f"trace file {path!r} does not exist; write one with `minivl trace DIR --image IMG "
                         "--prompt TEXT --out FILE` (a text-only LLM: without --image)")
    try:
        tensors, metadata = read_safetensors(path, mmap=False, with_metadata=True)
    except CheckpointError as err:
        raise TraceError(f"{path!r} is not a readable safetensors trace ({err})") from None
    if metadata.get("format") != FORMAT:
        raise TraceError(f"{path!r} is not a minivl trace (metadata format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r}); write it with `minivl trace` or tools/trace_transformers.py")
    try:
        order = json.loads(metadata["stages"])
    except (KeyError, json.JSONDecodeError):
        raise TraceError(f"{path!r}: metadata 'stages' must be a JSON list of stage names") from None
    missing = [name for name in order if name not in tensors]
    if missing:
        raise TraceError(f"{path!r}: metadata lists stages with no tensor: {missing[:5]}")
    return Trace({name: tensors[name] for name in order}, dict(metadata))


# ----------------------------------------------------------------------------- the diff

@dataclass
class StageDiff:
    """One stage's comparison; `status` is OK, DIFF, or 'only in A' / 'only in B'."""

    name: str
    status: str
    shape: tuple = ()
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_index: tuple = ()
    candidate_value: float | None = None
    reference_value: float | None = None
    allowed: float = 0.0
    n_bad: int = 0
    n_total: int = 0
    detail: str = ""


def coarser_dtype(a: str, b: str) -> str:
    return a if eps(a) >= eps(b) else b


def compare_stage(name: str, candidate, reference, dtype: str, ulps: float) -> StageDiff:
    """Exact for integer stages; dtype-aware tolerance (module docstring) for float stages."""
    a, r = np.asarray(candidate), np.asarray(reference)
    if a.shape != r.shape:
        return StageDiff(name, "DIFF", r.shape, math.inf, math.inf,
                         detail=f"shape {a.shape} in A vs {r.shape} in B")
    if a.size == 0:
        return StageDiff(name, "OK", r.shape)
    if name in INT_STAGES or (np.issubdtype(a.dtype, np.integer) and np.issubdtype(r.dtype, np.integer)):
        bad = a != r
        if not bad.any():
            return StageDiff(name, "OK", r.shape, n_total=int(a.size))
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        return StageDiff(name, "DIFF", r.shape, float(np.abs(a.astype(np.float64) - r).max()), math.inf, index,
                         float(a[index]), float(r[index]), 0.0, int(bad.sum()), int(a.size), "must match exactly")
    ref = to_numpy(r)
    finite = ref[np.isfinite(ref)]
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    rtol, atol = tolerance(dtype, ulps, ulps, scale=scale)
    c = compare(a, ref, rtol, atol)
    index = c.worst_index
    return StageDiff(name, "OK" if c.ok else "DIFF", r.shape, c.max_abs, c.max_rel, index,
                     float(to_numpy(a)[index]), float(ref[index]), atol + rtol * abs(float(ref[index])),
                     c.n_bad, c.n_total)


def compare_stages(candidate: dict, reference: dict, dtype: str, ulps: float | None = None) -> list[StageDiff]:
    """Stage by stage in the reference's order, then candidate-only stages; see the module docstring."""
    ulps = DEFAULT_ULPS.get(dtype, 512.0) if ulps is None else float(ulps)
    rows = []
    for name, ref in reference.items():
        if name not in candidate:
            rows.append(StageDiff(name, "only in B", np.asarray(ref).shape))
        else:
            rows.append(compare_stage(name, candidate[name], ref, dtype, ulps))
    rows += [StageDiff(name, "only in A", np.asarray(a).shape) for name, a in candidate.items() if name not in reference]
    return rows


def diff_traces(candidate: Trace, reference: Trace, ulps: float | None = None) -> list[StageDiff]:
    """compare_stages with the coarser of the two traces' dtypes."""
    for trace in (candidate, reference):
        try:
            eps(trace.dtype)
        except ValueError:
            raise TraceError(f"trace dtype {trace.dtype!r} is not a float dtype minivl knows") from None
    return compare_stages(candidate.stages, reference.stages, coarser_dtype(candidate.dtype, reference.dtype), ulps)


def first_divergence(rows: list[StageDiff]) -> StageDiff | None:
    return next((row for row in rows if row.status == "DIFF"), None)


def format_rows(rows: list[StageDiff]) -> str:
    """A Markdown table: stage, shape, max abs, max rel, worst index, status."""
    lines = ["| stage | shape | max abs | max rel | worst at | |", "|---|---|---|---|---|---|"]
    for row in rows:
        shape = "×".join(str(s) for s in row.shape) or "scalar"
        if row.status in ("OK", "DIFF") and not row.detail.startswith("shape"):
            cells = f"{row.max_abs:.3e} | {row.max_rel:.3e} | {row.worst_index if row.status == 'DIFF' else ''}"
        else:
            cells = f"{row.detail or '-'} | | "
        lines.append(f"| {row.name} | {shape} | {cells} | {row.status} |")
    return "\n".join(lines)


def describe_divergence(row: StageDiff) -> str:
    """One sentence: the stage, where, and by how much."""
    if row.detail.startswith("shape"):
        return f"first divergence at stage {row.name}: {row.detail}"
    return (f"first divergence at stage {row.name}: at index {row.worst_index} A = {row.candidate_value!r}, "
            f"B = {row.reference_value!r} (|A − B| = {abs(row.candidate_value - row.reference_value):.3e}, "
            f"allowed {row.allowed:.3e}); {row.n_bad} of {row.n_total} elements outside"
            + (f" ({row.detail})" if row.detail else ""))


# ----------------------------------------------------------------------------- inputs

def synthetic_image(width: int = 100, height: int = 60, seed: int = 0):
    """A smooth random RGB picture (PIL), for a parity run without --image: same pixels on every machine."""
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def internvl_inputs(directory, model, image, prompt: str, max_num: int | None = None, dtype="float32"):
    """(pixel_values [n, 3, s, s], grid, input_ids [1, t], <IMG_CONTEXT> id) as InternVL's chat builds them.

    Tiling follows the checkpoint's config (image_size, use_thumbnail, min/max_dynamic_patch; one tile
    when dynamic_image_size is false); the prompt is the config template's first turn with
    `<image>\\n` + prompt, tokenized with the directory's tokenizer (tokenizer.json, or InternLM2's tokenizer.model). Sets model.img_context_token_id.
    Any model with minivl's chat attributes works (config, template, system_message, num_image_token).
    """
    from minivl.conversation import IMG_CONTEXT_TOKEN, build_query, encode, token_id, with_image_placeholder
    from minivl.preprocess import load_image
    from minivl.tokenizer import TOKENIZER_FILES, load_tokenizer

    config = model.config
    if not any(os.path.isfile(os.path.join(os.fspath(directory), name)) for name in TOKENIZER_FILES):
        raise TraceError(f"{os.fspath(directory)!r} has neither {' nor '.join(TOKENIZER_FILES)}; a trace needs the "
                         "checkpoint's tokenizer to build the prompt (copy it from the model repository)")
    tokenizer = load_tokenizer(directory)
    if max_num is None:
        max_num = config.max_dynamic_patch if config.dynamic_image_size else 1
    pixel_values, grid = load_image(image, max_num=max_num, image_size=config.image_size,
                                    use_thumbnail=config.use_thumbnail, min_num=min(config.min_dynamic_patch, max_num))
    model.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
    question = with_image_placeholder(prompt)
    query = build_query(model.template, model.system_message, question, [], [len(pixel_values)],
                        model.num_image_token)
    input_ids = np.asarray([encode(tokenizer, query)], dtype=np.int64)
    # the reference feeds the tiles in the model's dtype
    return pixel_values.astype(dtype), tuple(grid), input_ids, model.img_context_token_id
