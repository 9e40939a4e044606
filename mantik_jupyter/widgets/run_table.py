"""RunTable: a live, paged, sortable table of MLflow runs with a details pane."""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets as w
import traitlets as t

from ..cli_format import size
from ..compute.run_download import DownloadClash
from ..compute.run_record import ACTIVE_STATES, RunInfo
from ..compute.runs import RunService
from ..errors import MantikError
from ..tracking.runs_api import RunsApi
from ..tracking.service import run_page_url
from . import query as q
from ._core import default_service, runs_api

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
LOG_TAIL_LINES = 40


class TableView(anywidget.AnyWidget):
    """The table itself (one widget: rows travel as one JSON message per page)."""

    _esm = HERE / "_table.js"
    _css = HERE / "_table.css"
    columns = t.List(t.Dict()).tag(sync=True)
    rows = t.List(t.Dict()).tag(sync=True)
    selected = t.List(t.Unicode()).tag(sync=True)
    sort_key = t.Unicode("start").tag(sync=True)
    sort_desc = t.Bool(True).tag(sync=True)
    message = t.Unicode("").tag(sync=True)


class RunTable(w.VBox):
    """Runs of one or more experiments, newest first, ``page_size`` at a time.

    ``experiment``: a name or id, or a list of them (default: every experiment).
    ``params``/``metrics``: the columns (default: the params that vary and the latest
    metrics of the first page). Active runs on the page refresh every
    ``refresh_interval`` seconds in a background thread (0 turns that off). Selecting
    rows opens the details pane: params, metrics, tags, the log tail, and buttons to
    cancel, download, compare and open the run in the MLflow UI. A run downloads to
    ``mantik-run-<id prefix>`` in ``download_dir`` (default: the working directory).
    ``base_url``: the lab's base URL as the browser sees it (default: the lab of this
    kernel, if any), for the links to MLflow (``url_of``).
    """

    def __init__(
        self,
        experiment: str | int | Sequence[str | int] | None = None,
        *,
        params: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        page_size: int = 50,
        state: str = "all",
        text: str = "",
        mantik_only: bool = False,
        refresh_interval: float = 10.0,
        service: RunService | None = None,
        api: RunsApi | None = None,
        base_url: str | None = None,
        download_dir: str | Path | None = None,
    ) -> None:
        self._service = service
        self.api = api or runs_api(self.service)
        self.experiment_ids = q.experiment_ids_for(self.api, experiment)
        self.page_size = int(page_size)
        self.mantik_only = mantik_only
        self.base_url = base_url
        self.download_dir = Path(download_dir) if download_dir else None
        self._fixed_params = list(params) if params is not None else None
        self._fixed_metrics = list(metrics) if metrics is not None else None
        self.param_columns: list[str] = list(params or [])
        self.metric_columns: list[str] = list(metrics or [])
        self.rows: list[q.Row] = []
        self.requests = 0  # MLflow requests made by this table (for tests and benchmarks)
        self._tokens: list[str | None] = [None]  # page tokens of the pages seen so far
        self._page = 0
        self._next_token: str | None = None
        self._generation = 0
        self._lock = threading.RLock()
        self._quiet = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mantik-table")
        self._pending: Future | None = None
        self._progress_shown = 0.0  # when the download line was last updated
        self._overwrite_armed: str | None = None  # the run the Download button overwrites
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh_interval = float(refresh_interval)

        self.view = TableView()
        self.text = w.Text(value=text, placeholder="name, or an MLflow filter: metrics.rmse < 1")
        self.state = w.Dropdown(options=list(q.STATES), value=state, description="State")
        self.prev_button = w.Button(description="\u25c0", tooltip="Previous page")
        self.next_button = w.Button(description="\u25b6", tooltip="Next page")
        self.reload_button = w.Button(description="Refresh", icon="refresh")
        self.page_label = w.HTML(layout=w.Layout(min_width="90px"))
        toolbar = w.HBox(
            [
                self.text,
                self.state,
                self.prev_button,
                self.page_label,
                self.next_button,
                self.reload_button,
            ]
        )
        self.details = w.HTML()
        self.log_tail = w.HTML()
        self.action_message = w.HTML()
        self.cancel_button = w.Button(description="Cancel", icon="stop", button_style="danger")
        self.download_button = w.Button(description="Download", icon="download")
        self.compare_button = w.Button(description="Compare", icon="line-chart")
        self.mlflow_link = w.HTML()
        self.details_box = w.VBox(
            [
                w.HBox(
                    [
                        self.cancel_button,
                        self.download_button,
                        self.compare_button,
                        self.mlflow_link,
                    ]
                ),
                self.action_message,
                self.details,
                self.log_tail,
            ],
            layout=w.Layout(display="none"),
        )
        self.comparison_box = w.VBox()
        super().__init__([toolbar, self.view, self.details_box, self.comparison_box])
        self.add_class("mantik-runtable-widget")

        self.text.continuous_update = False
        self.text.observe(lambda _: self._in_background(self.reload), "value")
        self.state.observe(lambda _: self._in_background(self.reload), "value")
        self.prev_button.on_click(lambda _: self._in_background(self.previous_page))
        self.next_button.on_click(lambda _: self._in_background(self.next_page))
        self.reload_button.on_click(lambda _: self._in_background(self.reload))
        self.view.observe(self._on_sort, ["sort_key", "sort_desc"])
        self.view.observe(self._on_select, "selected")
        self.cancel_button.on_click(lambda _: self._in_background(self._act, self.cancel_selected))
        self.download_button.on_click(
            lambda _: self._in_background(self._act, self.download_selected)
        )
        self.compare_button.on_click(lambda _: self.compare_selected())

        self.reload()
        if self.refresh_interval > 0:
            self.start_refresh()

    # ---- plumbing ------------------------------------------------------------------------

    @property
    def service(self) -> RunService:
        if self._service is None:
            self._service = default_service()
        return self._service

    def _in_background(self, fn, *args) -> Future:
        """Run ``fn`` off the kernel's message loop; errors go to the table's message."""

        def call():
            try:
                return fn(*args)
            except MantikError as exc:
                self.view.message = f"mantik: {exc.message}"
            except Exception as exc:  # a widget callback must not die silently
                log.exception("run table action failed")
                self.view.message = f"Error: {type(exc).__name__}: {exc}"

        self._pending = self._executor.submit(call)
        return self._pending

    def wait(self, timeout: float = 60) -> None:
        """Wait until the last background action (sort, page, selection) finished."""
        if self._pending is not None:
            self._pending.result(timeout)

    @contextlib.contextmanager
    def _silently(self):
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    # ---- loading -------------------------------------------------------------------------

    def _order_by(self) -> list[str]:
        return q.order_by_for(self.view.sort_key, self.view.sort_desc) or [
            "attributes.start_time DESC"
        ]

    def _fetch(self, token: str | None) -> tuple[list[dict[str, Any]], str | None]:
        self.requests += 1
        return self.api.search_runs(
            self.experiment_ids,
            filter_string=q.filter_for(self.text.value, self.state.value, self.mantik_only),
            max_results=self.page_size,
            page_token=token,
            order_by=self._order_by(),
        )

    def reload(self) -> None:
        """Back to the first page with the current filter and sort."""
        with self._lock:
            self._tokens = [None]
            self._page = 0
            self._load_page()

    def next_page(self) -> bool:
        with self._lock:
            if not self._next_token:
                return False
            if len(self._tokens) <= self._page + 1:
                self._tokens.append(self._next_token)
            self._page += 1
            self._load_page()
            return True

    def previous_page(self) -> bool:
        with self._lock:
            if self._page == 0:
                return False
            self._page -= 1
            self._load_page()
            return True

    @property
    def page(self) -> int:
        return self._page

    @property
    def has_next_page(self) -> bool:
        return bool(self._next_token)

    def _load_page(self) -> None:
        self.view.message = "Loading\u2026"
        runs, token = self._fetch(self._tokens[self._page])
        rows = q.to_rows(runs)
        if self.view.sort_key == "duration":
            rows.sort(key=lambda r: q.duration_of(r.info) or 0.0, reverse=self.view.sort_desc)
        self._generation += 1
        self._next_token = token
        self.rows = rows
        if self._fixed_params is None or self._fixed_metrics is None:
            params, metrics = q.default_columns(rows)
            if self._fixed_params is None and (params or not self.param_columns):
                self.param_columns = params
            if self._fixed_metrics is None and (metrics or not self.metric_columns):
                self.metric_columns = metrics
        self.view.columns = q.columns_for(self.param_columns, self.metric_columns)
        self._publish()
        first = self._page * self.page_size + 1
        last = self._page * self.page_size + len(rows)
        self.page_label.value = (
            f"<span style='white-space:nowrap'>&nbsp;{first}\u2013{last}"
            f"{'+' if token else ''}&nbsp;</span>"
            if rows
            else "&nbsp;0&nbsp;"
        )
        self.prev_button.disabled = self._page == 0
        self.next_button.disabled = not token
        self.view.message = "" if rows else "No runs match."
        if self.view.sort_key == "duration":
            self.view.message = "Duration sorts the loaded page (MLflow cannot order by it)."

    def _publish(self) -> None:
        self.view.rows = [r.to_json(self.param_columns, self.metric_columns) for r in self.rows]
        keep = [s for s in self.view.selected if any(r.run_id == s for r in self.rows)]
        if keep != list(self.view.selected):
            self.view.selected = keep

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """The live widget, plus the page as text and HTML for places without widgets
        (a saved or converted notebook, a terminal)."""
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        from ..magics.display import RunsTable

        static = RunsTable([r.info for r in self.rows], self.url_of)
        bundle["text/plain"] = repr(static)
        bundle["text/html"] = static._repr_html_()
        return bundle

    # ---- sorting, filtering ------------------------------------------------------------------

    def sort(self, column: str, desc: bool = False) -> None:
        with self._silently():
            self.view.sort_key = column
            self.view.sort_desc = desc
        self.reload()

    def set_filter(self, text: str | None = None, state: str | None = None) -> None:
        with self._silently():
            if text is not None:
                self.text.value = text
            if state is not None:
                self.state.value = state
        self.reload()

    def _on_sort(self, _change) -> None:
        if not self._quiet:
            self._in_background(self.reload)

    # ---- background refresh of active runs --------------------------------------------------

    def refresh_active(self) -> list[str]:
        """Fetch the active runs of the page again (one search request); for mantik runs
        with a backend job, ask the backend, and search again if that moved a state.
        Returns the ids that changed."""
        with self._lock:
            generation = self._generation
            active = [r for r in self.rows if r.active]
        if not active:
            return []
        found = q.to_rows(self._search_ids([r.run_id for r in active]))
        jobs = [r for r in found if r.info.job_id and r.info.state in ACTIVE_STATES]
        if jobs and self._service is not None:
            # The runs as just found: the service fetched each of them again before.
            was = {r.run_id: r.info.state for r in jobs}
            try:
                synced = self.service.sync_found([r.run for r in jobs])
                if any(was[i.run_id] != i.state for i in synced):
                    found = q.to_rows(self._search_ids([r.run_id for r in active]))
            except MantikError as exc:
                log.info("sync of active runs failed: %s", exc.message)
        fresh = {r.run_id: r for r in found}
        changed = []
        with self._lock:
            if generation != self._generation:
                return []  # the page changed meanwhile
            rows = []
            for row in self.rows:
                new = fresh.get(row.run_id)
                if new is not None and new.run != row.run:
                    changed.append(row.run_id)
                    row = new
                rows.append(row)
            self.rows = rows
            if changed:
                self._publish()
        selected = list(self.view.selected)
        if changed and any(s in changed for s in selected):
            self._show_details(selected, with_log=False)
        return changed

    def _search_ids(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        self.requests += 1
        runs, _ = self.api.search_runs(
            self.experiment_ids,
            filter_string=q.ids_filter(run_ids),
            max_results=len(run_ids),
            order_by=["attributes.start_time DESC"],
        )
        return runs

    def start_refresh(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._refresh_loop, name="mantik-table-refresh", daemon=True
        )
        self._thread.start()

    def stop_refresh(self) -> None:
        self._stop.set()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_interval):
            try:
                self.refresh_active()
            except MantikError as exc:
                self.view.message = f"Refresh failed: {exc.message}"
            except Exception as exc:  # keep the thread alive; say what happened
                log.exception("refresh failed")
                self.view.message = f"Refresh failed: {type(exc).__name__}: {exc}"

    def close(self) -> None:
        if "_stop" not in self.__dict__:
            # __init__ stopped before it made anything (an unknown experiment); the
            # garbage collector still calls close, which printed an AttributeError.
            return
        self.stop_refresh()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for child in (self.view, self.details_box, self.comparison_box, self):
            try:
                w.Widget.close(child) if child is self else child.close()
            except KeyError:
                # A comm made before ipykernel took over the comm manager (plain IPython
                # that later imported ipykernel) is unknown to the new manager.
                pass

    # ---- selection and details ---------------------------------------------------------------

    def select(self, run_ids: str | Sequence[str]) -> None:
        """Select rows (synchronously: the details pane is filled on return)."""
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
        with self._silently():
            self.view.selected = ids
        self._show_details(ids)

    @property
    def selected_rows(self) -> list[q.Row]:
        chosen = set(self.view.selected)
        return [r for r in self.rows if r.run_id in chosen]

    def _on_select(self, change) -> None:
        if self._overwrite_armed not in change["new"] or len(change["new"]) != 1:
            self._arm_overwrite(None)
        if not self._quiet:
            self._in_background(self._show_details, list(change["new"]))

    def url_of(self, info: RunInfo) -> str:
        """The link to the run's page in the MLflow UI, as the magics show it: the lab's
        proxy in a lab, else the tracking server. Not any lab that runs on this machine:
        a kernel of none (nbconvert, VS Code) got a path of that lab it could not open."""
        from ..magics.notebook import lab_base_url

        base = self.base_url if self.base_url is not None else lab_base_url()
        return run_page_url(info.experiment_id, info.run_id, self.api.client.uri, base)

    def _show_details(self, run_ids: Sequence[str], with_log: bool = True) -> None:
        rows = [r for r in self.rows if r.run_id in set(run_ids)]
        if not rows:
            self.details_box.layout.display = "none"
            return
        self.details_box.layout.display = "flex"
        row = rows[0]
        info = row.info
        self.details.value = details_html(rows)
        url = self.url_of(info)
        self.mlflow_link.value = (
            f'<a class="mantik-open-in-mlflow" target="_blank" rel="noopener" '
            f'href="{html.escape(url)}">Open in MLflow UI</a>'
        )
        single = len(rows) == 1
        self.cancel_button.disabled = not (single and row.active)
        self.download_button.disabled = not (single and info.job_id)
        self.compare_button.disabled = False
        if with_log:
            self.log_tail.value = log_tail_html(self._log_tail(row) if single else None)

    def _log_tail(self, row: q.Row) -> str | None:
        if not row.info.job_id:
            return None
        try:
            chunk = self.service.logs(row.run_id)
        except MantikError as exc:
            return f"(log not available: {exc.message})"
        lines = chunk.text.splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])

    # ---- actions -----------------------------------------------------------------------------

    def _act(self, action: Any) -> None:
        """A button's action. Its failure is said on the action's line, which said
        'Downloading…' for ever while the reason went to the table's message above."""
        try:
            action()
        except MantikError as exc:
            self.action_message.value = f"<b>mantik:</b> {html.escape(exc.message)}"

    def _download_progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._progress_shown < 0.25:
            return
        self._progress_shown = now
        pct = f"{min(100, 100 * done // total)}% of " if total > 0 else ""
        self.action_message.value = f"Downloading… {pct}{size(max(total, done))}"

    def cancel_selected(self) -> None:
        rows = self.selected_rows
        if len(rows) != 1:
            return
        self.action_message.value = f"Cancelling {html.escape(rows[0].run_id)}\u2026"
        info = self.service.cancel(rows[0].run_id)
        self.action_message.value = f"Run {html.escape(info.run_id)} is {info.state}."
        self.refresh_active()

    def download_selected(self) -> Path | None:
        rows = self.selected_rows
        if len(rows) != 1:
            return None
        run_id = rows[0].run_id
        # The same folder each time (given exactly: a second download went into a new
        # folder inside the first), so that it gets what the run wrote since.
        dest = (self.download_dir or Path.cwd()) / f"mantik-run-{run_id[:8]}"
        overwrite = self._overwrite_armed == run_id
        self._arm_overwrite(None)
        self.action_message.value = "Downloading\u2026"
        self._progress_shown = 0.0
        try:
            done = self.service.download(
                run_id,
                dest=dest,
                progress=self._download_progress,
                overwrite=overwrite,
                exact=True,
            )
        except DownloadClash as clash:
            if not clash.kinds:  # the button can replace files, not a file by a folder
                self._arm_overwrite(run_id)
            raise clash.with_flag("the Overwrite button") from None
        self.action_message.value = html.escape(done.summary())
        return done.path

    def _arm_overwrite(self, run_id: str | None) -> None:
        """After a download refused for local files that differ, the button replaces
        them for that run on the next click; anything else sets it back."""
        self._overwrite_armed = run_id
        armed = run_id is not None
        self.download_button.description = "Overwrite" if armed else "Download"
        self.download_button.button_style = "warning" if armed else ""
        self.download_button.tooltip = (
            "Download again, replacing the local files that differ" if armed else ""
        )

    def compare_selected(self, **kwargs: Any):
        """Show a MetricComparison of the selected runs under the table."""
        from .metric_comparison import MetricComparison

        ids = [r.run_id for r in self.selected_rows]
        if not ids:
            return None
        rows = {r.run_id: r.run for r in self.selected_rows}
        kwargs.setdefault("background", True)
        comparison = MetricComparison(ids, api=self.api, runs=rows, **kwargs)
        for old in self.comparison_box.children:
            old.close()
        self.comparison_box.children = [comparison]
        return comparison


def details_html(rows: Sequence[q.Row]) -> str:
    if len(rows) > 1:
        names = ", ".join(html.escape(r.info.run_name or r.run_id[:8]) for r in rows)
        return f"<div class='mantik-w-details'><b>{len(rows)} runs selected:</b> {names}</div>"
    info = rows[0].info

    def table(title: str, items: dict[str, Any]) -> str:
        if not items:
            return f"<div><b>{title}</b>: none</div>"
        body = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(q.short_json(q.format_value(v)))}"
            "</td></tr>"
            for k, v in sorted(items.items())
        )
        return (
            f"<details open><summary><b>{title}</b> ({len(items)})</summary>"
            f"<table class='mantik-w-kv'>{body}</table></details>"
        )

    head = (
        f"<div><b>{html.escape(info.run_name or info.run_id)}</b> "
        f"<code>{html.escape(info.run_id)}</code> \u2014 "
        f"<span class='mantik-w-state mantik-w-state-{str(info.state).lower()}'>{info.state}</span>"
        + (f" ({html.escape(info.reason)})" if info.reason else "")
        + "</div>"
    )
    return (
        "<div class='mantik-w-details'>"
        + head
        + table("Params", info.params)
        + table("Metrics", info.metrics)
        + table("Tags", info.tags)
        + "</div>"
    )


def log_tail_html(text: str | None) -> str:
    if text is None:
        return ""
    return (
        "<details open><summary><b>Log (tail)</b></summary>"
        f"<pre class='mantik-w-log'>{html.escape(text)}</pre></details>"
    )
