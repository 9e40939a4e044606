"""The UNICORE backend: RunService lifecycle through pyunicore against the UNICORE
stand-in site (test infrastructure, tests/unicore_standin) on loopback, tracked in a
real MLflow server; plus the backend's errors, states and mapping without MLflow."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mantik_jupyter.compute.backends import unicore as unicore_module
from mantik_jupyter.compute.backends.base import PreparedJob
from mantik_jupyter.compute.backends.unicore import UnicoreBackend
from mantik_jupyter.compute.backends.unicore_job import bss_details, decide, job_description
from mantik_jupyter.compute.config import load_config, parse_config
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.script import safe_job_name
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import (
    AuthenticationFailed,
    BackendUnavailable,
    ConfigError,
    Conflict,
    NotFound,
    PermissionDenied,
    UnsafePath,
)
from mantik_jupyter.tracking.embedded import free_port

from .runs_helpers import (
    FINAL,
    RunUserSpy,
    artifact_bytes,
    artifact_names,
    assert_no_secret,
    copy_example,
    login_works,
    run_failing_entry_point,
    unicore_config,
    wait_for,
    write_config,
)
from .unicore_standin.fixtures import PROJECT, USER
from .unicore_standin.server import UnicoreStandin

# An existing Mantik UNICORE config: Apptainer image on the cluster, modules, login-node
# commands, variables (one of them an injection attempt).
MANTIK_STYLE = {
    "Environment": {
        "Apptainer": {
            "Path": "/p/project/images/weather.sif",
            "Type": "remote",
            "Options": ["--nv", "-B /p/scratch:/scratch"],
        },
        "Modules": ["Stages/2024", "Python/3.11.3"],
        "Variables": {"EVIL": "$(touch pwned)", "DATA_DIR": "$HOME/data"},
        "PreRunCommandOnLoginNode": ["echo prepared on $(hostname) > prepared.txt"],
        "PostRunCommandOnLoginNode": "echo cleaned up > post.txt",
    },
    "ComputeBudgetAccount": PROJECT,
}


@pytest.fixture
def project(tmp_path, unicore_site):
    project = copy_example(tmp_path)
    write_config(project, unicore_config(unicore_site))
    return project


@pytest.fixture
def service(unicore_login, service):
    """The shared RunService, made with the UNICORE login in the environment."""
    return service


def _job_id_file(site: UnicoreStandin, job_id: str):
    return site.jobs[job_id]


# ---- lifecycle through the RunService (real MLflow) ---------------------------------------


def test_unicore_lifecycle_with_a_mantik_config(
    service,
    project,
    unicore_site,
    mlflow_server,
    user,
    monkeypatch,
    tmp_path,
    unicore_password,
    experiment_name,
):
    write_config(project, unicore_config(unicore_site, **MANTIK_STYLE))
    spy = RunUserSpy(monkeypatch)
    info = service.submit(
        project,
        params={"epochs": "3", "station": "1; touch pwned"},
        experiment_name=experiment_name,
    )
    assert info.state == RunState.QUEUED and info.backend == "unicore"
    job = unicore_site.jobs[info.job_id]
    assert info.tags["mantik.run_dir"].endswith(f"/storages/{info.job_id}-uspace")

    # The config mapped onto the UNICORE job description.
    desc = job.description
    assert desc["Resources"] == {
        "Queue": "batch",
        "Runtime": "600",
        "Nodes": "1",
        "MemoryPerNode": "2048M",
    }
    assert desc["Project"] == PROJECT
    assert desc["Executable"] == "bash" and desc["Arguments"] == ["mantik-job.sh"]
    assert desc["RunUserPrecommandOnLoginNode"] == "true"
    assert "echo prepared on $(hostname) > prepared.txt" in desc["User precommand"]
    assert "echo cleaned up > post.txt" in desc["User postcommand"]

    # Logs while it runs; follow_logs ends when the run ended.
    text = "".join(service.follow_logs(info.run_id, poll_interval=0.3))
    assert "epoch 1/3" in text and "epoch 3/3" in text
    assert "[fake-apptainer] run --nv -B /p/scratch:/scratch /p/project/images/weather.sif" in text
    assert "[fake-module] load Stages/2024" in text
    final = wait_for(service, info.run_id, FINAL, timeout=60)
    assert final.state == RunState.FINISHED, final.tags
    # UNICORE says exitCode "0", which pyunicore's Job.exit_code reports as None.
    assert final.mlflow_status == "FINISHED" and final.exit_code == 0
    assert final.tags["mantik.native_state"] == "SUCCESSFUL"
    assert final.params["station"] == "1; touch pwned"
    assert {"loss", "rmse"} <= set(final.metrics)
    names = artifact_names(mlflow_server, info.run_id)
    assert {"mantik/mantik-job.sh", "mantik/mantik.log", "forecast.csv"} <= names
    script = artifact_bytes(mlflow_server, info.run_id, "mantik/mantik-job.sh").decode()
    assert "#SBATCH" not in script  # UNICORE makes the batch script from Resources

    # Login-node commands ran in the job directory; nothing injected ran.
    files = {e.path for e in service.files(info.run_id)}
    assert {"prepared.txt", "post.txt", "mantik.log", "mantik-login.log", "code"} <= files
    assert ".mantik-credentials" not in files
    (tmp_path / "whole").mkdir()
    folder = service.download(info.run_id, "", tmp_path / "whole").path
    # Named after the run, as the local and Slurm backends name it, not after the job.
    assert folder == tmp_path / "whole" / info.run_id
    assert not list(folder.rglob("pwned*"))
    assert (folder / "code" / "outputs" / "forecast.csv").is_file()
    assert "[mantik] PreRunCommandOnLoginNode[0]" in (folder / "mantik-login.log").read_text()
    one = service.download(info.run_id, "code/outputs/forecast.csv", tmp_path / "one.csv").path
    assert one.read_text().startswith("station,")
    for bad in ("../x", "/etc/passwd"):
        with pytest.raises(UnsafePath):
            service.download(info.run_id, bad, tmp_path / "bad")

    # The tracking credential reached the job only as a staged-in file.
    cred = spy.created[info.run_id]
    assert not login_works(mlflow_server, cred)
    blob = json.dumps(desc) + "\n".join(job.log)
    for secret in (cred.password, unicore_password, user.password):
        assert secret not in blob
    assert_no_secret(mlflow_server, info.run_id, [cred.password, user.password, unicore_password])
    with pytest.raises(Conflict):
        service.cancel(info.run_id)


def test_unicore_failing_entry_point(service, project, experiment_name):
    info = run_failing_entry_point(service, project, experiment_name, timeout=60)
    assert "simulated failure" in service.logs(info.run_id).text


def test_unicore_cancel_and_a_lab_restart(
    service, project, tracking, tmp_path, unicore_login, experiment_name
):
    info = service.submit(project, entry_point="sleep", experiment_name=experiment_name)
    before = int(time.time() * 1000)
    running = wait_for(service, info.run_id, {RunState.RUNNING}, timeout=60)
    # UNICORE says no start time: the sync records when it first saw the job running.
    assert running.running_since and info.start_time <= running.running_since
    assert running.running_since >= before - 1000, (before, running.running_since)
    assert running.tags["mantik.running_since"] == str(running.running_since)
    # A fresh service (the lab restarted) finds the job through the run's tags.
    second = RunService(tracking, work_dir=tmp_path / "work2")
    try:
        assert second.logs(info.run_id).text is not None
        killed = second.cancel(info.run_id)
    finally:
        second.close()
    assert killed.state == RunState.KILLED and killed.mlflow_status == "KILLED"
    assert killed.reason == "CANCELLED"


def test_unicore_is_a_supported_backend(service):
    kinds = {b["name"]: b for b in service.backends()}
    assert kinds["unicore"]["supported"] and kinds["unicore"]["config_key"] == "UnicoreApiUrl"


# ---- the backend on its own (no MLflow) ------------------------------------------------------


def _prepared(tmp_path: Path, script: str, run_id: str = "0123abcd") -> PreparedJob:
    local = tmp_path / run_id
    local.mkdir()
    (local / "mantik-job.sh").write_text(script)
    return PreparedJob(run_id=run_id, local_dir=local, job_name="t", files=["mantik-job.sh"])


def _wait_final(backend: UnicoreBackend, job_id: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        status = backend.states([job_id])[job_id]
        if status.state.is_final or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_wrong_password_says_the_site_refused_the_login(unicore_site, unicore_password):
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password="not-the-password")
    with pytest.raises(AuthenticationFailed, match="refused the login of user 'alice'") as err:
        backend.states(["some-job"])
    assert "not-the-password" not in err.value.message
    assert "not-the-password" not in repr(backend)


def test_token_login_expired_token_and_states_of_many_jobs(unicore_site, tmp_path):
    token = unicore_site.add_token(USER)
    backend = UnicoreBackend(unicore_site.base_url, token=token)
    ids = [
        backend.submit(_prepared(tmp_path, f"echo job {n}; exit {n}\n", f"run{n}"))
        for n in range(3)
    ]
    finals = {job_id: _wait_final(backend, job_id) for job_id in ids}
    assert finals[ids[0]].state == RunState.FINISHED and finals[ids[0]].exit_code == 0
    assert finals[ids[1]].state == RunState.FAILED and finals[ids[1]].reason == "exit code 1"
    # One small request per job (UNICORE's job list carries URLs only), no more.
    before = len(unicore_site.requests)
    states = backend.states([*ids, "no-such-job"])
    job_gets = [r for r in unicore_site.requests[before:] if "/jobs/" in r[1]]
    assert len(job_gets) == 4
    # A 404 is a job the site no longer has (another user's job is a 403).
    assert states["no-such-job"].state == RunState.FAILED
    assert "deleted job no-such-job" in (states["no-such-job"].reason or "")
    assert states[ids[2]].exit_code == 2
    # A security session the site forgot: pyunicore repeats the call with the token.
    unicore_site.expire_sessions()
    assert backend.states([ids[0]])[ids[0]].state == RunState.FINISHED

    unicore_site.tokens[token] = (USER, time.time() - 1)
    expired = UnicoreBackend(unicore_site.base_url, token=token)
    with pytest.raises(AuthenticationFailed, match="refused the access token.*Renew"):
        expired.states(ids)
    # A JWT whose exp has passed is not even sent.
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1000}).encode()).decode().rstrip("=")
    jwt_like = UnicoreBackend(unicore_site.base_url, token=f"e30.{claims}.c2ln")
    with pytest.raises(AuthenticationFailed, match="expired at 1970"):
        jwt_like.states(ids)


def test_aborting_a_queued_job_deletes_its_credential_file(
    unicore_site, unicore_password, tmp_path, monkeypatch
):
    # Long enough in the queue to be aborted there: the job script never runs.
    monkeypatch.setattr(unicore_site, "queue_delay", 5.0)
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    job = _prepared(tmp_path, "echo never\n")
    (job.local_dir / ".mantik-credentials").write_text("MLFLOW_TRACKING_TOKEN=t0ken\n")
    job.files.append(".mantik-credentials")
    job_id = backend.submit(job)
    deadline = time.monotonic() + 10
    while unicore_site.jobs[job_id].status != "QUEUED" and time.monotonic() < deadline:
        time.sleep(0.05)
    creds = unicore_site.jobs[job_id].workdir / ".mantik-credentials"
    assert creds.is_file()
    backend.cancel(job_id)
    assert not creds.exists()
    final = _wait_final(backend, job_id)
    assert final.state == RunState.KILLED
    assert not (unicore_site.jobs[job_id].workdir / "mantik.log").exists()
    backend.cancel(job_id)  # ended: nothing to stop or delete


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (
            {"Resources": {"Queue": "batch", "Nodes": 64}, "ComputeBudgetAccount": PROJECT},
            ["Resources.Nodes = 64 is outside what the site allows", "use a queue"],
        ),
        (
            {"Resources": {"Queue": "batch", "Runtime": "48h"}, "ComputeBudgetAccount": PROJECT},
            ["Resources.Runtime = 172800 s is outside what the site allows"],
        ),
        (
            {"Resources": {"Queue": "gpu"}, "ComputeBudgetAccount": PROJECT},
            ["Resources.Queue 'gpu' is not a queue (partition) you may use there"],
        ),
        (
            {"Resources": {"Queue": "batch"}, "ComputeBudgetAccount": "deepacf-typo"},
            ["ComputeBudgetAccount 'deepacf-typo'", "Invalid account", "you belong to"],
        ),
        (
            {"Resources": {"Queue": "batch"}},
            ["ComputeBudgetAccount (not set)", "Invalid account", "you belong to"],
        ),
    ],
)
def test_a_job_the_site_refuses_names_the_config_key_at_fault(
    unicore_site, unicore_password, tmp_path, monkeypatch, config, words
):
    """UNICORE takes any resource request with the job and checks it only when it sends
    the job to the batch system (after the stage-in and the user precommand): the job
    fails then with "Could not submit job: Resource request <Nodes=64> is out of range." or
    the TSI's account of sbatch's refusal, neither of which names the config's key."""
    monkeypatch.setattr(unicore_site, "default_account", None)  # Slurm's DefaultAccount
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    job = _prepared(tmp_path, "echo ran > ran.txt\n")
    parsed = parse_config({"UnicoreApiUrl": unicore_site.base_url, **config})
    job_id = backend.submit(dataclasses.replace(job, config=parsed))
    final = _wait_final(backend, job_id)
    assert final.state == RunState.FAILED, final
    assert final.reason is not None and final.reason.startswith("the site"), final.reason
    for word in words:
        assert word in final.reason, final.reason
    assert "Could not submit job" not in final.reason and "TSI_FAILED" not in final.reason
    assert not (unicore_site.jobs[job_id].workdir / "ran.txt").exists()


def test_unreachable_site_is_backend_unavailable(unicore_password):
    url = f"http://127.0.0.1:{free_port()}/SITE/rest/core"
    backend = UnicoreBackend(url, username=USER, password=unicore_password, timeout=5)
    with pytest.raises(BackendUnavailable, match="Cannot reach the UNICORE site"):
        backend.states(["a-job"])


def test_an_existing_mantik_unicore_config_maps_onto_a_job_description(tmp_path, monkeypatch):
    monkeypatch.delenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", raising=False)
    path = tmp_path / "compute-backend-config.yaml"
    path.write_text(
        "UnicoreApiUrl: https://zam2125.zam.kfa-juelich.de:9112/JUWELS/rest/core\n"
        "Environment:\n"
        "  Apptainer: {Path: /p/images/mantik.sif, Type: remote, Options: [--nv]}\n"
        "  Modules: [Stages/2024, GCC]\n"
        "  PreRunCommand: {Command: module load git, ExecuteOnLoginNode: true}\n"
        "  PostRunCommandOnLoginNode: [echo done]\n"
        "Resources:\n"
        "  Queue: devel\n  Runtime: 1h30m\n  Nodes: 2\n  TotalCPUs: 8\n  CPUsPerNode: 4\n"
        "  GPUsPerNode: 4\n  MemoryPerNode: 10G\n  Reservation: res1\n"
        "  NodeConstraints: mem192\n  QoS: normal\n"
    )
    monkeypatch.setenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", "deepacf")
    with pytest.warns(UserWarning, match="PreRunCommand"):
        config = load_config(path)
    desc = job_description(config, "my-run", "abc123")
    assert desc["Resources"] == {
        "Queue": "devel",
        "Runtime": "5400",
        "Nodes": "2",
        "TotalCPUs": "8",
        "CPUsPerNode": "4",
        "GPUsPerNode": "4",
        "MemoryPerNode": "10240M",
        "Reservation": "res1",
        "NodeConstraints": "mem192",
        "QoS": "normal",
    }
    assert desc["Project"] == "deepacf"
    assert desc["haveClientStageIn"] == "true" and desc["Umask"] == "077"
    assert "module load git" in desc["User precommand"]
    assert desc["User precommand"].index("tar -xzf") < desc["User precommand"].index("module load")
    assert "echo done" in desc["User postcommand"]
    assert desc["RunUserPostcommandOnLoginNode"] == "true"
    assert set(desc["Environment"]) == {"MLFLOW_RUN_ID", "MANTIK_RUN_ID"}


@pytest.mark.parametrize(
    ("status", "message", "code", "state", "reason"),
    [
        ("READY", "", None, RunState.QUEUED, None),
        ("STAGINGIN", "", None, RunState.QUEUED, None),
        ("QUEUED", "", None, RunState.QUEUED, None),
        ("RUNNING", "", None, RunState.RUNNING, None),
        ("STAGINGOUT", "", 0, RunState.RUNNING, None),
        ("SUCCESSFUL", "", None, RunState.FINISHED, None),
        ("SUCCESSFUL", "", 0, RunState.FINISHED, None),
        ("SUCCESSFUL", "", 4, RunState.FAILED, "exit code 4"),
        ("FAILED", "User application exited with non-zero exit code: 3", 3, RunState.FAILED,
         "exit code 3"),
        ("FAILED", "Job aborted.", None, RunState.KILLED, "CANCELLED"),
        ("FAILED", "TIMEOUT: the job exceeded its run time limit", None, RunState.FAILED,
         "Slurm ended the job: time limit reached. Raise Resources.Runtime in "
         "the run's compute backend config (at most the partition's limit, `sinfo -o '%P %l'`) "
         "and submit the run again."),
        ("FAILED", "Slurm: OUT_OF_MEMORY", 137, RunState.FAILED, "Slurm ended the job: out of "
         "memory (the job used more than what it asked for, Resources.MemoryPerNode). Raise "
         "Resources.MemoryPerNode in the run's compute backend config (at most a node's memory, "
         "`sinfo -o '%P %m'` in MB) and submit the run again."),
        ("FAILED", "Pre-command(s) failed: [Could not setup pre-command: no TSI]\nmore", None,
         RunState.FAILED, "Pre-command(s) failed: [Could not setup pre-command: no TSI]"),
        ("FAILED", "Pre-command(s) failed: [Command exited with non-zero exit code: <2>. More "
         "information might be available in the job's working directory '/p/x/']", None,
         RunState.FAILED, "unpacking the code or PreRunCommandOnLoginNode failed on the login "
         "node (exit code 2); its output is in mantik-login.log"),
    ],
)  # fmt: skip
def test_state_mapping(status, message, code, state, reason):
    result = decide(status, message, code)
    assert result.state == state and result.reason == reason
    if state == RunState.FINISHED:
        assert result.exit_code == 0


def test_a_renewed_token_is_used_without_restarting(
    service, project, unicore_site, monkeypatch, experiment_name
):
    # OIDC access tokens live an hour or so; the error says to renew and set the token
    # again, and the kernel's or lab's RunService (and its backend) lives on.
    monkeypatch.delenv("MANTIK_UNICORE_USERNAME")
    monkeypatch.delenv("MANTIK_UNICORE_PASSWORD")
    old = unicore_site.add_token(USER)
    monkeypatch.setenv("MANTIK_UNICORE_TOKEN", old)
    info = service.submit(project, experiment_name=experiment_name)
    unicore_site.tokens[old] = (USER, time.time() - 1)
    unicore_site.expire_sessions()
    with pytest.raises(AuthenticationFailed, match="refused the access token.*Renew"):
        service.logs(info.run_id)
    monkeypatch.setenv("MANTIK_UNICORE_TOKEN", unicore_site.add_token(USER))
    final = wait_for(service, info.run_id, FINAL, timeout=60)
    assert final.state == RunState.FINISHED, final.tags
    assert "epoch" in service.all_logs(info.run_id).text


def test_a_missing_path_is_named(unicore_site, unicore_password, tmp_path):
    # UNICORE answers a missing file or folder with a bare 404: the message must name it.
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    job_id = backend.submit(_prepared(tmp_path, "mkdir -p outputs; echo done\n"))
    assert _wait_final(backend, job_id).state == RunState.FINISHED
    assert {e.path for e in backend.list_files(job_id)} >= {"outputs", "mantik.log"}
    assert [e.is_dir for e in backend.list_files(job_id) if e.path == "outputs"] == [True]
    for call in (
        lambda: backend.list_files(job_id, "outputs/no-such"),
        lambda: backend.open_file(job_id, "outputs/no-such"),
        lambda: backend.download(job_id, "outputs/no-such", tmp_path / "x"),
    ):
        with pytest.raises(NotFound, match=r"'outputs/no-such'.*run directory of UNICORE job"):
            call()


def test_a_log_offset_past_the_end_is_never_sent_to_the_site(
    unicore_site, unicore_password, tmp_path
):
    # UNICORE never answers a Range that starts past the end of a file (its server
    # thread spins); `mantik runs logs --offset N` and the REST API take any offset.
    backend = UnicoreBackend(
        unicore_site.base_url, username=USER, password=unicore_password, timeout=5
    )
    job_id = backend.submit(_prepared(tmp_path, "echo thirteen bytes\n"))
    assert _wait_final(backend, job_id).state == RunState.FINISHED
    before = len(unicore_site.requests)
    data, end = backend.read_log(job_id)
    assert data == b"thirteen bytes\n" and end == 15
    assert backend.read_log(job_id, end) == (b"", end)
    # Following a log costs one request a read, no size check.
    assert len([r for r in unicore_site.requests[before:] if r[1].endswith("/mantik.log")]) == 2
    fresh = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    fresh.attach(job_id, backend.run_dir_of(job_id))
    started = time.monotonic()
    for b in (backend, fresh):
        assert b.read_log(job_id, 100) == (b"", 100)
        assert b.read_log(job_id, 9) == (b"bytes\n", 15)
    assert time.monotonic() - started < 5
    assert unicore_site.never_answered == []


def test_submitting_waits_for_the_job_directory_only_as_long_as_the_site_takes(
    unicore_site, unicore_password, tmp_path
):
    # UNICORE makes a new job's directory asynchronously (its storage is INITIALIZING
    # for a moment, 0.2 s here); pyunicore's own wait looked again only after 5 s.
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    backend.client()
    for n in range(2):
        started = time.monotonic()
        job_id = backend.submit(_prepared(tmp_path, "exit 0\n", f"quick{n}"))
        assert time.monotonic() - started < 2.5
        assert _wait_final(backend, job_id).state == RunState.FINISHED


def test_a_password_in_unicore_api_url_is_refused_without_showing_it(tmp_path):
    # The URL goes into the run's tags, its config artifact and every error message.
    path = tmp_path / "compute-backend-config.yaml"
    path.write_text(
        "UnicoreApiUrl: https://alice:S3cret-pw@unicore.example.org/JUWELS/rest/core\n"
        "Resources: {Queue: batch}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "S3cret-pw" not in text
    assert f"{path}:1" in text and "UnicoreApiUrl" in text
    assert "MANTIK_UNICORE_USERNAME" in text and "MANTIK_UNICORE_TOKEN" in text


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_a_site_certificate_that_is_not_trusted_says_how_to_trust_it(
    tmp_path, unicore_password, monkeypatch
):
    cert, key = _self_signed(tmp_path)
    site = UnicoreStandin(tmp_path / "site", users={USER: unicore_password}, tls=(cert, key))
    site.start()
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        backend = UnicoreBackend(site.base_url, username=USER, password=unicore_password)
        with pytest.raises(BackendUnavailable) as err:
            backend.states(["a-job"])
        assert site.base_url in err.value.message
        assert "certificate" in err.value.message and "SSL_CERT_FILE" in err.value.message
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert backend.states(["a-job"])["a-job"].native_state == "NOT_FOUND"
    finally:
        site.close()


@pytest.mark.parametrize(
    ("script", "post", "state", "reason"),
    [
        ("echo trained; exit 3\n", "echo cleaned > post.txt", RunState.FAILED, "exit code 3"),
        ("echo trained\n", "echo cleaned > post.txt; false", RunState.FINISHED, None),
    ],
)
def test_post_run_command_on_login_node_runs_after_the_job_and_keeps_its_state(
    unicore_site, unicore_password, tmp_path, script, post, state, reason
):
    # As on the local backend: PostRunCommandOnLoginNode runs however the job ended, and
    # the run's state is the job's. UNICORE itself skips the user postcommand after a
    # non-zero exit code, and fails a job whose postcommand fails.
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    config = parse_config(
        {
            "UnicoreApiUrl": unicore_site.base_url,
            "Resources": {"Queue": "batch"},
            "Environment": {"PostRunCommandOnLoginNode": post},
        }
    )
    job = dataclasses.replace(_prepared(tmp_path, script), config=config)
    job_id = backend.submit(job)
    final = _wait_final(backend, job_id)
    assert (final.state, final.reason) == (state, reason), final
    assert backend.read_log(job_id)[0] == b"trained\n"
    data, _ = backend._read(job_id, "post.txt", 0, 100)
    assert data == b"cleaned\n"
    login_log, _ = backend._read(job_id, "mantik-login.log", 0, 10_000)
    if "false" in post:
        assert b"PostRunCommandOnLoginNode[0] failed with exit status 1" in login_log


def test_a_failing_pre_run_command_on_login_node_points_at_its_output(
    unicore_site, unicore_password, tmp_path
):
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    config = parse_config(
        {
            "UnicoreApiUrl": unicore_site.base_url,
            "Resources": {"Queue": "batch"},
            "Environment": {"PreRunCommandOnLoginNode": "echo no data here; false"},
        }
    )
    job_id = backend.submit(dataclasses.replace(_prepared(tmp_path, "echo x\n"), config=config))
    final = _wait_final(backend, job_id)
    assert final.state == RunState.FAILED
    assert "PreRunCommandOnLoginNode" in final.reason and "exit code 1" in final.reason
    # Its output, as the Slurm backend shows it: the run's log is empty (no job ran), and
    # the user had to find and download mantik-login.log to learn why.
    assert final.reason.endswith(
        "; the end of mantik-login.log: [mantik] PreRunCommandOnLoginNode[0] | no data here | "
        "[mantik] PreRunCommandOnLoginNode[0] failed with exit status 1"
    ), final.reason
    login_log, _ = backend._read(job_id, "mantik-login.log", 0, 10_000)
    assert b"no data here" in login_log


def test_the_end_of_a_long_login_log_is_shown_whole_lines(unicore_site, unicore_password, tmp_path):
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    config = parse_config(
        {
            "UnicoreApiUrl": unicore_site.base_url,
            "Resources": {"Queue": "batch"},
            "Environment": {
                "PreRunCommandOnLoginNode": "for i in $(seq 1000); do echo line $i; done; false"
            },
        }
    )
    job_id = backend.submit(dataclasses.replace(_prepared(tmp_path, "echo x\n"), config=config))
    reason = _wait_final(backend, job_id).reason or ""
    shown = reason.split("the end of mantik-login.log: ", 1)[1].split(" | ")
    assert shown == [f"line {n}" for n in range(994, 1001)] + [
        "[mantik] PreRunCommandOnLoginNode[0] failed with exit status 1"
    ]


def test_a_job_over_its_time_limit_ends_as_timeout(
    unicore_site, unicore_password, tmp_path, monkeypatch
):
    # UNICORE says only "Job did not complete normally on BSS"; the batch system's own
    # state is in the job's log. Slurm's limit is a whole minute; here it lasts 2 s.
    monkeypatch.setattr(unicore_site, "batch_minute", 2.0)
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    config = parse_config(
        {
            "UnicoreApiUrl": unicore_site.base_url,
            "Resources": {"Queue": "batch", "Runtime": "00:00:02"},
        }
    )
    job = dataclasses.replace(_prepared(tmp_path, "echo start; sleep 30\n"), config=config)
    job_id = backend.submit(job)
    final = _wait_final(backend, job_id, timeout=30)
    # As a Slurm-over-SSH run says it: the limit, and what to change.
    assert final.state == RunState.FAILED, final
    assert (final.reason or "").startswith(
        "Slurm ended the job: time limit of 00:01:00 reached. Raise Resources.Runtime"
    ), final


def _bss_details(backend: UnicoreBackend, job_id: str) -> dict:
    """What the site's batch system says of the job (UNICORE's /jobs/{id}/details), once
    it has reached it: before, UNICORE answers {"rawDetailsData": "N/A"}."""
    deadline = time.monotonic() + 20
    while True:
        details = backend.client().transport.get(url=f"{backend.job_url(job_id)}/details")
        if "JobId" in details or time.monotonic() > deadline:
            return details
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("runtime", "limit"),
    [("30s", "00:01:00"), ("90s", "00:02:00"), ("61", "00:02:00"), ("1h30m", "01:30:00")],
)
def test_the_site_limits_a_job_to_at_least_its_runtime(
    unicore_site, unicore_password, tmp_path, runtime, limit
):
    # UNICORE's Slurm TSI writes --time in whole minutes, truncated (90 s became 1 min,
    # and before TSI 8.3 anything under 60 s became 0, no limit); Slurm itself rounds
    # seconds up. A Runtime is sent in whole minutes, rounded up, so the two agree.
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    config = parse_config(
        {
            "UnicoreApiUrl": unicore_site.base_url,
            "Resources": {"Queue": "batch", "Runtime": runtime},
        }
    )
    job_id = backend.submit(dataclasses.replace(_prepared(tmp_path, "true\n"), config=config))
    assert _bss_details(backend, job_id)["TimeLimit"] == limit
    assert _wait_final(backend, job_id).state == RunState.FINISHED


@pytest.mark.parametrize(
    ("run_name", "shown"),
    [("weather-forecast_v2 #3", "weather.forecast.v2.3"), ("ÄÖÜ", "mantik"), ("t", "t")],
)
def test_the_site_shows_the_run_name_as_the_batch_job_name(
    unicore_site, unicore_password, tmp_path, run_name, shown
):
    # UNICORE's Slurm TSI keeps only 0-9a-zA-Z.:=~/ in a job name and makes any other
    # name UNICORE_job; a run's name nearly always holds a - or _.
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    job = dataclasses.replace(_prepared(tmp_path, "true\n"), job_name=safe_job_name(run_name))
    job_id = backend.submit(job)
    assert _bss_details(backend, job_id)["JobName"] == shown
    assert unicore_site.jobs[job_id].description["Name"] == shown
    assert _wait_final(backend, job_id).state == RunState.FINISHED


_SCONTROL = (
    "Detailed job information from batch system: JobId=4711 JobName=run\n"
    "   JobState={state} Reason={reason} Dependency=(null)\n"
    "   RunTime=01:00:03 TimeLimit=01:00:00 TimeMin=N/A\n"
    "   NodeList=jwc00n001\n"
    "   MinCPUsNode=1 MinMemoryNode=20G MinTmpDiskNode=0"
)


@pytest.mark.parametrize(
    ("bss_state", "state", "reason"),
    [
        ("TIMEOUT", RunState.FAILED, "Slurm ended the job: time limit of 01:00:00 reached."),
        ("NODE_FAIL", RunState.FAILED, "Slurm ended the job: node jwc00n001 failed."),
        ("OUT_OF_MEMORY", RunState.FAILED, "Slurm ended the job: out of memory (the job used "
         "more than the 20G it asked for, Resources.MemoryPerNode)."),
        ("PREEMPTED", RunState.FAILED, "Slurm ended the job: a job of higher priority"),
        ("CANCELLED", RunState.KILLED, "CANCELLED"),
        ("COMPLETED", RunState.FAILED, "Job did not complete normally on BSS, please check"),
        (None, RunState.FAILED, "Job did not complete normally on BSS, please check"),
    ],
)  # fmt: skip
def test_state_of_a_job_the_batch_system_ended(bss_state, state, reason):
    # UNICORE's words for it; the batch system's own were the bare state (TIMEOUT).
    message = "Job did not complete normally on BSS, please check\nmore"
    line = _SCONTROL.format(state=bss_state, reason="TimeLimit") if bss_state else "Running"
    result = decide("FAILED", message, None, bss_details(line))
    assert result.state == state and (result.reason or "").startswith(reason), result


def test_a_denied_access_is_not_a_refused_login(unicore_site, unicore_password, tmp_path):
    # Both are a 403 at UNICORE; only a credential the site cannot verify is a login error.
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    job_id = backend.submit(_prepared(tmp_path, "ln -s /etc/hostname outside\n"))
    assert _wait_final(backend, job_id).state == RunState.FINISHED
    with pytest.raises(PermissionDenied, match="denied access while looking at outside"):
        backend.open_file(job_id, "outside")
    assert backend.states([job_id])[job_id].state == RunState.FINISHED


def test_a_wrong_unicore_api_url_says_what_it_should_be(unicore_site, unicore_password):
    for url in (
        unicore_site.base_url.replace("/rest/core", ""),
        unicore_site.base_url.replace("STANDIN-SITE", "NO-SUCH-SITE"),
    ):
        backend = UnicoreBackend(url, username=USER, password=unicore_password)
        with pytest.raises(ConfigError, match=r"UnicoreApiUrl .*\.\.\./rest/core") as err:
            backend.states(["a-job"])
        assert url in err.value.message


def test_a_job_that_waits_for_good_in_the_batch_system_says_why(
    unicore_site, unicore_password, tmp_path, monkeypatch
):
    """A site without EnforcePartLimits lets Slurm take a job asking for more nodes than
    the partition has; it pends for good (Reason=PartitionNodeLimit). UNICORE says only
    QUEUED; the Slurm backend says why, and now so does this one (/details, asked at
    most every DETAILS_INTERVAL: each ask runs scontrol on the site)."""
    monkeypatch.setattr(unicore_module, "DETAILS_INTERVAL", 5.0)
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    config = parse_config(
        {"UnicoreApiUrl": unicore_site.base_url, "Resources": {"Queue": "batch", "Nodes": 12}}
    )
    job_id = backend.submit(dataclasses.replace(_prepared(tmp_path, "true\n"), config=config))
    deadline = time.monotonic() + 20
    while not (status := backend.states([job_id])[job_id]).reason:
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert status.state == RunState.QUEUED
    assert "waiting for good (Slurm: PartitionNodeLimit)" in status.reason
    assert "Resources.Nodes is more than the partition allows" in status.reason
    assert "sinfo" not in status.reason  # no shell on the cluster to run it in
    # Asked again only after DETAILS_INTERVAL, not at every state query.
    before = len(unicore_site.requests)
    for _ in range(3):
        assert backend.states([job_id])[job_id].reason == status.reason
    assert not [r for r in unicore_site.requests[before:] if r[1].endswith("/details")]
    backend.cancel(job_id)
    assert _wait_final(backend, job_id).state == RunState.KILLED


def test_http_for_a_site_that_serves_https_says_to_write_https(
    tmp_path, unicore_password, monkeypatch
):
    """A UNICORE site listens with TLS only: plain HTTP to it is dropped (a reset or a
    connection closed without an answer), which said only 'Connection reset by peer'."""
    cert, key = _self_signed(tmp_path)
    site = UnicoreStandin(tmp_path / "site", users={USER: unicore_password}, tls=(cert, key))
    site.start()
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        plain = site.base_url.replace("https://", "http://")
        backend = UnicoreBackend(plain, username=USER, password=unicore_password, timeout=5)
        with pytest.raises(BackendUnavailable) as err:
            backend.states(["a-job"])
        assert f"set UnicoreApiUrl to {site.base_url}" in err.value.message
        assert unicore_password not in err.value.message
        fixed = UnicoreBackend(site.base_url, username=USER, password=unicore_password)
        assert fixed.states(["a-job"])["a-job"].native_state == "NOT_FOUND"
    finally:
        site.close()


def test_a_unicore_api_url_that_redirects_names_where_it_points(unicore_site, unicore_password):
    """The site's web server on http:// (or a page moved elsewhere) answers with a
    redirect; it said 'failed while logging in: HTTPStatusError: Redirect response ...'
    with a link to MDN. The redirect is not followed: the credential stays here."""
    target = unicore_site.base_url.replace("http://", "https://")

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(301)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/JUWELS/rest/core"
        backend = UnicoreBackend(url, username=USER, password=unicore_password)
        with pytest.raises(ConfigError) as err:
            backend.check_credentials()
        assert f"UnicoreApiUrl {url}" in err.value.message
        assert f"redirects to {target} (301)" in err.value.message
    finally:
        server.shutdown()
        server.server_close()


def test_logs_of_a_run_whose_job_the_site_removed_come_from_mlflow(
    service, project, unicore_site, experiment_name
):
    # UNICORE sites delete a job and its directory some time after it ended.
    info = service.submit(project, params={"epochs": "2"}, experiment_name=experiment_name)
    assert wait_for(service, info.run_id, FINAL, timeout=60).state == RunState.FINISHED
    text = service.all_logs(info.run_id).text
    assert "epoch 2/2" in text
    job = unicore_site.jobs.pop(info.job_id)
    shutil.rmtree(job.workdir)
    fresh = RunService(service.tracking, work_dir=service.work_dir)
    try:
        for svc in (service, fresh):
            assert svc.all_logs(info.run_id).text == text
    finally:
        fresh.close()


def _wait_for_status(site: UnicoreStandin, job_id: str, *statuses: str) -> None:
    deadline = time.monotonic() + 60
    while site.jobs[job_id].status not in statuses:
        assert time.monotonic() < deadline, site.jobs[job_id].status
        time.sleep(0.1)


def _delete_at_the_site(site: UnicoreStandin, job_id: str, password: str) -> None:
    """What a site does when a job's lifetime ends (DELETE /jobs/{id}: abort, then the
    job and its directory are gone)."""
    UnicoreBackend(site.base_url, username=USER, password=password)._job(job_id).delete()
    assert job_id not in site.jobs


def test_a_run_whose_job_the_site_deleted_while_it_ran_ends(
    service, project, unicore_site, unicore_password, experiment_name
):
    """It stayed UNKNOWN ('the backend does not know job X (any more)') and RUNNING in
    MLflow for good, asked at every sync, and `mantik runs cancel` said 'Cancelled run
    ...: UNKNOWN' without ending it."""
    info = service.submit(
        project, entry_point="sleep", params={"seconds": "60"}, experiment_name=experiment_name
    )
    assert info.job_id is not None
    _wait_for_status(unicore_site, info.job_id, "RUNNING")
    _delete_at_the_site(unicore_site, info.job_id, unicore_password)
    final = service.get(info.run_id)
    assert final.state == RunState.FAILED, final.tags
    assert final.mlflow_status == "FAILED" and final.end_time is not None
    assert final.reason is not None and f"deleted job {info.job_id}" in final.reason


def test_a_finished_run_whose_job_the_site_deleted_before_the_sync_keeps_its_status(
    service, project, unicore_site, unicore_password, experiment_name
):
    """The entry point ended its MLflow run FINISHED; the site deleted the job (its
    lifetime ended) before anyone synced the run: that status and end time stand."""
    info = service.submit(project, params={"epochs": "2"}, experiment_name=experiment_name)
    assert info.job_id is not None
    _wait_for_status(unicore_site, info.job_id, "SUCCESSFUL", "FAILED")
    ended = service._api().get_run(info.run_id)["info"]  # as the entry point left it
    assert ended["status"] == "FINISHED"
    _delete_at_the_site(unicore_site, info.job_id, unicore_password)
    final = service.get(info.run_id)
    assert final.state == RunState.FINISHED, final.tags
    assert final.mlflow_status == "FINISHED" and final.reason is None
    assert final.end_time == int(ended["end_time"])
    assert {"loss", "rmse"} <= set(final.metrics)


def test_a_unicore_run_no_one_followed_ends_when_its_job_did(
    service, project, unicore_site, unicore_password, experiment_name
):
    """A run whose job ended while no one followed it (the lab closed overnight) ended at
    the sync that learnt of it, and had no running time: a 2 s job read 'ran 9 s' and
    more the later one looked. The exit-code file's time (UNICORE file properties, with
    their UTC offset) and UNICORE's consumedTime.main say when the job script ran."""
    info = service.submit(
        project, entry_point="sleep", params={"seconds": "2"}, experiment_name=experiment_name
    )
    assert info.job_id is not None
    job = unicore_site.jobs[info.job_id]
    deadline = time.monotonic() + 60
    while job.status not in ("SUCCESSFUL", "FAILED"):
        assert time.monotonic() < deadline, job.status
        time.sleep(0.1)
    job_end = (job.workdir / "mantik.exitcode").stat().st_mtime * 1000
    main = job.times["end_main"] - job.times["start_main"]
    time.sleep(4)  # the run's own sync learns of the end this late
    final = service.get(info.run_id)
    assert final.state == RunState.FINISHED, final.tags
    assert final.end_time is not None
    # UNICORE's times have whole seconds.
    assert abs(final.end_time - job_end) < 1500, (final.end_time, job_end)
    assert final.running_since is not None
    ran = (final.end_time - final.running_since) / 1000
    assert abs(ran - main) < 1.5, (ran, main)


def test_a_missing_unicore_credential_creates_no_run(service, project, monkeypatch):
    for name in ("MANTIK_UNICORE_USERNAME", "MANTIK_UNICORE_PASSWORD", "MANTIK_UNICORE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(AuthenticationFailed, match="MANTIK_UNICORE_USERNAME"):
        service.submit(project, experiment_name="unicore-no-credential")
    with pytest.raises(NotFound, match="No experiment named"):  # nothing was created
        service.list(experiment_name="unicore-no-credential")


def test_polling_a_site_keeps_its_connections_and_one_security_session(
    unicore_site, unicore_password, tmp_path
):
    # The sidebar polls states and logs all along. Each new connection costs a TLS
    # handshake and, in httpx, a new SSL context with the whole CA bundle (about 25 ms
    # of CPU). A call with the credential makes a new session at the site, which keeps
    # 5 a user: log reads that each logged in anew pushed out the other calls' session.
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    job_id = backend.submit(_prepared(tmp_path, "echo hi\n"))
    _wait_final(backend, job_id)
    connections, logins = unicore_site.connections, unicore_site.credential_logins
    for _ in range(10):
        backend.states([job_id])
        backend.read_log(job_id)
        backend.list_files(job_id)
    assert unicore_site.connections - connections <= 2
    assert unicore_site.credential_logins - logins <= 1
    # A session the site dropped: the read is sent again with the credential.
    unicore_site.expire_sessions()
    before = unicore_site.credential_logins
    for _ in range(3):
        assert backend.read_log(job_id)[0] == b"hi\n"
    assert unicore_site.credential_logins - before == 1


def test_a_wrong_unicore_credential_creates_no_run(service, project, unicore_site, monkeypatch):
    # A wrong password or a revoked token is a credential the backend cannot judge by
    # itself: the site is asked before the run is created, so no FAILED run is left.
    monkeypatch.setenv("MANTIK_UNICORE_PASSWORD", "not-the-password")
    with pytest.raises(AuthenticationFailed, match="refused the login of user 'alice'") as err:
        service.submit(project, experiment_name="unicore-wrong-password")
    assert unicore_site.base_url in err.value.message
    assert "MANTIK_UNICORE_PASSWORD" in err.value.message
    assert "not-the-password" not in err.value.message
    with pytest.raises(NotFound, match="No experiment named"):
        service.list(experiment_name="unicore-wrong-password")

    token = unicore_site.add_token(USER)
    del unicore_site.tokens[token]  # revoked
    monkeypatch.setenv("MANTIK_UNICORE_TOKEN", token)
    with pytest.raises(AuthenticationFailed, match="refused the access token.*UNICORE_TOKEN"):
        service.submit(project, experiment_name="unicore-revoked-token")
    with pytest.raises(NotFound, match="No experiment named"):
        service.list(experiment_name="unicore-revoked-token")


def test_an_unreachable_unicore_site_creates_no_run(service, project, unicore_site):
    url = f"http://127.0.0.1:{free_port()}/{unicore_site.site}/rest/core"
    write_config(project, unicore_config(unicore_site, UnicoreApiUrl=url))
    with pytest.raises(BackendUnavailable, match=f"Cannot reach the UNICORE site {url}"):
        service.submit(project, experiment_name="unicore-unreachable")
    with pytest.raises(NotFound, match="No experiment named"):
        service.list(experiment_name="unicore-unreachable")


def test_checking_the_login_costs_one_call_and_the_submission_reuses_it(
    unicore_site, unicore_password, tmp_path
):
    backend = UnicoreBackend(unicore_site.base_url, username=USER, password=unicore_password)
    site_path = f"/{unicore_site.site}/rest/core"
    before = len(unicore_site.requests)
    backend.check_credentials()
    assert unicore_site.requests[before:] == [("GET", site_path)]
    session = backend.client().transport.last_session_id
    assert session in unicore_site.sessions
    before, used = len(unicore_site.requests), unicore_site.session_used[session]
    backend.submit(_prepared(tmp_path, "echo hi\n"))
    # The submission logs in no more, and goes on in the session of the check.
    assert ("GET", site_path) not in unicore_site.requests[before:]
    assert unicore_site.session_used[session] > used
    # A login made earlier is asked again (one call, in its session): the password may
    # have been changed at the site since.
    before = len(unicore_site.requests)
    backend.check_credentials()
    assert len(unicore_site.requests) - before == 1
    unicore_site.users[USER] = "changed-at-the-site"
    unicore_site.expire_sessions()
    try:
        with pytest.raises(AuthenticationFailed, match="refused the login of user 'alice'"):
            backend.check_credentials()
    finally:
        unicore_site.users[USER] = unicore_password


def test_a_token_that_expired_since_the_login_is_checked_again(unicore_site, monkeypatch):
    def jwt(expires: float) -> str:
        claims = json.dumps({"exp": expires}).encode()
        token = f"e30.{base64.urlsafe_b64encode(claims).decode().rstrip('=')}.c2ln"
        unicore_site.tokens[token] = (USER, time.time() + 3600)  # the site still takes it
        return token

    for name in ("MANTIK_UNICORE_USERNAME", "MANTIK_UNICORE_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MANTIK_UNICORE_TOKEN", jwt(time.time() + 1))
    backend = UnicoreBackend(unicore_site.base_url)
    backend.client()  # logged in, as for a submission
    time.sleep(1.2)
    with pytest.raises(AuthenticationFailed, match="expired at"):
        backend.check_credentials()
    renewed = jwt(time.time() + 3600)
    monkeypatch.setenv("MANTIK_UNICORE_TOKEN", renewed)
    backend.check_credentials()  # the renewed token, without a restart
    assert backend.client().transport.credential.token == renewed
