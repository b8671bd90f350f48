"""cost/sizing.py: the long side to send an image at, from the model family's token formula. Pure arithmetic.

Two rules, both on the long side L of the sent image (the short side follows, aspect kept, rounded
as `images.fit_within` rounds it; `fit_side` repeats that rule so that this package imports no
other stage, and a test holds the two equal):

- **What the model keeps** (`kept_side`): the provider shrinks a larger image before it counts
  it, so pixels past that size are uploaded for nothing. OpenAI's tile rule fits 2048 × 2048 and
  then a 768 px short side at `high`/`auto`, and keeps a 512 × 512 version at `low`; its patch rule
  fits 2048 px and then 1,536 patches; Anthropic fits a 1568 px long edge and 1,568 tokens; Qwen-VL
  fits 1,280 patches of 28 px (sources: the constants in `tokens.py`). Gemini tiles every 768 px of
  the image and charges each tile (https://ai.google.dev/gemini-api/docs/tokens): its docs name no
  size past which pixels are dropped, so no cap is set (a token budget bounds it instead). A model
  without a known rule (the fallback) and the bundled endpoint, which reads every pixel it gets,
  get no cap.
- **A token budget** (`budget_side`): the largest L whose image tokens, by the formula, fit N.

Why a search: up to the size the model keeps, every formula here is monotone in L (more pixels
never cost fewer tiles, patches or 28 px blocks), and so is "the model keeps it whole"; a binary
search over L in [1, long side] then finds the largest L that satisfies either test, for every
family, without inverting each formula by hand. Past the kept size some formulas are not
monotone (OpenAI's patch rule shrinks a 1,537-patch image below 1,536), which is one more reason to
search only below it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .tokens import (ANTHROPIC_BUDGET, ANTHROPIC_MAX_SIDE_PX, ANTHROPIC_PATCH_PX, PATCH_BUDGET, PATCH_FIT_PX, PATCH_PX,
                     QWEN_MAX_TOKENS, QWEN_PATCH_PX, TILE_FIT_PX, TILE_SHORT_PX, ImageFormula, image_tokens)

__all__ = ["TILE_LOW_PX", "fit_side", "kept_side", "budget_side", "sent_side", "min_image_tokens"]

TILE_LOW_PX = 512
"""OpenAI `detail: low`: "the model receives a low-resolution 512px x 512px version of the image"
(https://platform.openai.com/docs/guides/images-vision#specify-image-input-detail-level)."""


def fit_side(width: int, height: int, side: int) -> tuple[int, int]:
    """The size of a `width` × `height` image whose long side is shrunk to `side` (never grown):
    the same integer rule as `images.fit_within` (short side rounded half up, at least 1)."""
    long_side, short_side = max(width, height), min(width, height)
    if long_side <= side:
        return width, height
    scaled_short = max(1, (2 * short_side * side + long_side) // (2 * long_side))
    return (side, scaled_short) if width >= height else (scaled_short, side)


def _largest_side(width: int, height: int, ok: Callable[[int, int], bool]) -> int:
    """The largest long side L in [1, max(width, height)] with ok(*fit_side(w, h, L)); 0 if none.
    `ok` must hold for every L below one that it holds for (monotone)."""
    low, high = 0, max(width, height)
    while low < high:
        mid = (low + high + 1) // 2
        if ok(*fit_side(width, height, mid)):
            low = mid
        else:
            high = mid - 1
    return low


def _keeps(formula: ImageFormula, detail: str, w: int, h: int) -> bool:
    """Does the provider count a w × h image as it is, without shrinking it first?"""
    long_side, short_side = max(w, h), min(w, h)
    if formula.method == "tile":
        if detail == "low":
            return long_side <= TILE_LOW_PX
        return long_side <= TILE_FIT_PX and short_side <= TILE_SHORT_PX
    if formula.method == "patch":
        return long_side <= PATCH_FIT_PX and -(-w // PATCH_PX) * -(-h // PATCH_PX) <= PATCH_BUDGET
    if formula.method == "anthropic":
        return (long_side <= ANTHROPIC_MAX_SIDE_PX
                and -(-w // ANTHROPIC_PATCH_PX) * -(-h // ANTHROPIC_PATCH_PX) <= ANTHROPIC_BUDGET)
    if formula.method == "qwen":
        patches = max(1, round(w / QWEN_PATCH_PX)) * max(1, round(h / QWEN_PATCH_PX))
        return patches <= QWEN_MAX_TOKENS
    return True  # gemini: every tile is counted, none dropped


@functools.lru_cache(maxsize=65_536)
def kept_side(formula: ImageFormula, detail: str, width: int, height: int) -> int:
    """The largest long side (px) at which the model keeps a `width` × `height` image whole
    (see the module docstring); the image's own long side when the model keeps any size."""
    if not formula.known or not formula.caps:
        return max(width, height)
    return max(1, _largest_side(width, height, lambda w, h: _keeps(formula, detail, w, h)))


@functools.lru_cache(maxsize=65_536)
def budget_side(formula: ImageFormula, detail: str, width: int, height: int, budget: int) -> int:
    """The largest long side (px) at which the image's tokens by `formula` are at most `budget`.

    Raises ValueError when even a 1 px image costs more (`min_image_tokens`): no size fits.
    """
    side = _largest_side(width, height, lambda w, h: image_tokens(formula, w, h, detail) <= budget)
    if side == 0:
        raise ValueError(f"token_budget {budget} is below the {min_image_tokens(formula, detail)} tokens "
                         f"the smallest image costs by {formula.family}")
    return side


def sent_side(formula: ImageFormula, detail: str, width: int, height: int, max_side: int,
              budget: int | None = None) -> int:
    """The long side to send a `width` × `height` image at: `max_side`, capped at what the model
    keeps, and, with a `budget`, at the largest size whose image tokens fit it. Raises ValueError
    for a budget no size fits."""
    side = min(max_side, kept_side(formula, detail, width, height))
    if budget is not None:
        side = min(side, budget_side(formula, detail, width, height, budget))
    return side


def min_image_tokens(formula: ImageFormula, detail: str) -> int:
    """The tokens of the smallest image (1 × 1 px) by `formula`: no budget below it can be met."""
    return image_tokens(formula, 1, 1, detail)
