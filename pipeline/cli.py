"""cli.py: the `caption` command. Parses, calls one entry point, prints; nothing else.

Only this module prints and configures logging. Expected user errors are one line on stderr and
exit code 2, before any request is sent; tracebacks appear only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
import typing
from pathlib import Path

from . import __version__
from .errors import JobError
from .job import OVERRIDABLE, Endpoint, ImageSettings, Limits, Output, Prompt, load_job, resolve_api_key, resolve_headers

__all__ = ["main"]

EXIT_CODES = """exit codes:
  0    every image ended ok
  1    the run finished, but some images ended as error rows
  2    bad usage, job file or missing API key (nothing was sent)
  3    stopped by a fatal provider error (bad key, out of credit, unknown model)
  130  interrupted (Ctrl-C / SIGTERM); rerun the same command to resume"""

RUN_EXAMPLES = """examples:
  caption run sample_data --job jobs/demo.toml --out out/
  caption run ~/photos --job jobs/alt_text.toml --out alt/ --model gpt-4.1-mini --concurrency 32
  caption run ~/photos --job jobs/relay.toml --out cap/ --no-stream --max-side 768 --detail low
"""

SERVE_EXAMPLES = """examples:
  caption serve --port 8000
  caption serve --port 8000 --latency-s 1 --rpm 600     # a rate-limited provider, for trying things
  caption run sample_data --job jobs/demo.toml --out out/ --base-url http://127.0.0.1:8000/v1
"""

_SECTION_TYPES = {"endpoint": Endpoint, "prompt": Prompt, "image": ImageSettings, "limits": Limits, "output": Output}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _configure_logging(args.debug, args.verbose)
    try:
        return args.handler(args, argv)
    except JobError as err:
        print(f"caption: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"caption: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caption",
        description="Caption folders of images with a vision-language model behind an OpenAI-compatible API.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"caption {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="log everything and show tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", help="log each retry and error row")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", parents=[common], help="caption a folder into an out folder of Parquet parts",
        description="Caption every image under INPUT and write one row per image to Parquet in --out. "
                    "Rerun the same command to resume: images with an ok row are skipped.",
        epilog=RUN_EXAMPLES + "\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("input", metavar="INPUT", help="folder of images (walked recursively) or one image")
    run.add_argument("--job", required=True, metavar="FILE", help="job file (TOML), e.g. jobs/alt_text.toml")
    run.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)")
    run.add_argument("--allow-job-change", action="store_true",
                     help="add to an out folder made by a job with another fingerprint (model/prompt/image "
                          "settings); its ok rows still count as done")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal)")
    _add_overrides(run)
    run.set_defaults(handler=_cmd_run)

    serve = commands.add_parser(
        "serve", parents=[common], help="run the bundled OpenAI-compatible endpoint (for demos and tests)",
        description="Serve /v1/chat/completions on loopback, captioning from pixels (not a language model).",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--latency-s", type=float, default=0.0, help="median latency per request")
    serve.add_argument("--latency-sigma", type=float, default=0.0, help="lognormal spread of the latency")
    serve.add_argument("--rpm", type=int, help="requests per minute limit (429 above it)")
    serve.add_argument("--tpm", type=int, help="tokens per minute limit")
    serve.add_argument("--concurrency", type=int, help="in-flight limit, answered with a bare 429 as relays do")
    serve.set_defaults(handler=_cmd_serve)
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    """One flag per job field (`--max-side` sets [image] max_side), typed from the dataclasses."""
    group = parser.add_argument_group("job overrides (each sets the job field of the same name)")
    for name, dotted in OVERRIDABLE.items():
        section, field_name = dotted.split(".")
        hint = typing.get_type_hints(_SECTION_TYPES[section])[field_name]
        flag = "--" + name.replace("_", "-")
        dest = "override__" + dotted.replace(".", "__")
        help_text = f"[{section}] {field_name}"
        choices = None
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if typing.get_origin(hint) is typing.Literal:
            choices, kind = typing.get_args(hint), str
        elif inner[0] is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        else:
            kind = inner[0] if inner[0] in (int, float, str) else str
        metavar = None if choices else field_name.upper()
        group.add_argument(flag, dest=dest, type=kind, choices=choices, default=None, metavar=metavar,
                           help=help_text)


def _cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from .runner import run  # imported late: `caption --help` stays fast

    overrides = {
        key.removeprefix("override__").replace("__", "."): value
        for key, value in vars(args).items()
        if key.startswith("override__") and value is not None
    }
    job = load_job(args.job, overrides)
    api_key = resolve_api_key(job)
    headers = resolve_headers(job)
    if api_key:
        _redact(api_key)
    for value in headers.values():
        _redact(value)
    if not Path(args.input).exists():
        raise JobError(f"{args.input}: input folder not found")
    summary = run(job, args.input, args.out, api_key=api_key, headers=headers,
                  allow_job_change=args.allow_job_change, progress=args.progress)
    _print_summary(summary, argv)
    return summary.exit_code


def _print_summary(summary, argv: list[str]) -> None:
    done = summary.ok + summary.errors
    rate = done / summary.wall_s * 60 if summary.wall_s > 0 else 0.0
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary.error_kinds.items()))
    print(f"caption: {summary.ok} ok, {summary.errors} error" + (f" ({kinds})" if kinds else "")
          + f", {summary.skipped} already done; "
          f"{summary.prompt_tokens + summary.completion_tokens:,} tokens ({summary.prompt_tokens:,} in, "
          f"{summary.completion_tokens:,} out); {summary.retries} retries, {summary.rate_limited} rate-limited; "
          f"{summary.wall_s:.1f} s, {rate:.0f} images/min")
    print(f"caption: Parquet in {summary.out}/ (pandas.read_parquet({str(summary.out)!r}) reads it whole)")
    resume = "caption " + shlex.join(argv)
    if summary.fatal:
        print(f"caption: stopped by the provider: {summary.fatal}", file=sys.stderr)
        print(f"caption: fix the cause, then resume with: {resume}", file=sys.stderr)
    elif summary.interrupted:
        print(f"caption: interrupted; resume with: {resume}", file=sys.stderr)
    elif summary.errors:
        print(f"caption: {summary.errors} images ended as error rows; rerunning retries them: {resume}",
              file=sys.stderr)


def _cmd_serve(args: argparse.Namespace, argv: list[str]) -> int:
    from .localserver import serve_forever

    serve_forever(args.host, args.port, latency_s=args.latency_s, latency_sigma=args.latency_sigma,
                  rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency)
    return 0


# --- logging -------------------------------------------------------------------------------

_SECRETS: set[str] = set()
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


class _RedactingFilter(logging.Filter):
    """Blanks API keys and header secrets in every record before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = _BEARER.sub(r"\1[redacted]", message)
        for secret in _SECRETS:
            clean = clean.replace(secret, "[redacted]")
        if clean != message:
            record.msg, record.args = clean, None
        return True


def _redact(secret: str) -> None:
    if len(secret) >= 4:
        _SECRETS.add(secret)


def _configure_logging(debug: bool, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.DEBUG if (debug or verbose) else logging.INFO)
