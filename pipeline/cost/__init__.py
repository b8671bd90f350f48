"""cost: token and price arithmetic: `tokens.py` (image and text tokens by model family, usage
estimates, percentiles), `sizing.py` (the size to send at: what the model keeps, a token budget), `prices.py`
(the price table and what tokens cost) and `caching.py` (how a prompt cache splits a run's prompt tokens).
No network; the only file read is a price table."""

from .prices import (
    BUNDLED_PRICES,
    PRICE_FILE_EXAMPLE,
    Price,
    PriceTable,
    cost_usd,
    format_usd,
    load_prices,
    parse_price_table,
    price_mode,
)
from .caching import MIN_CACHE_TOKENS, CacheSplit, cache_split, cacheable_prefix, min_cache_tokens
from .sizing import budget_side, kept_side, min_image_tokens, sent_side
from .tokens import (
    FALLBACK_FORMULA,
    IMAGE_FORMULAS,
    ImageFormula,
    TokenHistogram,
    anthropic_image_tokens,
    estimate_usage,
    gemini_image_tokens,
    image_formula,
    image_tokens,
    openai_patch_count,
    openai_tile_tokens,
    qwen_image_tokens,
    text_tokens,
)

__all__ = ["ImageFormula", "Price", "PriceTable", "TokenHistogram", "IMAGE_FORMULAS", "FALLBACK_FORMULA",
           "BUNDLED_PRICES", "PRICE_FILE_EXAMPLE", "image_formula", "image_tokens", "openai_tile_tokens",
           "openai_patch_count", "anthropic_image_tokens", "gemini_image_tokens", "qwen_image_tokens", "text_tokens",
           "estimate_usage", "load_prices", "parse_price_table", "cost_usd", "format_usd", "kept_side", "budget_side",
           "sent_side", "min_image_tokens", "price_mode", "MIN_CACHE_TOKENS", "CacheSplit", "cache_split",
           "cacheable_prefix", "min_cache_tokens"]
