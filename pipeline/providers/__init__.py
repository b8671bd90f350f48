"""providers: one package per wire protocol, behind the `Provider` and `BatchBackend` interfaces.

`make_provider` and `make_batch_backend` are the only places that pick a protocol: the engine asks
them for the job's and never imports a protocol package itself. A protocol package exposes the
same two functions; a new protocol is a new package here plus one entry in `PROTOCOLS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType

import aiohttp

from ..errors import JobError
from ..job import Job
from .base import BatchBackend, BatchInfo, HttpRequest, LineResult, Provider, StreamParser

__all__ = ["PROTOCOLS", "make_provider", "make_batch_backend", "Provider", "BatchBackend", "BatchInfo",
           "HttpRequest", "LineResult", "StreamParser"]

PROTOCOLS = {"openai": "pipeline.providers.openai", "anthropic": "pipeline.providers.anthropic",
             "gemini": "pipeline.providers.gemini"}
"""Protocol name (the job's `[endpoint] api`) → its package."""


def make_provider(job: Job, base_url: str, *, api_key: str | None, headers: Mapping[str, str]) -> Provider:
    """The job's protocol for one run against `base_url` (the bundled endpoint's URL once started)."""
    return _package(job).make_provider(job, base_url, api_key=api_key, headers=headers)


def make_batch_backend(job: Job, provider: Provider, session: aiohttp.ClientSession, base_url: str, *,
                       api_key: str | None, headers: Mapping[str, str]) -> BatchBackend:
    """The job's Batch API over `session`, building its lines with `provider`."""
    return _package(job).make_batch_backend(job, provider, session, base_url, api_key=api_key, headers=headers)


def _package(job: Job) -> ModuleType:
    protocol = job.endpoint.api
    if protocol not in PROTOCOLS:
        raise JobError(f"{job.source}: [endpoint] api = {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return importlib.import_module(PROTOCOLS[protocol])
