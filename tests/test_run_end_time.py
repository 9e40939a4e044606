"""A run whose job ended while no one followed it (the lab closed overnight, a script that
never ends its MLflow run) ends when its job did, not at the sync that learnt of it: a
12 s Slurm job read 'ran 19 min'. Real MLflow server, local jobs, the loopback Slurm."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from mantik_jupyter.compute.states import RunState

from .runs_helpers import (
    cluster_backend,
    copy_example,
    remote_run_dirs,
    slurm_config,
    write_config,
)

LOCAL_CONFIG = {"Local": {}, "Resources": {"Queue": "local"}, "Environment": {"Python": sys.prefix}}
UNFOLLOWED = 4.0  # seconds between the job's end and the sync that learns of it


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "endtime")


def wait_until(check, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return found


def test_a_local_run_ends_when_its_job_did(service, tmp_path, experiment_name):
    project = copy_example(tmp_path)
    write_config(project, LOCAL_CONFIG)
    info = service.submit(
        project, entry_point="sleep", params={"seconds": "1"}, experiment_name=experiment_name
    )
    ended = Path(info.tags["mantik.run_dir"]) / "mantik.ended"
    wait_until(ended.exists)
    job_end = ended.stat().st_mtime_ns // 1_000_000
    time.sleep(UNFOLLOWED)
    final = service.get(info.run_id)
    assert final.state == RunState.FINISHED
    assert final.end_time is not None
    assert abs(final.end_time - job_end) < 1000, (final.end_time, job_end)
    assert time.time() * 1000 - final.end_time > (UNFOLLOWED - 0.5) * 1000


def test_a_slurm_run_ends_when_its_job_did(
    service, tmp_path, slurm_cluster, remote_base, experiment_name
):
    project = copy_example(tmp_path)
    write_config(project, slurm_config(slurm_cluster, remote_base))
    info = service.submit(
        project, entry_point="sleep", params={"seconds": "1"}, experiment_name=experiment_name
    )
    # Another client watches the job, so the run's own sync learns of the end late.
    watcher = cluster_backend(slurm_cluster, remote_base)
    try:
        assert info.job_id is not None
        status = wait_until(
            lambda: (s := watcher.states([info.job_id])[info.job_id]).state.is_final and s
        )
    finally:
        watcher.close()
    assert status.state == RunState.FINISHED and status.ended_at is not None
    time.sleep(UNFOLLOWED)
    final = service.get(info.run_id)
    assert final.state == RunState.FINISHED
    assert final.end_time is not None
    # Slurm's End has whole seconds.
    assert abs(final.end_time - status.ended_at) < 1500, (final.end_time, status.ended_at)
    assert time.time() * 1000 - final.end_time > (UNFOLLOWED - 1.5) * 1000
    assert final.running_since is not None and final.running_since <= final.end_time
