"""A converted checkpoint's manifest: written last, it tells a finished conversion from a damaged one.

A conversion writes every file into a staging directory (minivl/staging.py), then `manifest.json`
with each file's size and SHA-256, then renames the directory into the cache. So:

* no manifest.json: the conversion never finished (or an older minivl wrote it): convert again;
* a file missing, or its size not the manifest's: damaged (truncated, half-copied): convert again;
* `verify(..., thorough=True)` (what `minivl convert status` runs) also compares the SHA-256s,
  catching bytes changed in place; loading checks only the sizes, which costs nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import secrets
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 24


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, **about) -> None:
    """Record every file of `directory` (size, SHA-256) in its manifest.json; call it after the last file."""
    directory = Path(directory)
    files = {path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(directory.iterdir()) if path.is_file() and path.name != MANIFEST}
    text = json.dumps({"files": files, **about}, indent=2, sort_keys=True) + "\n"
    (directory / MANIFEST).write_text(text, encoding="utf-8")


def verify(directory: str | os.PathLike, required: tuple[str, ...], thorough: bool = False) -> str | None:
    """None when `directory` is a finished, intact conversion holding `required`; else what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        return "not converted"
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"unfinished: no {MANIFEST} (an interrupted conversion, or one by an older minivl)"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"damaged: {MANIFEST} is unreadable ({e})"
    # a manifest edited or half-overwritten into another shape ({"files": 3}, entries that are not
    # {"size": ..., "sha256": ...}) is damage like any other, not a traceback
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        return (f"damaged: {MANIFEST} is not a manifest minivl wrote (it must map each file name to "
                f"{{'size': ..., 'sha256': ...}})")
    for name in required:
        if name not in files:
            return f"damaged: {MANIFEST} does not list {name}"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"damaged: {name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"damaged: {name} is {size} bytes, the conversion wrote {entry.get('size')}"
        if thorough and _sha256(path) != entry.get("sha256"):
            return f"damaged: {name} has other bytes than the conversion wrote (SHA-256 differs)"
    return None


def sweep_legacy(parent: str | os.PathLike, pattern: str, min_age_s: float = 3600.0) -> list[Path]:
    """Delete staging directories an older minivl named `pattern` (a glob) and could leave behind
    when killed; they carry no pid, so only those untouched for `min_age_s` are taken as dead."""
    import time

    swept = []
    for path in Path(parent).glob(pattern):
        if path.is_dir() and time.time() - path.stat().st_mtime > min_age_s:
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    return swept


def publish(staging: Path, target: Path) -> Path:
    """Rename the finished `staging` directory to `target`, replacing an older `target`.

    The old directory is first renamed to a staging name (swept like one if this process dies),
    then the new one takes its place, then the old one is deleted. If another process published
    first, its intact copy is kept and `staging` deleted.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.staging.{os.getpid()}.{secrets.token_hex(4)}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None and not target.exists():
            os.rename(old, target)   # put the old state back before failing
            old = None
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)   # another process finished first: keep its copy
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
