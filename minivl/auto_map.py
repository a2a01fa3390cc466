"""The Python files that a config.json's `auto_map` names, written so that the names point at code that exists.

InternVL's releases carry `"auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
"AutoModel": "modeling_internvl_chat.InternVLChatModel", ...}` next to those .py files; with
`trust_remote_code=True` transformers imports them from the directory. minivl writes the same
auto_map into the checkpoints it makes, so it writes the files too: each is one import of the
class of the same name from minivl's transformers adapter, torch_impl/auto.py (this module itself
imports no torch; it only writes the text). configuration_internvl_chat.py, for example, is the line
`from torch_impl.auto import InternVLChatConfig`.

A file that exists already and was not written here (the real InternVL code of a release) is
left alone: the auto_map then points at it, as it did before.
"""
from __future__ import annotations

import json
import os

from minivl.errors import CheckpointError
from minivl.files import write_text_atomic

ADAPTER_MODULE = "torch_impl.auto"
# the classes torch_impl.auto defines under the names InternVL's and InternLM's auto_maps use
ADAPTER_CLASSES = ("InternVLChatConfig", "InternVLChatModel", "InternVisionConfig", "InternVisionModel",
                   "InternLM2Config", "InternLM2ForCausalLM")
MARKER = "# written by minivl (minivl/auto_map.py)"


def auto_map_files(auto_map: dict) -> dict[str, list[str]]:
    """auto_map -> {file name: [class names]} for its "module.Class" entries (tokenizer pairs included)."""
    files: dict[str, list[str]] = {}
    for target in auto_map.values():
        for reference in target if isinstance(target, (list, tuple)) else [target]:
            if not reference:
                continue
            module, _, name = reference.rpartition(".")
            files.setdefault(module + ".py", [])
            if name not in files[module + ".py"]:
                files[module + ".py"].append(name)
    return files


def write_auto_map_modules(directory: str | os.PathLike) -> list[str]:
    """Write each .py file that directory/config.json's auto_map names and that does not exist; returns them.

    CheckpointError if the auto_map names a class the adapter does not define (there is no code to point at).
    """
    directory = os.fspath(directory)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    # the chat config's auto_map, and its llm_config's (InternLM2's files ship beside InternVL's)
    files: dict[str, list[str]] = {}
    for section in (config, config.get("vision_config"), config.get("llm_config")):
        if isinstance(section, dict):
            for file_name, names in auto_map_files(section.get("auto_map") or {}).items():
                files.setdefault(file_name, []).extend(n for n in names if n not in files.get(file_name, []))
    written = []
    for file_name, names in files.items():
        unknown = [name for name in names if name not in ADAPTER_CLASSES]
        path = os.path.join(directory, file_name)
        if os.path.exists(path) and not _written_here(path):
            continue  # the release's own code
        if unknown:
            raise CheckpointError(f"{directory}/config.json: auto_map names {unknown} in {file_name}, which "
                                  f"minivl's adapter ({ADAPTER_MODULE}) does not define (it has "
                                  f"{list(ADAPTER_CLASSES)}); remove those entries from auto_map")
        source = (f"{MARKER}: config.json's auto_map names this file; the classes are minivl's.\n"
                  f"from {ADAPTER_MODULE} import {', '.join(names)}  # noqa: F401\n")
        write_text_atomic(path, source)
        written.append(path)
    return written


def _written_here(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(MARKER)
