"""Atomic file writes: a reader, or a crash half-way, never sees half a file (the project's rule).

`write_text_atomic` writes a new temporary file beside the target (same file system, so the rename
is atomic), flushes it to disk and renames it over the target; on any failure the temporary is
removed. minivl's single text outputs go through it (the auto_map modules, the explorer page, the
files tools/ generates); checkpoints and converted weights, several files at once, are built in a
staging directory instead (minivl/staging.py).
"""
from __future__ import annotations

import os
import secrets


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write `text` (UTF-8) to `path` through a temporary file renamed over it; returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp_path, "x", encoding="utf-8") as f:  # a new file, with the mode open() gives (umask)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename that publishes it must not outrun its data
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    return path
