"""sources/webdataset.py: WebDataset tar shards as INPUT, read as a stream with the standard library.

Owns the shard list (a shard, a brace pattern, a `::` list, or a text file listing shards; local
or on an fsspec file system), the tar conventions of WebDataset, the sample's key, the choice of
its image member and the values of `[input] keep_columns`. It reads; it never writes and sends nothing.

The conventions, from the WebDataset format spec (https://github.com/webdataset/webdataset#the-webdataset-format,
and `webdataset.tariterators`: `tar_file_iterator`, `base_plus_ext`, `group_by_keys`):
- a sample is the *consecutive* tar members that share a key; the key (`__key__`) is the member's
  path up to the first dot of its base name, the extension is the rest, lower-cased (`a/0001.seg.png`
  is key `a/0001`, extension `seg.png`);
- members that are not regular files, whose name starts with `__` (`__meta__`), or whose base name
  has no dot (or starts with one) belong to no sample and are passed over;
- shard names may hold brace patterns, expanded in order as bash and `braceexpand` do
  (`{00000..00099}` zero-padded when a bound starts with 0, `{a,b}` lists, nested), and several
  patterns may be joined with `::` (`webdataset.shardlists.expand_urls`).

Streaming: each shard is read once, front to back, with `tarfile` in stream mode (`r|`, after
this module undoes gzip/bz2/xz itself), so the base install needs no extra and an object store is read
sequentially. One member is in memory at a time, and only a wanted one (the image, a kept member):
a member over `[input] max_file_mb` is never read, its item is refused as a `bad_image` row. A
shard that is missing, truncated or corrupt keeps what was read from it; the rest of it is passed
over with one log line naming it, and the walk goes on to the next shard.

Items hold the kept values and where their image is (shard, offset, size). Those of a local shard
that is not compressed read it when asked (a seek and a read, from the page cache: the walk just
passed it), so the queues and a sample hold small items; those of an object store or a compressed
shard carry the bytes the walk read (bounded), so a worker or a Ray task never reopens such a shard.
`open_by_key` (export, review) finds an image from an index built by one pass over the shards on
first use (sorted arrays, about 40 bytes a sample), then reads it from its shard at its offset.

Keys are unique per out folder: a key met again (in another shard, or later in the same one) is
passed over, counted as "duplicate key", with a log line naming both shards; `[input] shard_keys =
true` makes every key `<shard name>/<__key__>` for datasets whose keys repeat across shards.
"""

from __future__ import annotations

import bisect
import bz2
import errno
import gzip
import hashlib
import heapq
import io
import logging
import lzma
import os
import posixpath
import re
import tarfile
import threading
import zlib
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa

from ..errors import JobError
from ..job import InputSettings
from .folder import escape_key, image_extensions, open_regular
from .fs import is_url, open_fs

__all__ = ["SHARD_SUFFIXES", "ShardItem", "WebDatasetSource", "expand_braces", "looks_like_shards",
           "shard_locations", "shard_name", "shards_found", "split_member"]

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
"""INPUT names shards (with `[input] format = "auto"`) when each of its names ends like this."""
LIST_SEPARATOR = "::"  # several shard patterns in one INPUT, as webdataset's expand_urls splits them
MAX_SHARDS = 1_000_000  # shard names one INPUT may expand to (they are held as a list)
MAX_LIST_BYTES = 16 << 20  # a text file listing shards is read up to this size

# Skip reasons, as `WebDatasetSource.skipped` counts them.
NO_IMAGE, DUPLICATE, BAD_SHARD = "no image member", "duplicate key", "unreadable shard"

_MAGIC = ((b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")), (b"BZh", bz2.BZ2File),
          (b"\xfd7zXZ\x00", lzma.LZMAFile))
"""Compressed shards, told by their first bytes (RFC 1952; the bzip2 and xz file formats)."""
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")
_BINARY_MEMBERS = frozenset({"npy", "npz", "pth", "pyd", "pickle", "pkl", "mp4", "webm", "mp3", "wav", "flac",
                             "ogg", "tar", "gz", "mat", "bin"})
"""Kept members whose values are bytes (beside every image extension); any other member is text."""


# --- names ----------------------------------------------------------------------------------


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member's name by the WebDataset rule, or None for a member that
    belongs to no sample (no dot in its base name, or a base name starting with one)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def expand_braces(pattern: str) -> Iterator[str]:
    """The names a bash-style brace pattern stands for, in order: `{00..03}` (zero-padded when a
    bound starts with 0, as bash and `braceexpand` pad), `{0..9..2}`, `{a..c}`, `{x,y}`, nested.
    Raises ValueError for unbalanced braces."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced braces in {pattern!r}")
        yield pattern
        return
    end, choices = _brace_group(pattern, start)
    suffixes = list(expand_braces(pattern[end + 1:]))
    if len(choices) == 1:
        ranged = _brace_range(choices[0])
        if ranged is None:  # "{x}" is no pattern: bash keeps it as it is
            for inner in expand_braces(choices[0]):
                for suffix in suffixes:
                    yield f"{pattern[:start]}{{{inner}}}{suffix}"
            return
        choices = ranged
    for choice in choices:
        for inner in expand_braces(choice):
            for suffix in suffixes:
                yield pattern[:start] + inner + suffix


def _brace_group(pattern: str, start: int) -> tuple[int, list[str]]:
    """(index of the `}` that closes the `{` at `start`, the comma-separated choices inside it)."""
    depth, last, choices = 0, start + 1, []
    for index in range(start, len(pattern)):
        char = pattern[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                choices.append(pattern[last:index])
                return index, choices
        elif char == "," and depth == 1:
            choices.append(pattern[last:index])
            last = index + 1
    raise ValueError(f"unbalanced braces in {pattern!r}")


def _brace_range(text: str) -> list[str] | None:
    """The items of `a..b[..step]` (numbers or letters), or None when `text` is not a range."""
    if match := _INT_RANGE.match(text):
        first, last, step = match.groups()
        pad = any(bound.lstrip("-").startswith("0") and bound.lstrip("-") != "0" for bound in (first, last))
        width = max(len(first), len(last)) if pad else 0
        numbers = _stepped(int(first), int(last), step)
        if len(numbers) > MAX_SHARDS:
            raise ValueError(f"{{{text}}} stands for more than {MAX_SHARDS:,} names")
        return [f"{n:0{width}d}" for n in numbers]
    if match := _CHAR_RANGE.match(text):
        first, last, step = match.groups()
        return [chr(code) for code in _stepped(ord(first), ord(last), step)]
    return None


def _stepped(first: int, last: int, step: str | None) -> range:
    size = abs(int(step)) if step else 1
    size = size or 1
    return range(first, last + 1, size) if first <= last else range(first, last - 1, -size)


def looks_like_shards(location: str | Path) -> bool:
    """Does INPUT name WebDataset shards: every `::` part a name (or brace pattern) ending in `.tar`
    (or a compressed `.tar.gz`, `.tgz`, ...)? Only the first name of each pattern is made."""
    parts = str(location).split(LIST_SEPARATOR)
    try:
        return all(next(expand_braces(part), "").lower().endswith(SHARD_SUFFIXES) for part in parts)
    except ValueError:
        return False


def shard_locations(location: str | Path, settings: InputSettings) -> list[str]:
    """Every shard INPUT names, in order. A name ending like a shard, a brace pattern or a `::`
    list stands for itself; anything else (with `format = "webdataset"`) is a text file listing shards,
    one per line (patterns allowed; `#` comments and blank lines skipped; relative paths are relative
    to the list's folder). Raises JobError, before anything is read, for a bad pattern or list."""
    text = str(location)
    for part in text.split(LIST_SEPARATOR):
        try:
            next(expand_braces(part), None)
        except ValueError as err:
            raise JobError(f"{text}: {err}; shard patterns look like shards/{{00000..00099}}.tar") from None
    if looks_like_shards(text):
        patterns = text.split(LIST_SEPARATOR)
    else:
        patterns = [_relative_to(line, text) for line in _list_lines(text, settings)]
    shards: list[str] = []
    for pattern in patterns:
        try:
            for name in expand_braces(pattern):
                shards.append(name)
                if len(shards) > MAX_SHARDS:
                    raise JobError(f"{text}: names more than {MAX_SHARDS:,} shards; split the job")
        except ValueError as err:
            raise JobError(f"{text}: {err}; shard patterns look like shards/{{00000..00099}}.tar") from None
    if not shards:
        raise JobError(f"{text}: names no shard")
    return shards


def _list_lines(location: str, settings: InputSettings) -> list[str]:
    try:
        with _open_raw(location, settings.storage_options) as handle:
            data = handle.read(MAX_LIST_BYTES + 1)
    except OSError as err:
        raise JobError(f"{location}: cannot read the list of shards ({err.strerror or err}); a WebDataset "
                       "INPUT is a .tar shard, a brace pattern, shards joined by '::', or a text file listing "
                       "shards") from None
    if len(data) > MAX_LIST_BYTES or b"\0" in data:
        raise JobError(f"{location}: not a list of shards (a text file of at most {MAX_LIST_BYTES >> 20} MB, "
                       "one shard per line)")
    lines = (line.strip() for line in data.decode("utf-8", "replace").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _relative_to(line: str, list_location: str) -> str:
    if is_url(line) or posixpath.isabs(line) or os.path.isabs(line):
        return line
    if is_url(list_location):
        return posixpath.join(posixpath.dirname(list_location), line)
    return os.path.join(os.path.dirname(list_location), line)


def shards_found(location: str | Path, settings: InputSettings | None = None) -> bool:
    """Does INPUT name at least one shard that exists (or a list file that does)?"""
    settings = settings or InputSettings()
    try:
        first = shard_locations(location, settings)[0]
        if not is_url(first):
            return os.path.isfile(first)
        fs, path = open_fs(first, settings.storage_options)
        return bool(fs.exists(path))
    except (JobError, OSError):
        return False


# --- reading shards --------------------------------------------------------------------------


def _open_raw(location: str, storage_options: Mapping[str, Any]) -> BinaryIO:
    """A shard (or list) opened for reading: a regular local file (opened non-blocking, then `fstat`,
    so a FIFO never hangs the walk), or a file on an fsspec file system. Raises OSError."""
    if is_url(location):
        fs, path = open_fs(location, dict(storage_options))
        return fs.open(path, "rb")
    return open_regular(location)


def _open_tar_stream(raw: BinaryIO) -> BinaryIO:
    """The shard's tar bytes: `raw` itself, or `raw` decompressed when its first bytes say so."""
    head = raw.read(6)
    raw.seek(0)
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return opener(raw)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise tarfile.ReadError("compressed with zstd, which the standard library does not read")
    return raw


class _Tail:
    """A reader that remembers where it is and its last few chunks, so that the end of a tar can be
    told apart from a cut: a whole shard ends with a block of 512 zero bytes where a header would be
    (POSIX ustar; tarfile ends its iteration quietly at a cut or a bad header too)."""

    def __init__(self, inner: BinaryIO):
        self.inner, self.pos = inner, 0
        self._chunks: list[tuple[int, bytes]] = []  # (position, bytes) of the last few reads

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self._chunks = [*self._chunks[-3:], (self.pos, data)]
        self.pos += len(data)
        return data

    def ended_cleanly(self, header_offset: int) -> bool:
        """Is the block at `header_offset` (where tarfile stopped) a whole end-of-archive block?"""
        start = self._chunks[0][0] if self._chunks else self.pos
        if header_offset < start:  # not among the last reads: tarfile read past it, so it was no end
            return False
        at = header_offset - start
        block = b"".join(chunk for _, chunk in self._chunks)[at:at + tarfile.BLOCKSIZE]
        return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """The member's bytes (the caller checked its size). Raises tarfile.ReadError when the shard is cut."""
    handle = tar.extractfile(info)
    data = handle.read(info.size) if handle is not None else b""
    if len(data) != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _read_range(location: str, offset: int, size: int, storage_options: Mapping[str, Any]) -> bytes:
    """`size` bytes of the shard's tar stream from `offset` (a compressed shard is decompressed up to there)."""
    with _open_raw(location, storage_options) as raw:
        stream = _open_tar_stream(raw)
        stream.seek(offset)  # forward: a decompressor reads its way there
        data = stream.read(size)
    if len(data) != size:
        raise OSError(errno.EIO, f"{location}: ends inside the member at byte {offset}")
    return data


# --- items -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardItem:
    """One sample of a shard: its key, where its image member is, and (from the walk) its bytes."""

    key: str  # the resume key: the sample's __key__ (escaped as folder keys are), or <shard>/<__key__>
    shard: str  # the shard's location: a local path or an fsspec URL
    member: str  # the image member's name inside the tar (from open_by_key: its base name), for messages
    offset: int  # where the member's bytes start in the (uncompressed) tar stream
    size: int  # the member's size in bytes
    max_bytes: int  # a larger member is refused, unread
    data: bytes | None = field(default=None, repr=False)  # its bytes, read by the walk; None: read from the shard when asked
    kept: Mapping[str, Any] = field(default_factory=dict, repr=False)  # the job's keep_columns → their values
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def read(self) -> bytes:
        """The image member's bytes; OSError when it is over `max_bytes` or cannot be read again."""
        if self.size > self.max_bytes:
            raise OSError(errno.EFBIG, f"member {self.member} of {self.shard} is {self.size / 1e6:,.2f} MB, over the "
                          f"{self.max_bytes / 1e6:,.2f} MB limit ([input] max_file_mb, --max-file-mb); not read")
        if self.data is not None:
            return self.data
        return _read_range(self.shard, self.offset, self.size, self.storage_options)

    def open(self) -> BinaryIO:
        """The image member as a file object (its bytes are in memory already, or read now, bounded)."""
        return io.BytesIO(self.read())


@dataclass(slots=True)
class _Sample:
    """The members of the sample being read: the best image member so far and the kept values."""

    key: str
    rank: int | None = None  # the image member's place in image_members (lower is preferred)
    info: tarfile.TarInfo | None = None
    data: bytes | None = None
    kept: dict[str, Any] = field(default_factory=dict)


class _HashIndex:
    """64-bit hashes → a number, in a few sorted arrays (16 bytes an entry) plus a small dict:
    a log-structured merge, so that millions of keys stay compact and each look-up is a few bisects."""

    def __init__(self, pending_max: int = 65_536):
        self._pending: dict[int, int] = {}
        self._levels: list[tuple[array, array]] = []  # (hashes ascending, values), larger levels first
        self._pending_max = pending_max

    def get(self, hashed: int) -> int | None:
        if hashed in self._pending:
            return self._pending[hashed]
        for hashes, values in self._levels:
            index = bisect.bisect_left(hashes, hashed)
            if index < len(hashes) and hashes[index] == hashed:
                return values[index]
        return None

    def add(self, hashed: int, value: int) -> int | None:
        """Adds `hashed` → `value` and returns None; or the value it already had (nothing changes)."""
        first = self.get(hashed)
        if first is not None:
            return first
        self._pending[hashed] = value
        if len(self._pending) >= self._pending_max:
            level = (array("Q", sorted(self._pending)), array("Q"))
            level[1].extend(self._pending[h] for h in level[0])
            self._pending = {}
            while self._levels and len(self._levels[-1][0]) <= len(level[0]):
                older = self._levels.pop()
                merged = heapq.merge(zip(*older), zip(*level))
                level = (array("Q"), array("Q"))
                for h, v in merged:
                    level[0].append(h)
                    level[1].append(v)
            self._levels.append(level)
        return None

    def __len__(self) -> int:
        return len(self._pending) + sum(len(hashes) for hashes, _ in self._levels)


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def shard_name(location: str) -> str:
    """The shard's file name without its tar suffix: "00007" for ".../00007.tar"."""
    base = posixpath.basename(location.replace(os.sep, "/"))
    for suffix in SHARD_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[:-len(suffix)]
    return base


# --- the source -------------------------------------------------------------------------------


class WebDatasetSource:
    """The samples of WebDataset shards that hold an image member, as an `ImageSource`."""

    def __init__(self, location: str | Path, settings: InputSettings | None = None):
        self.location = str(location)
        self.settings = settings or InputSettings()
        self.preferences = _image_members(self.settings)
        self.shards = shard_locations(self.location, self.settings)
        self._index: _ShardIndex | None = None  # built by the first open_by_key
        self.max_bytes = int(self.settings.max_file_mb * 1_000_000)
        self._walks: list[dict[str, int]] = []  # what each walk passed over, by reason
        self._logged: set[tuple[str, str]] = set()  # (shard, what) already logged: each line once per source
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.location!r}, shards={len(self.shards)})"

    @property
    def skipped(self) -> dict[str, int]:
        """Reason → samples (or shards) passed over, by the walk that got furthest (the driver's
        progress count walks beside the run: the two are not added up)."""
        merged: dict[str, int] = {}
        for walk in list(self._walks):
            for reason, count in dict(walk).items():
                merged[reason] = max(merged.get(reason, 0), count)
        return merged

    def kept_schema(self) -> pa.Schema:
        """The Arrow types of the job's keep_columns, in its order: bytes for binary members, else text."""
        return pa.schema([(name, pa.binary() if _is_binary(name) else pa.string())
                          for name in self.settings.keep_columns])

    def items(self) -> Iterator[ShardItem]:
        """Every sample with an image member, shards in order, members in tar order."""
        tally: dict[str, int] = {}
        self._walks.append(tally)
        return self._walk(tally, with_data=True)

    def why_empty(self) -> str | None:
        """None when a shard yields a sample; otherwise why none does (reads as far as the first one)."""
        tally: dict[str, int] = {}
        if next(self._walk(tally, with_data=False, quiet=True), None) is not None:
            return None
        if tally.get(BAD_SHARD, 0) == len(self.shards):
            return f"names {len(self.shards)} shard(s), none of which could be read (first: {self.shards[0]})"
        passed = ", ".join(f"{count} {reason}" for reason, count in sorted(tally.items()))
        return (f"holds no sample with an image member (image_members = {';'.join(self.preferences)!r})"
                + (f"; passed over: {passed}" if passed else ""))

    def open_by_key(self, key: str) -> ShardItem | None:
        """The sample with this key (its image read from the shard when asked), or None. The first
        call builds an index of every sample in one pass over the shards (headers only are kept)."""
        with self._lock:
            if self._index is None:
                self._index = _ShardIndex(self)
        found = self._index.find(key)
        if found is None:
            return None
        shard_no, offset, size, member = found
        return ShardItem(key=key, shard=self.shards[shard_no], member=member, offset=offset, size=size,
                         max_bytes=self.max_bytes, storage_options=self.settings.storage_options)

    # --- the walk ---------------------------------------------------------------------------

    def _walk(self, tally: dict[str, int], *, with_data: bool, quiet: bool = False) -> Iterator[ShardItem]:
        seen = _HashIndex()  # key → the shard it came from: duplicates are passed over
        for shard_no, shard in enumerate(self.shards):
            for item in self._shard_items(shard, tally, with_data=with_data, quiet=quiet):
                first = seen.add(_key_hash(item.key), shard_no)
                if first is None:
                    yield item
                    continue
                tally[DUPLICATE] = tally.get(DUPLICATE, 0) + 1
                self._log(quiet, shard, "duplicate", "skipping sample %s of %s: its key was read from %s already "
                          "(keys must be unique; [input] shard_keys = true prefixes each with its shard's name; "
                          "more of this shard's are counted, not logged)", item.key, shard, self.shards[first])

    def _shard_items(self, shard: str, tally: dict[str, int], *, with_data: bool,
                     quiet: bool) -> Iterator[ShardItem]:
        """The samples of one shard; a shard that cannot be read to its end keeps what was read before."""
        try:
            raw = _open_raw(shard, self.settings.storage_options)
        except OSError as err:
            tally[BAD_SHARD] = tally.get(BAD_SHARD, 0) + 1
            self._log(quiet, shard, "open", "skipping shard %s: %s", shard, err.strerror or err)
            return
        with raw:
            try:
                stream = _open_tar_stream(raw)
                tail = _Tail(stream)
                # A local shard that is not compressed is read again cheaply (a seek, from the page cache):
                # its items say where their image is instead of carrying it.
                image_bytes = with_data and (is_url(shard) or stream is not raw)
                # Stream mode: one pass, no seeking; the encoding keeps names that are not UTF-8 reversible.
                with tarfile.open(fileobj=tail, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
                    yield from self._samples(shard, tar, tail, tally, kept_values=with_data, image_bytes=image_bytes)
                    if not tail.ended_cleanly(tar.offset):
                        raise tarfile.ReadError(f"cut short or corrupt at byte {tar.offset} (no end-of-archive block)")
            except _SHARD_ERRORS as err:
                tally[BAD_SHARD] = tally.get(BAD_SHARD, 0) + 1
                self._log(quiet, shard, "read", "shard %s: %s; the rest of it is skipped", shard, err)

    def _samples(self, shard: str, tar: tarfile.TarFile, tail: _Tail, tally: dict[str, int], *,
                 kept_values: bool, image_bytes: bool) -> Iterator[ShardItem]:
        """Group the members into samples; yield each one that has an image member. When the shard
        breaks off, the sample being read is yielded if its image member was there whole (with the
        kept members read whole), then the error is raised."""
        sample: _Sample | None = None
        broken: BaseException | None = None
        try:
            for info in tar:
                tar.members = []  # stream mode appends every header to this list: keep memory flat (as webdataset does)
                named = split_member(info.name) if info.isreg() and not info.name.startswith("__") else None
                if named is None:
                    continue
                key, extension = named
                if sample is None or key != sample.key:
                    if sample is not None and (item := self._item(shard, sample, tally)) is not None:
                        yield item
                    sample = _Sample(key)
                self._add_member(tar, info, extension, sample, kept_values, image_bytes)
        except _SHARD_ERRORS as err:
            broken = err
        whole = broken is None or (sample is not None and sample.info is not None
                                   and sample.info.offset_data + sample.info.size <= tail.pos)
        if sample is not None and whole and (item := self._item(shard, sample, tally)) is not None:
            yield item
        if broken is not None:
            raise broken

    def _add_member(self, tar: tarfile.TarFile, info: tarfile.TarInfo, extension: str, sample: _Sample,
                    kept_values: bool, image_bytes: bool) -> None:
        """Note the member if it is wanted: a better image member than the sample has (its bytes read
        when `image_bytes`), or a kept one (read when `kept_values`). Nothing over max_bytes is read:
        such an image is refused when its item is read, such a kept value is null."""
        kept = kept_values and extension in self.settings.keep_columns and extension not in sample.kept
        rank = self.preferences.index(extension) if extension in self.preferences else None
        better = rank is not None and (sample.rank is None or rank < sample.rank)
        if not kept and not better:
            return
        if better:
            sample.data = None  # the older choice is dropped before this one is read
        wanted = (kept or (better and image_bytes)) and info.size <= self.max_bytes
        data = _read_member(tar, info) if wanted else None
        if kept:
            sample.kept[extension] = None if data is None else _kept_value(extension, data)
        if better:
            sample.rank, sample.info, sample.data = rank, info, data if image_bytes else None

    def _item(self, shard: str, sample: _Sample, tally: dict[str, int]) -> ShardItem | None:
        if sample.info is None:
            tally[NO_IMAGE] = tally.get(NO_IMAGE, 0) + 1
            return None
        key = escape_key(sample.key)
        if self.settings.shard_keys:
            key = f"{escape_key(shard_name(shard))}/{key}"
        kept = {name: _special_value(name, key, shard, sample.kept) for name in self.settings.keep_columns}
        # No storage_options: items of remote shards hold their bytes, so nothing that may be a credential
        # travels with them; local shards need none.
        return ShardItem(key=key, shard=shard, member=sample.info.name, offset=sample.info.offset_data,
                         size=sample.info.size, max_bytes=self.max_bytes, data=sample.data, kept=kept)

    def _log(self, quiet: bool, shard: str, what: str, message: str, *args: Any) -> None:
        """Log a line once per shard and kind per source (the run's walk and the progress count see the
        same shards), so the lines stay as few as the shards."""
        with self._lock:
            if quiet or (shard, what) in self._logged:
                return
            self._logged.add((shard, what))
        log.warning(message, *args)


def _image_members(settings: InputSettings) -> list[str]:
    members = [part.strip().lower().lstrip(".") for part in settings.image_members.split(";")]
    members = [member for member in members if member]
    if not members:
        raise JobError(f"[input] image_members = {settings.image_members!r} names no member; give extensions "
                       "such as \"jpg;png;webp\"")
    return list(dict.fromkeys(members))


def _is_binary(name: str) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return last in _BINARY_MEMBERS or f".{last}" in image_extensions()


def _kept_value(name: str, data: bytes) -> bytes | str:
    """A kept member's value: its bytes for a binary member, else its text (`json` stays JSON text)."""
    return data if _is_binary(name) else data.decode("utf-8", "replace")


def _special_value(name: str, key: str, shard: str, kept: Mapping[str, Any]) -> Any:
    """`__key__` and `__url__` as webdataset names them (the key, the shard), else the member's value or None."""
    if name == "__key__":
        return key
    if name == "__url__":
        return shard
    return kept.get(name)


# --- the index behind open_by_key --------------------------------------------------------------


class _ShardIndex:
    """Key → (shard number, offset, size, image extension) for every sample of a source, built in one
    pass that reads no member: about 40 bytes a sample, in arrays."""

    def __init__(self, source: WebDatasetSource):
        self._by_key = _HashIndex()  # key hash → record number
        self._shard = array("I")
        self._offset = array("Q")
        self._size = array("Q")
        self._extension = array("B")  # its place in source.preferences
        self._preferences = source.preferences
        numbers = {shard: n for n, shard in enumerate(source.shards)}
        for item in source._walk({}, with_data=False, quiet=True):
            self._by_key.add(_key_hash(item.key), len(self._size))
            self._shard.append(numbers[item.shard])
            self._offset.append(item.offset)
            self._size.append(item.size)
            self._extension.append(self._preferences.index(split_member(item.member)[1]))

    def find(self, key: str) -> tuple[int, int, int, str] | None:
        """(shard number, offset, size, member name) of the sample with this key, or None."""
        record = self._by_key.get(_key_hash(key)) if isinstance(key, str) else None
        if record is None:
            return None
        member = f"{key.rpartition('/')[2]}.{self._preferences[self._extension[record]]}"
        return self._shard[record], self._offset[record], self._size[record], member
