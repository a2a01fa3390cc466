"""Atomic writes: build the new state in a staging directory, then rename it into place.

Every writer in minivl (checkpoints, converted weights) works the same way:

1. validate everything first, so a bad input fails before anything on disk changes;
2. write into a staging directory next to the target (same file system, so the rename is atomic),
   named `.{target}.staging.{pid}.{random}`;
3. rename into place; until that rename the previous state stays loadable.

A writer killed half-way (SIGKILL, power loss) cannot clean up after itself, so each run first
sweeps the staging directories whose writing process is gone (`sweep_stale`). A staging directory
of a process that is still running is left alone: it may be writing right now.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_STAGING = re.compile(r"^\.(?P<target>.+)\.staging\.(?P<pid>\d+)\.[A-Za-z0-9_]+$")


def make_staging_dir(parent: str | os.PathLike, target_name: str) -> Path:
    """A fresh, empty staging directory in `parent` for building `target_name` (mode 0755)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target_name}.staging.{os.getpid()}.", dir=parent))
    staging.chmod(0o755)  # mkdtemp makes it private; what is renamed into place is an ordinary directory
    return staging


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_stale(parent: str | os.PathLike) -> list[Path]:
    """Delete the staging directories in `parent` left by processes that no longer run; returns them."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    swept = []
    for entry in parent.iterdir():
        match = _STAGING.match(entry.name)
        if match and entry.is_dir() and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            swept.append(entry)
    return swept


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's bytes to disk, so the rename that publishes it never outruns its data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
