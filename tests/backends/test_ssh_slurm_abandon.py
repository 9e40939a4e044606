"""An abandoned Slurm-over-SSH submission stops what its PreRunCommandOnLoginNode started
in a session of its own, on the loopback cluster (whose login node is this machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mantik_jupyter.compute.backends.ssh_slurm import SUBMISSION_ENV, SshSlurmBackend
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import BackendRejected, BackendUnavailable

from .test_ssh_slurm import FINAL, _session_pids, make_job, wait_for
from .test_ssh_slurm_login import (
    _config,
    _interrupt_main_when,
    module_backend,
    submit_and_die,
    submit_in_thread,
    with_config,
)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def backend(slurm_cluster) -> Iterator[SshSlurmBackend]:
    yield from module_backend(slurm_cluster, "test-abandon")


def _pause() -> str:
    """A sleep time that only this test's processes use (found by their command line)."""
    return f"{600 + uuid.uuid4().int % 1000 / 1000:.3f}"


def _escaping(pause: str) -> str:
    """A login-node command that leaves a child in a session of its own (as ``setsid``,
    ``nohup ... &`` under setsid, or a daemon does) and records its pid."""
    return f"setsid sleep {pause} </dev/null >/dev/null 2>&1 & echo $! > escaped.pid"


def _stat(pid: str) -> str:
    """ps's state letters; "" once the process is gone. The container's init does not
    reap, so a killed process whose parent left stays a zombie (Z): "kill -0" succeeds."""
    done = subprocess.run(["ps", "-o", "stat=", "-p", pid], capture_output=True, text=True)
    return done.stdout.strip()


def _session(pid: str) -> str:
    done = subprocess.run(["ps", "-o", "sid=", "-p", pid], capture_output=True, text=True)
    return done.stdout.strip()


def _alive(pid: str) -> bool:
    state = _stat(pid)
    return bool(state) and not state.startswith("Z")


def _start_bystanders(backend: SshSlurmBackend, pause: str) -> list[str]:
    """Processes of the same user with the same command line as the escaped child: one
    plain, one of another submission (its own token): none of them may be stopped."""
    other = f"{SUBMISSION_ENV}={uuid.uuid4().hex}"
    started = backend._run(
        f"setsid sleep {pause} </dev/null >/dev/null 2>&1 & echo $!; "
        f"{other} setsid sleep {pause} </dev/null >/dev/null 2>&1 & echo $!",
        "starting the user's other processes",
    )
    pids = started.stdout.decode().split()
    assert len(pids) == 2 and all(_alive(pid) for pid in pids), pids
    return pids


def _wait_for_file(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return path.read_text().strip()


def _assert_only_the_escaped_stopped(escaped: str, bystanders: list[str]) -> None:
    # It had left the submit command's session and process group: only its environment
    # still tied it to the submission.
    assert _session(escaped) == escaped
    assert not _alive(escaped), f"the escaped child {escaped} runs on: {_stat(escaped)!r}"
    for other in bystanders:
        assert _alive(other), f"the user's process {other} was stopped: {_stat(other)!r}"


def _stop(pids: list[str]) -> None:
    subprocess.run(["kill", "-s", "KILL", *pids], capture_output=True)


def test_ctrl_c_stops_what_the_pre_command_started_with_setsid(backend, tmp_path):
    # The kill of the submit command's process group missed a child that had left it:
    # `setsid sleep` ran on on the login node after the user gave the submission up.
    pause = _pause()
    name = f"mantik-abandon-{uuid.uuid4().hex[:8]}"
    config = _config(PreRunCommandOnLoginNode=f"{_escaping(pause)}; sleep 60")
    job = with_config(make_job(tmp_path, "true", name=name), config)
    run_dir = Path(backend.remote_base(), job.run_id)
    bystanders = _start_bystanders(backend, pause)
    escaped: list[str] = []
    started = threading.Event()

    def watch() -> None:
        escaped.append(_wait_for_file(run_dir / "escaped.pid"))
        started.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    interrupter = _interrupt_main_when(started, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            backend.submit(job)
        interrupter.join()
        watcher.join()
        _assert_only_the_escaped_stopped(escaped[0], bystanders)
        queued = backend._run(f"squeue -h -t all -n {name} -o %i", "checking the queue")
        assert queued.stdout.decode().strip() == ""
        assert not (run_dir / ".mantik-credentials").exists()
    finally:
        _stop([*escaped, *bystanders])


def test_a_lost_link_stops_what_the_pre_command_started_with_setsid(backend, tmp_path):
    pause = _pause()
    config = _config(PreRunCommandOnLoginNode=f"{_escaping(pause)}; sleep 60")
    job = with_config(make_job(tmp_path, "true"), config)
    run_dir = Path(backend.remote_base(), job.run_id)
    bystanders = _start_bystanders(backend, pause)
    thread, outcome = submit_in_thread(backend, job)
    escaped = ""
    try:
        escaped = _wait_for_file(run_dir / "escaped.pid")
        for pid in _session_pids(backend):
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], BackendUnavailable), outcome
        _assert_only_the_escaped_stopped(escaped, bystanders)
    finally:
        thread.join(60)
        _stop([p for p in [escaped, *bystanders] if p])


def test_a_stopped_submit_command_stops_what_the_pre_command_started(backend, tmp_path):
    # The same for a submit command that a signal stopped (a login node's limit on
    # process time): the submission is abandoned from the client after its end.
    pause = _pause()
    config = _config(PreRunCommandOnLoginNode=f"{_escaping(pause)}; kill -s TERM $PPID; sleep 1")
    job = with_config(make_job(tmp_path, "true"), config)
    run_dir = Path(backend.remote_base(), job.run_id)
    bystanders = _start_bystanders(backend, pause)
    escaped = ""
    try:
        with pytest.raises(BackendRejected) as caught:
            backend.submit(job)
        assert "was stopped (SIGTERM)" in caught.value.message
        escaped = _wait_for_file(run_dir / "escaped.pid")
        _assert_only_the_escaped_stopped(escaped, bystanders)
    finally:
        _stop([p for p in [escaped, *bystanders] if p])


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(backend, tmp_path):
    pause = _pause()
    # trap '' TERM: ignored, and inherited as ignored by the sleep it runs.
    ignoring = (
        f"setsid sh -c \"trap '' TERM; exec sleep {pause}\" </dev/null >/dev/null 2>&1 & "
        "echo $! > escaped.pid; kill -s TERM $PPID; sleep 1"
    )
    job = with_config(make_job(tmp_path, "true"), _config(PreRunCommandOnLoginNode=ignoring))
    run_dir = Path(backend.remote_base(), job.run_id)
    escaped = ""
    try:
        started = time.monotonic()
        with pytest.raises(BackendRejected):
            backend.submit(job)
        took = time.monotonic() - started
        escaped = _wait_for_file(run_dir / "escaped.pid")
        assert not _alive(escaped), f"the escaped child runs on: {_stat(escaped)!r}"
        # SIGTERM did nothing; SIGKILL came after the 5 s grace, not later.
        assert 5 <= took < 30, took
    finally:
        _stop([escaped] if escaped else [])


def test_a_killed_client_leaves_nothing_of_the_pre_command_running(
    backend, slurm_cluster, tmp_path
):
    # SIGKILL leaves the client no chance to abandon the submission: the submit command
    # stops itself at its next write to the closed channel, and now also what its
    # login-node command left running for a job that will never be queued.
    pause = _pause()
    job = make_job(tmp_path, "true", name=f"mantik-killed-{uuid.uuid4().hex[:8]}")
    pre = f"{_escaping(pause)}; touch pre-started; sleep 2; touch pre-ended"
    run_dir = Path(backend.remote_base(), job.run_id)
    bystanders = _start_bystanders(backend, pause)
    child = submit_and_die(backend, slurm_cluster, job, pre)
    escaped = ""
    try:
        escaped = _wait_for_file(run_dir / "escaped.pid")
        deadline = time.monotonic() + 30
        while not (run_dir / "pre-started").exists():
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.1)
        child.kill()
        child.wait()
        deadline = time.monotonic() + 20
        while _alive(escaped) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run_dir / "pre-ended").exists()
        _assert_only_the_escaped_stopped(escaped, bystanders)
        assert not (run_dir / ".mantik-credentials").exists()
    finally:
        child.kill()
        child.wait()
        _stop([p for p in [escaped, *bystanders] if p])


def test_the_token_reaches_the_login_command_but_not_the_job(backend, tmp_path):
    # The job inherits sbatch's environment: with the token it would be one of the
    # submission's processes (on a site whose login node runs jobs too).
    config = _config(
        PreRunCommandOnLoginNode=f'echo "login ${{{SUBMISSION_ENV}:-unset}}" > login.txt'
    )
    job = with_config(make_job(tmp_path, f'echo "job ${{{SUBMISSION_ENV}:-unset}}"'), config)
    job_id = backend.submit(job)
    assert wait_for(backend, job_id, FINAL).state == RunState.FINISHED
    login = b"".join(backend.open_file(job_id, "login.txt")).decode().split()
    assert login[0] == "login" and len(login[1]) == 32, login
    assert "job unset" in backend.read_log(job_id)[0].decode()
