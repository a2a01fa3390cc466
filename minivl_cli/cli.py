"""The `minivl` console command. Each subcommand lives in minivl_cli/commands/<name>.py.

Every expected failure ends in ONE line on stderr and an exit code from EXIT_CODES; only a bug in
minivl itself shows a traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import warnings

from minivl.errors import DeviceError, FileSystemError, MinivlError, NonFiniteError

COMMANDS = ["chat", "perplexity", "parity", "describe_image", "viz", "convert", "trace"]  # trace also registers diff

# exit code -> what it means; printed by `minivl --help` and listed in the README
EXIT_CODES = {
    0: "success",
    1: "a named minivl error: a bad argument (an input path that does not exist included), config, checkpoint, "
       "image or prompt; the message says what to fix (`minivl parity`: also when the two packages disagree)",
    2: "command-line usage error (unknown option, missing argument)",
    3: "the operating system refused: a file or directory cannot be read or written (not permitted, disk "
       "full, read-only, an I/O error), or memory ran out",
    4: "the requested backend or device is not available here (torch not installed, CUDA on a CPU-only torch)",
    5: "the model computed NaN/inf: the computation overflowed (a checkpoint with non-finite weights is refused "
       "at load instead: exit 1, naming the tensors)",
    130: "interrupted (Ctrl-C)",
    141: "the output was closed before the command finished (broken pipe, e.g. `| head`)",
}
EXIT_ERROR, EXIT_OS, EXIT_DEVICE, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 3, 4, 5, 130, 141


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())


EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse's parser with a usage error as ONE line, like every other failure: what is wrong and
    where the arguments are listed (argparse's own prints the whole usage block above it)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}; `{self.prog} --help` lists its arguments\n")

    def _print_message(self, message, file=None):
        """As argparse's, but a write to stdout that fails raises (argparse drops the OSError, so
        `minivl --help > /dev/full` exited 0 with nothing written); main turns it into one line, exit 3."""
        if not message:
            return
        file = file or sys.stderr
        if file is not sys.stdout:
            return super()._print_message(message, file)
        file.write(message)
        file.flush()

    def add_subparsers(self, **kwargs):
        """As argparse's (the subcommand parsers are Parsers too), remembering them for `innermost`."""
        action = super().add_subparsers(**kwargs)
        self.commands, self.command_dest = action.choices, kwargs.get("dest")
        return action

    def innermost(self, args) -> "Parser":
        """The parser of the (sub)command these parsed args ran: `minivl viz rope`'s, not `minivl`'s."""
        parser = self
        while getattr(parser, "command_dest", None) and getattr(args, parser.command_dest, None) in parser.commands:
            parser = parser.commands[getattr(args, parser.command_dest)]
        return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minivl", description="InternVL in readable NumPy, mirrored in PyTorch.",
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


def one_line(message: str) -> str:
    """A message as ONE line: a multi-line one (check_state_dict lists missing, unexpected and
    mis-shaped tensors on lines of their own) is joined with '; '."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines)


def _say(message: str) -> None:
    """One line on stderr; a closed stderr is not worth a second failure."""
    try:
        print(f"minivl: {one_line(message)}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# errno -> what to do, where "check the path" is not the fix
_OS_ERROR_FIXES = {
    errno.ENOSPC: "the disk is full: free some space, or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space, or write somewhere else",
    errno.EROFS: "that file system is read-only: write somewhere else",
}


def _os_error_line(error: OSError) -> str:
    # a write that names no file (ENOSPC from a stream) was to an open stream, most often the standard output
    where = f" {error.filename!r}" if error.filename else " the output (the standard output or an open file)"
    if error.filename2:
        where += f" -> {error.filename2!r}"
    reason = error.strerror or str(error)
    fix = _OS_ERROR_FIXES.get(error.errno, "check that the path exists, is the kind of thing expected there "
                                           "(file or directory) and that you may read or write it")
    return f"{type(error).__name__}: cannot use{where}: {reason}; {fix}"


def _is_floating_point_warning(caught) -> bool:
    """NumPy's 'overflow / invalid value / divide by zero encountered in ...' RuntimeWarnings."""
    return issubclass(caught.category, RuntimeWarning) and "encountered in" in str(caught.message)


def _settle_warnings(caught: list, failed: bool) -> None:
    """After a command: NumPy's floating-point warnings as at most ONE line, and none after a failure
    (its own one line says what went wrong; the NaN/inf checks report what the warnings hint at).
    Every other warning is passed on unchanged."""
    numeric = list({(str(w.message), w.filename, w.lineno): w
                    for w in caught if _is_floating_point_warning(w)}.values())  # each place once
    for w in caught:
        if not _is_floating_point_warning(w):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if numeric and not failed:
        first = numeric[0]
        more = f" and {len(numeric) - 1} more" if len(numeric) > 1 else ""
        where = "/".join(first.filename.replace(os.sep, "/").split("/")[-2:])  # e.g. minivl/norms.py
        _say(f"warning: NumPy reported '{first.message}' ({where}:{first.lineno}){more} while computing; the "
             f"results may be unreliable: check that the weights and inputs are in a sane range (or try "
             f"--dtype float64 where the command has it)")


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


def _unwritable(error: OSError) -> int:
    """EXIT_OS and one line for help text the standard output could not take (`> /dev/full`)."""
    _silence_stdout()
    if isinstance(error, BrokenPipeError):  # `minivl --help | true`: as a command's output closed early
        _say("the output was closed before the command finished (broken pipe); stopped")
        return EXIT_BROKEN_PIPE
    _say(_os_error_line(error))
    return EXIT_OS


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with stdout closed (`>&-`): there is nowhere to print an answer
        _say("the standard output is closed (e.g. `>&-`); give the command somewhere to write: > FILE, or "
             "> /dev/null to discard it")
        return EXIT_OS
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)  # a usage error exits 2 here, in one line
    except OSError as e:  # --help printed to a stdout that cannot take it
        return _unwritable(e)
    if unknown:  # argparse would blame `minivl`; the command they were given to is the one to ask
        parser.innermost(args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        try:
            parser.print_help()
        except OSError as e:
            return _unwritable(e)
        return 2
    with warnings.catch_warnings(record=True) as caught:  # held back, then settled in one line at most
        code, failed = _run(args)
    _settle_warnings(caught, failed or code == EXIT_NONFINITE)  # a NaN/inf already said so in its own line
    return code


def _run(args) -> tuple[int, bool]:
    """(exit code, whether it failed): the command, each expected failure turned into one line on
    stderr and its exit code; anything else (a bug in minivl) propagates with its traceback."""
    try:
        return int(args.func(args) or 0), False
    except BrokenPipeError:
        _silence_stdout()
        _say("the output was closed before the command finished (broken pipe); stopped")
        return EXIT_BROKEN_PIPE, True
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED, True
    except MinivlError as e:
        _say(f"{type(e).__name__}: {e}")
        return _exit_code(e), True
    except json.JSONDecodeError as e:
        _say(f"a JSON file is malformed ({e}); fix or re-create it (re-convert, or re-download the checkpoint)")
        return EXIT_ERROR, True
    except MemoryError:
        _say("MemoryError: not enough memory; use a smaller model, --dtype float32, fewer --max-tiles or a "
             "shorter input")
        return EXIT_OS, True
    except OSError as e:
        _say(_os_error_line(e))
        return EXIT_OS, True


if __name__ == "__main__":
    sys.exit(main())
