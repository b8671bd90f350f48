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
from .errors import CaptionError, JobError
from .job import OVERRIDABLE, SECTIONS, load_job, resolve_api_key, resolve_headers

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

EXPORT_EXAMPLES = """examples:
  caption export out/ --to txt --input sample_data            # photo.jpg -> photo.txt beside it
  caption export out/ --to hf --input sample_data --dest ds/ --copy-images
  caption export out/ --to csv --columns model,total_tokens   # -> out.csv beside out/

exit codes:
  0    written (images whose latest row is an error are listed, not exported)
  2    bad usage, not an out folder, or files would be overwritten (nothing written)"""

REVIEW_EXAMPLES = """examples:
  caption review out/ --input sample_data                     # -> out/_review.html
  caption review out/ --input sample_data --errors-first --html review.html
  open the page at a view: out/_review.html#status=error&q=cat&sort=tokens-desc"""

ESTIMATE_EXAMPLES = """examples:
  caption estimate sample_data --job jobs/demo.toml
  caption estimate ~/photos --job jobs/alt_text.toml --expected-output-tokens 40 --models gpt-4.1-nano,gemini-2.5-flash
  caption estimate ~/photos --job jobs/dataset_caption.toml --max-side 768 --mode batch --json

exit codes:
  0    estimated (files that could not be read are counted and named, not fatal)
  2    bad usage, job file, price file or missing input folder"""

REPORT_EXAMPLES = """examples:
  caption report out/
  caption report out/ --input ~/photos            # also: what the images still without an ok row will cost
  caption report out/ --prices my_prices.toml --json

exit codes:
  0    reported
  2    bad usage, price file, or OUT holds no Parquet parts"""



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
    except CaptionError as err:  # the provider refused something no retry cures (e.g. a batch upload)
        print(f"caption: stopped: {_scrub(str(err))}", file=sys.stderr)
        return 3
    except Exception as err:  # a bug: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"caption: internal error: {type(err).__name__}: {_scrub(str(err))} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
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
    run.add_argument("--detach", action="store_true",
                     help="with --mode batch: submit, record, print how to collect, and exit 0")
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
    _add_export_and_review(commands, common)
    _add_estimate_and_report(commands, common)
    _add_batch(commands, common)
    return parser


def _add_overrides(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per job field (`--max-side` sets [image] max_side), typed from the dataclasses.

    `skip` names fields the command defines a flag of its own for (estimate's `--mode`).
    """
    group = parser.add_argument_group("job overrides (each sets the job field of the same name)")
    for name, dotted in OVERRIDABLE.items():
        if name in skip:
            continue
        section, field_name = dotted.split(".")
        hint = typing.get_type_hints(SECTIONS[section])[field_name]
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
    from .engine import run  # imported late: `caption --help` stays fast

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
                  allow_job_change=args.allow_job_change, progress=args.progress, detach=args.detach)
    _print_summary(summary, argv)
    _print_batches_left(summary, args.out, argv)
    return summary.exit_code


def _print_batches_left(summary, out: str, argv: list[str]) -> None:
    """After a batch-mode run: what is still with the provider and how to collect it."""
    live = getattr(summary, "live_batches", 0)
    if live:
        print(f"caption: {live} batches are with the provider ({getattr(summary, 'submitted', 0)} submitted now); "
              f"collect them with: caption batch collect {shlex.quote(out)}   (or: caption {shlex.join(argv)})")


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
        rows = "1 image ended as an error row" if summary.errors == 1 else f"{summary.errors} images ended as error rows"
        print(f"caption: {rows} (caption review {shlex.quote(str(summary.out))} shows each); "
              f"rerunning retries them: {resume}",
              file=sys.stderr)


def _cmd_serve(args: argparse.Namespace, argv: list[str]) -> int:
    from .localserver import serve_forever

    serve_forever(args.host, args.port, latency_s=args.latency_s, latency_sigma=args.latency_sigma,
                  rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency)
    return 0


def _add_export_and_review(commands, common: argparse.ArgumentParser) -> None:
    """The `export` and `review` subcommands: both read an out folder that `caption run` wrote."""
    export = commands.add_parser(
        "export", parents=[common], help="write the captions as sidecar .txt, HF imagefolder, JSONL, CSV or Parquet",
        description="Export the latest ok caption of every image in OUT (a folder written by `caption run`). "
                    "Existing files are never replaced without --overwrite.",
        epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("out", metavar="OUT", help="out folder written by `caption run`")
    export.add_argument("--to", required=True, choices=("txt", "hf", "jsonl", "csv", "parquet"),
                        help="txt: one caption file per image; hf: metadata.jsonl for datasets' imagefolder; "
                             "jsonl/csv: one row per image; parquet: all parts compacted into one file")
    export.add_argument("--dest", metavar="DIR", type=Path,
                        help="where to write (txt: sidecars mirrored under DIR instead of beside the images; "
                             "jsonl/csv/parquet: default beside OUT, named after it)")
    export.add_argument("--input", metavar="DIR", type=Path, help="the image folder `caption run` captioned")
    export.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    export.add_argument("--columns", metavar="A,B", help="more columns for hf, jsonl and csv, e.g. "
                                                         "model,total_tokens (default for jsonl/csv: model and tokens)")
    export.add_argument("--copy-images", action="store_true",
                        help="txt and hf with --dest: copy the exported images under DIR too (a self-contained folder)")
    export.add_argument("--caption-ext", default=".txt", metavar="EXT", help="sidecar extension for txt (default .txt)")
    export.set_defaults(handler=_cmd_export)

    review = commands.add_parser(
        "review", parents=[common], help="write one static HTML page to check the captions by eye",
        description="Write a self-contained HTML page (no server, nothing fetched) showing every image of OUT "
                    "with its caption, tokens, status and error; filter, search and sort in the page.",
        epilog=REVIEW_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    review.add_argument("out", metavar="OUT", help="out folder written by `caption run`")
    review.add_argument("--input", metavar="DIR", type=Path, help="the image folder, for thumbnails")
    review.add_argument("--html", metavar="FILE", type=Path, help="where to write the page (default OUT/_review.html)")
    review.add_argument("--errors-first", action="store_true", help="list error rows before the others")
    review.add_argument("--prices", metavar="FILE", help="a price file whose rows replace the bundled ones (for costs)")
    review.set_defaults(handler=_cmd_review)


def _cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from .readers.export import MAX_LISTED_ERRORS, ExportSettings, export

    columns = None if args.columns is None else tuple(c.strip() for c in args.columns.split(",") if c.strip())
    summary = export(ExportSettings(out=Path(args.out), to=args.to, dest=args.dest, input=args.input,
                                    overwrite=args.overwrite, columns=columns, copy_images=args.copy_images,
                                    caption_ext=args.caption_ext))
    files = f" ({summary.files} files)" if summary.files > 1 else ""
    print(f"caption: exported {summary.exported} captions as {args.to} to {summary.target}{files}")
    if summary.errors:
        print(f"caption: {summary.errors} images have no ok row and were not exported:", file=sys.stderr)
        for row in summary.listed_errors:
            print(f"  {row.image_path}: {row.error_kind}: {row.error}", file=sys.stderr)
        if summary.errors > MAX_LISTED_ERRORS:
            print(f"  ... and {summary.errors - MAX_LISTED_ERRORS} more "
                  f"(caption review {shlex.quote(args.out)} --errors-first lists them all)", file=sys.stderr)
    return 0


def _cmd_review(args: argparse.Namespace, argv: list[str]) -> int:
    from .readers.review import write_review

    from .cost import load_prices

    summary = write_review(Path(args.out), input_dir=args.input, html_path=args.html, errors_first=args.errors_first,
                           prices=load_prices(args.prices))
    print(f"caption: review page of {summary.images} images ({summary.ok} ok, {summary.errors} error, "
          f"{summary.thumbnails} thumbnails) in {summary.html}; open it in a browser")
    return 0


def _add_estimate_and_report(commands, common: argparse.ArgumentParser) -> None:
    estimate = commands.add_parser(
        "estimate", parents=[common], help="what a run would cost and take, from image headers; sends nothing",
        description="Read the header of every image under INPUT (no pixel is decoded, no request is sent), "
                    "apply the job's resize rule and each model's image-token formula, and print tokens, "
                    "cost, time at the job's limits and a comparison of detail and max_side settings. "
                    "Takes the same job-override flags as `caption run`.",
        epilog=ESTIMATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    estimate.add_argument("input", metavar="INPUT", help="folder of images (walked recursively) or one image")
    estimate.add_argument("--job", required=True, metavar="FILE", help="job file (TOML), e.g. jobs/alt_text.toml")
    estimate.add_argument("--expected-output-tokens", type=int, metavar="N",
                          help="completion tokens per image (default: the job's max_tokens, an upper bound)")
    estimate.add_argument("--models", metavar="A,B", help="more models for the comparison table")
    estimate.add_argument("--mode", choices=("online", "batch"), default="online",
                          help="price at list (online) or Batch API prices (default: online)")
    estimate.add_argument("--latency-s", type=float, default=3.0, metavar="S",
                          help="assumed seconds per request for the time estimate (default: 3)")
    estimate.add_argument("--json", action="store_true", help="print JSON, the whole run's figures at the top level")
    _add_overrides(estimate, skip=("mode",))
    estimate.set_defaults(handler=_cmd_estimate)

    report = commands.add_parser(
        "report", parents=[common], help="tokens, cost and throughput of a run, from its Parquet",
        description="Summarise an out folder written by `caption run`: rows by status and error kind, tokens "
                    "and their percentiles per image, cost at list and batch prices, failed attempts, "
                    "throughput over time and, with --input, the projected cost of what is left.",
        epilog=REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("out", metavar="OUT", help="out folder written by `caption run`")
    report.add_argument("--input", metavar="DIR", help="the image folder: project the cost of images without an ok row")
    report.add_argument("--prices", metavar="FILE", help="a TOML price file whose rows replace the bundled ones")
    report.add_argument("--json", action="store_true", help="print JSON")
    report.set_defaults(handler=_cmd_report)


def _cmd_estimate(args: argparse.Namespace, argv: list[str]) -> int:
    from .readers.estimate import estimate, format_estimate

    job = load_job(args.job, _job_overrides(args))
    models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
    result = estimate(job, args.input, models=models, expected_output_tokens=args.expected_output_tokens,
                      mode=args.mode, latency_s=args.latency_s)
    print(format_estimate(result, as_json=args.json))
    return 0


def _cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from .readers.report import format_report, report

    print(format_report(report(args.out, input_dir=args.input, prices_file=args.prices), as_json=args.json))
    return 0


def _job_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The job-override flags given on the command line, as {"section.field": value}."""
    return {key.removeprefix("override__").replace("__", "."): value
            for key, value in vars(args).items() if key.startswith("override__") and value is not None}


# --- logging -------------------------------------------------------------------------------

_SECRETS: set[str] = set()
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


class _RedactingFilter(logging.Filter):
    """Blanks API keys and header secrets in every record before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = _scrub(_BEARER.sub(r"\1[redacted]", message))
        if clean != message:
            record.msg, record.args = clean, None
        return True


def _scrub(text: str) -> str:
    """`text` with every secret of this run (API key, header values) replaced by [redacted]."""
    for secret in _SECRETS:
        text = text.replace(secret, "[redacted]")
    return text


def _redact(secret: str) -> None:
    if len(secret) >= 4:
        _SECRETS.add(secret)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (not the one at set-up, which a caller may have closed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(debug: bool, verbose: bool) -> None:
    handler = _StderrHandler()
    handler.addFilter(_RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.DEBUG if (debug or verbose) else logging.INFO)


# --- batch ---------------------------------------------------------------------------------

BATCH_EXAMPLES = """examples:
  caption run ~/photos --job jobs/alt_text.toml --out alt/ --mode batch --detach
  caption batch status alt/
  caption batch collect alt/                 # collect what ended, submit what is left; exits at once
  caption batch cancel alt/
  caption batch prepare ~/photos --job jobs/alt_text.toml --dest requests/     # for vLLM run_batch
  caption batch ingest alt/ results.jsonl --job jobs/alt_text.toml --prepared requests/

status, collect and cancel read the job from OUT/_batch/_run.json; pass --job FILE when the
endpoint needs [endpoint.headers] (their values are not recorded)."""


def _add_batch(commands, common: argparse.ArgumentParser) -> None:
    batch = commands.add_parser(
        "batch", parents=[common], help="Batch API runs: status, collect, cancel, prepare, ingest",
        description="Look after runs made with `caption run --mode batch`, or work with request files offline.",
        epilog=BATCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = batch.add_subparsers(dest="batch_command", metavar="ACTION", required=True)
    for name, help_text, handler in (
        ("status", "list the batches of OUT and their counts", _cmd_batch_status),
        ("collect", "collect ended batches into rows and submit what is left, then exit", _cmd_batch_collect),
        ("cancel", "cancel the live batches of OUT (the next run collects what ran, resends the rest)",
         _cmd_batch_cancel),
    ):
        action = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        action.add_argument("out", metavar="OUT", help="out folder of a `caption run --mode batch`")
        action.add_argument("--job", metavar="FILE", help="the job file (default: the job recorded in OUT)")
        action.set_defaults(handler=handler)
    prepare = actions.add_parser("prepare", parents=[common], help="write request JSONL files only; send nothing",
                                 description="Write Batch API request files (and index files for ingest) "
                                             "for vLLM's run_batch or an upload by hand.")
    prepare.add_argument("input", metavar="INPUT", help="folder of images or one image")
    prepare.add_argument("--job", required=True, metavar="FILE", help="job file (TOML)")
    prepare.add_argument("--dest", required=True, metavar="DIR", type=Path, help="folder for the JSONL files")
    _add_overrides(prepare)
    prepare.set_defaults(handler=_cmd_batch_prepare)
    ingest = actions.add_parser("ingest", parents=[common], help="turn Batch API output files into rows of OUT",
                                description="Read output/error JSONL files (custom_id = image key) into OUT.")
    ingest.add_argument("out", metavar="OUT", help="out folder to add rows to")
    ingest.add_argument("files", metavar="FILE.jsonl", nargs="+", type=Path, help="output or error files")
    ingest.add_argument("--job", required=True, metavar="FILE", help="the job the requests were prepared with")
    ingest.add_argument("--prepared", metavar="DIR", type=Path,
                        help="the folder `caption batch prepare` wrote: rows get the image facts from it")
    ingest.add_argument("--allow-job-change", action="store_true", help="add to an out folder of another job")
    ingest.set_defaults(handler=_cmd_batch_ingest)


def _batch_job(args: argparse.Namespace):
    from .engine.batch import load_run_job

    job = load_run_job(args.out, args.job)
    api_key = resolve_api_key(job)
    if api_key:
        _redact(api_key)
    headers = resolve_headers(job)
    for value in headers.values():
        _redact(value)
    if job.endpoint.base_url == "local":
        raise JobError(f"{args.out}: was run against the in-process endpoint, whose batches ended with it")
    return job, api_key, headers


def _cmd_batch_status(args: argparse.Namespace, argv: list[str]) -> int:
    import asyncio

    from .engine.batch import batch_status

    job, api_key, headers = _batch_job(args)
    views = asyncio.run(batch_status(args.out, job, api_key=api_key, headers=headers))
    print(f"{'chunk':<12} {'state':<11} {'batch':<32} {'status':<11} {'done':>13} {'failed':>7}")
    for v in views:
        print(f"{v.name:<12} {v.state:<11} {v.batch_id or '-':<32} {v.status or '-':<11} "
              f"{v.completed:>6}/{v.total:<6} {v.failed:>7}")
    return 0


def _cmd_batch_collect(args: argparse.Namespace, argv: list[str]) -> int:
    import asyncio

    from .engine.batch import run_batch

    job, api_key, headers = _batch_job(args)
    summary = asyncio.run(run_batch(job, None, args.out, api_key=api_key, headers=headers, detach=True))
    _print_summary(summary, argv)
    _print_batches_left(summary, args.out, argv)
    return summary.exit_code


def _cmd_batch_cancel(args: argparse.Namespace, argv: list[str]) -> int:
    import asyncio

    from .engine.batch import cancel_batches

    job, api_key, headers = _batch_job(args)
    ids = asyncio.run(cancel_batches(args.out, job, api_key=api_key, headers=headers))
    print(f"caption: asked to cancel {len(ids)} batches" + (f": {', '.join(ids)}" if ids else ""))
    if ids:
        print(f"caption: collect what they finished with: caption batch collect {shlex.quote(args.out)}")
    return 0


def _cmd_batch_prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from .engine.batch import prepare_requests

    job = load_job(args.job, _job_overrides(args))
    if not Path(args.input).exists():
        raise JobError(f"{args.input}: input folder not found")
    summary = prepare_requests(job, args.input, args.dest)
    print(f"caption: {summary.requests} requests in {len(summary.files)} files under {args.dest}/")
    for key, why in summary.bad_images:
        print(f"  skipped {key}: {why}", file=sys.stderr)
    return 0


def _cmd_batch_ingest(args: argparse.Namespace, argv: list[str]) -> int:
    from .engine.batch import ingest_outputs

    job = load_job(args.job)
    summary = ingest_outputs(job, args.out, args.files, prepared=args.prepared,
                             allow_job_change=args.allow_job_change)
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary.error_kinds.items()))
    print(f"caption: {summary.ok} ok, {summary.errors} error" + (f" ({kinds})" if kinds else "")
          + f", {summary.skipped} already ok; Parquet in {args.out}/")
    return 1 if summary.errors else 0
