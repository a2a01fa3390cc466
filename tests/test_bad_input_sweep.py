"""A bad-input sweep of the command line and the loaders: each case here once ended in a traceback, a
wrong exit code, a silent NaN, a misleading message or a non-atomic write. Every failure must be ONE
line on stderr (not one `minivl:` line among NumPy's RuntimeWarnings) with a documented exit code."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from minivl.checkpoint import load_state_dict, save_checkpoint, write_safetensors
from minivl.errors import CheckpointError, ConfigError, ImageError
from minivl.tiny.internvl import write_tiny_internvl, write_tiny_tokenizer
from minivl.tiny.llm import tiny_llm_config, write_tiny_llm
from minivl.tiny.vision import write_tiny_vit
from minivl_cli.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def only_line(err: str) -> str:
    """stderr must be exactly one line (no RuntimeWarning lines around it)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("minivl: "), err
    return lines[0]


def with_tensors(src, dst, **changes) -> str:
    """A copy of checkpoint `src` at `dst` with some tensors replaced: {name: fn(array) -> array}."""
    shutil.copytree(src, dst)
    tensors = {name: np.array(t) for name, t in load_state_dict(dst).items()}
    for name, change in changes.items():
        tensors[name.replace("__", ".")] = change(tensors[name.replace("__", ".")])
    save_checkpoint(dst, None, tensors)
    return str(dst)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny llama checkpoint with a tokenizer, so chat and perplexity can use it."""
    path = write_tiny_llm(tmp_path_factory.mktemp("sweep") / "llama", "llama")
    write_tiny_tokenizer(path, llm="qwen2")
    return path


@pytest.fixture(scope="module")
def overflowing_dir(llama_dir, tmp_path_factory):
    """Finite weights whose attention scores overflow: the logits are NaN in both packages."""
    huge = lambda t: np.full_like(t, 1e18)  # noqa: E731
    return with_tensors(llama_dir, tmp_path_factory.mktemp("sweep") / "overflow",
                        model__layers__0__self_attn__q_proj__weight=huge,
                        model__layers__0__self_attn__k_proj__weight=huge)


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    return write_tiny_internvl(tmp_path_factory.mktemp("sweep") / "ivl", llm="qwen2", vision="300m", seed=3)


@pytest.fixture(scope="module")
def internvl_inf_dir(internvl_dir, tmp_path_factory):
    """Finite weights, but the final norm's output overflows to inf (the logits are NaN/inf)."""
    return with_tensors(internvl_dir, tmp_path_factory.mktemp("sweep") / "ivl_inf",
                        language_model__model__norm__weight=lambda t: np.full_like(t, 3e38))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return str(path)


# ------------------------------------------------------------------------- one line, whatever the message

def test_a_multi_line_checkpoint_error_is_one_stderr_line(capsys, llama_dir, tmp_path):
    # check_state_dict lists missing / mis-shaped tensors on lines of their own: the CLI joins them
    broken = with_tensors(llama_dir, tmp_path / "shape",
                          model__layers__0__self_attn__q_proj__weight=lambda t: np.zeros((3, 5), t.dtype))
    code, _, err = run_cli(capsys, "chat", "--model-dir", broken, "hi")
    assert code == 1
    line = only_line(err)
    assert "the checkpoint does not fit the model: 1 with the wrong shape tensors; wrong shape 1: " \
           "model.layers.0.self_attn.q_proj.weight (checkpoint (3, 5), model (64, 64)); fix: check" in line


def test_numpy_warnings_do_not_surround_the_one_line(capsys, overflowing_dir):
    # the overflow used to print four RuntimeWarning lines before the NonFiniteError line
    with warnings.catch_warnings(record=True) as passed_on:  # what main() lets through to Python's warnings
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "chat", "--model-dir", overflowing_dir, "hi", "--max-new-tokens", "2")
    assert code == 5
    assert "NonFiniteError: generate: the model's logits at step 0 are NaN/inf" in only_line(err)
    assert not [w for w in passed_on if issubclass(w.category, RuntimeWarning)]


def test_numpy_warnings_of_a_successful_run_are_one_warning_line(capsys, llama_dir, tmp_path):
    # embeddings of 3e38 overflow x·x inside RMSNorm; the outputs stay finite (zeros), the run succeeds
    big = with_tensors(llama_dir, tmp_path / "big",
                       model__embed_tokens__weight=lambda t: np.full_like(t, 3e38))
    code, out, err = run_cli(capsys, "parity", big)
    assert code == 0 and "all layers agree" in out
    line = only_line(err)
    assert line.startswith("minivl: warning: NumPy reported 'overflow encountered in multiply' (minivl/norms.py:")


# ------------------------------------------------------------------------- parity, trace, diff

def test_parity_of_nan_outputs_is_exit_5_not_a_traceback(capsys, overflowing_dir):
    # compare() refused a NaN tolerance scale with a ValueError traceback
    code, out, err = run_cli(capsys, "parity", overflowing_dir)
    assert code == 5 and out == ""
    line = only_line(err)
    assert "NonFiniteError: the block 0 output of minivl (NumPy) and torch_impl holds NaN/inf" in line


def test_parity_image_pipeline_does_not_call_inf_agreement(capsys, internvl_inf_dir):
    # inf in both packages compared as equal: "all 16 stages agree", exit 0
    code, _, err = run_cli(capsys, "parity", internvl_inf_dir)
    assert code == 5
    assert "NonFiniteError: minivl (NumPy) computed NaN/inf from stage language_model.model.norm" in only_line(err)


def test_trace_of_an_overflowing_model_is_written_and_exit_5(capsys, internvl_inf_dir, picture, tmp_path):
    out_file = tmp_path / "t.safetensors"
    code, out, err = run_cli(capsys, "trace", internvl_inf_dir, "--image", picture, "--out", out_file)
    assert code == 5 and out_file.is_file() and "wrote 16 stages" in out
    assert "from stage language_model.model.norm" in only_line(err)
    code, out, _ = run_cli(capsys, "diff", out_file, out_file)
    assert code == 0 and "note: A (" in out and "holds NaN/inf from stage language_model.model.norm" in out


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_parity_and_diff_refuse_a_bad_ulps(capsys, llama_dir, tmp_path, value):
    # --ulps nan was a ValueError traceback; --ulps -1 made every layer a DIFF
    code, _, err = run_cli(capsys, "parity", llama_dir, "--ulps", value)
    assert code == 1 and "ConfigError: --ulps must be a number in [0, 1e+06]" in only_line(err)
    code, _, err = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--ulps", value)
    assert code == 1 and "ConfigError: --ulps must be a number in [0, 1e+06]" in only_line(err)


def test_parity_names_its_max_num_option(capsys, internvl_dir):
    code, _, err = run_cli(capsys, "parity", internvl_dir, "--max-num", "0")
    assert code == 1 and "--max-num must be an integer in [1, 128] (got 0)" in only_line(err)


def test_trace_out_naming_a_directory_suggests_a_trace_file(capsys, internvl_dir, picture, tmp_path):
    code, _, err = run_cli(capsys, "trace", internvl_dir, "--image", picture, "--out", tmp_path)
    assert code == 3
    assert f"e.g. {tmp_path / 'trace.safetensors'}" in only_line(err)


# ------------------------------------------------------------------------- atomic writes, full disks

def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_picture_write_that_fails_keeps_the_previous_file(capsys, tmp_path, monkeypatch):
    # viz.save wrote straight into --out: a full disk left a truncated PNG in place of the old one
    target = tmp_path / "g.png"
    assert run_cli(capsys, "viz", "gqa", "--heads", "2", "--kv-heads", "1", "--out", target)[0] == 0
    before = target.read_bytes()
    monkeypatch.setattr("minivl.files.os.fsync", _disk_full)
    code, _, err = run_cli(capsys, "viz", "gqa", "--heads", "4", "--kv-heads", "2", "--out", target)
    assert code == 3
    line = only_line(err)
    assert f"OSError: cannot use '{target}': No space left on device; the disk is full" in line
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["g.png"]  # no temporary left behind
    Image.open(target).load()


def test_describe_image_writes_its_pictures_atomically(capsys, tmp_path, picture, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(capsys, "describe-image", picture, "--out", out, "--no-attention")[0] == 0
    before = (out / "tiles.png").read_bytes()
    monkeypatch.setattr("minivl.files.os.fsync", _disk_full)
    code, _, err = run_cli(capsys, "describe-image", picture, "--out", out, "--no-attention", "--max-num", "2")
    assert code == 3 and "tiles.png': No space left on device" in only_line(err)
    assert (out / "tiles.png").read_bytes() == before and os.listdir(out) == ["tiles.png"]


def test_write_text_atomic_names_the_file_of_a_failed_write(tmp_path, monkeypatch):
    from minivl.files import write_text_atomic

    target = tmp_path / "page.html"
    target.write_text("old")
    monkeypatch.setattr("minivl.files.os.fsync", _disk_full)
    with pytest.raises(OSError) as info:
        write_text_atomic(target, "new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["page.html"]


def test_write_safetensors_on_a_full_disk_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    # the package's SafetensorError ("I/O error: No space left on device (os error 28)") was a traceback
    from safetensors import SafetensorError

    import minivl.checkpoint

    target = tmp_path / "t.safetensors"
    write_safetensors(target, {"a": np.zeros(3, np.float32)})
    before = target.read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(minivl.checkpoint, "save_file", full)
    with pytest.raises(OSError) as info:
        write_safetensors(target, {"a": np.ones(3, np.float32)})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["t.safetensors"]


# ------------------------------------------------------------------------- describe-image and viz

def test_describe_image_reports_nothing_before_refusing_its_out(capsys, tmp_path, picture):
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli(capsys, "describe-image", picture, "--out", tmp_path / "file" / "x", "--no-attention")
    assert code == 3 and out == ""  # the tile report used to be printed, then the run failed
    assert "the directory cannot be created (Not a directory)" in only_line(err)


def test_viz_rope_with_no_types(capsys, tmp_path):
    code, _, err = run_cli(capsys, "viz", "rope", "--types", ",", "--out", tmp_path / "r.png")
    assert code == 1 and "ConfigError: --types names no RoPE type (got ',')" in only_line(err)
    assert not (tmp_path / "r.png").exists()


def test_float_image_with_nan_pixels_is_refused_not_black(tmp_path):
    # a float TIFF with one NaN pixel came out all black (min/max NaN), with a RuntimeWarning
    values = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    values[0, 0], values[1, 1] = np.nan, np.inf
    path = tmp_path / "f.tiff"
    Image.fromarray(values, "F").save(path)
    from minivl.preprocess import open_image, to_rgb

    with pytest.raises(ImageError, match=r"f\.tiff': the 'F' image has 1 NaN and 1 inf pixels \(of 600\)"):
        open_image(path)
    with pytest.raises(ImageError, match="numpy.nan_to_num"):
        to_rgb(Image.fromarray(values, "F"))
    values[0, 0] = values[1, 1] = 0.5  # finite float images still scale as before
    assert np.asarray(to_rgb(Image.fromarray(values, "F"))).max() > 0


# ------------------------------------------------------------------------- chat

def test_a_temperature_too_small_to_divide_by(capsys):
    # 1e-320: logits / temperature overflowed to inf, the softmax was NaN, the answer silently empty
    code, out, err = run_cli(capsys, "chat", "--temperature", "1e-320", "hi")
    assert code == 1 and out == ""
    assert "--temperature 9.99989e-321 is too small to sample with" in only_line(err)
    assert "use 0 for greedy decoding" in only_line(err)


def test_interactive_nan_answers_set_exit_5_and_name_the_checkpoint(capsys, overflowing_dir, monkeypatch):
    # the conversation went on and ended with exit 0; its header said SmolLM2 for any --model-dir
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n"))
    code, _, err = run_cli(capsys, "chat", "--model-dir", overflowing_dir, "--max-new-tokens", "2")
    assert code == 5
    assert f"minivl chat: checkpoint {overflowing_dir}." in err
    assert err.count("minivl: NonFiniteError: generate: the model's logits at step 0 are NaN/inf") == 2
    assert "RuntimeWarning" not in err and "minivl: warning:" not in err


def test_chat_with_a_bare_vit(capsys, tmp_path):
    vit = write_tiny_vit(tmp_path / "vit")
    write_tiny_tokenizer(vit)
    code, _, err = run_cli(capsys, "chat", "--model-dir", vit, "hi")  # was an AttributeError traceback
    assert code == 1 and "is a bare vision encoder ('intern_vit_6b'): it has no language model" in only_line(err)
    code, _, err = run_cli(capsys, "chat", "--model-dir", vit, "--image", "x.png", "hi")
    assert code == 1 and "is a bare vision encoder ('intern_vit_6b'), with no language model" in only_line(err)


def test_missing_tokenizer_is_found_before_the_weights_load(capsys, tmp_path, monkeypatch):
    import minivl.loading

    path = write_tiny_llm(tmp_path / "llama", "llama")
    monkeypatch.setattr(minivl.loading, "load_model", lambda *a, **k: pytest.fail("weights loaded first"))
    code, _, err = run_cli(capsys, "chat", "--model-dir", path, "hi")
    assert code == 1 and "has no tokenizer" in only_line(err)


def test_damaged_default_cache_says_how_to_rebuild_it(capsys, llama_dir, tmp_path, monkeypatch):
    import minivl.weights.smollm2 as smollm2

    cache = tmp_path / "smollm2"
    shutil.copytree(llama_dir, cache)
    text = (cache / "config.json").read_text()
    (cache / "config.json").write_text("#" + text[1:])  # same size: the manifest's size check cannot see it
    monkeypatch.setattr(smollm2, "ensure_smollm2", lambda *a, **k: cache)
    code, _, err = run_cli(capsys, "chat", "hi")
    assert code == 1
    line = only_line(err)
    assert f"{cache / 'config.json'} is not valid JSON" in line
    assert "`minivl convert smollm2 --force` rebuilds it" in line
    # a bad option is not the cache's fault: no rebuild hint
    shutil.rmtree(cache)
    shutil.copytree(llama_dir, cache)
    code, _, err = run_cli(capsys, "chat", "--dtype", "float16", "hi")
    assert code == 1 and "convert smollm2" not in only_line(err)


# ------------------------------------------------------------------------- perplexity

def test_perplexity_says_why_the_path_is_not_a_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "perplexity", tmp_path)
    assert code == 1 and "is not a file: it is a directory" in only_line(err)
    code, _, err = run_cli(capsys, "perplexity", tmp_path / "missing.txt")
    assert code == 1 and "is not a file: it does not exist" in only_line(err)


def test_perplexity_context_1_names_the_option(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("hello world")
    code, _, err = run_cli(capsys, "perplexity", tmp_path / "t.txt", "--context", "1")
    assert code == 1 and "--context must be at least 2 tokens (got 1)" in only_line(err)


def test_perplexity_of_one_token_names_the_file(capsys, llama_dir, tmp_path):
    (tmp_path / "t.txt").write_text("a")
    code, _, err = run_cli(capsys, "perplexity", tmp_path / "t.txt", "--model-dir", llama_dir)
    assert code == 1 and f"{tmp_path / 't.txt'} encodes to 1 token; perplexity needs at least 2" in only_line(err)


def test_perplexity_read_error_names_the_file(capsys, tmp_path, monkeypatch):
    import pathlib

    (tmp_path / "t.txt").write_text("hello")

    def unreadable(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")  # what reading /proc/self/mem gives: no filename

    monkeypatch.setattr(pathlib.Path, "read_text", unreadable)
    code, _, err = run_cli(capsys, "perplexity", tmp_path / "t.txt")
    assert code == 3 and f"OSError: cannot use '{tmp_path / 't.txt'}': Input/output error" in only_line(err)


def test_perplexity_of_an_internvl_checkpoint(capsys, internvl_dir, tmp_path):
    # InternVLChatModel.forward() needs pixel_values: a TypeError traceback
    (tmp_path / "t.txt").write_text("hello world")
    code, _, err = run_cli(capsys, "perplexity", tmp_path / "t.txt", "--model-dir", internvl_dir)
    assert code == 1 and "is an 'internvl_chat' checkpoint; perplexity scores a text-only" in only_line(err)


# ------------------------------------------------------------------------- the conversion cache

def _cache_with_manifest(tmp_path, monkeypatch, manifest) -> str:
    monkeypatch.setenv("MINIVL_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "cache" / "smollm2-135m-instruct"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.mark.parametrize("manifest", [
    {"files": 3},
    {"files": {name: 5 for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                    "generation_config.json")}},
])
def test_convert_status_with_a_manifest_that_is_not_one(capsys, tmp_path, monkeypatch, manifest):
    # valid JSON, wrong structure: a TypeError / AttributeError traceback from every command
    _cache_with_manifest(tmp_path, monkeypatch, manifest)
    code, out, err = run_cli(capsys, "convert", "status")
    assert code == 0, err
    assert "smollm2: damaged: manifest.json is not a manifest minivl wrote" in out
    assert "`minivl convert smollm2` converts it again" in out


def test_convert_replaces_a_copy_whose_manifest_is_not_one(capsys, tmp_path, monkeypatch):
    import minivl.weights.smollm2 as smollm2

    directory = _cache_with_manifest(tmp_path, monkeypatch, {"files": 3})
    calls = []
    monkeypatch.setattr(smollm2, "convert_gguf", lambda gguf, out, **kw: calls.append((out, kw)) or out)
    code, out, err = run_cli(capsys, "convert", "smollm2")
    assert code == 0, err
    assert "is damaged: manifest.json is not a manifest minivl wrote" in out
    assert calls and os.fspath(calls[0][0]) == os.fspath(directory) and calls[0][1]["overwrite"]


@pytest.mark.parametrize("manifest", [{"files": 3}, {"files": {"config.json": 5}}, {"files": ["config.json"]}])
def test_first_use_paths_see_a_malformed_manifest_as_damage(tmp_path, manifest):
    """verify() itself, which chat, perplexity, describe-image and viz reach through ensure_smollm2 /
    dinov2_checkpoint: a manifest of another shape is damage (so the copy is converted again), not a
    TypeError."""
    from minivl.weights.manifest import verify

    directory = tmp_path / "copy"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    problem = verify(directory, ("config.json",))
    assert problem.startswith("damaged: manifest.json is not a manifest minivl wrote"), problem


# ------------------------------------------------------------------------- configs and load_model

@pytest.mark.parametrize("family, override, fragment", [
    ("llama", {"rms_norm_eps": float("nan")}, "rms_norm_eps must be a number > 0 (got nan"),
    ("llama", {"rope_theta": float("inf")}, "rope_theta must be a number > 0 (got inf"),
    ("qwen2", {"rope_scaling": {"type": "linear", "factor": float("nan")}}, "rope_scaling.factor must be"),
    ("internlm2", {"rope_scaling": {"type": "dynamic", "factor": float("inf")}},
     "rope_scaling.factor must be a float >= 1.0 (got inf"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": float("nan"),
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     "rope_scaling.low_freq_factor must be a finite number (got nan"),
])
def test_config_refuses_nan_and_inf_numbers(family, override, fragment):
    # NaN passed every `value <= 0` check: a NaN rms_norm_eps loaded and failed only at the first forward
    from minivl.config import load_config

    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_config(tiny_llm_config(family, **override))


def test_nan_in_config_json_is_refused_at_load(llama_dir, tmp_path):
    import minivl

    broken = tmp_path / "nan"
    shutil.copytree(llama_dir, broken)
    text = (broken / "config.json").read_text()
    assert '"rms_norm_eps": 1e-05' in text
    (broken / "config.json").write_text(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'))
    with pytest.raises(ConfigError, match="config.json: LlamaConfig: rms_norm_eps must be a number > 0"):
        minivl.load_model(broken)


@pytest.mark.parametrize("dtype", [3, None, "int8", "float16"])
def test_load_model_refuses_a_bad_dtype_before_reading(dtype, tmp_path):
    import minivl

    # dtype=3 was NumPy's TypeError; None silently meant float64. No file is read first:
    with pytest.raises(ConfigError, match="NumPy models compute in float32 or float64"):
        minivl.load_model(tmp_path / "not-even-there", dtype=dtype)


def test_defaulted_size_fields_are_named_in_the_shape_error(llama_dir, tmp_path):
    import minivl

    broken = tmp_path / "nosizes"
    shutil.copytree(llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["hidden_size"], config["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        minivl.load_model(broken)
    assert "does not set hidden_size (4096), num_hidden_layers (32), so the class defaults shown were used" \
        in str(info.value)


@pytest.mark.parametrize("name, error, message", [
    ("config.json", ConfigError, "config.json: is a directory or other non-file, not a config file"),
    ("model.safetensors", CheckpointError, "model.safetensors is a directory or other non-file"),
])
def test_config_json_or_weights_that_are_directories(llama_dir, tmp_path, name, error, message):
    import minivl

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    os.remove(broken / name)
    os.mkdir(broken / name)
    with pytest.raises(error, match=message):
        minivl.load_model(broken)


# ------------------------------------------------------------------------- the generation API

@pytest.mark.parametrize("package", ["minivl", "torch_impl"])
@pytest.mark.parametrize("temperature", [1e-320, 1e-30, 5e-5])
def test_generate_refuses_a_temperature_too_small_to_sample_with(package, temperature):
    """The Python API, not only the CLI: logits / 1e-320 is inf in float64 and the softmax NaN, a
    sampled 'token' out of NaN probabilities; the check runs before the model is touched."""
    import importlib

    from minivl.errors import GenerationError
    from minivl.generate import MIN_TEMPERATURE

    if package == "torch_impl":
        pytest.importorskip("torch")
    generate = importlib.import_module(f"{package}.generate").generate
    with pytest.raises(GenerationError, match=f"too small to sample with .* >= {MIN_TEMPERATURE:g}"):
        generate(object(), input_ids=np.zeros((1, 2), np.int64), max_new_tokens=2, do_sample=True,
                 temperature=temperature)


def test_atomic_writes_go_straight_into_a_device_and_keep_it_one(tmp_path):
    """viz.save(fig, '/dev/null') (the viz tests' own call): the rename that makes a write atomic
    would put a regular file where the device node was; a device is written into instead."""
    import stat

    import matplotlib.pyplot as plt

    from minivl import viz
    from minivl.files import write_bytes_atomic, write_text_atomic

    before = os.stat("/dev/null")
    write_text_atomic("/dev/null", "nothing")
    write_bytes_atomic("/dev/null", b"nothing")
    viz.save(plt.figure(), "/dev/null")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert not [name for name in os.listdir("/dev") if name.startswith(".null.")]  # no temporary left
    picture = viz.save(plt.figure(), tmp_path / "figure.svg")  # the suffix picks the format, as savefig's did
    assert open(picture, "rb").read().lstrip().startswith((b"<?xml", b"<svg"))


def test_max_tiles_without_an_image_is_named_not_dropped(capsys):
    """--max-tiles sizes an image's tile grid; with no --image it used to be ignored in silence."""
    code, _, err = run_cli(capsys, "chat", "--max-tiles", "4", "hi")
    assert code == 1 and "--max-tiles 4 only applies to the tiles of an --image" in only_line(err)


def test_one_tile_is_one_tile(capsys, internvl_dir, picture):
    code, _, err = run_cli(capsys, "chat", "--model-dir", internvl_dir, "--image", picture, "--max-tiles", "1",
                           "--max-new-tokens", "1", "hi")
    assert code == 0, err
    assert "= 1 tile of " in err and "1 tiles" not in err
