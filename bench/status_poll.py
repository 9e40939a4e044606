"""Status polling cost of SshSlurmBackend against one plain ``squeue``.

Submits N held jobs through the backend to the loopback cluster
(tests/cluster/setup.sh, run as root), then polls all of them and reports
remote commands per poll (target: 1) and the poll time against a bare
``squeue`` over a raw paramiko exec on a connection of its own, measured in the
same run. Cancels the jobs and removes their run directories at the end.

    python bench/status_poll.py [--jobs 200] [--polls 15]
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import paramiko

from mantik_jupyter.compute.backends.base import PreparedJob
from mantik_jupyter.compute.backends.ssh_slurm import SshSlurmBackend
from mantik_jupyter.compute.states import RunState

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = Path(os.environ.get("MANTIK_TEST_CLUSTER_DIR", "/tmp/mantik-test-cluster"))


def cluster_env() -> dict[str, str]:
    subprocess.run([str(ROOT / "tests" / "cluster" / "setup.sh")], check=True, capture_output=True)
    lines = (CLUSTER_DIR / "cluster.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def prepare(tmp: Path, index: int) -> PreparedJob:
    local = tmp / f"job{index}"
    local.mkdir()
    with tarfile.open(local / "package.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("main.py")
        tar.addfile(info, io.BytesIO(b""))
    (local / "mantik-job.sh").write_text(
        "#!/bin/bash\n#SBATCH --output=mantik.log\n#SBATCH --hold\ntrue\n"
    )
    return PreparedJob(run_id=f"bench-{index:04d}", local_dir=local, job_name="mantik-bench")


def raw_squeue(env: dict[str, str], ids: list[str], polls: int) -> list[float]:
    client = paramiko.SSHClient()
    client.load_system_host_keys(env["MANTIK_TEST_SSH_KNOWN_HOSTS"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        env["MANTIK_TEST_SSH_HOST"],
        port=int(env["MANTIK_TEST_SSH_PORT"]),
        username=env["MANTIK_TEST_SSH_USER"],
        key_filename=env["MANTIK_TEST_SSH_KEY"],
        allow_agent=False,
        look_for_keys=False,
    )
    command = f"squeue -h -j {shlex.quote(','.join(ids))} -o '%i|%T'"
    times = []
    try:
        for _ in range(polls):
            start = time.perf_counter()
            _, stdout, _ = client.exec_command(command)
            lines = stdout.read().decode().splitlines()
            times.append(time.perf_counter() - start)
            assert len(lines) == len(ids), f"squeue saw {len(lines)} of {len(ids)} jobs"
    finally:
        client.close()
    return times


def backend_polls(backend: SshSlurmBackend, ids: list[str], polls: int) -> tuple[list[float], int]:
    times, commands = [], 0
    for _ in range(polls):
        before = backend.commands_issued
        start = time.perf_counter()
        answer = backend.states(ids)
        times.append(time.perf_counter() - start)
        commands = max(commands, backend.commands_issued - before)
        queued = sum(s.state == RunState.QUEUED for s in answer.values())
        assert queued == len(ids), f"only {queued} of {len(ids)} jobs QUEUED"
    return times, commands


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--polls", type=int, default=15)
    args = parser.parse_args()

    env = cluster_env()
    base = f"mantik-runs/bench-{uuid.uuid4().hex[:8]}"
    backend = SshSlurmBackend(
        env["MANTIK_TEST_SSH_HOST"],
        port=int(env["MANTIK_TEST_SSH_PORT"]),
        username=env["MANTIK_TEST_SSH_USER"],
        key_filename=env["MANTIK_TEST_SSH_KEY"],
        known_hosts=env["MANTIK_TEST_SSH_KNOWN_HOSTS"],
        remote_dir=base,
    )
    ids: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            for index in range(args.jobs):
                ids.append(backend.submit(prepare(Path(tmp), index)))
            submit_time = time.perf_counter() - start
        print(
            f"submitted {len(ids)} held jobs in {submit_time:.1f} s "
            f"({1000 * submit_time / len(ids):.0f} ms per job, upload + sbatch)"
        )
        backend.states(ids)  # warm-up: connection, first sacct query
        ours, commands = backend_polls(backend, ids, args.polls)
        raw = raw_squeue(env, ids, args.polls)
    finally:
        if ids:
            backend._run("scancel " + " ".join(shlex.quote(i) for i in ids), "cleaning up")
        backend._run(f"rm -rf {shlex.quote(backend.remote_base())}", "cleaning up")
        backend.close()

    ours_ms, raw_ms = 1000 * statistics.median(ours), 1000 * statistics.median(raw)
    print(f"jobs per poll:              {len(ids)}")
    print(f"remote commands per poll:   {commands} (target 1)")
    print(f"backend.states() median:    {ours_ms:.1f} ms  (squeue + sacct + exit-code files)")
    print(f"raw paramiko squeue median: {raw_ms:.1f} ms  (new channel, same kind of link)")
    print(f"ratio backend / raw squeue: {ours_ms / raw_ms:.2f}")
    return 0 if commands == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
