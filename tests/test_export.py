"""`caption export`: each format read back by the library that consumes it, from out folders `caption run` wrote."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import EXPECTED_SCHEMA, append_rows, copy_samples, latest_rows, read_rows, result_for
from pipeline.records import Result

IMAGES = {  # name in the input folder -> sample file; corrupt.jpg ends as an error row
    "coffee_cup.jpg": "coffee_cup.jpg",
    "chelsea_the_cat.jpg": "chelsea_the_cat.jpg",
    "sub/horse_silhouette_1bit.png": "horse_silhouette_1bit.png",
    "corrupt.jpg": "corrupt.jpg",
}
OK_IMAGES = sorted(k for k in IMAGES if k != "corrupt.jpg")


def _ok_row(out: Path, path: str, caption: str) -> Result:
    return result_for(out, path, caption=caption, model="local-caption", prompt_tokens=1, completion_tokens=2,
                      total_tokens=3)


@pytest.fixture(scope="module")
def captioned_template(local_server, tmp_path_factory, caption_run) -> Path:
    """One real run, made once per module: in/ (4 images, one corrupt) and out/."""
    local_server.reset()
    root = tmp_path_factory.mktemp("captioned")
    folder = copy_samples(root / "in", IMAGES)
    assert caption_run(local_server, folder, root / "out") == 1  # corrupt.jpg is an error row
    return root


@pytest.fixture
def captioned(captioned_template, tmp_path) -> tuple[Path, Path]:
    """A fresh copy of the module's run for this test: (input folder, out folder)."""
    shutil.copytree(captioned_template, tmp_path, dirs_exist_ok=True)
    return tmp_path / "in", tmp_path / "out"


@pytest.fixture
def export(cli):
    """Run `caption export` in-process; return (exit code, stdout, stderr)."""
    return lambda *argv: cli("export", *argv)


def _latest_ok(out: Path) -> dict[str, dict]:
    return {path: row for path, row in latest_rows(out).items() if row["status"] == "ok"}


# --- each format, read back by its consumer --------------------------------------------------


def _read_txt(root: Path, _out: Path) -> dict[str, str]:
    found = {}
    for sidecar in root.rglob("*.txt"):
        text = sidecar.read_text(encoding="utf-8")
        assert text.endswith("\n") and "\n" not in text[:-1]
        image = next(p for p in sidecar.parent.iterdir() if p.stem == sidecar.stem and p.suffix != ".txt")
        found[image.relative_to(root).as_posix()] = text[:-1]
    return found


def _read_csv(_root: Path, out: Path) -> dict[str, str]:
    with open(out.parent / "out.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image_path", "caption", "model", "prompt_tokens", "completion_tokens", "total_tokens"]
    return {r["image_path"]: r["caption"] for r in rows}


def _read_jsonl(_root: Path, out: Path) -> dict[str, str]:
    lines = (out.parent / "out.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(isinstance(r["total_tokens"], int) and r["model"] == "local-caption" for r in rows)
    return {r["image_path"]: r["caption"] for r in rows}


def _read_parquet(_root: Path, out: Path) -> dict[str, str]:
    table = pq.read_table(out.parent / "out.parquet")
    assert table.schema.equals(EXPECTED_SCHEMA)
    return {r["image_path"]: r["caption"] for r in table.to_pylist()}


@pytest.mark.parametrize(
    "to, flags, reader",
    [
        ("txt", ["--input", "{in}"], _read_txt),
        ("csv", [], _read_csv),
        ("jsonl", [], _read_jsonl),
        ("parquet", [], _read_parquet),
    ],
    ids=["txt", "csv", "jsonl", "parquet"],
)
def test_each_format_holds_the_latest_ok_caption_of_every_image(captioned, export, to, flags, reader):
    folder, out = captioned
    code, stdout, stderr = export(out, "--to", to, *(f.replace("{in}", str(folder)) for f in flags))
    assert code == 0, stderr
    expected = {path: row["caption"] for path, row in _latest_ok(out).items()}
    assert sorted(expected) == OK_IMAGES
    assert reader(folder, out) == expected
    assert f"exported {len(OK_IMAGES)} captions as {to}" in stdout
    assert "1 images have no ok row" in stderr and "corrupt.jpg: bad_image:" in stderr


@pytest.fixture
def load_imagefolder(tmp_path, monkeypatch):
    """`datasets.load_dataset("imagefolder", data_dir=...)`, offline, with its cache under tmp_path."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets", reason="the test extra installs datasets")

    def load(data_dir: Path):
        return datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train",
                                     cache_dir=str(tmp_path / "hf-cache"))

    return load


@pytest.mark.parametrize("into_input", [True, False], ids=["metadata-in-input", "dest-with-copies"])
def test_hf_export_loads_as_an_imagefolder_with_captions(captioned, export, load_imagefolder, tmp_path, into_input):
    folder, out = captioned
    where = ["--input", folder] if into_input else ["--input", folder, "--dest", tmp_path / "ds", "--copy-images"]
    code, _, stderr = export(out, "--to", "hf", *where, "--columns", "total_tokens,model")
    assert code == 0, stderr
    data_dir = folder if into_input else tmp_path / "ds"
    assert (data_dir / "metadata.jsonl").is_file()
    dataset = load_imagefolder(data_dir)
    latest = _latest_ok(out)
    assert dataset.num_rows == len(OK_IMAGES)
    assert set(dataset.column_names) == {"image", "text", "total_tokens", "model"}
    by_size = {(r["width"], r["height"]): r for r in latest.values()}  # the samples all differ in size
    for item in dataset:
        row = by_size[item["image"].size]
        assert item["text"] == row["caption"]
        assert (item["total_tokens"], item["model"]) == (row["total_tokens"], row["model"])
    if not into_input:
        copied = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")
                        if p.suffix not in (".jsonl", ".md") and p.is_file())
        assert copied == OK_IMAGES  # the error image is not copied


def test_txt_sidecars_are_mirrored_under_dest(captioned, export, tmp_path):
    folder, out = captioned
    code, stdout, _ = export(out, "--to", "txt", "--dest", tmp_path / "caps")
    assert code == 0
    written = sorted(p.relative_to(tmp_path / "caps").as_posix() for p in (tmp_path / "caps").rglob("*"))
    assert written == ["chelsea_the_cat.txt", "coffee_cup.txt", "sub", "sub/horse_silhouette_1bit.txt"]
    assert not list(folder.rglob("*.txt"))  # nothing beside the images
    assert "(3 files)" in stdout


def test_latest_row_wins_over_earlier_attempts(captioned, export):
    folder, out = captioned
    append_rows(out, _ok_row(out, "coffee_cup.jpg", "second answer"), _ok_row(out, "coffee_cup.jpg", "third answer"))
    assert export(out, "--to", "parquet")[0] == 0
    rows = pq.read_table(out.parent / "out.parquet").to_pylist()
    assert sorted(r["image_path"] for r in rows) == OK_IMAGES  # one row per image, not one per attempt
    assert next(r["caption"] for r in rows if r["image_path"] == "coffee_cup.jpg") == "third answer"
    assert len(read_rows(out)) == len(IMAGES) + 2  # the out folder itself is untouched


def test_csv_quotes_as_rfc_4180_and_txt_keeps_one_line(captioned, export):
    folder, out = captioned
    tricky = 'Un café, "très" bon;\r\nsecond line\n\tthird, ✓'
    append_rows(out, _ok_row(out, "coffee_cup.jpg", tricky))
    assert export(out, "--to", "csv", "--columns", "total_tokens")[0] == 0
    raw = (out.parent / "out.csv").read_bytes()
    assert raw.startswith(b"image_path,caption,total_tokens\r\n")  # CRLF records, no BOM
    assert '"Un café, ""très"" bon;\r\nsecond line\n\tthird, ✓"'.encode("utf-8") in raw  # quoted, quotes doubled
    with open(out.parent / "out.csv", encoding="utf-8", newline="") as handle:
        rows = {r["image_path"]: r for r in csv.DictReader(handle)}
    assert rows["coffee_cup.jpg"]["caption"] == tricky and rows["coffee_cup.jpg"]["total_tokens"] == "3"
    assert export(out, "--to", "txt", "--input", folder)[0] == 0
    assert (folder / "coffee_cup.txt").read_text(encoding="utf-8") == 'Un café, "très" bon; second line third, ✓\n'


# --- refusing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "to, existing, flags",
    [
        ("txt", "in/chelsea_the_cat.txt", ["--input", "{in}"]),
        ("txt", "caps/sub/horse_silhouette_1bit.txt", ["--dest", "{tmp}/caps"]),
        ("hf", "in/metadata.jsonl", ["--input", "{in}"]),
        ("hf", "ds/coffee_cup.jpg", ["--input", "{in}", "--dest", "{tmp}/ds", "--copy-images"]),
        ("csv", "out.csv", []),
        ("jsonl", "out.jsonl", []),
        ("parquet", "out.parquet", []),
    ],
    ids=["txt-beside", "txt-dest", "hf-input", "hf-copy", "csv", "jsonl", "parquet"],
)
def test_existing_files_are_never_overwritten_without_the_flag(captioned, export, tmp_path, to, existing, flags):
    folder, out = captioned
    flags = [f.replace("{in}", str(folder)).replace("{tmp}", str(tmp_path)) for f in flags]
    target = tmp_path / existing
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("mine, keep me")
    before = {p for p in tmp_path.rglob("*")}
    code, stdout, stderr = export(out, "--to", to, *flags)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "1 file would be overwritten" in stderr and "--overwrite" in stderr
    assert target.read_text() == "mine, keep me"
    assert {p for p in tmp_path.rglob("*")} == before  # nothing else written either
    code, _, _ = export(out, "--to", to, *flags, "--overwrite")
    assert code == 0 and target.read_bytes() != b"mine, keep me"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/nowhere", "--to", "csv"], "out folder not found"),
        (["{in}", "--to", "csv"], "not an out folder of `caption run`"),
        (["{out}", "--to", "txt"], "--input DIR"),
        (["{out}", "--to", "hf", "--dest", "{tmp}/ds"], "needs --copy-images"),
        (["{out}", "--to", "csv", "--columns", "caption,nope"], "no column nope"),
        (["{out}", "--to", "parquet", "--columns", "model"], "--columns applies to"),
        (["{out}", "--to", "csv", "--caption-ext", ".caption"], "--caption-ext applies to --to txt"),
        (["{out}", "--to", "txt", "--input", "{tmp}/empty"], "3 of 3 captioned images are not there"),
        (["{out}", "--to", "csv", "--copy-images"], "--copy-images needs"),
    ],
    ids=["missing", "not-out", "txt-no-input", "hf-dest-no-copy", "bad-column", "columns-parquet", "ext-csv",
         "wrong-input", "copy-csv"],
)
def test_bad_usage_is_one_line_and_exit_2(captioned, export, tmp_path, argv, message):
    folder, out = captioned
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{in}", str(folder)).replace("{out}", str(out)) for a in argv]
    before = {p for p in tmp_path.rglob("*")}
    code, stdout, stderr = export(*argv)
    assert (code, stdout) == (2, "")
    assert stderr.startswith("caption: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert {p for p in tmp_path.rglob("*")} == before


def test_two_images_that_would_share_a_sidecar_are_refused(server, export, tmp_path, caption_run):
    folder = copy_samples(tmp_path / "in", {"a.jpg": "coffee_cup.jpg", "a.png": "horse_silhouette_1bit.png"})
    assert caption_run(server, folder, tmp_path / "out") == 0
    code, _, stderr = export(tmp_path / "out", "--to", "txt", "--input", folder)
    assert code == 2 and "a.jpg and a.png would both write" in stderr
    assert not (folder / "a.txt").exists()


def test_a_key_that_climbs_out_of_the_folder_is_refused(captioned, export, tmp_path):
    folder, out = captioned
    append_rows(out, _ok_row(out, "../../escaped.jpg", "gotcha"))
    code, _, stderr = export(out, "--to", "txt", "--dest", tmp_path / "caps")
    assert code == 2 and "'../../escaped.jpg' is not a path inside the input folder" in stderr
    assert not list(tmp_path.rglob("escaped*")) and not (tmp_path / "caps").exists()


def test_export_reads_a_folder_of_many_parts_and_lists_errors_capped(captioned, export):
    folder, out = captioned
    fingerprint = json.loads((out / "_job.json").read_text())["fingerprint"]
    now = dt.datetime.now(dt.timezone.utc)
    errors = [Result(image_path=f"gone/{i:02d}.jpg", status="error", job_fingerprint=fingerprint, created_at=now,
                     error_kind="bad_request", error=f"nope {i}") for i in range(25)]
    for start in range(0, 25, 5):  # five more parts
        append_rows(out, *errors[start:start + 5])
    code, _, stderr = export(out, "--to", "jsonl")
    assert code == 0
    lines = stderr.splitlines()
    assert lines[0] == "caption: 26 images have no ok row and were not exported:"
    assert len(lines) == 1 + 20 + 1 and "... and 6 more" in lines[-1]
    assert len((out.parent / "out.jsonl").read_text().splitlines()) == len(OK_IMAGES)


# --- writes stay under their destination; every key round-trips -----------------------------


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_txt_beside_the_images_never_writes_through_a_folder_link(server, export, tmp_path, caption_run):
    outside = copy_samples(tmp_path / "outside", ["coffee_cup.jpg"])
    folder = copy_samples(tmp_path / "in", ["chelsea_the_cat.jpg"])
    (folder / "linked").symlink_to(outside)
    assert caption_run(server, folder, tmp_path / "out", "--follow-links") == 0  # the user let the run read it
    code, _, stderr = export(tmp_path / "out", "--to", "txt", "--input", folder)
    assert code == 2 and "leads out of" in stderr and "through a link" in stderr
    assert _files_under(outside) == {outside / "coffee_cup.jpg"} and not (folder / "chelsea_the_cat.txt").exists()
    assert export(tmp_path / "out", "--to", "txt", "--dest", tmp_path / "caps").code == 0  # mirrored: fine
    assert (tmp_path / "caps" / "linked" / "coffee_cup.txt").is_file()


@pytest.mark.parametrize("link", ["folder", "file"])
def test_a_link_inside_dest_is_never_written_through(captioned, export, tmp_path, link):
    folder, out = captioned
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "caps"
    dest.mkdir()
    if link == "folder":
        (dest / "sub").symlink_to(elsewhere)  # sub/horse_silhouette_1bit.txt would land in elsewhere/
    else:
        (dest / "coffee_cup.txt").symlink_to(elsewhere / "coffee_cup.txt")
    code, _, stderr = export(out, "--to", "txt", "--dest", dest, *(["--overwrite"] if link == "file" else []))
    assert code == 2 and ("through a link" in stderr or "is a link" in stderr), stderr
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("where", ["out", "out/sub"])
def test_a_destination_inside_an_out_folder_is_refused(captioned, export, tmp_path, where):
    _, out = captioned
    before = _files_under(out)
    code, _, stderr = export(out, "--to", "parquet", "--dest", tmp_path / where)
    assert code == 2 and "is inside the out folder" in stderr
    assert _files_under(out) == before
    assert len(pq.read_table(out)) == len(read_rows(out))  # still one run's rows, nothing added


def test_names_with_escapes_export_to_their_real_files(server, export, tmp_path, caption_run, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    latin1 = os.fsdecode(b"caf\xe9.jpg")
    photo = (Path(__file__).parent.parent / "sample_data" / "coffee_cup.jpg").read_bytes()
    (folder / latin1).write_bytes(photo)
    (folder / "caf\\xe9.jpg").write_bytes(photo + b"twin")
    assert caption_run(server, folder, tmp_path / "out") == 0
    assert export(tmp_path / "out", "--to", "txt", "--input", folder).code == 0
    assert sorted(os.listdir(os.fsencode(folder))) == [b"caf\\xe9.jpg", b"caf\\xe9.txt", b"caf\xe9.jpg",
                                                        b"caf\xe9.txt"]
    assert export(tmp_path / "out", "--to", "txt", "--dest", tmp_path / "caps", "--copy-images",
                  "--input", folder).code == 0
    assert len(os.listdir(tmp_path / "caps")) == 4
    code, _, stderr = export(tmp_path / "out", "--to", "hf", "--input", folder)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert code == 0 and [line["file_name"] for line in lines] == ["caf\\xe9.jpg"]  # the real name
    assert "caf\\xe9.jpg: its file name is not UTF-8" in stderr


def test_odd_keys_are_one_line_errors_never_a_crash(captioned, export, tmp_path):
    _, out = captioned
    append_rows(out, _ok_row(out, "nul\x00byte.jpg", "x"))
    code, _, stderr = export(out, "--to", "txt", "--dest", tmp_path / "caps")
    assert code == 2 and "is not a path inside the input folder" in stderr and stderr.count("\n") == 1


# --- the dataset card (README.md beside metadata.jsonl) --------------------------------------------


def _card_figures(card: str) -> dict[str, str]:
    """The "| figure | value |" rows of a card's Figures table."""
    table = card.split("## Figures", 1)[1]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {name.strip(): value.strip() for name, value in rows[1:]}


def _card_yaml(card: str) -> dict:
    import yaml  # PyYAML comes with datasets

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.mark.parametrize("into_input", [True, False], ids=["card-in-input", "card-in-dest"])
def test_hf_export_writes_a_dataset_card_whose_figures_are_the_reports(captioned, export, load_imagefolder, tmp_path,
                                                                       into_input):
    from pipeline import __version__
    from pipeline.cost import format_usd
    from pipeline.readers.report import report

    folder, out = captioned
    where = ["--input", folder] if into_input else ["--input", folder, "--dest", tmp_path / "ds", "--copy-images"]
    code, stdout, stderr = export(out, "--to", "hf", *where)
    assert code == 0, stderr
    data_dir = folder if into_input else tmp_path / "ds"
    card = (data_dir / "README.md").read_text(encoding="utf-8")
    meta = _card_yaml(card)
    assert meta["task_categories"] == ["image-to-text"] and meta["size_categories"] == ["n<1K"]
    assert meta["license"] == "unknown" and "FILL IN" in card.splitlines()[1]  # the placeholder, flagged
    rep = report(out)
    figures = _card_figures(card)
    expected = {"rows (ended attempts)": rep.rows, "images": rep.images, "prompt tokens": rep.prompt_tokens,
                "completion tokens": rep.completion_tokens, "total tokens": rep.total_tokens,
                "cached prompt tokens": rep.cached_tokens, "reasoning tokens": rep.reasoning_tokens,
                **{f"rows with status {k}": n for k, n in rep.status_rows.items()},
                **{f"error rows of kind {k}": n for k, n in rep.error_kind_rows.items()},
                **{f"images whose latest row is {k}": n for k, n in rep.image_outcomes.items()}}
    assert {k: int(figures[k].replace(",", "")) for k in expected} == expected
    assert rep.error_kind_rows == {"bad_image": 1} and rep.status_rows == {"error": 1, "ok": 3}
    assert figures["cost (USD, each row at its own mode's prices)"] == format_usd(rep.cost_usd)
    job = json.loads((out / "_job.json").read_text())
    for fact in (f"`local-caption` ({len(OK_IMAGES)} captions)", job["prompt"]["user"], job["fingerprint"],
                 f'"max_side": {job["image"]["max_side"]}', '"max_tokens": 100', f"caption {__version__}",
                 f"{rep.throughput.first:%Y-%m-%d %H:%M} to {rep.throughput.last:%Y-%m-%d %H:%M}"):
        assert fact in card, fact
    assert "(2 files)" in stdout if into_input else True
    assert load_imagefolder(data_dir).num_rows == len(OK_IMAGES)  # the card does not disturb the loader


def test_an_edited_card_is_never_overwritten_without_the_flag(captioned, export):
    folder, out = captioned
    assert export(out, "--to", "hf", "--input", folder)[0] == 0
    (folder / "metadata.jsonl").unlink()
    assert export(out, "--to", "hf", "--input", folder)[0] == 0  # an unedited card of ours is refreshed
    (folder / "metadata.jsonl").unlink()
    card = folder / "README.md"
    edited = card.read_text(encoding="utf-8").replace("license: unknown", "license: cc-by-4.0")
    card.write_text(edited, encoding="utf-8")
    code, stdout, stderr = export(out, "--to", "hf", "--input", folder)
    assert (code, stdout) == (2, "") and stderr.count("\n") == 1 and "card edited since" in stderr
    assert card.read_text(encoding="utf-8") == edited and not (folder / "metadata.jsonl").exists()
    assert export(out, "--to", "hf", "--input", folder, "--no-card")[0] == 0  # metadata only, card left be
    assert card.read_text(encoding="utf-8") == edited
    assert export(out, "--to", "hf", "--input", folder, "--overwrite")[0] == 0
    assert "license: unknown" in card.read_text(encoding="utf-8")


def test_a_readme_that_is_not_a_card_is_kept(captioned, export):
    folder, out = captioned
    (folder / "README.md").write_text("# my photos\n")
    code, _, stderr = export(out, "--to", "hf", "--input", folder)
    assert code == 2 and "did not write" in stderr and not (folder / "metadata.jsonl").exists()
    assert (folder / "README.md").read_text() == "# my photos\n"
