"""providers/anthropic: Anthropic's Messages API (online, streamed or not) and its Message Batches API,
and the servers that speak them natively (relays exposing /v1/messages)."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from ...job import Job
from .batch import AnthropicBatchBackend
from .messages import AnthropicProvider

__all__ = ["AnthropicProvider", "AnthropicBatchBackend", "make_provider", "make_batch_backend"]


def make_provider(job: Job, base_url: str, *, api_key: str | None, headers: Mapping[str, str]) -> AnthropicProvider:
    return AnthropicProvider(job, base_url, api_key=api_key, headers=headers)


def make_batch_backend(job: Job, provider: AnthropicProvider, session: aiohttp.ClientSession, base_url: str, *,
                       api_key: str | None, headers: Mapping[str, str]) -> AnthropicBatchBackend:
    """The Message Batches API of the provider's server (its URL, key and headers are the provider's)."""
    return AnthropicBatchBackend(session, provider, timeout_s=job.limits.timeout_s)
