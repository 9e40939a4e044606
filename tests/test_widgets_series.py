"""Pure pieces of the dashboards: LTTB, series, summaries, the table's MLflow queries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mantik_jupyter.tracking.metrics import (
    build_series,
    history_arrays,
    lower_is_better,
    lttb,
    numeric_or_codes,
    summarize,
    varying_params,
)
from mantik_jupyter.widgets import query as q


def test_lttb_keeps_ends_spikes_and_order():
    x = np.arange(100_000, dtype=float)
    y = np.sin(x / 5000)
    y[43_210] = 25.0
    y[77_777] = -25.0
    keep = lttb(x, y, 2000)
    assert len(keep) == 2000 and keep[0] == 0 and keep[-1] == 99_999
    assert np.all(np.diff(keep) > 0)
    assert 43_210 in keep and 77_777 in keep
    # The shape survives: the downsampled curve stays close to the original.
    far = (np.abs(x - 43_210) > 200) & (np.abs(x - 77_777) > 200)
    assert np.max(np.abs(np.interp(x, x[keep], y[keep]) - y)[far]) < 0.02


def test_lttb_small_inputs_and_nan():
    assert list(lttb([0, 1, 2], [1, 2, 3], 10)) == [0, 1, 2]
    assert list(lttb(range(10), range(10), 2)) == [0, 9]
    y = [0.0, math.nan, 1.0, math.nan, 5.0, 0.0, 2.0, 1.0]
    keep = lttb(range(8), y, 4)
    assert keep[0] == 0 and keep[-1] == 7 and not any(math.isnan(y[i]) for i in keep[1:-1])


def test_series_by_step_time_and_relative():
    hist = [
        {"step": 2, "timestamp": 3000, "value": 0.5},
        {"step": 0, "timestamp": 1000, "value": 1.0},
        {"step": 1, "timestamp": 2000, "value": "NaN"},
    ]
    x, y = history_arrays(hist, "step")
    assert list(x) == [0, 1, 2] and y[0] == 1.0 and math.isnan(y[1])
    s = build_series("r", "loss", hist, x_axis="relative")
    assert list(s.x) == [0.0, 1.0, 2.0] and s.total_points == 3
    assert s.y[0] == 1.0 and math.isnan(s.y[1]) and s.y[2] == 0.5
    assert build_series("r", "loss", hist, x_axis="time").x[0] == 1000
    with pytest.raises(ValueError):
        history_arrays(hist, "epoch")
    assert build_series("r", "loss", [], max_points=10).points == 0


def test_summary_best_run_per_metric():
    runs = [
        {"run_id": "a", "name": "A", "metrics": {"val_loss": 0.3, "accuracy": 0.8}},
        {"run_id": "b", "name": "B", "metrics": {"val_loss": 0.2, "accuracy": 0.7}},
        {"run_id": "c", "metrics": {"accuracy": float("nan")}},
    ]
    summary = summarize(runs, ["val_loss", "accuracy"])
    assert summary.best == {"val_loss": "b", "accuracy": "a"}
    assert summary.goals == {"val_loss": "min", "accuracy": "max"}
    assert summary.rows[2]["values"] == {"val_loss": None, "accuracy": None}
    assert summarize(runs, ["accuracy"], {"accuracy": "min"}).best["accuracy"] == "b"
    assert lower_is_better("train/RMSE") and not lower_is_better("skill_score")


def test_varying_params_and_codes():
    params = [{"lr": "0.1", "ds": "era5"}, {"lr": "0.2", "ds": "era5", "seed": "1"}]
    assert varying_params(params) == ["lr", "seed"]
    assert numeric_or_codes(["1", "2.5", None]) == ([1.0, 2.5, None], None)
    assert numeric_or_codes(["sgd", "adam", "sgd"]) == ([1.0, 0.0, 1.0], ["adam", "sgd"])


def test_table_queries():
    assert q.order_by_for("start", True) == ["attributes.start_time DESC"]
    assert q.order_by_for("metrics.val loss", False) == [
        "metrics.`val loss` ASC",
        "attributes.start_time DESC",
    ]
    assert q.order_by_for("duration", True) is None
    assert q.filter_for("it's", "all") == "attributes.run_name ILIKE '%it\\'s%'"
    assert q.filter_for("params.lr = '0.1'", "FAILED") == (
        "params.lr = '0.1' and attributes.status = 'FAILED'"
    )
    active = q.filter_for("", "active", mantik_only=True)
    assert active.startswith("tags.`mantik.backend` LIKE '%'")
    assert "attributes.status != 'FINISHED'" in active
    with pytest.raises(ValueError):
        q.filter_for("", "sleeping")
    assert q.format_duration(59) == "59s" and q.format_duration(3725) == "1h02m"
