"""RunService lifecycle over SSH on the loopback Slurm cluster, tracked in a real MLflow."""

from __future__ import annotations

import os
import re
import subprocess
import time

import paramiko
import pytest

from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    ConfigError,
    Conflict,
    HostKeyUnknown,
    NotFound,
    UnsafePath,
)

from .runs_helpers import (
    FINAL,
    RUN_ARTIFACTS,
    RunUserSpy,
    artifact_bytes,
    artifact_names,
    assert_no_secret,
    copy_example,
    login_works,
    remote_run_dirs,
    run_failing_entry_point,
    slurm_config,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slurm


VARIABLES = {"EVIL": "$(touch pwned)", "GREETING": "hello; touch pwned2"}


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    # Tests here stop sshd; it is started again for the clean-up.
    yield from remote_run_dirs(slurm_cluster, "runs", start_sshd=True)


def cluster_config(cluster, remote_base: str, **resources) -> dict:
    return slurm_config(cluster, remote_base, variables=VARIABLES, **resources)


@pytest.fixture
def project(tmp_path, slurm_cluster, remote_base):
    project = copy_example(tmp_path)
    write_config(project, cluster_config(slurm_cluster, remote_base))
    return project


def test_slurm_lifecycle(
    service, project, mlflow_server, user, monkeypatch, tmp_path, experiment_name
):
    spy = RunUserSpy(monkeypatch)
    info = service.submit(
        project,
        params={"epochs": "6", "station": "1; touch pwned"},
        experiment_name=experiment_name,
    )
    assert info.state == RunState.QUEUED and info.job_id.isdigit()
    assert info.backend == "ssh-slurm"
    assert info.tags["mantik.run_dir"].startswith("/")

    # Readable while it runs; follow_logs ends when the run ended.
    text = "".join(service.follow_logs(info.run_id, poll_interval=0.3))
    assert "epoch 1/6" in text and "epoch 6/6" in text
    final = wait_for(service, info.run_id, FINAL, timeout=60)
    assert final.state == RunState.FINISHED, final.tags
    assert final.mlflow_status == "FINISHED" and final.exit_code == 0
    assert final.params["station"] == "1; touch pwned"
    assert final.params["learning_rate"] == "0.01"
    assert {"loss", "rmse"} <= set(final.metrics)
    names = artifact_names(mlflow_server, info.run_id)
    assert RUN_ARTIFACTS <= names
    script = artifact_bytes(mlflow_server, info.run_id, "mantik/mantik-job.sh").decode()
    assert "#SBATCH --partition=debug" in script

    # Nothing injected ran; the whole folder and one file download.
    folder = service.download(info.run_id, "", tmp_path / "whole").path
    assert not list(folder.rglob("pwned*"))
    assert (folder / "code" / "outputs" / "forecast.csv").is_file()
    assert not (folder / ".mantik-credentials").exists()
    one = service.download(info.run_id, "code/outputs/forecast.csv", tmp_path / "one.csv").path
    assert one.read_text().startswith("station,")
    for bad in ("../x", "/etc/passwd"):
        with pytest.raises(UnsafePath):
            service.download(info.run_id, bad, tmp_path / "bad")
        with pytest.raises(UnsafePath):
            service.files(info.run_id, bad)

    cred = spy.created[info.run_id]
    assert not login_works(mlflow_server, cred)
    assert cred.password not in script
    assert_no_secret(mlflow_server, info.run_id, [cred.password, user.password])
    with pytest.raises(Conflict):
        service.cancel(info.run_id)


def test_slurm_login_node_command_runs_before_the_job(
    service, project, slurm_cluster, remote_base, experiment_name
):
    config = cluster_config(slurm_cluster, remote_base)
    config["Environment"]["PreRunCommandOnLoginNode"] = 'echo "staged for $MANTIK_RUN_ID" > staged'
    write_config(project, config)
    info = service.submit(project, params={"epochs": "1"}, experiment_name=experiment_name)
    final = wait_for(service, info.run_id, FINAL, timeout=60)
    assert final.state == RunState.FINISHED, final.tags
    files = {e.path for e in service.files(info.run_id)}
    assert {"staged", "mantik-login.log"} <= files
    staged = b"".join(service.open_file(info.run_id, "staged")).decode()
    assert staged == f"staged for {info.run_id}\n"


def test_slurm_failing_entry_point(service, project, experiment_name):
    info = run_failing_entry_point(service, project, experiment_name, timeout=60)
    assert "simulated failure" in service.logs(info.run_id).text


def test_slurm_cancel(service, project, experiment_name):
    info = service.submit(project, entry_point="sleep", experiment_name=experiment_name)
    wait_for(service, info.run_id, {RunState.RUNNING}, timeout=60)
    killed = service.cancel(info.run_id)
    assert killed.state == RunState.KILLED and killed.mlflow_status == "KILLED"
    assert killed.reason == "CANCELLED"


@pytest.mark.parametrize(
    ("resources", "named"),
    [
        ({"Queue": "no-such-queue"}, "Resources.Queue 'no-such-queue'"),
        ({"MemoryPerNode": "100G"}, "Resources.MemoryPerNode (102400 MB)"),
        ({"GPUsPerNode": 2}, "Resources.GPUsPerNode 2"),
        ({"Reservation": "no-such-resv"}, "Resources.Reservation 'no-such-resv'"),
        ({"NodeConstraints": "no-such-feature"}, "Resources.NodeConstraints 'no-such-feature'"),
    ],
)
def test_refused_submission_names_the_config_key(
    service, project, slurm_cluster, remote_base, resources, named, experiment_name
):
    path = write_config(project, cluster_config(slurm_cluster, remote_base, **resources))
    with pytest.raises(ConfigError) as caught:
        service.submit(project, params={"epochs": "1"}, experiment_name=experiment_name)
    message = caught.value.message
    assert f"{named} in {path.name}: sbatch: error:" in message, message  # Slurm's words stay
    newest = service.list(experiment_name=experiment_name)[0][0]
    assert newest.state == RunState.FAILED and newest.reason and named in newest.reason


@pytest.mark.parametrize(
    ("resources", "named"), [({"Nodes": 5}, "Nodes"), ({"TotalCPUs": 100}, "TotalCPUs")]
)
def test_request_the_partition_never_meets_says_so_while_queued(
    service, project, slurm_cluster, remote_base, resources, named, experiment_name
):
    # The loopback cluster, like Slurm's default (EnforcePartLimits=NO), accepts such a
    # job and leaves it pending for good; the run showed only QUEUED.
    write_config(project, cluster_config(slurm_cluster, remote_base, **resources))
    info = service.submit(project, params={"epochs": "1"}, experiment_name=experiment_name)
    try:
        deadline = time.monotonic() + 30
        while not (info := service.get(info.run_id)).reason:
            assert time.monotonic() < deadline, info.tags
            time.sleep(0.5)
        assert info.state == RunState.QUEUED
        assert "Slurm: Partition" in info.reason and named in info.reason
    finally:
        killed = service.cancel(info.run_id)  # it would wait for good
    assert killed.state == RunState.KILLED and killed.reason == "CANCELLED"


def _scontrol(*args: str) -> None:
    # As root on the test machine: what an admin, a node failure or preemption does.
    subprocess.run(["scontrol", *args], check=True, capture_output=True, timeout=30)


def _wait_for_log(service, run_id: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in service.all_logs(run_id).text:
        assert time.monotonic() < deadline, service.all_logs(run_id).text
        time.sleep(0.3)


def _slurm_state(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


def _start_requeued_job_soon(job_id: str, timeout: float = 30) -> None:
    """Let a requeued job start within seconds rather than Slurm's two minutes.

    Slurm holds a requeued job back for its credential lifetime (cred_expire, 120 s)
    on purpose: slurmd revoked the job's launch credential when it killed the first
    attempt, and refuses any credential of that job made in or before that second
    ("Killing non-startable batch JobId=N: Job credential revoked", the job FAILED 1:0
    without running the script). So the job may start only once its first attempt is
    gone from the node (COMPLETING ends; the revocation came before) and in a later
    second; StartTime=now let the scheduler start it in the same second."""
    deadline = time.monotonic() + timeout
    while (state := _slurm_state(job_id)) != "PENDING":
        assert time.monotonic() < deadline, f"job {job_id} stayed {state} after the requeue"
        time.sleep(0.2)
    _scontrol("update", f"JobId={job_id}", "StartTime=now+1")


def _slurm_start_ms(job_id: str) -> int:
    """The start of the job's latest attempt, as Slurm records it."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%S"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SLURM_TIME_FORMAT": "%s"},
    )
    return int(out.stdout.strip()) * 1000


def _slurm_account(job_id: str) -> str:
    """What Slurm says of each attempt of a job (sacct) and why it ended (slurmctld's log)."""
    sacct = subprocess.run(
        ["sacct", "-D", "-j", job_id, "-o", "JobID,State,ExitCode,Start,End,Reason"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    config = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
    ).stdout
    log_file = next(
        (
            line.split("=", 1)[1].strip()
            for line in config.splitlines()
            if line.startswith("SlurmctldLogFile")
        ),
        "",
    )
    try:
        with open(log_file, encoding="utf-8", errors="replace") as log:
            said = [line for line in log if re.search(rf"JobId={job_id}\b", line)]
    except OSError as exc:
        said = [f"({exc})"]
    return sacct + "".join(said[-20:])


def test_requeued_run_goes_on_and_finishes(service, project, experiment_name):
    info = service.submit(project, params={"epochs": "20"}, experiment_name=experiment_name)
    _wait_for_log(service, info.run_id, "epoch 2/20")
    first = service.all_logs(info.run_id)
    running = wait_for(service, info.run_id, {RunState.RUNNING}, 30)
    # Slurm's own StartTime, asked with the state.
    assert running.running_since == _slurm_start_ms(info.job_id)
    _scontrol("requeue", info.job_id)
    waiting = wait_for(service, info.run_id, {RunState.QUEUED} | FINAL, 30)
    assert waiting.state == RunState.QUEUED
    assert waiting.running_since is None  # the first attempt's start is not this wait's
    _start_requeued_job_soon(info.job_id)
    final = wait_for(service, info.run_id, FINAL, timeout=120)
    text = service.all_logs(info.run_id).text
    # The second attempt found the tracking credential and logged into the same run.
    # If not, the job's whole log and Slurm's account say why (the run directory goes
    # with the module).
    if final.state != RunState.FINISHED or final.exit_code != 0:
        pytest.fail(
            f"run ended {final.state}: {final.reason}\n--- job log:\n{text}\n"
            f"--- Slurm:\n{_slurm_account(info.job_id)}"
        )
    assert {"loss", "rmse"} <= set(final.metrics), text
    # The recorded start moved to the second attempt.
    assert final.running_since == _slurm_start_ms(info.job_id) > running.running_since
    # Both attempts are in the log, and a reader's offset from the first still fits.
    assert text.startswith(first.text)
    rest = service.all_logs(info.run_id, first.offset).text
    assert "attempt 2 of the run starts" in rest and "epoch 20/20" in rest
    assert {e.path for e in service.files(info.run_id)}.isdisjoint({".mantik-credentials"})


def test_job_ended_by_slurm_leaves_no_credential(service, project, experiment_name):
    # Slurm's SIGTERM (here a cancel outside mantik; a time limit alike) leaves the
    # credential file to a possible requeue; the run's end removes it.
    info = service.submit(project, entry_point="sleep", experiment_name=experiment_name)
    wait_for(service, info.run_id, {RunState.RUNNING}, timeout=60)
    subprocess.run(["scancel", info.job_id], check=True, timeout=30)
    final = wait_for(service, info.run_id, FINAL, timeout=60)
    # Root's cancel, not the user's: it read "CANCELLED".
    assert final.state == RunState.KILLED and final.mlflow_status == "KILLED"
    assert "Slurm ended the job: cancelled by user root (not you)" in final.reason
    assert final.tags["mantik.reason"] == final.reason
    assert ".mantik-credentials" not in {e.path for e in service.files(info.run_id)}


def test_sshd_down_is_unknown_then_recovers_after_a_lab_restart(
    tracking, project, slurm_cluster, tmp_path, experiment_name
):
    first = RunService(tracking, work_dir=tmp_path / "work")
    info = first.submit(
        project, entry_point="sleep", params={"seconds": "6"}, experiment_name=experiment_name
    )
    wait_for(first, info.run_id, {RunState.RUNNING}, timeout=60)
    try:
        slurm_cluster.sshd("stop")
        blind = first.get(info.run_id)
        assert blind.state == RunState.UNKNOWN
        assert blind.mlflow_status == "RUNNING"  # never FAILED because the network blinked
        assert "mantik.state_message" in blind.tags
    finally:
        slurm_cluster.sshd("start")
        first.close()
    # A fresh service (the lab restarted) finds the run and its true state.
    second = RunService(tracking, work_dir=tmp_path / "work")
    try:
        assert info.run_id in {r.run_id for r in second.sync()}
        final = wait_for(second, info.run_id, FINAL, timeout=60)
        assert final.state == RunState.FINISHED, final.tags
        assert "mantik.state_message" not in final.tags
    finally:
        second.close()


@pytest.mark.slow
def test_slurm_runtime_exceeded_is_timeout(
    service, project, slurm_cluster, remote_base, experiment_name
):
    # Not the default config: the reason named compute-backend-config.yaml whatever file
    # the run was submitted with.
    config = cluster_config(slurm_cluster, remote_base, Runtime="1m")
    write_config(project, config, "short.yml")
    info = service.submit(
        project, backend_config="short.yml", entry_point="sleep", experiment_name=experiment_name
    )
    final = wait_for(service, info.run_id, FINAL, timeout=240)
    assert final.state == RunState.FAILED and final.tags["mantik.native_state"] == "TIMEOUT"
    # It read "TIMEOUT": Slurm's word, without the limit or what to change.
    assert "time limit of 00:01:00 reached" in final.reason
    assert "Raise Resources.Runtime in short.yml (at most" in final.reason, final.reason
    assert final.mlflow_status == "FAILED"
    # Slurm's SIGTERM left the credential file to a requeue; the run's end removed it.
    assert ".mantik-credentials" not in {e.path for e in service.files(info.run_id)}


@pytest.mark.parametrize(
    "fault", ["unknown host key", "wrong key", "missing key file", "unreachable"]
)
def test_a_cluster_that_refuses_the_login_gets_no_run(
    service, project, slurm_cluster, remote_base, tmp_path, fault, experiment_name
):
    # The login is checked before anything is created in MLflow: a typo in the config must
    # not leave a FAILED run (nor a new experiment) behind at every attempt.
    config = cluster_config(slurm_cluster, remote_base)
    expected: type[Exception] = BackendUnavailable
    if fault == "unknown host key":
        (tmp_path / "known_hosts").write_text("")
        config["SSH"]["KnownHostsFile"] = str(tmp_path / "known_hosts")
        expected = HostKeyUnknown
    elif fault == "wrong key":
        paramiko.RSAKey.generate(2048).write_private_key_file(str(tmp_path / "id_wrong"))
        config["SSH"]["IdentityFile"] = str(tmp_path / "id_wrong")
        expected = AuthenticationFailed
    elif fault == "missing key file":
        config["SSH"]["IdentityFile"] = str(tmp_path / "id_missing")
        expected = ConfigError
    else:
        config["SSH"]["Port"] = 1
    write_config(project, config)
    with pytest.raises(expected) as caught:
        service.submit(project, params={"epochs": "1"}, experiment_name=experiment_name)
    if fault != "unreachable":  # the refusal, not a complaint about the key's type
        assert "Cannot reach" not in caught.value.message, caught.value.message
    with pytest.raises(NotFound, match="No experiment named"):
        service.list(experiment_name=experiment_name)
