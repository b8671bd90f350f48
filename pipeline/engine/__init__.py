"""engine: the per-image step and the drivers that schedule it.

`run`/`run_async` pick the driver the job asks for (`endpoint.mode`): the online driver sends one
request per image; the batch driver sends the same requests through a provider's Batch API; with
`[engine] name = "ray"` the Ray driver sends them from a Ray cluster (ray.py). The
drivers import the stages (sources, images, providers, store); no stage imports a driver.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..errors import JobError
from ..job import Job
from ..records import RunSummary
from ..sources import open_source

__all__ = ["run", "run_async"]


def run(job: Job, input_path: str | Path, out: str | Path, *, api_key: str | None, headers: dict[str, str],
        allow_job_change: bool = False, progress: bool | None = None, detach: bool = False) -> RunSummary:
    """Run a job to the end (or to Ctrl-C/SIGTERM) in a fresh event loop; return its summary.

    `endpoint.mode = "batch"` hands the run to the batch driver (`detach`: return once submitted).
    """
    return asyncio.run(run_async(job, input_path, out, api_key=api_key, headers=headers,
                                 allow_job_change=allow_job_change, progress=progress, handle_signals=True,
                                 detach=detach))


async def run_async(job: Job, input_path: str | Path, out: str | Path, *, api_key: str | None,
                    headers: dict[str, str], allow_job_change: bool = False, progress: bool | None = None,
                    handle_signals: bool = False, detach: bool = False) -> RunSummary:
    """The same as `run`, inside a running loop (tests call this).

    Raises JobError, before the out folder is touched, when INPUT holds no image to caption.
    """
    if input_path is not None and (why := open_source(input_path, job.input).why_empty()) is not None:
        raise JobError(f"{input_path}: {why}")
    if job.engine.name == "ray":
        from .ray import run_ray

        return await run_ray(job, input_path, out, api_key=api_key, headers=headers,
                             allow_job_change=allow_job_change, progress=progress, handle_signals=handle_signals)
    if job.endpoint.mode == "batch":
        from .batch import run_batch

        return await run_batch(job, input_path, out, api_key=api_key, headers=headers,
                               allow_job_change=allow_job_change, progress=progress, detach=detach,
                               handle_signals=handle_signals)
    from .online import run_online

    return await run_online(job, input_path, out, api_key=api_key, headers=headers,
                            allow_job_change=allow_job_change, progress=progress, handle_signals=handle_signals)
