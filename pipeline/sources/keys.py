"""sources/keys.py: the rules every source of named files shares: which names are images, which are
hidden, and how a relative path becomes a resume key and back.

No I/O, no walk: the local folder (`folder.py`) and object stores (`objectstore.py`) both apply
these to the names they list, so a bucket and a folder holding the same files give the same keys
and pass over the same names for the same reasons.
"""

from __future__ import annotations

import functools
import os
import re

from ..job import IMAGE_FORMATS

__all__ = ["HIDDEN", "NOT_IMAGE", "NOT_REGULAR", "OUTSIDE", "BROKEN", "image_extensions", "is_image_name",
           "is_hidden_name", "escape_key", "unescape_key", "key_name", "too_big"]

# Skip reasons, as a source's `skipped` counts them.
HIDDEN, NOT_IMAGE, NOT_REGULAR, OUTSIDE, BROKEN = (
    "hidden", "not an image file", "not a regular file", "link outside INPUT", "unreadable")

_FORMAT_ALIASES = {"MPO": "JPEG"}  # Pillow registers .mpo for MPO, which its JPEG reader opens
_ESCAPE = re.compile(r"\\(?:(\\)|x([0-9a-f]{2}))?")


@functools.cache
def image_extensions() -> frozenset[str]:
    """Every file name ending (lower case, with the dot) that Pillow registers for a format in
    `job.IMAGE_FORMATS` and can open in this install (`.avif` only with an AVIF-capable Pillow)."""
    from PIL import Image  # only a walk pays for Pillow's plugin registry

    Image.init()
    return frozenset(ext.lower() for ext, name in Image.registered_extensions().items()
                     if _FORMAT_ALIASES.get(name, name) in IMAGE_FORMATS and _FORMAT_ALIASES.get(name, name) in Image.OPEN)


def is_image_name(name: str) -> bool:
    """Does the file name end like an image Pillow opens here (`image_extensions`)?"""
    return os.path.splitext(name)[1].lower() in image_extensions()


def is_hidden_name(name: str) -> bool:
    """A file or folder name with a leading dot: passed over, with everything below it."""
    return name.startswith(".")


def too_big(size: int, limit: int, relation: str = "") -> str:
    """The message for a file over `[input] max_file_mb`: "file is 300 MB, over the 256 MB limit ..."."""
    return (f"file is {relation + ' ' if relation else ''}{_mb(size)} MB, over the {_mb(limit)} MB "
            "limit ([input] max_file_mb, --max-file-mb); not read")


def _mb(size: int) -> str:
    """Bytes as MB for a message: "1,500", "0.01", "12.3"."""
    return f"{size / 1e6:,.2f}".rstrip("0").rstrip(".")


def escape_key(name: str) -> str:
    """The key for a relative path as the file system gave it: valid UTF-8, reversible, collision-free.

    A name that is not UTF-8 (an old archive's Latin-1, say) reaches Python with surrogate escapes,
    which no UTF-8 file can hold: each such byte becomes `\\xe9`-style text (lower-case hex), and a
    real backslash becomes `\\\\`, so a file literally named `caf\\xe9.jpg` keeps a key of its own.
    A name without a backslash that is valid UTF-8 is its own key. `unescape_key` reverses it.
    """
    if "\\" not in name:
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    raw = name.encode("utf-8", "surrogateescape").replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def unescape_key(key: str) -> str | None:
    """The path (as Python names files: surrogate escapes for bytes that are not UTF-8) that
    `escape_key` turned into `key`; None when `key` is not such a key (a stray backslash, an escape
    of a byte that needs none, a NUL)."""
    if "\\" not in key:
        return None if "\0" in key else key
    raw, start = bytearray(), 0
    for found in _ESCAPE.finditer(key):
        raw += key[start:found.start()].encode("utf-8", "surrogatepass")
        if found.group(1):
            raw += b"\\"
        elif found.group(2):
            raw.append(int(found.group(2), 16))
        else:
            return None
        start = found.end()
    raw += key[start:].encode("utf-8", "surrogatepass")
    name = raw.decode("utf-8", "surrogateescape")
    return name if "\0" not in name and escape_key(name) == key else None


def key_name(key: str) -> str | None:
    """The relative path (`/` between folders) that `key` names, or None when the key is not a walk's
    key: empty, absolute, with `.`/`..`/empty parts, a NUL, a bad escape.

    Keys come from Parquet rows, which a person may have edited: nothing may be read or written
    outside the folder (or prefix) it was given. Escapes are undone first (`unescape_key`), so the
    name is the file's real name, bytes and all.
    """
    name = unescape_key(key) if isinstance(key, str) and key else None
    if name is None or any(part in ("", ".", "..") for part in name.split("/")):
        return None
    return name
