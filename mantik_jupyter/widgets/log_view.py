"""LogView: a scrolling log that follows a running job."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import anywidget
import traitlets as t

from ..compute.runs import RunService
from ..errors import MantikError
from ._core import default_service

HERE = Path(__file__).parent
MAX_CHARS = 200_000  # the tail kept in the browser


class LogView(anywidget.AnyWidget):
    """Follows the log of ``run`` (id, prefix or name) in a background thread; the view
    stays at the end unless the user scrolled up. ``source``: any iterable of text chunks
    instead of a run (e.g. ``RunService.follow_logs``)."""

    _esm = HERE / "_log.js"
    _css = HERE / "_table.css"
    text = t.Unicode("").tag(sync=True)
    status = t.Unicode("").tag(sync=True)
    done = t.Bool(False).tag(sync=True)

    def __init__(
        self,
        run: str | None = None,
        *,
        service: RunService | None = None,
        source: Iterable[str] | None = None,
        poll_interval: float = 1.0,
        flush_interval: float = 0.25,
        max_chars: int = MAX_CHARS,
        follow: bool = True,
        label: str | None = None,
    ) -> None:
        super().__init__()
        if run is None and source is None:
            raise ValueError("give a run or a source of log text")
        self.run = run
        self.label = label or run or "log"
        self._service = service
        self._source = source
        self.poll_interval = poll_interval
        self.flush_interval = flush_interval
        self.max_chars = max_chars
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if follow:
            self.start()

    def _chunks(self) -> Iterator[str]:
        if self._source is not None:
            yield from self._source
            return
        service = self._service or default_service()
        assert self.run is not None
        yield from service.follow_logs(self.run, poll_interval=self.poll_interval)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self.status = f"Following {self.label}\u2026"
        self._thread = threading.Thread(target=self._follow, name="mantik-w-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if not self.done:
            self.status = "Stopped following."

    def __repr__(self) -> str:
        """The text followed so far (at most ``max_chars``), as the output of a saved or
        converted notebook shows it instead of ``<LogView object at 0x...>``."""
        text = self.text
        if text and not text.endswith("\n"):
            text += "\n"
        return text + (f"[{self.status}]" if self.status else "")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the log ended (or following stopped); True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _append(self, pending: list[str]) -> None:
        if pending:
            text = self.text + "".join(pending)
            pending.clear()
            self.text = text[-self.max_chars :] if len(text) > self.max_chars else text

    def _follow(self) -> None:
        pending: list[str] = []
        last = time.monotonic()
        try:
            for chunk in self._chunks():
                pending.append(chunk)
                # Batch small chunks: one message to the browser per flush interval.
                if time.monotonic() - last >= self.flush_interval:
                    self._append(pending)
                    last = time.monotonic()
                if self._stop.is_set():
                    self._append(pending)
                    self.status = "Stopped following."
                    return
            self._append(pending)
            self.status = "The run ended."
        except MantikError as exc:
            self._append(pending)
            self.status = f"mantik: {exc.message}"
        except Exception as exc:  # shown in the widget; the thread must not die silently
            self._append(pending)
            self.status = f"Error: {type(exc).__name__}: {exc}"
        finally:
            self.done = True

    def close(self) -> None:
        if "_stop" in self.__dict__:  # not when __init__ refused its arguments
            self.stop()
        super().close()
