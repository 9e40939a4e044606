"""Shared pieces of the RunService lifecycle tests (local, Slurm and UNICORE backends)."""

from __future__ import annotations

import gzip
import io
import shutil
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from mantik_jupyter.compute import run_submit
from mantik_jupyter.compute.backends.ssh_slurm import SshSlurmBackend
from mantik_jupyter.compute.run_record import RunInfo
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.tracking.credentials import Credential, CredentialStore
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.runs_api import RunsApi
from mantik_jupyter.tracking.service import TrackingService

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "weather-forecast"
FINAL = {RunState.FINISHED, RunState.FAILED, RunState.KILLED}
# What a finished run of the example stores in MLflow (besides its metrics).
RUN_ARTIFACTS = {
    "mantik/code.tar.gz",
    "mantik/backend-config.json",
    "mantik/mantik-job.sh",
    "mantik/mantik.log",
    "forecast.csv",
}


def copy_example(dest: Path) -> Path:
    project = dest / "weather-forecast"
    shutil.copytree(EXAMPLE, project)
    (project / "compute-backend-config.yaml").unlink()
    return project


BIG_LOG_WRITER = """\
import os, sys
sys.stdout.flush()
# Up to one byte short of 4 MiB (one log read), then 4-byte characters: the read size
# falls inside the first one.
ascii_part = 4 * 1024 * 1024 - 1 - os.fstat(1).st_size
sys.stdout.buffer.write(b"a" * ascii_part + "\U0001f3c3".encode() * 1000 + b"\\nend\\n")
sys.stdout.flush()
"""


# The local backend, running jobs with this Python (it has MLflow and mantik).
LOCAL_CONFIG = {"Local": {}, "Resources": {"Queue": "local"}, "Environment": {"Python": sys.prefix}}


def script_project(dest: Path, name: str, script: str, config: dict) -> Path:
    """A project ``dest/name`` whose main entry point runs ``script`` (its text)."""
    project = dest / name
    project.mkdir()
    (project / "MLproject").write_text(
        f"name: {name}\nentry_points:\n  main:\n    command: python main.py\n"
    )
    (project / "main.py").write_text(script)
    write_config(project, config)
    return project


def big_log_project(dest: Path, config: dict) -> Path:
    """A project whose run logs more than one read (4 MiB), a character cut by the read."""
    return script_project(dest, "big-log", BIG_LOG_WRITER, config)


def write_config(project: Path, config: dict, name: str = "compute-backend-config.yaml") -> Path:
    path = project / name
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def slurm_config(cluster, remote_base: str, *, variables=None, **resources) -> dict:
    """A compute-backend config for the loopback Slurm cluster, over SSH."""
    environment: dict = {"Python": str(Path(cluster.python).parent.parent)}
    if variables is not None:
        environment["Variables"] = variables
    return {
        "SSH": {
            "Hostname": cluster.host,
            "Port": cluster.port,
            "Username": cluster.username,
            "IdentityFile": str(cluster.key_path),
            "KnownHostsFile": str(cluster.known_hosts),
            "RemoteDirectory": remote_base,
        },
        "Resources": {"Queue": "debug", **resources},
        "Environment": environment,
    }


def cluster_backend(cluster, remote_dir: str) -> SshSlurmBackend:
    """A Slurm-over-SSH backend of the loopback cluster, beside the one a test's runs use."""
    return SshSlurmBackend(
        cluster.host,
        cluster.port,
        cluster.username,
        key_filename=str(cluster.key_path),
        known_hosts=cluster.known_hosts,
        remote_dir=remote_dir,
    )


def remote_run_dirs(cluster, prefix: str, *, start_sshd: bool = False) -> Iterator[str]:
    """A fresh directory below the cluster's remote directory, removed afterwards
    (``yield from`` it in a fixture). ``start_sshd``: start sshd again before the clean-up,
    for modules whose tests stop it."""
    base = f"{cluster.remote_dir}/{prefix}-{uuid.uuid4().hex[:8]}"
    yield base
    cleaner = cluster_backend(cluster, base)
    try:
        if start_sshd:
            cluster.sshd("start")
        cleaner._run(f"rm -rf {base}", "cleaning up")
    finally:
        cleaner.close()


def unicore_config(site, **extra) -> dict:
    """A compute-backend config for the UNICORE stand-in site; ``extra`` replaces sections."""
    config = {
        "UnicoreApiUrl": site.base_url,
        "Resources": {"Queue": "batch", "Runtime": "10m", "Nodes": 1, "MemoryPerNode": "2G"},
        "Environment": {"Python": sys.prefix},
    }
    config.update(extra)
    return config


class RunUserSpy:
    """Records the per-run credentials the service creates (the tests need the passwords).

    The user is made while the run is created, so it is matched to its run afterwards,
    through the run's ``mantik.run_user`` tag: ``created`` maps run id -> credential."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._made: list[tuple[TrackingClient, str, Credential]] = []
        original = run_submit.create_run_user

        def spy(admin, username, experiment_id):
            cred = original(admin, username, experiment_id)
            self._made.append((admin, str(experiment_id), cred))
            return cred

        monkeypatch.setattr(run_submit, "create_run_user", spy)

    @property
    def made(self) -> list[Credential]:
        """Every per-run credential made, also for a run whose creation then failed."""
        return [cred for _, _, cred in self._made]

    @property
    def created(self) -> dict[str, Credential]:
        out: dict[str, Credential] = {}
        for admin, experiment_id, cred in self._made:
            runs, _ = RunsApi(admin).search_runs(
                [experiment_id],
                filter_string=f"tags.`mantik.run_user` = '{cred.username}'",
            )
            for run in runs:
                out[run["info"]["run_id"]] = cred
        return out


def make_tracking(server, tmp: Path, user: Credential) -> TrackingService:
    """Embedded mode against the fixture server: the admin makes per-run users,
    the stored login of ``user`` submits."""
    store = CredentialStore(tmp / "credentials.json")
    store.set(server.uri, user)
    return TrackingService(store, tracking_uri=server.uri, embedded_credential=server.admin)


def admin_api(server) -> RunsApi:
    return RunsApi(TrackingClient(server.uri, server.admin))


def wait_for(
    service: RunService, run_id: str, states: set[RunState], timeout: float = 90
) -> RunInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = service.get(run_id)
        if info.state in states:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} stayed {info.state} ({info.tags})")
        time.sleep(0.5)


def run_failing_entry_point(
    service: RunService, project: Path, experiment: str, timeout: float
) -> RunInfo:
    """Submit the example's ``fail`` entry point (exits 3) and check how it ended."""
    info = service.submit(project, entry_point="fail", experiment_name=experiment)
    final = wait_for(service, info.run_id, FINAL, timeout=timeout)
    assert final.state == RunState.FAILED and final.mlflow_status == "FAILED"
    assert final.exit_code == 3 and final.reason == "exit code 3"
    return final


def artifact_bytes(server, run_id: str, path: str) -> bytes:
    api = admin_api(server)
    return b"".join(api.download_artifact(api.get_run(run_id), path))


def artifact_names(server, run_id: str, path: str = "") -> set[str]:
    api = admin_api(server)
    names = set()
    for entry in api.list_artifacts(run_id, path):
        if entry.get("is_dir"):
            names |= artifact_names(server, run_id, entry["path"])
        else:
            names.add(entry["path"])
    return names


def login_works(server, cred: Credential) -> bool:
    resp = requests.post(
        f"{server.uri}/api/2.0/mlflow/experiments/search",
        json={"max_results": 1},
        auth=(cred.username, cred.password),
        timeout=30,
    )
    return resp.status_code == 200


def assert_no_secret(server, run_id: str, secrets: list[str]) -> None:
    """No secret in any tag, param or artifact (archives are looked into)."""
    api = admin_api(server)
    run = api.get_run(run_id)
    blobs = [repr(run["data"]).encode()]
    for name in artifact_names(server, run_id):
        data = artifact_bytes(server, run_id, name)
        blobs.append(data)
        if name.endswith(".tar.gz"):
            blobs.append(gzip.decompress(data))
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        f = tar.extractfile(member)
                        assert f is not None
                        blobs.append(f.read())
    for secret in secrets:
        assert secret
        for blob in blobs:
            assert secret.encode() not in blob
