"""sources/fs.py: the file systems behind INPUT, for every source that may read from an object store.

INPUT is a local path or an fsspec URL (`s3://bucket/prefix/`, `gs://...`, `az://...`; fsspec's
URL grammar: https://filesystem-spec.readthedocs.io/en/latest/api.html#fsspec.core.url_to_fs).
`open_fs` turns one into a file system and a path on it, importing fsspec and the scheme's
implementation only then (`pipeline.extras.require`: a missing one is a one-line error naming the
extra). Credentials and endpoints are what fsspec takes: the environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...) and the job's `[input] storage_options`, passed to the file system as they are.
"""

from __future__ import annotations

import re
from typing import Any

from ..extras import EXTRA_OF_SCHEME, require

__all__ = ["is_url", "scheme_of", "open_fs"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(location: str) -> str | None:
    """"s3" for "s3://bucket/x"; None for a local path (and for "file://", which is one)."""
    match = _SCHEME.match(str(location))
    if match is None or match.group(1).lower() in ("file", "local"):
        return None
    return match.group(1).lower()


def is_url(location: str) -> bool:
    """True for a location that is not on the local file system (an fsspec or http(s) URL)."""
    return scheme_of(location) is not None


def open_fs(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(file system, path on it) for a local path or an fsspec URL; JobError when its extra is missing."""
    scheme = scheme_of(location)
    what = f"{location}" if scheme else "a local path"
    fsspec = require("fsspec", EXTRA_OF_SCHEME.get(scheme or "", ("", "fsspec"))[1], what=what)
    if scheme in EXTRA_OF_SCHEME:
        module, extra = EXTRA_OF_SCHEME[scheme]
        require(module, extra, what=what)
    import fsspec.core  # noqa: F401  (the submodule; `require` imported the package)

    return fsspec.core.url_to_fs(str(location), **(storage_options or {}))
