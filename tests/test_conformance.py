"""docs/conformance/internvl_vectors.json: regenerated from the package and compared with the committed
file, and checked against straight transcriptions of InternVL's own code (not minivl's).

Tolerances: integers (grids, counts, index maps) exactly. Floats: 4 ulps of their dtype, because
NumPy's float32/float64 pow is SIMD code whose last bit differs between AVX2 and AVX-512 CPUs, and
the independent float64 formulas below use Python's `math` (another libm), which is within 1 ulp.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from _tools_util import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "docs", "conformance", "internvl_vectors.json")


@pytest.fixture(scope="module")
def tool():
    return load_tool("make_conformance")


@pytest.fixture(scope="module")
def vectors():
    with open(VECTORS, encoding="utf-8") as f:
        return json.load(f)


def test_committed_file_equals_what_the_package_computes(tool, vectors):
    found = tool.differences(vectors, json.loads(tool.render(tool.build())))
    assert not found, f"{len(found)} differences, first: {found[:3]}; rerun python tools/make_conformance.py"


def test_differences_catches_a_changed_grid_and_a_changed_float(tool, vectors):
    """The comparison the test above relies on is not blind: one changed int or a 1e-12 float shows."""
    edited = json.loads(json.dumps(vectors))
    edited["tiling"]["rows"][7][3] += 1
    edited["rope"][3]["inv_freq_float64"][5] *= 1 + 1e-12
    found = tool.differences(edited, vectors)
    assert len(found) == 2 and "rows[7][3]" in found[0] and "inv_freq_float64[5]" in found[1]


def test_coverage(vectors):
    tiling = vectors["tiling"]
    rows = tiling["rows"]
    assert len({(r[0], r[1]) for r in rows}) >= 500
    assert {r[2] for r in rows} >= {1, 6, 12}
    assert tiling["columns"][5:] == ["tiles_thumbnail_off", "image_tokens_thumbnail_off",
                                     "tiles_thumbnail_on", "image_tokens_thumbnail_on"]
    configs = sorted(os.listdir(os.path.join(ROOT, "tests", "fixtures", "configs")))
    assert {e["config"] for e in vectors["rope"]} == {c for c in configs if c.endswith(".json")}
    assert {m["input_shape"][2] for m in vectors["pixel_shuffle"]["maps"]} == {1, 2}


# ------------------------------------------------------------------ InternVL's tiling, transcribed
# internvl_chat/internvl/train/dataset.py (find_closest_aspect_ratio, dynamic_preprocess), copied
# line by line; only the image handling is dropped (the grid depends on the size alone).

def reference_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def reference_blocks(orig_width, orig_height, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    target_aspect_ratio = reference_find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    n_images = blocks
    if use_thumbnail and n_images != 1:
        n_images += 1
    return target_aspect_ratio, n_images


def test_every_tiling_row_matches_the_transcribed_reference(vectors):
    tiling = vectors["tiling"]
    per_tile = tiling["tokens_per_tile"]
    # InternVLChatModel.num_image_token = int((image_size // patch_size) ** 2 * (downsample_ratio ** 2))
    assert per_tile == int((448 // 14) ** 2 * (0.5 ** 2)) == 256
    for width, height, max_num, columns, rows, tiles_off, tokens_off, tiles_on, tokens_on in tiling["rows"]:
        grid, n_off = reference_blocks(width, height, 1, max_num, 448, use_thumbnail=False)
        _, n_on = reference_blocks(width, height, 1, max_num, 448, use_thumbnail=True)
        assert (columns, rows, tiles_off, tiles_on) == (*grid, n_off, n_on), (width, height, max_num)
        assert (tokens_off, tokens_on) == (n_off * per_tile, n_on * per_tile)


def test_transformers_got_ocr2_tiling_agrees_on_every_row(vectors):
    """transformers' InternVL image processor (GotOcr2's get_optimal_tiled_canvas): a second, independent
    implementation of the same rule; it orders same-count grids by width, not by set order, which
    decides no row here."""
    module = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
    for width, height, max_num, columns, rows, *_ in vectors["tiling"]["rows"]:
        assert tuple(module.get_optimal_tiled_canvas((height, width), (448, 448), 1, max_num)) == (columns, rows), \
            (width, height, max_num)


@pytest.mark.parametrize("size, max_num, expected", [
    # worked by hand from the rule "closest ratio; on a tie the later grid only if area > 0.5·448²·i·j"
    ((448, 448), 12, (1, 1, 1, 256, 1, 256)),       # the sglang bug made this 3×3 + thumbnail
    ((896, 896), 12, (2, 2, 4, 1024, 5, 1280)),     # area 802816 > 0.5·448²·4, not > 0.5·448²·9
    ((1344, 896), 12, (3, 2, 6, 1536, 7, 1792)),    # ratio 1.5 exactly; (6, 4) is over max_num
    ((1000, 500), 12, (2, 1, 2, 512, 3, 768)),      # (4, 2) ties but 500000 <= 0.5·448²·8
    ((448, 448), 1, (1, 1, 1, 256, 1, 256)),
    ((4000, 1), 12, (12, 1, 12, 3072, 13, 3328)),
])
def test_hand_worked_entries(vectors, size, max_num, expected):
    rows = {(r[0], r[1], r[2]): tuple(r[3:]) for r in vectors["tiling"]["rows"]}
    assert rows[(*size, max_num)] == expected


# ------------------------------------------------------------------ pixel shuffle, closed form

def test_shuffle_maps_match_the_closed_form(vectors):
    """v2: Z[r2, c2, dr·2C + dc·C + ch] = X[2r2 + dr, 2c2 + dc, ch]; v1: the same vector at Z[c2, r2]."""
    for entry in vectors["pixel_shuffle"]["maps"]:
        rows, cols, C = entry["input_shape"]
        expected_v2 = np.zeros((rows // 2, cols // 2, 4 * C), np.int64)
        for r2 in range(rows // 2):
            for c2 in range(cols // 2):
                for dr in range(2):
                    for dc in range(2):
                        for ch in range(C):
                            expected_v2[r2, c2, dr * 2 * C + dc * C + ch] = ((2 * r2 + dr) * cols + 2 * c2 + dc) * C + ch
        v2, v1 = entry["v2"], entry["v1"]
        assert v2["output_shape"] == list(expected_v2.shape) and v2["index"] == expected_v2.reshape(-1).tolist()
        expected_v1 = expected_v2.transpose(1, 0, 2)
        assert v1["output_shape"] == list(expected_v1.shape) and v1["index"] == expected_v1.reshape(-1).tolist()


# ------------------------------------------------------------------ RoPE, from the formulas

def test_rope_entries_match_the_formulas(vectors):
    """Default/dynamic: ω_j = 1/b'^(2j/d), b' = b·(f·L/M − (f−1))^(d/(d−2)) for L > M (InternLM2's
    remote code); su (Phi-3): ω_j = 1/(λ_j·b^(2j/d)), long λ past O, s = sqrt(1 + ln(M/O)/ln O)."""
    configs = os.path.join(ROOT, "tests", "fixtures", "configs")
    for e in vectors["rope"]:
        with open(os.path.join(configs, e["config"])) as f:
            llm = json.load(f)["llm_config"]
        d, b, M, L = e["head_dim"], float(llm["rope_theta"]), llm["max_position_embeddings"], e["seq_len"]
        assert d == llm["hidden_size"] // llm["num_attention_heads"]
        scaling = llm.get("rope_scaling")
        if scaling and scaling["type"] == "dynamic" and L is not None and L > M:
            f = scaling["factor"]
            base = b * ((f * L / M) - (f - 1)) ** (d / (d - 2))
        else:
            base = b
        lam, s = [1.0] * (d // 2), 1.0
        if scaling and scaling["type"] == "su":
            O = llm["original_max_position_embeddings"]
            lam = scaling["long_factor"] if L > O else scaling["short_factor"]
            s = math.sqrt(1 + math.log(M / O) / math.log(O))
        expected = [1.0 / (lam[j] * base ** (2 * j / d)) for j in range(d // 2)]
        assert e["base_used"] == pytest.approx(base, rel=4 * 2.2e-16), e["config"]
        assert e["attention_scaling"] == pytest.approx(s, rel=4 * 2.2e-16)
        np.testing.assert_allclose(e["inv_freq_float64"], expected, rtol=4 * 2.2e-16, atol=0)
        # the float32 table is the reference's float32 roundings: within 4 float32 ulps of the exact value
        np.testing.assert_allclose(e["inv_freq_float32"], expected, rtol=4 * 1.2e-7, atol=0)
