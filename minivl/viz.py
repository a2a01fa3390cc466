"""Pictures of attention and positions. Every function takes plain NumPy arrays and returns a figure.

Because the inputs are plain arrays, these work on the outputs of any model (minivl, torch_impl
via `.numpy()`, transformers, onnxruntime). Nothing here computes model math: the caller passes
`inv_freq`, attention probabilities or ALiBi biases from `minivl.rope`, `minivl.attention`, ...
"""
from __future__ import annotations

import math
import sys

import matplotlib

if "ipykernel" not in sys.modules:  # a notebook keeps its inline backend; scripts and CLI render headless
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from minivl.errors import ShapeError  # noqa: E402


def _check_rank(name: str, array: np.ndarray, ranks: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ShapeError(f"{name} must be {want}, got shape {array.shape}")
    return array


def _label_axis(ax, labels, axis: str, max_labels: int = 40) -> None:
    if labels is None:
        return
    labels = list(labels)
    step = max(1, math.ceil(len(labels) / max_labels))
    ticks = np.arange(0, len(labels), step)
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)


def attention_heatmap(probs, query_labels=None, key_labels=None, title="attention", ax=None):
    """One head's attention probabilities as a heatmap: rows are queries, columns keys.

    [n_q, n_k] -> Figure. Colour is the probability itself (0..row max), so a row sums to 1.
    """
    probs = _check_rank("probs", probs, (2,))
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 4.5))
    # entries that are exactly 0 were masked out: draw them white, apart from small probabilities
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("white")
    image = ax.imshow(np.ma.masked_where(probs == 0, probs), cmap=cmap, vmin=0.0, aspect="auto",
                      interpolation="nearest")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(title + " (white: masked)" if (probs == 0).any() else title)
    _label_axis(ax, key_labels, "x")
    _label_axis(ax, query_labels, "y")
    fig.colorbar(image, ax=ax, label="attention probability")
    return fig


def attention_grid(probs, layers=None, heads=None, title="attention per layer and head"):
    """A layer × head grid of attention heatmaps sharing one colour scale.

    [n_layers, n_heads, n_q, n_k] -> Figure (layers down, heads across).
    """
    probs = _check_rank("probs", probs, (4,))
    n_layers, n_heads = probs.shape[:2]
    layers = list(range(n_layers)) if layers is None else list(layers)
    heads = list(range(n_heads)) if heads is None else list(heads)
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(1.6 * len(heads) + 1, 1.6 * len(layers) + 0.6),
                             squeeze=False)
    vmax = float(probs.max()) or 1.0
    for row, layer in enumerate(layers):
        for col, head in enumerate(heads):
            ax = axes[row, col]
            image = ax.imshow(probs[row, col], cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(title)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    return fig


def patch_attention_overlay(image, attention, title="attention over image patches", ax=None, alpha=0.55):
    """Attention over a grid of image patches, upsampled onto the image it came from.

    image [H, W, 3] (uint8 or float in [0, 1]), attention [gh, gw] or [gh·gw] (square) -> Figure.
    Each patch is drawn as a block (nearest upsampling), so what you see is what the model saw.
    """
    image = _check_rank("image", image, (3,))
    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim == 1:
        side = int(round(math.sqrt(attention.size)))
        if side * side != attention.size:
            raise ShapeError(f"a flat attention vector must have a square length, got {attention.size}; "
                             "pass it as [grid_h, grid_w]")
        attention = attention.reshape(side, side)
    attention = _check_rank("attention", attention, (2,))
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 5))
    height, width = image.shape[:2]
    ax.imshow(image)
    # extent maps the patch grid exactly onto the image pixels
    overlay = ax.imshow(attention, cmap="inferno", alpha=alpha, extent=(0, width, height, 0),
                        interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    fig.colorbar(overlay, ax=ax, shrink=0.8, label="attention (share of the query's mass)")
    return fig


def text_to_image_attention(attention, tiles, tokens_per_tile_grid, query_label="text token",
                            title="text → image attention across tiles"):
    """Where one text token looks among the image tokens, tile by tile.

    attention [n_tiles·g·g] (one query's probabilities over the image-token span, in (tile, token)
    order as InternVL substitutes them), tiles: list of [s, s, 3] tile images, g = tokens_per_tile_grid
    (16 for a 448 tile after pixel shuffle) -> Figure with one panel per tile, on one colour scale.
    """
    attention = np.asarray(attention, dtype=np.float64).reshape(-1)
    n_tiles = len(tiles)
    per_tile = tokens_per_tile_grid * tokens_per_tile_grid
    if attention.size != n_tiles * per_tile:
        raise ShapeError(f"attention has {attention.size} entries but {n_tiles} tiles × {per_tile} tokens "
                         f"= {n_tiles * per_tile} are expected")
    grids = attention.reshape(n_tiles, tokens_per_tile_grid, tokens_per_tile_grid)
    vmax = float(grids.max()) or 1.0
    cols = min(n_tiles, 5)
    rows = math.ceil(n_tiles / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1, 2.6 * rows + 0.5), squeeze=False)
    for index in range(rows * cols):
        ax = axes.flat[index]
        ax.set_axis_off()
        if index >= n_tiles:
            continue
        tile = np.asarray(tiles[index])
        size = tile.shape[0]
        ax.imshow(tile)
        image = ax.imshow(grids[index], cmap="inferno", alpha=0.6, vmin=0, vmax=vmax,
                          extent=(0, size, size, 0), interpolation="nearest")
        ax.set_title(f"tile {index}" + (" (thumbnail)" if index == n_tiles - 1 and n_tiles > 1 else ""),
                     fontsize=8)
    fig.suptitle(f"{title}: {query_label}")
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    return fig


def rope_atlas(inv_freqs: dict, original_max_position_embeddings: int | None = None,
               title="RoPE frequencies per dimension pair"):
    """inv_freq and wavelength per dimension pair, one line per scaling type.

    inv_freqs: {name: [d/2]} (the first is drawn as the reference, wide and pale underneath)
    -> Figure with two panels (log scale): the angular frequency ω_j
    (radians per position) and the wavelength 2π/ω_j (positions per full turn). A dashed line marks
    the original context length: pairs above it never complete a turn inside that context.
    """
    if not inv_freqs:
        raise ShapeError("rope_atlas needs at least one {name: inv_freq} entry")
    fig, (ax_freq, ax_wave) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, inv_freq) in enumerate(inv_freqs.items()):
        inv_freq = _check_rank(f"inv_freq[{name}]", inv_freq, (1,)).astype(np.float64)
        pairs = np.arange(inv_freq.size)
        # the first entry is the reference: wide and pale underneath, visible where others coincide with it
        style = dict(linewidth=5, alpha=0.35, zorder=1) if index == 0 else dict(linewidth=1.5, zorder=2)
        ax_freq.plot(pairs, inv_freq, label=name, **style)
        # wavelength λ_j = 2π / ω_j
        ax_wave.plot(pairs, 2 * np.pi / inv_freq, label=name, **style)
    ax_freq.set_yscale("log")
    ax_freq.set_xlabel("dimension pair j")
    ax_freq.set_ylabel(r"$\omega_j$ (radians per position)")
    ax_freq.set_title("frequency")
    ax_wave.set_yscale("log")
    ax_wave.set_xlabel("dimension pair j")
    ax_wave.set_ylabel(r"wavelength $2\pi/\omega_j$ (positions)")
    ax_wave.set_title("wavelength")
    if original_max_position_embeddings:
        ax_wave.axhline(original_max_position_embeddings, color="grey", linestyle="--", linewidth=1,
                        label=f"context {original_max_position_embeddings}")
    ax_freq.legend(fontsize=8)
    ax_wave.legend(fontsize=8)
    ax_freq.grid(True, which="both", alpha=0.3)
    ax_wave.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def rope_pair_rotation(inv_freq, pair_indices=(0, 8, 16), positions=None, title="one pair's rotation"):
    """The 2-D rotation of chosen dimension pairs as the position grows.

    inv_freq [d/2], pair_indices: which pairs j, positions [n] (default 0..63) -> Figure.
    A unit vector (1, 0) in pair j at position p is rotated by the angle p·ω_j: fast pairs spin,
    slow pairs barely move. Points are coloured by position.
    """
    inv_freq = _check_rank("inv_freq", inv_freq, (1,)).astype(np.float64)
    positions = np.arange(64) if positions is None else np.asarray(positions)
    bad = [j for j in pair_indices if not 0 <= j < inv_freq.size]
    if bad:
        raise ShapeError(f"pair indices {bad} are outside 0..{inv_freq.size - 1}")
    fig, axes = plt.subplots(1, len(pair_indices), figsize=(3.6 * len(pair_indices), 3.8), squeeze=False,
                             sharey=True)
    circle = np.linspace(0, 2 * np.pi, 200)
    for index, (ax, j) in enumerate(zip(axes[0], pair_indices)):
        # the pair (x_j, x_{j+d/2}) = (1, 0) rotated by the angle p·ω_j
        angle = positions * inv_freq[j]
        ax.plot(np.cos(circle), np.sin(circle), color="lightgrey", linewidth=0.6, zorder=0)
        scatter = ax.scatter(np.cos(angle), np.sin(angle), c=positions, cmap="viridis", s=14)
        ax.set_aspect("equal")
        ax.set_xlim(-1.15, 1.15)
        ax.set_ylim(-1.15, 1.15)
        turns = positions.max() * inv_freq[j] / (2 * np.pi)
        plural = "" if f"{turns:.3g}" == "1" else "s"  # the plural of the number as printed
        ax.set_title(f"pair j={j}: $\\omega$={inv_freq[j]:.3g} rad/pos\n{turns:.3g} turn{plural} over the positions",
                     fontsize=9)
        ax.set_xlabel("component j")
        if index == 0:
            ax.set_ylabel("component j + d/2")
    fig.colorbar(scatter, ax=axes[0], label="position")
    fig.suptitle(title)
    return fig


def rope_similarity_decay(inv_freqs: dict, max_distance: int = 4096, attention_scalings: dict | None = None,
                          title="q·k similarity vs relative distance"):
    """How RoPE alone makes q·k fall off with distance, for each scaling.

    For q = k = all-ones, q_m·k_n = s²·Σ_j 2·cos((m−n)·ω_j) depends only on the distance m−n.
    inv_freqs {name: [d/2]}, attention_scalings {name: s} (default 1) -> Figure, normalised so
    that distance 0 is s² (the YaRN/su temperature shows up as a shift of the whole curve).
    """
    attention_scalings = attention_scalings or {}
    distance = np.unique(np.round(np.geomspace(1, max_distance, 400)).astype(np.int64))
    distance = np.concatenate([[0], distance])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, inv_freq in inv_freqs.items():
        inv_freq = _check_rank(f"inv_freq[{name}]", inv_freq, (1,)).astype(np.float64)
        scaling = float(attention_scalings.get(name, 1.0))
        # q·k / (d) = s² · mean_j cos(Δ·ω_j)
        similarity = scaling**2 * np.cos(np.outer(distance, inv_freq)).mean(axis=1)
        ax.plot(np.maximum(distance, 0.8), similarity, label=name, linewidth=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("relative distance m − n (positions, log scale; 0 drawn at 0.8)")
    ax.set_ylabel("q·k / d for q = k = 1")
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def alibi_matrices(bias, slopes=None, heads=None, title="ALiBi bias per head"):
    """ALiBi biases as matrices, one panel per head, on one colour scale.

    bias [n_heads, L, L] (full form) or [n_heads, 1, L] (causal row form, drawn as its causal
    lower triangle: row i is the row form shifted so the diagonal is 0) -> Figure.
    """
    bias = _check_rank("bias", bias, (3, 4)).astype(np.float64)
    if bias.ndim == 4:
        bias = bias[0]
    n_heads, rows, length = bias.shape
    if rows == 1:
        # row form (j − (L−1))·σ: row i is the same line shifted by (L−1−i)·σ, i.e. (j − i)·σ
        row = bias[:, 0, :]
        slope_per_head = row[:, -2] - row[:, -1] if length > 1 else np.zeros(n_heads)
        i = np.arange(length)
        bias = (i[None, None, :] - i[None, :, None]) * (-slope_per_head)[:, None, None]
        bias = np.where(i[None, None, :] <= i[None, :, None], bias, np.nan)
    heads = list(range(n_heads)) if heads is None else list(heads)
    cols = min(len(heads), 4)
    n_rows = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3 * cols + 1, 3 * n_rows + 0.4), squeeze=False)
    vmin = float(np.nanmin(bias[heads]))
    for index in range(n_rows * cols):
        ax = axes.flat[index]
        if index >= len(heads):
            ax.set_axis_off()
            continue
        head = heads[index]
        image = ax.imshow(bias[head], cmap="magma", vmin=vmin, vmax=0, interpolation="nearest")
        label = f"head {head}" + (f": slope {float(slopes[head]):.4g}" if slopes is not None else "")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("key j", fontsize=7)
        if index % cols == 0:
            ax.set_ylabel("query i", fontsize=7)
    fig.suptitle(title)
    fig.colorbar(image, ax=axes, shrink=0.8, label="bias −slope·|i − j|")
    return fig


def gqa_grouping(n_heads: int, n_kv_heads: int, title=None):
    """Which query heads share which key/value head (MHA, GQA or MQA), as a diagram.

    Query head h reads KV head h // (n_heads / n_kv_heads) — the grouping InternLM2's fused wqkv
    stores and `repeat_kv` assumes.
    """
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ShapeError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads ({n_kv_heads})")
    group = n_heads // n_kv_heads
    kind = "MHA" if group == 1 else ("MQA" if n_kv_heads == 1 else "GQA")
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * n_heads + 1), 2.8))
    colours = plt.get_cmap("tab10" if n_kv_heads <= 10 else "tab20")
    for h in range(n_heads):
        kv = h // group
        ax.add_patch(plt.Rectangle((h, 1.4), 0.85, 0.6, color=colours(kv % colours.N)))
        ax.text(h + 0.42, 1.7, f"q{h}", ha="center", va="center", fontsize=7, color="white")
        kv_x = kv * n_heads / n_kv_heads + (n_heads / n_kv_heads - 0.85) / 2
        ax.plot([h + 0.42, kv_x + 0.42], [1.4, 0.6], color=colours(kv % colours.N), linewidth=0.8)
    for kv in range(n_kv_heads):
        kv_x = kv * n_heads / n_kv_heads + (n_heads / n_kv_heads - 0.85) / 2
        ax.add_patch(plt.Rectangle((kv_x, 0.0), 0.85, 0.6, color=colours(kv % colours.N)))
        ax.text(kv_x + 0.42, 0.3, f"kv{kv}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlim(-0.3, n_heads + 0.2)
    ax.set_ylim(-0.2, 2.2)
    ax.set_axis_off()
    kv_plural = "s" if n_kv_heads > 1 else ""
    ax.set_title(title or f"{kind}: {n_heads} query heads, {n_kv_heads} KV head{kv_plural} (group size {group})")
    return fig


def kv_cache_memory(model_sizes: dict, context_lengths, bytes_per_value: int = 2,
                    title="KV-cache memory per sequence"):
    """KV-cache bytes vs context length for real model shapes.

    model_sizes {name: (n_layers, n_kv_heads, head_dim)} -> Figure. bytes = 2 (K and V) · layers
    · kv_heads · head_dim · tokens · bytes_per_value.
    """
    context_lengths = np.asarray(context_lengths, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (n_layers, n_kv_heads, head_dim) in model_sizes.items():
        gib = 2 * n_layers * n_kv_heads * head_dim * context_lengths * bytes_per_value / 2**30
        ax.plot(context_lengths, gib, marker="o", markersize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache (GiB, {8 * bytes_per_value}-bit values)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig, path, format: str | None = None) -> str:
    """Write a figure (dpi 120; PNG, or the format `format` or the path's suffix names) and close it.

    Atomic: rendered in memory, then written through a temporary file renamed over `path`, so a
    failed write (a full disk) leaves the previous picture whole. Returns the path.
    """
    import io
    import os

    from minivl.files import write_bytes_atomic

    format = format or os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=format, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return str(write_bytes_atomic(path, buffer.getvalue()))


__all__ = [
    "attention_heatmap", "attention_grid", "patch_attention_overlay", "text_to_image_attention",
    "rope_atlas", "rope_pair_rotation", "rope_similarity_decay", "alibi_matrices", "gqa_grouping",
    "kv_cache_memory", "save",
]
