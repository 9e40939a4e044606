"""The core objects for processes outside the lab server (the CLI, kernels)."""

from __future__ import annotations

from . import paths
from .tracking.service import TrackingService, resolve_tracking


def tracking_service(tracking_uri: str | None = None) -> TrackingService:
    return resolve_tracking(paths.credentials_file(), paths.embedded_dir(), tracking_uri)
