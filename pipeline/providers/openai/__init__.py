"""providers/openai: OpenAI chat completions and the OpenAI Batch API, and every server that speaks them
(vLLM, Ollama, LiteLLM, one-api/new-api relays, OpenRouter)."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from ...job import Job
from .batch import OpenAIBatchBackend
from .chat import OpenAIProvider

__all__ = ["OpenAIProvider", "OpenAIBatchBackend", "make_provider", "make_batch_backend"]


def make_provider(job: Job, base_url: str, *, api_key: str | None, headers: Mapping[str, str]) -> OpenAIProvider:
    return OpenAIProvider(job, base_url, api_key=api_key, headers=headers)


def make_batch_backend(job: Job, provider: OpenAIProvider, session: aiohttp.ClientSession, base_url: str, *,
                       api_key: str | None, headers: Mapping[str, str]) -> OpenAIBatchBackend:
    return OpenAIBatchBackend(session, provider, base_url, api_key=api_key, headers=headers,
                              timeout_s=job.limits.timeout_s)
