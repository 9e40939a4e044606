"""Shared fixtures: the real MLflow server, the loopback Slurm cluster, a Jupyter server."""

from __future__ import annotations

import os

import pytest

from .cluster_fixtures import *  # noqa: F403
from .mlflow_fixtures import *  # noqa: F403

pytest_plugins = [
    "pytest_jupyter.jupyter_server",
    "tests.secret_audit",
    "tests.lab_fixtures",
    "tests.ipython_fixtures",
    "tests.runs_fixtures",
]


@pytest.fixture(autouse=True)
def _restore_environ():
    """The in-process lab exports MANTIK_* variables for its kernels; keep tests apart."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
