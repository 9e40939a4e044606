"""The core objects for processes outside the lab server (the CLI, kernels)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import paths
from .tracking.service import TrackingService, resolve_tracking

if TYPE_CHECKING:
    from .compute.runs import RunService

ENV_JOB_TRACKING_URI = "MANTIK_JOB_TRACKING_URI"


def tracking_service(tracking_uri: str | None = None) -> TrackingService:
    return resolve_tracking(paths.credentials_file(), paths.embedded_dir(), tracking_uri)


def run_service(tracking_uri: str | None = None, job_tracking_uri: str | None = None) -> RunService:
    """The RunService of the CLI and kernels: same tracking server, credential store and
    work directory as the lab (``<data dir>/runs``), so runs are the same runs everywhere.

    ``job_tracking_uri``: the address compute nodes use to reach the tracking server
    (default: ``$MANTIK_JOB_TRACKING_URI``, else the tracking URI itself).
    """
    # Imported here: login/status should not pay for loading the compute stack.
    from .compute.runs import RunService

    return RunService(
        tracking_service(tracking_uri),
        work_dir=paths.data_dir() / "runs",
        job_tracking_uri=job_tracking_uri or os.environ.get(ENV_JOB_TRACKING_URI) or None,
    )
