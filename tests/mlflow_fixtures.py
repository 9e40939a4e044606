"""A real MLflow tracking server with the basic-auth app, for the whole test session."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from mantik_jupyter.tracking.credentials import Credential
from mantik_jupyter.tracking.embedded import AUTH_CACHE_TTL, free_port

from .secret_audit import SECRETS

__all__ = ["MlflowServer", "mlflow_server", "start_mlflow_server"]


@dataclass
class MlflowServer:
    uri: str
    admin: Credential
    directory: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def create_user(self, username: str | None = None) -> Credential:
        """A new non-admin user with a random 24-character password."""
        username = username or f"user-{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(18)
        resp = requests.post(
            f"{self.uri}/api/2.0/mlflow/users/create",
            json={"username": username, "password": password},
            auth=(self.admin.username, self.admin.password),
            timeout=30,
        )
        resp.raise_for_status()
        SECRETS.add(password)
        return Credential(username=username, password=password)

    def env(self, credential: Credential) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, **credential.env()}


def start_mlflow_server(directory: Path) -> MlflowServer:
    directory.mkdir(parents=True, exist_ok=True)
    admin = Credential(username="admin", password=secrets.token_urlsafe(18))
    SECRETS.add(admin.password)
    ini = directory / "auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{directory / 'auth.db'}\n"
        f"admin_username = {admin.username}\n"
        f"admin_password = {admin.password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # As the embedded server (tracking/embedded.py): no scrypt per request.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL}\n"
    )
    ini.chmod(0o600)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(16),
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
    )
    log = open(directory / "server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{directory / 'mlflow.db'}",
            "--artifacts-destination",
            str(directory / "artifacts"),
            "--app-name",
            "basic-auth",
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server died: {(directory / 'server.log').read_text()[-2000:]}"
            )
        try:
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return MlflowServer(uri=uri, admin=admin, directory=directory, proc=proc)
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop_mlflow_server(proc)
    raise RuntimeError("mlflow server did not become healthy in 120 s")


def stop_mlflow_server(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server --app-name basic-auth`` (NO_PERMISSIONS default)."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    stop_mlflow_server(server.proc)
