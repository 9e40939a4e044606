"""A lab's unattended sync pauses a backend that cannot be reached or refuses the login,
instead of trying it at every interval and every sidebar refresh. Real MLflow server, the
real loopback sshd and Slurm behind a counting relay (the relay plays a login node that
drops every connection while it is closed)."""

from __future__ import annotations

import logging
import time

import paramiko
import pytest

from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi

from .login_gate import Gate
from .test_live_poller import ssh_run

PAUSE = (1.5, 3.0)


@pytest.fixture
def gate(slurm_cluster):
    g = Gate((slurm_cluster.host, slurm_cluster.port))
    yield g
    g.close()


def test_a_lab_pauses_a_backend_that_cannot_be_reached_or_refuses_the_login(
    tracking, mlflow_server, user, slurm_cluster, gate, tmp_path, experiment_name
):
    # A lab asked every such backend at every sync interval and every sidebar refresh: a
    # firewall that drops packets made each refresh wait for the connect timeout, and a
    # refused login was tried again and again (sites lock accounts after repeated
    # failed logins).
    service = RunService(tracking, work_dir=tmp_path / "work", retry_pause=PAUSE)
    try:
        api = RunsApi(TrackingClient(mlflow_server.uri, user))
        experiment = api.create_experiment(experiment_name)
        # The sshd's host key, under the relay's address.
        key = paramiko.HostKeys(str(slurm_cluster.known_hosts))
        entry = key.lookup(f"[{slurm_cluster.host}]:{slurm_cluster.port}") or key.lookup(
            slurm_cluster.host
        )
        assert entry is not None
        known = paramiko.HostKeys()
        for kind, value in entry.items():
            known.add(f"[127.0.0.1]:{gate.port}", kind, value)
        known.save(str(tmp_path / "known_hosts"))
        spec = {
            "Hostname": "127.0.0.1",
            "Port": gate.port,
            "Username": slurm_cluster.username,
            "IdentityFile": str(slurm_cluster.key_path),
            "KnownHostsFile": str(tmp_path / "known_hosts"),
        }
        run = ssh_run(service, api, experiment, spec)

        first = service.sync([run.run_id])[0]
        assert gate.connections == 1
        assert first.state == RunState.UNKNOWN
        assert f"127.0.0.1:{gate.port}" in first.tags["mantik.state_message"]
        # Refreshes within the pause do not try the login node again, and say when.
        for info in (service.sync([run.run_id])[0], service.list(refresh=True)[0][0]):
            assert info.state == RunState.UNKNOWN
            assert any("asked again at" in w for w in info.warnings), info.warnings
        assert gate.connections == 1
        time.sleep(PAUSE[0] + 0.2)
        service.sync([run.run_id])
        assert gate.connections == 2  # asked again, failed again: the pause doubles
        time.sleep(PAUSE[0] + 0.2)
        service.sync([run.run_id])
        assert gate.connections == 2
        # The login node is back: asked at the end of the pause, the run is followed again.
        gate.open = True
        time.sleep(PAUSE[1] - PAUSE[0] + 0.2)
        back = service.sync([run.run_id])[0]
        assert gate.connections == 3
        assert not any("asked again at" in w for w in back.warnings), back.warnings

        # A refused login is paused the same way: the key is not one sshd accepts.
        paramiko.RSAKey.generate(2048).write_private_key_file(str(tmp_path / "id_wrong"))
        refused = ssh_run(
            service, api, experiment, {**spec, "IdentityFile": str(tmp_path / "id_wrong")}
        )
        before = gate.connections
        for _ in range(3):
            info = service.sync([refused.run_id])[0]
        assert gate.connections == before + 1
        assert info.state == RunState.UNKNOWN
        assert any("asked again at" in w for w in info.warnings), info.warnings
    finally:
        service.close()


def _run_behind(gate: Gate, service: RunService, mlflow_server, user, experiment, tmp_path):
    """A queued SSH run whose login node is ``gate`` (no host key known: never logged in)."""
    api = RunsApi(TrackingClient(mlflow_server.uri, user))
    spec = {"Hostname": "127.0.0.1", "Port": gate.port, "KnownHostsFile": str(tmp_path)}
    return ssh_run(service, api, api.create_experiment(experiment), spec)


def test_a_command_or_notebook_asks_every_time(
    tracking, mlflow_server, user, gate, tmp_path, experiment_name
):
    # No pause outside the lab: `mantik runs status` is asked once and means it; a
    # notebook's live lines back off on their own (tests/test_live_poller.py).
    service = RunService(tracking, work_dir=tmp_path / "work")
    try:
        run = _run_behind(gate, service, mlflow_server, user, experiment_name, tmp_path)
        for _ in range(3):
            info = service.sync([run.run_id])[0]
        assert gate.connections == 3
        assert not any("asked again at" in w for w in info.warnings)
    finally:
        service.close()


def test_a_run_still_unknown_in_other_words_is_not_logged_again(
    tracking, mlflow_server, user, tmp_path, experiment_name, caplog
):
    # One cause can read two ways (a reset, then a refused connection once the login
    # node's port is gone): the lab's log said "state unknown" again for each wording.
    gate = Gate()
    service = RunService(tracking, work_dir=tmp_path / "work")
    try:
        run = _run_behind(gate, service, mlflow_server, user, experiment_name, tmp_path)
        caplog.set_level(logging.INFO, logger="mantik_jupyter.compute.run_sync")
        first = service.sync([run.run_id])[0].tags["mantik.state_message"]
        gate.close()
        info = service.sync([run.run_id])[0]
        assert info.state == RunState.UNKNOWN
        # The run says the newest wording; the log warned once.
        assert info.tags["mantik.state_message"] != first
        records = [r for r in caplog.records if "state" in r.getMessage()]
        assert [r.levelno for r in records] == [logging.WARNING, logging.INFO], records
        assert "state still unknown" in records[1].getMessage()
    finally:
        gate.close()
        service.close()
