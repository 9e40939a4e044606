"""One MLflow user per run, for jobs reporting to the embedded tracking server.

A job on a cluster holds its tracking credential in a file for as long as it runs.
With the embedded server the lab owns an admin account; handing that to a job would
let a leaked credential do anything. Instead every run gets its own user with a random
name (``mantik-run-<32 hex digits>``, recorded in the run's ``mantik.run_user`` tag; it
does not derive from the run id, so the user can be made while the run is being
created), a random password and an ``EDIT`` grant on the run's experiment only
(MLflow's permission model has no narrower useful scope: run-level grants only accept
``*``). The user is deleted when the run ends, which revokes access at once. With a
remote tracking server the job gets the submitting user's own credential instead (the
lab is not an admin there).

Permissions API of MLflow 3.x: ``POST /api/3.0/mlflow/users/permissions/grant`` with
``username``, ``resource_type`` (``experiment``), ``resource_id``, ``permission``;
users are created with ``POST /api/2.0/mlflow/users/create`` and removed with
``DELETE /api/2.0/mlflow/users/delete``.
"""

from __future__ import annotations

import logging
import secrets

from ..errors import InvalidRequest, MantikError, NotFound
from .credentials import Credential
from .rest import TrackingClient
from .service import TrackingService

log = logging.getLogger(__name__)

USER_PREFIX = "mantik-run-"
# MLflow requires at least 12 characters; 32 random bytes are far beyond that.
PASSWORD_BYTES = 32
NAME_BYTES = 16


def admin_client(tracking: TrackingService) -> TrackingClient | None:
    """A client with the embedded server's admin credential, or None for a remote server."""
    credential = tracking.embedded_credential
    if credential is None:
        return None
    tracking.wait_ready()
    return TrackingClient(tracking.uri, credential, on_unanswered=tracking.report_unanswered)


def new_run_username() -> str:
    """A fresh per-run user name (random, so it never collides with an earlier one)."""
    return f"{USER_PREFIX}{secrets.token_hex(NAME_BYTES)}"


def create_run_user(admin: TrackingClient, username: str, experiment_id: str) -> Credential:
    """Create the user ``username`` (from ``new_run_username``), allowed to edit only the
    experiment ``experiment_id``; return its credential."""
    if not username.startswith(USER_PREFIX):
        raise ValueError(f"{username!r} is not a per-run user name")
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    admin.api("POST", "users/create", username=username, password=password)
    try:
        admin.request(
            "POST",
            "api/3.0/mlflow/users/permissions/grant",
            json={
                "username": username,
                "resource_type": "experiment",
                "resource_id": str(experiment_id),
                "permission": "EDIT",
            },
        )
    except BaseException:
        delete_run_user(admin, username)
        raise
    return Credential(username=username, password=password)


def delete_run_user(admin: TrackingClient, username: str) -> bool:
    """Delete a per-run user; True if it existed. Never deletes other users."""
    if not username.startswith(USER_PREFIX):
        raise ValueError(f"{username!r} is not a per-run user")
    try:
        admin.request("DELETE", "api/2.0/mlflow/users/delete", json={"username": username})
    except NotFound:
        return False
    except InvalidRequest as exc:
        if "not found" in exc.message.lower() or "does not exist" in exc.message.lower():
            return False
        raise
    log.info("deleted the per-run tracking user %s", username)
    return True


def delete_run_user_quietly(admin: TrackingClient | None, username: str) -> None:
    """For cleanup after a failure: the failure is what gets reported, not this."""
    if admin is None:
        return
    try:
        delete_run_user(admin, username)
    except MantikError as exc:
        log.warning("could not delete the per-run user %s: %s", username, exc.message)
