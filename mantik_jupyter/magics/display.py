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
from ..compute.run_pace import StatePace, asks_a_cluster
from ..compute.run_record import TAG_STATE_MESSAGE
from ..compute.states import RunState
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
        try:
            watch(self._service, self, line, poll=poll, timeout=timeout)
        except KeyboardInterrupt:
            # Its line goes on following the run instead of keeping a stale state.
            if line.live:
                follow_in_background(self._service, self, line, poll)
            raise
        return self

    def cancel(self) -> Run:
        self.info = self._service.cancel(self.run_id)
        ask_soon(self.run_id)
        return self

    def download(
        self, path: str = "", to: str | Path | None = None, *, overwrite: bool = False
    ) -> Path:
        """Copy a file or folder of the run directory (default: all of it) to ``to``,
        and say what it did. Local files that differ from the run's are refused, named,
        unless ``overwrite``; identical ones are left as they are."""
        done = self._service.download(
            self.run_id, path, Path(to) if to else None, overwrite=overwrite
        )
        print(done.summary())
        return done.path

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
    """Update ``line`` with the run's state until it ended: queued → running → finished.
    The line is redrawn every ``poll`` seconds (its run time goes on); the state is asked
    at the pace of ``StatePace``, seldom while nothing changes."""
    history: list[str] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    info = run.info
    pace = StatePace(poll, info.state, backs_off=asks_a_cluster(info))
    due = time.monotonic() + pace.every
    while True:
        # What the run last showed, also when the wait is interrupted.
        run.info = info
        state = str(info.state)
        if not history or history[-1] != state:
            history.append(state)
        line.update(status_text(info, history), status_html(info, run.url, history))
        if info.state.is_final or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(poll)
        if time.monotonic() >= due:
            info = service.get(run.run_id)
            due = time.monotonic() + pace.after(info.state)


@dataclass
class _LiveLine:
    """A line the poller keeps up to date, with the states it has shown."""

    service: RunService
    run: Run
    line: StatusLine
    poll: float
    history: list[str]
    info: RunInfo


@dataclass
class _Backoff:
    """A run whose last refresh failed: when it is asked again, and what its lines say."""

    delay: float
    due: float  # time.monotonic()
    note: str
    logged: str | None = None  # the failure logged for it (each once, until it answers)


@dataclass
class _Asked:
    """What the poller knows of a run it asks about: its experiment (for the search)
    and the shortest poll interval of its lines (where its back-off starts)."""

    experiment_id: str
    poll: float


class LivePoller:
    """The kernel's one poller of live run lines.

    A thread per line, each asking for its own run's state every few seconds until it
    ended, made a notebook showing a queued sweep of 50 runs keep 50 threads and send 50
    queries a tick. Here one thread refreshes every line together: one ``sync`` of all
    their runs per service a tick (one search of the tracking server per 100 runs, one
    state query per backend), at the shortest poll interval a line asks for; it ends
    when no line is left, and the next line starts it again.

    A run whose refresh fails (the tracking server refuses it, or its backend cannot
    be reached and its state is UNKNOWN) leaves that batch, so it cannot stop or slow
    the others, and backs off: asked again after its line's poll interval, then twice
    as long each time it fails again, up to ``MAX_BACKOFF`` seconds; an unreachable
    login node was asked every tick, each time waiting for a connect timeout. The runs
    due at the same time are asked together (one connection attempt per backend). Its
    lines keep the last state with a note saying why and when it is asked again; the
    first answer brings it back to the batch. A line stops, and its run leaves the
    poller, when its run ended.
    """

    THREAD_NAME = "mantik-live-runs"
    MAX_BACKOFF = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: list[_LiveLine] = []
        self._thread: threading.Thread | None = None
        # Runs whose last refresh failed, and when each healthy run is asked next (only
        # the poller's thread uses them).
        self._failing: dict[str, _Backoff] = {}
        self._paces: dict[str, tuple[StatePace, float]] = {}
        self._soon: set[str] = set()  # cancelled here: asked at the next tick

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

    def ask_soon(self, run_id: str) -> None:
        """Ask for ``run_id`` at the next tick, whatever its pace (it was just cancelled
        from this kernel: its lines show the end within a poll interval)."""
        with self._lock:
            self._soon.add(run_id)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._lines:
                    # Under the lock: a line added from now on starts a new thread.
                    self._thread = None
                    self._failing.clear()
                    self._paces.clear()
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
        """Refresh every line whose run is due once; the ids of the lines that are done."""
        services: dict[int, tuple[RunService, dict[str, _Asked]]] = {}
        for live in lines:
            runs = services.setdefault(id(live.service), (live.service, {}))[1]
            asked = runs.setdefault(live.run.run_id, _Asked(live.run.info.experiment_id, live.poll))
            asked.poll = min(asked.poll, live.poll)
        with self._lock:
            soon, self._soon = self._soon, set()
        for run_id in soon:
            self._paces.pop(run_id, None)
        fresh: dict[str, RunInfo] = {}
        due: set[str] = set()
        for service, runs in services.values():
            fresh.update(self._refresh(service, runs, due))
        followed = {live.run.run_id for live in lines}
        self._failing = {k: v for k, v in self._failing.items() if k in followed}
        self._paces = {k: v for k, v in self._paces.items() if k in followed}
        ended: set[int] = set()
        for live in lines:
            run_id = live.run.run_id
            backoff = self._failing.get(run_id)
            note = backoff.note if backoff else None
            try:
                if self._show(live, fresh.get(run_id), note, run_id in due):
                    ended.add(id(live))
            except Exception:  # noqa: BLE001 - a line that cannot be updated is dropped
                log.exception("mantik: cannot update the live line of run %s", run_id)
                ended.add(id(live))
        return ended

    def _refresh(
        self, service: RunService, runs: dict[str, _Asked], asked: set[str]
    ) -> dict[str, RunInfo]:
        """Ask for the runs that are due (adding them to ``asked``): the healthy ones
        together, at the pace of ``StatePace`` (a sweep queued for hours was asked every
        tick, an ``squeue`` on the login node each) of the most eager of them, the
        failing ones whose back-off ran out together apart from them. Records who
        failed, and when each is due."""
        now = time.monotonic()
        # All healthy runs are asked together once one is due: one state query per
        # backend asks about them all (runs submitted one after another would drift
        # apart into a query each).
        batch = [i for i in runs if i not in self._failing]
        if all(self._paces.get(i, (None, 0.0))[1] > now for i in batch):
            batch = []
        retried = [i for i in runs if i in self._failing and self._failing[i].due <= now]
        asked.update(batch, retried)
        fresh: dict[str, RunInfo] = {}
        errors: dict[str, Exception] = {}
        for group in (batch, retried):
            self._ask(service, group, runs, fresh, errors)
        for run_id, exc in errors.items():
            self._failed(run_id, runs[run_id].poll, _failure(exc), exc)
        for run_id, info in fresh.items():
            if info.state == RunState.UNKNOWN and run_id in runs:
                why = info.tags.get(TAG_STATE_MESSAGE) or "its backend could not tell its state"
                self._failed(run_id, runs[run_id].poll, " ".join(why.split()), None)
            else:
                self._failing.pop(run_id, None)
                pace = self._paces.get(run_id, (None, 0.0))[0] or StatePace(
                    runs[run_id].poll, info.state, backs_off=asks_a_cluster(info)
                )
                self._paces[run_id] = (pace, time.monotonic() + pace.after(info.state))
        return fresh

    @staticmethod
    def _ask(
        service: RunService,
        run_ids: Sequence[str],
        runs: dict[str, _Asked],
        fresh: dict[str, RunInfo],
        errors: dict[str, Exception],
    ) -> None:
        if not run_ids:
            return
        experiments = sorted({runs[i].experiment_id for i in run_ids})
        try:
            infos = service.sync(run_ids, experiment_ids=experiments)
        except Exception as exc:  # noqa: BLE001 - shown on the lines, asked again
            if len(run_ids) == 1:
                errors[run_ids[0]] = exc
                return
            # Which run is at fault: each on its own.
            for run_id in run_ids:
                LivePoller._ask(service, [run_id], runs, fresh, errors)
            return
        fresh.update((info.run_id, info) for info in infos)

    def _failed(self, run_id: str, poll: float, why: str, exc: Exception | None) -> None:
        """Back the run off; log a failure that is not a mantik error once."""
        before = self._failing.get(run_id)
        delay = poll if before is None else min(before.delay * 2, self.MAX_BACKOFF)
        due = time.monotonic() + delay
        at = time.strftime("%H:%M:%S", time.localtime(time.time() + delay))
        if exc is None:
            note = f"{why}; asking again at {at}"
        else:
            note = f"state as last seen; asking again failed: {why}; trying again at {at}"
        logged = before.logged if before else None
        if exc is not None and not isinstance(exc, MantikError) and why != logged:
            log.warning(
                "mantik: refreshing the live line of run %s failed (logged once until it "
                "answers again)",
                run_id,
                exc_info=exc,
            )
            logged = why
        self._failing[run_id] = _Backoff(delay, due, note, logged)

    @staticmethod
    def _show(live: _LiveLine, info: RunInfo | None, note: str | None, asked: bool) -> bool:
        """Update the line (``info``: the run's fresh state, None if not asked or not
        answered; ``note``: why it may be out of date; ``asked``: whether its run was
        asked this tick, else it is only redrawn, its run time going on); True once its
        run ended."""
        run = live.run
        if info is not None:
            live.info = info
            state = str(info.state)
            if live.history[-1] != state:
                live.history.append(state)
            if info.state.is_final:
                run.info = info
                note = None
        elif note is None and asked:
            note = "state as last seen; the tracking server did not return it; trying again"
        text = status_text(live.info, live.history)
        html_text = status_html(live.info, run.url, live.history)
        if note:
            text, html_text = with_note(text, html_text, note)
        live.line.update(text, html_text)
        return live.info.state.is_final and info is not None


def _failure(exc: Exception) -> str:
    if isinstance(exc, MantikError):
        return " ".join(exc.message.split())
    return f"{type(exc).__name__}: {exc}"


def with_note(text: str, html_text: str, note: str) -> tuple[str, str]:
    """A run's text and HTML with a note below: why its state may be out of date."""
    return f"{text}\n({note})", f"{html_text}<div><i>({html.escape(note)})</i></div>"


_POLLER = LivePoller()


def ask_soon(run_id: str) -> None:
    """The run's live lines show its new state at their next tick (see ``LivePoller``)."""
    _POLLER.ask_soon(run_id)


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
