"""Fixtures of the RunService tests (local, Slurm, UNICORE, magics), registered in conftest.

Module-scoped fixtures here are made once per test module that uses them, as if each module
defined them itself; a module may still override one by defining a fixture of the same name.
"""

from __future__ import annotations

import uuid

import pytest

from mantik_jupyter.compute.runs import RunService

from .runs_helpers import make_tracking
from .unicore_standin.fixtures import USER, new_password, start_site


@pytest.fixture(scope="module")
def user(mlflow_server):
    """A tracking user of the session's MLflow server, one per test module."""
    return mlflow_server.create_user()


@pytest.fixture(scope="module")
def tracking(mlflow_server, user, tmp_path_factory):
    """Embedded mode against the session's server: ``user``'s stored login submits."""
    return make_tracking(mlflow_server, tmp_path_factory.mktemp("tracking"), user)


@pytest.fixture
def experiment_name(request) -> str:
    """An MLflow experiment name that only this test (this parameter set) submits to.

    A module's ``user`` is made again when pytest comes back to the module after another
    one (module fixtures end with each visit), and under basic auth an experiment the first
    user made is not the second's to add runs to: a name shared between tests refused them.
    """
    return f"{request.node.originalname.removeprefix('test_')[:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def service(tracking, tmp_path):
    svc = RunService(tracking, work_dir=tmp_path / "work")
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def unicore_password():
    return new_password()


@pytest.fixture(scope="module")
def unicore_site(tmp_path_factory, unicore_password):
    """The UNICORE stand-in site on loopback (tests/unicore_standin), one per test module."""
    site = start_site(tmp_path_factory.mktemp("unicore-site"), unicore_password)
    yield site
    site.close()


@pytest.fixture
def unicore_login(monkeypatch, unicore_password):
    """The stand-in's user and password in the environment, as a user sets them."""
    monkeypatch.setenv("MANTIK_UNICORE_USERNAME", USER)
    monkeypatch.setenv("MANTIK_UNICORE_PASSWORD", unicore_password)
