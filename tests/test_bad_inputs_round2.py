"""A second bad-input sweep, of the command line and the Python API: each case here ended in a
traceback, a silent wrong result, a misleading message or a wrong exit code before the fix it tests.

CLI failures must be ONE `minivl:` line on stderr with the documented exit code (minivl_cli/cli.py,
EXIT_CODES); API failures a named minivl error (minivl/errors.py) that says what to fix.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import minivl
from minivl.checkpoint import load_state_dict, save_checkpoint, write_safetensors
from minivl.errors import (CheckpointError, ConfigError, DeviceError, GenerationError, MinivlError, NonFiniteError,
                           TraceError)
from minivl.tiny.internvl import write_tiny_internvl, write_tiny_tokenizer
from minivl.tiny.llm import write_tiny_llm
from minivl_cli.cli import main

NOT_UTF8 = "caf\udce9"  # the bytes b"caf\xe9" (Latin-1) as Python hands them over from argv or stdin


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minivl: "), err
    return code, lines[0]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny llama checkpoint with a tokenizer (chat, parity, trace, explore can all use it)."""
    path = write_tiny_llm(tmp_path_factory.mktemp("round2") / "llama", "llama")
    write_tiny_tokenizer(path, llm="qwen2")
    return path


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    return write_tiny_internvl(tmp_path_factory.mktemp("round2") / "ivl", llm="qwen2", vision="300m", seed=3)


# ------------------------------------------------------------------------------- text that is not UTF-8

@pytest.mark.parametrize("argv", [
    ("chat", "--model-dir", "{llama}", NOT_UTF8),
    ("chat", "--model-dir", "{llama}", "--system", NOT_UTF8, "hi"),
    ("parity", "{llama}", "--prompt", NOT_UTF8),
    ("trace", "{llama}", "--prompt", NOT_UTF8, "--out", "{tmp}/t.safetensors"),
    ("viz", "explore", "--model-dir", "{llama}", "--text", NOT_UTF8, "--out", "{tmp}/e.html"),
], ids=["chat", "chat-system", "parity", "trace", "explore"])
def test_text_that_is_not_utf8_is_one_line(capsys, llama_dir, tmp_path, argv):
    # tokenizers raised "TypeError: TextInputSequence must be str" with a traceback, exit 1
    argv = [a.format(llama=llama_dir, tmp=tmp_path) for a in argv]
    code, line = run_cli(capsys, *argv)
    assert code == 1
    assert "is not valid UTF-8 (it holds the byte 0xe9); pass UTF-8 text" in line
    assert not os.path.exists(tmp_path / "t.safetensors") and not os.path.exists(tmp_path / "e.html")


def test_tokenizers_refuse_lone_surrogates_by_name(llama_dir, tmp_path):
    from minivl.tiny.sentencepiece import write_internlm2_tokenizer
    from minivl.tokenizer import load_tokenizer

    for tokenizer in (load_tokenizer(llama_dir),  # tokenizers, and InternLM2's SentencePiece
                      load_tokenizer(write_internlm2_tokenizer(tmp_path / "sp"))):
        with pytest.raises(GenerationError, match="the text to tokenize is not valid UTF-8"):
            tokenizer.encode("a" + NOT_UTF8)
        assert tokenizer.encode("café") == tokenizer.encode("café")  # real UTF-8 still encodes


# ------------------------------------------------------------------------------- tokenizer_config.json

@pytest.mark.parametrize("settings, field", [
    ([1], "the file"),
    ({"chat_template": 3}, "chat_template"),
    ({"eos_token": 5}, "eos_token"),
    ({"eos_token": ["<|im_end|>"]}, "eos_token"),
    ({"pad_token": {"content": 3}}, "pad_token"),
    ({"add_bos_token": "no"}, "add_bos_token"),
    ({"added_tokens_decoder": {"x": {"content": "a"}}}, "added_tokens_decoder"),
    ({"additional_special_tokens": "<a>"}, "additional_special_tokens"),
])
def test_tokenizer_config_fields_of_the_wrong_type_are_named(capsys, llama_dir, tmp_path, settings, field):
    # each was an AttributeError or TypeError traceback from load_tokenizer
    from minivl.tokenizer import load_tokenizer

    broken = shutil.copytree(llama_dir, tmp_path / "tc")
    (broken / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=f"tokenizer_config.json: {field} is "):
        load_tokenizer(broken)
    code, line = run_cli(capsys, "chat", "--model-dir", broken, "hi")
    assert code == 1 and f"{field} is " in line and "Fix or re-download" in line


def test_tokenizer_config_nulls_are_absent_fields(llama_dir, tmp_path):
    from minivl.tokenizer import load_tokenizer

    fine = shutil.copytree(llama_dir, tmp_path / "tc")
    settings = json.loads((fine / "tokenizer_config.json").read_text())
    settings.update(pad_token=None, add_bos_token=None, chat_template=None, added_tokens_decoder=None)
    (fine / "tokenizer_config.json").write_text(json.dumps(settings))
    assert load_tokenizer(fine).encode("hi") == load_tokenizer(llama_dir).encode("hi")


def test_a_config_nested_past_pythons_recursion_limit_is_a_config_error(capsys, llama_dir, tmp_path):
    deep = shutil.copytree(llama_dir, tmp_path / "deep")
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    for command in (("chat", "--model-dir", deep, "hi"), ("parity", deep)):
        code, line = run_cli(capsys, *command)
        assert code == 1 and "nested too deeply" in line, line
    with pytest.raises(ConfigError, match="nested too deeply"):
        minivl.load_model(deep)


# ------------------------------------------------------------------------------- command-line options

@pytest.mark.parametrize("layers", ["", ",", " , "])
def test_explore_layers_that_name_no_layer(capsys, llama_dir, tmp_path, layers):
    # an IndexError traceback
    code, line = run_cli(capsys, "viz", "explore", "--model-dir", llama_dir, "--text", "hi", "--layers", layers,
                         "--out", tmp_path / "e.html")
    assert code == 1 and "--layers names no layer" in line


def test_a_closed_stdout_is_an_os_error_not_a_traceback(capsys, monkeypatch, llama_dir):
    import sys

    monkeypatch.setattr(sys, "stdout", None)  # what `minivl chat hi >&-` starts with
    code = main(["chat", "--model-dir", llama_dir, "--max-new-tokens", "2", "hi"])
    err = capsys.readouterr().err
    assert code == 3 and "the standard output is closed" in err and "Traceback" not in err


@pytest.mark.parametrize("value, message", [
    ("/no/such/dir", "--model-dir /no/such/dir: no such directory"),
    ("", "--model-dir is empty"),
    ("{file}", "is a file, not a checkpoint directory"),
])
@pytest.mark.parametrize("command", ["chat", "perplexity", "explore"])
def test_model_dir_that_is_not_a_directory(capsys, tmp_path, value, message, command):
    # chat/perplexity said "has no tokenizer ... copy the tokenizer files"; an empty value used SmolLM2
    text = tmp_path / "t.txt"
    text.write_text("some text to score")
    value = value.format(file=text)
    argv = {"chat": ("chat", "--model-dir", value, "hi"),
            "perplexity": ("perplexity", "--model-dir", value, text),
            "explore": ("viz", "explore", "--model-dir", value, "--text", "hi", "--out", tmp_path / "e.html")}[command]
    code, line = run_cli(capsys, *argv)
    assert code == 1 and message in line


@pytest.mark.parametrize("name", ["rope.jpg", "rope.pdf", "rope.txt"])
def test_a_picture_is_not_written_under_another_formats_suffix(capsys, tmp_path, name):
    # PNG bytes were written as rope.jpg, exit 0
    code, line = run_cli(capsys, "viz", "rope", "--out", tmp_path / name)
    assert code == 1 and "writes a PNG picture" in line and "rope.png" in line
    assert not os.listdir(tmp_path)


def test_empty_output_names_are_named(capsys, llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, line = run_cli(capsys, "viz", "rope", "--out", "")
    assert code == 1 and "--out is empty" in line
    code, line = run_cli(capsys, "trace", llama_dir, "--ids", "1,2", "--out", "")
    assert code == 1 and "--out is empty" in line  # was a FileNotFoundError naming a staging path
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("attn", ["flash", "triton"])
def test_an_attention_backend_this_machine_lacks_exits_4(capsys, llama_dir, attn):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: both backends may run here")
    import torch_impl.triton_attention as triton_module

    if attn == "triton" and triton_module.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 was set for this process: triton legitimately runs on the CPU")
    code, line = run_cli(capsys, "parity", llama_dir, "--attn", attn)
    assert code == 4 and "DeviceError" in line and "CUDA" in line  # was exit 1, a ShapeError / ConfigError


def test_diff_against_a_directory_says_so(capsys, tmp_path):
    code, line = run_cli(capsys, "diff", tmp_path, tmp_path)
    assert code == 1 and "is a directory" in line
    with pytest.raises(TraceError, match="is a directory"):
        minivl.trace.load_trace(tmp_path)


def test_help_does_not_promise_exit_5_for_non_finite_weights():
    from minivl_cli.cli import EXIT_CODES

    # such a checkpoint is refused at load, a CheckpointError (exit 1): tests/test_bad_input_sweep.py
    assert "weights or inputs are not finite" not in EXIT_CODES[5] and "refused at load" in EXIT_CODES[5]


# ------------------------------------------------------------------------------- loaders

def test_public_loaders_take_allow_nonfinite(llama_dir, tmp_path):
    # the CheckpointError says "pass allow_nonfinite=True", which minivl.load_model refused (TypeError)
    broken = shutil.copytree(llama_dir, tmp_path / "inf")
    tensors = {name: np.array(t) for name, t in load_state_dict(broken).items()}
    tensors["model.norm.weight"][0] = np.inf
    save_checkpoint(broken, None, tensors)
    with pytest.raises(CheckpointError, match="allow_nonfinite=True"):
        minivl.load_model(broken)
    model = minivl.load_model(broken, allow_nonfinite=True)
    assert np.isinf(model.model.norm.weight[0])
    torch_impl = pytest.importorskip("torch_impl")
    with pytest.raises(CheckpointError, match="allow_nonfinite=True"):
        torch_impl.load_model(broken)
    assert bool(torch_impl.load_model(broken, allow_nonfinite=True).model.norm.weight[0].isinf())


@pytest.mark.parametrize("device, message", [
    ("bogus", "is not a device torch knows"),
    ("xpu", "torch_impl runs on cpu and cuda"),
])
def test_torch_devices_it_cannot_use_are_device_errors(llama_dir, device, message):
    torch_impl = pytest.importorskip("torch_impl")
    with pytest.raises(DeviceError, match=message):  # was a raw RuntimeError from torch
        torch_impl.load_model(llama_dir, device=device)


def test_cuda_on_a_cpu_only_torch_is_a_device_error(llama_dir, monkeypatch):
    torch = pytest.importorskip("torch")
    import torch_impl

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="this torch is a CPU-only build; use device='cpu'"):
        torch_impl.load_model(llama_dir, device="cuda")  # was torch's AssertionError


# ------------------------------------------------------------------------------- generate and perplexity

def _generators():
    from minivl.generate import generate as numpy_generate

    yield "numpy", minivl.load_model, numpy_generate, np.asarray
    torch = pytest.importorskip("torch")
    import torch_impl
    from torch_impl.generate import generate as torch_generate

    yield "torch", torch_impl.load_model, torch_generate, torch.as_tensor


@pytest.mark.parametrize("pad", [-1, 10**6, "x", 1.5, 10**30])
def test_generate_checks_pad_token_id(llama_dir, pad):
    # a misleading "token ids must be in [0, vocab)" mid-generation, a raw ValueError/TypeError/OverflowError,
    # or 1.5 silently taken as 1
    for name, load, generate, as_array in _generators():
        model = load(llama_dir)
        with pytest.raises(GenerationError, match="pad_token_id must be None or a token id"):
            generate(model, input_ids=as_array([[1, 2, 3]]), max_new_tokens=3, eos_token_id=[0, 1, 2, 3],
                     pad_token_id=pad)


def test_generate_refuses_do_sample_strings_and_infinite_temperature(llama_dir):
    for name, load, generate, as_array in _generators():
        model = load(llama_dir)
        with pytest.raises(GenerationError, match="do_sample must be True or False"):
            generate(model, input_ids=as_array([[1, 2]]), max_new_tokens=2, do_sample="no")  # sampled before
        with pytest.raises(GenerationError, match="temperature must be finite"):
            generate(model, input_ids=as_array([[1, 2]]), max_new_tokens=2, do_sample=True, temperature=float("inf"))


def test_torch_generate_takes_a_numpy_integer_seed(llama_dir):
    torch = pytest.importorskip("torch")
    import torch_impl
    from torch_impl.generate import generate

    model = torch_impl.load_model(llama_dir)
    ids = torch.tensor([[1, 2, 3]])
    a = generate(model, input_ids=ids, max_new_tokens=4, do_sample=True, seed=np.int64(3))  # was a TypeError
    b = generate(model, input_ids=ids, max_new_tokens=4, do_sample=True, seed=3)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def overflowing_dir(llama_dir, tmp_path_factory):
    """Finite weights whose attention scores overflow: NaN logits in both packages."""
    path = shutil.copytree(llama_dir, tmp_path_factory.mktemp("round2") / "overflow")
    tensors = {name: np.array(t) for name, t in load_state_dict(path).items()}
    for name in ("q_proj", "k_proj"):
        tensors[f"model.layers.0.self_attn.{name}.weight"][:] = 1e18
    save_checkpoint(path, None, tensors)
    return path


def _perplexities():
    from minivl.perplexity import perplexity as numpy_perplexity

    yield minivl.load_model, numpy_perplexity
    pytest.importorskip("torch")
    import torch_impl
    from torch_impl.perplexity import perplexity as torch_perplexity

    yield torch_impl.load_model, torch_perplexity


def test_perplexity_api_raises_on_nan_and_refuses_non_integer_ids(llama_dir, overflowing_dir):
    for load, perplexity in _perplexities():
        with pytest.raises(NonFiniteError, match="negative log-likelihood is NaN"), np.errstate(all="ignore"):
            perplexity(load(overflowing_dir), [1, 2, 3, 4])  # was PerplexityResult(perplexity=nan), silently
        model = load(llama_dir)
        for ids in ([1.5, 2.5, 3.5], "hello"):  # floats were truncated; a str was NumPy's raw ValueError
            with pytest.raises(GenerationError, match="perplexity takes integer token ids"):
                perplexity(model, ids)
        assert perplexity(model, [1, 2, 3, 4]).n_tokens == 3


# ------------------------------------------------------------------------------- InternVL and checkpoints

@pytest.mark.parametrize("ids, message", [
    ([[1.5, 2.0]], "must be integer token ids"),
    (None, "input_ids is None"),
    ([1, 2, 3], r"must be \[batch, seq\]"),
])
def test_internvl_generate_and_forward_check_input_ids(internvl_dir, ids, message):
    # an IndexError from the embedding table (floats), a TypeError / RuntimeError (None)
    from minivl.tokenizer import load_tokenizer

    context_id = load_tokenizer(internvl_dir).token_to_id("<IMG_CONTEXT>")
    model = minivl.load_model(internvl_dir)
    model.img_context_token_id = context_id
    with pytest.raises(GenerationError, match=message):
        model.generate(input_ids=ids, max_new_tokens=2)
    torch_impl = pytest.importorskip("torch_impl")
    torch_model = torch_impl.load_model(internvl_dir)
    torch_model.img_context_token_id = context_id
    with pytest.raises(GenerationError, match=message):
        torch_model.generate(input_ids=ids, max_new_tokens=2)
    pixels = np.zeros((1, 3, 56, 56), np.float32)
    with pytest.raises(GenerationError, match=message):
        model(pixels, ids)


def test_save_checkpoint_refuses_what_json_or_the_directory_cannot_hold(tmp_path):
    tensors = {"w": np.ones(3, np.float32)}
    save_checkpoint(tmp_path, {"a": 1}, tensors)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    (tmp_path / "a_file").write_text("x")
    cases = [
        (lambda: save_checkpoint(tmp_path, [1], tensors), CheckpointError, "config must be a minivl config, a dict"),
        (lambda: save_checkpoint(tmp_path, {"x": object()}, tensors), CheckpointError, "cannot be written as JSON"),
        (lambda: save_checkpoint(tmp_path, {"x": float("nan")}, tensors), CheckpointError, "with finite numbers"),
        (lambda: save_checkpoint(tmp_path, {"a": 1}, None), CheckpointError, "tensors must be a mapping"),
        (lambda: save_checkpoint(tmp_path / "a_file", {"a": 1}, tensors), CheckpointError, "is not a directory"),
        (lambda: write_safetensors(tmp_path, tensors), ConfigError, "is a directory; pass the name of a file"),
        (lambda: write_safetensors("", tensors), ConfigError, "the output path is empty"),
        (lambda: write_safetensors(tmp_path / "x.safetensors", None), CheckpointError, "tensors must be a mapping"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    # nothing written, nothing lost: the first checkpoint is as it was
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "a_file"])
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    assert isinstance(ConfigError("x"), MinivlError)


# ------------------------------------------------------------------------------- round 3: decode, grids, --help

@pytest.fixture(scope="module")
def tokenizers(llama_dir, tmp_path_factory):
    """The tokenizers.json tokenizer and InternLM2's SentencePiece one: decode must refuse the same inputs."""
    from minivl.tiny.sentencepiece import write_internlm2_tokenizer
    from minivl.tokenizer import load_tokenizer

    return [load_tokenizer(llama_dir), load_tokenizer(write_internlm2_tokenizer(tmp_path_factory.mktemp("sp")))]


@pytest.mark.parametrize("ids, message", [
    ("hello", "got a str; to tokenize text use encode"),    # was: ValueError invalid literal for int()
    (None, "got NoneType"),                               # was: TypeError 'NoneType' object is not iterable
    (5, "got int"),                                       # was: TypeError 'int' object is not iterable
    (np.zeros((2, 3), np.int64), r"got shape \(2, 3\); decode a batch row by row"),  # was: a TypeError
    ([[1, 2], [3]], r"got shape \(\)"),                   # ragged
    ([1.5, 2], "must be integers, got dtype float64"),    # was: silently decoded as [1, 2]
    ([True], "must be integers, got dtype bool"),         # was: silently decoded as [1]
    ([1, -1], "token id -1 is outside the vocabulary"),
], ids=["str", "none", "int", "batch", "ragged", "floats", "bools", "negative"])
def test_decode_refuses_what_is_not_one_sequence_of_token_ids(tokenizers, ids, message):
    for tokenizer in tokenizers:
        with pytest.raises(GenerationError, match=message):
            tokenizer.decode(ids)


def test_decode_still_takes_lists_tuples_arrays_ranges_and_nothing(tokenizers):
    for tokenizer in tokenizers:
        ids = tokenizer.encode("hello world")
        text = tokenizer.decode(ids)
        assert text.strip() == "hello world"
        for same in (tuple(ids), np.asarray(ids, np.int32), np.asarray(ids, np.uint64), iter(ids)):
            assert tokenizer.decode(same) == text
        assert tokenizer.decode(range(0)) == tokenizer.decode([]) == ""


@pytest.mark.parametrize("width, height", [(0, 5), (5, 0), (-3, 4), (4.5, 3), (True, 3)])
def test_choose_grid_refuses_sizes_that_are_not_pixels(width, height):
    # (5, 0) was a ZeroDivisionError; (0, 5) and (-3, 4) silently chose a 1×12 grid
    from minivl.errors import ImageError
    from minivl.preprocess import choose_grid

    with pytest.raises(ImageError, match="must be a positive number of pixels"):
        choose_grid(width, height)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv, ok_code", [(["--help"], 0), (["chat", "--help"], 0), ([], 2)],
                         ids=["help", "command-help", "no-command"])
def test_help_that_cannot_be_written_is_exit_3(argv, ok_code):
    # `minivl --help > /dev/full` exited 0 and said nothing: the interpreter's flush at exit dropped ENOSPC
    import subprocess
    import sys

    script = "import sys; from minivl_cli.cli import main; sys.exit(main(sys.argv[1:]))"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-c", script, *argv], stdout=full, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3 and len(lines) == 1, result.stderr
    assert lines[0].startswith("minivl: OSError: cannot use the output") and "No space left" in lines[0]
    # the same to a writable stdout keeps argparse's own exit code
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == ok_code and "usage: minivl" in done.stdout


def test_help_into_a_closed_pipe_is_exit_141():
    # argparse dropped the BrokenPipeError; the interpreter's flush at exit then printed "Exception ignored"
    import subprocess
    import sys

    script = "import sys; from minivl_cli.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", script, "viz", "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the help is printed
    code, err = process.wait(timeout=120), process.stderr.read().decode()
    assert code == 141 and err.strip() == "minivl: the output was closed before the command finished (broken pipe); stopped"


@pytest.mark.parametrize("call, message", [
    (lambda P: P.open_image(None), "takes a file path or a PIL image, got NoneType"),  # was: TypeError from fspath
    (lambda P: P.open_image(np.zeros((4, 4, 3), np.uint8)), "for an array use PIL.Image.fromarray"),
    (lambda P: P.open_image(""), "the image path is empty"),
    (lambda P: P.to_pixel_values(None), "takes a list of PIL images"),           # was: TypeError len(None)
    (lambda P: P.load_image(123), "got int"),
], ids=["open-none", "open-array", "open-empty", "pixels-none", "load-int"])
def test_preprocess_refuses_what_is_not_an_image(call, message):
    from minivl import preprocess
    from minivl.errors import ImageError

    with pytest.raises(ImageError, match=message):
        call(preprocess)


def test_a_numpy_integer_image_size_does_not_wrap():
    # np.int8(100) * 3 columns wrapped to 44 inside dynamic_preprocess: tiles of the wrong size, no error
    from PIL import Image

    from minivl.preprocess import dynamic_preprocess, load_image

    image = Image.new("RGB", (300, 100), (10, 20, 30))
    tiles = dynamic_preprocess(image, max_num=6, image_size=np.int8(100))
    assert len(tiles) == 3 and all(tile.size == (100, 100) for tile in tiles)
    assert [tile.tobytes() for tile in tiles] == [tile.tobytes() for tile in dynamic_preprocess(image, max_num=6,
                                                                                               image_size=100)]
    pixels, grid = load_image(image, max_num=6, image_size=np.int16(100))
    assert pixels.shape == (4, 3, 100, 100) and tuple(grid) == (3, 1)
    with pytest.raises(ConfigError, match="image_size must be a positive int"):
        dynamic_preprocess(image, image_size=True)
