"""Messages of the Slurm and UNICORE backends name the config file the run was submitted
with, as the user named it: they said "compute-backend-config.yaml" whatever the file, and
a user who submitted with ``--backend-config slurm.yml`` edited the wrong file."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import ConfigError, PermissionDenied

from .runs_helpers import (
    FINAL,
    copy_example,
    remote_run_dirs,
    slurm_config,
    unicore_config,
    wait_for,
)

DEFAULT = "compute-backend-config.yaml"


def write_config(folder: Path, config: dict, name: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML too
    return path


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "named")


@pytest.fixture
def project(tmp_path):
    return copy_example(tmp_path)


@pytest.fixture
def unwritable_dir():
    """A directory on the cluster that its SSH user may not write to (owned by root)."""
    path = f"/tmp/mantik-unwritable-{uuid.uuid4().hex[:8]}"
    subprocess.run(["install", "-d", "-m", "0755", path], check=True)
    yield path
    subprocess.run(["rm", "-rf", path], check=True)


@pytest.mark.slurm
@pytest.mark.parametrize("name", ["slurm.yml", "configs/juwels.json"])
def test_unwritable_remote_directory_names_the_config_used(
    service, project, slurm_cluster, unwritable_dir, name, experiment_name
):
    config = slurm_config(slurm_cluster, unwritable_dir)
    write_config(project, config, name)
    with pytest.raises(PermissionDenied) as caught:
        service.submit(
            project, backend_config=name, params={"epochs": "1"}, experiment_name=experiment_name
        )
    message = caught.value.message
    assert f"SSH.RemoteDirectory that this user may write to in {name}," in message, message
    assert DEFAULT not in message, message
    newest = service.list(experiment_name=experiment_name)[0][0]
    assert newest.state == RunState.FAILED and newest.reason and name in newest.reason
    assert newest.tags["mantik.config"] == name


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("folder", "name", "given", "named"),
    [
        # An absolute path into the project: named as the user sees the project.
        ("project", "configs/juwels.yml", True, "configs/juwels.yml"),
        # Found in the project, and not always .yaml: the .json is what the user edits.
        ("project", "compute-backend-config.json", False, "compute-backend-config.json"),
        ("elsewhere", "x.yml", True, None),  # None: its full path
    ],
)
def test_a_refused_partition_names_the_config_as_the_user_knows_it(
    service, project, tmp_path, slurm_cluster, remote_base, folder, name, given, named,
    experiment_name,
):  # fmt: skip
    base = project if folder == "project" else tmp_path / folder
    path = write_config(base, slurm_config(slurm_cluster, remote_base, Queue="nope"), name)
    with pytest.raises(ConfigError) as caught:
        service.submit(
            project,
            backend_config=str(path) if given else None,
            params={"epochs": "1"},
            experiment_name=experiment_name,
        )
    message = caught.value.message
    assert f"because of Resources.Queue 'nope' in {named or path}: sbatch" in message, message


def test_a_reason_from_the_job_state_names_the_config_the_run_used(
    service, project, unicore_site, unicore_login, monkeypatch, experiment_name
):
    # The backend learns of the time limit long after the submission (after a restart of
    # the lab, from the job id alone); the run's sync names the file.
    monkeypatch.setattr(unicore_site, "batch_minute", 2.0)  # Slurm's minute lasts 2 s here
    name = "sites/jureca.yml"
    config = unicore_config(unicore_site)
    config["Resources"]["Runtime"] = "00:00:02"
    write_config(project, config, name)
    info = service.submit(
        project,
        backend_config=name,
        entry_point="sleep",
        params={"seconds": "30"},
        experiment_name=experiment_name,
    )
    final = wait_for(service, info.run_id, FINAL, timeout=60)
    assert final.state == RunState.FAILED, final.tags
    assert f"Raise Resources.Runtime in {name} (at most" in (final.reason or ""), final.reason
