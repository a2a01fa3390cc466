"""An attention explorer in the browser: one self-contained HTML page per input, every layer and head.

`minivl viz explore` writes the page; this module builds it from what minivl's forward returns
with `output_attentions=True` (the same arrays `minivl.viz.attention_grid` and
`patch_attention_overlay` draw as PNGs). Three kinds of page:

* text:     a prompt through a decoder LM (SmolLM2-135M by default): the tokens as the tokenizer
            split them and token-to-token attention, causal mask shown;
* image:    an image through a ViT (DINOv2-S/14 by default): hover a patch or the CLS token and
            see where it attends over the patch grid;
* internvl: an InternVL checkpoint with an image and a prompt: the ViT's attention inside each
            tile (thumbnail included) and the language model's attention from any text token
            over the image tokens of every tile.

Each page has a layer × head grid of thumbnails (a click opens one head large, "avg" is the mean
over heads) and an interactive RoPE atlas whose frequencies are precomputed by `minivl.rope`.

How the numbers are stored (also printed on the page): every query row q of every map is
quantized to 8 bits relative to its own maximum,

    code[q, k] = round(255 · p[q, k] / max_k p[q, k]),    p̂[q, k] = code[q, k] / 255 · max_k p[q, k],

so |p̂ − p| <= max_k p[q, k] / 510 (plus the float32 rounding of the row maximum). The codes of
a causal map keep only k <= q (the rest is masked: exactly 0). The codes are zlib-compressed and
base64-encoded; the row maxima are base64 float32. The page inflates them with the browser's own
DecompressionStream: no network, no library. The DINOv2 224-px page (12 layers × 6 heads of
257 × 257 maps, 4.8 M codes) is 2.7-3.4 MB this way, depending on the image; the page grows with
tokens², so a 448-px image (1025 tokens) is about 16 times that (keep fewer layers with `layers`).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import zlib
from importlib import resources

import numpy as np

from minivl.errors import ConfigError, ShapeError
from minivl.files import write_text_atomic

PAGE_FORMAT = 1
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "su", "phi3_yarn")
QUANTIZATION_NOTE = ("Each query row is stored as 8-bit codes relative to its own maximum: "
                     "code = round(255·p / row max), shown value p̂ = code/255 · row max, so |p̂ − p| ≤ row max / 510. "
                     "Causal maps store only the keys k ≤ q. Codes are zlib-compressed, base64, inflated in the "
                     "browser.")


# ----------------------------------------------------------------------------------------------
# compact storage
# ----------------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def quantize_rows(probs, causal: bool = False) -> dict:
    """8-bit codes of attention maps, each query row relative to its own maximum (see the module docstring).

    [..., n, n] probabilities -> {"codes": base64 zlib uint8 [..., n·n or n(n+1)/2], "scales": base64 float32 [..., n]}
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim < 2 or probs.shape[-1] != probs.shape[-2]:
        raise ShapeError(f"attention maps must be [..., n, n] (queries = keys), got shape {probs.shape}")
    n = probs.shape[-1]
    if causal and np.any(np.triu(probs, 1) != 0):
        raise ShapeError("causal=True but some probabilities above the diagonal are not 0; pass causal=False "
                         "for a bidirectional (ViT) map")
    scales = probs.max(axis=-1)
    safe = np.where(scales > 0, scales, 1.0)
    # code = round(255 · p / max_k p), in 0..255
    codes = np.clip(np.rint(255.0 * probs / safe[..., None]), 0, 255).astype(np.uint8)
    if causal:
        rows, cols = np.tril_indices(n)
        codes = codes[..., rows, cols]  # row q keeps keys 0..q: n(n+1)/2 codes per map
    return {"codes": _b64(zlib.compress(codes.tobytes(), 9)), "scales": _b64(scales.astype("<f4").tobytes())}


def dequantize_rows(stored: dict, shape: tuple, causal: bool = False) -> np.ndarray:
    """Inverse of `quantize_rows` up to the rounding: the p̂ the page shows. -> float64 [*shape]"""
    *lead, n, _ = shape
    scales = np.frombuffer(base64.b64decode(stored["scales"]), dtype="<f4").astype(np.float64).reshape(*lead, n)
    raw = np.frombuffer(zlib.decompress(base64.b64decode(stored["codes"])), dtype=np.uint8)
    if causal:
        codes = np.zeros((*lead, n, n), dtype=np.float64)
        rows, cols = np.tril_indices(n)
        codes[..., rows, cols] = raw.reshape(*lead, -1)
    else:
        codes = raw.reshape(*lead, n, n).astype(np.float64)
    return codes / 255.0 * scales[..., None]


def _png_data_uri(image) -> str:
    """A PIL image (or [H, W, 3] uint8 array) as a data: URI the page can show without a file."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + _b64(buffer.getvalue())


def image_entry(image, label: str) -> dict:
    """One picture of the page (a tile, the thumbnail or a whole image): {label, src, width, height}."""
    from PIL import Image

    width, height = image.size if isinstance(image, Image.Image) else np.asarray(image).shape[1::-1]
    return {"label": label, "src": _png_data_uri(image), "width": int(width), "height": int(height)}


# ----------------------------------------------------------------------------------------------
# sections: one family of attention maps (a ViT's, or a decoder's) with the layout to draw them on
# ----------------------------------------------------------------------------------------------

def attention_section(section_id: str, label: str, attentions, causal: bool, layout: dict,
                      tokens=None, layers=None) -> dict:
    """One section of the page from a forward's `attentions` (L arrays [batch, heads, n, n]).

    layout: {"kind": "patches", "tiles": [image index per batch row], "grid": [gh, gw], "prefix": 1}
    (query/key 0 is CLS; the rest row-major patches) or {"kind": "tokens", "image_spans":
    [{"start", "tile", "grid"}]} (the image tokens of tile `tile`, grid×grid of them from `start`).
    tokens: one label per position (text). layers: which layer numbers the maps are (default 0..L−1).
    """
    if not attentions:
        raise ShapeError(f"section {section_id!r}: no attention maps; run the forward with output_attentions=True")
    maps = np.stack([np.asarray(a, dtype=np.float64) for a in attentions])  # [L, b, H, n, n]
    if maps.ndim != 5:
        raise ShapeError(f"section {section_id!r}: each attention must be [batch, heads, n, n], got "
                         f"{np.asarray(attentions[0]).shape}")
    n_layers, n_batch, n_heads, n, _ = maps.shape
    if tokens is not None and len(tokens) != n:
        raise ShapeError(f"section {section_id!r}: {len(tokens)} token labels for {n} positions")
    layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    return {"id": section_id, "label": label, "causal": bool(causal), "layers": layers, "n_batch": n_batch,
            "n_heads": n_heads, "n_tokens": n, "tokens": None if tokens is None else list(tokens),
            "layout": layout, "maps": quantize_rows(maps, causal)}


def select_layers(attentions, layers):
    """(the chosen layers' maps, their numbers); layers None = all, else e.g. [0, 5, -1]."""
    n_layers = len(attentions)
    if layers is None:
        return list(attentions), list(range(n_layers))
    chosen = []
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise ShapeError(f"layer {layer} is outside this {n_layers}-layer model (0..{n_layers - 1}, or "
                             f"negative from the end); fix --layers")
        chosen.append(layer % n_layers)
    return [attentions[i] for i in chosen], chosen


# ----------------------------------------------------------------------------------------------
# the RoPE atlas: frequencies per pair at every stop of the context-length slider
# ----------------------------------------------------------------------------------------------

def rope_stops(original_max: int, factor: float, count: int = 97) -> list[int]:
    """Context lengths the slider can take: log-spaced 16 … 4·factor·O, with O, O+1 and factor·O exact."""
    top = max(int(4 * factor * original_max), original_max + 2)
    stops = set(np.unique(np.round(np.geomspace(16, top, count)).astype(np.int64)).tolist())
    stops |= {original_max, original_max + 1, int(factor * original_max)}
    return sorted(int(s) for s in stops)


def rope_atlas_data(frequencies_at, types, head_dim: int, theta: float, factor: float, original_max: int,
                    stops=None) -> dict:
    """The atlas's numbers: for each slider stop L, every type's inv_freq [d/2] and attention scaling.

    frequencies_at(L) -> {type: (inv_freq, attention_scaling)} (the `minivl viz rope` recipe); the
    dynamic NTK base b' at each L comes from minivl.rope.rope_parameters (it grows once L > O).
    """
    from minivl.rope import rope_parameters

    stops = rope_stops(original_max, factor) if stops is None else [int(s) for s in stops]
    inv_freq = {t: [] for t in types}
    scaling = {t: [] for t in types}
    for length in stops:
        values = frequencies_at(length)
        for rope_type in types:
            inv_freq[rope_type].append(np.asarray(values[rope_type][0], dtype=np.float32))
            scaling[rope_type].append(float(values[rope_type][1]))
    dynamic_base = [float(rope_parameters("dynamic", head_dim, theta, original_max, seq_len=length,
                                          factor=factor).rope_theta) for length in stops]
    return {
        "types": list(types), "head_dim": int(head_dim), "theta": float(theta), "factor": float(factor),
        "original_max": int(original_max), "stops": stops, "dynamic_base": dynamic_base,
        # inv_freq[type]: float32 [n_stops, d/2], little-endian, base64
        "inv_freq": {t: _b64(np.stack(v).astype("<f4").tobytes()) for t, v in inv_freq.items()},
        "attention_scaling": scaling,
    }


# ----------------------------------------------------------------------------------------------
# the three kinds of page
# ----------------------------------------------------------------------------------------------

def image_explorer_data(image, model, size: int = 224, layers=None, title: str | None = None) -> dict:
    """An image through a ViT (InternVisionModel: DINOv2-S/14 or an InternViT) -> page data.

    image: a path or PIL image, resized to size×size (a multiple of the patch size).
    """
    from PIL import Image

    from minivl.preprocess import open_image, to_pixel_values

    patch = model.config.patch_size
    if size % patch or size < patch:
        raise ShapeError(f"the image size must be a positive multiple of the patch size {patch}, got {size}; "
                         f"e.g. {patch * 16}")
    rgb = open_image(image).resize((size, size), resample=Image.BICUBIC)
    out = model(to_pixel_values([rgb], size), output_attentions=True)
    attentions, numbers = select_layers(out.attentions, layers)
    grid = size // patch
    layout = {"kind": "patches", "tiles": [0], "grid": [grid, grid], "prefix": 1}
    section = attention_section("vision", f"ViT self-attention ({len(numbers)} layers × "
                                f"{model.config.num_attention_heads} heads, CLS + {grid}×{grid} patches)",
                                attentions, causal=False, layout=layout, layers=numbers)
    return {"title": title or "ViT attention explorer", "images": [image_entry(rgb, f"input, {size}×{size} px")],
            "tile_grid": None, "sections": [section]}


def token_labels(tokenizer, ids) -> list[str]:
    """Each token id decoded on its own, as the tokenizer split the text (special tokens kept).

    A token holding part of a multi-byte character decodes to U+FFFD on its own; it is shown as
    the vocabulary's own string instead (byte-level symbols such as 'æĪ').
    """
    labels = []
    for token in ids:
        text = tokenizer.decode([int(token)], skip_special_tokens=False)
        labels.append(tokenizer.id_to_token(int(token)) if "\ufffd" in text else text)
    return labels


def text_explorer_data(model, tokenizer, prompt: str, chat: bool = False, layers=None, max_tokens: int = 256,
                       title: str | None = None) -> dict:
    """A prompt through a decoder LM -> page data (causal token-to-token attention)."""
    if chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(prompt)
    ids = [int(i) for i in ids]
    if not ids:
        raise ShapeError("the prompt tokenizes to no tokens; give some text")
    if len(ids) > max_tokens:
        raise ShapeError(f"the prompt is {len(ids)} tokens, more than max_tokens={max_tokens}: the page would hold "
                         f"{len(ids)}² codes per head; shorten it, raise --max-tokens, or pick --layers")
    out = model(input_ids=np.asarray([ids], dtype=np.int64), output_attentions=True)
    attentions, numbers = select_layers(out.attentions, layers)
    heads = np.asarray(attentions[0]).shape[1]
    section = attention_section("text", f"decoder self-attention ({len(numbers)} layers × {heads} heads, "
                                f"{len(ids)} tokens, causal)", attentions, causal=True,
                                layout={"kind": "tokens", "image_spans": []}, tokens=token_labels(tokenizer, ids),
                                layers=numbers)
    return {"title": title or "decoder attention explorer", "images": [], "tile_grid": None, "sections": [section]}


def internvl_explorer_data(model, tokenizer, image, prompt: str, max_tiles: int = 6, vision_layers=None,
                           text_layers=None, max_tokens: int = 1024, title: str | None = None) -> dict:
    """An InternVL checkpoint with one image and a prompt -> page data (ViT per tile, LLM over text and tiles)."""
    from minivl.conversation import IMG_CONTEXT_TOKEN, build_query, encode, token_id, with_image_placeholder
    from minivl.preprocess import choose_grid, dynamic_preprocess, open_image, to_pixel_values

    config = model.config
    size = config.force_image_size or config.vision_config.image_size
    picture = open_image(image)
    grid = choose_grid(picture.size[0], picture.size[1], 1, max_tiles, size)
    tiles = dynamic_preprocess(picture, min_num=1, max_num=max_tiles, image_size=size,
                               use_thumbnail=bool(config.use_thumbnail))
    n_tiles = len(tiles)
    has_thumbnail = n_tiles > grid.columns * grid.rows
    labels = [f"tile {k} (row {k // grid.columns}, col {k % grid.columns})" for k in range(grid.columns * grid.rows)]
    if has_thumbnail:
        labels.append("thumbnail")
    pixel_values = to_pixel_values(tiles, size)

    # the ViT sees each tile on its own: attention stays inside a tile
    vision = model.vision_model(pixel_values, output_attentions=True)
    vit_maps, vit_numbers = select_layers(vision.attentions, vision_layers)
    patch_grid = size // config.vision_config.patch_size
    vision_section = attention_section(
        "vision", f"InternViT self-attention inside each tile ({len(vit_numbers)} layers × "
        f"{config.vision_config.num_attention_heads} heads, CLS + {patch_grid}×{patch_grid} patches per tile)",
        vit_maps, causal=False, layout={"kind": "patches", "tiles": list(range(n_tiles)),
                                        "grid": [patch_grid, patch_grid], "prefix": 1}, layers=vit_numbers)

    # the LLM: the chat prompt with <image> expanded, image features spliced in, as chat() does
    question = with_image_placeholder(prompt)
    query = build_query(model.template, model.system_message, question, [], [n_tiles], model.num_image_token)
    ids = encode(tokenizer, query)
    if len(ids) > max_tokens:
        raise ShapeError(f"the InternVL prompt is {len(ids)} tokens ({n_tiles} tiles × {model.num_image_token} "
                         f"image tokens + text), more than max_tokens={max_tokens}; use fewer tiles (--max-tiles) "
                         f"or raise --max-tokens")
    model.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
    input_ids = np.asarray([ids], dtype=np.int64)
    embeds = model.embed_with_images(input_ids, model.extract_feature(pixel_values), keep_graph_form=True)
    out = model.language_model(inputs_embeds=embeds, output_attentions=True)
    llm_maps, llm_numbers = select_layers(out.attentions, text_layers)
    context = [k for k, i in enumerate(ids) if i == model.img_context_token_id]
    per_tile = model.num_image_token
    side = int(round(math.sqrt(per_tile)))
    spans = [{"start": context[t * per_tile], "tile": t, "grid": side} for t in range(n_tiles)]
    llm_config = config.llm_config
    text_section = attention_section(
        "text", f"language-model self-attention ({len(llm_numbers)} layers × {llm_config.num_attention_heads} heads, "
        f"{len(ids)} tokens, {n_tiles}×{per_tile} of them image tokens)", llm_maps, causal=True,
        layout={"kind": "tokens", "image_spans": spans}, tokens=token_labels(tokenizer, ids), layers=llm_numbers)
    return {"title": title or "InternVL attention explorer",
            "images": [image_entry(tile, label) for tile, label in zip(tiles, labels)],
            "tile_grid": {"columns": grid.columns, "rows": grid.rows, "thumbnail": has_thumbnail},
            "sections": [vision_section, text_section]}


# ----------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------

def _asset(name: str) -> str:
    return resources.files("minivl").joinpath("explore_assets", name).read_text(encoding="utf-8")


def render_page(data: dict, rope: dict | None = None, facts: list[str] | None = None) -> str:
    """The self-contained HTML page: the data as JSON, the page's own CSS and JavaScript inline."""
    payload = dict(data, format=PAGE_FORMAT, rope=rope, facts=list(facts or []), quantization=QUANTIZATION_NOTE)
    # "</" inside a <script> would end it early: JSON allows the escaped form "<\/"
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).replace("</", "<\\/")
    title = html.escape(data.get("title", "attention explorer"))
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n"
            f"<style>\n{_asset('explore.css')}\n</style>\n</head>\n<body>\n"
            f"<header><h1>{title}</h1><p id=\"facts\"></p></header>\n<main id=\"app\"><p id=\"loading\">decoding "
            f"the attention maps…</p></main>\n"
            f"<script type=\"application/json\" id=\"minivl-data\">{text}</script>\n"
            f"<script>\n{_asset('explore.js')}\n</script>\n</body>\n</html>\n")


def write_page(page: str, path) -> str:
    """Write the page atomically (a temporary file renamed over `path`); returns the path."""
    path = os.fspath(path)
    if not path.endswith((".html", ".htm")):
        raise ConfigError(f"the explorer writes an HTML page: give --out a name ending in .html (got {path!r})")
    return write_text_atomic(path, page)
