"""Runs for the widget tests and benchmarks, logged through MLflow's REST API."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from mantik_jupyter.tracking.runs_api import RunsApi

MAX_METRICS_PER_BATCH = 1000


def make_run(
    api: RunsApi,
    experiment_id: str,
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    status: str = "FINISHED",
    tags: Mapping[str, str] | None = None,
    start_time: int | None = None,
) -> str:
    """One run in as few requests as MLflow allows: create (with tags), one log-batch for
    params and up to 1000 metric values, and an update for a final status."""
    t0 = start_time or int(time.time() * 1000)
    run = api.create_run(experiment_id, run_name=name, tags=tags, start_time=t0)
    run_id = run["info"]["run_id"]
    points = [
        {"key": key, "value": value, "step": step, "timestamp": t0 + step * 10}
        for key, series in (metrics or {}).items()
        for step, value in series
    ]
    room = MAX_METRICS_PER_BATCH - len(params or {})
    first, rest = points[:room], points[room:]
    body: dict[str, Any] = {"run_id": run_id}
    if params:
        body["params"] = [{"key": k, "value": str(v)} for k, v in params.items()]
    if first:
        body["metrics"] = first
    if len(body) > 1:
        api.client.api("POST", "runs/log-batch", **body)
    for start in range(0, len(rest), MAX_METRICS_PER_BATCH):
        api.client.api(
            "POST",
            "runs/log-batch",
            run_id=run_id,
            metrics=rest[start : start + MAX_METRICS_PER_BATCH],
        )
    if status != "RUNNING":
        api.update_run(run_id, status=status, end_time=t0 + 60_000)
    return run_id
