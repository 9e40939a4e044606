"""What a MetricComparison costs a browser: the bytes of the messages a real kernel sends
when one is displayed (and updated), and the size of a notebook with one comparison
executed by nbconvert (which stores the widget state). The test and
bench/metric_comparison.py use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .log_view_comms import REPO, LogKernel
from .mlflow_fixtures import MlflowServer, start_mlflow_server, stop_mlflow_server

# Two runs with two metrics, ``{steps}`` steps each, in ``{experiment}``: what a user
# compares first.
SEED = """\
import math, time
from mantik_jupyter.widgets import MetricComparison, RunTable
from mantik_jupyter.widgets._core import default_service, runs_api

api = runs_api(default_service())
exp, _ = api.get_or_create_experiment("{experiment}")
ids = []
for name, scale, width in [("baseline", 1.0, 64), ("wider", 0.6, 128)]:
    rid = api.create_run(exp, run_name=name)["info"]["run_id"]
    now = int(time.time() * 1000)
    values = [
        {{"key": key, "value": f * scale * math.exp(-s / 60) + 0.02 * math.sin(s),
          "step": s, "timestamp": now + 100 * s}}
        for s in range({steps}) for key, f in (("loss", 1.0), ("rmse", 2.0))
    ]
    for start in range(0, len(values), 900):
        api.client.api(
            "POST", "runs/log-batch", run_id=rid, metrics=values[start : start + 900],
            params=[{{"key": "width", "value": str(width)}}] if start == 0 else [],
        )
    api.update_run(rid, status="FINISHED", end_time=now + 100 * {steps})
    ids.append(rid)
print("runs ready", len(ids))
"""

SHOW = "comp = {widget}(ids, metrics=['loss', 'rmse'])\ncomp"
# What a user does next: another x axis, then one metric only.
INTERACT = "comp.x_select.value = 'relative'\ncomp.metric_select.value = ('loss',)"

# The MetricComparison of before: two plotly FigureWidgets, each model carrying plotly's
# whole widget bundle (``_esm``). The baseline the bench measures against in the same run.
TWO_FIGURE_WIDGETS = """\
import plotly.graph_objects as go
from mantik_jupyter.widgets import metric_comparison as mc

class FigureWidgetComparison(mc.MetricComparison):
    def _draw(self, figure, params_figure):
        if not isinstance(self.figure, go.FigureWidget):
            self.figure, self.params_figure = go.FigureWidget(), go.FigureWidget()
            self.children = [self.children[0], self.figure, *self.children[2:-1],
                             self.params_figure]
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.layout = figure.layout
            self.figure.add_traces(figure.data)
        with self.params_figure.batch_update():
            self.params_figure.data = ()
            self.params_figure.layout = params_figure.layout
            self.params_figure.add_traces(params_figure.data)
"""


def message_bytes(msg: dict) -> int:
    """Bytes of a message's content and binary buffers, as they travel to the browser."""
    content = len(json.dumps(msg["content"]).encode())
    return content + sum(len(memoryview(b).cast("B")) for b in msg.get("buffers") or ())


@dataclass
class Cost:
    shown: int  # bytes of the cell that displays the comparison
    updated: int  # bytes of the cell that changes its x axis and metrics
    largest: int  # the largest single message
    notebook: int  # bytes of the nbconvert-executed notebook


class ComparisonKernel(LogKernel):
    def cell_bytes(self, code: str) -> tuple[int, int]:
        """Run a cell; (bytes of every iopub message it caused, the largest one)."""
        start = len(self.iopub)
        self.run(code)
        self.drain(0.5)  # widget messages sent after the cell went idle
        sizes = [message_bytes(msg) for msg in self.iopub[start:]]
        return sum(sizes), max(sizes)


def kernel_env(server: MlflowServer, data_dir: Path) -> dict[str, str]:
    """The environment a kernel needs to use ``server`` as its admin."""
    return {
        **os.environ,
        **server.env(server.admin),
        "MANTIK_DATA_DIR": str(data_dir),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


@contextmanager
def tracking_env() -> Iterator[dict[str, str]]:
    """A real MLflow server of its own; the environment a kernel needs to use it."""
    with tempfile.TemporaryDirectory(prefix="comparison-comms-") as tmp:
        server = start_mlflow_server(Path(tmp) / "mlflow")
        try:
            yield kernel_env(server, Path(tmp) / "data")
        finally:
            stop_mlflow_server(server.proc)


def measure(env: dict[str, str], widget: str = "MetricComparison", steps: int = 2000) -> Cost:
    """Display one ``widget`` comparison in a kernel and update it once; then execute a
    notebook holding the same cells with nbconvert."""
    preamble = TWO_FIGURE_WIDGETS if widget != "MetricComparison" else ""
    seed = SEED.format(experiment="comparison-bytes", steps=steps)
    cells = [seed + preamble, SHOW.format(widget=widget)]
    with tempfile.TemporaryDirectory(prefix="comparison-comms-") as tmp:
        saved = dict(os.environ)
        os.environ.update(env)  # the kernel inherits it
        try:
            kernel = ComparisonKernel(Path(tmp))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            kernel.run(cells[0])
            shown, largest = kernel.cell_bytes(cells[1])
            updated, most = kernel.cell_bytes(INTERACT)
        finally:
            kernel.close()
        path = Path(tmp) / "comparison.ipynb"
        path.write_text(json.dumps(notebook(cells)))
        subprocess.run(
            [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
             "--inplace", str(path)],
            env=env, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        return Cost(shown, updated, max(largest, most), path.stat().st_size)


def notebook(cells: list[str]) -> dict:
    return {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": src, "outputs": [],
             "execution_count": None}
            for src in cells
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }  # fmt: skip
