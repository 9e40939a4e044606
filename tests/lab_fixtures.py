"""pytest-jupyter configuration shared by the REST and proxy tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

__all__ = ["lab_config", "jp_server_config", "jp_base_url", "api", "api_json", "login_as"]


def lab_config(data_dir: Path, tracking_uri: str | None, **mantik: Any) -> Config:
    """A server config as users run it: authentication required, the extension enabled."""
    return Config(
        {
            "ServerApp": {
                "jpserver_extensions": {"mantik_jupyter": True},
                "allow_unauthenticated_access": False,
            },
            "MantikApp": {"tracking_uri": tracking_uri, "data_dir": str(data_dir), **mantik},
        }
    )


@pytest.fixture
def jp_base_url() -> str:
    # Non-root and with a character that needs quoting, as pytest-jupyter's default.
    return "/lab%40base/"


@pytest.fixture
def jp_server_config(mlflow_server: Any, tmp_path: Path) -> Config:
    """By default the lab talks to the session's real MLflow basic-auth server."""
    return lab_config(tmp_path / "mantik", mlflow_server.uri)


def api(jp_fetch: Any, *parts: str, method: str = "GET", body: Any = None, **kw: Any) -> Any:
    if body is not None and not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    return jp_fetch("mantik", "api", *parts, method=method, body=body, raise_error=False, **kw)


async def api_json(jp_fetch: Any, *parts: str, **kw: Any) -> tuple[int, Any]:
    resp = await api(jp_fetch, *parts, **kw)
    return resp.code, json.loads(resp.body) if resp.body else None


async def login_as(jp_fetch: Any, credential: Any) -> dict[str, Any]:
    """Log the lab in to its tracking server through ``POST auth/login``."""
    code, body = await api_json(
        jp_fetch, "auth", "login", method="POST",
        body={"username": credential.username, "password": credential.password},
    )  # fmt: skip
    assert code == 200, body
    return body
