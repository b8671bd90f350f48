"""Shared fixtures and helpers. One bundled endpoint serves the whole session; each test gets it freshly reset.

Test modules import the plain names with `from conftest import ...` (pytest puts tests/ on sys.path):
the paths (ROOT, SAMPLES, DEMO_JOB), the pinned Parquet schema, `read_rows(out)` and friends to read an out
folder back, and `copy_samples` / `distinct_copies` to make input folders. `cli` runs the CLI in-process.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.localserver import LocalServer
from pipeline.records import Result
from pipeline.store import Store

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"
JOBS = ROOT / "jobs"
DEMO_JOB = JOBS / "demo.toml"
SAMPLE_IMAGES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix.lower() in {".jpg", ".png", ".webp"})
"""Every image file in sample_data/ (corrupt.jpg included), by name."""

EXPECTED_SCHEMA = pa.schema(
    [
        ("image_path", pa.string()),
        ("image_sha256", pa.string()),
        ("file_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sent_width", pa.int32()),
        ("sent_height", pa.int32()),
        ("sent_bytes", pa.int32()),
        ("dhash", pa.int64()),
        ("model", pa.string()),
        ("caption", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("total_tokens", pa.int32()),
        ("cached_tokens", pa.int32()),
        ("cache_write_tokens", pa.int32()),
        ("reasoning_tokens", pa.int32()),
        ("mode", pa.string()),
        ("service_tier", pa.string()),
        ("usage_source", pa.string()),
        ("status", pa.string()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int16()),
        ("latency_ms", pa.int32()),
        ("request_id", pa.string()),
        ("dedup_of", pa.string()),
        ("dedup_distance", pa.int8()),
        ("fields", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("job_fingerprint", pa.string()),
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)
"""The out folder's Parquet schema, written out by hand: what users' readers rely on. Compare
against this, never against the product's own `pipeline.store.SCHEMA`."""


# --- input folders -------------------------------------------------------------------------------


def copy_samples(folder: Path, names: Iterable[str] | Mapping[str, str]) -> Path:
    """Copy sample_data files into `folder` (made if missing) and return it. `names` lists sample
    file names, or maps a path inside `folder` to the sample file to put there."""
    pairs = names.items() if isinstance(names, Mapping) else ((name, name) for name in names)
    folder.mkdir(parents=True, exist_ok=True)
    for target, sample in pairs:
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLES / sample, folder / target)
    return folder


def distinct_copies(folder: Path, sample: str, names: Iterable[str]) -> Path:
    """Write the sample file under each of `names` in `folder`, the i-th with `copy {i}` after the end of
    the image: different files to the dedupe, the same picture to the decoder."""
    data = (SAMPLES / sample).read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(data + f"copy {i}".encode())
    return folder


@pytest.fixture
def sample_folder(tmp_path: Path) -> Callable[..., Path]:
    """`sample_folder(names)`: tmp_path/"in" holding those sample_data files (see `copy_samples`)."""
    return lambda names: copy_samples(tmp_path / "in", names)


# --- out folders ---------------------------------------------------------------------------------


def read_rows(out: Path) -> list[dict]:
    """Every row in the out folder's Parquet parts, as dicts, in part order (fails if there is no part)."""
    assert list(Path(out).glob("part-*.parquet")), f"no Parquet part in {out}"
    return pq.read_table(out).to_pylist()


def latest_rows(out: Path) -> dict[str, dict]:
    """image_path -> its latest row (the last one written)."""
    return {row["image_path"]: row for row in read_rows(out)}


def result_for(out: Path, image_path: str, **fields) -> Result:
    """A `Result` row for `out`'s job (status ok, attempts 1 unless given), created now."""
    fingerprint = json.loads((Path(out) / "_job.json").read_text())["fingerprint"]
    fields = {"status": "ok", "attempts": 1, **fields}
    return Result(image_path=image_path, job_fingerprint=fingerprint, created_at=dt.datetime.now(dt.timezone.utc),
                  **fields)


def append_rows(out: Path, *results: Result) -> None:
    """Add rows to a run's out folder the way the runner does: same job, through the store, one new part."""
    store = Store.open(out, json.loads((Path(out) / "_job.json").read_text()), part_rows=100_000, part_seconds=600)
    for result in results:
        store.append(result)
    store.close()
    store.release()


@pytest.fixture(scope="session")
def local_server() -> Iterator[LocalServer]:
    """The bundled OpenAI-compatible endpoint on 127.0.0.1 and a free port, for the whole session."""
    server = LocalServer("127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(local_server: LocalServer) -> Iterator[LocalServer]:
    """The session's endpoint with no faults, limits, latency or observations left from other tests."""
    local_server.reset()
    yield local_server
    local_server.reset()


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _write_job(path: Path, **overrides) -> Path:
    """A job file for the test server (whose URL the tests pass as --base-url); keyword overrides go
    in as `section_field=value`, e.g. `limits_concurrency=1`."""
    sections: dict[str, dict] = {
        "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "local-caption", "stream": True},
        "prompt": {"user": "Describe this image.", "max_tokens": 100},
        "image": {"max_side": 256, "detail": "low"},
        "limits": {"concurrency": 4, "max_attempts": 3, "timeout_s": 10, "retry_base_s": 0.01,
                   "retry_max_s": 2.0, "grace_s": 5},
        "output": {"part_rows": 1000},
    }
    for key, value in overrides.items():
        section, name = key.split("_", 1)
        sections[section][name] = value
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def write_job() -> Callable[..., Path]:
    """`write_job(path, **overrides)`: the one job-file factory, for fixtures of any scope."""
    return _write_job


@pytest.fixture
def job_file(tmp_path: Path) -> Callable[..., Path]:
    """`job_file(**overrides)`: a job file in this test's tmp_path (see `write_job`)."""
    return lambda **overrides: _write_job(tmp_path / "job.toml", **overrides)


# --- running the CLI in-process -----------------------------------------------------------------


class Ran(NamedTuple):
    """What one in-process CLI call gave: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


def run_main(*argv) -> int:
    """`pipeline.cli.main` on `argv` (paths and numbers made strings); the exit code. Prefer the
    `cli` fixture, which also captures the output; this is for fixtures wider than one test."""
    from pipeline.cli import main

    return main([str(a) for a in argv])


@pytest.fixture
def cli(capsys) -> Callable[..., Ran]:
    """`cli(*argv)`: `caption *argv` in-process; `Ran(code, out, err)` with what it printed."""

    def run(*argv) -> Ran:
        capsys.readouterr()  # drop what came before, so `out`/`err` are this call's only
        code = run_main(*argv)
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def caption_run() -> Callable[..., int]:
    """`caption_run(server, folder, out, *flags)`: `caption run` in-process against `server`; the exit code."""

    def run(server: LocalServer, folder: Path, out: Path, *flags: str) -> int:
        job = _write_job(Path(out).parent / "job.toml", limits_max_attempts=2)
        return run_main("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress",
                        *flags)

    return run


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible server on 127.0.0.1 (moto in server mode, a free port) for this module, reached
    through s3fs; fake credentials in the environment (moto takes any; these keep s3fs from looking for
    real ones, or an instance profile). Yields its endpoint URL."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def durable_rows(out: Path) -> list[dict]:
    """Rows on disk now: the parts' rows plus the journals' whole lines (what the next run recovers;
    a torn last line is dropped there and asked again). For kill -9 tests."""
    rows = [r for part in sorted(Path(out).glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()]
    for journal in sorted(Path(out).glob("_journal-*.jsonl")):
        for line in journal.read_bytes().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a torn last line
    return rows


GEMINI_TEST_KEY = "AIza-test"
"""The key a Gemini test's keyed bundled endpoint takes (`LocalServer(api_key=GEMINI_TEST_KEY)`)."""


def gemini_client(server, key: str = GEMINI_TEST_KEY):
    """The official google-genai client pointed at a bundled endpoint, no retries: what the SDK parses."""
    from google import genai
    from google.genai import types

    options = types.HttpOptions(base_url=server.base_url.removesuffix("/v1"), api_version="v1beta",
                                retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=key, http_options=options)
