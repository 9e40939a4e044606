"""End-to-end: a real ``jupyter lab`` with the mantik extensions, driven in Debian's Chromium.

The server extension starts its embedded MLflow by itself; the test waits until
``mantik/api/auth/status`` reports it logged in, then checks the Mantik sidebar and the MLflow UI
inside the lab's iframe. Screenshots and the server log go to ``test-artifacts/``.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator

import pytest

from .browser_helpers import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    LABEXTENSION_BUILD,
    LabServer,
    free_port,
    save_log,
    start_lab,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed"),
]

# The embedded MLflow takes 5-15 s on two cores, more when the machine is busy.
TRACKING_READY_TIMEOUT = 120.0
UI_TIMEOUT_MS = 60_000


def _running_lab(tmp, extra_args=()) -> Iterator[LabServer]:
    if not (LABEXTENSION_BUILD / "package.json").exists():
        pytest.fail(
            f"The labextension is not built ({LABEXTENSION_BUILD}/package.json is missing): run "
            "`cd labextension && jlpm install && jlpm build:prod` or `pip install -e .`"
        )
    server = start_lab(tmp, extra_args)
    try:
        server.wait_until(
            lambda: server.get_json("api/status")[0] == 200, timeout=60, what="jupyter lab"
        )
        yield server
    finally:
        server.stop()
        save_log(server, f"{tmp.name}.log")
        if server.stray_pids:
            warnings.warn(
                f"jupyter lab left processes running after it stopped: {server.stray_pids} "
                "(ended by the test)",
                stacklevel=1,
            )


@pytest.fixture
def jp_asyncio_loop():
    """Override pytest-jupyter's autouse loop fixture (when that plugin is loaded).

    It closes "the current" event loop after each test, which under Playwright's sync API is
    Playwright's own, still running, loop. These tests need no Jupyter loop in this process.
    """
    yield None


@pytest.fixture
def jp_server_cleanup():
    """Override pytest-jupyter's autouse in-process server cleanup: no in-process server here."""
    yield


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A lab on the default: the embedded tracking server."""
    yield from _running_lab(tmp_path_factory.mktemp("lab-embedded"))


@pytest.fixture(scope="module")
def remote_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A lab configured for a remote tracking server that does not answer (a closed port)."""
    uri = f"http://127.0.0.1:{free_port()}"
    yield from _running_lab(
        tmp_path_factory.mktemp("lab-remote"), (f"--MantikApp.tracking_uri={uri}",)
    )


@pytest.fixture(scope="module")
def tracking_ready(lab: LabServer) -> dict:
    """Wait until the embedded tracking server is up and the lab is logged in to it."""

    def logged_in():
        status, body = lab.get_json("mantik/api/auth/status")
        if status != 200 or not isinstance(body, dict):
            return None
        # `ready` is False while the embedded MLflow is still booting.
        return body if body.get("logged_in") and body.get("ready", True) else None

    started = time.monotonic()
    status = lab.wait_until(
        logged_in, timeout=TRACKING_READY_TIMEOUT, what="auth/status to report logged_in"
    )
    print(f"embedded tracking ready after {time.monotonic() - started:.1f} s: {status}")
    return status


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, lab: LabServer, request: pytest.FixtureRequest):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"[{msg.type}] {msg.text}"))
    page.on("pageerror", lambda err: console.append(f"[pageerror] {err}"))
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"{request.node.name}-console.log").write_text("\n".join(console))
        context.close()


def open_lab(page, lab: LabServer):
    from playwright.sync_api import expect

    page.goto(lab.lab_url)
    # The launcher or dock panel shows once the lab has started all plugins.
    expect(page.locator("#jp-main-dock-panel")).to_be_visible()
    tab = page.locator('.jp-SideBar.jp-mod-left [data-id="mantik-sidebar"]')
    expect(tab).to_be_visible()
    sidebar = page.locator('[data-testid="mantik-sidebar"]')
    if not sidebar.is_visible():
        tab.click()
    expect(sidebar).to_be_visible()
    return sidebar


def test_sidebar_shows_embedded_tracking_and_opens_mlflow(page, lab, tracking_ready):
    from playwright.sync_api import expect

    assert tracking_ready["embedded"] is True
    ARTIFACTS.mkdir(exist_ok=True)
    # The proxy must answer at all before the UI can render in the iframe.
    code, _ = lab.get_json("mantik/mlflow/", timeout=30)
    assert code == 200, f"GET mantik/mlflow/ answered {code}.\n{lab.log_tail()}"

    sidebar = open_lab(page, lab)
    status = sidebar.locator(".mantik-status")
    expect(status.locator(".mantik-tracking-uri")).to_have_text("Embedded tracking")
    expect(status.locator('[data-testid="mantik-login-state"]')).to_have_text("Logged in")
    expect(status.locator('[data-testid="mantik-login-state"]')).to_have_attribute(
        "data-logged-in", "true"
    )
    if tracking_ready.get("username"):
        expect(status.locator(".mantik-username")).to_have_text(tracking_ready["username"])
    # Embedded tracking needs no login form, and no error is shown.
    expect(sidebar.locator(".mantik-login-form")).to_have_count(0)
    expect(sidebar.locator(".mantik-error")).to_have_count(0)
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-embedded.png"))

    open_button = sidebar.locator(".mantik-open-mlflow")
    expect(open_button).to_have_text("Open MLflow")
    open_button.click()

    mlflow = page.locator("#mantik-mlflow")
    expect(mlflow).to_be_visible()
    expect(
        page.locator("#jp-main-dock-panel .lm-TabBar-tab").filter(has_text="MLflow")
    ).to_be_visible()
    iframe = mlflow.locator("iframe")
    sandbox = iframe.get_attribute("sandbox") or ""
    for token in ("allow-scripts", "allow-same-origin", "allow-forms", "allow-downloads"):
        assert token in sandbox.split(), sandbox
    assert (iframe.get_attribute("src") or "").endswith("/lab-under-test/mantik/mlflow/")

    frame = page.frame_locator("#mantik-mlflow iframe")
    expect(frame.locator("body")).to_contain_text(
        re.compile(r"Experiments|Default"), timeout=90_000
    )
    # The "Default" experiment is listed: the UI's API calls (POSTs too) work through the proxy.
    frame.get_by_role("link", name="Experiments").first.click()
    expect(frame.get_by_text("Default", exact=True).first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "mlflow-in-lab.png"))

    # Opening again re-activates the same tab instead of stacking copies.
    open_button.click()
    expect(page.locator("#mantik-mlflow")).to_have_count(1)


def test_commands_in_palette_and_dark_theme(page, lab, tracking_ready):
    from playwright.sync_api import expect

    sidebar = open_lab(page, lab)
    expect(sidebar.locator('[data-testid="mantik-login-state"]')).to_have_text("Logged in")

    # Both commands are in the command palette, under the "Mantik" category.
    page.keyboard.press("Control+Shift+C")
    palette_input = page.locator(".lm-CommandPalette-input")
    expect(palette_input).to_be_focused()
    palette_input.fill("Mantik")
    items = page.locator(".lm-CommandPalette-item")
    expect(items.filter(has_text="Open Mantik Panel")).to_have_count(1)
    expect(items.filter(has_text="Open MLflow")).to_have_count(1)
    page.keyboard.press("Escape")

    # Dark theme: the panel only uses theme variables, so it follows.
    page.keyboard.press("Control+Shift+C")
    palette_input.fill("JupyterLab Dark")
    items.filter(has_text="JupyterLab Dark").first.click()
    expect(page.locator("body")).to_have_attribute("data-jp-theme-light", "false")
    page.wait_for_timeout(500)
    expect(sidebar).to_be_visible()
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-embedded-dark.png"))

    # Keyboard: the Open MLflow button is reachable and works with Enter.
    button = sidebar.locator(".mantik-open-mlflow")
    button.focus()
    expect(button).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#mantik-mlflow")).to_be_visible()

    # Restore the light theme for later runs sharing the same settings dir.
    page.keyboard.press("Control+Shift+C")
    palette_input.fill("JupyterLab Light")
    items.filter(has_text="JupyterLab Light").first.click()
    expect(page.locator("body")).to_have_attribute("data-jp-theme-light", "true")


def test_remote_tracking_login_form_shows_server_errors(page, remote_lab):
    from playwright.sync_api import expect

    status, body = remote_lab.get_json("mantik/api/auth/status")
    assert status == 200 and body["embedded"] is False and body["logged_in"] is False, body

    sidebar = open_lab(page, remote_lab)
    expect(sidebar.locator(".mantik-tracking-uri")).to_have_text(body["tracking_uri"])
    expect(sidebar.locator('[data-testid="mantik-login-state"]')).to_have_text("Not logged in")

    form = sidebar.locator(".mantik-login-form")
    expect(form).to_be_visible()
    submit = form.locator('[data-testid="mantik-login-submit"]')
    expect(submit).to_be_disabled()

    # Inputs are reachable by their labels (accessibility) and submit with Enter.
    form.get_by_label("Username", exact=True).fill("ada")
    form.get_by_label("Password", exact=True).fill("not-the-password")
    expect(submit).to_be_enabled()
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-remote-login.png"))
    form.get_by_label("Password", exact=True).press("Enter")

    # The tracking server is unreachable: the server's JSON `message` is shown inline.
    error = sidebar.locator('[data-testid="mantik-action-error"]')
    expect(error).to_be_visible(timeout=90_000)
    expect(error).not_to_be_empty()
    expect(sidebar.locator('[data-testid="mantik-login-state"]')).to_have_text("Not logged in")
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-remote-login-error.png"))

    # Token mode swaps the fields.
    form.get_by_label("With token").check()
    expect(form.get_by_label("Token", exact=True)).to_be_visible()
    expect(form.get_by_label("Username", exact=True)).to_have_count(0)
