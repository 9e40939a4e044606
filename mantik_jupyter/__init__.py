"""mantik-jupyter: run MLprojects on HPC clusters from JupyterLab, tracked in MLflow."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import MantikApp

    return [{"module": "mantik_jupyter", "app": MantikApp}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "mantik-jupyter"}]


def load_ipython_extension(ipython: Any) -> None:
    from .magics import load_ipython_extension as load

    load(ipython)


def login(
    username: str | None = None,
    password: str | None = None,
    token: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Log in to the tracking server from Python; returns the status (never a secret).

    Leave ``password`` out to be asked for it without echo: typed into a cell, it stays in
    the notebook and in the kernel's history."""
    from .api import tracking_service

    service = tracking_service(tracking_uri)
    if password is None and token is None:
        from .magics import ask_and_login

        return ask_and_login(service, username, token=False, asker="mantik_jupyter.login()")
    return service.login(username=username, password=password, token=token)
