"""Fill an MLflow sqlite store directly (MLflow's own schema and models): fast and real.

The store is created by MLflow's SqlAlchemyStore (all migrations), then rows go in with
bulk inserts through MLflow's SQLAlchemy models; an ``mlflow server`` started on the same
file afterwards serves them like any other runs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import insert

TERMINAL = ("FINISHED", "FAILED", "KILLED")


def open_store(directory: Path):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    directory.mkdir(parents=True, exist_ok=True)
    return SqlAlchemyStore(f"sqlite:///{directory / 'mlflow.db'}", str(directory / "artifacts"))


def insert_runs(store, experiment_id: str, runs: Iterable[Mapping[str, Any]]) -> list[str]:
    """``runs``: dicts with name, status, start_time, end_time, params, metrics (latest
    values), tags, history ({key: [(step, timestamp, value), ...]})."""
    from mlflow.store.tracking.dbmodels.models import (
        SqlLatestMetric,
        SqlMetric,
        SqlParam,
        SqlRun,
        SqlTag,
    )

    run_rows, params, tags, latest, history = [], [], [], [], []
    ids = []
    for run in runs:
        rid = uuid.uuid4().hex
        ids.append(rid)
        run_rows.append(
            {
                "run_uuid": rid,
                "name": run["name"],
                "source_type": "LOCAL",
                "source_name": "",
                "entry_point_name": "",
                "user_id": "bench",
                "status": run.get("status", "FINISHED"),
                "start_time": run["start_time"],
                "end_time": run.get("end_time"),
                "source_version": "",
                "lifecycle_stage": "active",
                "artifact_uri": f"mlflow-artifacts:/{experiment_id}/{rid}/artifacts",
                "experiment_id": int(experiment_id),
            }
        )
        params += [
            {"key": k, "value": str(v), "run_uuid": rid} for k, v in run.get("params", {}).items()
        ]
        tags += [{"key": "mlflow.runName", "value": run["name"], "run_uuid": rid}]
        tags += [{"key": k, "value": v, "run_uuid": rid} for k, v in run.get("tags", {}).items()]
        for key, value in run.get("metrics", {}).items():
            latest.append(
                {"key": key, "value": value, "timestamp": run["start_time"], "step": 0,
                 "is_nan": False, "run_uuid": rid}
            )  # fmt: skip
        for key, points in run.get("history", {}).items():
            history.append((rid, key, points))
            last = points[-1] if points else None
            if last is not None and key not in run.get("metrics", {}):
                latest.append(
                    {"key": key, "value": last[2], "timestamp": last[1], "step": last[0],
                     "is_nan": False, "run_uuid": rid}
                )  # fmt: skip
    with store.ManagedSessionMaker() as session:
        for model, rows in (
            (SqlRun, run_rows),
            (SqlParam, params),
            (SqlTag, tags),
            (SqlLatestMetric, latest),
        ):
            for start in range(0, len(rows), 50_000):
                session.execute(insert(model.__table__), rows[start : start + 50_000])
    # The metric values after their runs (foreign keys), in chunks.
    rows: list[dict[str, Any]] = []
    for rid, key, points in history:
        for step, timestamp, value in points:
            rows.append(
                {"key": key, "value": value, "timestamp": timestamp, "step": step,
                 "is_nan": False, "run_uuid": rid}
            )  # fmt: skip
            if len(rows) >= 200_000:
                _flush(store, SqlMetric, rows)
    _flush(store, SqlMetric, rows)
    return ids


def _flush(store, model, rows: list[dict[str, Any]]) -> None:
    if rows:
        with store.ManagedSessionMaker() as session:
            session.execute(insert(model.__table__), rows)
        rows.clear()


def log_runs_table(session: Any, uri: str) -> dict[str, Any]:
    """An experiment as a runs table shows it, logged through a server's REST API: 50 runs
    with 10 parameters, 5 metrics and 3 tags each. Returns the ``runs/search`` body that
    asks for it as the table does."""
    api = f"{uri.rstrip('/')}/api/2.0/mlflow/"
    table = session.post(api + "experiments/create", json={"name": "table"}).json()
    now = int(time.time() * 1000)
    for r in range(50):
        run = session.post(api + "runs/create", json={"experiment_id": table["experiment_id"]})
        session.post(
            api + "runs/log-batch",
            json={
                "run_id": run.json()["run"]["info"]["run_id"],
                "params": [{"key": f"p{k}", "value": str(r * k)} for k in range(10)],
                "metrics": [
                    {"key": f"m{k}", "value": r / (k + 1), "timestamp": now, "step": 0}
                    for k in range(5)
                ],
                "tags": [{"key": f"t{k}", "value": f"tag {r}"} for k in range(3)],
            },
        ).raise_for_status()
    return {"experiment_ids": [table["experiment_id"]], "max_results": 50}
