"""providers/gemini: the Gemini API's generateContent (online, streamed or not) and its Batch Mode,
and the servers that speak it natively (relays exposing /v1beta/models/{model}:generateContent)."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from ...job import Job
from .batch import GeminiBatchBackend
from .generate import GeminiProvider

__all__ = ["GeminiProvider", "GeminiBatchBackend", "make_provider", "make_batch_backend"]


def make_provider(job: Job, base_url: str, *, api_key: str | None, headers: Mapping[str, str]) -> GeminiProvider:
    return GeminiProvider(job, base_url, api_key=api_key, headers=headers)


def make_batch_backend(job: Job, provider: GeminiProvider, session: aiohttp.ClientSession, base_url: str, *,
                       api_key: str | None, headers: Mapping[str, str]) -> GeminiBatchBackend:
    """Batch Mode and the Files API of the provider's server (its URL, key and headers are the provider's)."""
    return GeminiBatchBackend(session, provider, timeout_s=job.limits.timeout_s)
