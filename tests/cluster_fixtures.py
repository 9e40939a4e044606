"""pytest fixtures for the loopback Slurm cluster and sshd (tests/cluster/setup.sh).

Import from tests/conftest.py with ``from .cluster_fixtures import *`` (or list
``tests.cluster_fixtures`` in ``pytest_plugins``).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["ClusterInfo", "slurm_cluster", "CLUSTER_DIR", "SETUP_SCRIPT", "SSHD_SCRIPT"]

CLUSTER_DIR = Path(os.environ.get("MANTIK_TEST_CLUSTER_DIR", "/tmp/mantik-test-cluster"))
SETUP_SCRIPT = Path(__file__).parent / "cluster" / "setup.sh"
SSHD_SCRIPT = Path(__file__).parent / "cluster" / "sshd.sh"


@dataclass(frozen=True)
class ClusterInfo:
    host: str
    port: int
    username: str
    key_path: Path
    known_hosts: Path
    # Absolute directory on the cluster for run directories; tests may use subfolders.
    remote_dir: str
    # A Python with mlflow that jobs on the node can run.
    python: str
    state_dir: Path

    def sshd(self, action: str) -> None:
        """Stop, start or restart the test sshd (``stop`` also ends open connections)."""
        subprocess.run([str(SSHD_SCRIPT), action], check=True, capture_output=True, timeout=60)


def _read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.fixture(scope="session")
def slurm_cluster() -> ClusterInfo:
    """Brings the cluster up once per session (a few seconds when it is already up)."""
    if os.geteuid() != 0:
        pytest.skip("the loopback Slurm cluster needs root to start (tests/cluster/setup.sh)")
    done = subprocess.run(
        [str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"tests/cluster/setup.sh failed:\n{done.stdout}\n{done.stderr}")
    env = _read_env(CLUSTER_DIR / "cluster.env")
    user = env["MANTIK_TEST_SSH_USER"]
    return ClusterInfo(
        host=env["MANTIK_TEST_SSH_HOST"],
        port=int(env["MANTIK_TEST_SSH_PORT"]),
        username=user,
        key_path=Path(env["MANTIK_TEST_SSH_KEY"]),
        known_hosts=Path(env["MANTIK_TEST_SSH_KNOWN_HOSTS"]),
        remote_dir=f"{pwd.getpwnam(user).pw_dir}/mantik-runs",
        python=env["MANTIK_TEST_PYTHON"],
        state_dir=CLUSTER_DIR,
    )
