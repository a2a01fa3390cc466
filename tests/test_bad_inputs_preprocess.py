"""Tile counts: the candidate grids are enumerated in O(max_num log max_num) with exactly the
reference's result and order, and a tile count above minivl's limit is a named ConfigError, not a hang.

Exact equality of lists: the grid order decides the tile grid, so there is no tolerance.
"""
import numpy as np
import pytest
from PIL import Image

from minivl.errors import ConfigError
from minivl.preprocess import MAX_TILES, candidate_grids, choose_grid, dynamic_preprocess, load_image


def reference_candidate_grids(min_num, max_num):
    """InternVL's internvl_chat/internvl/train/dataset.py `dynamic_preprocess`, transcribed as it is."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return target_ratios


@pytest.mark.parametrize("max_num", range(1, 41))
def test_grids_equal_the_reference_for_every_min_num(max_num):
    for min_num in range(1, max_num + 1):
        assert candidate_grids(min_num, max_num) == reference_candidate_grids(min_num, max_num), (min_num, max_num)


def test_grids_equal_the_reference_at_the_limit():
    assert candidate_grids(1, MAX_TILES) == reference_candidate_grids(1, MAX_TILES)


def test_the_set_order_is_what_is_reproduced():
    # the same grids sorted by count alone, without the reference's insertion order, differ: the
    # order of equal-count grids is CPython's set order, which the insertion order decides
    grids = [(i, j) for i in range(1, 17) for j in range(1, 16 // i + 1)]
    assert sorted(set(grids), key=lambda g: g[0] * g[1]) != reference_candidate_grids(1, 16)
    assert candidate_grids(1, 16) == reference_candidate_grids(1, 16)


@pytest.mark.parametrize("width, height", [(1000, 10), (10, 1000), (640, 480), (333, 777), (4000, 3000)])
def test_chosen_grid_equals_the_reference(width, height):
    from minivl.preprocess import find_closest_aspect_ratio

    for max_num in (6, 12, 24, 40):
        expected = find_closest_aspect_ratio(width / height, reference_candidate_grids(1, max_num), width, height, 448)
        assert tuple(choose_grid(width, height, 1, max_num, 448)) == expected


@pytest.mark.parametrize("max_num", [MAX_TILES + 1, 1000, 100_000, 10**12])
def test_too_many_tiles_is_a_named_error_not_a_hang(max_num):
    # issue #16, example 6: --max-tiles 100000 never returned (O(max_num³) grids), 1000 took 12-16 s
    with pytest.raises(ConfigError) as info:
        dynamic_preprocess(Image.new("RGB", (64, 32)), max_num=max_num, image_size=28)
    message = str(info.value)
    assert f"max_num (the most tiles per image) is {max_num}" in message
    assert f"use at most {MAX_TILES}" in message


@pytest.mark.parametrize("min_num, max_num, fragment", [
    (1, 2.5, "max_num (a tile count) must be an int, got 2.5 of type float"),
    (1, True, "max_num (a tile count) must be an int, got True of type bool"),
    ("1", 4, "min_num (a tile count) must be an int, got '1' of type str"),
    (0, 4, "1 <= min_num <= max_num"),
    (1, 0, "1 <= min_num <= max_num"),
    (5, 4, "1 <= min_num <= max_num"),
    (1, -3, "1 <= min_num <= max_num"),
])
def test_bad_tile_counts(min_num, max_num, fragment):
    with pytest.raises(ConfigError) as info:
        load_image(Image.new("RGB", (30, 20)), min_num=min_num, max_num=max_num, image_size=28)
    assert fragment in str(info.value)
    assert "max_num=12" in str(info.value) or "must be an int" in str(info.value)


def test_numpy_integer_tile_counts_are_fine():
    assert candidate_grids(np.int64(1), np.int64(6)) == reference_candidate_grids(1, 6)
