"""Inline dashboards: ``RunTable``, ``MetricComparison`` and ``LogView`` (ipywidgets).

>>> from mantik_jupyter.widgets import RunTable, MetricComparison
>>> RunTable(experiment="weather-forecast")
>>> MetricComparison([run_a, run_b], metrics=["loss"])
"""

from __future__ import annotations

from .log_view import LogView
from .metric_comparison import MetricComparison
from .run_table import RunTable

__all__ = ["LogView", "MetricComparison", "RunTable"]
