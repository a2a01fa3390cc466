"""Atomic file writes: a reader, or a crash half-way, never sees half a file (the project's rule).

`write_text_atomic` writes a temporary file in the target's own directory (so the rename never
crosses a file system) and renames it over the target; on any failure the temporary is removed.
minivl's text outputs go through it (the auto_map modules, the explorer page, the files tools/
generates); safetensors are written the same way by `minivl.checkpoint.write_safetensors`.
"""
from __future__ import annotations

import os
import tempfile


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write `text` (UTF-8) to `path` through a temporary file renamed over it; returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp_path, 0o644)  # mkstemp makes the file private; these are files to be read by others
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    return path
