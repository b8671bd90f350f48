"""sources/objectstore.py: a folder on any fsspec file system (`s3://bucket/prefix/`, `gs://`, `az://`) as an `ImageSource`.

Owns listing a prefix and reading its objects; the rules for names (image extensions, hidden
entries, the resume key) are the local folder's, from `keys.py`, so a bucket holding the same
files as a folder gives the same keys: the object's path relative to the prefix, `/` between
folders, escaped by `escape_key`.

Listing is streamed. On S3 (s3fs) the prefix is listed page by page with `list_objects_v2` and its
continuation token (https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html, at most
1,000 keys a page; the first pages ask for 32 and 256, so the run starts sooner), in the order S3 returns
keys: UTF-8 binary order, the same on every run. Only one page is held at a time; s3fs's own
`find`/`ls` would hold the whole prefix. Other fsspec file systems (gcsfs, adlfs, memory://, ...)
are walked one directory at a time with `fs.ls`, depth first, names sorted, as the local folder is:
one directory's listing is held at a time.

Reads are bounded and retried: an object whose listed size is over `[input] max_file_mb` is refused
unread, a read asks for at most the limit + 1 bytes (a ranged GET), and a header read (`open`) fetches
64 KiB blocks on demand. A transient failure (connection error, timeout, 5xx, throttling) is retried
READ_ATTEMPTS times with backoff; every failure ends as an OSError, so a missing or unreadable object
becomes a `bad_image` row, never a crash. Items are small frozen values holding the URL and the
storage options, never a file system object: fsspec caches its instances, so opening one again in a
worker process (Ray) is cheap.
"""

from __future__ import annotations

import errno
import io
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import pyarrow as pa

from ..job import InputSettings
from .fs import open_fs, scheme_of
from .keys import HIDDEN, NOT_IMAGE, escape_key, is_hidden_name, is_image_name, key_name, too_big

__all__ = ["ObjectStoreSource", "ObjectItem", "Location", "LIST_PAGE_KEYS", "HEADER_BLOCK_BYTES", "READ_ATTEMPTS",
           "is_transient"]

log = logging.getLogger(__name__)

LIST_PAGE_KEYS = 1000
"""Keys asked for per `list_objects_v2` page (S3's maximum, and its default)."""

LIST_FIRST_PAGE_KEYS = 32
"""Keys asked for on the first page, then eight times as many a page up to LIST_PAGE_KEYS (32, 256,
1,000, ...): a small page comes back and parses sooner, so the check of INPUT (which needs one image)
and the run's first batch of items do not wait for thousands of keys."""

HEADER_BLOCK_BYTES = 64 * 1024
"""What a header read (`ObjectItem.open`) fetches at a time: the first block holds the size of
almost every JPEG, PNG, WebP and GIF; a header that goes further (a JPEG with a large EXIF
thumbnail or ICC profile before its frame header, a TIFF whose directory is at the end) costs one
more ranged read per block it reaches."""

MAX_CHUNK_BYTES = 8 * 1024 * 1024
"""The largest ranged read a sequential reader asks for at once."""

READ_ATTEMPTS = 3
"""Tries per read or listed page (the first included) when the failure is transient."""

RETRY_BASE_S = 0.2
"""First backoff between tries; doubled each time, jittered by ±50 %."""

ODD_NAME = "name not a plain relative path"
"""Skip reason for a key no file could have (`a//b.jpg`): its resume key could not name it again."""

_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
               "RequestTimeout", "ServiceUnavailable", "InternalError"}
"""S3 error codes that mean "try again": https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html"""
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                     errno.ECONNREFUSED, errno.EPIPE, getattr(errno, "EREMOTEIO", 121)}
_TRANSIENT_NAMES = ("Connection", "Timeout", "Incomplete", "Streaming", "Disconnected", "Payload")
"""Words in the names of botocore's and aiohttp's transport errors (EndpointConnectionError,
ReadTimeoutError, IncompleteReadError, ResponseStreamingError, ServerDisconnectedError, ...)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Location:
    """Where a source's objects are: INPUT's URL and the options its file system is opened with."""

    url: str  # as given: "s3://bucket/prefix/"
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)  # may hold credentials

    def fs(self) -> Any:
        """The fsspec file system (fsspec's instance cache makes this cheap after the first call)."""
        return open_fs(self.url, self.storage_options)[0]

    def root(self) -> str:
        """INPUT's path on the file system, without the protocol or a trailing slash: "bucket/prefix"."""
        return open_fs(self.url, self.storage_options)[1].rstrip("/")

    def url_of(self, path: str) -> str:
        """The URL of a path on this file system, for messages: "s3://bucket/prefix/a.jpg"."""
        return f"{scheme_of(self.url)}://{path}"


@dataclass(frozen=True, slots=True)
class ObjectItem:
    """One image object found by the listing (or named by a key)."""

    location: Location
    path: str  # on the file system, without the protocol: "bucket/prefix/a/b.jpg"
    key: str  # path relative to the prefix, POSIX form, escaped (`keys.escape_key`): the resume key
    size: int | None = None  # bytes, as listed; None when not listed (found by key)
    max_bytes: int | None = None  # a larger object is refused; None: no limit
    kept: Mapping[str, Any] = field(default_factory=dict)  # keep_columns values: a folder has none

    def read(self) -> bytes:
        """The object's bytes, at most `max_bytes`, in one ranged GET; OSError when it is missing,
        larger, or cannot be read after READ_ATTEMPTS tries."""
        self._check_size()
        if self.size == 0:
            return b""
        end = None if self.max_bytes is None else self.max_bytes + 1
        data = _retried(lambda: _read_range(self.location.fs(), self.path, 0, end), self.location.url_of(self.path))
        if self.max_bytes is not None and len(data) > self.max_bytes:  # larger than listed, or not listed
            raise OSError(errno.EFBIG, too_big(len(data), self.max_bytes, "more than"))
        return data

    def open(self) -> BinaryIO:
        """A buffered file object for header reads: its first HEADER_BLOCK_BYTES are fetched now (so a
        missing object fails here, with OSError), further blocks only when read."""
        self._check_size()
        handle = io.BufferedReader(_RangeReader(self), buffer_size=HEADER_BLOCK_BYTES)
        try:
            handle.peek(1)
        except BaseException:
            handle.close()
            raise
        return handle

    def _check_size(self) -> None:
        if self.max_bytes is not None and self.size is not None and self.size > self.max_bytes:
            raise OSError(errno.EFBIG, too_big(self.size, self.max_bytes))


class _RangeReader(io.RawIOBase):
    """An object read by ranged GETs, at most `max_bytes + 1` bytes of it, for `io.BufferedReader`.

    The first fetch is HEADER_BLOCK_BYTES; each fetch that continues where the last one ended asks
    for twice as much (up to MAX_CHUNK_BYTES), so a header probe costs one small read and copying a
    whole object (export's --copy-images) a few large ones.
    """

    def __init__(self, item: ObjectItem):
        super().__init__()
        self._item, self._pos, self._size = item, 0, item.size
        self._fs = item.location.fs()
        self._chunk = HEADER_BLOCK_BYTES
        self._ahead, self._ahead_at = memoryview(b""), 0  # fetched beyond what was asked, and where it starts

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            offset += self._object_size()
        elif whence == io.SEEK_CUR:
            offset += self._pos
        if offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = offset
        return offset

    def readinto(self, buffer) -> int:
        if not (len(self._ahead) and self._ahead_at == self._pos):
            self._fetch(len(buffer))
        count = min(len(buffer), len(self._ahead))
        buffer[:count] = self._ahead[:count]
        self._ahead, self._ahead_at, self._pos = self._ahead[count:], self._ahead_at + count, self._pos + count
        return count

    def _fetch(self, wanted: int) -> None:
        """Read at least `wanted` bytes from the position (fewer at the end or the size limit) into `_ahead`."""
        item, start = self._item, self._pos
        self._chunk = min(self._chunk * 2, MAX_CHUNK_BYTES) if start == self._ahead_at and start else HEADER_BLOCK_BYTES
        end = start + max(wanted, self._chunk)
        if self._size is not None:
            end = min(end, self._size)
        if item.max_bytes is not None:
            end = min(end, item.max_bytes + 1)
        data = b"" if end <= start else _retried(lambda: _read_range(self._fs, item.path, start, end),
                                                  item.location.url_of(item.path))
        self._ahead, self._ahead_at = memoryview(data), start

    def _object_size(self) -> int:
        if self._size is None:
            path = self._item.path
            self._size = _retried(lambda: int(self._fs.size(path)), self._item.location.url_of(path))
        return self._size


def _read_range(fs: Any, path: str, start: int, end: int | None) -> bytes:
    """Bytes [start, end) of an object (to its end when `end` is None); b"" from past its end."""
    try:
        return fs.cat_file(path, start=start, end=end)
    except OSError as err:  # S3 answers 416 InvalidRange for a range that starts past the end
        if _error_code(err)[1] == "InvalidRange":
            return b""
        raise


class ObjectStoreSource:
    """The image objects under a prefix of an fsspec file system (or one object), as an `ImageSource`."""

    remote_reads = True  # every read waits on the network: drivers read with more threads than cores

    def __init__(self, url: str, settings: InputSettings | None = None):
        self.url = str(url)
        self.settings = settings or InputSettings()
        self.location = Location(self.url, dict(self.settings.storage_options))
        self._walks: list[dict[str, int]] = []  # what each listing passed over, by reason
        self._root_object: bool | None = None  # does INPUT name one object? (asked once, when the listing is empty)

    def __repr__(self) -> str:
        return f"ObjectStoreSource({self.url!r})"

    def kept_schema(self) -> pa.Schema:
        """Empty: a folder has no columns to keep (`open_source` refuses keep_columns for one)."""
        return pa.schema([])

    @property
    def skipped(self) -> dict[str, int]:
        """Reason → objects passed over, by the listing that got furthest (a driver lists twice at
        once: one listing feeds the run, one counts for the progress bar)."""
        merged: dict[str, int] = {}
        for walk in list(self._walks):
            for reason, count in dict(walk).items():
                merged[reason] = max(merged.get(reason, 0), count)
        return merged

    @property
    def max_bytes(self) -> int:
        return int(self.settings.max_file_mb * 1_000_000)

    def items(self) -> Iterator[ObjectItem]:
        self._walks.append({})
        return self._items(self._walks[-1], quiet=False)

    def why_empty(self) -> str | None:
        """None when the listing finds an image; otherwise why not, in one line (a missing bucket,
        denied access, an endpoint that does not answer, an empty prefix, no image in it)."""
        passed: dict[str, int] = {}
        try:
            if next(self._items(passed, quiet=True), None) is not None:
                return None  # (when it is None, that one listing went to the end and counted everything)
        except FileNotFoundError:
            return "not found: no such bucket (or container, or folder on this file system); check the name"
        except PermissionError as err:
            return (f"access denied ({_one_line(err)}); check the credentials: the environment "
                    "(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) or [input] storage_options")
        except OSError as err:
            return f"cannot be listed: {_one_line(err)}"
        if self._root_object:
            return ("is not an image file (caption reads objects whose names end like an image Pillow opens here: "
                    ".jpg, .png, .webp, .gif, .tif, .avif, ...)")
        if not passed:
            return "holds no objects under this prefix: nothing to caption (is the prefix right?)"
        return "holds no image file to caption; passed over: " + ", ".join(
            f"{count} {reason}" for reason, count in sorted(passed.items()))

    def open_by_key(self, key: str) -> ObjectItem | None:
        """The object a key names under the prefix; None for a key that cannot name one (`keys.key_name`)."""
        name = key_name(key)
        if name is None:
            return None
        root = self.location.root()
        if self._names_one_object(self.location.fs(), root):
            return ObjectItem(self.location, root, key, None, self.max_bytes) if key == escape_key(
                root.rsplit("/", 1)[-1]) else None
        return ObjectItem(self.location, f"{root}/{name}", key, None, self.max_bytes)

    # --- the listing -----------------------------------------------------------------------

    def _items(self, skipped: dict[str, int], *, quiet: bool) -> Iterator[ObjectItem]:
        """Every image object under the prefix, in listing order; what is passed over is counted."""
        fs, root = self.location.fs(), self.location.root()
        hidden = None  # the last hidden folder counted: what lies below it is passed over with it
        listed = False
        for name, size in _listing(fs, root, self.location.url_of(root)):
            listed = True
            parts = name.split("/")
            at = next((i for i, part in enumerate(parts) if is_hidden_name(part)), None)
            if at is not None:
                top = "/".join(parts[:at + 1])
                if top != hidden:  # listings are sorted, so a folder's objects come together
                    skipped[HIDDEN] = skipped.get(HIDDEN, 0) + 1
                    hidden = top
            elif name.endswith("/"):
                continue  # a folder marker (consoles make them): not a file
            elif key_name(escape_key(name)) is None:
                skipped[ODD_NAME] = skipped.get(ODD_NAME, 0) + 1
                if not quiet:
                    log.info("skipping %s: its name has an empty folder part", self.location.url_of(f"{root}/{name}"))
            elif not is_image_name(parts[-1]):
                skipped[NOT_IMAGE] = skipped.get(NOT_IMAGE, 0) + 1
            else:
                yield ObjectItem(self.location, f"{root}/{name}", escape_key(name), size, self.max_bytes)
        if not listed and self._names_one_object(fs, root):
            name = root.rsplit("/", 1)[-1]
            if is_image_name(name):
                yield ObjectItem(self.location, root, escape_key(name), _retried(lambda: fs.size(root), self.url),
                                 self.max_bytes)
            else:
                skipped[NOT_IMAGE] = skipped.get(NOT_IMAGE, 0) + 1

    def _names_one_object(self, fs: Any, root: str) -> bool:
        """Is INPUT one object rather than a prefix? (A bucket never is.)"""
        if self._root_object is None:
            try:
                self._root_object = "/" in root and _retried(lambda: bool(fs.isfile(root)), self.url)
            except OSError:
                self._root_object = False
        return self._root_object


def _listing(fs: Any, root: str, url: str) -> Iterator[tuple[str, int | None]]:
    """(name relative to `root`, size) of every object under it: S3 page by page, others a directory at a time."""
    if callable(getattr(fs, "call_s3", None)):
        return _s3_pages(fs, root, url)
    return _walk_dirs(fs, root, url)


def _s3_pages(fs: Any, root: str, url: str) -> Iterator[tuple[str, int | None]]:
    """The prefix listed with `list_objects_v2`, one page (LIST_PAGE_KEYS keys) held at a time.

    Raises FileNotFoundError for a missing bucket, PermissionError when access is denied, OSError
    for anything else that lasts READ_ATTEMPTS tries (s3fs translates S3's errors to these).
    """
    bucket, _, prefix = root.partition("/")
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "",
                               "MaxKeys": min(LIST_FIRST_PAGE_KEYS, LIST_PAGE_KEYS)}
    cut = len(request["Prefix"])
    while True:
        page = _retried(lambda: fs.call_s3("list_objects_v2", **request), url)
        request["MaxKeys"] = min(request["MaxKeys"] * 8, LIST_PAGE_KEYS)
        for entry in page.get("Contents") or ():
            yield entry["Key"][cut:], entry.get("Size")
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        request["ContinuationToken"] = token


def _walk_dirs(fs: Any, root: str, url: str) -> Iterator[tuple[str, int | None]]:
    """Any other fsspec file system, depth first, names sorted, one directory's listing held at a
    time (`fs.ls` returns a directory whole). A hidden folder is yielded as `name/`, not entered."""
    stack = [("", _listed_dir(fs, root, url))]
    while stack:
        prefix, entries = stack[-1]
        if not entries:
            stack.pop()
            continue
        name, kind, size = entries.pop()
        if kind != "directory":
            yield prefix + name, size
        elif is_hidden_name(name):
            yield f"{prefix}{name}/", None
        else:
            stack.append((f"{prefix}{name}/", _listed_dir(fs, f"{root}/{prefix}{name}", url)))


def _listed_dir(fs: Any, path: str, url: str) -> list[tuple[str, str, int | None]]:
    """(name, "file" | "directory", size) of a directory's entries, reverse-sorted so pop() is in order."""
    entries = _retried(lambda: fs.ls(path, detail=True), url)
    found = [(entry["name"].rstrip("/").rsplit("/", 1)[-1], entry.get("type"), entry.get("size")) for entry in entries
             if entry["name"].rstrip("/") != path.rstrip("/")]  # some file systems list a directory in itself
    return sorted(found, reverse=True)


# --- failures ----------------------------------------------------------------------------


def _retried(call: Callable[[], T], what: str) -> T:
    """`call()`, tried again with backoff while it fails transiently (`is_transient`), at most
    READ_ATTEMPTS times; a failure that remains is raised as an OSError naming `what`."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 (every failure ends as an OSError: a row, never a crash)
            if attempt == READ_ATTEMPTS or not is_transient(err):
                if isinstance(err, OSError):
                    raise
                raise OSError(errno.EIO, f"{what}: {type(err).__name__}: {_one_line(err)}") from err
            wait_s = RETRY_BASE_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.debug("retrying %s in %.2f s: %s", what, wait_s, _one_line(err))
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def is_transient(err: BaseException) -> bool:
    """Is this failure worth another try: a dropped or refused connection, a timeout, a 5xx, 408 or
    429, or S3 throttling? A missing object, denied access or a bad request is not."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    status, code = _error_code(err)
    if status is not None or code is not None:
        return (status or 0) >= 500 or status in (408, 429) or code in _THROTTLING
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno in _TRANSIENT_ERRNOS
    module = type(err).__module__.split(".")[0]
    return module in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests") and any(
        word in type(err).__name__ for word in _TRANSIENT_NAMES)


def _error_code(err: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, S3 error code) of a botocore ClientError, or of the one s3fs translated into `err`."""
    for candidate in (err, err.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return status, (response.get("Error") or {}).get("Code")
    return None, None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(err).__name__
