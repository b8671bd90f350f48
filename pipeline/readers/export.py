"""readers/export.py: an out folder's captions, written where they are used: sidecar .txt, HF imagefolder (with its dataset card), JSONL, CSV, Parquet.

A reader: it reads what `caption run` wrote (through `store.iter_latest_rows`) and never changes
the out folder, sends nothing and decodes no image. Each image's latest row decides, by the
store's one rule (`store.LatestRows`), as it does for resume; images whose latest row is an error
are listed, not exported. Images are found again through the input's source (`open_by_key`).

Memory: two passes over the parts; the first keeps 8 bytes a row while it runs and then only the
few rows a later row replaced; the second streams the latest rows into the output files.

Every file is written atomically: to a hidden temp file beside it, then moved into place. Nothing
existing is replaced unless `overwrite` is set; the check runs over every target before the first
write, and the final move of each file refuses to clobber a file that appeared meanwhile.

Writes stay under their destination: every target is resolved (links and all) and must lie under
the resolved `--dest` (or `--input`, for sidecars beside the images), before the first write and
again just before its own; a link is never written through. A destination inside an out folder is
refused, since readers of that folder would take the export for data.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import JobError
from ..sources import ImageSource, input_problem, is_url, is_webdataset, open_source
from ..sources.folder import key_path, unescape_key
from ..store import (JOB_FILE, SCHEMA, LatestRows, check_out_folder, iter_latest_rows, json_value, open_atomic,
                     recorded_kept_schema, with_kept)
from .card import CARD_FILE, is_own_card, render_card
from .inputs import run_input_settings
from .report import Report, report

__all__ = [
    "FORMATS",
    "ExportSettings",
    "ErrorRow",
    "ExportSummary",
    "export",
    "run_input_settings",
]

log = logging.getLogger(__name__)

Format = Literal["txt", "hf", "jsonl", "csv", "parquet"]
FORMATS: tuple[str, ...] = ("txt", "hf", "jsonl", "csv", "parquet")

DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "hf": (),
    "jsonl": ("model", "prompt_tokens", "completion_tokens", "total_tokens"),
    "csv": ("model", "prompt_tokens", "completion_tokens", "total_tokens"),
}
"""Columns written after the path and the caption, per format, when --columns is not given."""

HF_METADATA = "metadata.jsonl"
"""The file name the Hugging Face ImageFolder builder looks for beside the images. Each line holds
`file_name` (the image's path relative to the folder holding metadata.jsonl) and any other
columns, which become dataset features:
https://huggingface.co/docs/datasets/image_dataset#imagefolder ("Image captioning" / metadata)."""

MAX_CARD_BYTES = 1 << 20
"""A README.md larger than this where the card goes is not read: it is not a card this tool wrote."""

MAX_LISTED_ERRORS = 20
"""Images without an ok row beyond this many are counted, not listed."""

PARQUET_BATCH_ROWS = 10_000
"""Rows per write to the compacted Parquet file: bounds memory and sets the row-group granularity."""

_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """What `caption export` was asked to do."""

    out: Path  # the out folder written by `caption run`
    to: Format
    dest: Path | None = None  # folder to write into; per-format default when None
    input: Path | str | None = None  # the image folder the run captioned (image_path is relative to it), or its URL
    overwrite: bool = False  # replace existing files instead of refusing
    columns: tuple[str, ...] | None = None  # extra columns (hf, jsonl, csv); None: DEFAULT_COLUMNS
    copy_images: bool = False  # also copy each exported image under dest (txt, hf)
    caption_ext: str = ".txt"  # sidecar extension (txt)
    card: bool = True  # hf: also write README.md, the dataset card (readers/card.py)


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """An image whose latest row is an error: listed, not exported."""

    image_path: str
    error_kind: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What an export wrote."""

    target: Path  # the file written, or the folder the files went into
    exported: int  # images exported (one caption each)
    files: int  # files written
    errors: int  # images left out because their latest row is an error
    listed_errors: tuple[ErrorRow, ...]  # the first MAX_LISTED_ERRORS of them


def _under(root: Path, image_path: str) -> Path:
    """Where an image's file goes under `root`; JobError for a key that climbs out of it."""
    path = key_path(root, image_path)
    if path is None:
        raise _outside(image_path)
    return path


def _checked(root: Path, target: Path) -> Path:
    """`target`, once it is sure that writing it writes under `root`: its folder, links resolved,
    is `root` (resolved) or below it, and it is not itself a link. JobError otherwise."""
    real_root = os.path.realpath(root)
    real_folder = os.path.realpath(target.parent)
    if real_folder != real_root and not real_folder.startswith(real_root.rstrip(os.sep) + os.sep):
        raise JobError(f"{target}: its folder leads out of {root} (to {real_folder}) through a link; "
                       "nothing is written outside the destination. Export with --dest DIR instead")
    if os.path.islink(target):
        raise JobError(f"{target}: is a link; export writes no file through one. Remove it or choose another --dest")
    return target


def _refuse_out_folder(folder: Path, flag: str) -> None:
    """JobError when `folder` is an out folder of `caption run` or inside one: the export would
    become part of that folder's data (`pd.read_parquet(OUT)` would read it too)."""
    real = Path(os.path.realpath(folder))
    for ancestor in (real, *real.parents):
        if (ancestor / JOB_FILE).is_file():
            raise JobError(f"{flag} {folder}: is inside the out folder {ancestor}; readers of that folder would "
                           "take the export for data. Choose a folder outside it")


def _outside(image_path: str) -> JobError:
    return JobError(f"image_path {image_path!r} is not a path inside the input folder; refusing to use it")


def _readable(source: ImageSource, image_path: str) -> bool:
    """Can the image be read from the input? JobError for a key that cannot name one of its images."""
    item = source.open_by_key(image_path)
    if item is None:
        raise _outside(image_path)
    try:
        with item.open():
            return True
    except OSError:
        return False


# --- the export ----------------------------------------------------------------------------


def export(settings: ExportSettings) -> ExportSummary:
    """Write the latest ok caption of every image in `settings.out` as `settings.to`.

    Raises JobError (before anything is written) for a folder that is not an out folder, flags
    that do not fit the format, a missing --input, images not found under --input, two images that
    would share one sidecar, or existing files without `overwrite`.
    """
    check_out_folder(settings.out)
    _check_settings(settings)
    _refuse_out_folder(_write_root(settings), "--dest" if settings.dest is not None else "the destination")
    latest = LatestRows.read(settings.out)
    errors, listed, exported = _check_targets(settings, latest)
    target, files = _WRITERS[settings.to](settings, latest)
    log.debug("exported %d captions as %s to %s", exported, settings.to, target)
    return ExportSummary(target=target, exported=exported, files=files, errors=errors,
                         listed_errors=tuple(listed))


def _check_settings(settings: ExportSettings) -> None:
    to = settings.to
    if to not in FORMATS:
        raise JobError(f"--to {to}: unknown format; choose one of {', '.join(FORMATS)}")
    if settings.columns is not None:
        if to not in DEFAULT_COLUMNS:
            raise JobError(f"--columns applies to --to hf, jsonl and csv, not {to}")
        names = [*SCHEMA.names, *kept_columns(settings.out).names]  # kept columns come along anyway
        unknown = [c for c in settings.columns if c not in names]
        if unknown:
            raise JobError(f"--columns: no column {', '.join(unknown)}; the columns are {', '.join(names)}")
    if settings.copy_images and (to not in ("txt", "hf") or settings.dest is None or settings.input is None):
        raise JobError("--copy-images needs --to txt or hf, with --dest (where to copy) and --input (from where)")
    if to == "hf" and settings.dest is not None and not settings.copy_images:
        raise JobError("--to hf --dest DIR needs --copy-images: an imagefolder dataset keeps the images "
                       "beside metadata.jsonl (or leave out --dest to write metadata.jsonl into --input)")
    if to in ("txt", "hf") and settings.dest is None and settings.input is None:
        raise JobError(f"--to {to} writes beside the images: name their folder with --input DIR "
                       f"(or give --dest DIR{' --copy-images' if to == 'hf' else ''})")
    if to != "hf" and not settings.card:
        raise JobError(f"--no-card applies to --to hf, not {to}")
    if to != "txt" and settings.caption_ext != ".txt":
        raise JobError(f"--caption-ext applies to --to txt, not {to}")
    if not re.fullmatch(r"\.[A-Za-z0-9_-]+", settings.caption_ext):
        raise JobError(f"--caption-ext {settings.caption_ext!r}: give a dot and letters, e.g. .txt or .caption")
    shards = settings.input is not None and is_webdataset(settings.input, run_input_settings(settings.out))
    if shards:
        _check_shard_export(settings)
    if to in ("txt", "hf") and settings.dest is None and is_url(str(settings.input)):
        raise JobError(f"--to {to} writes beside the images, and --input {settings.input} is an object store: "
                       f"give --dest DIR{' --copy-images' if to == 'hf' else ''} to write a local folder instead")
    if settings.input is not None and (problem := input_problem(settings.input, run_input_settings(settings.out),
                                                                folder=True)):
        raise JobError(f"--input {settings.input}: {problem}")
    if to in ("txt", "hf") and settings.input is not None and not is_url(str(settings.input)) and not shards and \
            Path(settings.input).is_file() and (settings.dest is None or settings.copy_images):
        raise JobError(f"--to {to} writes beside image files in a folder, and --input {settings.input} is a file "
                       "(a table); export it --to parquet, jsonl or csv and join on the kept columns")


def _check_shard_export(settings: ExportSettings) -> None:
    """WebDataset shards as --input: images live inside tar files, so nothing is written beside them."""
    if settings.to == "hf" or settings.copy_images:
        raise JobError(f"--input {settings.input}: the images are inside WebDataset shards; --to hf and "
                       "--copy-images need image files (export txt --dest DIR, jsonl, csv or parquet)")
    if settings.to == "txt" and settings.dest is None:
        raise JobError(f"--to txt --input {settings.input}: the images are inside WebDataset shards; "
                       "give --dest DIR for the sidecar files")


def _check_targets(settings: ExportSettings, latest: LatestRows) -> tuple[int, list[ErrorRow], int]:
    """Collect the error rows, check every file the export would write; return (errors, listed, ok)."""
    errors, listed, exported = 0, [], 0
    targets: dict[Path, str] = {}
    missing, first_missing = 0, ""
    source = _source(settings)
    columns = ["status", "error_kind", "error"]
    for row in iter_latest_rows(settings.out, columns, latest):
        if row["status"] != "ok":
            errors += 1
            if len(listed) < MAX_LISTED_ERRORS:
                listed.append(ErrorRow(row["image_path"], row["error_kind"], row["error"]))
            continue
        exported += 1
        path = row["image_path"]
        if source is not None and not _readable(source, path):
            missing, first_missing = missing + 1, first_missing or path
        for target in _per_image_targets(settings, path):
            if target in targets:
                first, second = sorted((targets[target], path))
                raise JobError(f"{first} and {second} would both write {target}; rename one of them")
            targets[target] = path
    if missing:
        raise JobError(f"--input {settings.input}: {missing} of {exported} captioned images are not there "
                       f"(e.g. {first_missing}); is it the folder `caption run` captioned?")
    _refuse_overwrites([*targets, *_single_targets(settings)], settings.overwrite)
    if settings.to == "hf" and settings.card:
        _refuse_edited_card(_card_target(settings), settings.overwrite)
    return errors, listed, exported


def _source(settings: ExportSettings) -> ImageSource | None:
    """The input's source, opened as the run that wrote the out folder read it."""
    return None if settings.input is None else open_source(settings.input, run_input_settings(settings.out))


def _write_root(settings: ExportSettings) -> Path:
    """The folder every file of this export goes under."""
    if settings.dest is not None:
        return settings.dest
    return settings.input if settings.to in ("txt", "hf") else settings.out.resolve().parent


def _per_image_targets(settings: ExportSettings, image_path: str) -> list[Path]:
    """The files one exported image makes: its sidecar (txt) and its copy (--copy-images), each
    checked to write under its root (`_checked`)."""
    found: list[Path] = []
    if settings.to == "txt":
        root = settings.dest or settings.input
        image = _under(root, image_path)
        found.append(_checked(root, image.with_name(image.stem + settings.caption_ext)))
    if settings.copy_images:
        found.append(_checked(settings.dest, _under(settings.dest, image_path)))
    return found


def _single_targets(settings: ExportSettings) -> list[Path]:
    return [] if settings.to == "txt" else [_single_target(settings)]


def _single_target(settings: ExportSettings) -> Path:
    """The one file of the hf, jsonl, csv and parquet formats.

    hf: metadata.jsonl in the folder holding the images (--dest with --copy-images, else --input).
    Others: `<out folder name>.<format>` in --dest, by default beside the out folder, so that
    `caption export runs/alt --to csv` gives `runs/alt.csv`.
    """
    root = _write_root(settings)
    if settings.to == "hf":
        return _checked(root, root / HF_METADATA)
    return _checked(root, root / f"{settings.out.resolve().name}.{settings.to}")


def _card_target(settings: ExportSettings) -> Path:
    """README.md, the dataset card, beside metadata.jsonl (hf only)."""
    root = _write_root(settings)
    return _checked(root, root / CARD_FILE)


def _refuse_edited_card(card: Path, overwrite: bool) -> None:
    """JobError when a README.md where the card goes is not a card this tool wrote and nobody edited
    since (its marker's hash, `card.is_own_card`), unless `overwrite`. An own, unedited card is
    simply refreshed: its figures are the export's to keep current."""
    if overwrite or not os.path.lexists(card):
        return
    try:
        own = card.is_file() and card.stat().st_size <= MAX_CARD_BYTES and is_own_card(
            card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        own = False
    if not own:
        raise JobError(f"{card}: a README.md that caption did not write, or a card edited since; nothing "
                       "written. Pass --overwrite to replace it, --no-card to leave it be, or choose another --dest")


def _refuse_overwrites(targets: list[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [t for t in targets if os.path.lexists(t)]
    if existing:
        many = f"{len(existing)} files" if len(existing) > 1 else "1 file"
        raise JobError(f"{many} would be overwritten (e.g. {existing[0]}); nothing written. "
                       "Pass --overwrite to replace them, or choose another --dest")


# --- the writers ---------------------------------------------------------------------------


def _iter_ok_rows(settings: ExportSettings, latest: LatestRows, columns: Iterable[str]) -> Iterator[dict[str, Any]]:
    for row in iter_latest_rows(settings.out, ["status", *columns], latest):
        if row["status"] == "ok":
            yield row


def _extra_columns(settings: ExportSettings) -> list[str]:
    chosen = DEFAULT_COLUMNS[settings.to] if settings.columns is None else settings.columns
    return [c for c in dict.fromkeys(chosen) if c not in ("image_path", "caption")]


def kept_columns(out: Path) -> pa.Schema:
    """The input columns the run kept ([input] keep_columns, as `_job.json` records them): every
    export of rows carries them, so that it joins back to the input table."""
    try:
        return recorded_kept_schema(json.loads((out / JOB_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return pa.schema([])


def _write_txt(settings: ExportSettings, latest: LatestRows) -> tuple[Path, int]:
    """One `<stem><caption_ext>` per image, beside it under --input or mirrored under --dest.

    The caption goes on one line: kohya-ss/sd-scripts reads a DreamBooth-style subset's caption from
    the file named like the image with `caption_extension` (".txt" in docs/config_README-en.md) and
    keeps only its first line, so line breaks in a caption become spaces. OneTrainer and similar
    trainers read the same sidecars.
    """
    root = settings.dest or settings.input
    files = 0
    for row in _iter_ok_rows(settings, latest, ["caption"]):
        sidecar, *copy = _per_image_targets(settings, row["image_path"])
        text = _LINE_BREAKS.sub(" ", (row["caption"] or "").strip())
        with open_atomic(sidecar, settings.overwrite) as handle:
            handle.write(text + "\n")
        files += 1 + _copy_images(settings, row["image_path"], copy)
    return root, files


def field_columns(out: Path, taken: Iterable[str]) -> dict[str, str]:
    """Structured jobs with a flat schema: {field name: its export column}; {} otherwise.

    Flat means every property is a scalar or a list of scalars, so that it fits one CSV cell. A
    field whose name is already a column gets a `fields_` prefix.
    """
    try:
        job = json.loads((out / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    structured = job.get("structured") or {}
    properties = (structured.get("schema") or {}).get("properties") or {}
    if structured.get("format", "text") == "text" or not properties or not all(map(_flat, properties.values())):
        return {}
    taken = set(taken)
    return {name: f"fields_{name}" if name in taken else name for name in properties}


def _flat(schema: Any) -> bool:
    scalar = ("string", "number", "integer", "boolean", "null")
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type", "string")
    if kind == "array":
        return _flat(schema.get("items") or {}) and (schema.get("items") or {}).get("type", "string") != "array"
    return all(k in scalar for k in (kind if isinstance(kind, list) else [kind]))


def _field_values(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The row's structured fields under their export column names (None where absent)."""
    try:
        fields = json.loads(row.get("fields") or "{}")
    except ValueError:
        fields = {}
    return {column: fields.get(name) for name, column in columns.items()}


def _json_lines(settings: ExportSettings, latest: LatestRows, path_key: str, text_key: str,
                path_of: Callable[[str], str | None] = str) -> Iterator[tuple[str, str | None]]:
    """(image_path, JSON line) of each ok image: `path_of(image_path)` and the caption under the
    given keys, then the chosen columns, then the flat structured fields. The line is None when
    `path_of` gives None (a path the format cannot name)."""
    extra = _extra_columns(settings)
    kept = [c for c in kept_columns(settings.out).names if c not in (path_key, text_key, *extra)]
    flat = field_columns(settings.out, [path_key, text_key, *extra, *kept])
    for row in _iter_ok_rows(settings, latest, ["caption", "fields", *extra, *kept]):
        path = path_of(row["image_path"])
        if path is None:
            yield row["image_path"], None
            continue
        line = {path_key: path, text_key: row["caption"] or ""}
        line.update((c, _json_value(row[c])) for c in [*extra, *kept])
        line.update(_field_values(row, flat))
        yield row["image_path"], json.dumps(line, ensure_ascii=False, default=json_value) + "\n"


def _write_hf(settings: ExportSettings, latest: LatestRows) -> tuple[Path, int]:
    """metadata.jsonl for `datasets.load_dataset("imagefolder", data_dir=...)`: file_name, text, columns.

    `file_name` is the file's real name (the key's escapes undone). A name that is not UTF-8 cannot
    be written in a JSON line: such images are left out, each named in a log line. Then README.md,
    the dataset card (`readers/card.py`), with `caption report`'s figures for the out folder.
    """
    target = _single_target(settings)
    figures = report(settings.out) if settings.card else None  # first: JobError for a folder without parts
    files, lines = 1 + settings.card, 0
    with open_atomic(target, settings.overwrite) as handle:
        for image_path, line in _json_lines(settings, latest, "file_name", "text", _utf8_file_name):
            if line is None:
                log.warning("left out of %s: %s: its file name is not UTF-8, which a JSON line cannot name; "
                            "rename the file (and run again) to include it", HF_METADATA, image_path)
                continue
            handle.write(line)
            lines += 1
            if settings.copy_images:
                files += _copy_images(settings, image_path,
                                      [_checked(settings.dest, _under(settings.dest, image_path))])
    if figures is not None:
        _write_card(settings, latest, figures, lines)
    return target, files


def _write_card(settings: ExportSettings, latest: LatestRows, figures: Report, exported: int) -> None:
    """README.md beside metadata.jsonl, unless a README.md there is not an unedited card of ours."""
    models = Counter(row["model"] or "(none)" for row in _iter_ok_rows(settings, latest, ["model"]))
    card = _card_target(settings)
    _refuse_edited_card(card, settings.overwrite)  # again, just before its own write
    with open_atomic(card, overwrite=True) as handle:
        handle.write(render_card(settings.out, figures, exported, dict(models.most_common())))


def _utf8_file_name(image_path: str) -> str | None:
    """The image's real relative path when it is valid UTF-8, else None."""
    name = unescape_key(image_path)
    if name is None:
        return None
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


def _write_jsonl(settings: ExportSettings, latest: LatestRows) -> tuple[Path, int]:
    """One JSON object per line (UTF-8, https://jsonlines.org): image_path, caption, columns."""
    target = _single_target(settings)
    with open_atomic(target, settings.overwrite) as handle:
        for _, line in _json_lines(settings, latest, "image_path", "caption"):
            handle.write(line)
    return target, 1


def _write_csv(settings: ExportSettings, latest: LatestRows) -> tuple[Path, int]:
    """A header, then one record per image, UTF-8 without a BOM.

    The csv module's default `excel` dialect is RFC 4180 (https://www.rfc-editor.org/rfc/rfc4180):
    comma separated, CRLF line ends, fields holding a comma, quote or line break enclosed in double
    quotes with inner quotes doubled. The file is opened with newline="" as the csv docs require,
    so line breaks inside a caption survive as they are.
    """
    extra = _extra_columns(settings)
    extra += [c for c in kept_columns(settings.out).names if c not in ("image_path", "caption", *extra)]
    flat = field_columns(settings.out, ["image_path", "caption", *extra])
    target = _single_target(settings)
    with open_atomic(target, settings.overwrite, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "caption", *extra, *flat.values()])
        for row in _iter_ok_rows(settings, latest, ["caption", "fields", *extra]):
            fields = _field_values(row, flat).values()
            writer.writerow([row["image_path"], row["caption"] or "", *(_csv_value(row[c]) for c in extra),
                             *map(_csv_value, fields)])
    return target, 1


def _write_parquet(settings: ExportSettings, latest: LatestRows) -> tuple[Path, int]:
    """All parts compacted into one file, one row (the latest, ok) per image, schema `store.SCHEMA`
    and the kept input columns."""
    target = _single_target(settings)
    schema = with_kept(kept_columns(settings.out))
    with open_atomic(target, settings.overwrite, binary=True) as handle:
        with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
            batch: list[dict[str, Any]] = []
            for row in _iter_ok_rows(settings, latest, schema.names):
                batch.append(row)
                if len(batch) >= PARQUET_BATCH_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch.clear()
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return target, 1


_WRITERS = {"txt": _write_txt, "hf": _write_hf, "jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}


def _copy_images(settings: ExportSettings, image_path: str, targets: list[Path]) -> int:
    if not targets:
        return 0
    item = _source(settings).open_by_key(image_path)
    if item is None:
        raise _outside(image_path)
    for target in targets:
        with item.open() as source, open_atomic(target, settings.overwrite, binary=True) as handle:
            shutil.copyfileobj(source, handle)
    return len(targets)


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):  # a list field (tags) in one cell
        return "; ".join("" if v is None else str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):  # a kept struct column: its JSON
        return json.dumps(value, ensure_ascii=False, default=json_value)
    if isinstance(value, (bytes, dt.date, dt.time, dt.timedelta)) and not isinstance(value, dt.datetime):
        return json_value(value)  # kept binary as base64, dates and times as ISO 8601
    return "" if value is None else _json_value(value)
