"""A MetricComparison in a real kernel: what displaying it sends to the browser, and what
a notebook executed by nbconvert (widget state stored) weighs.

Each plotly FigureWidget carried plotly's 4.6 MB widget bundle in its model's state: a
comparison (two of them) sent 10.3 MB to the browser and made a 10.4 MB notebook."""

from __future__ import annotations

import pytest

from .comparison_comms import kernel_env, measure

pytestmark = pytest.mark.timeout(300)

MB = 1_000_000


def test_a_comparison_sends_its_data_not_plotlys_bundle(mlflow_server, tmp_path):
    cost = measure(kernel_env(mlflow_server, tmp_path / "data"))
    # Two runs x two metrics x 2,000 points are about 0.13 MB as binary numbers.
    assert cost.shown < 0.5 * MB, cost
    assert cost.largest < 0.5 * MB, cost
    assert cost.notebook < 0.5 * MB, cost
    assert cost.updated < 0.5 * MB, cost
