"""cost/prices.py: the price table (its shape, the bundled file and a user's), and what tokens cost.

Reads one file: the bundled `pipeline/prices.toml`, plus a user's price file when given. Otherwise
pure: look-ups by the longest model-name prefix and dollar arithmetic.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import JobError
from .tokens import longest_prefix, model_key

__all__ = ["Price", "PriceTable", "PRICE_FILE_EXAMPLE", "BUNDLED_PRICES", "load_prices", "parse_price_table",
           "cost_usd", "format_usd", "price_mode"]

BUNDLED_PRICES = "prices.toml"  # beside the pipeline package (package data)
TOKENS_PER_PRICE_UNIT = 1_000_000
"""Prices are quoted in USD per million tokens by every provider in the table."""

PRICE_FILE_EXAMPLE = """[models."my-model"]
input = 0.40          # USD per 1M prompt tokens
cached_input = 0.10   # optional; default: input
output = 1.60         # USD per 1M completion tokens (reasoning tokens included)
batch_input = 0.20    # optional; without them batch cost is unknown
batch_output = 0.80
cache_write = 0.50    # optional: prompt tokens written to the cache (Anthropic); default: input
source = "https://example.com/pricing"
as_of = "2026-01-31\""""
"""A price file row, shown to users whose model has no price."""


@dataclass(frozen=True, slots=True)
class Price:
    """List prices of one model, in USD per million tokens."""

    model: str  # the table key: a model name or prefix (longest prefix wins)
    input: float  # uncached prompt tokens
    output: float  # completion tokens, reasoning tokens included
    source: str  # where the numbers were read
    as_of: str  # when they were read, YYYY-MM-DD
    cached_input: float | None = None  # prompt tokens served from the provider's cache; None: as input
    batch_input: float | None = None  # Batch API prompt tokens; None: no batch price known
    batch_output: float | None = None  # Batch API completion tokens
    note: str = ""  # how the row was checked, caveats
    cache_write: float | None = None  # prompt tokens written to the cache (Anthropic, 5-minute TTL); None: as input
    flex_input: float | None = None  # OpenAI flex tier; None: the batch prices (flex is priced as Batch)
    flex_cached_input: float | None = None  # flex prompt tokens from the cache; None: flex input
    flex_output: float | None = None

    def rates(self, mode: str) -> tuple[float, float, float] | None:
        """(input, cached input, output) per 1M tokens for `mode` ("online", "batch" or "flex");
        None if the mode has no price.

        At batch prices the cache discount stacks with the batch one: cached tokens cost the batch
        input price times cached_input / input (Anthropic's pricing page: the multipliers stack; OpenAI's
        Batch tab lists cached input at half the cached price). Flex is priced at Batch API rates (flex
        processing guide), with the flex_* fields where a row has them (the pricing page's Flex tab).
        """
        if mode == "flex" and self.flex_input is not None and self.flex_output is not None:
            cached = self.flex_input if self.flex_cached_input is None else self.flex_cached_input
            return self.flex_input, cached, self.flex_output
        if mode in ("batch", "flex"):
            if self.batch_input is None or self.batch_output is None:
                return None
            share = self.cached_input / self.input if self.cached_input is not None and self.input > 0 else 1.0
            return self.batch_input, self.batch_input * share, self.batch_output
        cached = self.input if self.cached_input is None else self.cached_input
        return self.input, cached, self.output

    def write_rate(self, mode: str) -> float | None:
        """Per 1M prompt tokens written to the cache in `mode`; None if the mode has no price.

        Online: `cache_write` (Anthropic: 1.25 × input for the 5-minute cache), else the input price
        (OpenAI and Gemini charge nothing extra to write). Batch and flex: the same multiple of their
        input price (Anthropic: the batch discount and the caching multipliers stack).
        """
        rates = self.rates(mode)
        if rates is None:
            return None
        if self.cache_write is None or self.input <= 0:
            return rates[0]
        return self.cache_write if mode == "online" else rates[0] * self.cache_write / self.input


_PRICE_FIELDS = {f.name for f in fields(Price)} - {"model"}
_REQUIRED_PRICE_FIELDS = ("input", "output", "source", "as_of")
_DATE = re.compile(r"^(\d{4}-\d{2}(-\d{2})?|unverified)$")  # a month or a day; "unverified" says so


class PriceTable:
    """Prices by model-name prefix; `find` picks the longest prefix that ends at a name boundary."""

    def __init__(self, rows: Mapping[str, Price] | None = None):
        self._rows: dict[str, Price] = dict(rows or {})

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        return iter(self._rows.values())

    def find(self, model: str) -> Price | None:
        """Return the price for `model` (e.g. "gpt-4o-2024-08-06" → the "gpt-4o" row), None if unknown.

        A prefix matches only up to "-", "@" or ":" (dated snapshots, Vertex "@" versions), so
        "gpt-5.1" does not silently take gpt-5's price.
        """
        prefix = longest_prefix(model_key(model), self._rows, boundary=True)
        return self._rows[prefix] if prefix else None

    def updated(self, other: PriceTable) -> PriceTable:
        """A new table: this one with `other`'s rows added or replacing whole rows of the same key."""
        return PriceTable({**self._rows, **other._rows})


def parse_price_table(text: str, origin: str) -> PriceTable:
    """Parse a TOML price file (`[models."name"]` tables, see PRICE_FILE_EXAMPLE) into a PriceTable.

    Raises JobError naming `origin`, the model and the field for anything malformed.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise JobError(f"{origin}: not valid TOML: {err}") from None
    models = raw.get("models")
    if not isinstance(models, dict) or set(raw) - {"models"}:
        raise JobError(f'{origin}: a price file holds only [models."NAME"] tables, e.g.\n{PRICE_FILE_EXAMPLE}')
    return PriceTable({model_key(name): _parse_price(name, row, origin) for name, row in models.items()})


def _parse_price(name: str, row: Any, origin: str) -> Price:
    where = f'{origin}: [models."{name}"]'
    if not isinstance(row, dict):
        raise JobError(f"{where} must be a table")
    unknown = set(row) - _PRICE_FIELDS
    if unknown:
        raise JobError(f"{where} unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(_PRICE_FIELDS))})")
    for key in _REQUIRED_PRICE_FIELDS:
        if key not in row:
            raise JobError(f"{where} needs '{key}'")
    for key, value in row.items():
        if key in ("source", "as_of", "note"):
            if not isinstance(value, str):
                raise JobError(f"{where} {key} must be a string")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise JobError(f"{where} {key} must be a price in USD per 1M tokens (a number >= 0), not {value!r}")
    if not _DATE.match(row["as_of"]):
        raise JobError(f"{where} as_of must be a date like 2026-01-31 or a month like 2026-01, not {row['as_of']!r}")
    numbers = {k: float(v) for k, v in row.items() if k not in ("source", "as_of", "note")}
    return Price(model=model_key(name), source=row["source"], as_of=row["as_of"], note=row.get("note", ""),
                 **numbers)


def cost_usd(price: Price, mode: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
             cache_write_tokens: int = 0) -> float | None:
    """Return what the tokens cost at `price` in `mode` ("online", "batch" or "flex"), None if no such price.

    Cached prompt tokens and prompt tokens written to the cache are both part of `prompt_tokens`
    (as every protocol's row counts them): the first cost the cached input price, the second the
    cache-write price (`Price.write_rate`), the rest the input price; completion tokens, reasoning
    tokens included, cost the output price.
    """
    rates = price.rates(mode)
    if rates is None:
        return None
    input_rate, cached_rate, output_rate = rates
    cached = min(max(cached_tokens, 0), prompt_tokens)
    written = min(max(cache_write_tokens, 0), prompt_tokens - cached)
    dollars = ((prompt_tokens - cached - written) * input_rate + cached * cached_rate
               + written * price.write_rate(mode) + completion_tokens * output_rate)
    return dollars / TOKENS_PER_PRICE_UNIT


def price_mode(mode: str | None, service_tier: str | None) -> str:
    """The prices a row is billed at: "flex" for an online answer served at OpenAI's flex tier
    (the response's `service_tier`), else its mode ("online" or "batch")."""
    if (mode or "online") == "online" and service_tier == "flex":
        return "flex"
    return mode or "online"


def format_usd(value: float | None) -> str:
    """Return dollars for people: "$12.35", "$0.0123", or "unknown" for None."""
    if value is None:
        return "unknown"
    return f"${value:,.2f}" if value >= 1 else f"${value:,.4f}"


def load_prices(user_file: str | Path | None = None) -> PriceTable:
    """Return the bundled price table with the rows of `user_file` (a TOML price file) on top.

    Raises JobError when the user file is missing or malformed.
    """
    package = __package__.rpartition(".")[0]  # "pipeline": prices.toml ships beside its modules
    bundled = importlib.resources.files(package).joinpath(BUNDLED_PRICES).read_text(encoding="utf-8")
    table = parse_price_table(bundled, f"{package}/{BUNDLED_PRICES}")
    if user_file is None:
        return table
    try:
        text = Path(user_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{user_file}: price file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise JobError(f"{user_file}: cannot read price file: {err}") from None
    return table.updated(parse_price_table(text, str(user_file)))
