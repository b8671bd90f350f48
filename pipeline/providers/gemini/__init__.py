"""providers/gemini: the Gemini API's generateContent (online, streamed or not) and its Batch Mode,
and the servers that speak it natively (relays exposing /v1beta/models/{model}:generateContent)."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from ...job import Job
from .generate import GeminiProvider

__all__ = ["GeminiProvider", "make_provider", "make_batch_backend"]


def make_provider(job: Job, base_url: str, *, api_key: str | None, headers: Mapping[str, str]) -> GeminiProvider:
    return GeminiProvider(job, base_url, api_key=api_key, headers=headers)


def make_batch_backend(job: Job, provider: GeminiProvider, session: aiohttp.ClientSession, base_url: str, *,
                       api_key: str | None, headers: Mapping[str, str]):
    """Gemini Batch Mode is not spoken yet: `--mode batch` stops here with a job error."""
    from ...errors import JobError

    raise JobError(f"{job.source}: [endpoint] api = \"gemini\" does not support --mode batch yet; run online")
