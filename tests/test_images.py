"""Tests for pipeline/images.py: real image files made with Pillow here, plus the files in sample_data/."""

from __future__ import annotations

import hashlib
import io
import math
import random
import struct
import typing
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageFile, ImageOps, ImageStat

from conftest import SAMPLES
from pipeline.errors import BadImageError
from pipeline.images import (
    MAX_PIXELS,
    MIME_TYPES,
    _open_shrunk,
    encode_image,
    fit_within,
    oriented_size,
    probe_size,
)
from pipeline.job import ImageSettings

SETTINGS = ImageSettings()  # max_side 1024, jpeg, quality 85

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def _psnr_db(a: Image.Image, b: Image.Image) -> float:
    rms = ImageStat.Stat(ImageChops.difference(a, b)).rms  # RMS of |a - b| per band: the RMSE
    mse = sum(r * r for r in rms) / len(rms)
    return 10 * math.log10(255**2 / mse) if mse else math.inf


# ---------------------------------------------------------------------------------------------
# fit_within and oriented_size: the size arithmetic cost estimates share


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((100, 50), 1024, (100, 50)),
        ((1024, 1024), 1024, (1024, 1024)),
        ((4000, 3000), 1024, (1024, 768)),
        ((3000, 4000), 1024, (768, 1024)),
        ((6000, 4000), 1024, (1024, 683)),  # 682.67 rounds up
        ((1000, 333), 512, (512, 170)),  # 170.496 rounds down
        ((1025, 1), 1024, (1024, 1)),
        ((1, 5000), 1024, (1, 1024)),
        ((5000, 2), 1024, (1024, 1)),  # 0.41 would be 0: kept at 1 pixel
        ((33, 2000), 100, (2, 100)),
        ((2, 2), 1, (1, 1)),
    ],
    ids=[
        "small-kept", "square-at-limit", "4:3-landscape", "3:4-portrait", "3:2-rounds-up",
        "rounds-down", "one-pixel-tall", "one-pixel-wide", "never-zero", "thin-portrait", "max-side-1",
    ],
)
def test_fit_within(size, max_side, expected):
    assert fit_within(*size, max_side) == expected


@pytest.mark.parametrize(
    "args", [(0, 10, 10), (10, 0, 10), (10, 10, 0), (-1, 10, 10)], ids=["w0", "h0", "max0", "neg"]
)
def test_fit_within_rejects_sizes_below_one(args):
    with pytest.raises(ValueError, match="must be >= 1"):
        fit_within(*args)


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [(1, (40, 30)), (2, (40, 30)), (3, (40, 30)), (4, (40, 30)), (5, (30, 40)), (6, (30, 40)),
     (7, (30, 40)), (8, (30, 40)), (0, (40, 30)), (9, (40, 30))],
    ids=["1", "2", "3", "4", "5", "6", "7", "8", "0-invalid", "9-invalid"],
)
def test_oriented_size_swaps_for_orientations_5_to_8(orientation, expected):
    assert oriented_size(40, 30, orientation) == expected


# ---------------------------------------------------------------------------------------------
# modes: everything becomes RGB, transparency becomes white


def _palette_with_transparent_index() -> bytes:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    image.paste(0, (0, 0, 8, 16))  # left half black, made transparent below
    return _save(image, "PNG", transparency=0)


def _gradient(mode: str, low: float, high: float) -> bytes:
    """A 256×16 left-to-right ramp from `low` to `high` in `mode`, saved as TIFF (keeps I and F)."""
    ramp = Image.linear_gradient("L").rotate(90).resize((256, 16))  # 0 at the left, 255 at the right
    scaled = ramp.convert("F").point(lambda v: low + v * (high - low) / 255)
    return _save(scaled if mode == "F" else scaled.convert(mode), "TIFF")


MODE_CASES = [
    # id, file bytes, [(pixel, expected RGB)], tolerance
    ("rgb", _save(Image.new("RGB", (16, 16), (10, 120, 230)), "PNG"), [((8, 8), (10, 120, 230))], 0),
    ("rgba-clear", _save(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), "PNG"), [((8, 8), WHITE)], 0),
    ("rgba-half-red", _save(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG"), [((8, 8), (255, 127, 127))], 1),
    ("la-clear", _save(Image.new("LA", (16, 16), (0, 0)), "PNG"), [((8, 8), WHITE)], 0),
    ("la-opaque", _save(Image.new("LA", (16, 16), (40, 255)), "PNG"), [((8, 8), (40, 40, 40))], 0),
    ("p-transparency", _palette_with_transparent_index(), [((2, 8), WHITE), ((12, 8), RED)], 0),
    ("p-gif", _save(Image.new("RGB", (16, 16), RED).convert("P"), "GIF"), [((8, 8), RED)], 0),
    ("pa-clear", _save(Image.new("PA", (16, 16), (0, 0)), "TIFF"), [((8, 8), WHITE)], 0),
    ("cmyk-jpeg", _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), [((8, 8), RED)], 8),
    ("l-jpeg", _save(Image.new("L", (16, 16), 90), "JPEG", quality=95), [((8, 8), (90, 90, 90))], 2),
    ("1-bit", _save(Image.new("1", (16, 16), 1), "PNG"), [((8, 8), WHITE)], 0),
    ("i16-full", _save(Image.new("I;16", (16, 16), 65535), "PNG"), [((8, 8), WHITE)], 0),
    ("i16-half", _save(Image.new("I;16", (16, 16), 32768), "PNG"), [((8, 8), (127, 127, 127))], 1),
    ("i16-dark", _save(Image.new("I;16", (16, 16), 1000), "PNG"), [((8, 8), (4, 4, 4))], 1),
    ("i32-ramp", _gradient("I", 1000, 70000), [((0, 8), BLACK), ((255, 8), WHITE), ((128, 8), (128, 128, 128))], 3),
    ("float-ramp", _gradient("F", 0.0, 1.0), [((0, 8), BLACK), ((255, 8), WHITE), ((128, 8), (128, 128, 128))], 3),
]


@pytest.mark.parametrize(("data", "checks", "tolerance"), [c[1:] for c in MODE_CASES], ids=[c[0] for c in MODE_CASES])
def test_every_mode_becomes_rgb_with_alpha_over_white(data, checks, tolerance):
    out = _decode(encode_image(data, ImageSettings(format="png")).data)
    assert out.mode == "RGB"
    for xy, expected in checks:
        assert _close(out.getpixel(xy), expected, tolerance), (xy, out.getpixel(xy), expected)


@pytest.mark.parametrize("mode", ["1", "P", "L"])
def test_one_bit_and_palette_images_are_shrunk_smoothly_not_by_nearest_pixel(mode):
    checkerboard = Image.new("L", (64, 64))
    checkerboard.putdata([255 * ((x + y) % 2) for y in range(64) for x in range(64)])
    data = _save(checkerboard.convert(mode), "PNG")
    out = _decode(encode_image(data, ImageSettings(max_side=16, format="png")).data)
    assert _close(out.getpixel((8, 8)), (128, 128, 128), 20)  # NEAREST would give black or white


def test_sample_transparent_logo_has_white_corners_and_a_photo_inside():
    logo = (SAMPLES / "transparent_logo.png").read_bytes()
    out = _decode(encode_image(logo, ImageSettings(format="png")).data)
    assert out.getpixel((1, 1)) == WHITE and out.getpixel((out.width - 2, out.height - 2)) == WHITE
    assert not _close(out.getpixel((out.width // 2, out.height // 2)), WHITE, 30)


# ---------------------------------------------------------------------------------------------
# EXIF orientation: all eight, the rotation applied to the small image


# How a camera stores an upright scene for each Orientation value, read from the EXIF definition
# of where row 0 and column 0 lie (CIPA DC-008, tag 274): 6 = "row 0 is the visual right side,
# column 0 the visual top", i.e. the scene turned 90° counter-clockwise, and so on. Written from
# the spec, not from pipeline.images' table, so the two can disagree.
STORED_FROM_UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """Upright test card: red top-left, green top-right, blue bottom-left, white bottom-right."""
    card = Image.new("RGB", (width, height), WHITE)
    card.paste(RED, (0, 0, width // 2, height // 2))
    card.paste(GREEN, (width // 2, 0, width, height // 2))
    card.paste(BLUE, (0, height // 2, width // 2, height))
    return card


def _stored_with_orientation(orientation: int, fmt: str) -> bytes:
    upright = _quadrants()
    transpose = STORED_FROM_UPRIGHT[orientation]
    stored = upright.transpose(transpose) if transpose is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(stored, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("max_side", [1024, 32], ids=["kept", "shrunk"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9), ids=[f"orientation-{n}" for n in range(1, 9)])
def test_exif_orientation_puts_red_quadrant_top_left(orientation, fmt, max_side):
    data = _stored_with_orientation(orientation, fmt)
    oracle = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # Pillow agrees with the table
    assert _close(oracle.getpixel((8, 8)), RED, 40)

    encoded = encode_image(data, ImageSettings(max_side=max_side, format="png"))
    out = _decode(encoded.data)
    assert (encoded.width, encoded.height) == (64, 48)
    assert out.size == (encoded.sent_width, encoded.sent_height) == fit_within(64, 48, max_side)
    w, h = out.size
    tolerance = 40 if fmt == "JPEG" else 0
    for xy, colour in [((w // 4, h // 4), RED), ((3 * w // 4, h // 4), GREEN),
                       ((w // 4, 3 * h // 4), BLUE), ((3 * w // 4, 3 * h // 4), WHITE)]:
        assert _close(out.getpixel(xy), colour, tolerance), (xy, out.getpixel(xy), colour)


def test_output_carries_no_exif_so_it_cannot_be_rotated_twice():
    encoded = encode_image(_stored_with_orientation(6, "JPEG"), SETTINGS)
    assert 0x0112 not in _decode(encoded.data).getexif()


def test_sample_rotated_exif_is_shown_upright():
    rotated = encode_image((SAMPLES / "rotated_exif.jpg").read_bytes(), ImageSettings(format="png"))
    upright = encode_image((SAMPLES / "coffee_cup.jpg").read_bytes(), ImageSettings(format="png"))
    assert (rotated.width, rotated.height) == (upright.width, upright.height) == (600, 400)
    assert _psnr_db(_decode(rotated.data), _decode(upright.data)) > 30  # same photo, re-encoded once


# ---------------------------------------------------------------------------------------------
# sizes, formats, frames


@pytest.mark.parametrize(
    ("size", "max_side"),
    [((100, 50), 1024), ((4000, 30), 1024), ((1, 3000), 1024), ((3000, 1), 512), ((33, 2000), 100), ((1, 1), 16)],
    ids=["small-never-upscaled", "panorama", "1px-wide", "1px-tall", "thin-portrait", "single-pixel"],
)
def test_sent_size_is_fit_within_of_the_original(size, max_side):
    encoded = encode_image(_save(Image.new("RGB", size, GREEN), "PNG"), ImageSettings(max_side=max_side))
    assert (encoded.width, encoded.height) == size
    assert (encoded.sent_width, encoded.sent_height) == fit_within(*size, max_side)
    assert _decode(encoded.data).size == fit_within(*size, max_side)


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "png"])
def test_each_format_has_its_mime_type_and_decodes_as_that_format(fmt):
    encoded = encode_image(_save(_quadrants(), "PNG"), ImageSettings(format=fmt))
    assert encoded.mime == MIME_TYPES[fmt] == f"image/{fmt}"
    out = _decode(encoded.data)
    assert out.format == fmt.upper() and out.mode == "RGB"
    assert encoded.data_url().startswith(f"data:image/{fmt};base64,")


def test_every_configurable_format_has_a_mime_type():
    formats = typing.get_args(typing.get_type_hints(ImageSettings)["format"])
    assert set(formats) == set(MIME_TYPES)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_setting_reaches_the_encoder(fmt):
    photo = (SAMPLES / "chelsea_the_cat.jpg").read_bytes()
    low = encode_image(photo, ImageSettings(format=fmt, quality=20))
    high = encode_image(photo, ImageSettings(format=fmt, quality=95))
    assert len(low.data) < len(high.data) / 2


def test_hash_and_byte_count_describe_the_original_file():
    data = (SAMPLES / "chelsea_the_cat.jpg").read_bytes()
    encoded = encode_image(data, ImageSettings(max_side=64))
    assert encoded.sha256 == hashlib.sha256(data).hexdigest()
    assert encoded.file_bytes == len(data) and encoded.sent_bytes == len(encoded.data) < len(data)


def _two_frames(fmt: str) -> bytes:
    first, second = Image.new("RGB", (24, 24), RED), Image.new("RGB", (24, 24), BLUE)
    return _save(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"], ids=["gif", "apng", "webp"])
def test_animated_images_give_their_first_frame(fmt):
    data = _two_frames(fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2  # really animated
    out = _decode(encode_image(data, ImageSettings(format="png")).data)
    assert _close(out.getpixel((12, 12)), RED, 10)


# ---------------------------------------------------------------------------------------------
# JPEG draft mode: a 12 MP photo is never decoded at full size


@pytest.fixture(scope="module")
def camera_jpeg() -> bytes:
    """A 4000×3000 q90 JPEG with real photo content (a sample photo scaled up)."""
    photo = Image.open(SAMPLES / "rocket_launch_falcon9.jpg").convert("RGB")
    return _save(photo.resize((4000, 3000), Image.Resampling.BILINEAR), "JPEG", quality=90)


def test_large_jpeg_is_decoded_at_a_reduced_scale(camera_jpeg):
    decoded = _open_shrunk(camera_jpeg, 1024)
    assert decoded.stored_size == (4000, 3000)
    assert decoded.image.size == (2000, 1500)  # 1/2 scale: the smallest that still covers 1024×768
    assert decoded.image.width >= 1024 and decoded.image.height >= 768


def test_jpeg_that_needs_no_shrinking_is_decoded_at_full_size(camera_jpeg):
    assert _open_shrunk(camera_jpeg, 4000).image.size == (4000, 3000)


def test_draft_path_output_matches_a_full_decode(camera_jpeg):
    encoded = encode_image(camera_jpeg, ImageSettings(format="png"))
    assert (encoded.width, encoded.height, encoded.sent_width, encoded.sent_height) == (4000, 3000, 1024, 768)
    reference = _decode(camera_jpeg).convert("RGB").resize((1024, 768), Image.Resampling.LANCZOS)
    assert _psnr_db(_decode(encoded.data), reference) >= 35


# ---------------------------------------------------------------------------------------------
# bad images: one-line BadImageError, nothing decoded that should not be


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _huge_one_bit_png(side: int) -> bytes:
    """A real, valid `side`×`side` 1-bit greyscale PNG: all black, so it compresses to ~50 kB."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + packed pixels
    squeezer = zlib.compressobj(6)
    rows_per_chunk = 500
    body = b"".join(squeezer.compress(row * rows_per_chunk) for _ in range(side // rows_per_chunk))
    body += squeezer.compress(row * (side % rows_per_chunk)) + squeezer.flush()
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    return _huge_one_bit_png(20_000)


def test_bomb_is_refused_before_decoding(bomb_png):
    assert len(bomb_png) < 200_000 and 20_000 * 20_000 > MAX_PIXELS
    with pytest.raises(BadImageError, match=r"image is 400 MP, over the 178 MP limit"):
        encode_image(bomb_png, SETTINGS)


def test_bomb_is_refused_even_when_pillow_limit_is_off(bomb_png, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some other code switched Pillow's guard off
    with pytest.raises(BadImageError, match=r"image is 20000×20000 = 400 MP, over the 178 MP limit"):
        encode_image(bomb_png, SETTINGS)


def test_pillow_bomb_warning_does_not_escape(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12×10 = 120 px: over the warning limit only
    with warnings.catch_warnings(record=True) as caught:
        encode_image(_save(Image.new("RGB", (12, 10), RED), "PNG"), SETTINGS)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def _half_of(data: bytes) -> bytes:
    return data[: len(data) // 2]


CORRUPT, NOT_IMAGE = "truncated or corrupt image data: ", "not an image Pillow can read"
BAD_CASES = [
    ("truncated-jpeg", lambda: _half_of((SAMPLES / "coffee_cup.jpg").read_bytes()), CORRUPT + "image file is trunc"),
    ("sample-corrupt-jpeg", lambda: (SAMPLES / "corrupt.jpg").read_bytes(), CORRUPT + "image file is truncated"),
    ("truncated-png", lambda: _half_of(_save(Image.effect_noise((64, 64), 50), "PNG")), CORRUPT),
    ("random-bytes", lambda: random.Random(0).randbytes(4096), NOT_IMAGE + r" \(it starts b'"),
    ("empty", lambda: b"", NOT_IMAGE + ": the file is empty"),
    ("text-file", lambda: b"name,caption\ncat.jpg,a cat\n", NOT_IMAGE),
    ("jpeg-header-only", lambda: b"\xff\xd8\xff\xe0" + b"\x00" * 12, NOT_IMAGE),
    ("eps-not-accepted", lambda: _save(Image.new("RGB", (8, 8), RED), "EPS"), NOT_IMAGE),  # would run Ghostscript
]


@pytest.mark.parametrize(("make", "words"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_a_one_line_bad_image_error(make, words):
    with pytest.raises(BadImageError, match=words) as caught:
        encode_image(make(), SETTINGS)
    assert caught.value.kind == "bad_image"
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------
# probe_size: the header only, for estimates


@pytest.fixture
def decoded_formats(monkeypatch) -> list[str]:
    """Record every pixel decode (ImageFile.load) instead of doing it: probe_size must read headers only.

    Recorded rather than raised, because an exception could be swallowed on the way (a failed
    EXIF read is ignored, by design).
    """
    seen: list[str] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *args, **kwargs: seen.append(self.format))
    return seen


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _stored_with_orientation(6, "JPEG"), (64, 48)),
        (lambda: _stored_with_orientation(8, "PNG"), (64, 48)),  # eXIf before the pixels: found
        (lambda: _save(Image.new("RGB", (300, 200)), "WEBP"), (300, 200)),
        (lambda: _huge_one_bit_png(9000), (9000, 9000)),
        (lambda: (SAMPLES / "rotated_exif.jpg").read_bytes(), (600, 400)),
        (lambda: (SAMPLES / "corrupt.jpg").read_bytes(), (640, 427)),  # truncation is not looked for
    ],
    ids=["jpeg-orientation-6", "png-orientation-8", "webp", "81-MP-png", "sample-rotated", "sample-corrupt"],
)
def test_probe_size_reads_the_displayed_size_from_the_header(make, expected, decoded_formats):
    assert probe_size(io.BytesIO(make())) == expected
    assert probe_size(make()) == expected  # bytes work as well as a file object
    assert decoded_formats == []


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: b"", "the file is empty"),
        (lambda: b"GIF89", NOT_IMAGE),
        (lambda: _huge_one_bit_png(20_000), "400 MP, over the 178 MP limit"),
    ],
    ids=["empty", "too-short", "bomb"],
)
def test_probe_size_refuses_what_encode_image_refuses(make, words, decoded_formats):
    with pytest.raises(BadImageError, match=words):
        probe_size(io.BytesIO(make()))
    assert decoded_formats == []


# ---------------------------------------------------------------------------------------------
# every shipped sample


PHOTO_SAMPLES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix != ".md" and p.name != "corrupt.jpg")


@pytest.mark.parametrize("name", PHOTO_SAMPLES)
def test_every_sample_image_encodes_within_max_side(name):
    data = (SAMPLES / name).read_bytes()
    original = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    encoded = encode_image(data, ImageSettings(max_side=256))
    assert (encoded.width, encoded.height) == original.size
    out = _decode(encoded.data)
    assert out.mode == "RGB" and out.format == "JPEG"
    assert out.size == (encoded.sent_width, encoded.sent_height) == fit_within(*original.size, 256)


def test_sample_data_is_small_and_has_no_hidden_files():
    files = list(SAMPLES.iterdir())
    assert not [f for f in files if f.name.startswith(".")]
    assert sum(f.stat().st_size for f in files) < 5_000_000
    assert 10 <= len(PHOTO_SAMPLES) <= 17  # 8-15 photos plus the derived logo and rotated file
