"""MetricComparison: metric histories of several runs, params vs final metric, summary."""

from __future__ import annotations

import html
import json
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..cli_format import SHORT_ID, table
from ..compute.run_record import RunInfo
from ..compute.runs import RunService
from ..errors import InvalidRequest, MantikError, NotFound
from ..tracking import metrics as m
from ..tracking.runs_api import MAX_HISTORY_PAGE, MAX_SAMPLED_PER_RUN, RunsApi
from . import query as q
from ._core import default_service, runs_api

COLORS = qualitative.Plotly + qualitative.D3
FETCH_MODES = ("sampled", "full")
PLOTLY_MIME = "application/vnd.plotly.v1+json"
_HEX = set("0123456789abcdef")


def _is_run_id(ref: str) -> bool:
    return len(ref) == 32 and set(ref) <= _HEX


class MetricComparison(w.VBox):
    """Interactive comparison of runs.

    ``run_ids``: run ids (or names/prefixes of mantik runs). ``metrics``: the metric keys
    (default: up to four the runs share). Histories are downsampled with LTTB to at most
    ``max_points`` per series. ``fetch="sampled"`` (default) asks the server for at most
    2,500 evenly spaced values per run (``get-history-bulk-interval``: one request per
    metric for up to 100 runs) and LTTB picks from those; ``fetch="full"`` reads every
    value (``get-history``, paged) so that LTTB sees all spikes.
    """

    def __init__(
        self,
        run_ids: Sequence[str] = (),
        *,
        metrics: Sequence[str] | None = None,
        experiment: str | int | None = None,
        top: int | None = None,
        metric: str | None = None,
        x_axis: str = "step",
        max_points: int = m.DEFAULT_MAX_POINTS,
        fetch: str = "sampled",
        goals: Mapping[str, str] | None = None,
        service: RunService | None = None,
        api: RunsApi | None = None,
        runs: Mapping[str, Mapping[str, Any]] | None = None,
        background: bool = False,
    ) -> None:
        if fetch not in FETCH_MODES:
            raise InvalidRequest(f"fetch must be one of {', '.join(FETCH_MODES)}, got {fetch!r}")
        if x_axis not in m.X_AXES:
            raise InvalidRequest(f"x_axis must be one of {', '.join(m.X_AXES)}")
        self._service = service
        self.api = api or runs_api(self.service)
        self.max_points = int(max_points)
        self.fetch = fetch
        self.goals = dict(goals or {})
        self.requests = 0
        if experiment is not None:
            if not (metric or metrics):
                raise InvalidRequest("Give the metric to rank the runs of the experiment by.")
            key = metric or (metrics or [""])[0]
            if top is not None and top < 1:
                raise InvalidRequest(f"top must be 1 or more, got {top}")
            self.runs = self._top_runs(experiment, key, top or 5)
        else:
            if not run_ids:
                raise InvalidRequest("Give at least one run to compare.")
            self.runs = self._load_runs(run_ids, runs or {})
        self.infos = {rid: RunInfo.from_run(r) for rid, r in self.runs.items()}
        self.run_ids = list(self.runs)
        available = sorted({k for i in self.infos.values() for k in i.metrics})
        if metrics is None and metric:
            metrics = [metric]
        if metrics is None:
            shared = [k for k in available if all(k in i.metrics for i in self.infos.values())]
            chosen = sorted(shared or available, key=lambda k: (not m.lower_is_better(k), k))
            metrics = chosen[:4]
        missing = [k for k in metrics if k not in available]
        if missing:
            have = (
                f"the runs have {', '.join(available[:20])}"
                if available
                else "the runs have logged no metric yet (queued, or failed early?)"
            )
            raise InvalidRequest(f"No run logged {', '.join(map(repr, missing))}; {have}.")
        self.metrics = list(metrics)
        self.colors = {rid: COLORS[i % len(COLORS)] for i, rid in enumerate(self.run_ids)}
        self._histories: dict[tuple[str, str], tuple[list[dict[str, Any]], bool]] = {}
        self.series: dict[tuple[str, str], m.Series] = {}

        self.metric_select = w.SelectMultiple(
            options=available, value=tuple(self.metrics), description="Metrics", rows=4
        )
        self.x_select = w.ToggleButtons(
            options=[("Step", "step"), ("Time", "time"), ("Relative time (s)", "relative")],
            value=x_axis,
        )
        # The figures live in the kernel; the browser gets each as plotly's mimetype in an
        # Output widget, drawn by the jupyterlab-plotly extension. A plotly FigureWidget
        # carried plotly's whole 4.6 MB widget bundle in its model's state: two of them
        # made a comparison 10 MB on the wire and in a notebook saved with widget state.
        self.figure = go.Figure()
        self.params_figure = go.Figure()
        self.chart = w.Output()
        self.params_chart = w.Output()
        self.summary_html = w.HTML()
        self.note = w.HTML()
        super().__init__(
            [
                w.HBox([self.metric_select, self.x_select]),
                self.chart,
                self.note,
                self.summary_html,
                self.params_chart,
            ]
        )
        self.add_class("mantik-comparison")
        self._thread: threading.Thread | None = None
        if background:
            # Reading long histories can take MLflow many seconds: the kernel stays free.
            self.note.value = "<small>Loading metric histories\u2026</small>"
            self._thread = threading.Thread(
                target=self._update_quietly, name="mantik-comparison", daemon=True
            )
            self._thread.start()
        else:
            self.update()
        self.metric_select.observe(self._on_metrics, "value")
        self.x_select.observe(lambda _: self.update(), "value")

    def _update_quietly(self) -> None:
        try:
            self.update()
        except MantikError as exc:
            self.note.value = f"<b>mantik:</b> {html.escape(exc.message)}"
        except Exception as exc:  # shown in the widget; the thread must not die silently
            self.note.value = f"<b>Error:</b> {html.escape(f'{type(exc).__name__}: {exc}')}"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background load; True when the figure is drawn."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def service(self) -> RunService:
        if self._service is None:
            self._service = default_service()
        return self._service

    # ---- which runs --------------------------------------------------------------------------

    def _resolve(self, ref: str) -> str:
        try:
            return self.service.resolve(ref)
        except NotFound as exc:
            # Prefixes and names are looked up among mantik runs: a baseline logged with
            # MLflow alone was 'No run with id prefix ...' with nothing more to try.
            raise NotFound(
                f"{exc.message}. An id prefix or a name finds runs submitted with mantik; "
                "for another MLflow run give its full 32-character run id."
            ) from None

    def _load_runs(
        self, refs: Sequence[str], known: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        ids = [r if _is_run_id(r) else self._resolve(r) for r in refs]
        found: dict[str, dict[str, Any]] = {i: dict(known[i]) for i in ids if i in known}
        todo = [i for i in ids if i not in found]
        if todo:
            experiments = q.experiment_ids_for(self.api, None)
            self.requests += 1
            for start in range(0, len(experiments), 100):
                runs, _ = self.api.search_runs(
                    experiments[start : start + 100],
                    filter_string=q.ids_filter(todo),
                    max_results=len(todo),
                )
                self.requests += 1
                found.update({r["info"]["run_id"]: r for r in runs})
        missing = [i for i in ids if i not in found]
        if missing:
            raise InvalidRequest(f"No run {', '.join(missing)} on {self.api.client.uri}")
        return {i: found[i] for i in ids}

    def _top_runs(self, experiment: str | int, key: str, top: int) -> dict[str, dict[str, Any]]:
        ids = q.experiment_ids_for(self.api, experiment)
        goal = self.goals.get(key) or ("min" if m.lower_is_better(key) else "max")
        clause = f"metrics.`{key}`"
        self.requests += 1
        runs, _ = self.api.search_runs(
            ids,
            max_results=int(top),
            order_by=[f"{clause} {'ASC' if goal == 'min' else 'DESC'}"],
        )
        runs = [r for r in runs if any(x["key"] == key for x in r["data"].get("metrics", []))]
        if not runs:
            raise InvalidRequest(f"No run of experiment {experiment!r} logged the metric {key!r}.")
        return {r["info"]["run_id"]: r for r in runs}

    # ---- histories ---------------------------------------------------------------------------

    def _ensure_histories(self, keys: Sequence[str]) -> None:
        for key in keys:
            todo = [rid for rid in self.run_ids if (rid, key) not in self._histories]
            if not todo:
                continue
            sampled = None
            if self.fetch == "sampled":
                self.requests += 1
                sampled = self.api.metric_history_sampled(todo, key)
            if sampled is not None:
                for rid in todo:
                    hist = sampled.get(rid, [])
                    self._histories[(rid, key)] = (hist, len(hist) < MAX_SAMPLED_PER_RUN)
                continue
            with ThreadPoolExecutor(max_workers=4) as pool:
                results = list(pool.map(lambda rid, k=key: self.api.metric_history(rid, k), todo))
            # get-history pages: MAX_HISTORY_PAGE values per request.
            self.requests += sum(max(1, math.ceil(len(h) / MAX_HISTORY_PAGE)) for h in results)
            for rid, hist in zip(todo, results, strict=True):
                self._histories[(rid, key)] = (hist, True)

    def history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        self._ensure_histories([key])
        return self._histories[(run_id, key)][0]

    # ---- drawing ---------------------------------------------------------------------------

    def update(self) -> None:
        keys = list(self.metric_select.value) or self.metrics
        self.metrics = keys
        self._ensure_histories(keys)
        x_axis = self.x_select.value
        self.series = {
            (rid, key): m.build_series(
                rid,
                key,
                self._histories[(rid, key)][0],
                x_axis=x_axis,
                max_points=self.max_points,
                exact=self._histories[(rid, key)][1],
            )
            for key in keys
            for rid in self.run_ids
        }
        figure = build_figure(self.series, keys, self.run_ids, self.names(), self.colors, x_axis)
        sampled = [s for s in self.series.values() if not s.exact]
        total = sum(s.total_points for s in self.series.values())
        self.note.value = (
            f"<small>{self.points_sent:,} of {total:,} points drawn (LTTB, at most "
            f"{self.max_points:,} per series)"
            + (
                f"; {len(sampled)} series were sampled by the server to "
                f"{MAX_SAMPLED_PER_RUN:,} values first (fetch='full' reads all)"
                if sampled
                else ""
            )
            + ".</small>"
        )
        self.summary = m.summarize(
            [
                {"run_id": rid, "name": self.names()[rid], "metrics": self.infos[rid].metrics}
                for rid in self.run_ids
            ],
            keys,
            self.goals,
        )
        self.summary_html.value = summary_html(self.summary, self.colors)
        params_figure = build_params_figure(self.infos, self.run_ids, keys[0] if keys else None)
        self._draw(figure, params_figure)

    def _draw(self, figure: go.Figure, params_figure: go.Figure) -> None:
        self.figure, self.params_figure = figure, params_figure
        n = len(self.run_ids)
        what = f"{', '.join(self.metrics)} of {n} run{'s' if n != 1 else ''}"
        self.chart.outputs = (plotly_output(figure, what),)
        self.params_chart.outputs = (plotly_output(params_figure, f"params vs {what}"),)

    def _on_metrics(self, change) -> None:
        if change["new"]:
            self.update()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """The live widget, plus the summary table where widgets do not render."""
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is not None:
            bundle["text/plain"] = repr(self)  # ipywidgets cuts it at 110 characters
            if self.summary_html.value:
                bundle["text/html"] = self.summary_html.value
        return bundle

    def __repr__(self) -> str:
        """The runs and their latest metric values as a text table: what a terminal, and
        a notebook viewer without widgets, show instead of the widget tree
        ('MetricComparison(children=(HBox(children=(SelectMultiple(...')."""
        infos = getattr(self, "infos", None)
        if not infos:  # __init__ stopped early
            return "MetricComparison (no runs)"
        keys = list(self.metrics)
        rows = [
            [
                rid[:SHORT_ID],
                infos[rid].run_name or "-",
                str(infos[rid].state),
                *(_number(infos[rid].metrics.get(k)) for k in keys),
            ]
            for rid in self.run_ids
        ]
        head = f"Comparison of {len(rows)} run{'s' if len(rows) != 1 else ''}, latest values:"
        return head + "\n" + table(["ID", "NAME", "STATE", *keys], rows)

    def names(self) -> dict[str, str]:
        return {rid: self.infos[rid].run_name or rid[:8] for rid in self.run_ids}

    @property
    def points_sent(self) -> int:
        """Points of all line traces (what goes to the browser)."""
        return sum(s.points for s in self.series.values())


def plotly_output(figure: go.Figure, what: str) -> dict[str, Any]:
    """``figure`` as an Output widget's display_data: plotly's mimetype (its data as
    base64 typed arrays), and a line of text where no plotly renderer is installed."""
    return {
        "output_type": "display_data",
        "data": {
            PLOTLY_MIME: json.loads(figure.to_json()),
            "text/plain": f"[plotly chart: {what}. JupyterLab draws it with the "
            "jupyterlab-plotly extension that `pip install plotly` installs; VS Code "
            "draws it too.]",
        },
        "metadata": {},
    }


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def build_figure(
    series: Mapping[tuple[str, str], m.Series],
    keys: Sequence[str],
    run_ids: Sequence[str],
    names: Mapping[str, str],
    colors: Mapping[str, str],
    x_axis: str = "step",
) -> go.Figure:
    """Small multiples: one subplot per metric, one colour per run (shared legend).

    Values go in as numpy arrays: plotly validates them at once and writes them as
    base64 typed arrays, not as lists of decimal numbers."""
    n = max(1, len(keys))
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = go.Figure()
    make_subplots(
        rows=rows,
        cols=cols,
        figure=fig,
        subplot_titles=list(keys),
        horizontal_spacing=0.08,
        vertical_spacing=min(0.12, 0.3 / rows),
    )
    label = {"step": "step", "time": "time", "relative": "seconds since start"}[x_axis]
    for i, key in enumerate(keys):
        row, col = i // cols + 1, i % cols + 1
        for rid in run_ids:
            s = series.get((rid, key))
            if s is None or not s.points:
                continue  # this run never logged the metric
            x: Any = s.x  # time: ms since the epoch, which a date axis reads as such
            if x_axis == "step" and np.all(np.abs(s.x) < 2**31):
                x = s.x.astype("int32")  # half the bytes of float64 steps to the browser
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=s.y,
                    mode="lines",
                    name=names.get(rid, rid[:8]),
                    legendgroup=rid,
                    showlegend=i == 0,
                    line={"color": colors.get(rid), "width": 1.5},
                    meta=[rid, key],
                    hovertemplate=f"{html.escape(names.get(rid, rid))}<br>{label}=%{{x}}"
                    f"<br>{html.escape(key)}=%{{y:.4g}}<extra></extra>",
                ),
                row=row,
                col=col,
            )
        # Times as numbers on a date axis: 8 bytes a point, where datetimes went as
        # 25-character strings.
        fig.update_xaxes(
            title_text=label, type="date" if x_axis == "time" else None, row=row, col=col
        )
    fig.update_layout(
        height=max(320, 280 * rows),
        margin={"l": 50, "r": 20, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.12},
        hovermode="x unified" if len(run_ids) <= 5 else "closest",
        template="plotly_white",
    )
    return fig


def build_params_figure(
    infos: Mapping[str, RunInfo],
    run_ids: Sequence[str],
    key: str | None,
) -> go.Figure:
    """Params vs the final value of ``key``: parallel coordinates for two or more params
    that vary, a scatter for one.

    Only runs with a finite final value and every plotted param are drawn: a run without
    the param was drawn at 0 (a learning rate of 0 it never had), and a NaN final value
    made every update a message that is not JSON (jupyter-client's 'Out of range float
    values are not JSON compliant' warning in whichever cell ran then). The title says
    how many runs were left out and why."""
    fig = go.Figure()
    fig.update_layout(height=320, margin={"l": 60, "r": 40, "t": 50, "b": 40})
    if key is None:
        return fig
    finals = {r: _finite(infos[r].metrics.get(key)) for r in run_ids}
    shown = [r for r in run_ids if finals[r] is not None]
    params = m.varying_params([infos[r].params for r in shown])
    complete = [r for r in shown if all(infos[r].params.get(p) not in (None, "") for p in params)]
    if len(complete) < len(shown):
        params = m.varying_params([infos[r].params for r in complete])
    left_out = _left_out_note(len(run_ids) - len(shown), len(shown) - len(complete), key)
    if not complete:
        fig.update_layout(title=f"No run to plot{left_out}")
        return fig
    if not params:
        fig.update_layout(title=f"No params vary between these runs (final {key} only){left_out}")
        return fig
    y = [finals[r] for r in complete]
    if len(params) == 1:
        values, labels = m.numeric_or_codes([infos[r].params.get(params[0]) for r in complete])
        fig.add_trace(
            go.Scatter(
                x=values,
                y=y,
                mode="markers",
                text=[infos[r].run_name or r[:8] for r in complete],
                marker={"size": 10},
            )
        )
        fig.update_layout(title=f"final {key} vs {params[0]}{left_out}", xaxis_title=params[0])
        if labels:
            fig.update_xaxes(tickvals=list(range(len(labels))), ticktext=labels)
        return fig
    dims = []
    for p in params:
        values, labels = m.numeric_or_codes([infos[r].params.get(p) for r in complete])
        dim: dict[str, Any] = {"label": p, "values": values}
        if labels:
            dim.update(tickvals=list(range(len(labels))), ticktext=labels)
        dims.append(dim)
    dims.append({"label": f"final {key}", "values": y})
    fig.add_trace(
        go.Parcoords(
            dimensions=dims,
            line={
                "color": y,
                "colorscale": "Viridis_r" if m.lower_is_better(key) else "Viridis",
                "showscale": True,
            },
        )
    )
    fig.update_layout(title=f"params vs final {key}{left_out}")
    return fig


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _left_out_note(no_value: int, no_param: int, key: str) -> str:
    parts = []
    if no_value:
        parts.append(f"{no_value} without a final {key} (none logged, or NaN/inf)")
    if no_param:
        parts.append(f"{no_param} without a plotted param")
    return f"<br><sup>left out: {'; '.join(parts)}</sup>" if parts else ""


def summary_html(summary: m.Summary, colors: Mapping[str, str]) -> str:
    arrows = {"min": "\u2193", "max": "\u2191"}
    head = "".join(
        f"<th>{html.escape(k)} ({arrows[summary.goals[k]]})</th>" for k in summary.metrics
    )
    body = []
    for row in summary.rows:
        cells = []
        for k in summary.metrics:
            value = row["values"][k]
            best = summary.best.get(k) == row["run_id"]
            text = "" if value is None else f"{value:.4g}"
            cls = " class='mantik-best' style='font-weight:bold;background:#c8e6c9'" if best else ""
            cells.append(f"<td{cls}>{text}</td>")
        swatch = (
            f"<span style='color:{colors.get(row['run_id'], '#000')}'>\u25a0</span> "
            f"{html.escape(row['name'])}"
        )
        body.append(f"<tr data-run-id='{row['run_id']}'><td>{swatch}</td>{''.join(cells)}</tr>")
    return (
        "<table class='mantik-summary' style='border-collapse:collapse'>"
        f"<thead><tr><th>run (final values)</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )
