"""pixels.py: the pixel captioner of the bundled endpoint.

Owns what the server says about an image: its thumbnail (alpha flattened onto white), its dominant
colours, its brightness, the caption sentence, and the facts a structured answer is made of, with a
deterministic value for any JSON Schema. Honest, deterministic, and clearly not a language model.

It must not decode requests, know any protocol or do I/O: it takes opened Pillow images and sizes,
and returns words and values. It imports only Pillow and the standard library.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageStat

THUMB_SIDE_PX = 64  # long side of the thumbnail the caption is computed from (and kept in Observed)
COLOUR_GRID_PX = 16  # colours are counted on at most 16x16 pixels


def make_thumb(img: Image.Image) -> Image.Image:
    """Return a small RGB copy of an opened image (long side <= 64 px), alpha flattened onto white.

    `thumbnail` picks a JPEG draft scale and reduces before resampling, so large images stay cheap.
    """
    img.thumbnail((THUMB_SIDE_PX, THUMB_SIDE_PX), Image.Resampling.BILINEAR)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def _colour_name(hue: int, sat: int, val: int) -> str:
    """Name one pixel from Pillow's HSV bytes (each 0-255)."""
    if val < 40:
        return "black"
    if sat < 40:
        return "white" if val > 215 else "grey"
    degrees = hue * 360 / 256
    for limit, name in ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (195, "cyan"),
                        (255, "blue"), (290, "purple"), (345, "pink"), (361, "red")):
        if degrees < limit:
            break
    if name == "orange" and val < 170:
        return "brown"
    if val < 140:
        return f"dark {name}"
    if sat < 100 and val > 190:
        return f"light {name}"
    return name


def dominant_colours(thumb: Image.Image) -> list[str]:
    """Return up to three colour names that each cover at least 15% of the image, commonest first."""
    grid = thumb.copy()
    grid.thumbnail((COLOUR_GRID_PX, COLOUR_GRID_PX), Image.Resampling.BILINEAR)
    data = grid.convert("HSV").tobytes()
    counts: dict[str, int] = {}
    for i in range(0, len(data), 3):
        name = _colour_name(data[i], data[i + 1], data[i + 2])
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    pixels = len(data) // 3
    names = [name for name, count in ranked[:3] if count >= 0.15 * pixels]
    return names or [ranked[0][0]]


def brightness_word(thumb: Image.Image) -> str:
    """Return a word for the mean luminance (0-255) of the image."""
    mean = ImageStat.Stat(thumb.convert("L")).mean[0]
    for limit, word in ((45, "very dark"), (95, "dark"), (160, "moderately bright"), (210, "bright")):
        if mean < limit:
            return word
    return "very bright"


def caption(size: tuple[int, int], thumb: Image.Image) -> str:
    """Return the deterministic caption of an image: orientation, size, colours, brightness."""
    width, height = size
    orientation = "landscape" if width > height else "portrait" if height > width else "square"
    names = dominant_colours(thumb)
    colours = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"A {orientation} image, {width}×{height} pixels, mostly {colours}, {brightness_word(thumb)} overall."


def image_facts(size: tuple[int, int], thumb: Image.Image) -> dict[str, Any]:
    """The facts a structured answer is made of: caption, colour names, bright or not, a number (the long side)."""
    return {"caption": caption(size, thumb), "colours": dominant_colours(thumb),
            "bright": "bright" in brightness_word(thumb), "number": max(size)}


def value_for(schema: Any, facts: dict[str, Any]) -> Any:
    """A deterministic value of the schema's type, made from the image's facts.

    Strings get the caption, arrays of strings the colour names, booleans say whether the image is
    bright, numbers its size; an enum gets its first value.
    """
    if not isinstance(schema, dict):
        return facts["caption"]
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    kind = next((k for k in kind if k != "null"), "string") if isinstance(kind, list) else kind
    if kind == "object" or "properties" in schema:
        return {name: value_for(sub, facts) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        items = schema.get("items") or {}
        if isinstance(items, dict) and items.get("type", "string") == "string" and "enum" not in items:
            return list(facts["colours"])
        return [value_for(items, facts)]
    if kind == "boolean":
        return facts["bright"]
    if kind in ("integer", "number"):
        return facts["number"]
    return facts["caption"]
