"""cli/compare.py: the `caption compare` command.

Parses its flags, calls the one entry point (`readers.compare.compare`, imported late so `caption
--help` stays fast) and prints what came back: each variant's run line and where the page went.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_CODES, add_overrides, counts_line, job_overrides, job_secrets

__all__ = ["COMPARE_EXAMPLES", "add_commands"]

COMPARE_EXAMPLES = """examples:
  caption compare sample_data --jobs jobs/demo.toml,jobs/demo_short.toml --sample 5 --out cmp/
  caption compare ~/photos --jobs jobs/alt_text.toml --models gpt-4.1-mini,gpt-4.1-nano --sample 20 --out cmp/
  caption compare ~/photos --jobs a.toml,b.toml --sample 50 --sample-seed 2 --out cmp/ --concurrency 4
"""


def add_commands(commands, common_flags: argparse.ArgumentParser) -> None:
    """Add `compare` to the subparsers `commands`; `common_flags` is the --debug/-v parent."""
    compare = commands.add_parser(
        "compare", parents=[common_flags], help="run job variants on the same sample; one page side by side",
        description="Run each job (times each of --models) on the same sample of INPUT into DIR/<variant>/ "
                    "(ordinary out folders: rerun to resume, or run the full job into one later), then write "
                    "DIR/_compare.html: each image once with every variant's caption, tokens, cost and "
                    "latency, per-variant totals, and each variant's projected cost and time for the whole "
                    "INPUT. Without --sample or --limit the sample is 20 images.",
        epilog=COMPARE_EXAMPLES + "\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("input", metavar="INPUT", help="folder of images (walked recursively) or one image")
    compare.add_argument("--jobs", required=True, metavar="A.toml,B.toml", help="job files, one variant each")
    compare.add_argument("--models", metavar="M1,M2", help="run every job once per model (variant: job+model)")
    compare.add_argument("--out", required=True, metavar="DIR", type=Path,
                         help="folder for the variants' out folders and the page (created; resumed)")
    compare.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar (default: when stderr is a terminal)")
    add_overrides(compare)
    compare.set_defaults(handler=_cmd_compare)


def _cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from ..readers.compare import CompareSettings, compare

    settings = CompareSettings(input=args.input, jobs=tuple(Path(p) for p in _names(args.jobs)),
                               out=args.out, models=tuple(_names(args.models or "")),
                               overrides=job_overrides(args), progress=args.progress)
    summary = compare(settings, job_secrets)
    for name, run in summary.runs:
        print(f"caption: {name}: {counts_line(run)}, {run.skipped} already done; "
              f"{run.prompt_tokens + run.completion_tokens:,} tokens; out folder {args.out / name}/")
    if summary.page is not None:
        print(f"caption: comparison page of {summary.page.images} images in {summary.page.html}; "
              "open it in a browser")
    return summary.exit_code


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
