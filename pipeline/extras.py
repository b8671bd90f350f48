"""extras.py: the optional dependencies, imported only where a job needs one.

The base install stays small (`pip install caption`); object stores, Hugging Face datasets and Ray
come as extras (`pip install 'caption[s3]'`, ...). WebDataset shards need none: the standard
library's `tarfile` reads them (sources/webdataset.py). `require` imports one and,
when it is missing, raises the one-line JobError that names the `pip install` to run (exit 2,
before any request is sent).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import JobError

__all__ = ["require", "EXTRA_OF_SCHEME"]

EXTRA_OF_SCHEME = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
}
"""URL scheme → (the fsspec implementation it needs, the extra that installs it)."""


def require(module: str, extra: str, *, what: str) -> ModuleType:
    """`module`, imported; a JobError naming `pip install 'caption[extra]'` when it is not installed.

    `what` says what needed it, for the message: "s3://bucket/", "[input] format = \"hf\"".
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and not module.startswith(err.name.split(".")[0]):
            raise  # the module is there but one of its own imports is broken: show the real error
        raise JobError(f"{what} needs the Python package {module.split('.')[0]}, which is not installed; "
                       f"run: pip install 'caption[{extra}]'") from None
