"""Submit latency: ``RunService.submit`` over SSH against a plain ``ssh host sbatch script``.

The target compares the time until the job is known to Slurm (``sbatch`` has
answered, so ``squeue`` lists it). Before that, ours packages the project,
creates the MLflow run (SCHEDULED, tags, params), makes the run's MLflow user,
uploads over SFTP, unpacks and runs sbatch; the artifacts (code archive, config,
job script) upload meanwhile, and ``submit`` returns once they and the job's
tags are stored, so the time until it returns is printed too. The baseline is
the OpenSSH client running ``sbatch`` on a script already on the cluster.
Measured in the same run on the loopback cluster (tests/cluster/setup.sh, as
root) and a real MLflow basic-auth server configured as the embedded one.
The first submission (new SSH connection, experiment created) is printed apart.
Target: ratio <= 2.

    PYTHONPATH=. python bench/submit.py [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from bench.status_poll import cluster_env
from mantik_jupyter.compute.backends.ssh_slurm import SshSlurmBackend
from mantik_jupyter.compute.runs import RunService
from mantik_jupyter.tracking.credentials import CredentialStore
from mantik_jupyter.tracking.service import TrackingService
from tests.mlflow_fixtures import start_mlflow_server, stop_mlflow_server

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "weather-forecast"


def ssh(env: dict[str, str], command: str) -> str:
    return subprocess.run(
        [
            "ssh",
            "-p",
            env["MANTIK_TEST_SSH_PORT"],
            "-i",
            env["MANTIK_TEST_SSH_KEY"],
            "-o",
            f"UserKnownHostsFile={env['MANTIK_TEST_SSH_KNOWN_HOSTS']}",
            "-o",
            "BatchMode=yes",
            f"{env['MANTIK_TEST_SSH_USER']}@{env['MANTIK_TEST_SSH_HOST']}",
            command,
        ],  # fmt: skip
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def record_sbatch_answers(answered: list[float]) -> None:
    """Note when the backend's submit returned (sbatch answered: the job is in squeue)."""
    submit = SshSlurmBackend.submit

    def timed(self, job, progress=None):
        job_id = submit(self, job, progress)
        answered.append(time.perf_counter())
        return job_id

    SshSlurmBackend.submit = timed  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env = cluster_env()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        server = start_mlflow_server(tmp / "mlflow")
        job_ids: list[str] = []
        try:
            project = tmp / "project"
            shutil.copytree(EXAMPLE, project)
            venv = str(Path(env["MANTIK_TEST_PYTHON"]).parent.parent)
            (project / "compute-backend-config.yaml").write_text(
                yaml.safe_dump(
                    {
                        "SSH": {
                            "Hostname": env["MANTIK_TEST_SSH_HOST"],
                            "Port": int(env["MANTIK_TEST_SSH_PORT"]),
                            "Username": env["MANTIK_TEST_SSH_USER"],
                            "IdentityFile": env["MANTIK_TEST_SSH_KEY"],
                            "KnownHostsFile": env["MANTIK_TEST_SSH_KNOWN_HOSTS"],
                            "RemoteDirectory": "mantik-bench-submit",
                        },
                        "Resources": {"Queue": "debug", "Runtime": "5m"},
                        "Environment": {"Python": venv},
                    }
                )
            )
            store = CredentialStore(tmp / "credentials.json")
            store.set(server.uri, server.admin)
            tracking = TrackingService(
                store, tracking_uri=server.uri, embedded_credential=server.admin
            )
            service = RunService(tracking, work_dir=tmp / "work")
            ssh(env, "mkdir -p mantik-bench-baseline && printf '#!/bin/bash\\nsleep 300\\n' "
                "> mantik-bench-baseline/job.sh")  # fmt: skip

            answered: list[float] = []
            record_sbatch_answers(answered)
            queued: list[float] = []
            returned: list[float] = []
            plain: list[float] = []
            for i in range(args.runs + 1):
                t0 = time.perf_counter()
                run = service.submit(project, entry_point="sleep", params={"seconds": "300"})
                elapsed = time.perf_counter() - t0
                assert run.job_id
                job_ids.append(run.job_id)
                t1 = time.perf_counter()
                job_ids.append(
                    ssh(env, "sbatch --parsable -p debug -o /dev/null mantik-bench-baseline/job.sh")
                )
                base = time.perf_counter() - t1
                if i:  # the first of each warms connections and caches
                    queued.append(answered[-1] - t0)
                    returned.append(elapsed)
                    plain.append(base)
                else:
                    first = (answered[-1] - t0, elapsed)
            visible = set(ssh(env, "squeue -h -o %i").split())
            assert set(job_ids) <= visible, "a submitted job is not in squeue"
            q, r = statistics.median(queued), statistics.median(returned)
            p = statistics.median(plain)
            print(f"submit -> job in squeue, median of {args.runs} (after one warm-up):")
            print(f"  mantik RunService.submit, until sbatch answered: {q * 1000:8.1f} ms")
            print(f"  mantik RunService.submit, until it returned:     {r * 1000:8.1f} ms")
            print(f"  plain ssh host sbatch script:                    {p * 1000:8.1f} ms")
            print(f"  ratio (job in squeue):   {q / p:.2f}  (target <= 2)")
            print(f"  ratio (submit returned): {r / p:.2f}")
            print(
                f"  first submission (SSH login, new experiment): sbatch answered after "
                f"{first[0] * 1000:.0f} ms, returned after {first[1] * 1000:.0f} ms"
            )
            service.close()
        finally:
            if job_ids:
                ssh(env, "scancel " + " ".join(job_ids))
            ssh(env, "rm -rf mantik-bench-submit mantik-bench-baseline")
            stop_mlflow_server(server.proc)


if __name__ == "__main__":
    main()
