"""Environment.Pre/PostRunCommandOnLoginNode with Slurm over SSH, on the loopback cluster,
and on the Local backend."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mantik_jupyter.compute.backends.base import PreparedJob
from mantik_jupyter.compute.backends.local import LocalBackend
from mantik_jupyter.compute.backends.ssh_slurm import SshSlurmBackend
from mantik_jupyter.compute.config import ComputeConfig, parse_config
from mantik_jupyter.compute.layout import LOGIN_LOG_FILE
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import BackendRejected, BackendUnavailable, ConfigError

from .test_ssh_slurm import FINAL, _backend, _session_pids, make_job, wait_for

pytestmark = pytest.mark.slurm


def module_backend(cluster, prefix: str) -> Iterator[SshSlurmBackend]:
    """A backend with a fresh folder of run directories, removed afterwards."""
    path = f"{cluster.remote_dir}/{prefix}-{uuid.uuid4().hex[:8]}"
    b = _backend(cluster, path)
    yield b
    b._run(f"rm -rf {path}", "cleaning up")
    b.close()


@pytest.fixture(scope="module")
def backend(slurm_cluster) -> Iterator[SshSlurmBackend]:
    yield from module_backend(slurm_cluster, "test-login")


def _config(**environment) -> ComputeConfig:
    return parse_config(
        {"SSH": {"Hostname": "login"}, "Resources": {"Queue": "batch"}, "Environment": environment}
    )


def with_config(job: PreparedJob, config: ComputeConfig) -> PreparedJob:
    return dataclasses.replace(job, config=config)


def _local_config(**environment) -> ComputeConfig:
    return parse_config({"Local": {}, "Resources": {"Queue": "local"}, "Environment": environment})


def _read(backend: SshSlurmBackend, job_id: str, path: str) -> str:
    return b"".join(backend.open_file(job_id, path)).decode()


def test_pre_command_runs_on_the_login_node_before_sbatch(backend, tmp_path):
    marker = f"/tmp/mantik-pwned-{uuid.uuid4().hex}"
    config = _config(
        PreRunCommandOnLoginNode=[
            # In the run directory, after unpacking, knowing its run; quotes survive.
            'echo "pre in $(basename "$PWD") for $MANTIK_RUN_ID" > pre.txt',
            f"test -f code/main.py && echo 'it'\"'\"'s $(touch {marker})' >> pre.txt",
            "echo second command ran",
        ]
    )
    job = with_config(make_job(tmp_path, "cat pre.txt"), config)
    job_id = backend.submit(job)
    assert wait_for(backend, job_id, FINAL).state == RunState.FINISHED
    log = backend.read_log(job_id)[0].decode()
    # The job saw what the pre command left: it ran first, on the login node.
    assert f"pre in {job.run_id} for {job.run_id}" in log
    assert f"it's $(touch {marker})" in log
    assert not Path(marker).exists()
    # As on UNICORE, its output is in mantik-login.log of the run directory.
    assert LOGIN_LOG_FILE in [entry.path for entry in backend.list_files(job_id)]
    login_log = _read(backend, job_id, LOGIN_LOG_FILE)
    assert "[mantik] PreRunCommandOnLoginNode[0]" in login_log
    assert "second command ran" in login_log


@pytest.mark.parametrize("signal_name", ["TERM", "KILL"])
def test_a_submit_command_stopped_by_a_signal_says_so(backend, tmp_path, signal_name):
    # As a login node's limit on process time does: it read "sbatch on ... refused the job
    # of run ...: " with nothing after it, and sbatch had never run.
    name = f"mantik-stopped-{uuid.uuid4().hex[:8]}"
    # $PPID: the submit command's shell, which runs the login commands' bash.
    config = _config(PreRunCommandOnLoginNode=[f"kill -s {signal_name} $PPID; sleep 1"])
    job = with_config(make_job(tmp_path, "true", name=name), config)
    with pytest.raises(BackendRejected) as caught:
        backend.submit(job)
    message = caught.value.message
    assert f"The submit command of run {job.run_id} on" in message, message
    assert "was stopped (SIG" in message and "refused" not in message
    assert "PreRunCommandOnLoginNode" in message
    queued = backend._run(f"squeue -h -t all -n {name} -o %i", "checking the queue")
    assert queued.stdout.decode().strip() == ""
    with backend.files.shared() as sftp:
        names = sftp.listdir(f"{backend.remote_base()}/{job.run_id}")
    assert ".mantik-credentials" not in names


def submit_in_thread(
    backend: SshSlurmBackend, job: PreparedJob
) -> tuple[threading.Thread, list[BaseException]]:
    """``backend.submit(job)`` in a thread, started; what it raises lands in the list."""
    outcome: list[BaseException] = []

    def submit() -> None:
        try:
            backend.submit(job)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=submit)
    thread.start()
    return thread, outcome


def test_a_link_lost_while_the_submit_command_runs_is_a_lost_link(slurm_cluster, tmp_path):
    # The output ended with the link, and that read as "sbatch ... refused the job: ".
    b = _backend(slurm_cluster, f"{slurm_cluster.remote_dir}/lost-{uuid.uuid4().hex[:8]}")
    pause = f"{30 + uuid.uuid4().int % 1000 / 1000:.3f}"  # a sleep only this test runs
    job = with_config(
        make_job(tmp_path, "true"), _config(PreRunCommandOnLoginNode=f"sleep {pause}")
    )
    thread, outcome = submit_in_thread(b, job)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["pgrep", "-f", f"sleep {pause}"], capture_output=True).returncode:
            assert time.monotonic() < deadline, "the login command never started"
            time.sleep(0.1)
        for pid in _session_pids(b):
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], BackendUnavailable), outcome
        message = outcome[0].message
        assert message.startswith("Lost the SSH connection to") and "while submitting" in message
        assert "refused" not in message
    finally:
        subprocess.run(["pkill", "-f", f"sleep {pause}"], capture_output=True)
        thread.join(60)
        b.close()


def test_failing_pre_command_stops_the_submission(backend, tmp_path):
    name = f"mantik-pre-fails-{uuid.uuid4().hex[:8]}"
    config = _config(
        PreRunCommandOnLoginNode=["echo preparing; echo went wrong >&2; exit 7", "echo never"]
    )
    job = with_config(make_job(tmp_path, "true", name=name), config)
    with pytest.raises(BackendRejected) as caught:
        backend.submit(job)
    message = caught.value.message
    assert "PreRunCommandOnLoginNode" in message and "exit status 7" in message
    assert "went wrong" in message and LOGIN_LOG_FILE in message
    assert "never" not in message.split(LOGIN_LOG_FILE, 1)[1]
    # No job, and the credential the job script would have deleted is gone.
    queued = backend._run(f"squeue -h -t all -n {name} -o %i", "checking the queue")
    assert queued.stdout.decode().strip() == ""
    run_dir = f"{backend.remote_base()}/{job.run_id}"
    with backend.files.shared() as sftp:
        names = sftp.listdir(run_dir)
    assert ".mantik-credentials" not in names and LOGIN_LOG_FILE in names


def test_post_command_on_login_node_is_refused_for_ssh():
    with pytest.raises(ConfigError) as caught:
        _config(PostRunCommandOnLoginNode="echo done")
    message = caught.value.message
    assert "PostRunCommandOnLoginNode" in message and "UNICORE" in message
    assert "PostRunCommandOnComputeNode" in message


def test_no_login_commands_make_no_login_log(backend, tmp_path):
    job = with_config(make_job(tmp_path, "echo plain"), _config())
    job_id = backend.submit(job)
    assert wait_for(backend, job_id, FINAL).state == RunState.FINISHED
    assert LOGIN_LOG_FILE not in [entry.path for entry in backend.list_files(job_id)]


# ---- the same keys on the Local backend, whose login node is this machine ----------------


def test_local_runs_pre_and_post_login_commands(tmp_path):
    backend = LocalBackend(tmp_path / "runs")
    config = _local_config(
        PreRunCommandOnLoginNode='echo "pre for $MANTIK_RUN_ID" > pre.txt',
        PostRunCommandOnLoginNode='echo "post after exit $(cat mantik.exitcode)" > post.txt',
    )
    job = with_config(make_job(tmp_path, "cat pre.txt; exit 3"), config)
    job_id = backend.submit(job)
    status = wait_for(backend, job_id, FINAL, timeout=30)
    # The post command's success does not hide the job's own failure.
    assert status.state == RunState.FAILED and status.exit_code == 3, status
    run_dir = Path(backend.run_dir_of(job_id))
    assert f"pre for {job.run_id}" in backend.read_log(job_id)[0].decode()
    assert (run_dir / "post.txt").read_text() == "post after exit 3\n"
    login_log = (run_dir / LOGIN_LOG_FILE).read_text()
    assert "[mantik] PreRunCommandOnLoginNode[0]" in login_log
    assert "[mantik] PostRunCommandOnLoginNode[0]" in login_log


def test_local_failing_pre_command_starts_no_job(tmp_path):
    backend = LocalBackend(tmp_path / "runs")
    config = _local_config(PreRunCommandOnLoginNode="echo went wrong; exit 5")
    job = with_config(make_job(tmp_path, "touch started"), config)
    with pytest.raises(BackendRejected) as caught:
        backend.submit(job)
    assert "exit status 5" in caught.value.message and "went wrong" in caught.value.message
    run_dir = tmp_path / "runs" / job.run_id
    assert not (run_dir / "mantik.jobid").exists() and not (run_dir / "started").exists()
    assert not (run_dir / ".mantik-credentials").exists()


def _interrupt_main_when(event: threading.Event, delay: float) -> threading.Thread:
    """SIGINT to the main thread (a Ctrl-C) ``delay`` seconds after ``event``."""
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()

    def fire() -> None:
        if event.wait(30):
            time.sleep(delay)
            signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_while_the_pre_command_runs_leaves_no_credential(backend, tmp_path):
    # Interrupted after the upload, before sbatch took the job, the submission left the
    # tracking credential in the run directory for good (only the job script or a
    # failing remote step deleted it); and the login-node command ran on, then sbatch.
    name = f"mantik-interrupted-{uuid.uuid4().hex[:8]}"
    config = _config(PreRunCommandOnLoginNode="touch pre-started; sleep 5; touch pre-ended")
    job = with_config(make_job(tmp_path, "true", name=name), config)
    uploaded = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= total:
            uploaded.set()

    thread = _interrupt_main_when(uploaded, 1.5)
    with pytest.raises(KeyboardInterrupt):
        backend.submit(job, progress)
    thread.join()
    run_dir = f"{backend.remote_base()}/{job.run_id}"
    with backend.files.shared() as sftp:
        names = sftp.listdir(run_dir)
    assert "pre-started" in names and ".mantik-credentials" not in names, names
    # The login-node command was stopped: it never ends, and no job is queued after it.
    time.sleep(5)
    with backend.files.shared() as sftp:
        assert "pre-ended" not in sftp.listdir(run_dir)
    queued = backend._run(f"squeue -h -t all -n {name} -o %i", "checking the queue")
    assert queued.stdout.decode().strip() == ""


_SUBMIT_AND_DIE = """
import sys
from pathlib import Path
from mantik_jupyter.compute.backends.base import PreparedJob
from mantik_jupyter.compute.backends.ssh_slurm import SshSlurmBackend
from mantik_jupyter.compute.config import parse_config
host, port, user, key, known, base, run_id, local, name, pre = sys.argv[1:]
config = parse_config({"SSH": {"Hostname": "login"}, "Resources": {"Queue": "batch"},
    "Environment": {"PreRunCommandOnLoginNode": pre}})
backend = SshSlurmBackend(host, int(port), user, key_filename=key, known_hosts=known,
                          remote_dir=base)
backend.submit(PreparedJob(run_id, Path(local), name, config=config))
"""


def submit_and_die(
    backend: SshSlurmBackend, cluster, job: PreparedJob, pre: str
) -> subprocess.Popen[bytes]:
    """A client process submitting ``job`` with ``pre`` as PreRunCommandOnLoginNode, for
    the test to kill."""
    args = [cluster.host, str(cluster.port), cluster.username, str(cluster.key_path)]
    args += [str(cluster.known_hosts), backend.remote_base(), job.run_id, str(job.local_dir)]
    args += [job.job_name, pre]
    return subprocess.Popen([sys.executable, "-c", _SUBMIT_AND_DIE, *args])


def test_a_client_killed_while_the_pre_command_runs_leaves_no_credential(
    backend, slurm_cluster, tmp_path
):
    # SIGKILL (or a link that drops) leaves the client no chance to clean up: the remote
    # command ran on and stopped before sbatch, but the credential file stayed.
    name = f"mantik-killed-{uuid.uuid4().hex[:8]}"
    job = make_job(tmp_path, "true", name=name)
    pre = "touch pre-started; sleep 3; touch pre-ended"
    child = submit_and_die(backend, slurm_cluster, job, pre)
    run_dir = f"{backend.remote_base()}/{job.run_id}"
    try:
        deadline = time.monotonic() + 30
        while not backend.ssh.run(f"test -e {run_dir}/pre-started", "looking").status == 0:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.2)
        child.kill()
    finally:
        child.kill()
        child.wait()
    names: list[str] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with backend.files.shared() as sftp:
            names = sftp.listdir(run_dir)
        if "pre-ended" in names and ".mantik-credentials" not in names:
            break
        time.sleep(0.3)
    assert "pre-ended" in names and ".mantik-credentials" not in names, names
    queued = backend._run(f"squeue -h -t all -n {name} -o %i", "checking the queue")
    assert queued.stdout.decode().strip() == ""


def test_a_job_queued_by_a_submission_stopped_afterwards_is_cancelled(backend, tmp_path):
    # Stopped between sbatch and reading its answer, the submission never learnt the
    # job's id: the job would have run untracked. It is found by its run directory.
    job_id = backend.submit(make_job(tmp_path, "true", sbatch="#SBATCH --hold\n"))
    run_dir = backend.run_dir_of(job_id)
    assert backend.states([job_id])[job_id].state == RunState.QUEUED
    backend._abandon_submission(run_dir, "")
    assert wait_for(backend, job_id, FINAL, timeout=30).state == RunState.KILLED
    with backend.files.shared() as sftp:
        assert ".mantik-credentials" not in sftp.listdir(run_dir)


def test_abandoning_spares_a_process_group_that_is_no_longer_the_submissions(backend, tmp_path):
    # The submit command's group id, once that command ended, can be given to another
    # process group of the same user: abandoning the submission killed that group.
    job_id = backend.submit(make_job(tmp_path, "true"))
    pause = f"{40 + uuid.uuid4().int % 1000 / 1000:.3f}"
    started = backend._run(
        f"setsid sleep {pause} </dev/null >/dev/null 2>&1 & sleep 0.5; pgrep -f 'sleep {pause}'",
        "starting another process group",
    )
    pid = started.stdout.decode().split()[0]
    try:
        backend._abandon_submission(backend.run_dir_of(job_id), pid)
        # Not "kill -0": a killed process whose parent left stays a zombie here.
        state = backend._run(f"ps -o stat= -p {pid}", "looking at the other group")
        assert state.stdout.decode().strip().startswith("S"), state
    finally:
        backend._run(f"kill {pid}", "cleaning up")
