"""The command line: every expected failure is ONE line on stderr and a documented exit code
(minivl_cli.cli.EXIT_CODES), never a traceback; each message names the option or file and the fix."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minivl.checkpoint import load_state_dict, save_checkpoint
from minivl.tiny.internvl import write_tiny_internvl
from minivl_cli.cli import EXIT_CODES, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("minivl: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def internvl_dir(tmp_path_factory):
    return write_tiny_internvl(tmp_path_factory.mktemp("ivl") / "qwen2", llm="qwen2", vision="300m", seed=3)


def test_exit_codes_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in EXIT_CODES:
        assert f"  {code} " in out



@pytest.mark.parametrize("argv, prog, fragment", [
    # argparse itself would print the whole usage block, and blame `minivl` for a subcommand's unknown option
    (["chat", "--bogus"], "minivl chat", "unrecognized arguments: --bogus"),
    (["viz", "rope", "--out", "x.png", "--bogus", "3"], "minivl viz rope", "unrecognized arguments: --bogus 3"),
    (["viz"], "minivl viz", "the following arguments are required: KIND"),
    (["perplexity"], "minivl perplexity", "the following arguments are required: file"),
    (["chat", "--temperature", "warm"], "minivl chat", "argument --temperature: invalid float value: 'warm'"),
    (["convert", "nosuch"], "minivl convert", "argument target: invalid choice: 'nosuch'"),
    (["nosuch"], "minivl", "argument COMMAND: invalid choice: 'nosuch'"),
    (["--bogus"], "minivl", "unrecognized arguments: --bogus"),
])
def test_a_usage_error_is_one_line_naming_the_command_and_its_help(capsys, argv, prog, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err  # one line, no usage block above it
    assert captured.err.startswith(f"{prog}: error: {fragment}"), captured.err
    assert captured.err.rstrip().endswith(f"`{prog} --help` lists its arguments"), captured.err


# ------------------------------------------------------------------------- sampling options

@pytest.mark.parametrize("argv, fragment", [
    (["--seed", "-1"], "--seed must be an integer in [0, 9223372036854775807] (got -1); e.g. --seed 0"),
    (["--temperature", "0.7", "--seed", str(2**64)], "--seed must be an integer in [0, "),
    (["--temperature", "nan"], "--temperature must be a number in [0, 100] (got nan)"),
    (["--temperature", "1e9"], "--temperature must be a number in [0, 100] (got 1000000000.0)"),
    (["--temperature", "0.7", "--top-p", "0"], "--top-p must be a number in (0, 1] (got 0.0); e.g. 0.9"),
    (["--temperature", "0.7", "--top-p", "1.5"], "--top-p must be a number in (0, 1] (got 1.5)"),
    (["--temperature", "0.7", "--top-k", "0"], "--top-k must be an integer in [1, 2147483647] (got 0); e.g. 50"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
])
def test_bad_sampling_options(capsys, argv, fragment):
    # issue #16, example 4: --seed -1 used to end in NumPy's ValueError traceback
    code, err = run_cli(capsys, "chat", *argv, "hi")
    assert code == 1
    line = one_line(err)
    assert "GenerationError" in line and fragment in line


@pytest.mark.parametrize("argv, fragment", [
    (["--context", "0"], "--context must be an integer in [1, 1048576] (got 0)"),
    (["--stride", "-5"], "--stride must be an integer in [1, 1048576] (got -5)"),
])
def test_bad_perplexity_sizes(capsys, tmp_path, argv, fragment):
    (tmp_path / "t.txt").write_text("hello")
    code, err = run_cli(capsys, "perplexity", str(tmp_path / "t.txt"), *argv)
    assert code == 1 and fragment in one_line(err)


# ------------------------------------------------------------------------- describe-image sizes

@pytest.mark.parametrize("argv, fragment", [
    (["--patch-size", "0"], "--patch-size must be an integer in [1, 1792] (got 0); InternViT uses 14"),
    (["--patch-size", "-14"], "--patch-size must be an integer in [1, 1792] (got -14)"),
    (["--image-size", "0"], "--image-size must be an integer in [14, 1792] (got 0); InternVL2 tiles are 448"),
    (["--image-size", "100000"], "--image-size must be an integer in [14, 1792] (got 100000)"),
    (["--image-size", "450"], "--image-size 450 must be a multiple of --patch-size 14"),
    (["--downsample-ratio", "0"], "--downsample-ratio must be a number in (0, 1] (got 0.0); InternVL2 uses 0.5"),
    (["--downsample-ratio", "-0.5"], "--downsample-ratio must be a number in (0, 1] (got -0.5)"),
    (["--downsample-ratio", "2"], "--downsample-ratio must be a number in (0, 1] (got 2.0)"),
    (["--downsample-ratio", "0.3"], "pixel shuffle needs (image size / patch size) × ratio = 32 × 0.3"),
    (["--max-num", "100000"], "--max-num must be an integer in [1, 128] (got 100000)"),
    (["--min-num", "0"], "--min-num must be an integer in [1, 128] (got 0); InternVL uses 1"),
    (["--min-num", "5", "--max-num", "4"], "--max-num must be an integer in [5, 128] (got 4)"),
    (["--attention-size", "5"], "--attention-size must be an integer in [14, 1024] (got 5)"),
    (["--attention-size", "100000"], "--attention-size must be an integer in [14, 1024] (got 100000)"),
    (["--layer", "12"], "--layer must be an integer in [-12, 11] (got 12); DINOv2-S has 12 layers"),
])
def test_bad_describe_image_sizes(capsys, tmp_path, picture, argv, fragment):
    # issue #16, examples 4 and 8: --patch-size 0 was a ZeroDivisionError, --downsample-ratio 0 printed "0 image tokens"
    code, err = run_cli(capsys, "describe-image", picture, "--out", str(tmp_path / "out"), *argv)
    assert code == 1
    line = one_line(err)
    assert "ConfigError" in line and fragment in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ------------------------------------------------------------------------- output paths and the cache

def test_describe_image_out_under_proc(capsys, picture):
    code, err = run_cli(capsys, "describe-image", picture, "--out", "/proc/x", "--no-attention")
    assert code == 3
    line = one_line(err)
    assert "FileSystemError: --out /proc/x: the directory cannot be created" in line
    assert "pass a directory you can write" in line


def test_describe_image_out_naming_a_file(capsys, tmp_path, picture):
    (tmp_path / "taken").write_text("x")
    code, err = run_cli(capsys, "describe-image", picture, "--out", str(tmp_path / "taken"), "--no-attention")
    assert code == 3 and f"--out {tmp_path / 'taken'} is a file, not a directory" in one_line(err)


@pytest.mark.parametrize("kind", [["rope"], ["alibi"], ["gqa"]])
def test_viz_out_under_proc(capsys, kind):
    code, err = run_cli(capsys, "viz", *kind, "--out", "/proc/x/rope.png")
    assert code == 3
    assert "--out /proc/x: the directory cannot be created (No such file or directory)" in one_line(err)


def test_viz_out_naming_a_directory(capsys, tmp_path):
    code, err = run_cli(capsys, "viz", "gqa", "--out", str(tmp_path))
    assert code == 3 and f"--out {tmp_path} is a directory; pass a file name" in one_line(err)


@pytest.mark.parametrize("argv, fragment", [
    (["rope", "--head-dim", "7"], "--head-dim must be even, RoPE rotates pairs of dimensions (got 7)"),
    (["rope", "--head-dim", "0"], "--head-dim must be an integer in [2, 1024] (got 0)"),
    (["rope", "--theta", "0"], "--theta must be a number in (1, 1e+09] (got 0.0)"),
    (["rope", "--factor", "0.5"], "--factor must be a number in [1, 1024] (got 0.5)"),
    (["rope", "--original-max", "0"], "--original-max must be an integer in [1, 16777216] (got 0)"),
    (["rope", "--seq-len", "-3"], "--seq-len must be an integer in [1, 1073741824] (got -3)"),
    (["alibi", "--heads", "0"], "--heads must be an integer in [1, 64] (got 0)"),
    (["alibi", "--length", "100000"], "--length must be an integer in [1, 512] (got 100000)"),
    (["alibi", "--alibi-bias-max", "0"], "--alibi-bias-max must be a number in (0, 1024] (got 0.0); MPT uses 8"),
    (["gqa", "--heads", "8", "--kv-heads", "16"], "--kv-heads must be an integer in [1, 8] (got 16)"),
    (["attention", "x.png", "--size", "0"], "--size must be an integer in [14, 1022] (got 0)"),
    (["attention", "x.png", "--layer", "-13"], "--layer must be an integer in [-12, 11] (got -13)"),
])
def test_bad_viz_sizes(capsys, tmp_path, argv, fragment):
    code, err = run_cli(capsys, "viz", *argv, "--out", str(tmp_path / "v.png"))
    assert code == 1 and fragment in one_line(err)
    assert not (tmp_path / "v.png").exists()


def test_cache_under_proc(capsys, monkeypatch):
    # issue #16, example 4: MINIVL_CACHE=/proc/x minivl convert status was a FileNotFoundError traceback
    monkeypatch.setenv("MINIVL_CACHE", "/proc/x")
    code, err = run_cli(capsys, "convert", "status")
    assert code == 3
    line = one_line(err)
    assert "FileSystemError: MINIVL_CACHE=/proc/x cannot be created (No such file or directory)" in line
    assert "set MINIVL_CACHE to a directory you can write, or unset it" in line


def test_cache_naming_a_file(capsys, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("MINIVL_CACHE", str(tmp_path / "file"))
    code, err = run_cli(capsys, "convert", "status")
    assert code == 3 and f"MINIVL_CACHE={tmp_path / 'file'} is a file, not a directory" in one_line(err)


# ------------------------------------------------------------------------- devices

def test_cuda_on_a_cpu_only_torch(capsys, monkeypatch, tmp_path):
    # issue #16, example 4: an AssertionError traceback from torch ("Torch not compiled with CUDA enabled")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    code, err = run_cli(capsys, "chat", "--backend", "torch", "--device", "cuda", "--model-dir", str(tmp_path), "hi")
    assert code == 4
    line = one_line(err)
    assert "DeviceError: --device cuda: this torch is a CPU-only build; use --device cpu" in line


def test_cuda_index_past_the_gpus(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = run_cli(capsys, "chat", "--backend", "torch", "--device", "cuda:3", "--model-dir", str(tmp_path), "hi")
    assert code == 4 and "this machine has 1 CUDA device(s), numbered from 0; use --device cuda:0" in one_line(err)


def test_unknown_device(capsys, tmp_path):
    code, err = run_cli(capsys, "chat", "--backend", "torch", "--device", "gpu", "--model-dir", str(tmp_path), "hi")
    assert code == 4 and "--device 'gpu' is not a device torch knows" in one_line(err)


# ------------------------------------------------------------------------- broken files and outputs

@pytest.mark.parametrize("name", ["tokenizer_config.json", "config.json", "tokenizer.json"])
def test_malformed_json_in_the_model_dir(capsys, tmp_path, internvl_dir, name):
    # issue #16, example 4: a malformed tokenizer_config.json ended in a JSONDecodeError traceback
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(internvl_dir, broken)
    (broken / name).write_text('{"bos_token": "<s>",\n  oops')
    code, err = run_cli(capsys, "chat", "--model-dir", str(broken), "hi")
    assert code == 1
    line = one_line(err)
    assert f"CheckpointError: {broken / name} is not valid JSON (Expecting property name enclosed in double " \
           f"quotes at line 2, column 3)" in line
    assert "re-create the checkpoint" in line


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_nonfinite_answer_is_not_an_empty_answer(capsys, tmp_path, internvl_dir):
    # issue #16, example 2: NaN logits printed an empty answer with exit code 0. Finite weights so large
    # that the logits overflow to inf get past the checkpoint check and must be caught at generation.
    import shutil

    huge = tmp_path / "huge"
    shutil.copytree(internvl_dir, huge)
    tensors = dict(load_state_dict(huge))
    name = "language_model.model.norm.weight"
    tensors[name] = np.full(tensors[name].shape, 3e38, tensors[name].dtype)
    save_checkpoint(huge, None, tensors)
    code, err = run_cli(capsys, "chat", "--model-dir", str(huge), "hi", "--max-new-tokens", "3")
    assert code == 5
    line = one_line(err)
    assert "NonFiniteError: generate: the model's logits at step 0 are NaN/inf (batch rows [0])" in line
    assert "check the checkpoint" in line
    assert capsys.readouterr().out.strip() == ""


def test_nan_weights_in_the_model_dir(capsys, tmp_path, internvl_dir):
    import shutil

    nan = tmp_path / "nan"
    shutil.copytree(internvl_dir, nan)
    tensors = dict(load_state_dict(nan))
    weight = np.array(tensors["mlp1.1.weight"])
    weight[0, 0] = np.nan
    tensors["mlp1.1.weight"] = weight
    save_checkpoint(nan, None, tensors)
    code, err = run_cli(capsys, "chat", "--model-dir", str(nan), "hi")
    assert code == 1
    assert "1 weight tensors are not finite: mlp1.1.weight (1 NaN, 0 inf of" in one_line(err)


def test_max_tiles_above_the_limit(capsys, internvl_dir, picture):
    # issue #16, example 6: --max-tiles 100000 never returned
    code, err = run_cli(capsys, "chat", "--model-dir", internvl_dir, "--image", picture, "--max-tiles", "100000", "hi")
    assert code == 1 and "--max-tiles must be an integer in [1, 128] (got 100000)" in one_line(err)


def test_broken_pipe_is_one_line_and_exit_141(tmp_path):
    # issue #16, example 4: `minivl chat ... | head -c 1` ended in a BrokenPipeError traceback
    process = subprocess.Popen([sys.executable, "-m", "minivl_cli.cli", "viz", "gqa", "--out", str(tmp_path / "g.png")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": ROOT})
    process.stdout.close()  # the reader is gone before the first byte, as `| head -c 0` would be
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in err and "Exception ignored" not in err
    assert "minivl: the output was closed before the command finished (broken pipe)" in err


class _Args:
    def __init__(self, error):
        self.error = error

    def func(self, args):
        raise self.error


@pytest.mark.parametrize("error, code, fragment", [
    (KeyboardInterrupt(), 130, "minivl: interrupted"),
    (BrokenPipeError(32, "Broken pipe"), 141, "broken pipe"),
    (PermissionError(13, "Permission denied", "/data/x.png"), 3,
     "PermissionError: cannot use '/data/x.png': Permission denied; check that the path exists"),
    (OSError(28, "No space left on device"), 3,
         "OSError: cannot use the output (the standard output or an open file): No space left on device"),
    (MemoryError(), 3, "MemoryError: not enough memory; use a smaller model"),
    (json.JSONDecodeError("Expecting value", "{", 1), 1, "a JSON file is malformed (Expecting value"),
])
def test_top_level_turns_expected_failures_into_one_line(capsys, monkeypatch, error, code, fragment):
    import argparse

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", lambda self, argv=None: (_Args(error), []))
    got, err = run_cli(capsys, "viz")
    assert got == code and fragment in one_line(err)


def test_nan_perplexity_is_exit_5(capsys, monkeypatch, tmp_path):
    import types

    import minivl.perplexity
    from minivl_cli.commands import perplexity as command

    (tmp_path / "t.txt").write_text("some words")
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=64))
    tokenizer = types.SimpleNamespace(encode=lambda text: [1, 2, 3, 4])
    monkeypatch.setattr(command, "load_lm", lambda args: (model, tokenizer, None))
    monkeypatch.setattr(minivl.perplexity, "perplexity", lambda *a, **k: types.SimpleNamespace(
        perplexity=float("nan"), nll=float("nan"), n_tokens=3, n_windows=1))
    code, err = run_cli(capsys, "perplexity", str(tmp_path / "t.txt"))
    assert code == 5
    assert "NonFiniteError: the mean negative log-likelihood over" in one_line(err)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv, code, fragment", [
    (["--text", "hi", "--size", "0"], 1, "--size must be an integer in [14, 1022] (got 0)"),
    (["--text", "hi", "--max-tiles", "100000"], 1, "--max-tiles must be an integer in [1, 128] (got 100000)"),
    (["--text", "hi", "--max-tokens", "0"], 1, "--max-tokens must be an integer in [1, 4096] (got 0)"),
])
def test_bad_explore_sizes(capsys, tmp_path, argv, code, fragment):
    got, err = run_cli(capsys, "viz", "explore", *argv, "--out", str(tmp_path / "page.html"))
    assert got == code and fragment in one_line(err)


def test_explore_out_under_proc(capsys):
    got, err = run_cli(capsys, "viz", "explore", "--text", "hi", "--out", "/proc/x/page.html")
    assert got == 3 and "--out /proc/x: the directory cannot be created" in one_line(err)


def test_trace_checks_its_sizes_and_output(capsys, tmp_path, internvl_dir, picture):
    got, err = run_cli(capsys, "trace", internvl_dir, "--image", picture, "--max-num", "0",
                       "--out", str(tmp_path / "t.safetensors"))
    assert got == 1 and "--max-num must be an integer in [1, 128] (got 0)" in one_line(err)
    got, err = run_cli(capsys, "trace", internvl_dir, "--image", picture, "--out", "/proc/x/t.safetensors")
    assert got == 3 and "--out /proc/x: the directory cannot be created" in one_line(err)
