"""Following a run that waits in the queue asks the cluster less and less often: a log
follower asked squeue every 2 s and read the log every poll interval for the hours a job
may wait; ``submit --wait --json`` asked every 2 s, ``run.wait()`` and a notebook's live
line every poll interval. Real MLflow server and the loopback Slurm (a job that stays
pending)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from mantik_jupyter import cli
from mantik_jupyter.compute.run_pace import SyncPace
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.magics.display import LivePoller, Run, watch

from .runs_helpers import copy_example, remote_run_dirs, slurm_config, write_config
from .test_live_poller import Line, wait_until


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

    # The other followers, each in a thread of its own name, counted by it.
    asked: Counter[str] = Counter()
    real_sync = service._sync.sync_runs

    def counted_states(*args, **kwargs):
        asked[threading.current_thread().name] += 1
        return real_sync(*args, **kwargs)

    service._sync.sync_runs = counted_states
    run = Run(service, info, "http://mlflow/run")
    ended: dict[str, object] = {}

    def waiting(name: str, wait) -> None:
        ended[name] = wait()

    followers = {
        "run.wait": lambda: watch(service, run, Line(), poll=0.2),
        "submit --wait": lambda: cli._wait(SimpleNamespace(runs=service), info.run_id),
    }
    threading.Thread(target=follow, daemon=True).start()
    for name, wait in followers.items():
        threading.Thread(target=waiting, args=(name, wait), name=name, daemon=True).start()
    poller, line = LivePoller(), Line()
    poller.add(service, Run(service, info, "http://mlflow/run"), line, 0.2)
    try:
        time.sleep(20)
        assert service.get(info.run_id, refresh=False).state == RunState.QUEUED
        # At the old pace: 10 state queries and 100 log reads in 20 s.
        assert calls["sync"] <= 6, calls
        assert calls["log"] <= 20, calls
        # At the old pace: 100 each for the live line and run.wait(), 10 for submit --wait.
        assert asked[LivePoller.THREAD_NAME] <= 12, asked
        assert asked["run.wait"] <= 12, asked
        assert asked["submit --wait"] <= 6, asked
        # The lab's unattended sync backs off the same way while all its runs wait, and
        # comes back to its interval on a change.
        pace = SyncPace(0.2)
        delays = [pace.after(service.sync([info.run_id])) for _ in range(3)]
        assert delays == [0.2, pytest.approx(0.3), pytest.approx(0.45)], delays
    finally:
        service.cancel(info.run_id)
    assert pace.after(service.sync([info.run_id])) == 0.2  # KILLED: a change
    # A cancel from the notebook shows on its live lines at once.
    poller.ask_soon(info.run_id)
    wait_until(lambda: "KILLED" in line.texts[-1], 3)
    # The followers still learn of the end, within their longest pause.
    assert done.wait(60), "the follower did not see the run end"
    wait_until(lambda: len(ended) == 2, 60)
    assert all(e.state == RunState.KILLED for e in ended.values()), ended  # type: ignore[attr-defined]
