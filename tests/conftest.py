"""Shared fixtures. One bundled endpoint serves the whole session; each test gets it freshly reset."""

from __future__ import annotations

from collections.abc import Iterator

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
