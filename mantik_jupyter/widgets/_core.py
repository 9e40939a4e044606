"""How a widget reaches the core from a kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..compute.runs import RunService
from ..tracking.runs_api import RunsApi

if TYPE_CHECKING:
    from ..magics import MantikMagics


def default_service(tracking_uri: str | None = None) -> RunService:
    """The kernel's RunService: the magics' one when they are loaded (the server
    ``%mantik_login --tracking-uri`` chose, and their SSH connections), else
    ``mantik_jupyter.api.run_service``."""
    from .. import api, paths

    if tracking_uri is None:
        magics = _loaded_magics()
        if magics is not None:
            return magics._runs()
    make = getattr(api, "run_service", None)
    if make is not None:
        return make(tracking_uri) if tracking_uri else make()
    return RunService(api.tracking_service(tracking_uri), work_dir=paths.data_dir() / "kernel")


def _loaded_magics() -> MantikMagics | None:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None:
        return None
    return shell.magics_manager.registry.get("MantikMagics")


def runs_api(service: RunService) -> RunsApi:
    return RunsApi(service.tracking.client())
