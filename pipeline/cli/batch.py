"""cli/batch.py: the `caption batch` subcommands: status, collect, cancel, prepare, ingest.

Parses their flags, calls the one entry point of each in `engine.batch` (imported late, so
`caption --help` stays fast) and prints what came back. status, collect and cancel read the job
recorded in the out folder; prepare and ingest work with request files offline.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import JobError
from ..job import load_job
from .common import add_overrides, counts_line, job_overrides, job_secrets, print_run_end, require_input

__all__ = ["BATCH_EXAMPLES", "add_commands"]

BATCH_EXAMPLES = """examples:
  caption run ~/photos --job jobs/alt_text.toml --out alt/ --mode batch --detach
  caption batch status alt/
  caption batch collect alt/                 # collect what ended, submit what is left; exits at once
  caption batch cancel alt/
  caption batch prepare ~/photos --job jobs/alt_text.toml --dest requests/     # for vLLM run_batch
  caption batch ingest alt/ results.jsonl --job jobs/alt_text.toml --prepared requests/

status, collect and cancel read the job from OUT/_batch/_run.json; pass --job FILE when the
endpoint needs [endpoint.headers] (their values are not recorded)."""


def add_commands(commands, common_flags: argparse.ArgumentParser) -> None:
    """Add `batch` and its actions to `commands`; `common_flags` is the --debug/-v parent."""
    batch = commands.add_parser(
        "batch", parents=[common_flags], help="Batch API runs: status, collect, cancel, prepare, ingest",
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
        action = actions.add_parser(name, parents=[common_flags], help=help_text, description=help_text)
        action.add_argument("out", metavar="OUT", help="out folder of a `caption run --mode batch`")
        action.add_argument("--job", metavar="FILE", help="the job file (default: the job recorded in OUT)")
        action.set_defaults(handler=handler)
    _add_prepare(actions, common_flags)
    _add_ingest(actions, common_flags)


def _add_prepare(actions, common_flags: argparse.ArgumentParser) -> None:
    prepare = actions.add_parser("prepare", parents=[common_flags], help="write request JSONL files only; send nothing",
                                 description="Write Batch API request files (and index files for ingest) "
                                             "for vLLM's run_batch or an upload by hand.")
    prepare.add_argument("input", metavar="INPUT", help="folder of images or one image")
    prepare.add_argument("--job", required=True, metavar="FILE", help="job file (TOML)")
    prepare.add_argument("--dest", required=True, metavar="DIR", type=Path, help="folder for the JSONL files")
    add_overrides(prepare)
    prepare.set_defaults(handler=_cmd_batch_prepare)


def _add_ingest(actions, common_flags: argparse.ArgumentParser) -> None:
    ingest = actions.add_parser("ingest", parents=[common_flags], help="turn Batch API output files into rows of OUT",
                                description="Read output/error JSONL files (custom_id = image key) into OUT.")
    ingest.add_argument("out", metavar="OUT", help="out folder to add rows to")
    ingest.add_argument("files", metavar="FILE.jsonl", nargs="+", type=Path, help="output or error files")
    ingest.add_argument("--job", required=True, metavar="FILE", help="the job the requests were prepared with")
    ingest.add_argument("--prepared", metavar="DIR", type=Path,
                        help="the folder `caption batch prepare` wrote: rows get the image facts from it")
    ingest.add_argument("--allow-job-change", action="store_true", help="add to an out folder of another job")
    ingest.set_defaults(handler=_cmd_batch_ingest)


def _batch_job(args: argparse.Namespace):
    """The job recorded in OUT (or --job), its API key and headers, for a run the provider still holds."""
    from ..engine.batch import load_run_job

    job = load_run_job(args.out, args.job)
    api_key, headers = job_secrets(job)
    if job.endpoint.base_url == "local":
        raise JobError(f"{args.out}: was run against the in-process endpoint, whose batches ended with it")
    return job, api_key, headers


def _cmd_batch_status(args: argparse.Namespace, argv: list[str]) -> int:
    import asyncio

    from ..engine.batch import batch_status

    job, api_key, headers = _batch_job(args)
    views = asyncio.run(batch_status(args.out, job, api_key=api_key, headers=headers))
    print(f"{'chunk':<12} {'state':<11} {'batch':<32} {'status':<11} {'done':>13} {'failed':>7}")
    for v in views:
        print(f"{v.name:<12} {v.state:<11} {v.batch_id or '-':<32} {v.status or '-':<11} "
              f"{v.completed:>6}/{v.total:<6} {v.failed:>7}")
    return 0


def _cmd_batch_collect(args: argparse.Namespace, argv: list[str]) -> int:
    import asyncio

    from ..engine.batch import run_batch

    job, api_key, headers = _batch_job(args)
    summary = asyncio.run(run_batch(job, None, args.out, api_key=api_key, headers=headers, detach=True))
    print_run_end(summary, args.out, argv)
    return summary.exit_code


def _cmd_batch_cancel(args: argparse.Namespace, argv: list[str]) -> int:
    import asyncio

    from ..engine.batch import cancel_batches

    job, api_key, headers = _batch_job(args)
    ids = asyncio.run(cancel_batches(args.out, job, api_key=api_key, headers=headers))
    print(f"caption: asked to cancel {len(ids)} batches" + (f": {', '.join(ids)}" if ids else ""))
    if ids:
        print(f"caption: collect what they finished with: caption batch collect {shlex.quote(args.out)}")
    return 0


def _cmd_batch_prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from ..engine.batch import prepare_requests

    job = load_job(args.job, job_overrides(args))
    require_input(args.input, job.input)
    summary = prepare_requests(job, args.input, args.dest)
    print(f"caption: {summary.requests} requests in {len(summary.files)} files under {args.dest}/")
    for key, why in summary.bad_images:
        print(f"  skipped {key}: {why}", file=sys.stderr)
    return 0


def _cmd_batch_ingest(args: argparse.Namespace, argv: list[str]) -> int:
    from ..engine.batch import ingest_outputs

    job = load_job(args.job)
    summary = ingest_outputs(job, args.out, args.files, prepared=args.prepared,
                             allow_job_change=args.allow_job_change)
    print(f"caption: {counts_line(summary)}, {summary.skipped} already ok or ingested; Parquet in {args.out}/")
    if summary.refused or summary.unreadable:
        print(f"caption: {summary.refused} refused (a custom_id that was not prepared, or no relative path), "
              f"{summary.unreadable} unreadable (not a result line); no row was written for them", file=sys.stderr)
    return 1 if summary.errors else 0
