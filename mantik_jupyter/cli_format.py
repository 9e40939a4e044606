"""Human output of the ``mantik`` command: tables, times, sizes and progress bars."""

from __future__ import annotations

import sys
import time
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

SHORT_ID = 8
# A name longer than this is cut in the runs table (``runs info`` has it whole): one
# 600-character name made every row of the table 600 characters wide.
NAME_WIDTH = 40
STATE_MESSAGE_TAG = "mantik.state_message"
# Narrower than this, a terminal wraps the table rather than cut the names to nothing.
MIN_NAME_WIDTH = 12
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Right-to-left overrides and isolates: they reorder what follows on the line.
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def shown(text: Any) -> str:
    """A value from the tracking server as one printable line: run names, tags, params
    and file names are anyone's text (a colleague's run, the training code's tags). A
    newline broke a row of the table in two, and an escape sequence reached the terminal
    (retitling it, or worse); control characters are written as escapes instead."""
    text = str(text)
    return text if text.isprintable() else "".join(map(_escaped, text))


def _escaped(ch: str) -> str:
    if unicodedata.category(ch) != "Cc" and ch not in _BIDI:
        return ch
    return _ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def width(text: str) -> int:
    """Terminal columns of ``text``: CJK and other wide characters take two, combining
    marks none (a table of '天气预报' names was two columns short per character)."""
    return len(text) if text.isascii() else sum(map(_columns, text))


def _columns(ch: str) -> int:
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [[shown(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(width(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            cell + " " * (w - width(cell)) for cell, w in zip(row, widths, strict=True)
        ).rstrip()
        for row in cells
    )


def clip(text: str, columns: int) -> str:
    """``text`` in at most ``columns`` terminal columns, cut with an ellipsis."""
    text = shown(text)
    if width(text) <= columns:
        return text
    out, used = "", 0
    for ch in text:
        used += _columns(ch)
        if used > columns - 1:
            break
        out += ch
    return out + "\u2026"


def age(ms: int | None, now: float | None = None) -> str:
    """``ms`` since the epoch as "5m ago"; an absolute date beyond a week."""
    if not ms:
        return "-"
    now = time.time() if now is None else now
    seconds = max(0.0, now - ms / 1000)
    if seconds > 7 * 86400:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))
    return f"{duration(seconds)} ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def run_duration(run: dict[str, Any], now: float | None = None) -> str:
    """How long a run's job ran, then how long it waited in the queue: "3m05s (queued
    2h01m)". ``start_time`` is the submission; a run still waiting shows its queue time,
    a run without ``running_since`` (ran before mantik kept it) the time since submission."""
    start, end = run.get("start_time"), run.get("end_time")
    if not start:
        return "-"
    stop = end / 1000 if end else (time.time() if now is None else now)
    queued, ran = queue_and_run(run, now)
    if ran is not None:
        return f"{ran} (queued {queued})"
    if not end and run.get("state") in ("QUEUED", "SUBMITTING"):
        return f"{str(run['state']).lower()} {duration(stop - start / 1000)}"
    return duration(stop - start / 1000)


def queue_and_run(run: dict[str, Any], now: float | None = None) -> tuple[str, str | None]:
    """(time in the queue, time running) of a run whose start of running is known, else
    ("-", None). Clocks of cluster and lab may differ a little: never below 0."""
    start, since, end = run.get("start_time"), run.get("running_since"), run.get("end_time")
    if not start or not since:
        return "-", None
    stop = end / 1000 if end else (time.time() if now is None else now)
    return duration(max(0.0, (since - start) / 1000)), duration(max(0.0, stop - since / 1000))


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def runs_table(runs: Sequence[dict[str, Any]], columns: int | None = None) -> str:
    """The runs as a table; ``columns``: the terminal's width, which the names are cut to
    fit (rows that wrapped made a table of two-line rows on an 80-column terminal)."""
    headers = ["ID", "NAME", "STATE", "BACKEND", "STARTED", "DURATION"]
    rows = [
        [
            str(r.get("run_id", ""))[:SHORT_ID],
            shown(r.get("run_name") or "-"),
            str(r.get("state") or "-"),
            str(r.get("backend") or "-"),
            age(r.get("start_time")),
            run_duration(r),
        ]
        for r in runs
    ]
    name_width = NAME_WIDTH
    if columns is not None:
        others = sum(max(width(row[i]) for row in [headers, *rows]) for i in (0, 2, 3, 4, 5))
        name_width = max(MIN_NAME_WIDTH, min(NAME_WIDTH, columns - others - 2 * 5))
    for row in rows:
        row[1] = clip(row[1], name_width)
    return table(headers, rows)


def files_table(files: Sequence[dict[str, Any]]) -> str:
    """``runs files``: folders end in '/', and have no size."""
    if not files:
        return "(empty folder)"
    rows = [[f["path"] + "/", "-"] if f["is_dir"] else [f["path"], size(f["size"])] for f in files]
    return table(["PATH", "SIZE"], rows)


def run_details(run: dict[str, Any], *, full: bool) -> str:
    """``runs status`` (full=False) and ``runs info`` (full=True)."""
    fields = [
        ("Run", run.get("run_id")),
        ("Name", run.get("run_name")),
        ("State", run.get("state")),
        ("MLflow status", run.get("mlflow_status")),
        ("Reason", run.get("reason")),
        # Why the state is UNKNOWN (the cluster cannot be reached, ...): it was only among
        # the tags of `runs info`, and `runs status` said UNKNOWN without a word.
        ("Why unknown", (run.get("tags") or {}).get(STATE_MESSAGE_TAG)),
        ("Exit code", run.get("exit_code")),
        ("Backend", run.get("backend")),
        ("Job", run.get("job_id")),
        ("MLflow", run.get("mlflow_url")),
    ]
    queued, ran = queue_and_run(run)
    if ran is not None:
        fields += [("Queued", queued), ("Ran" if run.get("end_time") else "Running for", ran)]
    if full:
        fields += [
            ("Experiment", run.get("experiment_id")),
            ("Entry point", run.get("entry_point")),
            ("Source", run.get("source")),
            ("User", run.get("user")),
            ("Started", age(run.get("start_time"))),
            ("Duration", run_duration(run)),
        ]
    out = [f"{k + ':':<15}{shown(v)}" for k, v in fields if v not in (None, "")]
    if full:
        for title in ("params", "metrics", "tags"):
            values = run.get(title) or {}
            out.append(f"{title.capitalize()}:" + ("" if values else " -"))
            out.extend(f"  {shown(k)} = {shown(values[k])}" for k in sorted(values))
    return "\n".join(out)


class ProgressBar:
    """One line on stderr: redrawn in place on a terminal, a line now and then otherwise.

    Call it as ``bar(stage, done, total)`` (packaging, upload) or through
    ``bar.bytes(done, total)`` for a download.
    """

    WIDTH = 28
    WAITS = {"login": "logging in to the cluster"}
    TTY_EVERY = 0.1
    LOG_EVERY = 5.0

    def __init__(self, stream: TextIO | None = None, label: str = "") -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = label
        self._stage = ""
        self._last = 0.0
        self._open_line = False
        self._drawn: tuple[str, int, int] | None = None

    def bytes(self, done: int, total: int) -> None:
        self(self.label or "download", done, total)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if (stage, done, total) == self._drawn:
            # Backends report the end of a transfer twice (last chunk, then done): one
            # line says it.
            return
        now = time.monotonic()
        finished = total > 0 and done >= total
        if stage != self._stage:
            self.close()
            self._stage, self._last = stage, 0.0
        elif not finished and now - self._last < (self.TTY_EVERY if self.tty else self.LOG_EVERY):
            return
        self._last, self._drawn = now, (stage, done, total)
        line = self._line(stage, done, total)
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self._open_line = True
            if finished:
                self.close()
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _line(self, stage: str, done: int, total: int) -> str:
        if total <= 0:
            # A stage without a size: a wait (the login at the cluster), or bytes so far.
            return f"{self.WAITS.get(stage, stage)}\u2026" if not done else f"{stage}: {size(done)}"
        frac = min(1.0, done / total)
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        return f"{stage:<10} [{bar}] {frac:4.0%}  {size(done)} / {size(total)}"

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
