"""Following the log of a run that waits in the queue asks the cluster less and less
often: it asked squeue every 2 s and read the log every poll interval for the hours a
job may wait. Real MLflow server and the loopback Slurm (a job that stays pending)."""

from __future__ import annotations

import threading
import time

import pytest

from mantik_jupyter.compute.states import RunState

from .runs_helpers import copy_example, remote_run_dirs, slurm_config, write_config


@pytest.fixture(scope="module")
def remote_base(slurm_cluster):
    yield from remote_run_dirs(slurm_cluster, "follow")


def test_following_a_queued_run_backs_off_and_still_sees_it_end(
    service, tmp_path, slurm_cluster, remote_base, experiment_name
):
    project = copy_example(tmp_path)
    # More nodes than the cluster has: Slurm keeps the job pending for good.
    write_config(project, slurm_config(slurm_cluster, remote_base, Nodes=5))
    info = service.submit(project, params={"epochs": "1"}, experiment_name=experiment_name)
    calls = {"sync": 0, "log": 0}
    logs = service._logs
    sync, read = logs._sync_runs, logs._read_log

    def counted_sync(*args, **kwargs):
        calls["sync"] += 1
        return sync(*args, **kwargs)

    def counted_read(*args, **kwargs):
        calls["log"] += 1
        return read(*args, **kwargs)

    logs._sync_runs, logs._read_log = counted_sync, counted_read
    done = threading.Event()
    text: list[str] = []

    def follow() -> None:
        text.extend(service.follow_logs(info.run_id, poll_interval=0.2))
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    try:
        time.sleep(20)
        assert service.get(info.run_id, refresh=False).state == RunState.QUEUED
        # At the old pace: 10 state queries and 100 log reads in 20 s.
        assert calls["sync"] <= 6, calls
        assert calls["log"] <= 20, calls
    finally:
        service.cancel(info.run_id)
    # The follower still learns of the end, within its longest pause.
    assert done.wait(60), "the follower did not see the run end"
