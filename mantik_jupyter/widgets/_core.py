"""How a widget reaches the core from a kernel."""

from __future__ import annotations

from ..compute.runs import RunService
from ..tracking.runs_api import RunsApi


def default_service(tracking_uri: str | None = None) -> RunService:
    """The kernel's RunService (``mantik_jupyter.api.run_service`` when it exists)."""
    from .. import api, paths

    make = getattr(api, "run_service", None)
    if make is not None:
        return make(tracking_uri) if tracking_uri else make()
    return RunService(api.tracking_service(tracking_uri), work_dir=paths.data_dir() / "kernel")


def runs_api(service: RunService) -> RunsApi:
    return RunsApi(service.tracking.client())
