"""The embedded MLflow server: start, automatic admin login, restart with data, clean stop."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
import requests

from mantik_jupyter.errors import LocalStateInvalid, TrackingTimeout
from mantik_jupyter.tracking.embedded import STATE_FILE, EmbeddedTrackingServer, discover
from mantik_jupyter.tracking.rest import TrackingClient


def _group_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def server_dir(tmp_path):
    return tmp_path / "tracking"


def test_lifecycle_auth_restart_and_no_leftovers(server_dir):
    server = EmbeddedTrackingServer(server_dir)
    server.start()
    try:
        server.wait_ready(120)
        admin = TrackingClient(server.uri, server.credential())
        created = admin.api("POST", "experiments/create", name="survives-restart")
        # basic-auth is on: no credential, no data
        anonymous = requests.post(
            f"{server.uri}/api/2.0/mlflow/experiments/search", json={"max_results": 5}, timeout=10
        )
        assert anonymous.status_code == 401
        for name in ("secrets.json", "basic_auth.ini"):
            assert stat.S_IMODE((server_dir / name).stat().st_mode) == 0o600
        assert discover(server_dir) is not None
        first_pid = server._proc.pid
    finally:
        server.stop()
    assert _group_gone(first_pid), "mlflow processes left behind after stop()"
    assert not (server_dir / STATE_FILE).exists()
    assert discover(server_dir) is None

    again = EmbeddedTrackingServer(server_dir)
    again.start()
    try:
        again.wait_ready(120)
        got = TrackingClient(again.uri, again.credential()).api(
            "GET", "experiments/get", experiment_id=created["experiment_id"]
        )
        assert got["experiment"]["name"] == "survives-restart"
        assert again.credential() == server.credential()
    finally:
        again.stop()


def test_stale_server_from_a_crash_is_cleaned_up(server_dir):
    crashed = EmbeddedTrackingServer(server_dir)
    crashed.start()
    crashed.wait_ready(120)
    stale_pid = crashed._proc.pid
    # The lab died without stopping it: a new lab with the same data dir starts.
    fresh = EmbeddedTrackingServer(server_dir)
    fresh.start()
    try:
        assert _group_gone(stale_pid), "the stale server was not stopped"
        fresh.wait_ready(120)
        assert TrackingClient(fresh.uri, fresh.credential()).health()
    finally:
        fresh.stop()
        crashed._proc = None


def test_a_server_that_cannot_start_gives_a_clear_error(server_dir, monkeypatch):
    # A broken backend store makes mlflow exit during start-up.
    server = EmbeddedTrackingServer(server_dir, startup_timeout=60)
    server_dir.mkdir(parents=True)
    (server_dir / "mlflow.db").write_text("this is not an sqlite database" * 100)
    server.start()
    try:
        with pytest.raises(TrackingTimeout) as err:
            server.wait_ready(60)
        assert "server.log" in err.value.message
    finally:
        server.stop()


def test_data_dir_named_with_url_characters_keeps_everything_inside(tmp_path):
    # ?, # and % mean something in a URL: the databases went to a file named after the
    # part before the ? (outside the data dir), and a %20 was read as a space.
    parent = tmp_path / "d ü%20#?x"
    server_dir = parent / "tracking"
    server = EmbeddedTrackingServer(server_dir)
    server.start()
    try:
        server.wait_ready(120)
        admin = TrackingClient(server.uri, server.credential())
        run = admin.api("POST", "runs/create", experiment_id="0")["run"]["info"]
        path = f"0/{run['run_id']}/artifacts/a.txt"
        admin.upload_artifact(path, b"kept")
        assert discover(server_dir) is not None
    finally:
        server.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == [parent.name]
    assert {"mlflow.db", "auth.db"} <= {p.name for p in server_dir.iterdir()}
    assert (server_dir / "artifacts" / path).read_bytes() == b"kept"

    again = EmbeddedTrackingServer(server_dir)
    again.start()
    try:
        again.wait_ready(120)
        admin = TrackingClient(again.uri, again.credential())
        assert b"".join(admin.download_artifact(path)) == b"kept"
        got = admin.api("GET", "runs/get", run_id=run["run_id"])
        assert got["run"]["info"]["run_id"] == run["run_id"]
    finally:
        again.stop()


def test_a_broken_secrets_file_is_an_error_never_a_new_admin_password(server_dir):
    server = EmbeddedTrackingServer(server_dir)
    server.start()
    try:
        server.wait_ready(120)
    finally:
        server.stop()
    secrets_file = server_dir / "secrets.json"
    saved = json.loads(secrets_file.read_text())

    # A lost Flask secret only signs cookies: a new one is made, the admin still works.
    secrets_file.write_text(json.dumps({k: v for k, v in saved.items() if k != "flask_secret"}))
    again = EmbeddedTrackingServer(server_dir)
    again.start()
    try:
        again.wait_ready(120)
        TrackingClient(again.uri, again.credential()).verify()
    finally:
        again.stop()
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert json.loads(secrets_file.read_text())["admin_password"] == saved["admin_password"]

    # A new admin password would be refused by MLflow (auth.db keeps the first one).
    for broken in ("{not json", json.dumps({"admin_username": saved["admin_username"]})):
        secrets_file.write_text(broken)
        lost = EmbeddedTrackingServer(server_dir)
        lost.start()
        try:
            with pytest.raises(LocalStateInvalid) as err:
                lost.wait_ready(10)
            assert str(secrets_file) in err.value.message and "auth.db" in err.value.message
            with pytest.raises(LocalStateInvalid):
                lost.credential()
            assert lost._proc is None, "no server may start without its admin password"
        finally:
            lost.stop()
        assert secrets_file.read_text() == broken, "the file must be left for the user"
