"""SshSlurmBackend against the real loopback Slurm cluster and sshd (tests/cluster/setup.sh)."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pwd
import re
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest

from mantik_jupyter.compute.backends.base import PreparedJob
from mantik_jupyter.compute.backends.ssh_slurm import SshSlurmBackend
from mantik_jupyter.compute.config import parse_config
from mantik_jupyter.compute.script import sbatch_lines
from mantik_jupyter.compute.states import RunState
from mantik_jupyter.errors import (
    AuthenticationFailed,
    BackendRejected,
    BackendUnavailable,
    ConfigError,
    HostKeyUnknown,
    NotFound,
    UnsafePath,
)

pytestmark = pytest.mark.slurm

SECRET = "s3cret-tracking-token"


def _backend(cluster, base: str, **overrides) -> SshSlurmBackend:
    options = dict(
        hostname=cluster.host,
        port=cluster.port,
        username=cluster.username,
        key_filename=str(cluster.key_path),
        known_hosts=cluster.known_hosts,
        remote_dir=base,
        connect_timeout=5,
    )
    options.update(overrides)
    return SshSlurmBackend(**options)


@pytest.fixture(scope="module")
def base(slurm_cluster) -> Iterator[str]:
    """A fresh folder of run directories for this module, removed afterwards."""
    path = f"{slurm_cluster.remote_dir}/test-{uuid.uuid4().hex[:8]}"
    yield path
    cleaner = _backend(slurm_cluster, path)
    cleaner._run(f"rm -rf {path}", "cleaning up")
    cleaner.close()


@pytest.fixture(scope="module")
def backend(slurm_cluster, base) -> Iterator[SshSlurmBackend]:
    b = _backend(slurm_cluster, base)
    yield b
    b.close()


def make_job(tmp_path: Path, body: str, sbatch: str = "", name: str = "mantik-test") -> PreparedJob:
    """A prepared run in the shape the RunService makes: package, job script, credentials."""
    run_id = uuid.uuid4().hex
    local = tmp_path / run_id
    local.mkdir()
    with tarfile.open(local / "package.tar.gz", "w:gz") as tar:
        data = b"print('hello from the package')\n"
        info = tarfile.TarInfo("main.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    script = local / "mantik-job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --output=mantik.log\n"
        "#SBATCH --ntasks=1\n"
        f"{sbatch}"
        "(\n"
        f"{body}\n"
        ")\n"
        "status=$?\n"
        "echo $status > mantik.exitcode\n"
        "exit $status\n"
    )
    script.chmod(0o755)
    creds = local / ".mantik-credentials"
    creds.write_text(f"MLFLOW_TRACKING_TOKEN={SECRET}\n")
    creds.chmod(0o600)
    return PreparedJob(run_id=run_id, local_dir=local, job_name=name)


def wait_for(backend: SshSlurmBackend, job_id: str, states: set[RunState], timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        status = backend.states([job_id])[job_id]
        if status.state in states or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


FINAL = {RunState.FINISHED, RunState.FAILED, RunState.KILLED}


def test_job_finishes_and_its_files_come_back(backend, slurm_cluster, tmp_path):
    job = make_job(
        tmp_path,
        "echo first line\n"
        "python3 code/main.py\n"
        f"{slurm_cluster.python} -c 'import mlflow; print(\"mlflow\", mlflow.__version__)'\n"
        "mkdir -p outputs/sub && echo 42 > outputs/result.txt && echo deep > outputs/sub/d.txt\n"
        "ln -s /etc/passwd outputs/escape\n"
        "echo last line",
    )
    seen = []
    job_id = backend.submit(job, progress=lambda done, total: seen.append((done, total)))
    assert job_id.isdigit()
    assert seen and seen[-1][0] == seen[-1][1] > 0

    status = wait_for(backend, job_id, FINAL)
    assert status.state == RunState.FINISHED, status
    assert status.exit_code == 0

    log, end = backend.read_log(job_id)
    text = log.decode()
    assert "first line" in text and "hello from the package" in text and "mlflow 3" in text
    assert end == len(log)
    tail, end2 = backend.read_log(job_id, offset=len(b"first line\n"))
    assert tail == log[len(b"first line\n") :] and end2 == end
    assert backend.read_log(job_id, offset=end) == (b"", end)

    names = {e.path: e for e in backend.list_files(job_id)}
    assert {"code", "outputs", "mantik.log", "mantik.exitcode", ".mantik-credentials"} <= set(names)
    assert names["outputs"].is_dir and not names["mantik.log"].is_dir
    assert [e.path for e in backend.list_files(job_id, "code")] == ["code/main.py"]

    run_dir = backend.run_dir_of(job_id)
    with backend.files.shared() as sftp:
        mode = sftp.stat(f"{run_dir}/.mantik-credentials").st_mode
    assert mode & 0o777 == 0o600

    assert b"".join(backend.open_file(job_id, "outputs/result.txt")) == b"42\n"
    got = backend.download(job_id, "outputs/result.txt", tmp_path)
    assert got == tmp_path / "result.txt" and got.read_text() == "42\n"

    progress = []
    folder = backend.download(
        job_id, "outputs", tmp_path / "dl", progress=lambda d, t: progress.append((d, t))
    )
    assert folder == tmp_path / "dl"
    assert (folder / "result.txt").read_text() == "42\n"
    assert (folder / "sub" / "d.txt").read_text() == "deep\n"
    # The symlink leading out of the run directory is not recreated locally.
    assert not (folder / "escape").exists() and not (folder / "escape").is_symlink()
    assert progress and progress[-1][0] == progress[-1][1]


def test_failing_job_reports_its_exit_code(backend, tmp_path):
    job_id = backend.submit(make_job(tmp_path, "echo about to fail; exit 3"))
    status = wait_for(backend, job_id, FINAL)
    assert status.state == RunState.FAILED
    assert status.exit_code == 3
    assert status.reason == "exit code 3"


def test_cancel_kills_and_cancelling_again_is_fine(backend, tmp_path):
    job_id = backend.submit(make_job(tmp_path, "sleep 300"))
    wait_for(backend, job_id, {RunState.RUNNING}, timeout=30)
    backend.cancel(job_id)
    status = wait_for(backend, job_id, FINAL, timeout=30)
    assert status.state == RunState.KILLED and status.reason == "CANCELLED"
    backend.cancel(job_id)


def test_cancelling_a_pending_job_deletes_its_credential_file(backend, tmp_path):
    # A held job never starts, so its script never gets to delete the credential.
    job_id = backend.submit(make_job(tmp_path, "true", sbatch="#SBATCH --hold\n"))
    creds = f"{backend.run_dir_of(job_id)}/.mantik-credentials"
    with backend.files.shared() as sftp:
        assert sftp.stat(creds)
    backend.cancel(job_id)
    assert wait_for(backend, job_id, FINAL, timeout=30).state == RunState.KILLED
    with backend.files.shared() as sftp, pytest.raises(FileNotFoundError):
        sftp.stat(creds)
    backend.cancel(job_id)  # again: nothing left to delete, still fine


def test_log_is_read_while_running_from_offsets(backend, tmp_path):
    job_id = backend.submit(make_job(tmp_path, "echo part one; sleep 4; echo part two; sleep 60"))
    try:
        assert wait_for(backend, job_id, {RunState.RUNNING}, 30).state == RunState.RUNNING
        data, offset = b"", 0
        deadline = time.monotonic() + 30
        while b"part two" not in data and time.monotonic() < deadline:
            chunk, offset = backend.read_log(job_id, offset)
            data += chunk
            if b"part one" in data and b"part two" not in data:
                assert offset == len(data)
            time.sleep(0.5)
        assert data == b"part one\npart two\n"
        assert backend.states([job_id])[job_id].state == RunState.RUNNING
    finally:
        backend.cancel(job_id)


@pytest.mark.slow
def test_time_limit_gives_timeout(backend, tmp_path):
    job_id = backend.submit(make_job(tmp_path, "sleep 600", sbatch="#SBATCH --time=1\n"))
    status = wait_for(backend, job_id, FINAL, timeout=240)
    assert (status.state, status.native_state) == (RunState.FAILED, "TIMEOUT")
    # It read "TIMEOUT": Slurm's word, without the limit or what to change.
    assert "Slurm ended the job: time limit of 00:01:00 reached" in status.reason
    assert "Resources.Runtime" in status.reason


def _wait_for_slurm(job_id: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        if out == state:
            return
        assert time.monotonic() < deadline, f"job {job_id} stayed {out}"
        time.sleep(0.2)


def test_jobs_slurm_ended_say_why_in_one_poll(backend, tmp_path):
    # Slurm ends these itself: a launch on a node that cannot open the job's output
    # (JobLaunchFailure, ExitCode 0:53), root cancelling a running job, and one requeued
    # (two sacct records) before root cancelled it. They read "FAILED" and "CANCELLED".
    unopenable = "#SBATCH --error=/nonexistent-mantik-dir/err.log\n"
    launch = backend.submit(make_job(tmp_path, "echo never", sbatch=unopenable))
    failing = backend.submit(make_job(tmp_path, "exit 3"))
    cancelled = backend.submit(make_job(tmp_path, "sleep 300"))
    requeued = backend.submit(make_job(tmp_path, "sleep 300"))
    jobs = [launch, failing, cancelled, requeued]
    try:
        for job_id in (cancelled, requeued):
            assert wait_for(backend, job_id, {RunState.RUNNING}, 30).state == RunState.RUNNING
        subprocess.run(["scontrol", "requeue", requeued], check=True, timeout=30)
        _wait_for_slurm(requeued, "PENDING")
        # As root, as an admin (or the system) does.
        subprocess.run(["scancel", cancelled, requeued], check=True, timeout=30)
        for job_id in jobs:
            wait_for(backend, job_id, FINAL, 30)
        before = backend.commands_issued
        answer = backend.states(jobs)
        assert backend.commands_issued - before == 1
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)
    assert answer[launch].state == RunState.FAILED
    assert "Slurm could not launch the job on node localhost" in answer[launch].reason
    assert answer[failing].reason == "exit code 3"
    for job_id in (cancelled, requeued):
        assert answer[job_id].state == RunState.KILLED
        assert "cancelled by user root (not you)" in answer[job_id].reason


@pytest.fixture(scope="module")
def finished_job(backend, tmp_path_factory) -> str:
    job = make_job(tmp_path_factory.mktemp("finished"), "ln -s / root-link; echo x > inside")
    job_id = backend.submit(job)
    assert wait_for(backend, job_id, FINAL).state == RunState.FINISHED
    return job_id


@pytest.mark.parametrize("path", ["../x", "code/../../x", "/etc/passwd", "~/x", "root-link/etc"])
def test_paths_leaving_the_run_directory_are_refused(backend, finished_job, tmp_path, path):
    with pytest.raises(UnsafePath):
        backend.list_files(finished_job, path)
    with pytest.raises(UnsafePath):
        list(backend.open_file(finished_job, path))
    with pytest.raises(UnsafePath):
        backend.download(finished_job, path, tmp_path)


def test_missing_file_is_not_found(backend, finished_job):
    with pytest.raises(NotFound):
        list(backend.open_file(finished_job, "no-such-file"))


def test_shell_values_are_quoted(backend, tmp_path):
    marker = f"/tmp/mantik-pwned-{uuid.uuid4().hex}"
    name = f"it's a $(touch {marker}) `touch {marker}` job; touch {marker}"
    job_id = backend.submit(make_job(tmp_path, "true", name=name))
    wait_for(backend, job_id, FINAL)
    out = backend._run(f"squeue -h -t all -j {job_id} -o %j; ls {marker} 2>&1", "check")
    assert name in out.stdout.decode()
    assert not Path(marker).exists()


def test_many_states_in_one_command(backend, tmp_path):
    ids = [backend.submit(make_job(tmp_path, "true", sbatch="#SBATCH --hold\n")) for _ in range(6)]
    try:
        before = backend.commands_issued
        answer = backend.states([*ids, "999999", "not-a-job"])
        assert backend.commands_issued - before == 1
        assert all(answer[i].state == RunState.QUEUED for i in ids), answer
        assert answer["999999"].state == RunState.UNKNOWN
        assert answer["not-a-job"].state == RunState.UNKNOWN
    finally:
        backend._run("scancel " + " ".join(ids), "cleanup")


def test_restarted_lab_finds_job_by_attach_or_slurm(slurm_cluster, base, backend, finished_job):
    run_dir = backend.run_dir_of(finished_job)
    fresh = _backend(slurm_cluster, base)
    try:
        # Without attach, the run directory comes from Slurm's record of the job.
        assert fresh.read_log(finished_job)[0] == backend.read_log(finished_job)[0]
        assert fresh.run_dir_of(finished_job) == run_dir
    finally:
        fresh.close()
    attached = _backend(slurm_cluster, base, run_dirs={finished_job: run_dir})
    try:
        before = attached.commands_issued
        assert attached.states([finished_job])[finished_job].state == RunState.FINISHED
        assert attached.commands_issued - before == 1
    finally:
        attached.close()


def test_private_key_text_is_accepted(slurm_cluster, base):
    b = _backend(
        slurm_cluster, base, key_filename=None, private_key=slurm_cluster.key_path.read_text()
    )
    try:
        assert b.states(["999999"])["999999"].state == RunState.UNKNOWN
    finally:
        b.close()


def _encrypted_copy(key: Path, folder: Path, passphrase: str) -> Path:
    copy = folder / f"encrypted-{key.name}"
    copy.write_bytes(key.read_bytes())
    copy.chmod(0o600)
    subprocess.run(
        ["ssh-keygen", "-q", "-p", "-N", passphrase, "-P", "", "-f", str(copy)], check=True
    )
    return copy


def _password_attempts(caplog) -> list[str]:
    """The password logins the client tried, by paramiko's record of the server's answer
    (the test sshd takes keys only, and logs a refused password at no level)."""
    return [r.getMessage() for r in caplog.records if "(password)" in r.getMessage()]


def test_an_encrypted_key_opens_with_its_passphrase(slurm_cluster, base, tmp_path):
    passphrase = "correct-horse-passphrase"
    key = _encrypted_copy(slurm_cluster.key_path, tmp_path, passphrase)
    for source in (
        {"key_filename": str(key)},
        {"key_filename": None, "private_key": key.read_text()},
    ):
        b = _backend(slurm_cluster, base, password=passphrase, **source)
        try:
            assert b.states(["999999"])["999999"].state == RunState.UNKNOWN
        finally:
            b.close()


def test_an_encrypted_key_without_its_passphrase_says_so(slurm_cluster, base, tmp_path):
    key = _encrypted_copy(slurm_cluster.key_path, tmp_path, "some-passphrase")
    with pytest.raises(AuthenticationFailed) as caught:
        _backend(slurm_cluster, base, key_filename=str(key)).states(["1"])
    assert "encrypted" in caught.value.message and "MANTIK_SSH_PASSWORD" in caught.value.message
    assert str(key) in caught.value.message


def test_a_refused_key_does_not_hand_its_passphrase_to_the_server(
    slurm_cluster, base, tmp_path, caplog
):
    """The passphrase of a key the server refuses is not tried as the login password;
    a password beside a key that needs none still is (the control)."""
    caplog.set_level(logging.DEBUG, logger="paramiko.transport")
    wrong = tmp_path / "id_wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    with pytest.raises(AuthenticationFailed):
        _backend(slurm_cluster, base, key_filename=str(wrong), password="a-login-password").states(
            ["1"]
        )
    assert _password_attempts(caplog), "the control's password login was not seen"

    caplog.clear()
    encrypted = _encrypted_copy(wrong, tmp_path, "a-key-passphrase")
    for source in (
        {"key_filename": str(encrypted)},
        {"key_filename": None, "private_key": encrypted.read_text()},
    ):
        with pytest.raises(AuthenticationFailed):
            _backend(slurm_cluster, base, password="a-key-passphrase", **source).states(["1"])
    assert _password_attempts(caplog) == []


def test_unknown_host_key_is_refused_with_a_hint(slurm_cluster, base, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyUnknown) as caught:
        _backend(slurm_cluster, base, known_hosts=empty).states(["1"])
    message = caught.value.message
    assert f"ssh-keyscan -p {slurm_cluster.port} {slurm_cluster.host} >> {empty}" in message


def test_changed_host_key_is_refused(slurm_cluster, base, tmp_path):
    other = paramiko.RSAKey.generate(1024)
    known = tmp_path / "known_hosts"
    known.write_text(
        f"[{slurm_cluster.host}]:{slurm_cluster.port} ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
        f"[{slurm_cluster.host}]:{slurm_cluster.port} {other.get_name()} {other.get_base64()}\n"
    )
    with pytest.raises(HostKeyUnknown) as caught:
        _backend(slurm_cluster, base, known_hosts=known).states(["1"])
    assert "does not match" in caught.value.message


def test_wrong_key_is_refused_without_leaking_it(slurm_cluster, base):
    wrong = paramiko.RSAKey.generate(2048)
    text = io.StringIO()
    wrong.write_private_key(text)
    with pytest.raises(AuthenticationFailed) as caught:
        _backend(slurm_cluster, base, key_filename=None, private_key=text.getvalue()).states(["1"])
    message = caught.value.message
    assert f"{slurm_cluster.username}@{slurm_cluster.host}" in message
    assert wrong.get_base64()[:20] not in message and "PRIVATE KEY" not in message


def test_unreachable_host_is_backend_unavailable(slurm_cluster, base):
    with pytest.raises(BackendUnavailable) as caught:
        _backend(slurm_cluster, base, port=1).states(["1"])
    assert f"{slurm_cluster.host}:1" in caught.value.message
    assert not isinstance(caught.value, HostKeyUnknown)


def test_sshd_restart_is_unavailable_then_recovers(slurm_cluster, base, finished_job):
    b = _backend(slurm_cluster, base)
    try:
        assert b.states([finished_job])[finished_job].state == RunState.FINISHED
        slurm_cluster.sshd("stop")
        try:
            with pytest.raises(BackendUnavailable):
                b.states([finished_job])
            with pytest.raises(BackendUnavailable):
                b.read_log(finished_job)
        finally:
            slurm_cluster.sshd("start")
        assert b.states([finished_job])[finished_job].state == RunState.FINISHED
        assert b.read_log(finished_job)[1] >= 0
    finally:
        b.close()


def test_secret_never_in_repr(slurm_cluster, base):
    b = _backend(slurm_cluster, base, password="hunter2-password")
    assert "hunter2" not in repr(b)


# ---- a login node that stops answering ----------------------------------------------------


def _session_pids(backend: SshSlurmBackend) -> list[int]:
    """The sshd processes serving the backend's current connection."""
    port = backend.ssh.client().get_transport().sock.getsockname()[1]
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = sorted({int(pid) for pid in re.findall(r"pid=(\d+)", out)})
    assert pids, f"no sshd process found for local port {port}: {out!r}"
    return pids


@contextmanager
def _frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP: the TCP link stays up but nothing answers, as with a hung login node."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _in_thread(results: dict, name: str, call) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        try:
            results[name] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects what came out
            results[name] = exc
        results[name + "_seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_stuck_sftp_call_gives_up_and_recovers(slurm_cluster, base, finished_job):
    # connect_timeout well above io_timeout: only the SFTP read's own timeout can end
    # the wait in time (opening the poll's channel would give up after 10 s).
    b = _backend(slurm_cluster, base, connect_timeout=10, io_timeout=2)
    try:
        log_text = b.read_log(finished_job)  # the shared SFTP session is open now
        results: dict = {}
        with _frozen(_session_pids(b)):
            reader = _in_thread(results, "log", lambda: b.read_log(finished_job))
            time.sleep(0.5)  # the poll arrives while the log read is stuck
            poller = _in_thread(results, "states", lambda: b.states([finished_job]))
            reader.join(20)
            poller.join(20)
            assert "log" in results and "states" in results, f"still waiting: {results}"
        # The frozen connection was given up; a fresh one answered both.
        assert results["log"] == log_text, results
        assert results["states"][finished_job].state == RunState.FINISHED, results
        assert results["log_seconds"] < 8 and results["states_seconds"] < 8, results
    finally:
        b.close()


def test_login_node_that_stops_answering_is_unavailable(slurm_cluster, base, finished_job):
    b = _backend(slurm_cluster, base, connect_timeout=2, io_timeout=2)
    try:
        b.read_log(finished_job)
        listener = int((slurm_cluster.state_dir / "sshd.pid").read_text().split()[0])
        results: dict = {}
        # The listener too: a new connection gets no banner either.
        with _frozen([listener, *_session_pids(b)]):
            reader = _in_thread(results, "log", lambda: b.read_log(finished_job))
            files = _in_thread(results, "files", lambda: b.list_files(finished_job))
            time.sleep(0.5)
            poller = _in_thread(results, "states", lambda: b.states([finished_job]))
            for thread in (reader, files, poller):
                thread.join(30)
            assert {"log", "files", "states"} <= results.keys(), f"still waiting: {results}"
        for name in ("log", "files", "states"):
            assert isinstance(results[name], BackendUnavailable), results
            assert slurm_cluster.host in results[name].message
        # Answering again: the next call connects anew.
        assert b.states([finished_job])[finished_job].state == RunState.FINISHED
        assert "inside" in [entry.path for entry in b.list_files(finished_job)]
    finally:
        b.close()


def test_folder_download_that_times_out_leaves_a_fresh_connection_open(
    slurm_cluster, base, tmp_path
):
    # A folder streams on the connection of its time (C1). The node stops answering, and
    # meanwhile another thread (simulated here, the race is too narrow to hit reliably)
    # has connected anew (C2). The stream's timeout must give up C1 only, not C2.
    b = _backend(slurm_cluster, base, io_timeout=2)
    # More than SSH's window and the socket buffers hold: the stream is mid-way when frozen.
    job = make_job(tmp_path, "mkdir big && head -c 16000000 /dev/urandom > big/blob")
    job_id = b.submit(job)
    frozen: list[int] = []
    fresh: list[paramiko.SSHClient] = []
    old = b.ssh.client()
    try:
        assert wait_for(b, job_id, FINAL).state == RunState.FINISHED

        def progress(done: int, total: int) -> None:
            if not frozen:
                frozen.extend(_session_pids(b))
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
                with b.ssh._lock:  # what another thread's reconnect leaves behind
                    b.ssh._client = b.ssh._connect()
                    fresh.append(b.ssh._client)

        with pytest.raises(BackendUnavailable, match="while downloading"):
            b.download(job_id, "big", tmp_path / "out", progress=progress)
        assert fresh and b.ssh._client is fresh[0], "the fresh connection was dropped"
        assert fresh[0].get_transport().is_active()
        assert b.states([job_id])[job_id].state == RunState.FINISHED
        assert b.ssh._client is fresh[0]  # answered on it, without connecting again
        assert not (tmp_path / "out").exists()
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        old.close()
        b.close()


def test_folder_download_cut_off_by_a_dropped_link_is_a_lost_connection(
    slurm_cluster, base, tmp_path
):
    # Another thread found the link dead and dropped it while a folder streamed on it: the
    # stream ends early. That was reported as a broken tar stream (BackendRejected), as if
    # the cluster's tar had failed; it is a lost connection, and the next try works.
    b = _backend(slurm_cluster, base)
    job_id = b.submit(make_job(tmp_path, "mkdir big && head -c 16000000 /dev/urandom > big/blob"))
    try:
        assert wait_for(b, job_id, FINAL).state == RunState.FINISHED
        dropped: list[int] = []

        def progress(done: int, total: int) -> None:
            if not dropped:
                dropped.append(done)
                b.ssh.drop()

        with pytest.raises(BackendUnavailable, match="Lost the SSH connection") as caught:
            b.download(job_id, "big", tmp_path / "out", progress=progress)
        assert "while downloading" in caught.value.message
        assert "Nothing was kept of the folder. Try the download again." in caught.value.message
        assert dropped and not (tmp_path / "out").exists()
        again = b.download(job_id, "big", tmp_path / "out")
        assert (again / "blob").stat().st_size == 16_000_000
    finally:
        b.close()


def test_a_tar_that_fails_on_the_cluster_is_not_a_lost_connection(backend, tmp_path):
    # The remote end closes the stream itself (EOF, exit status): tar's failure, not the
    # link's, so BackendRejected with what tar said, as before.
    job_id = backend.submit(
        make_job(tmp_path, "mkdir d && echo a > d/a && echo b > d/locked && chmod 000 d/locked")
    )
    assert wait_for(backend, job_id, FINAL).state == RunState.FINISHED
    with pytest.raises(BackendRejected, match=r"tar of .*/d .*Permission denied"):
        backend.download(job_id, "d", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # tar killed mid-stream on the cluster: a short stream, but the remote end said so.
    big = backend.submit(
        make_job(tmp_path, "mkdir big && head -c 16000000 /dev/urandom > big/blob")
    )
    assert wait_for(backend, big, FINAL).state == RunState.FINISHED
    killed: list[int] = []

    def progress(done: int, total: int) -> None:
        if not killed:
            found = subprocess.run(
                ["pgrep", "-u", backend.username, "-x", "tar"], capture_output=True, text=True
            ).stdout.split()
            killed.extend(int(pid) for pid in found)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(BackendRejected, match="broken tar stream"):
        backend.download(big, "big", tmp_path / "out", progress=progress)
    assert killed
    assert backend.states([big])[big].state == RunState.FINISHED  # the link stays usable


# ---- SSH.RemoteDirectory ------------------------------------------------------------------


def _home(cluster) -> str:
    return pwd.getpwnam(cluster.username).pw_dir


@pytest.mark.parametrize(
    ("setting", "relative"),
    [
        ("$HOME/mantik-rd-test", "mantik-rd-test"),
        ("${HOME}/mantik-rd-test/x", "mantik-rd-test/x"),
        ("~", ""),
        ("~/mantik-rd-test", "mantik-rd-test"),
        ("mantik-rd-test", "mantik-rd-test"),
    ],
)
def test_remote_directory_expands_variables_and_tilde(slurm_cluster, setting, relative):
    b = _backend(slurm_cluster, setting)
    try:
        expected = os.path.normpath(os.path.join(_home(slurm_cluster), relative))
        assert b.remote_base() == expected
    finally:
        b.close()


def test_runs_land_in_the_expanded_remote_directory(slurm_cluster, tmp_path):
    sub = f"mantik-rd-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, f"$HOME/{sub}")
    try:
        job_id = b.submit(make_job(tmp_path, "echo expanded"))
        assert b.run_dir_of(job_id).startswith(f"{_home(slurm_cluster)}/{sub}/")
        assert wait_for(b, job_id, FINAL).state == RunState.FINISHED
        assert not Path(_home(slurm_cluster), "$HOME").exists()
    finally:
        b._run(f"rm -rf ~/{sub}", "cleaning up")
        b.close()


def test_remote_directory_runs_no_commands(slurm_cluster):
    marker = f"/tmp/mantik-pwned-{uuid.uuid4().hex}"
    setting = f"$HOME/x-$(touch {marker})-`touch {marker}`-;touch {marker}"
    b = _backend(slurm_cluster, setting)
    try:
        base = b.remote_base()
        assert base == f"{_home(slurm_cluster)}/{setting.removeprefix('$HOME/')}"
        assert not Path(marker).exists()
    finally:
        b.close()


def test_unset_variable_in_remote_directory_is_a_config_error(slurm_cluster):
    b = _backend(slurm_cluster, "$MANTIK_SURELY_UNSET_VARIABLE/mantik")
    try:
        with pytest.raises(ConfigError) as caught:
            b.remote_base()
        message = caught.value.message
        assert "SSH.RemoteDirectory" in message and "$MANTIK_SURELY_UNSET_VARIABLE" in message
    finally:
        b.close()
    other_user = _backend(slurm_cluster, "~root/mantik")
    try:
        with pytest.raises(ConfigError, match="~user"):
            other_user.remote_base()
    finally:
        other_user.close()


def test_requeued_held_job_stays_queued(backend, tmp_path):
    # `scontrol requeuehold State=SpecialExit` (or RequeueExitHold) holds a job that may be
    # released and run again: squeue says SPECIAL_EXIT, which is not an end.
    job_id = backend.submit(make_job(tmp_path, "sleep 300"))
    try:
        wait_for(backend, job_id, {RunState.RUNNING}, timeout=30)
        for how in (["State=SpecialExit"], []):
            subprocess.run(["scontrol", "requeuehold", *how, job_id], check=True, timeout=30)
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                status = backend.states([job_id])[job_id]
                assert status.state in (RunState.RUNNING, RunState.QUEUED), status
                time.sleep(0.5)
            assert status.state == RunState.QUEUED, status
            subprocess.run(["scontrol", "release", job_id], check=True, timeout=30)
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30
            )
            assert wait_for(backend, job_id, {RunState.RUNNING}, 60).state == RunState.RUNNING
    finally:
        backend.cancel(job_id)


def test_job_held_when_its_reservation_ends_says_why(backend, slurm_cluster, tmp_path):
    # A job waiting in a reservation that ends (or is deleted) is held: squeue says
    # RESV_DEL_HOLD, and the job waits until someone releases it.
    name = f"mantik-test-{uuid.uuid4().hex[:6]}"
    subprocess.run(
        ["scontrol", "create", "reservation", f"ReservationName={name}", "StartTime=now",
         "Duration=10", f"Users={slurm_cluster.username}", "CoreCnt=1", "Nodes=localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    job_id = None
    try:
        # Two CPUs in a one-core reservation: it waits there until the reservation ends.
        sbatch = f"#SBATCH --reservation={name}\n#SBATCH --cpus-per-task=2\n"
        job_id = backend.submit(make_job(tmp_path, "true", sbatch=sbatch))
        assert wait_for(backend, job_id, {RunState.QUEUED}, 30).state == RunState.QUEUED
        # An end in the second it started is an "Invalid time": try again a moment later.
        deadline = time.monotonic() + 10
        while subprocess.run(
            ["scontrol", "update", f"ReservationName={name}", "EndTime=now"],
            capture_output=True, timeout=30,
        ).returncode:  # fmt: skip
            assert time.monotonic() < deadline, "scontrol could not end the reservation"
            time.sleep(0.5)
        # slurmctld looks at ended reservations about every 30 s.
        deadline = time.monotonic() + 90
        while True:
            status = backend.states([job_id])[job_id]
            if status.native_state == "RESV_DEL_HOLD" or time.monotonic() > deadline:
                break
            assert status.state == RunState.QUEUED, status
            time.sleep(1)
        assert (status.state, status.native_state) == (RunState.QUEUED, "RESV_DEL_HOLD"), status
        assert f"Reservation {name} was deleted" in status.reason
        assert "Resources.Reservation" in status.reason
    finally:
        if job_id is not None:
            backend.cancel(job_id)
        subprocess.run(
            ["scontrol", "delete", f"ReservationName={name}"], capture_output=True, timeout=30
        )


# Names a job may well write: a leading dash, spaces and quotes, a newline, a backslash,
# non-ASCII; each folder holds one file whose text is its name.
ODD_FILES = ["-rf/-x", "a b/it's $(x)", "nl\nname/f\nf", "back\\slash/c\\d", "ü ñ/ß.txt"]


def odd_files_body() -> str:
    lines = []
    for path in ODD_FILES:
        folder, name = path.split("/")
        q_folder, q_path = (
            "$'" + p.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
            for p in (folder, path)
        )
        lines.append(f"mkdir -p -- {q_folder} && printf %s {q_path} > {q_path}")
    return "\n".join(lines)


def check_odd_files(backend, job_id: str, dest: Path) -> None:
    listed = {e.path for e in backend.list_files(job_id)}
    for index, path in enumerate(ODD_FILES):
        folder = path.split("/")[0]
        assert folder in listed
        assert [e.path for e in backend.list_files(job_id, folder)] == [path]
        one = backend.download(job_id, path, dest / f"file-{index}")
        assert one.read_text() == path
        tree = backend.download(job_id, folder, dest / f"folder-{index}")
        assert (tree / path.split("/")[1]).read_text() == path


def test_odd_file_names_list_and_download(backend, tmp_path):
    job_id = backend.submit(make_job(tmp_path, odd_files_body()))
    assert wait_for(backend, job_id, FINAL).state == RunState.FINISHED
    check_odd_files(backend, job_id, tmp_path)


def test_thousands_of_jobs_in_one_poll(backend, tmp_path):
    # A sweep of thousands of runs: one status command for all was too long for sshd,
    # which dropped the connection, and every poll of every run failed.
    real = [backend.submit(make_job(tmp_path, "true", sbatch="#SBATCH --hold\n")) for _ in range(2)]
    gone = [str(8_000_000 + i) for i in range(3000)]
    for job_id in gone:
        backend.attach(job_id, f"{backend.remote_base()}/{uuid.uuid4().hex}")
    try:
        before = backend.commands_issued
        answer = backend.states([*gone, *real])
        assert backend.commands_issued - before == 7  # 3002 jobs, 500 a command
        assert [answer[j].state for j in real] == [RunState.QUEUED, RunState.QUEUED]
        assert {answer[j].state for j in gone} == {RunState.UNKNOWN}
    finally:
        backend._run("scancel " + " ".join(real), "cleanup")


def test_log_reads_keep_up_with_a_chatty_job(backend, tmp_path):
    # read_log asked for one 32 KiB block per round trip: following a job that writes
    # fast fell behind (about 4 MB/s here, far less over a WAN). Compared with the file
    # stream of the same bytes in the same run, so a loaded machine slows both alike.
    job_id = backend.submit(make_job(tmp_path, "head -c 12000000 /dev/zero | tr '\\0' x"))
    assert wait_for(backend, job_id, FINAL).state == RunState.FINISHED

    def timed(read) -> float:
        start = time.perf_counter()
        assert read() == 12_000_000
        return time.perf_counter() - start

    def by_log() -> int:
        offset = 0
        while data := backend.read_log(job_id, offset)[0]:
            offset += len(data)
        return offset

    def by_stream() -> int:
        return sum(len(chunk) for chunk in backend.open_file(job_id, "mantik.log"))

    log_time = min(timed(by_log) for _ in range(2))
    stream_time = min(timed(by_stream) for _ in range(2))
    assert log_time < 3 * stream_time + 0.2, (log_time, stream_time)


# ---- sbatch refusals that name a config key ------------------------------------------------

# Made by tests/cluster/setup.sh: the cluster enforces associations, QoS and their limits
# (AccountingStorageEnforce), the test user is in one account, and may use a QoS that
# refuses a job over its limits (DenyOnLimit) instead of letting it wait.
LIMITED_QOS = "mantik-limited"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"ComputeBudgetAccount": "no-such-budget"}, "ComputeBudgetAccount 'no-such-budget'"),
        ({"Resources": {"QoS": "no-such-qos"}}, "Resources.QoS 'no-such-qos'"),
        (
            {"Resources": {"QoS": LIMITED_QOS, "Runtime": "2h"}},
            "Resources.Runtime (0-02:00:00)",
        ),
        # Two tasks: sbatch would cut the nodes down to the one task of the job script.
        ({"Resources": {"QoS": LIMITED_QOS, "Nodes": 2, "TotalCPUs": 2}}, "Resources.Nodes 2"),
    ],
)
def test_sbatch_refusal_names_the_config_key(
    backend, slurm_cluster, tmp_path, monkeypatch, settings, named
):
    # sbatch refused them with its own words only (BackendRejected): the user had to
    # guess which key of which file Slurm meant.
    monkeypatch.delenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", raising=False)
    source = tmp_path / "compute-backend-config.yaml"
    data = {
        "SSH": {"Hostname": slurm_cluster.host},
        **settings,
        "Resources": {"Queue": "debug", **settings.get("Resources", {})},
    }
    config = parse_config(data, source=str(source))
    sbatch = "".join(f"{line}\n" for line in sbatch_lines(config, "mantik-test"))
    job = dataclasses.replace(make_job(tmp_path, "true", sbatch=sbatch), config=config)
    with pytest.raises(ConfigError) as caught:
        backend.submit(job)
    message = caught.value.message
    assert f"{named} in {source}" in message, message
    assert "sbatch: error:" in message  # Slurm's own words stay


# ---- accepted, but over a limit of its QoS: it waits for good ------------------------------

# Made by tests/cluster/setup.sh: a QoS with limits (MaxWall 30 min, 2 CPUs a job) and without
# DenyOnLimit, so slurmctld accepts a job over them and it pends with the limit as reason.
WAITING_QOS = "mantik-waiting"


@pytest.mark.parametrize(
    ("sbatch", "word", "key"),
    [
        ("#SBATCH --time=2:00:00\n", "QOSMaxWallDurationPerJobLimit", "Resources.Runtime"),
        ("#SBATCH --cpus-per-task=4\n", "QOSMaxCpuPerJobLimit", "TotalCPUs"),
    ],
)
def test_job_over_a_qos_limit_waits_for_good_and_says_which_key(
    backend, tmp_path, sbatch, word, key
):
    # It was QUEUED without a word, like a job waiting for its turn, for ever.
    job = make_job(tmp_path, "true", sbatch=f"#SBATCH --qos={WAITING_QOS}\n{sbatch}")
    job_id = backend.submit(job)
    try:
        deadline = time.monotonic() + 30
        while True:
            status = backend.states([job_id])[job_id]
            assert status.state == RunState.QUEUED, status
            if status.reason or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status.reason is not None, status
        assert status.reason.startswith(f"waiting for good (Slurm: {word}): "), status
        assert key in status.reason and "sacctmgr" in status.reason
    finally:
        backend.cancel(job_id)
