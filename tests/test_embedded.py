"""The embedded MLflow server: start, automatic admin login, restart with data, clean stop."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import requests

from mantik_jupyter.errors import LocalStateInvalid, TrackingTimeout, TrackingUnavailable
from mantik_jupyter.tracking import embedded
from mantik_jupyter.tracking.credentials import CredentialStore
from mantik_jupyter.tracking.embedded import STATE_FILE, EmbeddedTrackingServer, discover
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.service import TrackingService, resolve_tracking

from .secret_audit import SECRETS


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


def _vanish(server: EmbeddedTrackingServer) -> int:
    """The owner process dies and its server outlives it: what the kernel leaves behind
    (the lock released) when a lab is killed and its MLflow ignores the parent's death."""
    server._stopping.set()
    server._supervisor.join(10)
    server._release_lock()
    pid = server._proc.pid
    server._proc = None
    return pid


def test_stale_server_from_a_crash_is_cleaned_up(server_dir):
    crashed = EmbeddedTrackingServer(server_dir)
    crashed.start()
    crashed.wait_ready(120)
    stale_pid = _vanish(crashed)
    # The lab died without stopping it: a new lab with the same data dir starts.
    fresh = EmbeddedTrackingServer(server_dir)
    fresh.start()
    try:
        assert fresh.owner
        assert _group_gone(stale_pid), "the stale server was not stopped"
        fresh.wait_ready(120)
        assert TrackingClient(fresh.uri, fresh.credential()).health()
    finally:
        fresh.stop()


def test_two_labs_with_one_data_dir_share_its_server(server_dir):
    # The second lab used to stop the first lab's server as "stale": the first then
    # answered 502 to everything while saying it was ready.
    first = EmbeddedTrackingServer(server_dir, check_interval=0.5)
    second = EmbeddedTrackingServer(server_dir, check_interval=0.5)
    first.start()
    try:
        first.wait_ready(120)
        first_pid = first._proc.pid
        admin = TrackingClient(first.uri, first.credential())
        exp = admin.api("POST", "experiments/create", name="shared")["experiment_id"]
        second.start()
        second.wait_ready(30)
        assert not second.owner and second.uri == first.uri
        assert first._proc.pid == first_pid and first._proc.poll() is None
        # The first lab goes away: the second runs the server now, on the same port.
        uri = first.uri
        first.stop()
        assert _group_gone(first_pid)
        deadline = time.monotonic() + 120
        while not (second.owner and second.ready) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert second.owner and second.ready
        assert second.uri == uri
        got = TrackingClient(second.uri, second.credential()).api(
            "GET", "experiments/get", experiment_id=exp
        )
        assert got["experiment"]["name"] == "shared"
        taken_over = second._proc.pid
    finally:
        first.stop()
        second.stop()
    assert _group_gone(taken_over)
    assert discover(server_dir) is None


def test_a_server_that_dies_while_the_lab_runs_is_started_again(server_dir):
    # With MLflow's access log on, the log shows every request the supervisor makes.
    server = EmbeddedTrackingServer(server_dir, check_interval=0.5, access_log=True)
    server.start()
    try:
        server.wait_ready(120)
        admin = TrackingClient(server.uri, server.credential())
        exp = admin.api("POST", "experiments/create", name="survives-a-crash")["experiment_id"]
        uri, pid = server.uri, server._proc.pid
        # Watching it costs no request (each was work for the server, day and night).
        health_lines = (server_dir / "server.log").read_text().count("/health")
        assert health_lines, "the access log is off: this check would see no request"
        time.sleep(5 * server.check_interval)
        assert (server_dir / "server.log").read_text().count("/health") == health_lines
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.ready and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.ready, "the lab did not notice that its server died"
        server.wait_ready(120)
        assert server._proc.pid != pid and server.uri == uri
        got = TrackingClient(server.uri, server.credential()).api(
            "GET", "experiments/get", experiment_id=exp
        )
        assert got["experiment"]["name"] == "survives-a-crash"
        assert discover(server_dir) == (uri, server.credential())
    finally:
        server.stop()


def test_a_server_that_hangs_is_started_again_once_a_request_goes_unanswered(server_dir, tmp_path):
    # A stopped (or deadlocked) server keeps its process: it was never restarted, and
    # every request to it hung until it timed out, for as long as the lab ran.
    owner = EmbeddedTrackingServer(server_dir, check_interval=0.2, hang_grace=3)
    other_lab = EmbeddedTrackingServer(server_dir, check_interval=0.2)
    owner.start()
    stopped = None
    try:
        owner.wait_ready(120)
        other_lab.start()
        other_lab.wait_ready(30)
        assert not other_lab.owner
        admin = TrackingClient(owner.uri, owner.credential())
        exp = admin.api("POST", "experiments/create", name="survives-a-hang")["experiment_id"]
        uri, pid = owner.uri, owner._proc.pid
        # A report about a server that answers costs one /health and nothing else.
        other_lab.report_unanswered()
        time.sleep(embedded.HANG_RECHECK + 1)
        assert owner._proc.pid == pid and owner.ready
        os.killpg(pid, signal.SIGSTOP)
        stopped = pid
        # The other lab's call times out; only the lab that runs the server restarts it.
        service = TrackingService(
            CredentialStore(tmp_path / "credentials.json"), embedded=other_lab
        )
        with pytest.raises(TrackingUnavailable):
            service.client().request(
                "POST", "api/2.0/mlflow/experiments/search", json={}, timeout=2
            )
        deadline = time.monotonic() + 60
        while owner._proc.pid == pid:
            assert time.monotonic() < deadline, "the hung server was not started again"
            time.sleep(0.2)
        assert _group_gone(pid), "the hung server was left behind"
        stopped = None
        owner.wait_ready(120)
        other_lab.wait_ready(30)
        assert owner.uri == uri and other_lab.uri == uri
        got = TrackingClient(uri, owner.credential()).api(
            "GET", "experiments/get", experiment_id=exp
        )
        assert got["experiment"]["name"] == "survives-a-hang"
    finally:
        if stopped is not None:
            os.killpg(stopped, signal.SIGCONT)
        other_lab.stop()
        owner.stop()


def test_requests_are_not_logged(server_dir):
    # uvicorn (MLflow 3.3 on) logged every request the lab proxies: server.log grew
    # without bound.
    server = EmbeddedTrackingServer(server_dir)
    server.start()
    try:
        server.wait_ready(120)
        admin = TrackingClient(server.uri, server.credential())
        for _ in range(20):
            admin.api("POST", "experiments/search", max_results=1)
        assert admin.health()
        server.stop()
        text = (server_dir / "server.log").read_text()
        assert "experiments/search" not in text and "GET /health" not in text, text[-2000:]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("version", "quiet"),
    [("3.0.0", False), ("3.2.1", False), ("3.3.0rc0", True), ("3.3.0", True), ("3.17.2", True)],
)
def test_the_access_log_is_turned_off_only_where_mlflow_runs_uvicorn(monkeypatch, version, quiet):
    # MLflow 3.0-3.2 ran gunicorn (no access log) and refuses --uvicorn-opts there.
    monkeypatch.setattr(embedded.metadata, "version", lambda name: version)
    assert bool(embedded._quiet_access_log()) is quiet


def test_server_log_is_cut_down_when_it_grows_too_big(server_dir):
    limit = 50_000
    server_dir.mkdir(parents=True)
    old_log = b"a line of an old server\n" * (limit // 20)
    (server_dir / "server.log").write_bytes(old_log)
    # The access log on: requests write lines, as a chatty server would.
    server = EmbeddedTrackingServer(
        server_dir, check_interval=0.2, max_log_bytes=limit, access_log=True
    )
    server.start()
    try:
        # Above the limit at start: kept once, and the new server starts a new log.
        assert (server_dir / "server.log.1").read_bytes() == old_log
        server.wait_ready(120)
        assert (server_dir / "server.log").stat().st_size < limit
        # While it runs: what it writes is cut down as well, and it keeps writing.
        client = TrackingClient(server.uri, None)
        deadline = time.monotonic() + 120
        while (server_dir / "server.log.1").read_bytes() == old_log:
            assert time.monotonic() < deadline, "server.log was not cut while it ran"
            for _ in range(50):
                assert client.health()
        assert (server_dir / "server.log.1").stat().st_size > limit
        assert client.health()
        time.sleep(0.5)
        text = (server_dir / "server.log").read_bytes()
        assert 0 < len(text) < limit and b"\0" not in text
        assert b"GET /health" in text
    finally:
        server.stop()


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
        # The cause, not the end of a traceback (for a full disk that hid the cause).
        assert "file is not a database" in err.value.message
        assert 'File "' not in err.value.message
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


def test_a_data_dir_that_cannot_be_made_is_an_error_on_use_not_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    server = EmbeddedTrackingServer(blocker / "tracking")
    server.start()  # the lab's extension must still load
    try:
        with pytest.raises(LocalStateInvalid) as err:
            server.wait_ready(10)
        assert str(blocker / "tracking") in err.value.message
        assert "MANTIK_DATA_DIR" in err.value.message
        with pytest.raises(LocalStateInvalid):
            server.uri  # noqa: B018
    finally:
        server.stop()


def test_a_login_to_the_embedded_server_survives_a_restart_of_the_lab(server_dir, tmp_path):
    # It was stored under http://127.0.0.1:<port>, and the port changes with every start.
    store_path = tmp_path / "credentials.json"
    store = CredentialStore(store_path)
    first = EmbeddedTrackingServer(server_dir)
    first.start()
    try:
        first.wait_ready(120)
        password = secrets.token_urlsafe(16)
        SECRETS.add(password)
        TrackingClient(first.uri, first.credential()).api(
            "POST", "users/create", username="alice", password=password
        )
        TrackingService(store, embedded=first).login(username="alice", password=password)
    finally:
        first.stop()
    again = EmbeddedTrackingServer(server_dir)
    again.start()
    try:
        again.wait_ready(120)
        lab = TrackingService(store, embedded=again)
        assert lab.status()["username"] == "alice"
        # The `mantik` command and kernels find the same login, and log out of it.
        cli = resolve_tracking(store_path, server_dir)
        assert cli.status()["username"] == "alice"
        assert cli.logout()["removed"] is True
        assert lab.status()["credential_source"] == "embedded"
        assert str(again.port) not in store_path.read_text()
    finally:
        again.stop()


def test_labs_starting_at_the_same_moment_make_one_admin_password(tmp_path):
    # Each made its own and the last write won: the server ran with one password while
    # secrets.json held another, refused on every later call.
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from mantik_jupyter.tracking.embedded import load_or_create_secrets\n"
        "while time.time() < float(sys.argv[2]):\n"
        "    pass\n"
        "print(load_or_create_secrets(Path(sys.argv[1])).admin_password)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for attempt in range(4):
        directory = tmp_path / f"tracking-{attempt}"
        directory.mkdir()
        at = str(time.time() + 3)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(directory), at],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for _ in range(3)
        ]
        passwords = {p.communicate(timeout=60)[0].strip() for p in procs}
        assert len(passwords) == 1, f"attempt {attempt}: {len(passwords)} admin passwords"
        on_disk = json.loads((directory / "secrets.json").read_text())["admin_password"]
        assert passwords == {on_disk}
        assert [p.name for p in directory.iterdir()] == ["secrets.json"]


def test_a_stopped_embedded_server_is_not_blamed_on_the_uri(server_dir, tmp_path):
    # "Check that it runs and that the URI is right": nobody typed that URI.
    server = EmbeddedTrackingServer(server_dir, check_interval=60)
    server.start()
    try:
        server.wait_ready(120)
        service = TrackingService(CredentialStore(tmp_path / "credentials.json"), embedded=server)
        client = service.client()
        os.killpg(server._proc.pid, signal.SIGKILL)
        _group_gone(server._proc.pid)
        with pytest.raises(TrackingUnavailable) as err:
            client.api("POST", "experiments/search", max_results=1)
        assert "URI is right" not in err.value.message
        assert "starts it again" in err.value.message and str(server_dir) in err.value.message
    finally:
        server.stop()


def test_a_data_dir_open_to_others_is_made_private(server_dir, caplog):
    # MLflow makes auth.db (password hashes) and mlflow.db with the umask: only the
    # directory keeps other users out of them.
    server_dir.mkdir(mode=0o755)
    os.chmod(server_dir, 0o755)  # noqa: S103 - the mistake under test
    server = EmbeddedTrackingServer(server_dir)
    with caplog.at_level("WARNING", logger="mantik_jupyter.tracking.embedded"):
        server.start()
    try:
        assert stat.S_IMODE(server_dir.stat().st_mode) == 0o700
        assert any("open to other users (mode 755)" in r.getMessage() for r in caplog.records)
        server.wait_ready(120)
        assert (server_dir / "auth.db").exists()
    finally:
        server.stop()


def test_a_data_dir_whose_server_runs_on_another_host_says_so_and_is_taken_over_later(
    server_dir, tmp_path
):
    # A home dir on NFS or GPFS, two labs on two login nodes: the second found the lock
    # taken and waited for the first's server, which listens on the first node's
    # loopback only. Every request waited 90 s, then blamed server.log. Here the other
    # node's lab is played by a process holding the data dir's lock (a real flock) and
    # the record it wrote naming its host.
    server_dir.mkdir(mode=0o700)
    (server_dir / STATE_FILE).write_text(
        json.dumps({"pid": 4242, "port": 5999, "owner": 4241, "host": "jwlogin07.other"})
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(server_dir / embedded.LOCK_FILE)],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    lab = EmbeddedTrackingServer(server_dir, check_interval=0.5)
    try:
        started = time.monotonic()
        lab.start()
        with pytest.raises(TrackingUnavailable) as caught:
            lab.wait_ready(60)
        assert time.monotonic() - started < 5, "it waited for a server it cannot reach"
        message = caught.value.message
        assert "runs on host jwlogin07.other" in message and str(server_dir) in message
        assert "MANTIK_DATA_DIR" in message and "stop the lab there" in message
        assert not lab.owner
        # The `mantik` command of this host says the same.
        with pytest.raises(TrackingUnavailable, match="runs on host jwlogin07.other"):
            resolve_tracking(tmp_path / "credentials.json", server_dir)
        # The other node's lab stops: this one runs the server, with the same data.
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 120
        while not lab.ready and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lab.owner and lab.ready
        lab.wait_ready(1)
        assert TrackingClient(lab.uri, lab.credential()).health()
        assert json.loads((server_dir / STATE_FILE).read_text())["host"] == socket.gethostname()
    finally:
        holder.kill()
        lab.stop()


def test_a_record_of_another_host_whose_lab_is_gone_is_no_obstacle(server_dir, tmp_path):
    # That host went down with its lab: its lock went with it, its record stayed.
    server_dir.mkdir(mode=0o700)
    (server_dir / embedded.LOCK_FILE).touch(mode=0o600)
    (server_dir / STATE_FILE).write_text(
        json.dumps({"pid": 4242, "port": 5999, "owner": 4241, "host": "jwlogin07.other"})
    )
    with pytest.raises(TrackingUnavailable, match="no embedded one is running"):
        resolve_tracking(tmp_path / "credentials.json", server_dir)
    lab = EmbeddedTrackingServer(server_dir)
    lab.start()
    try:
        lab.wait_ready(120)
        assert lab.owner
    finally:
        lab.stop()


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def _worker_cmdline(server: EmbeddedTrackingServer) -> str:
    """The command line of the process of the server's group that serves its app."""
    assert server._proc is not None
    pgid = server._proc.pid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if " uvicorn " in cmdline or " gunicorn " in cmdline:
            return cmdline
    raise AssertionError("no uvicorn or gunicorn process in the server's group")


def test_the_server_runs_mlflows_auth_app_with_its_start_up_frozen(server_dir):
    # Full collections walked all of MLflow once every 16 or so runs/search calls of a
    # runs table, holding that call some 0.2 s (bench/tracking_gc.py).
    server = EmbeddedTrackingServer(server_dir)
    server.start()
    try:
        server.wait_ready(120)
        assert "mantik_jupyter.tracking.mlflow_app:create_app" in _worker_cmdline(server)
        # The app is MLflow's basic-auth app: no credential, no data; the admin's works.
        anonymous = requests.post(
            f"{server.uri}/api/2.0/mlflow/experiments/search", json={"max_results": 5}, timeout=10
        )
        assert anonymous.status_code == 401
        admin = TrackingClient(server.uri, server.credential())
        assert admin.api("POST", "experiments/search", max_results=1)["experiments"]
    finally:
        server.stop()
    # The same app, made in a process of its own: start-up is frozen.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(server_dir / "basic_auth.ini")
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "only-for-this-test"
    code = (
        "import gc; from mantik_jupyter.tracking.mlflow_app import create_app; "
        "create_app(); print(gc.get_freeze_count())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=server_dir, env=env, capture_output=True,
        text=True, timeout=120, check=True,
    )  # fmt: skip
    assert int(out.stdout.split()[-1]) > 100_000, out.stdout


def test_without_its_plugin_entry_point_the_server_runs_mlflows_own_app(monkeypatch):
    # A checkout on PYTHONPATH, not installed: MLflow would not find mantik's app.
    monkeypatch.setattr(embedded.metadata, "entry_points", lambda group: metadata.EntryPoints())
    assert embedded._app_name() == "basic-auth"
