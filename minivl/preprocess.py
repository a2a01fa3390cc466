"""Image preprocessing of InternVL: dynamic tiling, thumbnail and normalisation (NumPy + Pillow only).

InternVL never resizes a photo to one square. It picks a grid of `columns × rows` square tiles
whose aspect ratio is closest to the image's (`dynamic_preprocess`), resizes the whole image to
`(s·columns, s·rows)` with Pillow's bicubic filter, cuts it in raster order, and (when there is
more than one tile) appends a thumbnail of the whole image. Each tile is then turned into a
normalised float32 `[3, s, s]` array exactly like torchvision's `ToTensor` + `Normalize`.

Follows `internvl_chat/internvl/train/dataset.py` (`find_closest_aspect_ratio`,
`dynamic_preprocess`, `build_transform`) and the README's `load_image`, with the same candidate
order, tie-break and resampling filter, so the same tiles come out bit for bit.

Image modes: the reference just calls `Image.convert('RGB')`. `to_rgb` does the same for every
mode where that is right (RGB, L, P, 1, CMYK, YCbCr, ...), and departs from it in two places,
on purpose and documented there:
* transparency (RGBA, LA, PA, P/L/RGB with a transparent colour) is composited on WHITE; Pillow's
  convert would drop alpha and show whatever colour hides under transparent pixels (often
  black). A fully opaque image gives exactly the reference's pixels.
* 16-bit and 32-bit integer and float images are scaled to 0..255 (65535 -> 255); Pillow's
  convert clips them at 255, so a 16-bit photo would come out almost all white.
Like the reference, EXIF orientation is NOT applied (a phone photo stored sideways stays sideways),
and a multi-frame file (GIF, TIFF) gives its first frame.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from minivl.errors import ConfigError, ImageError

# Channel means and standard deviations (internvl_chat/internvl/train/constants.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class Grid(NamedTuple):
    """A tile grid: `columns` tiles across, `rows` tiles down (the reference's `(i, j)` ratio)."""

    columns: int
    rows: int


# ----------------------------------------------------------------------------- image modes

def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth single-channel array to uint8 0..255 (the policy in the module docstring).

    [h, w] any numeric -> [h, w] uint8
    """
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        # min/max would be NaN and every pixel would come out 0 (black), silently
        n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        raise ImageError(f"the {mode!r} image has {n_nan} NaN and {n_inf} inf pixels (of {values.size}), which have no "
                         f"grey level; replace them with numbers (e.g. numpy.nan_to_num) and save the image again")
    if mode.startswith("I;16"):
        low, high = 0.0, 65535.0                        # nominal 16-bit range
    elif mode == "I":
        # 32-bit int: Pillow also uses it for 16-bit PNG/TIFF, so 0..65535 is the nominal range
        low, high = (0.0, 65535.0) if values.min() >= 0 and values.max() <= 65535 else (values.min(), values.max())
    else:  # "F"
        if values.min() >= 0 and values.max() <= 1:
            low, high = 0.0, 1.0                        # the usual [0, 1] float image
        elif values.min() >= 0 and values.max() <= 255:
            low, high = 0.0, 255.0                      # already on the 8-bit scale
        else:
            low, high = float(values.min()), float(values.max())
    span = high - low if high > low else 1.0
    # v8 = round(255·(v − low)/(high − low)); 65535 -> 255, 257·k -> k for 16-bit
    return np.clip(np.rint(255.0 * (values - low) / span), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> an 8-bit RGB image (reference: `image.convert('RGB')`, see module docstring).

    [h, w] or [h, w, c] in any mode -> [h, w, 3] uint8 RGB
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL.Image.Image, got {type(image).__name__}; "
                         "open the file with minivl.preprocess.open_image(path)")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has size {width}×{height}; it needs at least 1×1 pixels")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _scale_to_uint8(np.asarray(image), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        if mode == "La":          # premultiplied grey+alpha: Pillow un-premultiplies it only to LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        # out = α·rgb + (1 − α)·white, in Pillow's 8-bit arithmetic (exact for α = 0 and α = 255)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert an image of mode {mode!r} to RGB ({err}); "
                         "save it as an 8-bit RGB or grayscale PNG/JPEG first") from err


def open_image(path_or_image) -> Image.Image:
    """Open a file (path or PIL image) and return it as 8-bit RGB, or raise ImageError naming the file."""
    if isinstance(path_or_image, Image.Image):
        return to_rgb(path_or_image)
    if not isinstance(path_or_image, (str, bytes, os.PathLike)):
        raise ImageError(f"open_image takes a file path or a PIL image, got {type(path_or_image).__name__}"
                         + ("; for an array use PIL.Image.fromarray(array)" if hasattr(path_or_image, "shape")
                            else ""))
    path = os.fspath(path_or_image)
    if not path.strip():
        raise ImageError("the image path is empty; pass the path of an image file")
    if not os.path.exists(path):
        raise ImageError(f"image file {path!r} does not exist; check the path")
    if not os.path.isfile(path):
        raise ImageError(f"{path!r} is not a file; pass the path of one image file")
    try:
        with Image.open(path) as image:
            image.load()                  # decode now so a truncated file fails here, not later
            return to_rgb(image).copy()
    except UnidentifiedImageError as err:
        raise ImageError(f"{path!r} is not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...); "
                         "pass an image file") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path!r} has more pixels than Pillow's safety limit ({err}); shrink the image first, "
                         "or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageError):
            raise ImageError(f"{path!r}: {err}") from None  # say which file
        raise ImageError(f"{path!r} could not be decoded as an image ({err}); "
                         "the file may be truncated or corrupt") from err


# ----------------------------------------------------------------------------- tiling

# The most tiles one image may be cut into. Enumerating grids is cheap at any size now, but every
# tile costs a ViT forward and num_image_token (256) positions: 128 tiles are 32,768 image tokens,
# a whole 32k context, ten times the released models' max_num = 12.
MAX_TILES = 128


def candidate_grids(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """All (columns, rows) with min_num <= columns·rows <= max_num, in the reference's exact order.

    The reference builds `set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
    for j in range(1, n + 1) if min_num <= i*j <= max_num)` and sorts it by tile count only, so
    grids with the same count keep CPython's set iteration order. That loop is O(max_num³). A set's
    order depends only on which items were inserted new, in what order; (i, j) is first inserted at
    n = max(i, j, min_num), row i before row i + 1, j ascending. So the grids are enumerated directly
    (for each i, j up to max_num // i: O(max_num log max_num)), put in that first-insertion order,
    and inserted into a set: the same set, the same iteration order, the same result.
    """
    for name, value in (("min_num", min_num), ("max_num", max_num)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} (a tile count) must be an int, got {value!r} of type {type(value).__name__}")
    if min_num < 1 or max_num < min_num:
        raise ConfigError(f"tile counts need 1 <= min_num <= max_num (got min_num={min_num!r}, "
                          f"max_num={max_num!r}); the released models use min_num=1, max_num=12")
    if max_num > MAX_TILES:
        raise ConfigError(f"max_num (the most tiles per image) is {max_num}, above minivl's limit of {MAX_TILES} "
                          f"tiles ({MAX_TILES} × 256 = {MAX_TILES * 256} image tokens); use at most {MAX_TILES}, "
                          f"the released models use 12")
    min_num, max_num = int(min_num), int(max_num)
    grids = [(i, j) for i in range(1, max_num + 1) for j in range(1, max_num // i + 1) if i * j >= min_num]
    first_inserted = sorted(grids, key=lambda grid: (max(grid[0], grid[1], min_num), grid[0], grid[1]))
    return sorted(set(first_inserted), key=lambda grid: grid[0] * grid[1])


def find_closest_aspect_ratio(aspect_ratio: float, target_ratios, width: int, height: int,
                              image_size: int) -> tuple[int, int]:
    """The grid (columns, rows) whose columns/rows is closest to width/height (reference tie-break).

    Scans `target_ratios` in order: a strictly smaller |aspect − columns/rows| wins; an EQUAL
    difference switches to the later (larger) grid only if the image has more than half its pixels,
    width·height > 0.5·s²·columns·rows. Starts from (1, 1) with difference +inf.
    """
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def choose_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> Grid:
    """The tile grid `dynamic_preprocess` uses for an image of width × height pixels."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ImageError(f"choose_grid: {name} must be a positive number of pixels, got {value!r}; pass "
                             f"image.size of a non-empty image")
    ratio = find_closest_aspect_ratio(width / height, candidate_grids(min_num, max_num), width, height, image_size)
    return Grid(*ratio)


def _check_image_size(image_size) -> int:
    """image_size as a Python int (an np.int8 100 times 3 tiles would wrap to 44), or ConfigError."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError(f"image_size must be a positive int (got {image_size!r}); InternVL tiles are 448")
    return int(image_size)


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = False) -> list[Image.Image]:
    """Cut an image into a grid of s×s tiles (+ thumbnail), as InternVL's `dynamic_preprocess`.

    PIL image W×H -> list of `columns·rows` RGB s×s tiles in raster order (left to right, top to
    bottom), followed by an s×s thumbnail of the whole image if `use_thumbnail` and the grid has
    more than one tile.
    """
    image_size = _check_image_size(image_size)
    image = to_rgb(image)
    width, height = image.size
    columns, rows = choose_grid(width, height, min_num, max_num, image_size)
    # Pillow bicubic (a = −0.5, antialiased, 8-bit result), the reference's `image.resize` default
    resized = image.resize((image_size * columns, image_size * rows), resample=Image.BICUBIC)
    tiles = []
    for k in range(columns * rows):
        # tile k sits at column k mod columns, row k div columns
        left, top = (k % columns) * image_size, (k // columns) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        # the thumbnail is resized from the ORIGINAL image, not from the tiled one
        tiles.append(image.resize((image_size, image_size), resample=Image.BICUBIC))
    return tiles


# ----------------------------------------------------------------------------- normalisation

def to_pixel_values(tiles, image_size: int = 448, normalize: str = "imagenet") -> np.ndarray:
    """Stack tiles into normalised pixel values, as torchvision ToTensor + Normalize do it.

    list of n PIL images -> [n, 3, s, s] float32
    """
    image_size = _check_image_size(image_size)
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {sorted(NORMALIZATIONS)} (got {normalize!r})")
    if isinstance(tiles, Image.Image):
        tiles = [tiles]
    if not isinstance(tiles, (list, tuple)):
        raise ImageError(f"to_pixel_values takes a list of PIL images (dynamic_preprocess returns one), got "
                         f"{type(tiles).__name__}")
    if len(tiles) == 0:
        raise ImageError("no tiles to normalise; pass at least one image")
    mean, std = (np.asarray(v, dtype=np.float32).reshape(1, 3, 1, 1) for v in NORMALIZATIONS[normalize])
    arrays = []
    for tile in tiles:
        tile = to_rgb(tile)
        if tile.size != (image_size, image_size):
            # T.Resize((s, s), BICUBIC) on a PIL image is Pillow's bicubic resize
            tile = tile.resize((image_size, image_size), resample=Image.BICUBIC)
        arrays.append(np.asarray(tile, dtype=np.uint8))
    pixels = np.stack(arrays).transpose(0, 3, 1, 2)               # [n, s, s, 3] -> [n, 3, s, s]
    # ToTensor: x = uint8 / 255 in float32; Normalize: (x − mean) / std, all float32
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    return (scaled - mean) / std


def build_transform(input_size: int = 448, normalize_type: str = "imagenet") -> Callable[[Image.Image], np.ndarray]:
    """The reference's inference transform: PIL image -> [3, s, s] float32 (RGB, resize, scale, normalise)."""
    input_size = _check_image_size(input_size)
    if normalize_type not in NORMALIZATIONS:
        raise ConfigError(f"normalize_type must be one of {sorted(NORMALIZATIONS)} (got {normalize_type!r})")

    def transform(image: Image.Image) -> np.ndarray:
        return to_pixel_values([image], input_size, normalize_type)[0]

    return transform


def load_image(path_or_image, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True,
               min_num: int = 1, normalize: str = "imagenet") -> tuple[np.ndarray, Grid]:
    """Open, tile and normalise one image, as the InternVL README's `load_image`.

    path or PIL image -> ([n_tiles, 3, s, s] float32, Grid(columns, rows)), where
    n_tiles = columns·rows (+1 for the thumbnail when columns·rows > 1 and use_thumbnail).
    """
    image = open_image(path_or_image)
    grid = choose_grid(image.size[0], image.size[1], min_num, max_num, image_size)
    tiles = dynamic_preprocess(image, min_num=min_num, max_num=max_num, image_size=image_size,
                               use_thumbnail=use_thumbnail)
    return to_pixel_values(tiles, image_size, normalize), grid
