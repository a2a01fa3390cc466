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


def output_file(flag: str, path: str, example: str = "out.png") -> str:
    """Make sure the file `path` can be written (its directory created), or FileSystemError naming the option.

    `example`: the file name suggested when `path` is a directory (out.png, trace.safetensors, ...).
    """
    if os.path.isdir(path):
        raise FileSystemError(f"{flag} {path} is a directory; pass a file name, e.g. {os.path.join(path, example)}")
    output_directory(flag, os.path.dirname(os.path.abspath(path)))
    return path


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure as PNG (dpi 120) atomically through minivl.viz.save; closes it. Returns the path."""
    from minivl.viz import save

    return save(fig, path, format="png")
