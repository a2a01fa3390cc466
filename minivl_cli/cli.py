"""The `minivl` console command. Each subcommand lives in minivl_cli/commands/<name>.py.

Every expected failure ends in ONE line on stderr and an exit code from EXIT_CODES; only a bug in
minivl itself shows a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from minivl.errors import DeviceError, FileSystemError, MinivlError, NonFiniteError

COMMANDS = ["chat", "perplexity", "parity", "describe_image", "viz", "convert", "trace"]  # trace also registers diff

# exit code -> what it means; printed by `minivl --help` and listed in the README
EXIT_CODES = {
    0: "success",
    1: "a named minivl error: a bad argument, config, checkpoint, image or prompt; the message says what to "
       "fix (`minivl parity`: also when the two packages disagree)",
    2: "command-line usage error (unknown option, missing argument)",
    3: "the operating system refused: a file or directory cannot be read or written (missing, not "
       "permitted, disk full), or memory ran out",
    4: "the requested backend or device is not available here (torch not installed, CUDA on a CPU-only torch)",
    5: "the model computed NaN/inf: its weights or inputs are not finite",
    130: "interrupted (Ctrl-C)",
    141: "the output was closed before the command finished (broken pipe, e.g. `| head`)",
}
EXIT_ERROR, EXIT_OS, EXIT_DEVICE, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 3, 4, 5, 130, 141


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minivl", description="InternVL in readable NumPy, mirrored in PyTorch.",
                                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
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


def _say(message: str) -> None:
    """One line on stderr; a closed stderr is not worth a second failure."""
    try:
        print(f"minivl: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _os_error_line(error: OSError) -> str:
    where = f" {error.filename!r}" if error.filename else ""
    if error.filename2:
        where += f" -> {error.filename2!r}"
    reason = error.strerror or str(error)
    return (f"{type(error).__name__}: cannot use{where}: {reason}; check that the path exists, is the kind of "
            f"thing expected there (file or directory) and that you may read or write it")


def _exit_code(error: MinivlError) -> int:
    """The exit code of a named error: its own for a file system, device or NaN failure, else 1."""
    for kind, code in ((FileSystemError, EXIT_OS), (DeviceError, EXIT_DEVICE), (NonFiniteError, EXIT_NONFINITE)):
        if isinstance(error, kind):
            return code
    return EXIT_ERROR


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (captured output in tests)
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits 2 here, with argparse's own message
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        _silence_stdout()
        _say("the output was closed before the command finished (broken pipe); stopped")
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except MinivlError as e:
        _say(f"{type(e).__name__}: {e}")
        return _exit_code(e)
    except json.JSONDecodeError as e:
        _say(f"a JSON file is malformed ({e}); fix or re-create it (re-convert, or re-download the checkpoint)")
        return EXIT_ERROR
    except MemoryError:
        _say("MemoryError: not enough memory; use a smaller model, --dtype float32, fewer --max-tiles or a "
             "shorter input")
        return EXIT_OS
    except OSError as e:
        _say(_os_error_line(e))
        return EXIT_OS


if __name__ == "__main__":
    sys.exit(main())
