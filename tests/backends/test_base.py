"""The optional hooks of ``Backend``: a backend without a run directory needs none."""

from __future__ import annotations

import inspect

import pytest

from mantik_jupyter.compute.backends.base import Backend, Capabilities
from mantik_jupyter.compute.backends.local import LocalBackend
from mantik_jupyter.compute.backends.ssh_slurm import SshSlurmBackend
from mantik_jupyter.compute.backends.unicore import UnicoreBackend


class _Minimal(Backend):
    """Only the abstract methods; the tests call none of them."""

    capabilities = Capabilities(name="minimal")

    def submit(self, job, progress=None):
        raise NotImplementedError

    def states(self, job_ids):
        raise NotImplementedError

    def read_log(self, job_id, offset=0):
        raise NotImplementedError

    def cancel(self, job_id):
        raise NotImplementedError

    def list_files(self, job_id, path=""):
        raise NotImplementedError

    def download(self, job_id, path, dest, progress=None):
        raise NotImplementedError

    def open_file(self, job_id, path):
        raise NotImplementedError


def test_a_backend_without_run_directories_records_none_and_ignores_attach():
    backend = _Minimal()
    assert backend.run_dir_of("job-1") == ""
    backend.attach("job-1", "/somewhere")
    assert backend.run_dir_of("job-1") == ""


@pytest.mark.parametrize("cls", [LocalBackend, SshSlurmBackend, UnicoreBackend])
@pytest.mark.parametrize("hook", ["attach", "run_dir_of"])
def test_backends_with_run_directories_keep_them(cls, hook):
    # A restarted lab hands the recorded run directory back through attach.
    assert getattr(cls, hook) is not getattr(Backend, hook)
    assert list(inspect.signature(getattr(cls, hook)).parameters) == list(
        inspect.signature(getattr(Backend, hook)).parameters
    )
