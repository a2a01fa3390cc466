"""Checks of command-line values shared by the subcommands, run before any work starts.

Each failure names the option, the value, what is allowed and what to do: a number outside its
range, or an output path that cannot be written. `save_figure` writes a picture atomically, so a
failure (disk full, Ctrl-C) leaves the previous file as it was.
"""
from __future__ import annotations

import os

from minivl.errors import ConfigError, FileSystemError


def check_int(flag: str, value, low: int, high: int, hint: str = "", error=ConfigError) -> None:
    """`error` unless low <= value <= high (an int)."""
    if value is None or not low <= value <= high:
        raise error(f"{flag} must be an integer in [{low}, {high}] (got {value}){'; ' + hint if hint else ''}")


def check_float(flag: str, value, low: float, high: float, hint: str = "", low_open: bool = False,
                error=ConfigError) -> None:
    """`error` unless low <= value <= high (low < value with low_open), NaN refused."""
    inside = (low < value if low_open else low <= value) and value <= high
    if not inside:
        bracket = "(" if low_open else "["
        raise error(f"{flag} must be a number in {bracket}{low:g}, {high:g}] (got {value}){'; ' + hint if hint else ''}")


def checkpoint_directory(flag: str, path):
    """`path` (None: the command's default model) unless it cannot be a checkpoint directory: ConfigError
    naming the option for an empty path, one that does not exist, or a file."""
    if path is None:
        return None
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty; pass a checkpoint directory, or leave {flag} out for the default model")
    if not os.path.exists(path):
        raise ConfigError(f"{flag} {path}: no such directory; pass the directory holding the checkpoint's "
                          f"config.json, safetensors and tokenizer files")
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a file, not a checkpoint directory; pass the directory holding it "
                          f"({os.path.dirname(os.path.abspath(path))})")
    return path


def output_directory(flag: str, path: str) -> str:
    """Create the directory `path` for a command's output files, or FileSystemError naming the option."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise FileSystemError(f"{flag} {path} is a file, not a directory; pass a directory for the output "
                              f"files") from None
    except OSError as e:
        raise FileSystemError(f"{flag} {path}: the directory cannot be created ({e.strerror or e}); pass a "
                              f"directory you can write, e.g. {flag} ./out") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FileSystemError(f"{flag} {path}: the directory is not writable; pass a directory you can write")
    return path


# the formats whose suffix tells a viewer how to open them: a picture or a page under another suffix would not open
_FORMATS = {".png": "a PNG picture", ".html": "an HTML page"}


def output_file(flag: str, path: str, example: str = "out.png") -> str:
    """Make sure the file `path` can be written (its directory created), or FileSystemError naming the option.

    `example`: the file name suggested when `path` is a directory (out.png, trace.safetensors, ...).
    For a picture or a page its suffix is the format written, so a path with another suffix (out.jpg
    for a PNG) is a ConfigError rather than a file whose name lies about what opens it. A path
    without a suffix (/dev/stdout, a bare name) is written as it is.
    """
    if not str(path).strip():
        raise ConfigError(f"{flag} is empty; pass the name of the file to write, e.g. {flag} {example}")
    suffix, wanted = os.path.splitext(path)[1], os.path.splitext(example)[1]
    if suffix and wanted in _FORMATS and suffix.lower() != wanted:
        kind = _FORMATS[wanted]
        raise ConfigError(f"{flag} {path}: this command writes {kind}, not a {suffix} file; name it "
                          f"{os.path.splitext(path)[0]}{wanted}")
    if os.path.isdir(path):
        raise FileSystemError(f"{flag} {path} is a directory; pass a file name, e.g. {os.path.join(path, example)}")
    output_directory(flag, os.path.dirname(os.path.abspath(path)))
    return path


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure as PNG (dpi 120) atomically through minivl.viz.save; closes it. Returns the path."""
    from minivl.viz import save

    return save(fig, path, format="png")
