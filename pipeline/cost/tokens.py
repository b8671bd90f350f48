"""cost/tokens.py: how many tokens an image and a text cost, by model family. Pure arithmetic.

Owns the image-token formula of each model family (chosen by the longest model-name prefix), the
text-token rule, the usage estimate for a server that reports none (rows marked
`usage_source = estimated`), and the histogram that gives per-image percentiles in flat memory.

Every formula cites the provider page it comes from. Providers change these rules; when a
recorded run disagrees with `caption estimate`, trust the run and fix the formula here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..records import Usage

__all__ = ["ImageFormula", "TokenHistogram", "IMAGE_FORMULAS", "FALLBACK_FORMULA", "image_formula", "image_tokens",
           "openai_tile_tokens", "openai_patch_count", "anthropic_image_tokens", "gemini_image_tokens",
           "qwen_image_tokens", "text_tokens", "estimate_usage"]

CHARS_PER_TOKEN = 4
"""OpenAI's rule of thumb for English text: https://help.openai.com/en/articles/4936856 (the bundled
endpoint charges text the same way, so estimates of demo runs are exact)."""

# OpenAI tile method: https://platform.openai.com/docs/guides/images-vision#calculating-costs
# ("GPT-4o, GPT-4.1, GPT-4o-mini, CUA, and o-series (except o4-mini)").
TILE_FIT_PX = 2048  # first fit within 2048 x 2048
TILE_SHORT_PX = 768  # then shrink so the shortest side is at most 768 (never up)
TILE_PX = 512  # then count 512 px tiles

# OpenAI 32 px patch method, same page ("GPT-4.1-mini, GPT-4.1-nano, o4-mini", later gpt-5-mini/nano).
PATCH_PX = 32
PATCH_BUDGET = 1536  # at most this many patches; a larger image is shrunk to fit
PATCH_FIT_PX = 2048  # and its long side first fits in 2048 px (this is what makes 4000 x 1474 -> 1536)
_FLOAT_SLACK = 1e-9  # ceil() of a value that is an integer in exact arithmetic must not round up

# Anthropic: https://docs.anthropic.com/en/docs/build-with-claude/vision#evaluate-image-size
ANTHROPIC_PATCH_PX = 28  # one token per 28 x 28 px patch
ANTHROPIC_MAX_SIDE_PX = 1568  # the long edge is shrunk to this first
ANTHROPIC_BUDGET = 1568  # and then until the image needs at most this many tokens

# Gemini: https://ai.google.dev/gemini-api/docs/tokens ("Multimodal tokens", Gemini 2.0 and later).
GEMINI_SMALL_PX = 384  # both sides at most this: one flat charge
GEMINI_TILE_PX = 768  # otherwise 768 x 768 tiles
GEMINI_TOKENS_PER_TILE = 258

# Qwen-VL on Alibaba Cloud Model Studio: https://www.alibabacloud.com/help/en/model-studio/vision
# ("image token calculation": each 28 x 28 px block is a token, 4 to 1,280 tokens per image by
# default, plus 2 tokens marking the image's start and end). Taken from that page as we know it;
# not re-read for this table, so check it when a Qwen run disagrees.
QWEN_PATCH_PX = 28
QWEN_MIN_TOKENS = 4
QWEN_MAX_TOKENS = 1280  # 16,384 with vl_high_resolution_images, which caption does not send
QWEN_MARKER_TOKENS = 2


@dataclass(frozen=True, slots=True)
class ImageFormula:
    """How one model family turns the size of a sent image into prompt tokens."""

    method: Literal["tile", "patch", "anthropic", "gemini", "qwen"]
    family: str  # a short name for messages, e.g. "OpenAI tile 85/170"
    base: int = 0  # tile: the cost of detail=low, and the fixed part of high
    per_tile: int = 0  # tile: tokens per 512 px tile
    multiplier: float = 1.0  # patch: tokens per 32 px patch
    known: bool = True  # False for the fallback used for a model we have no rule for
    caps: bool = True  # the server shrinks larger images before counting them (sizing.kept_side); not the bundled one


def _tile(base: int, per_tile: int) -> ImageFormula:
    return ImageFormula("tile", f"OpenAI tile {base}/{per_tile}", base=base, per_tile=per_tile)


def _patch(multiplier: float) -> ImageFormula:
    return ImageFormula("patch", f"OpenAI 32 px patches x {multiplier}", multiplier=multiplier)


_ANTHROPIC = ImageFormula("anthropic", "Anthropic 28 px patches")
_GEMINI = ImageFormula("gemini", "Gemini 768 px tiles")
_QWEN = ImageFormula("qwen", "Qwen-VL 28 px patches")

IMAGE_FORMULAS: dict[str, ImageFormula] = {
    # Tile constants per model: images-vision guide, "Calculating costs" (link above).
    "gpt-4o": _tile(85, 170),
    "gpt-4o-mini": _tile(2833, 5667),
    "gpt-4.1": _tile(85, 170),
    "gpt-4.5": _tile(85, 170),
    "gpt-5": _tile(70, 140),
    "o1": _tile(75, 150),
    "o3": _tile(75, 150),
    # Patch multipliers, same guide.
    "gpt-4.1-mini": _patch(1.62),
    "gpt-4.1-nano": _patch(2.46),
    "gpt-5-mini": _patch(1.62),
    "gpt-5-nano": _patch(2.46),
    "o4-mini": _patch(1.72),
    "claude": _ANTHROPIC,
    "gemini": _GEMINI,
    "qwen-vl": _QWEN,
    "qwen2-vl": _QWEN,
    "qwen2.5-vl": _QWEN,
    "qwen3-vl": _QWEN,
    "qvq": _QWEN,
    # The bundled endpoint reports usage by the OpenAI tile method (localserver/openai_request.py
    # image_tokens) but reads every pixel it is sent, so nothing is capped for it.
    "local-caption": ImageFormula("tile", "OpenAI tile 85/170", base=85, per_tile=170, caps=False),
}
"""Model-name prefix → image formula; the longest matching prefix wins (gpt-4.1-mini before gpt-4.1)."""

FALLBACK_FORMULA = ImageFormula("tile", "OpenAI tile 85/170 (assumed: no rule for this model)", base=85,
                                per_tile=170, known=False)
"""Used for a model no prefix matches: the most common rule among OpenAI-compatible servers."""


def model_key(model: str) -> str:
    """The bare model name: lower case, without a routing prefix ("openai/gpt-4o", "models/gemini-...")."""
    return model.strip().lower().rsplit("/", 1)[-1]


def longest_prefix(name: str, prefixes: Iterable[str], *, boundary: bool) -> str | None:
    """The longest of `prefixes` that `name` starts with (at a "-", "@" or ":" if `boundary`)."""
    best = None
    for prefix in prefixes:
        if not name.startswith(prefix) or (best is not None and len(prefix) <= len(best)):
            continue
        rest = name[len(prefix):]
        if boundary and rest and rest[0] not in "-@:":
            continue
        best = prefix
    return best


@functools.lru_cache(maxsize=256)
def image_formula(model: str) -> ImageFormula:
    """Return the image formula for `model` by longest name prefix; FALLBACK_FORMULA if none matches."""
    prefix = longest_prefix(model_key(model), IMAGE_FORMULAS, boundary=False)
    return IMAGE_FORMULAS[prefix] if prefix else FALLBACK_FORMULA


@functools.lru_cache(maxsize=65_536)
def image_tokens(formula: ImageFormula, width: int, height: int, detail: str) -> int:
    """Return the prompt tokens one image of `width` × `height` pixels (as sent) costs.

    `detail` matters only to the OpenAI tile method ("auto" is counted as "high", an upper bound:
    the guide lets the model choose). The patch, Anthropic, Gemini and Qwen rules have no detail
    setting in their guides, so it is ignored for them. Cached: photo folders hold few sizes.
    """
    if width <= 0 or height <= 0:  # size unknown (an output file ingested without its index)
        return 0
    if formula.method == "tile":
        return openai_tile_tokens(width, height, detail, base=formula.base, per_tile=formula.per_tile)
    if formula.method == "patch":
        return math.floor(openai_patch_count(width, height) * formula.multiplier + 0.5)
    if formula.method == "anthropic":
        return anthropic_image_tokens(width, height)
    if formula.method == "gemini":
        return gemini_image_tokens(width, height)
    return qwen_image_tokens(width, height)


def openai_tile_tokens(width: int, height: int, detail: str, *, base: int = 85, per_tile: int = 170) -> int:
    """Image tokens by OpenAI's tile method (gpt-4o, gpt-4.1 constants by default).

    `low` costs `base`. `high`/`auto`: fit within 2048×2048, then scale so the shortest side is at
    most 768 (never up), count 512 px tiles: base + per_tile × tiles. Exact rational arithmetic, so
    a side that lands exactly on a tile edge (1500×2000 → 768×1024) is not pushed into a third tile.
    Source: https://platform.openai.com/docs/guides/images-vision#calculating-costs
    """
    if detail == "low":
        return base
    # The sides are a/d and b/d; every scaling keeps them as a ratio of integers.
    a, b, d = width, height, 1
    if max(a, b) > TILE_FIT_PX * d:
        a, b, d = a * TILE_FIT_PX, b * TILE_FIT_PX, max(a, b)
    if min(a, b) > TILE_SHORT_PX * d:
        a, b, d = a * TILE_SHORT_PX, b * TILE_SHORT_PX, min(a, b)
    tiles = -(-a // (TILE_PX * d)) * -(-b // (TILE_PX * d))
    return base + per_tile * tiles


def openai_patch_count(width: int, height: int) -> int:
    """Return the 32 px patches OpenAI counts for an image (before the model's multiplier).

    The long side first fits in 2048 px; if covering the image takes more than 1,536 patches it is
    shrunk by the guide's factor sqrt(32² × 1536 / (w × h)), then by as much again as makes the
    tighter side a whole number of patches; the count is capped at 1,536.
    Source: https://platform.openai.com/docs/guides/images-vision#calculating-costs
    (worked examples: 1024×1024 → 1024 patches, 1800×2400 → 1452).
    """
    w, h = float(width), float(height)
    fit = min(1.0, PATCH_FIT_PX / max(w, h))
    w, h = w * fit, h * fit
    raw = _ceil(w / PATCH_PX) * _ceil(h / PATCH_PX)
    if raw <= PATCH_BUDGET:
        return raw
    shrink = math.sqrt(PATCH_PX * PATCH_PX * PATCH_BUDGET / (w * h))
    across, down = w * shrink / PATCH_PX, h * shrink / PATCH_PX
    shrink *= min(math.floor(across) / across, math.floor(down) / down)
    return min(PATCH_BUDGET, _ceil(w * shrink / PATCH_PX) * _ceil(h * shrink / PATCH_PX))


def _ceil(value: float) -> int:
    """math.ceil that ignores float noise above a whole number (33.000000000000007 → 33)."""
    return math.ceil(value - _FLOAT_SLACK)


def anthropic_image_tokens(width: int, height: int) -> int:
    """Return Claude's image tokens: ⌈w/28⌉ · ⌈h/28⌉ after the long edge fits 1568 px and the
    count fits the 1,568-token budget (the image is shrunk a patch column at a time until it does).

    Source: https://docs.anthropic.com/en/docs/build-with-claude/vision#evaluate-image-size
    (1000×1000 → 1,296 tokens; 200×200 → 64). Integer arithmetic throughout.
    """
    long_side, short_side = max(width, height), min(width, height)
    if long_side <= ANTHROPIC_MAX_SIDE_PX:
        cols, rows = -(-long_side // ANTHROPIC_PATCH_PX), -(-short_side // ANTHROPIC_PATCH_PX)
    else:
        cols = ANTHROPIC_MAX_SIDE_PX // ANTHROPIC_PATCH_PX
        rows = -(-short_side * cols // long_side)
    while cols * rows > ANTHROPIC_BUDGET:
        cols -= 1  # the long side becomes cols × 28 px, the short side keeps the aspect ratio
        rows = -(-short_side * cols // long_side)
    return cols * rows


def gemini_image_tokens(width: int, height: int) -> int:
    """Return Gemini's image tokens: 258 if both sides are at most 384 px, else 258 per 768 px tile.

    Source: https://ai.google.dev/gemini-api/docs/tokens (images, Gemini 2.0 and later; the
    default media_resolution).
    """
    if width <= GEMINI_SMALL_PX and height <= GEMINI_SMALL_PX:
        return GEMINI_TOKENS_PER_TILE
    tiles = -(-width // GEMINI_TILE_PX) * -(-height // GEMINI_TILE_PX)
    return GEMINI_TOKENS_PER_TILE * tiles


def qwen_image_tokens(width: int, height: int) -> int:
    """Return Qwen-VL's image tokens: sides rounded to 28 px, area kept within 4-1,280 patches, + 2.

    The rounding follows Qwen's own `smart_resize` (round to the nearest multiple of 28, then
    shrink or grow by the area ratio if outside the bounds). Source: see QWEN_PATCH_PX above.
    """
    factor = QWEN_PATCH_PX
    max_pixels, min_pixels = QWEN_MAX_TOKENS * factor * factor, QWEN_MIN_TOKENS * factor * factor
    w_bar, h_bar = max(factor, round(width / factor) * factor), max(factor, round(height / factor) * factor)
    if w_bar * h_bar > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
    elif w_bar * h_bar < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w_bar, h_bar = math.ceil(width * beta / factor) * factor, math.ceil(height * beta / factor) * factor
    return (w_bar // factor) * (h_bar // factor) + QWEN_MARKER_TOKENS


def text_tokens(text: str) -> int:
    """Tokens in `text`, estimated at CHARS_PER_TOKEN characters each (rounded up)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_usage(sent_width: int, sent_height: int, detail: str, prompt_text: str, answer: str, *,
                   model: str | None = None) -> Usage:
    """An estimated `Usage` for a request whose server reported none.

    Image tokens by `model`'s family formula, or the OpenAI tile method (85/170) when no model is
    given; text at CHARS_PER_TOKEN characters a token.
    """
    formula = image_formula(model) if model else IMAGE_FORMULAS["gpt-4o"]
    prompt = image_tokens(formula, sent_width, sent_height, detail) + text_tokens(prompt_text)
    completion = text_tokens(answer)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 source="estimated")


# --- percentiles in flat memory -------------------------------------------------------------------


class TokenHistogram:
    """Counts of whole-number values (tokens per image): exact percentiles without a list of values.

    Memory grows with the number of *distinct* values, which a model's formula keeps small (a few
    thousand at most), not with the number of images.
    """

    __slots__ = ("_counts", "count", "total", "max")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self.count = 0  # values added
        self.total = 0  # their sum
        self.max = 0

    def add(self, value: int, times: int = 1) -> None:
        """Record `value` (`times` times)."""
        self._counts[value] = self._counts.get(value, 0) + times
        self.count += times
        self.total += value * times
        if value > self.max:
            self.max = value

    def percentile(self, q: float) -> int:
        """Return the nearest-rank `q`-th percentile (0 < q <= 100): the smallest value with at
        least q % of the values at or below it; 0 when empty."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for value in sorted(self._counts):
            seen += self._counts[value]
            if seen >= rank:
                return value
        return self.max

    @property
    def mean(self) -> float:
        """The average value, 0.0 when empty."""
        return self.total / self.count if self.count else 0.0

    def summary(self) -> dict[str, float]:
        """{"p50", "p90", "max", "mean"} for reports."""
        return {"p50": self.percentile(50), "p90": self.percentile(90), "max": self.max,
                "mean": round(self.mean, 1)}
