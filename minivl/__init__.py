"""minivl: InternVL written out in plain NumPy. Importing it never imports torch."""

__version__ = "0.1.0"


def load_model(path, dtype="float32", component=None):
    """Load a checkpoint directory (config.json + safetensors) into the matching NumPy model.

    component="language_model" (or "vision_model") loads one part of an InternVL checkpoint alone.
    """
    from minivl.loading import load_model as _load_model

    return _load_model(path, dtype=dtype, component=component)
