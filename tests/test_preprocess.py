"""Image preprocessing (minivl/preprocess.py): tile grids, tiles, thumbnail, normalisation, image modes.

The reference pipeline is Pillow (resize/crop/convert) + torchvision (ToTensor, Normalize).
torchvision is not installed, so normalisation is checked against the float64 formula written out
by hand here; tiling is checked against the spec's test vectors and against Pillow itself.
"""
import numpy as np
import pytest
from PIL import Image

from minivl.errors import ConfigError, ImageError
from minivl.preprocess import (
    NORMALIZATIONS, Grid, build_transform, candidate_grids, choose_grid, dynamic_preprocess,
    find_closest_aspect_ratio, load_image, open_image, to_pixel_values, to_rgb,
)
from minivl.testing import assert_close, tolerance

# The candidate order observed with CPython 3.11 for the reference's set+sort (spec 7.2), typed in.
ORDER_MAX6 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1),
              (2, 3), (1, 6), (3, 2)]
ORDER_MAX12 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6),
               (6, 1), (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3),
               (9, 1), (2, 5), (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3),
               (1, 12), (6, 2), (2, 6)]


# Normalisation constants typed in from the spec (internvl-spec 7.1, CONST:16-21), not imported from
# minivl.preprocess: expected values must not share a wrong constant with the code under test.
SPEC_NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def photo(width, height, seed=0):
    """A smooth, photograph-like RGB test image (gradients + a disc + mild noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 3) ** 2
    b = np.where(disc, 220.0, 40.0)
    rgb = np.stack([r, g, b], -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def test_candidate_order_is_the_references():
    assert candidate_grids(1, 6) == ORDER_MAX6
    assert candidate_grids(1, 12) == ORDER_MAX12


@pytest.mark.parametrize("size, grid6, grid12", [
    ((800, 600), (3, 2), (4, 3)),
    ((1000, 1000), (2, 2), (3, 3)),
    ((500, 500), (1, 1), (1, 1)),
    ((1920, 1080), (2, 1), (4, 2)),   # equal |diff| for (2,1) and (4,2): the area rule picks (4,2)
    ((300, 900), (1, 3), (1, 3)),
])
def test_spec_test_vectors(size, grid6, grid12):
    w, h = size
    assert choose_grid(w, h, 1, 6, 448) == grid6
    assert choose_grid(w, h, 1, 12, 448) == grid12
    image = photo(w, h)
    for max_num, grid in ((6, grid6), (12, grid12)):
        tiles = dynamic_preprocess(image, max_num=max_num, image_size=448, use_thumbnail=True)
        n = grid[0] * grid[1]
        assert len(tiles) == n + (1 if n > 1 else 0)
        assert all(t.size == (448, 448) and t.mode == "RGB" for t in tiles)


def test_tie_break_needs_more_than_half_the_pixels():
    # 1920×1080 has aspect 16/9; (2,1) and (4,2) both give |16/9 − 2| exactly. A small image with
    # the same aspect does not have enough pixels (W·H <= 0.5·s²·8) to earn the bigger grid.
    assert find_closest_aspect_ratio(16 / 9, ORDER_MAX12, 1920, 1080, 448) == (4, 2)
    assert find_closest_aspect_ratio(16 / 9, ORDER_MAX12, 192, 108, 448) == (2, 1)


def test_tie_break_boundary_exact():
    # (2,1) vs (4,2) at aspect 2: the later grid wins iff W·H > 0.5·s²·4·2 = 784 for s = 14
    # (the function takes the aspect and the pixel count separately, so the boundary is reachable)
    s = 14
    candidates = [(1, 1), (2, 1), (4, 2)]
    assert find_closest_aspect_ratio(2.0, candidates, 28, 28, s) == (2, 1)      # 784: not more than half
    assert find_closest_aspect_ratio(2.0, candidates, 28, 29, s) == (4, 2)      # 812 > 784


def test_tiles_are_raster_crops_of_the_pillow_bicubic_resize_and_thumbnail_of_the_original():
    image = photo(301, 157, seed=1)
    s = 56
    grid = choose_grid(301, 157, 1, 12, s)
    tiles = dynamic_preprocess(image, max_num=12, image_size=s, use_thumbnail=True)
    resized = np.asarray(image.resize((s * grid.columns, s * grid.rows), Image.BICUBIC))
    for k in range(grid.columns * grid.rows):
        row, col = divmod(k, grid.columns)
        np.testing.assert_array_equal(np.asarray(tiles[k]), resized[row * s:(row + 1) * s, col * s:(col + 1) * s])
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((s, s), Image.BICUBIC)))
    # and the filter really is bicubic: a bilinear resize gives different pixels
    assert not np.array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((s, s), Image.BILINEAR)))


def test_single_tile_has_no_thumbnail():
    tiles = dynamic_preprocess(photo(20, 20), image_size=28, use_thumbnail=True)
    assert len(tiles) == 1


def test_normalisation_names_are_the_specs():
    assert sorted(NORMALIZATIONS) == sorted(SPEC_NORMALIZATIONS)


@pytest.mark.parametrize("normalize", sorted(SPEC_NORMALIZATIONS))
def test_normalisation_matches_the_float64_formula(normalize):
    tiles = dynamic_preprocess(photo(120, 70, seed=2), max_num=4, image_size=28, use_thumbnail=True)
    pixel_values = to_pixel_values(tiles, 28, normalize)
    assert pixel_values.dtype == np.float32 and pixel_values.shape == (len(tiles), 3, 28, 28)
    mean, std = (np.array(v, dtype=np.float64).reshape(1, 3, 1, 1) for v in SPEC_NORMALIZATIONS[normalize])
    raw = np.stack([np.asarray(t, dtype=np.float64) for t in tiles]).transpose(0, 3, 1, 2)
    expected = (raw / 255.0 - mean) / std
    # float32 pipeline: x/255 (1 rounding), mean and std rounded to float32 (~0.5 ulp each), the
    # subtraction and the division (1 rounding each): a few ulps of the result, and near zero a few
    # ulps of x/std (~2.2, the largest |value|), since x − mean cancels.
    rtol, atol = tolerance("float32", 4, 4, scale=2.7)
    assert_close(pixel_values, expected, rtol=rtol, atol=atol, what=f"{normalize} normalisation")


def test_normalisation_of_black_and_white():
    black = to_pixel_values([Image.new("RGB", (14, 14), (0, 0, 0))], 14)
    white = to_pixel_values([Image.new("RGB", (14, 14), (255, 255, 255))], 14)
    mean, std = SPEC_NORMALIZATIONS["imagenet"]
    rtol, atol = tolerance("float32", 4, 4, scale=2.7)
    for c in range(3):
        assert_close(black[0, c], np.full((14, 14), -mean[c] / std[c]), rtol=rtol, atol=atol, what="black")
        assert_close(white[0, c], np.full((14, 14), (1 - mean[c]) / std[c]), rtol=rtol, atol=atol, what="white")


def test_build_transform_resizes_like_torchvision_resize_on_pil():
    transform = build_transform(28)
    image = photo(40, 33)
    expected = to_pixel_values([image.resize((28, 28), Image.BICUBIC)], 28)[0]
    np.testing.assert_array_equal(transform(image), expected)


def test_load_image_returns_tiles_and_grid(tmp_path):
    path = tmp_path / "wide.png"
    photo(200, 60).save(path)
    pixel_values, grid = load_image(path, max_num=6, image_size=28)
    assert grid == Grid(3, 1) == (3, 1)
    assert pixel_values.shape == (4, 3, 28, 28)   # 3 tiles + thumbnail


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 1), (2, 3), (13, 1)])
def test_any_size_down_to_one_pixel(size):
    image = Image.new("RGB", size, (200, 10, 30))
    pixel_values, grid = load_image(image, max_num=12, image_size=14)
    n = grid.columns * grid.rows
    assert pixel_values.shape == (n + (n > 1), 3, 14, 14)
    # a constant image stays exactly constant through every bicubic resize (Pillow's weights sum to
    # one in fixed point), so every pixel is the float64 formula of (200, 10, 30), to the float32
    # normalisation budget of test_normalisation_matches_the_float64_formula (4 ulps of ~2.7)
    mean, std = (np.array(v, dtype=np.float64).reshape(1, 3, 1, 1) for v in SPEC_NORMALIZATIONS["imagenet"])
    expected = (np.array([200.0, 10.0, 30.0]).reshape(1, 3, 1, 1) / 255.0 - mean) / std
    rtol, atol = tolerance("float32", 4, 4, scale=2.7)
    assert_close(pixel_values, np.broadcast_to(expected, pixel_values.shape), rtol=rtol, atol=atol,
                 what=f"constant {size} image")
    if size == (1, 500):
        assert grid == (1, 12)
    if size == (500, 1):
        assert grid == (12, 1)


# ----------------------------------------------------------------------------- image modes

def test_modes_that_pillow_converts_exactly_like_the_reference():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = to_rgb(Image.fromarray(gray, "L"))
    np.testing.assert_array_equal(np.asarray(rgb), np.repeat(gray[..., None], 3, -1))
    bits = rng.integers(0, 2, (5, 7)).astype(bool)
    one = Image.fromarray(bits).convert("1")
    np.testing.assert_array_equal(np.asarray(to_rgb(one))[..., 0], np.where(bits, 255, 0))
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    np.testing.assert_array_equal(np.asarray(to_rgb(palette)), [[[10, 20, 30], [200, 100, 50]]])
    cmyk = Image.fromarray(rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), "CMYK")
    np.testing.assert_array_equal(np.asarray(to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))


def test_alpha_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)    # opaque: the colour itself (as the reference)
    rgba[0, 1] = (10, 20, 30, 0)      # transparent: white (the reference would give (10, 20, 30))
    rgba[0, 2] = (0, 0, 0, 128)       # half: 255·127/255 ≈ 127 of white over black
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    np.testing.assert_array_equal(out[0, 0], (10, 20, 30))
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
    assert np.all(np.abs(out[0, 2] - 127) <= 1)
    la = Image.fromarray(np.array([[[90, 255], [90, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(np.asarray(to_rgb(la))[0], [[90, 90, 90], [255, 255, 255]])
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(np.asarray(to_rgb(palette)), [[[255, 255, 255], [200, 100, 50]]])


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 257 * 100, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = np.asarray(to_rgb(image))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 100, 255]])
    as_int = Image.fromarray(values.astype(np.int32))
    assert as_int.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(as_int))[..., 0], [[0, 1, 100, 255]])


def test_float_images_are_scaled():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(np.asarray(to_rgb(unit))[..., 0], [[0, 128, 255]])
    wide = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[..., 0], [[0, 128, 255]])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "I;16", "I", "F", "CMYK", "1", "YCbCr", "La"])
def test_every_mode_round_trips_through_a_file_or_memory(mode, tmp_path):
    image = Image.new(mode, (9, 4))
    pixel_values, grid = load_image(image, image_size=14)
    assert pixel_values.dtype == np.float32 and np.isfinite(pixel_values).all()
    if mode in ("L", "LA", "P", "RGBA", "I;16", "1"):
        path = tmp_path / "x.png"
        image.save(path)
        # PNG is lossless for these modes: the file gives exactly the in-memory pixels
        np.testing.assert_array_equal(load_image(path, image_size=14)[0], pixel_values)


# ----------------------------------------------------------------------------- errors

def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ImageError, match="notes.png"):
        open_image(path)


def test_truncated_image_names_the_file(tmp_path):
    path = tmp_path / "cut.png"
    photo(64, 64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(path)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="PIL.Image"):
        to_rgb(np.zeros((3, 3)))
    with pytest.raises(ConfigError, match="min_num"):
        candidate_grids(3, 2)
    with pytest.raises(ConfigError, match="normalize"):
        to_pixel_values([photo(4, 4)], 4, normalize="bogus")
    with pytest.raises(ConfigError, match="image_size"):
        dynamic_preprocess(photo(4, 4), image_size=0)
