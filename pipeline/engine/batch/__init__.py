"""engine/batch: the Batch API driver: the same items, per-image step and store as online mode, at half price.

A second driver beside `online.py`, not a fork of it: the `Captioner` prepares every image and
builds every row, the provider's `BatchBackend` speaks the Batch API, the store writes the rows.
This package only schedules:

    source ─▶ image threads ─▶ request lines ─▶ chunk files (OUT/_batch/chunk-00001.jsonl, ...)
        ─▶ upload ─▶ create ─▶ poll ─▶ download results ─▶ one row per image, mode = "batch"

    state.py     the durable record in OUT/_batch/ and the chunk files
    submit.py    cutting new chunks and taking each to the provider exactly once
    collect.py   polling, and turning an ended batch into rows exactly once
    lines.py     what one result line means: a row or a retry
    context.py   what those share for one invocation
    driver.py    the loop that moves every chunk forward
    commands.py  the entry points the CLI calls
"""

from .commands import (
    ChunkView,
    PrepareSummary,
    batch_status,
    cancel_batches,
    ingest_outputs,
    load_run_job,
    prepare_requests,
    run_batch,
    run_input,
)
from .state import CRASH_ENV

__all__ = ["CRASH_ENV", "ChunkView", "PrepareSummary", "batch_status", "cancel_batches", "ingest_outputs",
           "load_run_job", "prepare_requests", "run_batch", "run_input"]
