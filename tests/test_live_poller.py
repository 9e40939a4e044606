"""The notebook's live run lines (``LivePoller``) when a run cannot be refreshed: its
lines back off while the others keep their pace. Real MLflow server, real local runs,
a real SSH backend whose login node drops every connection (a loopback listener)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from mantik_jupyter.compute.run_record import (
    TAG_BACKEND,
    TAG_BACKEND_SPEC,
    TAG_BINDING,
    TAG_JOB_ID,
    TAG_STATE,
)
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.magics.display import LivePoller, Run, StatusLine, watch
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi

from .login_gate import Gate
from .runs_helpers import copy_example, write_config
from .test_magics_runs import _experiment_permission

LOCAL_CONFIG = {"Local": {}, "Resources": {"Queue": "local"}, "Environment": {"Python": sys.prefix}}
POLL = 0.2


@pytest.fixture
def login_node() -> Iterator[Gate]:
    node = Gate()
    yield node
    node.close()


class Line(StatusLine):
    """A status line that keeps what it showed (the texts a notebook would show)."""

    def __init__(self) -> None:
        super().__init__(live=False)
        self.texts: list[str] = []

    def update(self, text: str, html_text: str | None = None, *, force: bool = False) -> None:
        if not self.texts or self.texts[-1] != text:
            self.texts.append(text)


def ssh_run(service: RunService, api: RunsApi, experiment: str, spec: dict) -> Run:
    """A queued run of this installation on an SSH backend ``spec``, as a submission
    would have tagged and signed it."""
    tags = {
        TAG_BACKEND: "ssh",
        TAG_BACKEND_SPEC: json.dumps({"kind": "ssh", **spec}, sort_keys=True),
        TAG_JOB_ID: "4242",
        TAG_STATE: str(RunState.QUEUED),
    }
    run_id = api.create_run(experiment, tags=tags)["info"]["run_id"]
    api.set_tags(run_id, {TAG_BINDING: service._backends.keys.sign(run_id, tags)})
    return Run(service, service.get(run_id, refresh=False), "http://mlflow/ssh")


def follow(poller: LivePoller, service: RunService, runs: list[Run]) -> list[Line]:
    lines = [Line() for _ in runs]
    for run, line in zip(runs, lines, strict=True):
        poller.add(service, run, line, POLL)
    return lines


def wait_until(check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_an_unreachable_login_node_is_asked_again_with_back_off(
    service, tmp_path, mlflow_server, user, experiment_name, login_node, caplog
):
    # Every tick asked the login node again (waiting for a connect timeout each time when
    # it does not answer at all): 5 ticks a second here. Its line now backs off, doubling
    # from the poll interval, and says when it asks again; the local runs keep their pace.
    project = copy_example(tmp_path)
    write_config(project, LOCAL_CONFIG)
    local = [
        service.submit(project, entry_point="sleep", experiment_name=experiment_name)
        for _ in range(2)
    ]
    api = RunsApi(TrackingClient(mlflow_server.uri, user))
    spec = {"Hostname": "127.0.0.1", "Port": login_node.port, "KnownHostsFile": str(tmp_path)}
    unreachable = ssh_run(service, api, local[0].experiment_id, spec)
    runs = [unreachable, *(Run(service, info, "http://mlflow/local") for info in local)]
    poller = LivePoller()
    caplog.set_level(logging.WARNING, logger="mantik_jupyter.compute.run_sync")
    ssh_line, *local_lines = follow(poller, service, runs)
    time.sleep(6)
    # Back-off from 0.2 s: asked at about 0.2, 0.6, 1.4, 3.0 and 6.2 s; 30 ticks.
    assert 3 <= login_node.connections <= 6, login_node.connections
    last = ssh_line.texts[-1]
    assert "QUEUED → UNKNOWN" in last, ssh_line.texts
    assert f"Cannot reach the SSH server 127.0.0.1:{login_node.port}" in last, last
    assert "; asking again at " in last, last
    # Logged when recorded, not on every attempt.
    unknown = [r.getMessage() for r in caplog.records if "state unknown" in r.getMessage()]
    assert len(unknown) == 1, unknown
    for info in local:
        service.cancel(info.run_id)
        poller.ask_soon(info.run_id)  # as %mantik_cancel and run.cancel() do
    # The others are followed at their own pace meanwhile.
    started = time.monotonic()
    wait_until(lambda: all("KILLED" in line.texts[-1] for line in local_lines), 10)
    assert time.monotonic() - started < 3
    assert all("asking again" not in text for line in local_lines for text in line.texts)
    # Doubling (0.2, 0.4, ... s), up to a minute.
    backoff = poller._failing[unreachable.run_id]
    assert backoff.delay in (3.2, 6.4), backoff
    for _ in range(10):
        poller._failed(unreachable.run_id, POLL, "unreachable", None)
    assert poller._failing[unreachable.run_id].delay == LivePoller.MAX_BACKOFF == 60
    stop(poller)


def stop(poller: LivePoller) -> None:
    with poller._lock:
        poller._lines.clear()
    wait_until(lambda: poller._thread is None, 10)


def test_a_failure_that_is_no_mantik_error_is_logged_once(
    service, tmp_path, mlflow_server, user, experiment_name, caplog
):
    # A bug (here: a backend spec our code cannot read) logged its traceback every tick.
    api = RunsApi(TrackingClient(mlflow_server.uri, user))
    experiment, _ = api.get_or_create_experiment(experiment_name)
    broken = ssh_run(service, api, experiment, {"Hostname": "127.0.0.1", "Port": "not-a-port"})
    poller = LivePoller()
    caplog.set_level(logging.WARNING, logger="mantik_jupyter.magics.display")
    (line,) = follow(poller, service, [broken])
    wait_until(lambda: len(line.texts) >= 2, 10)
    time.sleep(3)
    logged = [r for r in caplog.records if r.name == "mantik_jupyter.magics.display"]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert broken.run_id in logged[0].getMessage()
    assert logged[0].exc_info and logged[0].exc_info[0] is ValueError
    assert "asking again failed: ValueError" in line.texts[-1], line.texts
    assert "trying again at " in line.texts[-1], line.texts
    stop(poller)


def test_a_run_that_answers_again_is_asked_at_the_normal_pace(
    service, tmp_path, user, mlflow_server, experiment_name
):
    # The tracking server refuses the run for a while (its experiment unshared): its line
    # backs off; once it answers, the note goes and its next failure starts from the poll
    # interval again.
    project = copy_example(tmp_path)
    write_config(project, LOCAL_CONFIG)
    info = service.submit(project, entry_point="sleep", experiment_name=experiment_name)
    run = Run(service, info, "http://mlflow/local")
    poller = LivePoller()
    (line,) = follow(poller, service, [run])

    def failing() -> bool:
        return run.run_id in poller._failing

    _experiment_permission(mlflow_server, "revoke", experiment_name, user.username)
    wait_until(lambda: failing() and poller._failing[run.run_id].delay >= 4 * POLL, 10)
    assert "denied this to user" in line.texts[-1] and "trying again at " in line.texts[-1]
    _experiment_permission(mlflow_server, "grant", experiment_name, user.username)
    wait_until(lambda: not failing(), 10)
    wait_until(lambda: "trying again" not in line.texts[-1], 5)
    _experiment_permission(mlflow_server, "revoke", experiment_name, user.username)
    wait_until(failing, 5)
    # From the poll interval again (a second failure may already have doubled it).
    assert poller._failing[run.run_id].delay <= 2 * POLL
    _experiment_permission(mlflow_server, "grant", experiment_name, user.username)
    service.cancel(run.run_id)
    wait_until(lambda: "KILLED" in line.texts[-1], 10)
    assert "trying again" not in line.texts[-1], line.texts
    wait_until(lambda: poller._thread is None, 10)


def test_a_local_run_is_followed_at_the_callers_pace(service, tmp_path, experiment_name):
    # The back-off spares a cluster's login node; a local run's state and log are files
    # here, and a short run's end showed seconds late once its followers had backed off.
    project = copy_example(tmp_path)
    write_config(project, LOCAL_CONFIG)
    info = service.submit(project, entry_point="sleep", experiment_name=experiment_name)
    asked: Counter[str] = Counter()
    sync, read = service._sync.sync_runs, service._logs._read_log

    def counted(*args, **kwargs):
        asked[threading.current_thread().name] += 1
        return sync(*args, **kwargs)

    def counted_read(*args, **kwargs):
        asked["log"] += 1
        return read(*args, **kwargs)

    service._sync.sync_runs, service._logs._read_log = counted, counted_read
    run = Run(service, info, "http://mlflow/local")
    poller = LivePoller()
    follow(poller, service, [run])
    waiting = threading.Thread(
        target=lambda: watch(service, run, Line(), poll=POLL), name="run.wait", daemon=True
    )
    waiting.start()
    reading = threading.Thread(
        target=lambda: list(service.follow_logs(info.run_id, poll_interval=POLL)), daemon=True
    )
    reading.start()
    time.sleep(6)
    service.cancel(info.run_id)
    # 30 at the poll interval; backing off from it, 9 or 10.
    assert asked[LivePoller.THREAD_NAME] >= 20, asked
    assert asked["run.wait"] >= 20, asked
    assert asked["log"] >= 20, asked
    waiting.join(10)
    reading.join(10)
    assert not waiting.is_alive() and not reading.is_alive()
    stop(poller)


def test_a_failed_run_that_wrote_no_log_says_so(
    service, mlflow_server, user, experiment_name, capsys
):
    # A job the site refused wrote no log: `%mantik_submit --wait` printed "The last lines
    # of its log:" over nothing.
    from mantik_jupyter.compute.run_record import TAG_REASON
    from mantik_jupyter.magics import _show_failure

    api = RunsApi(TrackingClient(mlflow_server.uri, user))
    experiment, _ = api.get_or_create_experiment(experiment_name)
    tags = {TAG_BACKEND: "unicore", TAG_STATE: str(RunState.FAILED), TAG_REASON: "refused"}
    run_id = api.create_run(experiment, tags=tags)["info"]["run_id"]
    _show_failure(service, service.get(run_id, refresh=False))
    said = capsys.readouterr().out
    assert "wrote no log: refused" in said and "last lines" not in said, said
