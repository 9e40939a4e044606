"""Slurm over SSH for an account whose login shell is not sh-like (tcsh, still the default
at some sites), on the loopback cluster: sshd hands every command to the login shell."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from mantik_jupyter.compute.states import RunState

from .test_ssh_slurm import FINAL, _backend, make_job, wait_for
from .test_ssh_slurm_login import _config, with_config

pytestmark = pytest.mark.slurm


@pytest.fixture
def tcsh_login(slurm_cluster) -> Iterator[None]:
    """The test user logs in to tcsh for this test (sshd reads the shell at each login;
    setup.sh puts bash back if a test died before it could)."""
    user = slurm_cluster.username
    subprocess.run(["usermod", "-s", "/usr/bin/tcsh", user], check=True)
    try:
        shell = subprocess.run(
            ["getent", "passwd", user], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert shell.endswith(":/usr/bin/tcsh"), shell
        yield
    finally:
        subprocess.run(["usermod", "-s", "/bin/bash", user], check=True)


def test_a_tcsh_account_submits_follows_and_cancels(slurm_cluster, tcsh_login, tmp_path):
    # tcsh refused the submit command ("Unmatched '.": a newline inside quotes) and the
    # job directory lookup (2>/dev/null is no csh): such an account could not submit.
    top = f"{slurm_cluster.remote_dir}/tcsh-{uuid.uuid4().hex[:8]}"
    b = _backend(slurm_cluster, "$HOME/" + top.split("/", 3)[-1])  # expanded remotely
    try:
        assert b.remote_base() == top
        job = with_config(
            make_job(tmp_path, 'echo "hello from $SLURM_JOB_ID"'),
            _config(PreRunCommandOnLoginNode="echo preparing"),
        )
        job_id = b.submit(job)
        assert wait_for(b, job_id, FINAL).state == RunState.FINISHED
        assert f"hello from {job_id}" in b.read_log(job_id)[0].decode()
        b.download(job_id, "", tmp_path / "got")  # the folder comes as a tar stream
        assert list((tmp_path / "got").rglob("mantik.log"))

        held = b.submit(make_job(tmp_path, "true", sbatch="#SBATCH --hold\n"))
        # Another lab: the run directory comes from Slurm (squeue/sacct %Z).
        other = _backend(slurm_cluster, top)
        try:
            other.cancel(held)
            assert wait_for(other, held, FINAL).state == RunState.KILLED
        finally:
            other.close()
    finally:
        b._run(f"rm -rf {top}", "cleaning up")
        b.close()
