"""Runs are followed only by the installation that submitted them (``mantik.binding``).

A colleague with EDIT on the experiment can rewrite a run's tags: its backend spec must
not make this lab send the user's UNICORE credential to a URL of the colleague's choosing
(the run list syncs active runs unasked), nor make it write onto runs it did not submit.
Real MLflow server, real local backend; the "attacker's site" is an HTTP server here that
records what reaches it.
"""

from __future__ import annotations

import json
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mantik_jupyter.compute.layout import CREDENTIALS_FILE
from mantik_jupyter.compute.run_record import TAG_BACKEND_SPEC, TAG_BINDING, TAG_JOB_ID
from mantik_jupyter.compute.run_sync import NOT_FOLLOWED
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import LocalStateInvalid, NotFound, PermissionDenied
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi

from .runs_helpers import (
    RunUserSpy,
    admin_api,
    copy_example,
    login_works,
    remote_run_dirs,
    slurm_config,
    unicore_config,
    wait_for,
    write_config,
)
from .secret_audit import SECRETS
from .test_runs_local import LOCAL_CONFIG

UNICORE_TOKEN = "victims-unicore-token-0123456789"


class Recorder:
    """An HTTP server that answers 200 to everything and remembers each request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                recorder.requests.append(
                    (self.command, self.path, self.headers.get("Authorization"))
                )
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/rest/core"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


def _installation(tracking, tmp_path: Path, name: str) -> Iterator[RunService]:
    """A RunService with a data dir (key, trusted keys, work dir) of its own."""
    svc = RunService(
        tracking,
        work_dir=tmp_path / name / "work",
        key_file=tmp_path / name / "run-key.json",
        trusted_keys=tmp_path / name / "trusted-run-keys",
    )
    yield svc
    svc.close()
    key_file = tmp_path / name / "run-key.json"
    if key_file.exists():
        # The session's audit fails if the key appears in any log record or log file.
        SECRETS.add(json.loads(key_file.read_text())["key"])


@pytest.fixture
def mine(tracking, tmp_path) -> Iterator[RunService]:
    """This installation."""
    yield from _installation(tracking, tmp_path, "mine")


@pytest.fixture
def other(tracking, tmp_path) -> Iterator[RunService]:
    """Another installation (the same user's other machine, or a colleague's lab)."""
    yield from _installation(tracking, tmp_path, "other")


@pytest.fixture
def project(tmp_path):
    project = copy_example(tmp_path)
    write_config(project, LOCAL_CONFIG)
    return project


def _running(service: RunService, project: Path, experiment: str) -> str:
    info = service.submit(project, entry_point="sleep", experiment_name=experiment)
    return wait_for(service, info.run_id, {RunState.RUNNING}).run_id


def _all_refused(service: RunService, run_id: str, tmp_path: Path) -> list[str]:
    """Every explicit action on the run: each refused; their messages."""
    messages = []
    for action in (
        lambda: service.logs(run_id),
        lambda: list(service.follow_logs(run_id)),
        lambda: service.files(run_id),
        lambda: list(service.open_file(run_id, "mantik.log")),
        lambda: service.download(run_id, dest=tmp_path / "dl"),
        lambda: service.cancel(run_id),
    ):
        with pytest.raises(PermissionDenied) as err:
            action()
        messages.append(err.value.message)
    return messages


def test_a_rewritten_backend_spec_is_never_connected_to(
    mine, project, mlflow_server, recorder, monkeypatch, tmp_path
):
    monkeypatch.setenv("MANTIK_UNICORE_TOKEN", UNICORE_TOKEN)
    run_id = _running(mine, project, "trust-rewritten")
    colleague = admin_api(mlflow_server)  # anyone with EDIT on the experiment
    honest_spec = colleague.get_run(run_id)["data"]
    spec = json.dumps({"kind": "unicore", "UnicoreApiUrl": recorder.url}, sort_keys=True)
    original = {t["key"]: t["value"] for t in honest_spec["tags"]}[TAG_BACKEND_SPEC]
    colleague.set_tags(run_id, {TAG_BACKEND_SPEC: spec})
    before = colleague.get_run(run_id)["data"]["tags"]

    # Listing with refresh, the sidebar's sync, a sync of everything, a refreshed get:
    # the run is shown as recorded, nothing is asked, nothing is written.
    listed, _ = mine.list(experiment_name="trust-rewritten", refresh=True)
    assert [i.state for i in listed if i.run_id == run_id] == [RunState.RUNNING]
    assert [i.warnings for i in listed if i.run_id == run_id] == [[NOT_FOLLOWED]]
    mine.sync()
    mine.sync([run_id])
    assert mine.get(run_id).state == RunState.RUNNING
    messages = _all_refused(mine, run_id, tmp_path)
    assert recorder.requests == []
    assert colleague.get_run(run_id)["data"]["tags"] == before
    assert "submitted from another mantik installation or by someone else" in messages[0]
    assert "were changed after it was submitted" in messages[0]
    assert str(tmp_path / "mine" / "trusted-run-keys") in messages[0]

    # Put back as it was, the run is this installation's again: cancel reaches the job.
    colleague.set_tags(run_id, {TAG_BACKEND_SPEC: original})
    assert mine.files(run_id)
    assert mine.get(run_id).warnings == []
    assert mine.cancel(run_id).state == RunState.KILLED
    assert recorder.requests == []


def test_a_run_of_another_installation_is_left_alone_until_its_key_is_trusted(
    mine, other, project, mlflow_server, tmp_path
):
    run_id = _running(mine, project, "trust-other")
    api = admin_api(mlflow_server)
    before = api.get_run(run_id)["data"]["tags"]
    listed, _ = other.list(experiment_name="trust-other", refresh=True)
    assert [i.state for i in listed if i.run_id == run_id] == [RunState.RUNNING]
    messages = _all_refused(other, run_id, tmp_path)
    assert "not made with a key this installation knows" in messages[0]
    assert "run-key.json" in messages[0]
    # What the sidebar greys the run's actions out with: the same message, up front.
    assert other.not_followed(listed[0]) == messages[0]
    assert mine.not_followed(mine.get(run_id, refresh=False)) is None
    assert api.get_run(run_id)["data"]["tags"] == before

    # The key: 0600, and in no tag and no message.
    key_file = tmp_path / "mine" / "run-key.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = json.loads(key_file.read_text())["key"]
    assert key not in json.dumps(before)
    assert not any(key in m for m in messages)

    # The same user's other machine copies this one's key: it follows the run now.
    trusted = tmp_path / "other" / "trusted-run-keys"
    trusted.mkdir(parents=True)
    shutil.copy(key_file, trusted / "laptop.json")
    assert other.not_followed(listed[0]) is None
    assert other.files(run_id)
    assert other.cancel(run_id).state == RunState.KILLED


def test_a_run_without_binding_or_moved_to_another_job_is_refused(
    mine, project, mlflow_server, tmp_path
):
    run_id = _running(mine, project, "trust-unsigned")
    api = admin_api(mlflow_server)
    tags = {t["key"]: t["value"] for t in api.get_run(run_id)["data"]["tags"]}
    binding = tags[TAG_BINDING]
    try:
        api.delete_tag(run_id, TAG_BINDING)  # as runs submitted before mantik signed them
        with pytest.raises(PermissionDenied) as err:
            mine.cancel(run_id)
        assert "has no mantik.binding tag" in err.value.message
        # The signature copied along with another job id does not fit.
        api.set_tags(run_id, {TAG_BINDING: binding, TAG_JOB_ID: "1"})
        with pytest.raises(PermissionDenied):
            mine.files(run_id)
        assert mine.get(run_id).state == RunState.RUNNING
    finally:
        # Its job (a 10-minute sleep) is stopped, not left to the rest of the session.
        api.set_tags(run_id, {TAG_BINDING: binding, TAG_JOB_ID: tags[TAG_JOB_ID]})
        mine.cancel(run_id)


def test_the_credential_file_is_not_shown_opened_or_downloaded_locally(
    mine, project, tmp_path
):
    run_id = _running(mine, project, "trust-credentials")
    run_dir = Path(mine.get(run_id).tags["mantik.run_dir"])
    # As while a job has not read it yet (the local job deletes it at once).
    (run_dir / CREDENTIALS_FILE).write_text("MLFLOW_TRACKING_TOKEN=secret\n")
    _credentials_hidden(mine, run_id, tmp_path)
    mine.cancel(run_id)


def _credentials_hidden(service: RunService, run_id: str, tmp_path: Path) -> None:
    """The run directory holds the credential file: nothing shows or gives it."""
    assert CREDENTIALS_FILE not in {e.path for e in service.files(run_id)}
    for path in (CREDENTIALS_FILE, f"./{CREDENTIALS_FILE}"):
        with pytest.raises(NotFound):
            list(service.open_file(run_id, path))
        with pytest.raises(NotFound):
            service.download(run_id, path, dest=tmp_path / "one")
    folder = service.download(run_id, dest=tmp_path / "all").path
    assert (folder / "mantik-job.sh").exists()
    assert not (folder / CREDENTIALS_FILE).exists()


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "trust")


@pytest.mark.slurm
def test_the_credential_file_of_a_running_slurm_job_is_not_shown_opened_or_downloaded(
    mine, tmp_path, slurm_cluster, remote_base
):
    project = copy_example(tmp_path)
    write_config(project, slurm_config(slurm_cluster, remote_base))
    # A Slurm job keeps the file until it ends (a requeue starts it again).
    run_id = _running(mine, project, "trust-slurm-credentials")
    run_dir = mine.get(run_id).tags["mantik.run_dir"]
    assert (Path(run_dir) / CREDENTIALS_FILE).exists()  # the cluster is this machine
    _credentials_hidden(mine, run_id, tmp_path)
    assert mine.cancel(run_id).state == RunState.KILLED


def test_the_credential_file_at_a_unicore_site_is_not_shown_opened_or_downloaded(
    mine, tmp_path, unicore_site, unicore_login
):
    project = copy_example(tmp_path)
    write_config(project, unicore_config(unicore_site))
    run_id = _running(mine, project, "trust-unicore-credentials")
    job = unicore_site.jobs[mine.get(run_id).job_id]
    # As before the job read it (the stand-in's job dir is on this machine).
    (job.workdir / CREDENTIALS_FILE).write_text("MLFLOW_TRACKING_TOKEN=secret\n")
    _credentials_hidden(mine, run_id, tmp_path)
    assert mine.cancel(run_id).state == RunState.KILLED


def test_an_ended_run_of_another_installation_shows_its_stored_log(
    mine, other, project, tmp_path
):
    info = mine.submit(project, params={"epochs": "1"}, experiment_name="trust-ended")
    ended = wait_for(mine, info.run_id, {RunState.FINISHED})
    # The copy in MLflow is data like the run's metrics; the backend is not asked.
    assert other.all_logs(ended.run_id).text == mine.all_logs(ended.run_id).text != ""
    with pytest.raises(PermissionDenied):
        other.files(ended.run_id)


# ---- the per-run tracking user: deleted only where this installation's signature names it


def _colleague_with_edit(mlflow_server, user, experiment_id: str) -> RunsApi:
    """Another user of the tracking server with EDIT on the experiment (shared with them)."""
    colleague = mlflow_server.create_user()
    RunsApi(TrackingClient(mlflow_server.uri, user)).client.request(
        "POST", "api/3.0/mlflow/users/permissions/grant",
        json={"username": colleague.username, "resource_type": "experiment",
              "resource_id": experiment_id, "permission": "EDIT"},
    )  # fmt: skip
    return RunsApi(TrackingClient(mlflow_server.uri, colleague))


def test_cancelling_a_forged_run_leaves_the_run_user_it_names_alone(
    mine, project, mlflow_server, user, monkeypatch
):
    # A run with no job id yet is cancelled in MLflow alone, and its per-run user was
    # deleted: the name came from its mantik.run_user tag, which anyone with EDIT on the
    # experiment writes. A colleague's run naming the user of one of my active runs made
    # my cancel of it cut that job off from the tracking server.
    spy = RunUserSpy(monkeypatch)
    victim = _running(mine, project, "trust-run-user")
    cred = spy.created[victim]
    honest = admin_api(mlflow_server).get_run(victim)
    colleague = _colleague_with_edit(mlflow_server, user, honest["info"]["experiment_id"])
    copied = {t["key"]: t["value"] for t in honest["data"]["tags"]}
    forged_tags = [
        # Only what the cancel looked at.
        {"mantik.backend": "local", "mantik.state": "SUBMITTING", "mantik.run_user": cred.username},
        # Everything of my run but its job, signature included.
        {k: v for k, v in copied.items() if k not in (TAG_JOB_ID, "mantik.run_dir")}
        | {"mantik.state": "SUBMITTING"},
    ]
    for tags in forged_tags:
        forged = colleague.create_run(honest["info"]["experiment_id"], tags=tags)
        cancelled = mine.cancel(forged["info"]["run_id"])
        # The colleague's run is marked as cancelled (anyone with EDIT may), the user
        # stays, and the answer says why.
        assert cancelled.state == RunState.KILLED and cancelled.mlflow_status == "KILLED"
        assert login_works(mlflow_server, cred)
        [note] = [w for w in cancelled.warnings if cred.username in w]
        assert "was not deleted" in note and TAG_BINDING in note
    # My run still logs, and its own end still removes its user.
    assert mine.get(victim).state == RunState.RUNNING
    assert mine.cancel(victim).state == RunState.KILLED
    assert not login_works(mlflow_server, cred)


def test_cancelling_a_stalled_submission_of_mine_removes_its_run_user(
    mine, project, mlflow_server, monkeypatch, tmp_path
):
    # A run of this installation with no job id yet (its submission stalled, or died)
    # is signed from its creation on: its cancel removes the user made for it.
    spy = RunUserSpy(monkeypatch)
    go = tmp_path / "go"
    config = {
        **LOCAL_CONFIG,
        "Environment": {
            **LOCAL_CONFIG["Environment"],
            "PreRunCommandOnLoginNode": f"while [ ! -e {go} ]; do sleep 0.1; done; exit 3",
        },
    }
    write_config(project, config)
    failure: list[BaseException] = []

    def submit() -> None:
        try:
            mine.submit(project, entry_point="sleep", experiment_name="trust-stalled")
        except BaseException as exc:  # noqa: BLE001 - checked below
            failure.append(exc)

    thread = threading.Thread(target=submit)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not spy.created:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)
        [(run_id, cred)] = spy.created.items()
        # The login-node command runs: everything but the job is on the run.
        while not (mine.work_dir / "local-runs" / run_id).exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = mine.get(run_id, refresh=False)
        assert info.state == RunState.SUBMITTING and not info.job_id
        cancelled = mine.cancel(run_id)
        assert cancelled.state == RunState.KILLED and cancelled.warnings == []
        assert not login_works(mlflow_server, cred)
    finally:
        go.touch()
        thread.join(30)
    assert failure and "PreRunCommandOnLoginNode" in str(failure[0])


def test_an_unreadable_run_key_stops_following_and_says_so_once(
    mine, project, tmp_path, caplog
):
    run_id = _running(mine, project, "trust-broken-key")
    key_file = tmp_path / "mine" / "run-key.json"
    good = key_file.read_text()
    key_file.write_text("{not json")
    mine._backends.keys._own = None  # as a restarted lab, which reads the file again
    caplog.set_level("WARNING", logger="mantik_jupyter.compute.run_backends")
    for _ in range(3):
        listed, _ = mine.list(experiment_name="trust-broken-key", refresh=True)
        assert [i.warnings for i in listed] == [[NOT_FOLLOWED]]
    said = [r.getMessage() for r in caplog.records if "not followed until" in r.getMessage()]
    assert len(said) == 1 and str(key_file) in said[0], said
    with pytest.raises(LocalStateInvalid) as err:
        mine.cancel(run_id)  # asked for: the error itself
    assert str(key_file) in err.value.message
    key_file.write_text(good)
    assert mine.cancel(run_id).state == RunState.KILLED
