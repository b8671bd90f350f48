"""pipeline.cli: the `caption` command. Parses, calls one entry point, prints; nothing else.

This package is the only place that prints and configures logging; it holds no product logic.
`main` builds the top-level parser, asks each command module to add its subcommands (`run`:
run, serve; `readers`: export, review, estimate, report; `compare`; `batch`: the batch actions), and turns
what escapes a command into an exit code. Expected user errors are one line on stderr and exit
code 2, before any request is sent; tracebacks appear only with --debug. Heavy modules are
imported inside the commands, so `caption --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import CaptionError, JobError
from . import batch, compare, readers, run
from .common import EXIT_CODES, os_error_line
from .logs import configure_logging, scrub

__all__ = ["main", "EXIT_CODES"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    configure_logging(args.debug, args.verbose)
    try:
        return args.handler(args, argv)
    except JobError as err:
        print(f"caption: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except CaptionError as err:  # the provider refused something no retry cures (e.g. a batch upload)
        print(f"caption: stopped: {scrub(str(err))}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # `caption report --json | head`: the reader left; say nothing more
        _silence_stdout()
        return 141
    except OSError as err:  # the file system or the OS refused: not a bug, and not the image's fault
        if args.debug:
            raise
        print(f"caption: {os_error_line(err)}", file=sys.stderr)
        return 4
    except Exception as err:  # a bug: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"caption: internal error: {type(err).__name__}: {scrub(str(err))} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module adds its own subcommands, in the order --help lists them."""
    parser = argparse.ArgumentParser(
        prog="caption",
        description="Caption folders of images with a vision-language model behind an OpenAI-compatible API.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"caption {__version__}")
    common_flags = argparse.ArgumentParser(add_help=False)
    common_flags.add_argument("--debug", action="store_true", help="log everything and show tracebacks")
    common_flags.add_argument("-v", "--verbose", action="store_true", help="log each retry and error row")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (run, readers, compare, batch):
        module.add_commands(commands, common_flags)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
