"""minivl: InternVL written out in plain NumPy. Importing it never imports torch."""

__version__ = "0.1.0"


def load_model(path, dtype="float32"):
    """Load a checkpoint directory (config.json + safetensors) into the matching NumPy model."""
    from minivl.loading import load_model as _load_model

    return _load_model(path, dtype=dtype)
