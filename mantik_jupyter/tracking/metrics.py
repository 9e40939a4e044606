"""Metric series for comparisons: downsampling (LTTB), series building, summaries.

Pure data: numpy and plain Python, no widgets and no network, so the faces (widgets,
CLI, handlers) share it and it is testable on its own.

Largest-Triangle-Three-Buckets (Steinarsson, 2013) keeps the first and last point and,
for each of ``n - 2`` equal buckets, the point that spans the largest triangle with the
point kept in the previous bucket and the mean of the next bucket: spikes and the shape
of a curve survive where plain decimation loses them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MAX_POINTS = 2000
X_AXES = ("step", "time", "relative")
_LOWER_IS_BETTER = re.compile(r"loss|err|rmse|mse|mae|crps|bias|perplex|time|dist", re.I)


def lttb(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """Indices of at most ``n`` points of ``(x, y)`` chosen by LTTB (``x`` ascending).

    Returns all indices when there are ``n`` points or fewer. Non-finite ``y`` values are
    not chosen unless they are the first or last point.
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    size = len(xs)
    if n >= size or size <= 2:
        return np.arange(size)
    if n < 3:
        return np.array([0, size - 1])[: max(n, 1)] if n >= 1 else np.arange(0)
    ys = np.where(np.isfinite(ys), ys, np.nan)
    # Bucket edges over the inner points 1 .. size-2.
    edges = np.linspace(1, size - 1, n - 1).astype(int)
    # Mean of each bucket, vectorised (used as the third triangle corner).
    finite = np.nan_to_num(ys, nan=0.0)
    counts = np.add.reduceat(np.isfinite(ys).astype(float), edges[:-1])
    sums_y = np.add.reduceat(finite, edges[:-1])
    sums_x = np.add.reduceat(xs, edges[:-1])
    widths = np.diff(edges).astype(float)
    mean_x = sums_x / np.maximum(widths, 1)
    mean_y = np.divide(sums_y, counts, out=np.full_like(sums_y, np.nan), where=counts > 0)
    out = np.empty(n, dtype=int)
    out[0] = 0
    out[-1] = size - 1
    prev = 0
    for i in range(n - 2):
        lo, hi = edges[i], edges[i + 1]
        if i + 1 < n - 2:
            cx, cy = mean_x[i + 1], mean_y[i + 1]
        else:
            cx, cy = xs[-1], ys[-1]
        if not np.isfinite(cy):
            cy = ys[prev] if np.isfinite(ys[prev]) else 0.0
        ax, ay = xs[prev], ys[prev]
        if not np.isfinite(ay):
            ay = cy
        bx, by = xs[lo:hi], ys[lo:hi]
        area = np.abs((ax - cx) * (by - ay) - (ax - bx) * (cy - ay))
        area = np.where(np.isfinite(area), area, -1.0)
        pick = lo + int(np.argmax(area))
        out[i + 1] = pick
        prev = pick
    return out


@dataclass
class Series:
    """One run's values of one metric, ready to plot."""

    run_id: str
    key: str
    x: np.ndarray  # float (step, ms since the epoch or seconds)
    y: np.ndarray  # float, NaN where a value was not finite
    total_points: int  # values logged (or fetched) before downsampling
    exact: bool = True  # False when the server sampled the history before us

    @property
    def points(self) -> int:
        return len(self.x)


def history_arrays(
    history: Iterable[Mapping[str, Any]], x_axis: str = "step"
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of MLflow metric dicts ``{step, timestamp, value}``, sorted by x.

    ``x_axis``: ``step``, ``time`` (wall clock, ms since the epoch) or ``relative``
    (seconds since the first value).
    """
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {', '.join(X_AXES)}, got {x_axis!r}")
    rows = list(history)
    if not rows:
        return np.empty(0), np.empty(0)
    steps = np.fromiter((int(r.get("step", 0) or 0) for r in rows), dtype=float, count=len(rows))
    times = np.fromiter(
        (int(r.get("timestamp", 0) or 0) for r in rows), dtype=float, count=len(rows)
    )
    values = np.fromiter((_float(r.get("value")) for r in rows), dtype=float, count=len(rows))
    if x_axis == "step":
        order = np.lexsort((times, steps))
        x = steps[order]
    else:
        order = np.lexsort((steps, times))
        x = times[order]
        if x_axis == "relative":
            x = (x - x[0]) / 1000.0
    return x, values[order]


def build_series(
    run_id: str,
    key: str,
    history: Iterable[Mapping[str, Any]] | tuple[np.ndarray, np.ndarray],
    *,
    x_axis: str = "step",
    max_points: int = DEFAULT_MAX_POINTS,
    exact: bool = True,
) -> Series:
    """A plot-ready series, downsampled by LTTB to at most ``max_points``."""
    if isinstance(history, tuple):
        x, y = history
    else:
        x, y = history_arrays(history, x_axis)
    keep = lttb(x, y, max_points)
    return Series(
        run_id=run_id,
        key=key,
        x=np.asarray(x[keep], dtype=float),
        y=np.asarray(y[keep], dtype=float),
        total_points=len(x),
        exact=exact,
    )


def lower_is_better(key: str) -> bool:
    """Guess the direction of a metric from its name (loss, error, rmse ... : lower)."""
    return bool(_LOWER_IS_BETTER.search(key))


@dataclass
class Summary:
    """Final value of each metric per run, and the best run per metric."""

    metrics: list[str]
    rows: list[dict[str, Any]]  # {"run_id", "name", "values": {metric: float|None}}
    best: dict[str, str | None] = field(default_factory=dict)  # metric -> run_id
    goals: dict[str, str] = field(default_factory=dict)  # metric -> "min" | "max"


def summarize(
    runs: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    goals: Mapping[str, str] | None = None,
) -> Summary:
    """``runs``: ``{"run_id", "name", "metrics": {key: latest value}}``. ``goals`` maps a
    metric to ``min``/``max`` (default: guessed from the name)."""
    goals = dict(goals or {})
    rows = [
        {
            "run_id": r["run_id"],
            "name": r.get("name") or r["run_id"][:8],
            "values": {m: _finite(r.get("metrics", {}).get(m)) for m in metrics},
        }
        for r in runs
    ]
    best: dict[str, str | None] = {}
    resolved: dict[str, str] = {}
    for m in metrics:
        goal = goals.get(m) or ("min" if lower_is_better(m) else "max")
        if goal not in ("min", "max"):
            raise ValueError(f"goal of {m!r} must be 'min' or 'max', got {goal!r}")
        resolved[m] = goal
        candidates = [(row["values"][m], row["run_id"]) for row in rows]
        candidates = [c for c in candidates if c[0] is not None]
        if not candidates:
            best[m] = None
            continue
        pick = min if goal == "min" else max
        best[m] = pick(candidates, key=lambda c: c[0])[1]
    return Summary(metrics=list(metrics), rows=rows, best=best, goals=resolved)


def varying_params(params_by_run: Sequence[Mapping[str, str]], limit: int = 8) -> list[str]:
    """Param keys whose values differ between runs (missing counts as a value), sorted."""
    keys = sorted({k for p in params_by_run for k in p})
    varying = [k for k in keys if len({p.get(k) for p in params_by_run}) > 1]
    return varying[:limit]


def numeric_or_codes(values: Sequence[str | None]) -> tuple[list[float | None], list[str] | None]:
    """Numbers as floats; categorical values as codes with their labels (for axes)."""
    try:
        return [None if v in (None, "") else float(v) for v in values], None
    except (TypeError, ValueError):
        labels = sorted({str(v) for v in values if v is not None})
        index = {label: i for i, label in enumerate(labels)}
        return [None if v is None else float(index[str(v)]) for v in values], labels


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = _float(value)
    return number if math.isfinite(number) else None
