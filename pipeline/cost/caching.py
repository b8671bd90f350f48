"""cost/caching.py: how much of a job's prompt a provider can cache, and how a run's requests split
into cache writes, cache reads and plain input.

Pure arithmetic over the prompt text and per-model minimums; no I/O. `caption estimate` uses it for
`[prompt] cache = true`; the run itself records what the server reported (`cached_tokens`,
`cache_write_tokens`), which `caption report` prices.

The cacheable prefix is what comes before the image, which differs from request to request:
- Anthropic (`api = "anthropic"`): the system prompt, marked with `cache_control` (nothing else
  precedes the image there). Minimums per model from the Prompt caching docs, "Cache limitations"
  (https://platform.claude.com/docs/en/build-with-claude/prompt-caching): a shorter prefix is not
  cached and no error is raised; both cache counts stay 0.
- OpenAI (`api = "openai"`): the system prompt and the user text (the text part goes before the image
  part). Caching is automatic from 1,024 tokens, and hits come in steps of 128 tokens
  (https://platform.openai.com/docs/guides/prompt-caching); a write costs the plain input price.
- Gemini: implicit caching is automatic too, but its minimums and hit granularity are not modelled
  here (`cacheable_prefix` says None).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokens import longest_prefix, model_key, text_tokens

__all__ = ["MIN_CACHE_TOKENS", "CacheSplit", "cacheable_prefix", "min_cache_tokens", "cache_split"]

MIN_CACHE_TOKENS: dict[str, int] = {
    # Anthropic, Prompt caching docs, "Cache limitations" (as listed 2026-03, quoted in
    # anthropics/anthropic-sdk-python#1194): 4,096 for Opus 4.6 / 4.5 and Haiku 4.5; 1,024 for
    # Sonnet 4.5, Opus 4.1, Opus 4, Sonnet 4, Sonnet 3.7; 2,048 for Haiku 3.5 and Haiku 3.
    "claude-opus-4-6": 4096,
    "claude-opus-4-5": 4096,
    "claude-haiku-4-5": 4096,
    "claude-sonnet-4-5": 1024,
    "claude-opus-4-1": 1024,
    "claude-opus-4": 1024,
    "claude-sonnet-4": 1024,
    "claude-3-7-sonnet": 1024,
    "claude-3-5-haiku": 2048,
    "claude-3-haiku": 2048,
    # OpenAI: "prompts of 1024 tokens or longer", gpt-4o and newer (prompt caching guide)
    "gpt-4o": 1024,
    "gpt-4.1": 1024,
    "gpt-5": 1024,
    "o1": 1024,
    "o3": 1024,
    "o4-mini": 1024,
}
"""Model-name prefix → the shortest prefix, in tokens, the provider caches. A model without a row is
assumed not to cache (the estimate says so)."""

OPENAI_CACHE_STEP = 128  # OpenAI's cache hits grow in steps of 128 tokens past the first 1,024


@dataclass(frozen=True, slots=True)
class CacheSplit:
    """A run's prompt tokens that a cache changes: written once, then read by the requests after."""

    prefix_tokens: int  # the cacheable prefix of one request (0: nothing cacheable)
    minimum: int | None  # the model's minimum; None: unknown, no caching assumed
    write_tokens: int  # over the whole run, billed at the cache-write price
    read_tokens: int  # over the whole run, billed at the cached-input price

    @property
    def cached(self) -> bool:
        """True when the prefix is long enough to be cached at all."""
        return self.minimum is not None and self.prefix_tokens >= self.minimum


def min_cache_tokens(model: str) -> int | None:
    """The shortest prefix `model` caches, in tokens; None when not known."""
    prefix = longest_prefix(model_key(model), MIN_CACHE_TOKENS, boundary=True)
    return MIN_CACHE_TOKENS[prefix] if prefix else None


def cacheable_prefix(api: str, system: str | None, user: str) -> int | None:
    """Tokens of one request's prefix that come before the image (see the module docstring);
    None for a protocol whose caching is not modelled."""
    if api == "anthropic":
        return text_tokens(system or "")
    if api == "openai":
        return text_tokens((system or "") + user)
    return None


def cache_split(api: str, model: str, system: str | None, user: str, requests: int) -> CacheSplit:
    """How `requests` requests of one job split into cache writes and reads: the first writes the
    prefix, every later one reads it (the cache lives 5 minutes and each read refreshes it, so a run
    that keeps sending keeps it), when the prefix reaches the model's minimum. OpenAI writes at the
    plain input price and reads in steps of 128 tokens; requests in flight before the first answer may
    each write (README, "Anthropic": prompt caching), which this does not count."""
    prefix = cacheable_prefix(api, system, user)
    minimum = min_cache_tokens(model) if prefix is not None else None
    prefix = prefix or 0
    if minimum is None or prefix < minimum or requests <= 0:
        return CacheSplit(prefix, minimum, 0, 0)
    read = prefix
    if api == "openai":
        read = minimum + (prefix - minimum) // OPENAI_CACHE_STEP * OPENAI_CACHE_STEP
    return CacheSplit(prefix, minimum, write_tokens=prefix, read_tokens=read * (requests - 1))
