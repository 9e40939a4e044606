"""End-to-end: a LogView following a long log in a notebook of a real lab, in Debian
Chromium, shown twice (two views of one widget), then saved with its widget state and
the page reloaded.

The kernel sends only what is new at each flush (``append`` messages); ``_log.js`` keeps
the model's text up to date from them. Each view, the saved widget state and the views
after a reload must show the kernel's text exactly: the log's tail, emoji included (two
string units in the browser, one character in Python).
"""

# The fixtures imported from browser_helpers are the tests' parameters.
# ruff: noqa: F811

from __future__ import annotations

import json
import time

from .browser_helpers import (  # noqa: F401 - fixtures
    BROWSER_MARKS,
    UI_TIMEOUT_MS,
    browser,
    jp_asyncio_loop,
    jp_server_cleanup,
    lab,
    open_and_run_all,
    page,
)
from .test_browser_widgets import notebook

pytestmark = BROWSER_MARKS

LINES, MAX_CHARS = 3000, 20_000

SETUP = f"""\
import time
from mantik_jupyter.widgets.log_view import LogView

def lines():
    for i in range({LINES}):
        mark = "\\U0001f3c3" if i % 7 == 0 else "-"
        yield f"epoch {{i:5d}} {{mark}} " + "." * 60 + "\\n"
        if i % 10 == 0:
            time.sleep(0.01)

view = LogView(source=lines(), flush_interval=0.05, max_chars={MAX_CHARS}, follow=False)
view
"""


RUNNER = "\U0001f3c3"


def whole_log() -> str:
    return "".join(
        f"epoch {i:5d} {RUNNER if i % 7 == 0 else '-'} " + "." * 60 + "\n" for i in range(LINES)
    )


def shown(page) -> list[str]:
    return page.locator("pre.mantik-w-log").evaluate_all("els => els.map(e => e.textContent)")


def wait_shown(page, expected: str, views: int) -> list[str]:
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    while True:
        texts = shown(page)
        if len(texts) == views and all(t == expected for t in texts):
            return texts
        assert time.monotonic() < deadline, [(len(t), t[:80], t[-80:]) for t in texts]
        time.sleep(0.25)


def test_a_followed_log_shows_the_kernels_text_in_every_view_and_in_the_saved_state(page, lab):
    from playwright.sync_api import expect

    # Widget state saved with the notebook (JupyterLab's 'Save Widget State
    # Automatically'): what a reopened notebook shows without a kernel.
    settings = lab.tmp / "lab-settings" / "@jupyter-widgets" / "jupyterlab-manager"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"saveState": True}))

    path = lab.root / "follow-log.ipynb"
    cells = [
        SETUP,
        "view",
        'view.start()\nview.wait(120)\nprint("followed", len(view.text))',
        # The views kept up from the appends alone (a view that cannot asks for it all).
        'print("views asked again", view.resyncs)',
    ]
    path.write_text(json.dumps(notebook(cells)))
    open_and_run_all(page, lab, "follow-log.ipynb")
    expect(page.get_by_text(f"followed {MAX_CHARS}")).to_be_visible(timeout=180_000)

    log = whole_log()
    tail = log[-MAX_CHARS:]
    wait_shown(page, tail, views=2)
    expect(page.get_by_text("views asked again 0")).to_be_visible(timeout=UI_TIMEOUT_MS)

    # Saved: the widget state holds the whole tail the views show.
    page.locator(".jp-Notebook").first.click()
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 30
    while True:
        saved = json.loads(path.read_text())
        widgets = saved["metadata"].get("widgets", {})
        states = widgets.get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
        logs = [s["state"] for s in states.values() if "end" in s.get("state", {})]
        if logs:
            break
        assert time.monotonic() < deadline, saved["metadata"]
        time.sleep(0.5)
    (state,) = logs
    assert state["text"] == tail
    assert state["end"] == len(log.encode("utf-16-le")) // 2

    # Reloaded while the kernel runs: the views come back from the kernel's state.
    page.reload()
    expect(page.locator(".jp-NotebookPanel")).to_be_visible(timeout=UI_TIMEOUT_MS)
    wait_shown(page, tail, views=2)
