"""What the run table asks MLflow, and how a run becomes a row. No widgets here.

Sorting and filtering happen on the tracking server (``runs/search`` ``order_by`` and
``filter``), one page at a time: a table over 10,000 runs loads ``page_size`` of them.
Only the duration column (end - start, which MLflow cannot order by) sorts the loaded page.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..compute.run_record import ACTIVE_STATES, TAG_BACKEND, RunInfo
from ..tracking.metrics import varying_params
from ..tracking.runs_api import RunsApi, quote_filter_value

STATES = ("all", "active", "FINISHED", "FAILED", "KILLED")
ACTIVE_STATUSES = ("RUNNING", "SCHEDULED")
FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_RAW_FILTER = re.compile(r"^\s*(params?|metrics?|tags?|attributes?|attr)\.", re.I)
_SORT_FIXED = {
    "name": "attributes.run_name",
    "state": "attributes.status",
    "backend": f"tags.`{TAG_BACKEND}`",
    "start": "attributes.start_time",
}
FIXED_COLUMNS: list[dict[str, Any]] = [
    {"key": "name", "label": "Name"},
    {"key": "state", "label": "State"},
    {"key": "backend", "label": "Backend"},
    {"key": "start", "label": "Start"},
    {"key": "duration", "label": "Duration", "numeric": True},
]


def _quote_key(key: str) -> str:
    if "`" in key:
        raise ValueError(f"{key!r} cannot be used in a search")
    return f"`{key}`"


def order_by_for(column: str, desc: bool) -> list[str] | None:
    """MLflow ``order_by`` for a column key; ``None`` when MLflow cannot sort by it."""
    direction = "DESC" if desc else "ASC"
    if column in _SORT_FIXED:
        clause = _SORT_FIXED[column]
    elif column.startswith(("params.", "metrics.")):
        kind, _, key = column.partition(".")
        clause = f"{kind}.{_quote_key(key)}"
    else:
        return None
    # A stable tie-break keeps pages disjoint.
    tie = [] if column == "start" else ["attributes.start_time DESC"]
    return [f"{clause} {direction}", *tie]


def filter_for(text: str = "", state: str = "all", mantik_only: bool = False) -> str:
    """MLflow filter: ``text`` matches the run name (case-insensitive), or is an MLflow
    filter itself when it starts with ``params.``/``metrics.``/``tags.``/``attributes.``."""
    conditions: list[str] = []
    if mantik_only:
        conditions.append(f"tags.`{TAG_BACKEND}` LIKE '%'")
    text = (text or "").strip()
    if text:
        if _RAW_FILTER.match(text):
            conditions.append(text)
        else:
            # MLflow's LIKE has no escape character: ``_`` and ``%`` in the text stand for
            # themselves only as the one-character wildcard ``_``, which matches them too
            # (and, rarely, another character there).
            like = text.replace("%", "_")
            conditions.append(f"attributes.run_name ILIKE {quote_filter_value('%' + like + '%')}")
    word = (state or "all").strip()
    if word.lower() == "active":
        conditions += [f"attributes.status != '{s}'" for s in FINAL_STATUSES]
    elif word.upper() in FINAL_STATUSES:
        conditions.append(f"attributes.status = '{word.upper()}'")
    elif word.lower() != "all":
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    return " and ".join(conditions)


def ids_filter(run_ids: Iterable[str]) -> str:
    ids = ", ".join(quote_filter_value(i) for i in run_ids)
    return f"attributes.run_id IN ({ids})"


def is_active(run: Mapping[str, Any]) -> bool:
    return run["info"].get("status") in ACTIVE_STATUSES


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def duration_of(info: RunInfo, now_ms: int | None = None) -> float | None:
    if not info.start_time:
        return None
    end = info.end_time or (now_ms if info.mlflow_status in ACTIVE_STATUSES else None)
    if end is None:
        end = int(time.time() * 1000)
    return max(0.0, (end - info.start_time) / 1000)


@dataclass
class Row:
    run_id: str
    info: RunInfo
    run: dict[str, Any] = field(repr=False)

    @property
    def active(self) -> bool:
        # Also a mantik run whose job ended while no one followed it: MLflow has its end
        # (the training code ended the run), its state is still the last one recorded,
        # and a table that skipped it showed RUNNING for good.
        return self.info.mlflow_status in ACTIVE_STATUSES or bool(
            self.info.backend and self.info.state in ACTIVE_STATES
        )

    def cells(self, params: Sequence[str], metrics: Sequence[str]) -> dict[str, Any]:
        info = self.info
        start = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(info.start_time / 1000))
            if info.start_time
            else ""
        )
        cells: dict[str, Any] = {
            "name": info.run_name or info.run_id[:8],
            "state": str(info.state),
            "backend": info.backend or "",
            "start": start,
            "duration": format_duration(duration_of(info, int(time.time() * 1000))),
        }
        for key in params:
            cells[f"params.{key}"] = info.params.get(key, "")
        for key in metrics:
            cells[f"metrics.{key}"] = format_value(info.metrics.get(key))
        return cells

    def to_json(self, params: Sequence[str], metrics: Sequence[str]) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "state": str(self.info.state),
            "active": self.active,
            "cells": self.cells(params, metrics),
        }


def to_rows(runs: Iterable[Mapping[str, Any]]) -> list[Row]:
    return [Row(r["info"]["run_id"], RunInfo.from_run(r), dict(r)) for r in runs]


def default_columns(
    rows: Sequence[Row], max_params: int = 5, max_metrics: int = 5
) -> tuple[list[str], list[str]]:
    """Sensible columns: the params that vary between the runs, and the latest metrics."""
    params = varying_params([r.info.params for r in rows], limit=max_params)
    if not params and rows:
        params = sorted({k for r in rows for k in r.info.params})[:max_params]
    metrics = sorted({k for r in rows for k in r.info.metrics})[:max_metrics]
    return params, metrics


def columns_for(params: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    return [
        *FIXED_COLUMNS,
        *({"key": f"params.{k}", "label": k} for k in params),
        *({"key": f"metrics.{k}", "label": k, "numeric": True} for k in metrics),
    ]


def experiment_ids_for(
    api: RunsApi, experiment: str | int | Sequence[str | int] | None
) -> list[str]:
    """Ids for experiment names or ids (``None``: every active experiment)."""
    if experiment is None:
        return [str(e["experiment_id"]) for e in api.search_experiments()]
    items = [experiment] if isinstance(experiment, (str, int)) else list(experiment)
    ids = []
    for item in items:
        text = str(item)
        if text.isdigit():
            ids.append(text)
            continue
        found = api.get_experiment_by_name(text)
        if found is None:
            from ..errors import NotFound

            raise NotFound(f"No experiment named {text!r} on {api.client.uri}")
        ids.append(str(found["experiment_id"]))
    return ids


def short_json(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
