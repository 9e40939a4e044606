"""The embedded tracking server's app: MLflow's basic-auth app, with what its start-up made
kept out of Python's full garbage collections.

A runs table's ``runs/search`` makes thousands of objects. Those still in use when a young
collection runs are promoted, and count toward the next full collection. That came every
16 or so such calls and walked everything the server holds (MLflow, SQLAlchemy, Flask,
FastAPI, pydantic: some 150-200 ms on the lab machine) while the call that set it off
waited: one call in 16 took 0.2 s longer, seen from the MLflow UI and the runs table
alike. Objects made at start-up live as long as the server; frozen, a full collection no
longer walks them.

Registered as MLflow's ``mlflow.app`` plugin ``mantik-basic-auth`` (``pyproject.toml``), so
that ``mlflow server --app-name mantik-basic-auth`` runs it in its worker.
"""

from __future__ import annotations

import gc
from typing import Any

APP_NAME = "mantik-basic-auth"


def create_app() -> Any:
    from mlflow.server.auth import create_app as basic_auth_app

    app = basic_auth_app()
    gc.collect()  # what start-up left as garbage is not frozen with the rest
    gc.freeze()
    return app
