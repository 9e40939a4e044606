"""What the magics show: the ``Run`` object, the live status line, run tables, logs.

Two functions are the seams for the widgets (``mantik_jupyter/widgets/``): ``_show_runs``
(the run table of ``%mantik_runs``) and ``_stream_log`` (the text of ``%mantik_logs
--follow``). Everything else here only needs IPython's display machinery.
"""

from __future__ import annotations

import html
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli_format import age, run_duration, runs_table, size
from ..errors import MantikError

if TYPE_CHECKING:
    from ..compute.run_record import RunInfo
    from ..compute.runs import RunService

log = logging.getLogger(__name__)

SHORT_ID = 8
_STATE_COLOURS = {
    "SUBMITTING": "#6c757d",
    "QUEUED": "#6c757d",
    "RUNNING": "#0d6efd",
    "FINISHED": "#198754",
    "FAILED": "#dc3545",
    "KILLED": "#fd7e14",
    "UNKNOWN": "#6f42c1",
}


def in_kernel() -> bool:
    """True in a Jupyter kernel (display updates reach a frontend), False in plain IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def execution_count() -> int | None:
    """The number of the cell IPython runs now (None outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    ip = get_ipython()
    return None if ip is None else getattr(ip, "execution_count", None)


class Rich:
    """Text for terminals, HTML for notebooks."""

    def __init__(self, text: str, html_text: str | None = None) -> None:
        self.text = text
        self.html = html_text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str | None:
        return self.html


class StatusLine:
    """One line that updates in place in a notebook; printed lines (on change) elsewhere."""

    def __init__(self, live: bool | None = None) -> None:
        self.live = in_kernel() if live is None else live
        self._handle: Any = None
        self._last: str | None = None

    def update(self, text: str, html_text: str | None = None, *, force: bool = False) -> None:
        if text == self._last and not force:
            return
        self._last = text
        if not self.live:
            print(text, flush=True)
            return
        from IPython.display import display

        obj = Rich(text, html_text)
        if self._handle is None:
            self._handle = display(obj, display_id=True)
        else:
            self._handle.update(obj)


class PackagingProgress:
    """The ``progress`` callback of ``RunService.submit`` (packaging, then upload), and
    through ``download`` that of ``RunService.download``."""

    def __init__(self, line: StatusLine, min_interval: float = 0.25) -> None:
        self.line = line
        self.min_interval = min_interval
        self._last = 0.0
        self._phase = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        new_phase = phase != self._phase
        if not self.line.live:
            # A terminal gets one line per phase, not a stream of percentages.
            if new_phase:
                self._phase = phase
                self.line.update(_phase_text(phase, None, total))
            return
        if not new_phase and now - self._last < self.min_interval and done < total:
            return
        self._phase, self._last = phase, now
        self.line.update(_phase_text(phase, done, total))

    def download(self, done: int, total: int) -> None:
        self("download", done, total)


def _phase_text(phase: str, done: int | None, total: int) -> str:
    word = {
        "package": "Packaging the code",
        "upload": "Uploading the package",
        "download": "Downloading",
    }.get(phase, phase)
    if done is None or total <= 0:
        return f"{word}…" + (f" ({size(total)})" if total > 0 else "")
    return f"{word}… {min(100, int(100 * done / total))}% of {size(total)}"


# ---- runs ---------------------------------------------------------------------------------


def short(run_id: str) -> str:
    return run_id[:SHORT_ID]


def _state_html(state: str) -> str:
    colour = _STATE_COLOURS.get(state, "#6c757d")
    return f'<b style="color:{colour}">{html.escape(state)}</b>'


def _metrics_text(metrics: dict[str, float], limit: int = 6) -> str:
    items = sorted(metrics.items())[:limit]
    return "  ".join(f"{k}={v:.4g}" for k, v in items)


def status_text(info: RunInfo, history: Sequence[str] = ()) -> str:
    states = " → ".join(history) if history else str(info.state)
    where = info.backend or "-"
    if info.job_id:
        where += f" job {info.job_id}"
    text = f"Run {info.run_name or '-'} ({short(info.run_id)}) on {where}: {states}"
    if info.start_time:
        text += f" · {run_duration(info.to_json())}"
    if info.state.is_final and info.reason:
        text += f" ({info.reason})"
    if info.state.is_final and info.metrics:
        text += f" · {_metrics_text(info.metrics)}"
    return text


def status_html(info: RunInfo, url: str, history: Sequence[str] = ()) -> str:
    states = " → ".join(_state_html(s) for s in (history or [str(info.state)]))
    where = html.escape(info.backend or "-")
    if info.job_id:
        where += f" job {html.escape(info.job_id)}"
    parts = [
        f"Run <code>{html.escape(info.run_name or '-')}</code> "
        f"(<code>{short(info.run_id)}</code>) on {where}: {states}"
    ]
    if info.start_time:
        parts.append(html.escape(run_duration(info.to_json())))
    if info.state.is_final and info.reason:
        parts.append(html.escape(info.reason))
    if info.state.is_final and info.metrics:
        parts.append(f"<code>{html.escape(_metrics_text(info.metrics))}</code>")
    parts.append(f'<a href="{html.escape(url)}" target="_blank">open in MLflow</a>')
    return '<div class="mantik-run-status">' + " · ".join(parts) + "</div>"


class Run:
    """A run submitted from a notebook: ``state``, ``logs()``, ``wait()``, ``cancel()``,
    ``download()``, ``metrics()``. Every call asks the tracking server (and, for active
    runs, the backend) afresh; ``info`` is what the last call saw.

    Shown in a notebook (a cell's last expression, ``display(run)``), a run shows its
    state at that moment, as a line that follows it to its end while it is active. In
    the cell whose status line already follows it (``%mantik_submit``, ``run.wait()``)
    it shows nothing more: an ``Out[]`` there kept the state at submission for ever."""

    # A state this recent is shown as it is, not asked for again (%mantik_status has
    # just asked the backend).
    FRESH_SECONDS = 1.0

    def __init__(self, service: RunService, info: RunInfo, url: str, poll: float = 2.0) -> None:
        self._service = service
        self.info = info
        self.url = url
        self.poll = poll
        self._seen_at = time.monotonic()
        # The cell (execution count) whose live status line follows this run.
        self._followed_in: int | None = None

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def run_name(self) -> str | None:
        return self.info.run_name

    def refresh(self) -> RunInfo:
        self.info = self._service.get(self.run_id)
        self._seen_at = time.monotonic()
        return self.info

    @property
    def state(self) -> str:
        """The current state: SUBMITTING, QUEUED, RUNNING, FINISHED, FAILED, KILLED, UNKNOWN."""
        return str(self.refresh().state)

    def metrics(self) -> dict[str, float]:
        """The latest value of every metric the run logged."""
        return dict(self.refresh().metrics)

    @property
    def params(self) -> dict[str, str]:
        return dict(self.info.params)

    def logs(self) -> str:
        """The log so far (all of it once the run ended)."""
        return self._service.all_logs(self.run_id).text

    def wait(self, timeout: float | None = None, poll: float = 2.0) -> Run:
        """Block until the run ended (or ``timeout`` seconds passed); shows its status line."""
        line = StatusLine()
        self.followed_by(line)
        watch(self._service, self, line, poll=poll, timeout=timeout)
        return self

    def cancel(self) -> Run:
        self.info = self._service.cancel(self.run_id)
        return self

    def download(self, path: str = "", to: str | Path | None = None) -> Path:
        """Copy a file or folder of the run directory (default: all of it) to ``to``."""
        return self._service.download(self.run_id, path, Path(to) if to else None)

    def followed_by(self, line: StatusLine) -> None:
        """``line`` shows this run in the current cell (when it is live)."""
        if line.live:
            self._followed_in = execution_count()

    def __repr__(self) -> str:
        return status_text(self.info) + f"\n{self.url}"

    def _repr_html_(self) -> str:
        return status_html(self.info, self.url)

    def _ipython_display_(self) -> None:
        """IPython's display protocol: the state now (see the class docstring)."""
        from IPython.display import display

        if self._followed_in is not None and self._followed_in == execution_count():
            return  # the live line above is this run's display
        note = ""
        if time.monotonic() - self._seen_at > self.FRESH_SECONDS:
            try:
                self.refresh()
            except MantikError as err:
                note = f"state as last seen; asking again failed: {' '.join(err.message.split())}"
        if not note and in_kernel() and not self.info.state.is_final:
            follow_in_background(self._service, self, StatusLine(live=True), self.poll)
            return
        text, html_text = repr(self), self._repr_html_()
        if note:
            text, html_text = with_note(text, html_text, note)
        display(Rich(text, html_text))


def watch(
    service: RunService,
    run: Run,
    line: StatusLine,
    *,
    poll: float = 2.0,
    timeout: float | None = None,
) -> RunInfo:
    """Update ``line`` with the run's state until it ended: queued → running → finished."""
    history: list[str] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    info = run.info
    while True:
        state = str(info.state)
        if not history or history[-1] != state:
            history.append(state)
        line.update(status_text(info, history), status_html(info, run.url, history))
        if info.state.is_final or (deadline is not None and time.monotonic() > deadline):
            run.info = info
            return info
        time.sleep(poll)
        info = service.get(run.run_id)


@dataclass
class _LiveLine:
    """A line the poller keeps up to date, with the states it has shown."""

    service: RunService
    run: Run
    line: StatusLine
    poll: float
    history: list[str]
    info: RunInfo


class LivePoller:
    """The kernel's one poller of live run lines.

    A thread per line, each asking for its own run's state every few seconds until it
    ended, made a notebook showing a queued sweep of 50 runs keep 50 threads and send 50
    queries a tick. Here one thread refreshes every line together: one ``sync`` of all
    their runs per service a tick (one state query per backend), at the shortest poll
    interval a line asks for; it ends when no line is left, and the next line starts it
    again. A run whose refresh fails is asked on its own from then on, until it
    answers again, so it cannot stop the others: its lines show the error and keep
    trying. A line stops, and its run leaves the poller, when its run ended.
    """

    THREAD_NAME = "mantik-live-runs"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: list[_LiveLine] = []
        self._thread: threading.Thread | None = None
        # Runs whose last refresh failed: asked one by one, so the batch of the others goes on.
        self._failing: set[str] = set()

    def add(self, service: RunService, run: Run, line: StatusLine, poll: float) -> None:
        state = str(run.info.state)
        live = _LiveLine(service, run, line, poll, [state], run.info)
        with self._lock:
            self._lines.append(live)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=self.THREAD_NAME, daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._lines:
                    # Under the lock: a line added from now on starts a new thread.
                    self._thread = None
                    return
                interval = min(live.poll for live in self._lines)
            time.sleep(interval)
            with self._lock:
                lines = list(self._lines)
            try:
                ended = self._tick(lines)
            except Exception:  # noqa: BLE001 - the poller outlives a bug in one tick
                log.exception("mantik: refreshing the live run lines failed")
                continue
            with self._lock:
                self._lines = [live for live in self._lines if id(live) not in ended]

    def _tick(self, lines: Sequence[_LiveLine]) -> set[int]:
        """Refresh every line once; the ids of the lines that are done."""
        services: dict[int, tuple[RunService, list[str]]] = {}
        for live in lines:
            services.setdefault(id(live.service), (live.service, []))[1].append(live.run.run_id)
        fresh: dict[str, RunInfo] = {}
        errors: dict[str, str] = {}
        for service, run_ids in services.values():
            got, failed = self._refresh(service, run_ids)
            fresh.update(got)
            errors.update(failed)
        ended: set[int] = set()
        for live in lines:
            try:
                if self._show(live, fresh.get(live.run.run_id), errors.get(live.run.run_id)):
                    ended.add(id(live))
            except Exception:  # noqa: BLE001 - a line that cannot be updated is dropped
                log.exception("mantik: cannot update the live line of run %s", live.run.run_id)
                ended.add(id(live))
        return ended

    def _refresh(
        self, service: RunService, run_ids: Sequence[str]
    ) -> tuple[dict[str, RunInfo], dict[str, str]]:
        ids = list(dict.fromkeys(run_ids))
        alone = [i for i in ids if i in self._failing]
        batch = [i for i in ids if i not in self._failing]
        fresh: dict[str, RunInfo] = {}
        errors: dict[str, str] = {}
        if batch:
            try:
                fresh.update((info.run_id, info) for info in service.sync(batch))
            except Exception as exc:  # noqa: BLE001 - shown on the lines, asked again
                if len(batch) == 1:
                    errors[batch[0]] = _failure(exc)
                else:
                    alone += batch  # which run is at fault: each on its own
        for run_id in alone:
            try:
                fresh.update((info.run_id, info) for info in service.sync([run_id]))
            except Exception as exc:  # noqa: BLE001 - shown on the lines, asked again
                errors[run_id] = _failure(exc)
        self._failing = (self._failing - set(ids)) | set(errors)
        return fresh, errors

    @staticmethod
    def _show(live: _LiveLine, info: RunInfo | None, error: str | None) -> bool:
        """Update the line; True once its run ended."""
        run = live.run
        if error is not None or info is None:
            why = error or "the tracking server did not return it"
            note = f"state as last seen; asking again failed: {why}; trying again"
            text, html_text = with_note(
                status_text(live.info, live.history),
                status_html(live.info, run.url, live.history),
                note,
            )
            live.line.update(text, html_text)
            return False
        live.info = info
        state = str(info.state)
        if live.history[-1] != state:
            live.history.append(state)
        live.line.update(status_text(info, live.history), status_html(info, run.url, live.history))
        if info.state.is_final:
            run.info = info
            return True
        return False


def _failure(exc: Exception) -> str:
    if isinstance(exc, MantikError):
        return " ".join(exc.message.split())
    log.warning("mantik: refreshing a live run line failed", exc_info=exc)
    return f"{type(exc).__name__}: {exc}"


def with_note(text: str, html_text: str, note: str) -> tuple[str, str]:
    """A run's text and HTML with a note below: why its state may be out of date."""
    return f"{text}\n({note})", f"{html_text}<div><i>({html.escape(note)})</i></div>"


_POLLER = LivePoller()


def follow_in_background(service: RunService, run: Run, line: StatusLine, poll: float) -> None:
    """Show the run's live status line now and keep it following the run without
    blocking the kernel (display updates by display_id reach the frontend from any
    thread): the kernel's one ``LivePoller`` refreshes it with the other live lines."""
    run.followed_by(line)
    history = [str(run.info.state)]
    line.update(status_text(run.info, history), status_html(run.info, run.url, history))
    if not run.info.state.is_final:
        _POLLER.add(service, run, line, poll)


def tail(text: str, lines: int | None) -> str:
    if lines is None:
        return text
    if lines <= 0:
        return ""
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)


# What ``%mantik_logs RUN`` shows of a log in a notebook when no --tail is given.
NOTEBOOK_LOG_LINES = 1000
NOTEBOOK_LOG_CHARS = 200_000  # as much as the LogView keeps


def notebook_sized(text: str, ref: str) -> str:
    """The end of a log, sized for a notebook, with a line saying what was left out.

    A notebook keeps every output in its file, and Jupyter drops output that arrives
    faster than 1 MB/s ('IOPub data rate exceeded'): a training log of some MB printed
    whole lost its end, the part people look at, and bloated the notebook."""
    if len(text) <= NOTEBOOK_LOG_CHARS and text.count("\n") <= NOTEBOOK_LOG_LINES:
        return text
    shown = "".join(text.splitlines(keepends=True)[-NOTEBOOK_LOG_LINES:])[-NOTEBOOK_LOG_CHARS:]
    hidden = text.count("\n") - shown.count("\n")
    ref = shlex.quote(ref)
    return (
        f"[mantik: {hidden:,} earlier lines of this log are not shown here: "
        f"`%mantik_logs {ref} --tail N` shows the last N lines, `mantik runs logs {ref}` "
        "in a terminal all of them]\n" + shown
    )


def _stream_log(chunks: Iterable[str]) -> None:
    """Print log text as it arrives (``%mantik_logs --follow``); the LogView seam."""
    for text in chunks:
        sys.stdout.write(text)
        sys.stdout.flush()


class RunsTable:
    def __init__(self, runs: Sequence[RunInfo], url_for: Callable[[RunInfo], str]) -> None:
        self.runs = list(runs)
        self.url_for = url_for

    def __repr__(self) -> str:
        if not self.runs:
            return "No runs."
        return runs_table([r.to_json() for r in self.runs])

    def _repr_html_(self) -> str:
        if not self.runs:
            return "<p>No runs.</p>"
        head = "".join(
            f"<th>{h}</th>"
            for h in ("ID", "Name", "State", "Backend", "Started", "Duration", "Metrics", "")
        )
        rows = []
        for r in self.runs:
            data = r.to_json()
            cells = [
                f"<code>{short(r.run_id)}</code>",
                html.escape(r.run_name or "-"),
                _state_html(str(r.state)),
                html.escape(r.backend or "-"),
                html.escape(age(r.start_time)),
                html.escape(run_duration(data)),
                f"<code>{html.escape(_metrics_text(r.metrics, 3))}</code>",
                f'<a href="{html.escape(self.url_for(r))}" target="_blank">MLflow</a>',
            ]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        return (
            '<table class="mantik-runs"><thead><tr>'
            + head
            + "</tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
        )


def _show_runs(runs: Sequence[RunInfo], url_for: Callable[[RunInfo], str]) -> None:
    """Show runs (``%mantik_runs``): an HTML table; the RunTable widget's seam."""
    from IPython.display import display

    display(RunsTable(runs, url_for))
