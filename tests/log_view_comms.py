"""A LogView in a real kernel, its comm traffic as a browser receives it: the messages
recorded from the kernel's iopub channel, and a stand-in of ``_log.js``'s model keeping
(``Frontend``), to see what a view holds. The test and bench/log_view.py use it."""

from __future__ import annotations

import json
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# A training log: ~110 characters a line, an emoji now and then (two UTF-16 units in
# the browser, one character in Python), more than ``max_chars`` in all.
FOLLOW = """\
import time
from mantik_jupyter.widgets.log_view import LogView

def lines():
    for i in range({lines}):
        mark = "\\U0001f3c3" if i % 7 == 0 else "-"
        loss = f"loss={{1 / (i + 1):.6f}} rmse={{2 / (i + 1):.6f}}"
        yield f"epoch {{i:5d}} {{mark}} {{loss}} " + "." * 60 + "\\n"
        if i % 10 == 0:
            time.sleep(0.01)

view = {widget}(source=lines(), flush_interval={flush}, max_chars={max_chars})
view.wait(120)
print("MODEL", view.model_id, len(view.text), view.done)
"""

# The LogView of before (the whole tail sent as ``text`` at each flush): the baseline
# bench/log_view.py measures against in the same run.
WHOLE_TEXT = """\
import anywidget, traitlets as t
from mantik_jupyter.widgets.log_view import LogView

class WholeTextLogView(LogView):
    def _append(self, pending):
        if pending:
            text = self.text + "".join(pending)
            pending.clear()
            self.text = text[-self.max_chars :] if len(text) > self.max_chars else text
"""


@dataclass
class Frontend:
    """What ``_log.js`` keeps in the browser's model: the state messages set it, the
    ``append`` messages extend it (offsets in UTF-16 units, as JavaScript counts)."""

    text: str = ""
    end: int = 0
    resyncs: int = 0

    def update(self, state: dict[str, Any]) -> None:
        self.text = state.get("text", self.text)
        self.end = state.get("end", self.end)

    def custom(self, msg: dict[str, Any]) -> None:
        if msg.get("type") != "append" or msg["end"] <= self.end:
            return
        if msg["after"] != self.end:
            self.resyncs += 1
            return
        units = self.text.encode("utf-16-le")[2 * msg["drop"] :]
        self.text = units.decode("utf-16-le") + msg["text"]
        self.end = msg["end"]


@dataclass
class Traffic:
    """The comm messages of one widget: (kind, bytes of the message content, content)."""

    comm_id: str
    messages: list[tuple[str, int, dict]] = field(default_factory=list)

    def frontend(self) -> Frontend:
        view = Frontend()
        for kind, _, data in self.messages:
            if kind == "open" or data.get("method") == "update":
                view.update(data.get("state", {}))
            elif data.get("method") == "custom":
                view.custom(data["content"])
        return view

    def updates(self) -> list[int]:
        """Bytes of each message that carried the log's text (state or append)."""
        out = []
        for kind, size, data in self.messages:
            if kind == "open":
                continue
            state = data.get("state", {})
            if "text" in state or data.get("method") == "custom":
                out.append(size)
        return out


class LogKernel:
    """A real IPython kernel (jupyter_client), its iopub messages all kept."""

    def __init__(self, cwd: Path) -> None:
        from jupyter_client.manager import KernelManager

        self.manager = KernelManager(kernel_name="python3")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.manager.start_kernel(env=env, cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.iopub: list[dict] = []

    def run(self, code: str, timeout: float = 180) -> str:
        """Run a cell; its stdout. Every iopub message is kept in ``iopub``."""
        msg_id = self.client.execute(code)
        out, deadline = [], time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"cell still running: {code[:80]}"
            try:
                msg = self.client.iopub_channel.get_msg(timeout=0.2)
            except queue.Empty:
                continue
            self.iopub.append(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                raise AssertionError("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)

    def to_widget(self, comm_id: str, data: dict) -> None:
        """A comm message from the browser to the widget."""
        msg = self.client.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.client.shell_channel.send(msg)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.iopub.append(self.client.iopub_channel.get_msg(timeout=0.1))
            except queue.Empty:
                pass

    def traffic(self, comm_id: str) -> Traffic:
        found = Traffic(comm_id)
        for msg in self.iopub:
            content = msg["content"]
            if content.get("comm_id") != comm_id:
                continue
            kind = {"comm_open": "open", "comm_msg": "msg"}.get(msg["msg_type"])
            if kind:
                data = content.get("data", {})
                found.messages.append((kind, len(json.dumps(content).encode()), data))
        return found

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def follow(
    kernel: LogKernel, *, lines: int, flush: float, max_chars: int, widget: str = "LogView"
) -> tuple[str, int, Traffic]:
    """Follow a synthetic log of ``lines`` lines in a ``widget``; (its model id, the
    length of its text in the kernel, its traffic)."""
    printed = kernel.run(
        FOLLOW.format(lines=lines, flush=flush, max_chars=max_chars, widget=widget)
    )
    marker = next(line for line in printed.splitlines() if line.startswith("MODEL "))
    _, model_id, length, done = marker.split()
    assert done == "True", printed
    return model_id, int(length), kernel.traffic(model_id)
