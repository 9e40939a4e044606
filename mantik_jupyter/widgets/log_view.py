"""LogView: a scrolling log that follows a running job."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anywidget
import traitlets as t

from ..compute.runs import RunService
from ..errors import MantikError
from ._core import default_service

HERE = Path(__file__).parent
MAX_CHARS = 200_000  # the tail kept in the browser


def _units(text: str) -> int:
    """The length of ``text`` in the browser's string units (UTF-16 code units): an
    emoji is one character here, two there."""
    return len(text.encode("utf-16-le")) // 2


class LogView(anywidget.AnyWidget):
    """Follows the log of ``run`` (id, prefix or name) in a background thread; the view
    stays at the end unless the user scrolled up. ``source``: any iterable of text chunks
    instead of a run (e.g. ``RunService.follow_logs``).

    ``text`` (the tail kept) and ``end`` are the widget's state, as a new view and a saved
    notebook get them; while the log grows, the browser gets only what is new (one
    ``append`` message per flush: the text, and how much to drop from the front),
    not ``text`` again: following a long log sent the whole tail (up to ``max_chars``)
    every quarter second."""

    _esm = HERE / "_log.js"
    _css = HERE / "_table.css"
    text = t.Unicode("").tag(sync=True)
    # Where ``text`` ends in the whole log, in the browser's units (``_units``): an
    # append starting anywhere else does not fit the view's copy, which then asks for
    # the state again.
    end = t.Int(0).tag(sync=True)
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
        # Held while ``text`` changes and its append goes out, and while the state is
        # sent: a view that asks for the state gets it before or after an append, whole.
        # (Before the widget's own __init__, which sends the first state.)
        self._sync_lock = threading.RLock()
        self._quiet = False  # ``text``/``end`` change without a state message
        self.resyncs = 0  # views that asked for the whole state again (none, normally)
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
        self.on_msg(self._on_view_message)
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
        if not pending:
            return
        added = "".join(pending)
        pending.clear()
        with self._sync_lock:
            old, start = self.text, self.end
            text = old + added
            cut = max(0, len(text) - self.max_chars)
            dropped, kept = (
                (old[:cut], added) if cut <= len(old) else (old, added[cut - len(old) :])
            )
            self._quiet = True
            try:
                self.text = text[cut:]
                self.end = start + _units(added)
            finally:
                self._quiet = False
            self.send(
                {
                    "type": "append",
                    "after": start,  # the view's ``end`` this applies to
                    "end": self.end,
                    "drop": _units(dropped),
                    "text": kept,
                }
            )

    # ---- the browser's copy --------------------------------------------------------------

    def _should_send_property(self, key: str, value: Any) -> bool:
        if self._quiet and key in ("text", "end"):
            return False  # the append message carries the change
        return super()._should_send_property(key, value)

    def send_state(self, key: Any = None) -> None:
        with self._sync_lock:
            super().send_state(key)

    def _on_view_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "resync":
            self.resyncs += 1
            self.send_state(["text", "end"])

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
