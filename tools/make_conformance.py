"""Write docs/conformance/internvl_vectors.json: numbers another InternVL implementation must reproduce.

    python tools/make_conformance.py            # rewrite the file
    python tools/make_conformance.py --check    # exit 1 if the committed file differs from the package

Three sections, all computed by the minivl package (docs/conformance.md explains every field):

* `tiling`: the tile grid `dynamic_preprocess` picks and the image-token count, for every image size
  in SIZES × every max_num in MAX_NUMS, with the thumbnail off and on;
* `pixel_shuffle`: for a few feature grids, which input element lands at each output position, for
  ps_version v1 and v2 (an index map: output.flat[k] = input.flat[index[k]]);
* `rope`: inv_freq (float64 and float32) and the attention scaling of the LLM RoPE of every InternVL
  release config in tests/fixtures/configs, at the sequence lengths where the recipe changes.

`tests/test_conformance.py` regenerates the vectors and compares them with the committed file, and
checks them against a straight transcription of InternVL's own tiling code.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from minivl.config import load_config  # noqa: E402
from minivl.pixel_shuffle import num_image_token, pixel_shuffle  # noqa: E402
from minivl.preprocess import choose_grid  # noqa: E402
from minivl.rope import rope_init, rope_parameters  # noqa: E402
from minivl.files import write_text_atomic  # noqa: E402

OUT = os.path.join(ROOT, "docs", "conformance", "internvl_vectors.json")
CONFIG_DIR = os.path.join(ROOT, "tests", "fixtures", "configs")

# Edge lengths in pixels: tiny images, the tile side 448 and its multiples ±1 (where the grid flips),
# the common photo/screen sizes, and extreme panoramas. Every (width, height) pair is used.
EDGES = (1, 14, 100, 223, 224, 225, 300, 447, 448, 449, 500, 640, 672, 720, 800, 895, 896, 897,
         1000, 1024, 1080, 1280, 1344, 1920, 2048, 4000)
# Extra sizes known to have tripped ports (port-pitfalls.md #1): ties between two grids' ratios.
TIE_SIZES = ((672, 448), (448, 672), (1344, 896), (896, 1344), (1120, 448), (1000, 500), (1500, 1000),
             (2688, 448), (448, 2688), (5000, 100))
# 1 = no tiling; 6 = InternVL 1.5 / older configs; 12 = every InternVL 2 / 2.5 release; 24, 40 = long documents
MAX_NUMS = (1, 6, 12, 24, 40)
IMAGE_SIZE, PATCH_SIZE, DOWNSAMPLE_RATIO = 448, 14, 0.5

# Feature grids [rows, cols, channels] for the pixel-shuffle maps: a tiny square one with 2 channels
# (shows the channel packing), a non-square one (shows v1's transposed grid), the real 32×32 tile.
SHUFFLE_GRIDS = ((4, 4, 2), (4, 6, 1), (32, 32, 1))


def tiling_rows() -> list[list[int]]:
    """[width, height, max_num, columns, rows, tiles_off, tokens_off, tiles_on, tokens_on] per case."""
    tokens_per_tile = num_image_token(IMAGE_SIZE, PATCH_SIZE, DOWNSAMPLE_RATIO)
    sizes = [(w, h) for w in EDGES for h in EDGES] + list(TIE_SIZES)
    rows = []
    for width, height in sizes:
        for max_num in MAX_NUMS:
            columns, grid_rows = choose_grid(width, height, 1, max_num, IMAGE_SIZE)
            tiles_off = columns * grid_rows
            # the thumbnail is appended only when there is more than one tile
            tiles_on = tiles_off + (1 if tiles_off > 1 else 0)
            rows.append([width, height, max_num, columns, grid_rows, tiles_off, tiles_off * tokens_per_tile,
                         tiles_on, tiles_on * tokens_per_tile])
    return rows


def shuffle_maps() -> list[dict]:
    maps = []
    for rows, cols, channels in SHUFFLE_GRIDS:
        index = np.arange(rows * cols * channels, dtype=np.int64).reshape(1, rows, cols, channels)
        entry = {"input_shape": [rows, cols, channels]}
        for version in ("v1", "v2"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # v1's "transposed image" warning is the point here
                out = pixel_shuffle(index, DOWNSAMPLE_RATIO, version)[0]
            entry[version] = {"output_shape": list(out.shape), "index": out.reshape(-1).tolist()}
        maps.append(entry)
    return maps


def rope_seq_lens(kwargs: dict) -> list[int | None]:
    """Sequence lengths at which this recipe's frequencies differ: none, or either side of the switch."""
    M = kwargs["max_position_embeddings"]
    if kwargs["rope_type"] == "dynamic":
        return [None, M, M + 1, 2 * M]                # the base grows only past M
    if kwargs["rope_type"] in ("su", "phi3_yarn", "longrope"):
        O = kwargs.get("original_max_position_embeddings", M)
        return [O, O + 1, M]                            # short factors up to O, long ones past it
    return [None]


def rope_entries() -> list[dict]:
    entries = []
    for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.json"))):
        llm = load_config(path).llm_config
        kwargs = llm.rope_kwargs()
        for seq_len in rope_seq_lens(kwargs):
            resolved = rope_parameters(seq_len=seq_len, **kwargs)
            inv64, scaling = rope_init(seq_len=seq_len, dtype=np.float64, **kwargs)
            inv32, _ = rope_init(seq_len=seq_len, dtype=np.float32, **kwargs)
            entries.append({
                "config": os.path.basename(path), "llm": type(llm).__name__, "rope_type": kwargs["rope_type"],
                "head_dim": kwargs["head_dim"], "rope_theta": float(kwargs["rope_theta"]),
                "max_position_embeddings": kwargs["max_position_embeddings"], "seq_len": seq_len,
                "base_used": resolved.rope_theta, "attention_scaling": scaling,
                "inv_freq_float64": [float(v) for v in inv64], "inv_freq_float32": [float(v) for v in inv32],
            })
    return entries


def build() -> dict:
    return {
        "about": "InternVL conformance vectors computed by minivl; see docs/conformance.md",
        "tiling": {
            "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "downsample_ratio": DOWNSAMPLE_RATIO,
            "min_num": 1, "tokens_per_tile": num_image_token(IMAGE_SIZE, PATCH_SIZE, DOWNSAMPLE_RATIO),
            "columns": ["width", "height", "max_num", "grid_columns", "grid_rows", "tiles_thumbnail_off",
                        "image_tokens_thumbnail_off", "tiles_thumbnail_on", "image_tokens_thumbnail_on"],
            "rows": tiling_rows(),
        },
        "pixel_shuffle": {"downsample_ratio": DOWNSAMPLE_RATIO, "maps": shuffle_maps()},
        "rope": rope_entries(),
    }


def render(vectors: dict) -> str:
    """JSON with one tiling row per line and one RoPE entry per line, so a diff shows what changed."""
    tiling = dict(vectors["tiling"])
    rows = tiling.pop("rows")
    head = json.dumps(tiling, indent=None)[:-1]
    lines = ["{", f' "about": {json.dumps(vectors["about"])},', f' "tiling": {head}, "rows": [']
    lines += [f"  {json.dumps(row)}," for row in rows[:-1]] + [f"  {json.dumps(rows[-1])}", " ]},"]
    lines.append(f' "pixel_shuffle": {json.dumps(vectors["pixel_shuffle"])},')
    lines.append(' "rope": [')
    lines += [f"  {json.dumps(e)}," for e in vectors["rope"][:-1]] + [f"  {json.dumps(vectors['rope'][-1])}", " ]"]
    lines.append("}")
    return "\n".join(lines) + "\n"


# Floats may differ in the last bits between CPUs (NumPy's SIMD pow on AVX-512 vs AVX2): 4 ulps of
# the field's dtype; every integer (grid, count, index, length) must match exactly.
FLOAT_ULPS = 4


def differences(committed, fresh, where: str = "") -> list[str]:
    """Where two vector files disagree: exact for ints/strings, FLOAT_ULPS ulps for floats."""
    if isinstance(committed, dict) and isinstance(fresh, dict):
        if committed.keys() != fresh.keys():
            return [f"{where or 'top level'}: keys {sorted(committed)} vs {sorted(fresh)}"]
        return [d for k in committed for d in differences(committed[k], fresh[k], f"{where}.{k}")]
    if isinstance(committed, list) and isinstance(fresh, list):
        if len(committed) != len(fresh):
            return [f"{where}: {len(committed)} entries committed, {len(fresh)} computed"]
        return [d for i, (a, b) in enumerate(zip(committed, fresh)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(committed, float) or isinstance(fresh, float):
        eps = float(np.finfo(np.float32 if "float32" in where else np.float64).eps)
        if isinstance(committed, (int, float)) and isinstance(fresh, (int, float)) and \
                abs(committed - fresh) <= FLOAT_ULPS * eps * abs(fresh):
            return []
    elif committed == fresh and type(committed) is type(fresh):
        return []
    return [f"{where}: committed {committed!r}, computed {fresh!r}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = parser.parse_args(argv)
    vectors = build()
    if args.check:
        with open(OUT, encoding="utf-8") as f:
            found = differences(json.load(f), json.loads(render(vectors)))
        print("conformance vectors are up to date" if not found else
              f"{OUT} differs from the package in {len(found)} places, first {found[0]}; rerun the tool")
        return 1 if found else 0
    write_text_atomic(OUT, render(vectors))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
