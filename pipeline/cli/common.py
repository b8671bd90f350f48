"""cli/common.py: what several `caption` commands share.

Owns the exit-code table, the job-override flags (`--max-side` sets [image] max_side) and reading
them back, the API key and header look-up for a loaded job (each secret registered for redaction
before anything can print it), the input-folder check, and the lines printed after a run: the
summary, how to resume, and what batches are still with the provider.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
import typing

from ..errors import JobError
from ..job import OVERRIDABLE, SECTIONS, UNSET, resolve_api_key, resolve_headers
from .logs import redact

__all__ = [
    "EXIT_CODES",
    "add_overrides",
    "job_overrides",
    "job_secrets",
    "require_input",
    "input_location",
    "counts_line",
    "print_run_end",
]

EXIT_CODES = """exit codes:
  0    every image ended ok
  1    the run finished, but some images ended as error rows
  2    bad usage, job file or missing API key (nothing was sent)
  3    stopped by a fatal provider error (bad key, out of credit, unknown model), or every
       request failing the same way
  4    the file system or the OS refused (out folder not writable, disk full, port in use)
  130  interrupted (Ctrl-C / SIGTERM); rerun the same command to resume
  141  stdout was closed early (e.g. piped into `head`)"""


def add_overrides(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
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
    group.add_argument("--unset", action="append", default=[], metavar="FIELD", choices=sorted(OVERRIDABLE),
                       help="drop a field the job file sets, back to its default (e.g. --unset temperature); "
                            "repeatable")


def job_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The job-override flags given on the command line, as {"section.field": value} (`UNSET` for --unset)."""
    overrides: dict[str, object] = {OVERRIDABLE[name]: UNSET for name in getattr(args, "unset", None) or ()}
    overrides.update({key.removeprefix("override__").replace("__", "."): value
                      for key, value in vars(args).items() if key.startswith("override__") and value is not None})
    return overrides


_OS_HINTS = {
    errno.EACCES: "check that it is writable by this user",
    errno.EPERM: "check that it is writable by this user",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOSPC: "the disk is full; free some space and run again (nothing written is lost)",
    errno.EDQUOT: "the disk quota is used up; free some space and run again (nothing written is lost)",
    errno.EADDRINUSE: "the port is in use; choose another with --port",
    errno.EADDRNOTAVAIL: "this machine has no such address; check --host",
}


def os_error_line(err: OSError) -> str:
    """One line for an OS error: the file (or address) it concerns, what went wrong, what to do."""
    where = f"{err.filename}: " if err.filename else ""
    hint = _OS_HINTS.get(err.errno)
    return f"{where}{err.strerror or err}" + (f"; {hint}" if hint else "")


def job_secrets(job) -> tuple[str | None, dict[str, str]]:
    """The job's API key and endpoint headers, each registered for redaction before it is returned."""
    api_key = resolve_api_key(job)
    if api_key:
        redact(api_key)
    headers = resolve_headers(job)
    for value in headers.values():
        redact(value)
    return api_key, headers


def require_input(path: str, settings=None) -> None:
    """A JobError (exit 2, nothing sent) when the input folder or image does not exist, or an
    object-store INPUT (`s3://bucket/prefix/`) cannot be listed or holds no image (`settings`: the
    job's `[input]`, for its storage_options)."""
    from ..sources import input_problem  # imported late: a URL loads fsspec

    problem = input_problem(path, settings)
    if problem is not None:
        raise JobError(f"{path}: {problem}")


def input_location(text: str):
    """An `--input` argument: a local path as a Path, a URL (`s3://bucket/prefix/`) as the string
    it is (a Path would turn `s3://b/x` into `s3:/b/x`)."""
    from pathlib import Path

    from ..sources.fs import is_url

    return text if is_url(text) else Path(text)


def counts_line(summary) -> str:
    """"12 ok, 1 error (bad_image 1)": the ok and error counts of a run or an ingest."""
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary.error_kinds.items()))
    return f"{summary.ok} ok, {summary.errors} error" + (f" ({kinds})" if kinds else "")


def print_run_end(summary, out: str, argv: list[str]) -> None:
    """After `caption run` or `caption batch collect`: the summary, then the batches still with the provider."""
    _print_summary(summary, argv)
    _print_batches_left(summary, out, argv)


def _print_summary(summary, argv: list[str]) -> None:
    """What a run did (stdout), then why it stopped short and how to resume (stderr)."""
    done = summary.ok + summary.errors
    rate = done / summary.wall_s * 60 if summary.wall_s > 0 else 0.0
    print(f"caption: {counts_line(summary)}, {summary.skipped} already done; "
          f"{summary.prompt_tokens + summary.completion_tokens:,} tokens ({summary.prompt_tokens:,} in, "
          f"{summary.completion_tokens:,} out); {summary.retries} retries, {summary.rate_limited} rate-limited; "
          f"{summary.wall_s:.1f} s, {rate:.0f} images/min")
    if summary.skipped_files:  # what the walk passed over: nothing is skipped silently
        print("caption: passed over: " + ", ".join(f"{n} {why}" for why, n in sorted(summary.skipped_files.items())))
    print(f"caption: Parquet in {summary.out}/ (pandas.read_parquet({str(summary.out)!r}) reads it whole)")
    near = getattr(summary, "near_copies", 0)
    copies = getattr(summary, "dedup_copies", 0) - near
    if near:
        print(f"caption: {near} near {'copy' if near == 1 else 'copies'} took the caption of a picture whose "
              "dHash is within [dedupe] max_distance (dedup_of names it, dedup_distance says how far)")
    if copies:
        print(f"caption: {copies} {'copy' if copies == 1 else 'copies'} of identical files took the caption of the "
              "file that was sent (dedup_of names it; no request, no tokens)")
    failed = getattr(summary, "failed", None)
    if failed:
        more = summary.errors - len(failed)
        print(f"caption: failed: {', '.join(failed)}" + (f" (and {more} more)" if more > 0 else ""), file=sys.stderr)
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


def _print_batches_left(summary, out: str, argv: list[str]) -> None:
    """After a batch-mode run: what is still with the provider and how to collect it."""
    live = getattr(summary, "live_batches", 0)
    if live:
        print(f"caption: {live} batches are with the provider ({getattr(summary, 'submitted', 0)} submitted now); "
              f"collect them with: caption batch collect {shlex.quote(out)}   (or: caption {shlex.join(argv)})")
