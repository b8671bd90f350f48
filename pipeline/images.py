"""images.py: one image file's bytes in, the bytes we send out; no network, no event loop, no file I/O.

Owns every pixel decision: refuse what is not a decodable image (`BadImageError`), guard against
decompression bombs, apply the EXIF orientation, flatten any mode onto white RGB, shrink so the long
side fits `max_side` (JPEG draft mode first, so a 12 MP photo is never decoded at full size), and
re-encode as JPEG, WebP or PNG with no metadata. Pure CPU work that releases the GIL inside Pillow,
so a driver may call `encode_image` from a thread pool. `probe_size` serves estimates: the size
read from the header alone (of bytes, or of a file object the caller opened), no pixel decoded.

Speed notes (`python benchmarks/preprocess.py`): for a 12 MP camera JPEG the naive path (full
decode, `ImageOps.exif_transpose`, LANCZOS resize) spends most of its time on pixels it then throws
away. Here libjpeg decodes at 1/2, 1/4 or 1/8 scale (DCT scaling) straight to a size at least as
large as the target, a cheap antialiased filter takes it the rest of the way, and the EXIF rotation
is applied to the small result. Measured on 2 cores with Pillow 13: ~16 images/s per core against
the naive ~4.5 (3.6×), 41 dB PSNR or better against the naive output, ~1.9× with 2 threads or 2
processes, and ~58 MB peak RSS per worker process against ~125 MB.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import BadImageError
from .job import IMAGE_FORMATS, ImageSettings
from .records import Encoded

__all__ = [
    "encode_image",
    "difference_hash",
    "probe_size",
    "fit_within",
    "oriented_size",
    "MIME_TYPES",
    "MAX_PIXELS",
    "ACCEPTED_FORMATS",
]

log = logging.getLogger(__name__)

MAX_PIXELS = 178_956_970
"""Largest width × height we decode: Pillow's own error threshold (2 × Image.MAX_IMAGE_PIXELS,
https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.open). Checked against the
header before any pixel is decoded, whatever the process has set Image.MAX_IMAGE_PIXELS to."""

ACCEPTED_FORMATS = IMAGE_FORMATS
"""The Pillow formats we decode (JPEG covers MPO, PNG covers APNG); anything else is "not an image".
Pillow picks the decoder from the file's magic bytes, not its name, and its EPS reader runs
Ghostscript, so a folder of untrusted ".jpg" files must not reach every one of Pillow's 40-odd
parsers (Pillow's security handbook, https://pillow.readthedocs.io/en/latest/handbook/security.html,
recommends blocking EPS and limiting formats). Formats this Pillow build lacks are skipped. The list
lives in `job.IMAGE_FORMATS`, which the folder source also reads to know which file names are images."""

MIME_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "webp": "image/webp", "png": "image/png"}
"""`ImageSettings.format` → the MIME type that goes in the data URL."""

RESAMPLE = Image.Resampling.BILINEAR
"""Final resize filter (Pillow's BILINEAR is antialiased: its support widens with the scale).
Measured on 12 MP camera-like JPEGs after draft decoding to 2000×1500 (benchmarks/preprocess.py):
BILINEAR, BICUBIC and LANCZOS all stay above 40 dB PSNR against the naive full-decode LANCZOS
output; BILINEAR is the fastest of them. BOX is faster still, but on fine stripes and small text
it aliases (25 dB against BILINEAR's 31 dB on such a test card), so it is not used."""

REDUCING_GAP = 3.0
"""Pillow first box-reduces by an integer factor while the rest of the scale stays >= this gap;
"with reducing_gap greater or equal to 3.0, the result is indistinguishable from fair
resampling in most cases" (https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.Image.resize).
Only shrinks of more than 6× gain (PNG, WebP, GIF: formats without draft mode)."""

WHITE = (255, 255, 255)
"""Transparent pixels become this: vision models read dark-on-black logos badly, and white is
what a browser shows behind a transparent image on a plain page."""

# Encoder settings, measured on 1024 px photos: JPEG optimize/progressive cost 2-4× the encode time
# for 2-7 % fewer bytes; WebP method 2 is ~2.3× faster than method 4 (libwebp's default) for 4-8 %
# more bytes; zlib level 3 is 2.5-3× faster than level 6 (Pillow's default) within ±5 % in size.
JPEG_OPTIONS = {"optimize": False, "progressive": False}
WEBP_METHOD = 2  # libwebp effort, 0 (fast) .. 6 (slow)
PNG_COMPRESS_LEVEL = 3  # zlib level, 0 .. 9

_EXIF_ORIENTATION = 0x0112
"""EXIF tag 274, Orientation (CIPA DC-008-2019, Exif 2.32): 1 = row 0 is the top and column 0 the
left side as stored; 2-8 name which visual side row 0 and column 0 hold instead."""

_UPRIGHT_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""Orientation value → the transpose that makes the stored pixels upright (the same table as
Pillow's ImageOps.exif_transpose; orientations 5-8 swap width and height)."""

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_PILLOW_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")  # in "Image size (N pixels) exceeds limit..."

_QUIET_BOMB_WARNING = ("ignore", None, Image.DecompressionBombWarning, None, 0)
"""The warnings.filters entry that `warnings.filterwarnings("ignore", category=...)` makes."""


@dataclass(frozen=True, slots=True)
class _Decoded:
    """A decoded image that may be smaller than the file says (JPEG draft), before the final resize."""

    image: Image.Image  # pixels as stored in the file (EXIF orientation not yet applied)
    stored_size: tuple[int, int]  # width, height the file's header declares
    box: tuple[float, float, float, float] | None  # region of `image` that maps to the whole original


def encode_image(data: bytes, settings: ImageSettings, *, dhash: bool = False) -> Encoded:
    """Return `data` (one image file's bytes) shrunk, upright, flattened on white and re-encoded.

    The long side of the result is at most `settings.max_side` (never upscaled); the format and
    quality are `settings.format` and `settings.quality`; no EXIF or other metadata is kept, so a
    server cannot rotate it a second time. Animated images give their first frame. With `dhash`,
    the result carries the `difference_hash` of the pixels sent (for near dedupe; it costs
    ~0.3-0.5 ms an image, 15-40 % of encoding a 500 px sample, so it is not computed otherwise).

    Raises BadImageError with a one-line message when `data` is not an image Pillow can read, is
    truncated or corrupt, or is larger than MAX_PIXELS.
    """
    _silence_bomb_warning()
    with _bad_image_errors():
        decoded = _open_shrunk(data, settings.max_side)
        orientation = _orientation(decoded.image)
        target = fit_within(*decoded.stored_size, settings.max_side)
        image = _resize(_to_resizable(decoded.image), target, decoded.box)
        image = _flatten_to_rgb(image)
    transpose = _UPRIGHT_TRANSPOSE.get(orientation)
    if transpose is not None:
        image = image.transpose(transpose)  # on the small image: ~1 ms at 1024 px, ~30 ms at 12 MP
    width, height = oriented_size(*decoded.stored_size, orientation)
    return Encoded(
        sha256=hashlib.sha256(data).hexdigest(),
        file_bytes=len(data),
        width=width,
        height=height,
        sent_width=image.width,
        sent_height=image.height,
        mime=MIME_TYPES[settings.format],
        data=_encode(image, settings),
        dhash=difference_hash(image) if dhash else None,
    )


DHASH_SIZE = (9, 8)
"""The difference hash compares neighbours in a 9 × 8 greyscale thumbnail: 8 × 8 = 64 bits."""


def difference_hash(image: Image.Image) -> int:
    """Return the 64-bit difference hash (dHash) of `image`, as a signed int64 (the column type).

    Neal Krawetz, "Kind of Like That" (2013, https://www.hackerfactor.com/blog/index.php?/archives/529-Kind-of-Like-That.html):
    shrink to 9 × 8 greyscale, then each bit says whether a pixel is brighter than its right-hand
    neighbour, row by row, the first bit highest. Re-encoding, resizing and small brightness or
    contrast changes move few of the 64 bits; another picture differs in about half of them.
    """
    small = image.convert("L").resize(DHASH_SIZE, Image.Resampling.BOX)
    pixels = small.tobytes()
    width = DHASH_SIZE[0]
    value = 0
    for row in range(DHASH_SIZE[1]):
        for col in range(width - 1):
            left, right = pixels[row * width + col], pixels[row * width + col + 1]
            value = (value << 1) | (left > right)
    return value - (1 << 64) if value >= 1 << 63 else value


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Return the size we send for a `width` × `height` image: long side <= `max_side`, aspect kept.

    Never upscales, and neither side drops below 1 pixel. Pure integer arithmetic (the short side
    is rounded half up), so cost estimates that call it agree with what `encode_image` sends.
    Raises ValueError for sizes or a `max_side` below 1.
    """
    if width < 1 or height < 1 or max_side < 1:
        raise ValueError(f"sizes must be >= 1, not {width}×{height} with max_side {max_side}")
    long_side, short_side = max(width, height), min(width, height)
    if long_side <= max_side:
        return width, height
    scaled_short = max(1, (2 * short_side * max_side + long_side) // (2 * long_side))
    return (max_side, scaled_short) if width >= height else (scaled_short, max_side)


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """Return the displayed size of a stored `width` × `height` image with this EXIF orientation.

    Orientations 5-8 turn the image by 90° (with or without a flip), so width and height swap;
    1-4 and any value outside 1-8 (treated as upright) keep them.
    """
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def probe_size(source: BinaryIO | bytes) -> tuple[int, int]:
    """Return an image's displayed (width, height) after EXIF orientation, reading its header only.

    `source` is the file's bytes or a binary file object (read, seek, tell) that the caller opened
    and closes: this module does no file I/O. Pillow opens lazily, so no pixel is decoded and a JPEG
    costs tens of microseconds (what `caption estimate` needs). A truncated file with an intact
    header passes here; only decoding (`encode_image`) finds it. An orientation stored after the
    pixel data (a PNG eXIf chunk after IDAT) is not looked for, as that would mean decoding them.

    Raises BadImageError, as `encode_image` does, for a file that is empty, not an image Pillow can
    read, or larger than MAX_PIXELS.
    """
    _silence_bomb_warning()
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with _bad_image_errors():
        image = _open_checked(stream)
        if image.format == "PNG" and "exif" not in image.info:
            return image.size  # PngImageFile.getexif() would decode the pixels to look further
        return oriented_size(*image.size, _orientation(image))


def _open_shrunk(data: bytes, max_side: int) -> _Decoded:
    """Open `data`, check its size, and decode it; JPEGs at the smallest DCT scale still >= target.

    `img.draft()` is called with the exact target size: `Image.thumbnail()` would ask it for twice
    the box, which leaves a 4000 px JPEG bound for 1024 px decoding at full size. Pillow picks a
    scale of 1/1, 1/2, 1/4 or 1/8 whose result still covers the target
    (https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.Image.draft).
    Other formats have no draft mode and decode at full size.
    """
    image = _open_checked(io.BytesIO(data))
    stored_size = image.size
    target = fit_within(*stored_size, max_side)
    box = None
    if target != stored_size:
        drafted = image.draft("RGB", target)  # None unless the format can decode smaller
        if drafted is not None:
            box = drafted[1]
    image.load()
    return _Decoded(image=image, stored_size=stored_size, box=box)


def _open_checked(stream: BinaryIO) -> ImageFile.ImageFile:
    """Read the header in `stream` (no pixels yet) and refuse images over MAX_PIXELS."""
    head = stream.read(8)
    if not head:
        raise BadImageError("not an image Pillow can read: the file is empty (0 bytes)")
    try:
        image = Image.open(stream, formats=_available_formats())  # Pillow seeks back to 0 itself
    except UnidentifiedImageError:
        raise BadImageError(f"not an image Pillow can read (it starts {head!r})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadImageError(_bomb_message(f"{width}×{height} = ", width * height))
    return image


@functools.cache
def _available_formats() -> tuple[str, ...]:
    """ACCEPTED_FORMATS that this Pillow build can open (Image.open raises KeyError on others)."""
    Image.init()  # registers every plugin, as Image.open itself does on a first miss
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


def _bomb_message(size_text: str, pixels: int) -> str:
    megapixels = -(-pixels // 1_000_000)  # round up: anything over the limit reads as over it
    return (
        f"image is {size_text}{megapixels:,} MP, over the {MAX_PIXELS // 1_000_000} MP limit; "
        "not decoded (decompression bomb guard)"
    )


def _silence_bomb_warning() -> None:
    """Make sure Pillow's DecompressionBombWarning is ignored: we enforce MAX_PIXELS ourselves.

    Pillow warns between Image.MAX_IMAGE_PIXELS and twice that, which would print once per run in
    the middle of the progress bar. A process-wide filter, added on first use and again if a
    `warnings.catch_warnings()` block (pytest wraps every test in one) has since dropped it:
    catch_warnings itself is not thread-safe before Python 3.14, so it cannot be used per call
    (https://docs.python.org/3.11/library/warnings.html#temporarily-suppressing-warnings).
    """
    if _QUIET_BOMB_WARNING not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@contextmanager
def _bad_image_errors() -> Iterator[None]:
    """Turn whatever Pillow raises while opening or decoding into a one-line BadImageError.

    Our own BadImageError passes unchanged; Pillow's DecompressionBombError (raised inside
    Image.open, before we see the size) gets our wording; anything else (OSError "image file is
    truncated", SyntaxError, ValueError, struct.error, ...) means truncated or corrupt data.
    """
    try:
        yield
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        found = _PILLOW_BOMB_PIXELS.search(str(err))
        message = _bomb_message("", int(found.group(1))) if found else f"decompression bomb guard: {err}"
        raise BadImageError(message) from err
    except Exception as err:
        raise BadImageError(f"truncated or corrupt image data: {err or type(err).__name__}") from err


def _orientation(image: Image.Image) -> int:
    """Return the EXIF Orientation (1-8) of `image`, 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as err:  # corrupt EXIF must not cost the pixels: send them as stored
        log.debug("ignoring unreadable EXIF: %s", err)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_resizable(image: Image.Image) -> Image.Image:
    """Return `image` in a mode Pillow resizes well: RGB, L, RGBA or LA (alpha kept for later).

    Pillow resizes palette and 1-bit images with NEAREST whatever filter is asked for
    (https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.Image.resize), and a
    plain convert("L") clips 16/32-bit and float images to white, so those are converted first.
    """
    mode = image.mode
    if mode in ("RGB", "L", "RGBA", "LA"):
        return image
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in ("PA", "RGBa", "La"):
        return image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    if mode in _HIGH_BIT_MODES:
        return _scale_to_8bit(image)
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversion


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit or float greyscale image linearly onto 0-255 ("L").

    16-bit images use their format's full range (65535 → 255), as a browser shows a 16-bit PNG.
    32-bit integer and float images have no agreed range, so their own darkest and brightest
    values become 0 and 255.
    """
    if image.mode.startswith("I;16"):
        image = image.convert("I")  # point() knows I;16 but not its big-endian twins
        low, high = 0, 65535
    else:
        low, high = image.getextrema()
    scale = 255 / (high - low) if high > low else 0.0
    offset = -low * scale if high > low else min(max(low, 0), 255)
    return image.point(lambda value: value * scale + offset).convert("L")


def _resize(image: Image.Image, target: tuple[int, int], box: tuple[float, ...] | None) -> Image.Image:
    """Return `image` resized to `target` (no-op when it is already that size)."""
    if image.size == target and box is None:
        return image
    return image.resize(target, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    """Return `image` as RGB, its transparent parts laid over WHITE (not black, as convert does)."""
    if image.mode == "RGB":
        return image
    if image.mode not in ("RGBA", "LA"):
        return image.convert("RGB")
    background = Image.new("RGB", image.size, WHITE)
    background.paste(image.convert("RGB"), mask=image.getchannel("A"))
    return background


def _encode(image: Image.Image, settings: ImageSettings) -> bytes:
    """Return `image` encoded as `settings.format`, without metadata."""
    buffer = io.BytesIO()
    if settings.format == "jpeg":
        image.save(buffer, "JPEG", quality=settings.quality, **JPEG_OPTIONS)
    elif settings.format == "webp":
        image.save(buffer, "WEBP", quality=settings.quality, method=WEBP_METHOD)
    else:
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
