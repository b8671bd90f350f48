"""cli/run.py: the `caption run` and `caption serve` commands.

Parses their flags, calls the one entry point (`engine.run`, `localserver.serve_forever`) and prints
what came back. Both are imported late, inside the command, so `caption --help` stays fast.
"""

from __future__ import annotations

import argparse

from ..errors import JobError
from ..job import load_job
from .common import EXIT_CODES, add_overrides, job_overrides, job_secrets, print_run_end, require_input

__all__ = ["RUN_EXAMPLES", "SERVE_EXAMPLES", "add_commands"]

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


def add_commands(commands, common_flags: argparse.ArgumentParser) -> None:
    """Add `run` and `serve` to the subparsers `commands`; `common_flags` is the --debug/-v parent."""
    _add_run(commands, common_flags)
    _add_serve(commands, common_flags)


def _add_run(commands, common_flags: argparse.ArgumentParser) -> None:
    run = commands.add_parser(
        "run", parents=[common_flags], help="caption a folder into an out folder of Parquet parts",
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
    run.add_argument("--detach", action="store_true",
                     help="with --mode batch: submit, record, print how to collect, and exit 0")
    add_overrides(run)
    run.set_defaults(handler=_cmd_run)


def _add_serve(commands, common_flags: argparse.ArgumentParser) -> None:
    serve = commands.add_parser(
        "serve", parents=[common_flags], help="run the bundled OpenAI-compatible endpoint (for demos and tests)",
        description="Serve /v1/chat/completions on loopback, captioning from pixels (not a language model).",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (0: any free port)")
    serve.add_argument("--latency-s", type=float, default=0.0,
                       help="median latency per request, seconds (default 0: answer at once)")
    serve.add_argument("--latency-sigma", type=float, default=0.0, help="lognormal spread of the latency")
    serve.add_argument("--rpm", type=int, help="requests per minute limit (429 above it)")
    serve.add_argument("--tpm", type=int, help="tokens per minute limit")
    serve.add_argument("--concurrency", type=int, help="in-flight limit, answered with a bare 429 as relays do")
    serve.set_defaults(handler=_cmd_serve)


def _cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..engine import run  # imported late: `caption --help` stays fast

    job = load_job(args.job, job_overrides(args))
    if args.detach and job.endpoint.mode != "batch":
        raise JobError("--detach goes with batch mode: add --mode batch (or set [endpoint] mode = \"batch\")")
    api_key, headers = job_secrets(job)
    require_input(args.input, job.input)
    summary = run(job, args.input, args.out, api_key=api_key, headers=headers,
                  allow_job_change=args.allow_job_change, progress=args.progress, detach=args.detach)
    print_run_end(summary, args.out, argv)
    return summary.exit_code


def _cmd_serve(args: argparse.Namespace, argv: list[str]) -> int:
    from ..localserver import serve_forever

    serve_forever(args.host, args.port, latency_s=args.latency_s, latency_sigma=args.latency_sigma,
                  rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency)
    return 0


def _port(text: str) -> int:
    """A TCP port number, for argparse (a one-line usage error otherwise)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: give 1-65535 (or 0 for any free port)")
    return port
