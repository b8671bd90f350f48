"""cost.py: token arithmetic. Pure functions, no I/O.

For now it owns the estimate used when a server reports no usage (marked `usage_source =
estimated` in the rows): image tokens by OpenAI's tile method, text at about four characters a
token. The price table, per-family image formulas and `caption estimate`/`report` build on this.
"""

from __future__ import annotations

import math

from .records import Usage

__all__ = ["openai_tile_tokens", "text_tokens", "estimate_usage"]

CHARS_PER_TOKEN = 4
"""OpenAI's rule of thumb for English text: https://help.openai.com/en/articles/4936856"""


def openai_tile_tokens(width: int, height: int, detail: str, *, base: int = 85, per_tile: int = 170) -> int:
    """Image tokens by OpenAI's tile method (gpt-4o, gpt-4.1 constants by default).

    `low` costs `base`. `high`/`auto`: fit within 2048×2048, then scale so the shortest side is at
    most 768 (never up), count 512 px tiles: base + per_tile × tiles.
    Source: https://platform.openai.com/docs/guides/images-vision#calculating-costs
    """
    if detail == "low":
        return base
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    tiles = math.ceil(width / 512) * math.ceil(height / 512)
    return base + per_tile * tiles


def text_tokens(text: str) -> int:
    """Tokens in `text`, estimated at CHARS_PER_TOKEN characters each (rounded up)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_usage(sent_width: int, sent_height: int, detail: str, prompt_text: str, answer: str) -> Usage:
    """An estimated `Usage` for a request whose server reported none."""
    prompt = openai_tile_tokens(sent_width, sent_height, detail) + text_tokens(prompt_text)
    completion = text_tokens(answer)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 source="estimated")
