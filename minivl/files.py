"""Atomic file writes: a reader, or a crash half-way, never sees half a file (the project's rule).

`write_text_atomic` / `write_bytes_atomic` write a new temporary file beside the target (same file
system, so the rename is atomic), flush it to disk and rename it over the target; on any failure
the temporary is removed and the previous file is untouched. An OSError they raise names the
target (a full disk's ENOSPC from a write names no file by itself). minivl's single-file outputs go
through them (the auto_map modules, the explorer page, the CLI's PNG pictures, the files tools/
generates); checkpoints and converted weights, several files at once, are built in a staging
directory instead (minivl/staging.py).
"""
from __future__ import annotations

import os
import secrets

from minivl.errors import ConfigError


def check_output_file(path: str | os.PathLike) -> str:
    """`path` as a str, unless it cannot name a file to write: ConfigError for an empty path or an existing directory."""
    path = os.fspath(path)
    if not str(path).strip():
        raise ConfigError("the output path is empty; pass the name of the file to write (e.g. --out result.png)")
    if os.path.isdir(path):
        raise ConfigError(f"the output path {path!r} is a directory; pass the name of a file to write, e.g. "
                          f"{os.path.join(path, 'out')!r} inside it")
    return path


def _write_atomic(path: str | os.PathLike, data, mode: str, encoding: str | None) -> str:
    path = check_output_file(path)
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        # a device or a pipe (/dev/null, /dev/stdout): written straight into; a rename over it would
        # replace the device node itself with a regular file
        with open(path, "w" + mode.replace("x", ""), encoding=encoding) as f:
            f.write(data)
        return path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp_path, mode, encoding=encoding) as f:  # a new file, with the mode open() gives (umask)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename that publishes it must not outrun its data
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        if isinstance(error, OSError) and error.errno is not None and error.filename in (None, tmp_path):
            # ENOSPC from write() names no file, an open() the temporary: name the file being written
            raise OSError(error.errno, error.strerror, path) from None  # OSError picks the subclass of the errno
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write `text` (UTF-8) to `path` through a temporary file renamed over it; returns the path."""
    return _write_atomic(path, text, "x", "utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write `data` to `path` through a temporary file renamed over it; returns the path."""
    return _write_atomic(path, bytes(data), "xb", None)
