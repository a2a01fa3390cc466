"""The `minivl` console command. Each subcommand lives in minivl/commands/<name>.py."""
from __future__ import annotations

import argparse
import importlib
import sys

from minivl.errors import MinivlError

COMMANDS = ["chat", "perplexity", "parity", "describe_image", "viz", "convert", "trace"]  # trace also registers diff


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minivl", description="InternVL in readable NumPy, mirrored in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"minivl_cli.commands.{name}")
        except ModuleNotFoundError as e:  # a command not written yet is simply absent
            if e.name == f"minivl_cli.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MinivlError as e:
        print(f"minivl: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
