"""The SSH connection of Slurm over SSH (ssh_connection.py) against an sshd that keeps
OpenSSH's default limit of ten sessions a connection, as login nodes do (the loopback
cluster's own sshd allows 64)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mantik_jupyter.compute.states import RunState

from .test_ssh_slurm import FINAL, _backend, _in_thread, make_job, wait_for

pytestmark = pytest.mark.slurm

MAX_SESSIONS = 10  # sshd's default


@dataclass(frozen=True)
class _Sshd:
    port: int
    known_hosts: Path


@pytest.fixture(scope="module")
def default_sshd(slurm_cluster, tmp_path_factory) -> Iterator[_Sshd]:
    """A second sshd of the cluster's config, on a port of its own, with MaxSessions 10."""
    here = tmp_path_factory.mktemp("sshd")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pid_file = here / "sshd.pid"
    subprocess.run(
        ["/usr/sbin/sshd", "-f", str(slurm_cluster.state_dir / "sshd_config"),
         "-o", f"Port={port}", "-o", f"MaxSessions={MAX_SESSIONS}",
         "-o", f"PidFile={pid_file}", "-E", str(here / "sshd.log")],
        check=True, timeout=30,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists():
            assert time.monotonic() < deadline, "the second sshd did not start"
            time.sleep(0.05)
        scan = subprocess.run(
            ["ssh-keyscan", "-p", str(port), slurm_cluster.host],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        known_hosts = here / "known_hosts"
        known_hosts.write_text(scan.stdout)
        yield _Sshd(port, known_hosts)
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)


def test_transfers_holding_every_session_do_not_cost_the_connection(
    slurm_cluster, default_sshd, tmp_path
):
    # Nine file streams and the shared SFTP session hold all ten sessions; the status
    # poll's command was refused a session, that counted as a lost link, and dropping
    # the connection cut off all nine streams ("Lost the SSH connection ... while
    # reading"). The poll now waits for a session to come free; the streams go on.
    top = f"{slurm_cluster.remote_dir}/sessions-{uuid.uuid4().hex[:8]}"
    b = _backend(
        slurm_cluster, top, port=default_sshd.port, known_hosts=default_sshd.known_hosts,
        io_timeout=10,
    )  # fmt: skip
    size = 3_000_000
    try:
        job_id = b.submit(make_job(tmp_path, f"head -c {size} /dev/zero > big"))
        assert wait_for(b, job_id, FINAL).state == RunState.FINISHED
        b.read_log(job_id)  # the shared session: one
        streams = [b.open_file(job_id, "big") for _ in range(MAX_SESSIONS - 1)]
        got = [len(next(stream)) for stream in streams]
        results: dict = {}
        poller = _in_thread(results, "states", lambda: b.states([job_id]))
        time.sleep(1)
        streams.pop().close()  # one transfer ends, and its session comes free
        got.pop()
        poller.join(30)
        assert results["states"][job_id].state == RunState.FINISHED, results
        for index, stream in enumerate(streams):
            got[index] += sum(len(chunk) for chunk in stream)
        assert got == [size] * (MAX_SESSIONS - 2)
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()


def test_a_dropped_login_shows_no_paramiko_traceback_where_logging_is_not_set_up(tmp_path):
    # A kernel or a script sets up no logging: Python printed paramiko's 25-line account
    # of a login node that resets the connection to stderr (into the notebook cell),
    # above mantik's own error.
    script = """
from mantik_jupyter.compute.backends.ssh_connection import SshConnection
from mantik_jupyter.errors import BackendUnavailable
from tests.login_gate import Gate

gate = Gate()
conn = SshConnection("127.0.0.1", gate.port, username="u", password="p",
                     known_hosts=%r, connect_timeout=5)
try:
    conn.client()
except BackendUnavailable as exc:
    print("mantik:", exc.message)
# The user's own paramiko code in the same process keeps paramiko's account.
import paramiko
try:
    paramiko.SSHClient().connect("127.0.0.1", gate.port, username="u", password="p", timeout=5)
except Exception:
    pass
"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script % str(tmp_path / "known_hosts")],
        capture_output=True, text=True, timeout=60, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "mantik: Cannot reach the SSH server 127.0.0.1" in done.stdout, done.stdout
    # Only the user's own connection's account, once (a traceback names its files).
    assert done.stderr.count("Exception (client)") == 1, done.stderr
    assert "ssh_connection.py" not in done.stderr, done.stderr
