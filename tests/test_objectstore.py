"""INPUT as a folder in an object store: a real S3-compatible server (moto in server mode) on loopback.

Every test reaches the server through s3fs over HTTP, with fake credentials in the environment:
most give the endpoint as `[input] storage_options = {endpoint_url = ...}`, the readers (report,
export, review, which have no job file) through `AWS_ENDPOINT_URL`. Nothing of boto is mocked.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import DEMO_JOB, ROOT, SAMPLES, distinct_copies, durable_rows, read_rows

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
botocore_errors = pytest.importorskip("botocore.exceptions")

from pipeline.engine.caption import Captioner  # noqa: E402
from pipeline.errors import BadImageError  # noqa: E402
from pipeline.job import InputSettings, load_job  # noqa: E402
from pipeline.providers import make_provider  # noqa: E402
from pipeline.sources import input_problem, open_source  # noqa: E402
from pipeline.sources import objectstore  # noqa: E402
from pipeline.sources.objectstore import HEADER_BLOCK_BYTES, is_transient  # noqa: E402


# A folder with a subfolder, a hidden file, a hidden folder and a file that is not an image.
TREE = {"coffee_cup.jpg": "coffee_cup.jpg", "chelsea_the_cat.jpg": "chelsea_the_cat.jpg",
        "sub/rotated_exif.jpg": "rotated_exif.jpg", "sub/deeper/transparent_logo.png": "transparent_logo.png",
        "corrupt.jpg": "corrupt.jpg", ".hidden.jpg": "coffee_cup.jpg", ".cache/a.jpg": "coffee_cup.jpg",
        ".cache/b.jpg": "chelsea_the_cat.jpg", "notes.txt": "README.md"}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def s3(s3_endpoint):
    """An s3fs file system on the test server (the instance cache off: each test sees the server as it is)."""
    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)


@pytest.fixture
def bucket(s3):
    """`bucket(files)`: a new bucket holding `files` ({key: bytes}) under the prefix `in/`; its URL."""

    def make(files: dict[str, bytes]) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        s3.mkdir(name)
        for key, data in files.items():
            s3.pipe_file(f"{name}/in/{key}", data)
        return f"s3://{name}/in/"

    return make


@pytest.fixture
def s3_job(tmp_path, s3_endpoint, write_job):
    """`s3_job(**overrides)`: a job file for the test server whose `[input] storage_options` name the S3 endpoint."""

    def make(**overrides) -> Path:
        path = write_job(tmp_path / "job.toml", limits_max_attempts=2, **overrides)
        with path.open("a") as handle:
            handle.write(f'[input.storage_options]\nendpoint_url = "{s3_endpoint}"\n')
        return path

    return make


@pytest.fixture
def endpoint_in_env(s3_endpoint, monkeypatch):
    """AWS_ENDPOINT_URL names the test server: how the readers (no job file) reach it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)


class _Calls(logging.Handler):
    """The S3 calls s3fs makes (it logs each at DEBUG, "CALL: get_object - ... - {...'Range': ...}"),
    collected by a handler on its own logger: the CLI replaces the root logger's handlers."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.calls: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("CALL: "):
            self.calls.append(record.getMessage())

    def named(self, method: str) -> list[str]:
        return [call for call in self.calls if call.startswith(f"CALL: {method} ")]


@pytest.fixture
def s3_calls():
    """What s3fs asked of the server during the test (`s3_calls.named("get_object")`)."""
    logger, handler = logging.getLogger("s3fs"), _Calls()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _files(tree: dict[str, str]) -> dict[str, bytes]:
    return {key: (ROOT / sample if sample == "README.md" else SAMPLES / sample).read_bytes()
            for key, sample in tree.items()}


def _local_tree(folder: Path, tree: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, data in _files(tree).items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(data)
    return folder


def _captions(out: Path) -> dict[str, tuple[str, str | None]]:
    return {row["image_path"]: (row["status"], row["caption"]) for row in read_rows(out)}


# --- the run ------------------------------------------------------------------------------------


def test_a_bucket_gives_the_same_keys_and_captions_as_the_same_local_folder(server, bucket, s3_job, tmp_path, cli):
    url = bucket(_files(TREE))
    local = _local_tree(tmp_path / "local", TREE)
    job = s3_job()
    from_s3 = cli("run", url, "--job", job, "--out", tmp_path / "out-s3", "--base-url", server.base_url,
                  "--no-progress")
    from_disk = cli("run", local, "--job", job, "--out", tmp_path / "out-local", "--base-url", server.base_url,
                    "--no-progress")
    assert from_s3.code == from_disk.code == 1, from_s3.err  # corrupt.jpg is an error row in both
    s3_rows, local_rows = _captions(tmp_path / "out-s3"), _captions(tmp_path / "out-local")
    assert set(s3_rows) == {"coffee_cup.jpg", "chelsea_the_cat.jpg", "sub/rotated_exif.jpg",
                            "sub/deeper/transparent_logo.png", "corrupt.jpg"}
    assert s3_rows == local_rows
    assert s3_rows["sub/rotated_exif.jpg"][0] == "ok"
    # The same things passed over, counted the same way: two hidden entries, one other file.
    passed = [line for line in from_s3.out.splitlines() if "passed over" in line]
    assert passed == [line for line in from_disk.out.splitlines() if "passed over" in line]
    assert passed == ["caption: passed over: 2 hidden, 1 not an image file"]


def test_a_bucket_key_with_a_backslash_is_escaped_as_a_local_name_is(bucket, s3_endpoint):
    url = bucket({"a\\b.jpg": (SAMPLES / "coffee_cup.jpg").read_bytes()})
    source = open_source(url, InputSettings(storage_options={"endpoint_url": s3_endpoint}))
    (item,) = list(source.items())
    assert item.key == "a\\\\b.jpg"  # keys.escape_key, as for a local file of that name
    assert source.open_by_key(item.key).read() == (SAMPLES / "coffee_cup.jpg").read_bytes()


def test_kill_9_mid_run_then_resume_gives_one_ok_row_per_object(server, bucket, s3_job, tmp_path, cli):
    count = 30
    folder = distinct_copies(tmp_path / "src", "coffee_cup.jpg", [f"{i:03d}.jpg" for i in range(count)])
    url = bucket({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    job, out = s3_job(), tmp_path / "out"
    server.set_latency(0.05)
    argv = [sys.executable, "-m", "pipeline", "run", url, "--job", str(job), "--out", str(out),
            "--base-url", server.base_url, "--concurrency", "4", "--part-rows", "5", "--no-progress"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while len(durable_rows(out)) < 8:  # well into the run: a part written, requests in flight
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    process.kill()
    process.wait()
    before, sent_before = len(durable_rows(out)), len(server.observed())
    assert before < count  # killed mid-run
    assert cli("run", url, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress").code == 0
    ok = sorted(row["image_path"] for row in read_rows(out) if row["status"] == "ok")
    assert ok == [f"{i:03d}.jpg" for i in range(count)]  # each once: nothing lost, nothing twice
    # The rerun asked for each image without a row and no other (a request the dying run had written
    # may reach the server just after it was counted: at most the 4 in flight).
    assert count - before <= len(server.observed()) - sent_before <= count - before + 4


def test_identical_objects_are_sent_once(server, bucket, s3_job, tmp_path, cli):
    data = (SAMPLES / "chelsea_the_cat.jpg").read_bytes()
    url = bucket({"a.jpg": data, "copies/b.jpg": data, "copies/c.jpg": data})
    ran = cli("run", url, "--job", s3_job(), "--out", tmp_path / "out", "--base-url", server.base_url,
              "--no-progress")
    assert ran.code == 0, ran.err
    rows = {row["image_path"]: row for row in read_rows(tmp_path / "out")}
    assert len(server.observed()) == 1
    sent = [key for key, row in rows.items() if row["dedup_of"] is None]
    assert len(sent) == 1 and all(row["dedup_of"] == sent[0] for key, row in rows.items() if key not in sent)
    assert len({row["caption"] for row in rows.values()}) == 1


def test_batch_prepare_writes_one_request_per_object(bucket, s3_job, tmp_path, cli):
    url = bucket(_files({"a.jpg": "coffee_cup.jpg", "sub/b.png": "transparent_logo.png", "notes.txt": "README.md"}))
    ran = cli("batch", "prepare", url, "--job", s3_job(), "--dest", tmp_path / "requests")
    assert ran.code == 0, ran.err
    lines = [json.loads(line) for path in sorted((tmp_path / "requests").glob("requests-?????.jsonl"))
             for line in path.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["a.jpg", "sub/b.png"]


def test_an_object_over_max_file_mb_is_an_error_row_and_the_rest_go_on(server, bucket, s3_job, tmp_path, cli):
    big = (SAMPLES / "hubble_deep_field.jpg").read_bytes()
    small = (SAMPLES / "horse_silhouette_1bit.png").read_bytes()
    assert len(small) < 10_000 < len(big)
    url = bucket({"big.jpg": big, "small.png": small})
    ran = cli("run", url, "--job", s3_job(), "--out", tmp_path / "out", "--base-url", server.base_url,
              "--no-progress", "--max-file-mb", "0.01")
    assert ran.code == 1
    rows = {row["image_path"]: row for row in read_rows(tmp_path / "out")}
    assert rows["small.png"]["status"] == "ok"
    assert rows["big.jpg"]["status"] == "error" and rows["big.jpg"]["error_kind"] == "bad_image"
    assert "over the 0.01 MB limit" in rows["big.jpg"]["error"]
    assert len(server.observed()) == 1


def test_an_object_gone_since_the_listing_is_a_bad_image_not_a_crash(bucket, s3, s3_endpoint):
    url = bucket({"a.jpg": (SAMPLES / "coffee_cup.jpg").read_bytes()})
    (item,) = list(open_source(url, InputSettings(storage_options={"endpoint_url": s3_endpoint})).items())
    s3.rm(url.removeprefix("s3://") + "a.jpg")
    job = load_job(DEMO_JOB)
    captioner = Captioner(job, make_provider(job, "http://127.0.0.1:9/v1", api_key=None, headers={}))
    with pytest.raises(BadImageError, match="cannot read file"):
        captioner.prepare(pickle.loads(pickle.dumps(item)))  # items travel (a Ray worker gets a copy)


@pytest.mark.parametrize("url, says", [
    ("s3://no-such-bucket-here/in/", "no such bucket"),
    ("BUCKET/nothing-here/", "holds no objects under this prefix"),
], ids=["missing-bucket", "empty-prefix"])
def test_a_missing_bucket_or_prefix_exits_2_with_one_line_before_anything_is_sent(
        server, bucket, s3_job, tmp_path, cli, url, says):
    url = url.replace("BUCKET/", bucket({"x.jpg": b"x"}).removesuffix("in/"))
    ran = cli("run", url, "--job", s3_job(), "--out", tmp_path / "out", "--base-url", server.base_url,
              "--no-progress")
    assert ran.code == 2
    assert len(ran.err.strip().splitlines()) == 1 and says in ran.err and url in ran.err
    assert server.observed() == [] and not (tmp_path / "out").exists()


def test_a_missing_s3fs_is_a_one_line_error_naming_the_extra(monkeypatch, s3_job, tmp_path, cli):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if it were not installed: `import s3fs` fails
    ran = cli("run", "s3://some-bucket/in/", "--job", s3_job(), "--out", tmp_path / "out", "--no-progress")
    assert ran.code == 2
    assert ran.err.strip().splitlines() == [
        "caption: s3://some-bucket/in/ needs the Python package s3fs, which is not installed; "
        "run: pip install 'caption[s3]'"]


# --- the readers ----------------------------------------------------------------------------------


def test_estimate_reads_only_the_first_block_of_each_object_and_counts_as_for_the_folder(
        bucket, s3_job, tmp_path, cli, s3_calls):
    tree = {k: v for k, v in TREE.items() if k != "corrupt.jpg"}
    url = bucket(_files(tree))
    job = s3_job()
    s3_calls.calls.clear()
    from_s3 = cli("estimate", url, "--job", job, "--json")
    from_disk = cli("estimate", _local_tree(tmp_path / "local", tree), "--job", job, "--json")
    assert from_s3.code == from_disk.code == 0, from_s3.err
    s3_figures, local_figures = json.loads(from_s3.out), json.loads(from_disk.out)
    assert s3_figures["images"] == local_figures["images"] == 4
    assert s3_figures["prompt_tokens"] == local_figures["prompt_tokens"] > 0
    # What was asked of the server (s3fs logs each call with its arguments): one ranged GET of the
    # first block per image, never a whole object.
    sizes = {key: len(data) for key, data in _files(tree).items() if not key.startswith(".") and key != "notes.txt"}
    assert max(sizes.values()) > HEADER_BLOCK_BYTES  # transparent_logo.png: 143 KB, of which one block is read
    expected = sorted(f"'Key': 'in/{key}', 'Range': 'bytes=0-{min(size, HEADER_BLOCK_BYTES) - 1}'"
                      for key, size in sizes.items())
    assert sorted(call.split("', ", 1)[1].rstrip("}") for call in s3_calls.named("get_object")) == expected


def test_report_export_and_review_read_the_bucket_through_aws_endpoint_url(
        server, bucket, s3_job, tmp_path, cli, endpoint_in_env):
    files = _files({"coffee_cup.jpg": "coffee_cup.jpg", "sub/cat.jpg": "chelsea_the_cat.jpg"})
    url = bucket(files)
    out = tmp_path / "out"
    assert cli("run", url, "--job", s3_job(), "--out", out, "--base-url", server.base_url, "--no-progress").code == 0

    report = cli("report", out, "--input", url, "--json")
    assert report.code == 0, report.err
    assert json.loads(report.out)["left"]["images"] == 2 and json.loads(report.out)["left"]["left"] == 0

    dest = tmp_path / "ds"
    export = cli("export", out, "--to", "hf", "--input", url, "--dest", dest, "--copy-images")
    assert export.code == 0, export.err
    assert {k: (dest / k).read_bytes() for k in files} == files  # the objects, copied byte for byte
    lines = [json.loads(line) for line in (dest / "metadata.jsonl").read_text().splitlines()]
    assert sorted(line["file_name"] for line in lines) == sorted(files)

    beside = cli("export", out, "--to", "txt", "--input", url)
    assert beside.code == 2 and "is an object store: give --dest DIR" in beside.err

    review = cli("review", out, "--input", url)
    assert review.code == 0, review.err
    assert "2 thumbnails" in review.out


def test_readers_refuse_a_missing_bucket_with_one_line(server, bucket, s3_job, tmp_path, cli, endpoint_in_env):
    out = tmp_path / "out"
    assert cli("run", bucket({"a.jpg": (SAMPLES / "coffee_cup.jpg").read_bytes()}), "--job", s3_job(),
               "--out", out, "--base-url", server.base_url, "--no-progress").code == 0
    for argv in (("review", out), ("export", out, "--to", "jsonl"), ("report", out)):
        ran = cli(*argv, "--input", "s3://no-such-bucket-here/x/")
        assert ran.code == 2 and "no such bucket" in ran.err and len(ran.err.strip().splitlines()) == 1, argv


# --- the source's parts ------------------------------------------------------------------------


def test_a_generic_file_system_is_walked_a_folder_at_a_time_to_the_same_keys(bucket, s3_endpoint, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    root = f"/caption-test-{uuid.uuid4().hex[:8]}"
    for key, data in _files(TREE).items():
        memory.pipe_file(f"{root}/in/{key}", data)
    try:
        generic = open_source(f"memory://{root}/in")
        from_s3 = open_source(bucket(_files(TREE)), InputSettings(storage_options={"endpoint_url": s3_endpoint}))
        local = open_source(_local_tree(tmp_path / "local", TREE))
        keys = [sorted(item.key for item in source.items()) for source in (generic, from_s3, local)]
        assert keys[0] == keys[1] == keys[2]
        assert generic.skipped == from_s3.skipped == local.skipped == {"hidden": 2, "not an image file": 1}
        # names sorted, depth first, as the local walk goes (S3 lists in key order instead)
        assert [item.key for item in generic.items()] == [item.key for item in local.items()]
    finally:
        memory.rm(root, recursive=True)


def _bulk_bucket(count: int) -> str:
    """A bucket of `count` tiny objects under `in/`, put into the in-process server's backend directly
    (setup only: a PUT over HTTP takes moto ~30 ms; the test then lists them over HTTP as ever)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend, name = s3_backends[DEFAULT_ACCOUNT_ID]["global"], f"bulk-{uuid.uuid4().hex[:12]}"
    backend.create_bucket(name, "us-east-1")
    for i in range(count):
        backend.put_object(name, f"in/{i:04d}.png", b"not really")
    return f"s3://{name}/in/"


def test_a_listing_streams_page_by_page(s3_endpoint, s3_calls, monkeypatch):
    monkeypatch.setattr(objectstore, "LIST_PAGE_KEYS", 100)  # S3 pages hold 1,000: fewer keys, the same paging
    url = _bulk_bucket(250)
    source = open_source(url, InputSettings(storage_options={"endpoint_url": s3_endpoint}))
    s3_calls.calls.clear()
    items = source.items()
    first = next(items)
    assert first.key == "0000.png" and len(s3_calls.named("list_objects_v2")) == 1  # from the first page alone
    assert [item.key for item in items] == [f"{i:04d}.png" for i in range(1, 250)]
    sizes = [int(call.split("'MaxKeys': ")[1].split("}")[0].split(",")[0]) for call in s3_calls.named("list_objects_v2")]
    assert sizes == [32, 100, 100, 100]  # a small first page, then full ones: 32 + 100 + 100 + 18 keys


def test_input_problem_for_one_object_and_a_non_image(bucket, s3_endpoint):
    url = bucket({"a.jpg": (SAMPLES / "coffee_cup.jpg").read_bytes(), "notes.txt": b"hi"})
    settings = InputSettings(storage_options={"endpoint_url": s3_endpoint})
    assert input_problem(url + "a.jpg", settings) is None
    assert [item.key for item in open_source(url + "a.jpg", settings).items()] == ["a.jpg"]
    assert "is not an image file" in input_problem(url + "notes.txt", settings)


class _FlakyProxy:
    """A loopback HTTP proxy in front of the S3 server that answers the first GET of each object
    under `in/` with 503 ServiceUnavailable (as S3 does when it is overloaded), then forwards."""

    FAULT = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
             b"<Message>Service is unavailable, try later.</Message></Error>")

    def __init__(self, upstream: str):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        proxy, target = self, urlsplit(upstream)
        self.gets: list[tuple[str, int]] = []  # (path, status answered)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and "/in/" in self.path and self.path not in {p for p, _ in proxy.gets}:
                    proxy.gets.append((self.path, 503))
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.FAULT)))
                    self.end_headers()
                    self.wfile.write(proxy.FAULT)
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                upstream_conn.request(self.command, self.path, body, dict(self.headers))
                answer = upstream_conn.getresponse()
                data = answer.read()
                if self.command == "GET" and "/in/" in self.path:
                    proxy.gets.append((self.path, answer.status))
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream_conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_transient_read_failure_is_retried_and_a_missing_object_is_not(bucket, s3_endpoint):
    data = (SAMPLES / "coffee_cup.jpg").read_bytes()
    url = bucket({"a.jpg": data})
    proxy = _FlakyProxy(s3_endpoint)
    try:
        # botocore's and s3fs's own retries off, so that what retries is caption's (objectstore._retried)
        settings = InputSettings(storage_options={"endpoint_url": proxy.url, "skip_instance_cache": True,
                                                  "config_kwargs": {"retries": {"total_max_attempts": 1}}})
        source = open_source(url, settings)
        assert source.open_by_key("a.jpg").read() == data
        with pytest.raises(FileNotFoundError):
            source.open_by_key("gone.jpg").read()
    finally:
        proxy.stop()
    statuses = {}
    for path, status in proxy.gets:
        statuses.setdefault(path.split("?")[0].rsplit("/", 1)[-1], []).append(status)
    assert statuses == {"a.jpg": [503, 206], "gone.jpg": [503, 404]}  # the 404 itself is not tried again


def _client_error(status: int, code: str):
    return botocore_errors.ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("make, transient", [
    (lambda: _client_error(503, "SlowDown"), True),
    (lambda: _client_error(500, "InternalError"), True),
    (lambda: _client_error(429, "TooManyRequests"), True),
    (lambda: _client_error(404, "NoSuchKey"), False),
    (lambda: _client_error(403, "AccessDenied"), False),
    (lambda: _client_error(400, "InvalidArgument"), False),
    (lambda: botocore_errors.EndpointConnectionError(endpoint_url="http://x"), True),
    (lambda: botocore_errors.ReadTimeoutError(endpoint_url="http://x"), True),
    (lambda: botocore_errors.NoCredentialsError(), False),
    (lambda: ConnectionResetError(104, "reset"), True),
    (lambda: TimeoutError(), True),
    (lambda: FileNotFoundError("gone"), False),
    (lambda: ValueError("a bug"), False),
], ids=["503-slowdown", "500", "429", "404", "403", "400", "connect", "read-timeout", "no-credentials",
        "reset", "timeout", "not-found", "value-error"])
def test_what_counts_as_transient(make, transient):
    assert is_transient(make()) is transient
