"""Shared fixtures: the real MLflow server, the loopback Slurm cluster, a Jupyter server."""

from __future__ import annotations

from .cluster_fixtures import *  # noqa: F403
from .mlflow_fixtures import *  # noqa: F403

pytest_plugins = ["pytest_jupyter.jupyter_server", "tests.secret_audit", "tests.lab_fixtures"]
