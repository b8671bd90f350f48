"""Tables of image paths or bytes (Parquet, CSV, JSONL), Hugging Face datasets on disk, and keep_columns.

Every table is written by the real writer (pyarrow, `datasets`), run through `caption run` against
the loopback endpoint, and read back from the Parquet parts: the same images give the same
captions as a folder run, and every row carries the kept input columns with the input's types.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SAMPLES, copy_samples, distinct_copies, durable_rows, read_rows, run_main

from pipeline.readers.review import write_review
from pipeline.sources import open_source
from pipeline.sources.table import TableSource
from pipeline.job import InputSettings

GOOD = ["astronaut_eileen_collins.jpg", "brick_wall_grey.jpg", "chelsea_the_cat.jpg", "coffee_cup.jpg",
        "hubble_deep_field.jpg"]


# --- helpers ---------------------------------------------------------------------------------


def _toml(value) -> str:
    return json.dumps(value)  # strings, numbers, lists of strings: JSON and TOML agree


def _job(path: Path, write_job, **input_settings) -> Path:
    """A job file for the test server with an [input] table."""
    write_job(path, limits_max_attempts=2)
    lines = ["[input]", *(f"{k} = {_toml(v)}" for k, v in input_settings.items())]
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return path


def _run(server, table: Path | str, out: Path, job: Path, *flags) -> int:
    return run_main("run", table, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress", *flags)


def _by_sha(rows) -> dict[str, str]:
    return {r["image_sha256"]: r["caption"] for r in rows if r["status"] == "ok"}


def _kept_types(out: Path, names) -> dict[str, pa.DataType]:
    schemas = {pq.read_schema(p) for p in out.glob("part-*.parquet")}
    assert len(schemas) == 1  # every part one schema
    (schema,) = schemas
    return {name: schema.field(name).type for name in names}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return copy_samples(tmp_path_factory.mktemp("imgs") / "imgs", GOOD)


@pytest.fixture(scope="module")
def folder_captions(local_server, images, tmp_path_factory, write_job) -> dict[str, str]:
    """sha256 → caption of a plain folder run over the same images."""
    local_server.reset()
    root = tmp_path_factory.mktemp("folder")
    assert _run(local_server, images, root / "out", _job(root / "job.toml", write_job)) == 0
    return _by_sha(read_rows(root / "out"))


def _paths_table(images: Path, relative: bool = False) -> pa.Table:
    paths = [f"imgs/{n}" if relative else str(images / n) for n in GOOD]
    return pa.table({
        "img": paths,
        "id": pa.array(range(100, 105), pa.int64()),
        "tag": [f"tag-{i}" for i in range(5)],
        "taken": pa.array([dt.datetime(2024, 1, i + 1, 12, 30) for i in range(5)], pa.timestamp("us")),
        "blob": [bytes([i, 255]) for i in range(5)],
        "labels": [["a", str(i)] for i in range(5)],
    })


# --- tables of paths ------------------------------------------------------------------------


def _write_parquet_file(images: Path, where: Path) -> tuple[Path, dict]:
    copy_samples(where / "imgs", GOOD)  # relative paths are read from the table's own folder
    pq.write_table(_paths_table(images, relative=True), where / "t.parquet", row_group_size=2)
    return where / "t.parquet", {}


def _write_shards(images: Path, where: Path) -> tuple[Path, dict]:
    table = _paths_table(images)
    (where / "sub").mkdir(parents=True)
    pq.write_table(table.slice(0, 2), where / "part-0.parquet")
    pq.write_table(table.slice(2, 3), where / "sub" / "part-1.parquet")
    (where / "_SUCCESS").write_text("")
    return where, {}


def _write_csv(images: Path, where: Path) -> tuple[Path, dict]:
    where.mkdir(parents=True)
    with open(where / "t.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["img", "id", "tag"])
        for i, name in enumerate(GOOD):
            writer.writerow([images / name, 100 + i, f"tag-{i}"])
    return where / "t.csv", {"key_column": "id"}


def _write_jsonl(images: Path, where: Path) -> tuple[Path, dict]:
    where.mkdir(parents=True)
    with open(where / "t.jsonl", "w") as handle:
        for i, name in enumerate(GOOD):
            handle.write(json.dumps({"img": str(images / name), "id": 100 + i, "tag": f"tag-{i}"}) + "\n")
    return where / "t.jsonl", {"key_column": "tag"}


@pytest.mark.parametrize("write, keep", [
    (_write_parquet_file, ["id", "tag", "taken", "blob", "labels"]),
    (_write_shards, ["id", "tag", "taken", "blob", "labels"]),
    (_write_csv, ["id", "tag"]),
    (_write_jsonl, ["id", "tag"]),
], ids=["parquet-file-relative-paths", "parquet-shards", "csv-key-column", "jsonl-key-column"])
def test_table_of_paths_captions_like_the_folder_and_keeps_columns(server, images, folder_captions, tmp_path,
                                                                    write_job, write, keep):
    table, settings = write(images, tmp_path / "table")
    job = _job(tmp_path / "job.toml", write_job, path_column="img", keep_columns=keep, **settings)
    assert _run(server, table, tmp_path / "out", job) == 0
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 5 and _by_sha(rows) == folder_captions
    expected = _paths_table(images)
    types = _kept_types(tmp_path / "out", keep)
    text_key = write is _write_csv  # a CSV's key column is read as text ("007" stays "007")
    assert types == {name: (pa.string() if text_key and name == "id" else expected.schema.field(name).type)
                     for name in keep}
    by_id = {str(row["id"]): row for row in expected.to_pylist()}
    for row in rows:
        source = by_id[str(row["id"])]
        assert {name: row[name] for name in keep} == {name: str(source[name]) if text_key and name == "id"
                                                      else source[name] for name in keep}
        assert row["image_sha256"] == _sha(images / Path(source["img"]).name)
    keys = sorted(r["image_path"] for r in rows)
    if settings.get("key_column") == "id":
        assert keys == [str(i) for i in range(100, 105)]
    elif settings.get("key_column") == "tag":
        assert keys == [f"tag-{i}" for i in range(5)]
    elif write is _write_parquet_file:  # the path as the table gives it
        assert keys == sorted(f"imgs/{n}" for n in GOOD)
    else:
        assert keys == sorted(str(images / n) for n in GOOD)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- Hugging Face datasets -----------------------------------------------------------------


def _hf_dataset():
    datasets = pytest.importorskip("datasets")
    images = [{"bytes": (SAMPLES / n).read_bytes(), "path": n} for n in GOOD]
    return datasets.Dataset.from_dict({"image": images, "label": list(range(5)), "name": GOOD}).cast_column(
        "image", datasets.Image())


@pytest.mark.parametrize("save", ["to_parquet", "save_to_disk"])
def test_hugging_face_dataset_on_disk_is_read_by_its_image_feature(server, folder_captions, tmp_path, write_job,
                                                                   save):
    dataset = _hf_dataset()
    if save == "to_parquet":
        target = tmp_path / "train.parquet"
        dataset.to_parquet(str(target))
    else:
        target = tmp_path / "saved"
        dataset.save_to_disk(str(target))
    job = _job(tmp_path / "job.toml", write_job, keep_columns=["label", "name"])  # no column named: the feature
    assert _run(server, target, tmp_path / "out", job) == 0
    rows = read_rows(tmp_path / "out")
    assert _by_sha(rows) == folder_captions
    assert sorted(r["image_path"] for r in rows) == [str(i) for i in range(5)]  # row numbers
    assert {r["image_path"]: (r["label"], r["name"]) for r in rows} == {str(i): (i, GOOD[i]) for i in range(5)}
    assert _kept_types(tmp_path / "out", ["label", "name"]) == {"label": pa.int64(), "name": pa.string()}


def test_dataset_dict_folder_asks_for_one_split(server, tmp_path, write_job, cli):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": _hf_dataset()}).save_to_disk(str(tmp_path / "dd"))
    ran = cli("run", tmp_path / "dd", "--job", _job(tmp_path / "job.toml", write_job), "--out", tmp_path / "out",
              "--base-url", server.base_url)
    assert ran.code == 2 and "give one split's folder" in ran.err and str(tmp_path / "dd" / "train") in ran.err


# --- bytes columns, broken cells ------------------------------------------------------------


def test_bytes_column_broken_cell_is_an_error_row_with_its_kept_values(server, tmp_path, write_job):
    cells = [(SAMPLES / GOOD[0]).read_bytes(), b"not an image at all", None, (SAMPLES / GOOD[1]).read_bytes()]
    pq.write_table(pa.table({"png": pa.array(cells, pa.binary()), "id": ["a", "b", "c", "d"]}), tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, bytes_column="png", key_column="id", keep_columns=["id"])
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job) == 1  # some error rows
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert {k: r["status"] for k, r in rows.items()} == {"a": "ok", "b": "error", "c": "error", "d": "ok"}
    assert rows["b"]["error_kind"] == rows["c"]["error_kind"] == "bad_image"
    assert "bytes_column is empty" in rows["c"]["error"]
    assert all(r["id"] == k for k, r in rows.items())
    assert len(server.observed()) == 2


def test_bytes_over_max_file_mb_are_refused_unread(server, tmp_path, write_job):
    pq.write_table(pa.table({"png": [(SAMPLES / GOOD[0]).read_bytes()]}), tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, bytes_column="png", max_file_mb=0.001)
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job) == 1
    (row,) = read_rows(tmp_path / "out")
    assert row["error_kind"] == "bad_image" and "max_file_mb" in row["error"] and not server.observed()


# --- http(s) paths ----------------------------------------------------------------------------


@pytest.fixture
def http_images(images):
    """A real HTTP server on loopback serving the images folder; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(images))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_urls_are_fetched_and_a_missing_one_is_an_error_row(server, http_images, folder_captions, tmp_path,
                                                                 write_job):
    urls = [f"{http_images}/{name}" for name in GOOD] + [f"{http_images}/missing.jpg"]
    pq.write_table(pa.table({"url": urls}), tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, path_column="url")
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job) == 1
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert _by_sha(rows.values()) == folder_captions
    missing = rows[f"{http_images}/missing.jpg"]
    assert missing["status"] == "error" and missing["error_kind"] == "fetch" and "HTTP 404" in missing["error"]
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job) == 1  # the dead link is tried again
    assert len(read_rows(tmp_path / "out")) == len(urls) + 1


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_send_url_sends_the_url_itself_and_reads_nothing(server, http_images, tmp_path, write_job, api):
    """send = "url": the request carries the URL (the bundled endpoint fetches loopback URLs, as a
    provider fetches any), the row has no size or hash, and the kept columns still land."""
    urls = [f"{http_images}/{name}" for name in GOOD]
    pq.write_table(pa.table({"url": urls, "n": list(range(len(urls)))}), tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, path_column="url", send="url", keep_columns=["n"])
    flags = ("--api", api, "--model", "claude-sonnet-4-5") if api == "anthropic" else ()
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job, *flags) == 0
    rows = read_rows(tmp_path / "out")
    assert sorted((r["image_path"], r["n"], r["status"]) for r in rows) == sorted(
        (u, i, "ok") for i, u in enumerate(urls))
    assert all(r["image_sha256"] is None and r["file_bytes"] is None and r["caption"] for r in rows)
    assert all(r["prompt_tokens"] > 0 for r in rows)  # the server counted the image it fetched


def test_send_url_rows_never_keep_a_signed_urls_query_string(server, http_images, tmp_path, write_job):
    """A provider that cannot fetch an image URL names it in its 400 (as OpenAI's "Error while
    downloading <url>" does, and the bundled endpoint too): the row keeps the URL without its query."""
    signed = f"{http_images}/missing.jpg?X-Amz-Credential=AKIASIGNED&X-Amz-Signature=SIGNEDSECRET"
    pq.write_table(pa.table({"url": [signed], "id": ["a"]}), tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, path_column="url", key_column="id", send="url")
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job) == 1
    (row,) = read_rows(tmp_path / "out")
    assert row["error_kind"] == "bad_request" and "/missing.jpg?…" in row["error"]
    assert "SIGNED" not in row["error"]


def test_send_url_is_refused_for_gemini(tmp_path, write_job):
    job = _job(tmp_path / "job.toml", write_job, path_column="url", send="url")
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"]}), tmp_path / "t.parquet")
    ran = run_main("run", tmp_path / "t.parquet", "--job", job, "--out", tmp_path / "out", "--api", "gemini",
                   "--model", "gemini-2.5-flash")
    assert ran == 2


# --- resume, dedupe, batch ------------------------------------------------------------------


def test_kill9_then_resume_a_table_gives_one_ok_row_per_key(server, tmp_path, write_job):
    names = [f"{i:03d}.jpg" for i in range(30)]
    folder = distinct_copies(tmp_path / "in", "coffee_cup.jpg", names)
    pq.write_table(pa.table({"img": [str(folder / n) for n in names], "n": list(range(30))}), tmp_path / "t.parquet",
                   row_group_size=7)
    job = _job(tmp_path / "job.toml", write_job, path_column="img", key_column="n", keep_columns=["n"])
    server.set_latency(0.1)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pipeline", "run", str(tmp_path / "t.parquet"), "--job", str(job), "--out", str(out),
            "--base-url", server.base_url, "--concurrency", "4", "--part-rows", "4", "--no-progress"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(out, 8, process)
    finally:
        process.kill()
        process.wait()
    before = len(durable_rows(out))
    server.set_latency(0)
    assert _run(server, tmp_path / "t.parquet", out, job) == 0
    rows = read_rows(out)
    ok = sorted(int(r["image_path"]) for r in rows if r["status"] == "ok")
    assert 8 <= before < 30  # the kill came mid-run
    assert ok == list(range(30))  # one ok row each: nothing lost, nothing twice
    assert all(r["n"] == int(r["image_path"]) for r in rows)


def _wait_for_rows(out: Path, count: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not out.is_dir() or len(durable_rows(out)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def test_identical_bytes_are_sent_once_and_the_copy_keeps_its_own_columns(server, images, tmp_path, write_job):
    same = str(images / GOOD[0])
    pq.write_table(pa.table({"img": [same, same, str(images / GOOD[1])], "k": ["x", "y", "z"], "v": [1.5, 2.5, 3.5]}),
                   tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, path_column="img", key_column="k", keep_columns=["v"])
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job, "--concurrency", "1") == 0
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert len(server.observed()) == 2
    original, copy = sorted(("x", "y"), key=lambda k: rows[k]["dedup_of"] is not None)
    assert rows[copy]["dedup_of"] == original and rows[copy]["caption"] == rows[original]["caption"]
    assert {k: r["v"] for k, r in rows.items()} == {"x": 1.5, "y": 2.5, "z": 3.5}


def test_batch_mode_rows_carry_the_kept_columns(server, images, tmp_path, write_job):
    table = _paths_table(images)
    pq.write_table(table, tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, path_column="img", keep_columns=["id", "taken", "blob"])
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job, "--mode", "batch", "--batch-poll-s", "0.02") == 0
    rows = read_rows(tmp_path / "out")
    assert {r["mode"] for r in rows} == {"batch"} and len(rows) == 5
    expected = {r["img"]: r for r in table.to_pylist()}
    assert all((r["id"], r["taken"], r["blob"]) == tuple(expected[r["image_path"]][c] for c in ("id", "taken", "blob"))
               for r in rows)
    assert _kept_types(tmp_path / "out", ["taken"]) == {"taken": pa.timestamp("us")}


def test_resume_with_other_keep_columns_is_refused(server, images, tmp_path, write_job, cli):
    pq.write_table(_paths_table(images), tmp_path / "t.parquet")
    first = _job(tmp_path / "job.toml", write_job, path_column="img", keep_columns=["id"])
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", first) == 0
    sent = len(server.observed())
    other = _job(tmp_path / "job2.toml", write_job, path_column="img", keep_columns=["tag"])
    ran = cli("run", tmp_path / "t.parquet", "--job", other, "--out", tmp_path / "out", "--base-url", server.base_url)
    assert ran.code == 2 and "kept columns id (int64)" in ran.err and "keeps tag (string)" in ran.err
    assert len(ran.err.strip().splitlines()) == 1 and len(server.observed()) == sent


# --- readers: estimate, report, review, export -----------------------------------------------


@pytest.fixture(scope="module")
def table_run(local_server, images, tmp_path_factory, write_job) -> tuple[Path, Path, Path]:
    """One run over a Parquet table with kept columns: (table, job, out)."""
    local_server.reset()
    root = tmp_path_factory.mktemp("tablerun")
    pq.write_table(_paths_table(images), root / "t.parquet")
    job = _job(root / "job.toml", write_job, path_column="img", keep_columns=["id", "tag", "taken"])
    assert _run(local_server, root / "t.parquet", root / "out", job) == 0
    return root / "t.parquet", job, root / "out"


def test_estimate_and_report_read_the_table(table_run, cli):
    table, job, out = table_run
    ran = cli("estimate", table, "--job", job, "--json")
    assert ran.code == 0, ran.err
    assert json.loads(ran.out)["images"] == 5
    ran = cli("report", out, "--input", table, "--json")
    assert ran.code == 0, ran.err
    report = json.loads(ran.out)
    assert report["images"] == 5 and report["left"]["images"] == 5 and report["left"]["left"] == 0


def test_review_shows_a_thumbnail_for_every_row_of_the_table(table_run):
    table, _, out = table_run
    summary = write_review(out, input_dir=table, html_path=out.parent / "review.html")
    assert (summary.images, summary.ok, summary.thumbnails) == (5, 5, 5)


@pytest.mark.parametrize("to", ["jsonl", "csv", "parquet"])
def test_export_carries_the_kept_columns_for_the_join(table_run, tmp_path, cli, to):
    table, _, out = table_run
    assert cli("export", out, "--to", to, "--dest", tmp_path).code == 0
    target = tmp_path / f"out.{to}"
    if to == "jsonl":
        exported = [json.loads(line) for line in target.read_text().splitlines()]
    elif to == "csv":
        exported = list(csv.DictReader(target.open(newline="")))
    else:
        assert pq.read_schema(target).field("taken").type == pa.timestamp("us")
        exported = pq.read_table(target).to_pylist()
    source = {r["img"]: r for r in pq.read_table(table).to_pylist()}
    assert len(exported) == 5
    for row in exported:
        expected = source[row["image_path"]]
        assert str(row["id"]) == str(expected["id"]) and row["tag"] == expected["tag"] and row["caption"]
        taken = row["taken"] if isinstance(row["taken"], dt.datetime) else dt.datetime.fromisoformat(row["taken"])
        assert taken == expected["taken"]
    # the join back to the input, as the README shows it (pyarrow here; pandas and DuckDB alike)
    if to == "parquet":
        joined = pq.read_table(table, columns=["img", "id"]).join(pq.read_table(target).select(["id", "caption"]), "id")
        assert joined.num_rows == 5 and None not in joined.column("caption").to_pylist()


# --- bad settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("settings, says", [
    ({}, "needs [input] path_column"),
    ({"path_column": "nope"}, "path_column = 'nope' is not a column"),
    ({"path_column": "img", "keep_columns": ["nope"]}, "keep_columns names 'nope'"),
    ({"path_column": "img", "key_column": "nope"}, "key_column = 'nope' is not a column"),
    ({"path_column": "img", "bytes_column": "blob"}, "path_column and bytes_column are both set"),
    ({"bytes_column": "tag"}, "bytes_column = 'tag' is string"),
    ({"path_column": "id"}, "path_column = 'id' is int64"),
    ({"path_column": "img", "keep_columns": ["caption"]}, "keep_columns: caption is also a column caption writes"),
], ids=["no-image-column", "missing-path-column", "missing-kept", "missing-key", "both", "bytes-not-binary",
        "path-not-text", "kept-clashes"])
def test_bad_table_settings_exit_2_with_one_line_naming_the_setting(server, images, tmp_path, write_job, cli,
                                                                    settings, says):
    table = _paths_table(images).append_column("caption", pa.array(["theirs"] * 5))
    pq.write_table(table, tmp_path / "t.parquet")
    ran = cli("run", tmp_path / "t.parquet", "--job", _job(tmp_path / "job.toml", write_job, **settings),
              "--out", tmp_path / "out", "--base-url", server.base_url)
    assert ran.code == 2, ran.err
    assert says in ran.err and len(ran.err.strip().splitlines()) == 1
    if "is not a column" in says or "needs" in says:
        assert "img, id, tag, taken, blob, labels, caption" in ran.err  # the columns that do exist
    assert not server.observed()


def test_keep_columns_on_a_folder_is_refused(server, images, tmp_path, write_job, cli):
    ran = cli("run", images, "--job", _job(tmp_path / "job.toml", write_job, keep_columns=["x"]), "--out",
              tmp_path / "out", "--base-url", server.base_url)
    assert ran.code == 2 and "keep_columns applies to a table" in ran.err and not server.observed()


# --- streaming and finding rows again --------------------------------------------------------


def test_a_large_table_is_read_one_row_group_at_a_time(images, tmp_path):
    rows, group = 20_000, 500
    paths = pa.array([str(images / GOOD[i % 5]) for i in range(rows)])
    pq.write_table(pa.table({"img": paths, "n": pa.array(range(rows), pa.int64())}), tmp_path / "big.parquet",
                   row_group_size=group)
    source = open_source(tmp_path / "big.parquet", InputSettings(path_column="img", key_column="n",
                                                               keep_columns=("n",)))
    assert isinstance(source, TableSource)
    walk = source.items()
    first = next(walk)
    assert (first.key, dict(first.kept)) == ("0", {"n": 0})
    assert source.batches_read == 1 and source.largest_batch == group  # one row group read, not the table
    assert sum(1 for _ in walk) == rows - 1
    assert source.batches_read == rows // group and source.largest_batch == group
    # found again by key through a one-pass index; an unknown key names nothing
    item = source.open_by_key("12345")
    assert item is not None and item.key == "12345" and dict(item.kept) == {"n": 12345}
    assert item.path == images / GOOD[12345 % 5]
    assert source.open_by_key("20000") is None and source.open_by_key("../etc/passwd") is None


# --- the kept values' journey: journal → Parquet, and items that travel ------------------------


def test_kept_values_of_every_arrow_kind_survive_the_journal_exactly(tmp_path):
    import decimal

    from pipeline.records import Result
    from pipeline.store import Store

    kept = pa.schema([
        ("when", pa.timestamp("ms", tz="UTC")), ("day", pa.date32()), ("price", pa.decimal128(9, 2)),
        ("raw", pa.binary()), ("tags", pa.list_(pa.string())), ("ratio", pa.float32()),
        ("meta", pa.struct([("w", pa.int16()), ("thumb", pa.binary())])),
        ("cat", pa.dictionary(pa.int8(), pa.string())),
    ])
    values = {"when": dt.datetime(2025, 5, 6, 7, 8, 9, 123000, tzinfo=dt.timezone.utc), "day": dt.date(2025, 5, 6),
              "price": decimal.Decimal("12.34"), "raw": b"\x00\xff", "tags": ["a", "b"], "ratio": 0.5,
              "meta": {"w": 3, "thumb": b"\x01"}, "cat": "x"}
    summary = {"fingerprint": "f" * 16}
    store = Store.open(tmp_path, summary, part_rows=10, part_seconds=60, kept_schema=kept)
    store.append(Result(image_path="a", status="ok", job_fingerprint="f" * 16, created_at=dt.datetime.now(dt.UTC),
                        kept=values))
    store.append(Result(image_path="b", status="error", job_fingerprint="f" * 16, created_at=dt.datetime.now(dt.UTC)))
    store.close()
    store.release()
    (part,) = tmp_path.glob("part-*.parquet")
    schema = pq.read_schema(part)
    assert pa.schema([schema.field(name) for name in kept.names]).equals(kept)
    first, second = pq.read_table(part).to_pylist()
    assert {name: first[name] for name in kept.names} == values
    assert all(second[name] is None for name in kept.names)  # a row without kept values: nulls, same schema
    # the folder remembers: reopened without a source (batch collect) it keeps the same columns
    again = Store.open(tmp_path, summary, part_rows=10, part_seconds=60)
    assert again.kept_schema.equals(kept)
    again.release()


def test_items_pickle_and_read_in_another_process_without_open_files(images, tmp_path):
    import pickle

    cells = [(SAMPLES / GOOD[0]).read_bytes()]
    pq.write_table(pa.table({"png": cells, "id": [7]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"img": [str(images / GOOD[1])], "id": [8]}), tmp_path / "p.parquet")
    for table, settings, expected in [
        (tmp_path / "b.parquet", InputSettings(bytes_column="png", keep_columns=("id",)), cells[0]),
        (tmp_path / "p.parquet", InputSettings(path_column="img", keep_columns=("id",)),
         (images / GOOD[1]).read_bytes()),
    ]:
        (item,) = open_source(table, settings).items()
        code = ("import pickle, sys; item = pickle.loads(sys.stdin.buffer.read()); "
                "sys.stdout.buffer.write(item.read()); sys.stderr.write(repr(dict(item.kept)))")
        done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(item), capture_output=True, cwd=ROOT,
                              check=True)
        assert done.stdout == expected and done.stderr.decode() in ("{'id': 7}", "{'id': 8}")


# --- a table on an object store (moto's S3 server on loopback, through s3fs) -----------------


@pytest.mark.parametrize("layout", ["file", "shards"])
def test_parquet_table_on_s3_with_relative_s3_paths(server, s3_endpoint, folder_captions, tmp_path, write_job, layout):
    import s3fs

    from pipeline.engine import run
    from pipeline.job import load_job

    s3 = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    bucket = f"tables-{layout}"
    s3.mkdir(bucket)
    for name in GOOD:
        s3.pipe_file(f"{bucket}/data/imgs/{name}", (SAMPLES / name).read_bytes())
    table = pa.table({"img": [f"imgs/{n}" for n in GOOD], "id": list(range(5))})
    if layout == "file":
        with s3.open(f"{bucket}/data/t.parquet", "wb") as handle:
            pq.write_table(table, handle)
        location = f"s3://{bucket}/data/t.parquet"
    else:
        for i, piece in enumerate((table.slice(0, 3), table.slice(3))):
            with s3.open(f"{bucket}/data/part-{i}.parquet", "wb") as handle:
                pq.write_table(piece, handle)
        location = f"s3://{bucket}/data"
    job_path = _job(tmp_path / "job.toml", write_job, path_column="img", keep_columns=["id"],
                    **({"format": "table"} if layout == "shards" else {}))
    job_path.write_text(job_path.read_text() + f'[input.storage_options]\nendpoint_url = "{s3_endpoint}"\n')
    job = load_job(job_path, {"endpoint.base_url": server.base_url})
    summary = run(job, location, tmp_path / "out", api_key=None, headers={}, progress=False)
    assert summary.exit_code == 0 and summary.ok == 5
    rows = read_rows(tmp_path / "out")
    assert _by_sha(rows) == folder_captions
    assert sorted((r["image_path"], r["id"]) for r in rows) == sorted((f"imgs/{n}", i) for i, n in enumerate(GOOD))


@pytest.mark.parametrize("ids", [[10, 3, 11, None], ["a", "", "b", "c"]], ids=["null-beside-row-number", "empty"])
def test_a_key_column_with_a_row_without_a_key_is_refused_naming_that_row(server, images, tmp_path, write_job,
                                                                          cli, ids):
    """A row with no key_column value fell back to its row number: a key that can be another row's id
    (refused as "the same key" with no word of the empty value), or that changes when the table does."""
    paths = [str(images / name) for name in GOOD[:4]]
    pq.write_table(pa.table({"img": paths, "k": ids}), tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, path_column="img", key_column="k")
    ran = cli("run", tmp_path / "t.parquet", "--job", job, "--out", tmp_path / "out", "--base-url", server.base_url)
    row = ids.index(None if None in ids else "")
    assert ran.code == 2 and f"row {row} has no value in 'k' ([input] key_column)" in ran.err
    assert len(ran.err.strip().splitlines()) == 1 and not server.observed()


@pytest.mark.parametrize("key_column", [None, "k"], ids=["path-twice", "key-twice"])
def test_a_table_whose_rows_share_a_key_is_refused_before_anything_is_sent(server, images, tmp_path, write_job,
                                                                           cli, key_column):
    paths = [str(images / GOOD[0]), str(images / GOOD[1]), str(images / GOOD[0] if key_column is None else GOOD[2])]
    pq.write_table(pa.table({"img": paths, "k": ["a", "b", "a"]}), tmp_path / "t.parquet")
    settings = {"path_column": "img", **({"key_column": key_column} if key_column else {})}
    ran = cli("run", tmp_path / "t.parquet", "--job", _job(tmp_path / "job.toml", write_job, **settings),
              "--out", tmp_path / "out", "--base-url", server.base_url)
    assert ran.code == 2 and "rows 0 and 2 have the same key" in ran.err and "key_column" in ran.err
    assert len(ran.err.strip().splitlines()) == 1 and not server.observed()


def test_http_image_over_max_file_mb_is_an_error_row(server, http_images, tmp_path, write_job):
    pq.write_table(pa.table({"url": [f"{http_images}/{GOOD[0]}"]}), tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, path_column="url", max_file_mb=0.001)
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job) == 1
    (row,) = read_rows(tmp_path / "out")
    assert row["error_kind"] == "fetch" and "max_file_mb" in row["error"] and not server.observed()


def test_bytes_table_limit_review_and_export_by_row_number(server, tmp_path, write_job, cli):
    cells = [(SAMPLES / n).read_bytes() for n in GOOD]
    pq.write_table(pa.table({"png": cells, "id": list(range(5))}), tmp_path / "t.parquet", row_group_size=2)
    job = _job(tmp_path / "job.toml", write_job, bytes_column="png", keep_columns=["id"])
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job, "--limit", "3") == 0
    assert sorted(r["image_path"] for r in read_rows(tmp_path / "out")) == ["0", "1", "2"]
    assert _run(server, tmp_path / "t.parquet", tmp_path / "out", job) == 0  # the rest, resumed
    assert sorted((r["image_path"], r["id"]) for r in read_rows(tmp_path / "out")) == [(str(i), i) for i in range(5)]
    summary = write_review(tmp_path / "out", input_dir=tmp_path / "t.parquet", html_path=tmp_path / "r.html")
    assert summary.thumbnails == 5  # each row found again by its number, its bytes read from the table
    ran = cli("export", tmp_path / "out", "--to", "txt", "--input", tmp_path / "t.parquet")
    assert ran.code == 2 and "--to parquet, jsonl or csv" in ran.err


def test_prepare_then_ingest_keeps_the_columns(server, images, tmp_path, write_job, cli):
    import asyncio

    from test_batch import _run_by_hand

    pq.write_table(_paths_table(images), tmp_path / "t.parquet")
    job = _job(tmp_path / "job.toml", write_job, path_column="img", keep_columns=["id", "taken"])
    dest, out = tmp_path / "requests", tmp_path / "out"
    assert cli("batch", "prepare", tmp_path / "t.parquet", "--job", job, "--dest", dest).code == 0
    (requests,) = sorted(dest.glob("requests-*[0-9].jsonl"))
    asyncio.run(_run_by_hand(server.base_url, requests, tmp_path / "output.jsonl"))
    assert cli("batch", "ingest", out, tmp_path / "output.jsonl", "--job", job, "--prepared", dest).code == 0
    expected = {r["img"]: (r["id"], r["taken"]) for r in _paths_table(images).to_pylist()}
    assert {r["image_path"]: (r["id"], r["taken"]) for r in read_rows(out)} == expected
    assert _kept_types(out, ["taken"]) == {"taken": pa.timestamp("us")}


def test_a_folder_of_datasets_parquet_shards_with_format_hf(server, folder_captions, tmp_path, write_job):
    dataset = _hf_dataset()
    (tmp_path / "data").mkdir()
    dataset.select(range(2)).to_parquet(str(tmp_path / "data" / "train-00000-of-00002.parquet"))
    dataset.select(range(2, 5)).to_parquet(str(tmp_path / "data" / "train-00001-of-00002.parquet"))
    job = _job(tmp_path / "job.toml", write_job, format="hf", keep_columns=["name"])
    assert _run(server, tmp_path / "data", tmp_path / "out", job) == 0
    rows = read_rows(tmp_path / "out")
    assert _by_sha(rows) == folder_captions
    assert {r["image_path"]: r["name"] for r in rows} == {str(i): GOOD[i] for i in range(5)}


@pytest.mark.parametrize("columns", [{"path_column": "p"}, {"path_column": "p", "key_column": "k"},
                                     {"bytes_column": "b"}])
def test_keys_lists_what_the_items_are_keyed_by_without_building_them(tmp_path, columns):
    """The progress bar's total counts `keys()`: the same keys as the walk, from one column (a bytes
    table's row numbers from the Parquet footers)."""
    names = GOOD[:3]
    pq.write_table(pa.table({"p": [str(SAMPLES / n) for n in names], "k": ["x", "y", "z"],
                             "b": [(SAMPLES / n).read_bytes() for n in names]}), tmp_path / "t.parquet",
                   row_group_size=2)
    source = TableSource(tmp_path / "t.parquet", InputSettings(**columns))
    assert list(source.keys()) == [item.key for item in source.items()]
    assert source.batches_read == 2  # only the items' walk read batches of the image column
