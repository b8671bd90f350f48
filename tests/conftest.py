"""Shared fixtures. One bundled endpoint serves the whole session; each test gets it freshly reset."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.localserver import LocalServer


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


@pytest.fixture(scope="session")
def caption_run() -> Callable[..., int]:
    """`caption_run(server, folder, out, *flags)`: `caption run` in-process against `server`; the exit code."""
    from pipeline.cli import main

    def run(server: LocalServer, folder: Path, out: Path, *flags: str) -> int:
        job = _write_job(Path(out).parent / "job.toml", limits_max_attempts=2)
        return main(["run", str(folder), "--job", str(job), "--out", str(out), "--base-url", server.base_url,
                     "--no-progress", *flags])

    return run
