"""cli/readers.py: the commands that read without captioning: `export`, `review`, `estimate`, `report`.

Parses their flags, calls the one entry point of each (in `pipeline.readers`, imported late so
`caption --help` stays fast) and prints what came back. `estimate` reads image headers and sends
nothing; the other three read an out folder that `caption run` wrote.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..job import load_job
from .common import add_overrides, input_location, job_overrides

__all__ = ["EXPORT_EXAMPLES", "REVIEW_EXAMPLES", "ESTIMATE_EXAMPLES", "REPORT_EXAMPLES", "add_commands"]

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
  caption review cmp/demo cmp/demo_short --input sample_data  # side by side -> cmp/demo/_compare.html
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


def add_commands(commands, common_flags: argparse.ArgumentParser) -> None:
    """Add `export`, `review`, `estimate` and `report` to `commands`; `common_flags` is the --debug/-v parent."""
    _add_export(commands, common_flags)
    _add_review(commands, common_flags)
    _add_estimate(commands, common_flags)
    _add_report(commands, common_flags)


def _add_export(commands, common_flags: argparse.ArgumentParser) -> None:
    export = commands.add_parser(
        "export", parents=[common_flags],
        help="write the captions as sidecar .txt, HF imagefolder, JSONL, CSV or Parquet",
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
    export.add_argument("--input", metavar="DIR", type=input_location,
                        help="the image folder `caption run` captioned (or its s3://... URL)")
    export.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    export.add_argument("--columns", metavar="A,B", help="more columns for hf, jsonl and csv, e.g. "
                                                         "model,total_tokens (default for jsonl/csv: model and tokens)")
    export.add_argument("--copy-images", action="store_true",
                        help="txt and hf with --dest: copy the exported images under DIR too (a self-contained folder)")
    export.add_argument("--no-card", action="store_true",
                        help="hf: write metadata.jsonl only, not README.md (the dataset card)")
    export.add_argument("--caption-ext", default=".txt", metavar="EXT", help="sidecar extension for txt (default .txt)")
    export.set_defaults(handler=_cmd_export)


def _add_review(commands, common_flags: argparse.ArgumentParser) -> None:
    review = commands.add_parser(
        "review", parents=[common_flags], help="write one static HTML page to check the captions by eye",
        description="Write a self-contained HTML page (no server, nothing fetched) showing every image of OUT "
                    "with its caption, tokens, status and error; filter, search and sort in the page.",
        epilog=REVIEW_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    review.add_argument("out", metavar="OUT", nargs="+",
                        help="out folder written by `caption run`; several: one page, side by side")
    review.add_argument("--input", metavar="DIR", type=input_location,
                        help="the image folder (or its s3://... URL), for thumbnails")
    review.add_argument("--html", metavar="FILE", type=Path,
                        help="where to write the page (default OUT/_review.html; several: OUT_A/_compare.html)")
    review.add_argument("--errors-first", action="store_true", help="list error rows before the others")
    review.add_argument("--prices", metavar="FILE", help="a price file whose rows replace the bundled ones (for costs)")
    review.set_defaults(handler=_cmd_review)


def _add_estimate(commands, common_flags: argparse.ArgumentParser) -> None:
    estimate = commands.add_parser(
        "estimate", parents=[common_flags], help="what a run would cost and take, from image headers; sends nothing",
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
    add_overrides(estimate, skip=("mode",))
    estimate.set_defaults(handler=_cmd_estimate)


def _add_report(commands, common_flags: argparse.ArgumentParser) -> None:
    report = commands.add_parser(
        "report", parents=[common_flags], help="tokens, cost and throughput of a run, from its Parquet",
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


def _cmd_export(args: argparse.Namespace, argv: list[str]) -> int:
    from ..readers.export import MAX_LISTED_ERRORS, ExportSettings, export

    columns = None if args.columns is None else tuple(c.strip() for c in args.columns.split(",") if c.strip())
    summary = export(ExportSettings(out=Path(args.out), to=args.to, dest=args.dest, input=args.input,
                                    overwrite=args.overwrite, columns=columns, copy_images=args.copy_images,
                                    caption_ext=args.caption_ext, card=not args.no_card))
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
    from ..readers.review import Variant, write_comparison, write_review

    from ..cost import load_prices

    if len(args.out) > 1:
        names = [Path(out).resolve().name for out in args.out]
        names = names if len(set(names)) == len(names) else args.out  # cmp/a and old/a: their paths
        summary = write_comparison([Variant(name, Path(out)) for name, out in zip(names, args.out)],
                                   input_dir=args.input, html_path=args.html, errors_first=args.errors_first,
                                   prices=load_prices(args.prices))
    else:
        summary = write_review(Path(args.out[0]), input_dir=args.input, html_path=args.html,
                               errors_first=args.errors_first, prices=load_prices(args.prices))
    print(f"caption: review page of {summary.images} images ({summary.ok} ok, {summary.errors} error, "
          f"{summary.thumbnails} thumbnails) in {summary.html}; open it in a browser")
    return 0


def _cmd_estimate(args: argparse.Namespace, argv: list[str]) -> int:
    from ..readers.estimate import estimate, format_estimate

    job = load_job(args.job, job_overrides(args))
    models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
    result = estimate(job, args.input, models=models, expected_output_tokens=args.expected_output_tokens,
                      mode=args.mode, latency_s=args.latency_s)
    print(format_estimate(result, as_json=args.json))
    return 0


def _cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from ..readers.report import format_report, report

    print(format_report(report(args.out, input_dir=args.input, prices_file=args.prices), as_json=args.json))
    return 0
