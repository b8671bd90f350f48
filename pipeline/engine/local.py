"""engine/local.py: `base_url = "local"` starts the bundled endpoint for the length of a run.

The one place a driver reaches the bundled endpoint (the demo and the tests use it); any other
base URL passes through untouched. The endpoint is imported only when asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..job import LOCAL_BASE_URL

__all__ = ["bundled_endpoint"]


@contextlib.asynccontextmanager
async def bundled_endpoint(base_url: str) -> AsyncIterator[str]:
    """Yield the URL to send to: `base_url`, or that of a bundled endpoint started for "local"."""
    if base_url != LOCAL_BASE_URL:
        yield base_url
        return
    from ..localserver import LocalServer

    server = LocalServer()
    url = await asyncio.to_thread(server.start)
    try:
        yield url
    finally:
        await asyncio.to_thread(server.stop)
