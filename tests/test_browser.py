"""End-to-end: a real ``jupyter lab`` with the mantik extensions, driven in Debian's Chromium.

The server extension starts its embedded MLflow by itself; the test waits until
``mantik/api/auth/status`` reports it logged in, then checks the Mantik sidebar and the MLflow UI
inside the lab's iframe. Screenshots and the server log go to ``test-artifacts/``.
"""

# The fixtures imported from browser_helpers are the tests' parameters.
# ruff: noqa: F811

from __future__ import annotations

import io
import re
import shutil
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .browser_helpers import (  # noqa: F401 - fixtures
    ARTIFACTS,
    BROWSER_MARKS,
    UI_TIMEOUT_MS,
    LabServer,
    browser,
    jp_asyncio_loop,
    jp_server_cleanup,
    lab,
    page,
    running_lab,
    tracking_ready,
)

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def remote_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A lab configured for a remote tracking server that does not answer (a closed port)."""
    # The port stays bound, never listening, for the module: connecting is refused at once,
    # and no server started later in the session (an embedded MLflow, a lab) can take it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{closed.getsockname()[1]}"
        yield from running_lab(
            tmp_path_factory.mktemp("lab-remote"), (f"--MantikApp.tracking_uri={uri}",)
        )


IN_MAIN_AREA = (
    "() => !!document.querySelector('#jp-main-dock-panel')?.contains(document.activeElement)"
)


def open_lab(page, lab: LabServer):
    from playwright.sync_api import expect

    page.goto(lab.lab_url)
    # The launcher or dock panel shows once the lab has started all plugins.
    expect(page.locator("#jp-main-dock-panel")).to_be_visible()
    # Once its layout is restored, the lab activates a main-area tab (the launcher, or the
    # tab restored as current), which takes the focus a frame later: a test that types
    # into the sidebar before then loses its focus to that tab. A Mantik panel restored
    # open leaves the focus there.
    page.wait_for_function(IN_MAIN_AREA, timeout=60_000)
    tab = page.locator('.jp-SideBar.jp-mod-left [data-id="mantik-sidebar"]')
    expect(tab).to_be_visible()
    sidebar = page.locator('[data-testid="mantik-sidebar"]')
    # The tab toggles the panel, and the lab may still be restoring its layout (which
    # opens the panel too): click only while the tab is not the current one, and look
    # again, so that a restore landing just before a click cannot leave it closed.
    for _ in range(120):
        if sidebar.is_visible():
            break
        if "lm-mod-current" not in (tab.get_attribute("class") or ""):
            tab.click()
        page.wait_for_timeout(500)
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


def open_palette(page) -> None:
    """Through the View menu: a keyboard shortcut is lost while focus sits in an iframe."""
    from playwright.sync_api import expect

    page.locator(".lm-MenuBar-itemLabel", has_text="View").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Activate Command Palette").first.click()
    expect(page.locator(".lm-CommandPalette-input")).to_be_visible()


def test_commands_in_palette_and_dark_theme(page, lab, tracking_ready):
    from playwright.sync_api import expect

    sidebar = open_lab(page, lab)
    expect(sidebar.locator('[data-testid="mantik-login-state"]')).to_have_text("Logged in")

    # The MLflow tab of the previous test is restored with the layout. Its UI takes focus
    # whenever it renders, which closes an open command palette: close the tab first.
    restored = page.locator(".lm-TabBar-tab", has_text="MLflow")
    if restored.count():
        restored.first.locator(".lm-TabBar-tabCloseIcon").click()
        expect(page.locator("#mantik-mlflow")).to_have_count(0)
    # Both commands are in the command palette, under the "Mantik" category. Keyboard
    # shortcuts go to the lab only when focus is not inside the MLflow iframe.
    palette_input = page.locator(".lm-CommandPalette-input")
    items = page.locator(".lm-CommandPalette-item")
    # One query per command: the palette's fuzzy ranking of a shared query varies.
    for label in ("Open Mantik Panel", "Open MLflow"):
        if not palette_input.is_visible():
            open_palette(page)
        palette_input.fill(label)
        expect(items.filter(has_text=label)).to_have_count(1)
        expect(page.locator(".lm-CommandPalette-header").filter(has_text="Mantik")).to_have_count(1)
    page.keyboard.press("Escape")
    expect(palette_input).to_be_hidden()
    # "Open Mantik Panel" from the keyboard leaves the focus in the panel (as the file
    # browser's command does), not where it was before the palette.
    page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current").click()
    expect(sidebar.locator(":focus")).to_have_count(0)
    open_palette(page)
    palette_input.fill("Open Mantik Panel")
    expect(items.first).to_contain_text("Open Mantik Panel")
    palette_input.press("Enter")
    expect(palette_input).to_be_hidden()
    expect(sidebar.locator(":focus")).to_have_count(1)

    # Dark theme: the panel only uses theme variables, so it follows.
    open_palette(page)
    palette_input.fill("JupyterLab Dark")
    # Enter runs the active (first) match; clicking an item races the palette's re-render.
    expect(items.first).to_contain_text("JupyterLab Dark")
    palette_input.press("Enter")
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


def _restored_left_panel(lab: LabServer) -> str | None:
    """The left panel the lab's saved layout opens at start-up."""
    _, workspace = lab.get_json("lab/api/workspaces/default")
    data = workspace.get("data", {}) if isinstance(workspace, dict) else {}
    left = data.get("layout-restorer:data", {}).get("left", {})
    return left.get("current") if not left.get("collapsed") else None


def test_panel_restored_open_leaves_the_focus_in_the_main_area(page, lab, tracking_ready):
    from playwright.sync_api import expect

    sidebar = open_lab(page, lab)
    lab.wait_until(
        lambda: _restored_left_panel(lab) == "mantik-sidebar",
        timeout=30,
        what="the saved layout to have the Mantik panel open",
    )
    # Every focus the panel takes from now on, including during the next start-up.
    page.add_init_script(
        "window.__mantikFocus = []; document.addEventListener('focusin', e => {"
        " if (e.target.closest && e.target.closest('[data-testid=\"mantik-sidebar\"]'))"
        " window.__mantikFocus.push(e.target.outerHTML.slice(0, 80)); }, true);"
    )
    # On a busy machine the layout arrives after the panel has rendered its content, so
    # the restore's activation found something to focus (CI saw it now and then): hold
    # the saved layout back to make that the case every time.
    held = []

    def hold_first_layout(route) -> None:
        if not held:
            held.append(route.request.url)
            time.sleep(2)
        route.continue_()

    page.route("**/lab/api/workspaces/**", hold_first_layout)
    page.reload()
    expect(sidebar).to_be_visible()
    page.wait_for_function(IN_MAIN_AREA, timeout=60_000)
    page.wait_for_timeout(1000)  # any later frame of the panel's
    assert held, "the test did not hold back the saved layout"
    assert page.evaluate("window.__mantikFocus") == []
    assert page.evaluate(IN_MAIN_AREA)
    page.unroute("**/lab/api/workspaces/**")

    # A click on the panel's tab (after another panel's) is the user's: it takes the focus.
    page.locator('.jp-SideBar.jp-mod-left [data-id="filebrowser"]').click()
    expect(sidebar).to_be_hidden()
    page.locator('.jp-SideBar.jp-mod-left [data-id="mantik-sidebar"]').click()
    expect(sidebar).to_be_visible()
    expect(sidebar.locator(":focus")).to_have_count(1)


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
    # The keyboard user is back in the password field to correct it, not on the page.
    expect(form.get_by_label("Password", exact=True)).to_be_focused()
    # Runs that could not be read are not "no runs yet": only the error says why.
    expect(sidebar.locator(".mantik-runs-error")).to_be_visible()
    expect(sidebar.locator(".mantik-runs-empty")).to_have_count(0)
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-remote-login-error.png"))

    # Token mode swaps the fields.
    form.get_by_label("With token").check()
    expect(form.get_by_label("Token", exact=True)).to_be_visible()
    expect(form.get_by_label("Username", exact=True)).to_have_count(0)


@pytest.fixture(scope="module")
def tracked_lab(tmp_path_factory, mlflow_server) -> Iterator[LabServer]:
    """A lab using the session's MLflow server (basic auth): users log in and out."""
    yield from running_lab(
        tmp_path_factory.mktemp("lab-tracked"), (f"--MantikApp.tracking_uri={mlflow_server.uri}",)
    )


def _log_out(lab: LabServer) -> None:
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 (the test lab's URL)
        lab.base + "mantik/api/auth/logout",
        data=b"{}",
        method="POST",
        headers={"Authorization": f"token {lab.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
        assert answer.status == 200


def test_after_logout_and_login_the_runs_are_the_new_users(page, tracked_lab, mlflow_server):
    from playwright.sync_api import expect

    from mantik_jupyter.tracking.rest import TrackingClient
    from mantik_jupyter.tracking.runs_api import RunsApi

    ada, bob = mlflow_server.create_user(), mlflow_server.create_user()
    api = RunsApi(TrackingClient(mlflow_server.uri, ada))
    experiment, _ = api.get_or_create_experiment("browser-logout")
    tags = {"mantik.backend": "local", "mantik.state": "FINISHED"}
    run = api.create_run(experiment, run_name="ada-private-run", tags=tags)
    api.update_run(run["info"]["run_id"], status="FINISHED")

    sidebar = open_lab(page, tracked_lab)
    state = sidebar.locator('[data-testid="mantik-login-state"]')

    def log_in(user) -> None:
        form = sidebar.locator(".mantik-login-form")
        form.get_by_label("Username", exact=True).fill(user.username)
        form.get_by_label("Password", exact=True).fill(user.password)
        form.get_by_label("Password", exact=True).press("Enter")
        expect(state).to_have_text("Logged in", timeout=60_000)

    log_in(ada)
    row = sidebar.locator(".mantik-run-row").filter(has_text="ada-private-run")
    expect(row).to_be_visible(timeout=60_000)
    row.click()
    expect(sidebar.locator('[data-testid="mantik-run-details"]')).to_be_visible()

    # Logged out: none of ada's runs or details stay on screen.
    sidebar.locator('[data-testid="mantik-logout"]').click()
    expect(state).to_have_text("Not logged in")
    expect(sidebar.locator(".mantik-run-row")).to_have_count(0)
    expect(sidebar.locator('[data-testid="mantik-run-details"]')).to_have_count(0)

    # bob sees his (no) runs at once, without the logged-out error lingering.
    log_in(bob)
    expect(sidebar.locator(".mantik-runs-error")).to_have_count(0, timeout=10_000)
    expect(sidebar.locator(".mantik-run-row")).to_have_count(0)
    page.wait_for_timeout(2_000)  # a status answer from before the login must not undo it
    expect(state).to_have_text("Logged in")

    # Logged out elsewhere (a notebook, `mantik logout`) while the panel was hidden: shown
    # at once when it opens again, not at the next 10 s status poll.
    tab = page.locator('.jp-SideBar.jp-mod-left [data-id="mantik-sidebar"]')
    tab.click()
    expect(sidebar).to_be_hidden()
    _log_out(tracked_lab)
    tab.click()
    expect(sidebar).to_be_visible()
    expect(state).to_have_text("Not logged in", timeout=5_000)


def test_many_runs_and_a_long_run_name(page, tracked_lab, mlflow_server):
    """Beyond the first page the panel says older runs exist (a filter sees only what is
    loaded) and loads them; a long run name is cut short in the list, whole in the details."""
    from playwright.sync_api import expect

    from mantik_jupyter.tracking.rest import TrackingClient
    from mantik_jupyter.tracking.runs_api import RunsApi

    carol = mlflow_server.create_user()
    api = RunsApi(TrackingClient(mlflow_server.uri, carol))
    experiment, _ = api.get_or_create_experiment("browser-many")
    tags = {"mantik.backend": "local", "mantik.state": "FINISHED"}
    start = int(time.time() * 1000) - 3_600_000
    for i in range(101):
        api.create_run(experiment, run_name=f"old-{i:03d}", tags=tags, start_time=start + i)
    long_name = "calibrated-ensemble-" * 8 + "end"
    api.create_run(experiment, run_name=long_name, tags=tags, start_time=start + 1000)

    sidebar = open_lab(page, tracked_lab)
    try:
        form = sidebar.locator(".mantik-login-form")
        form.get_by_label("Username", exact=True).fill(carol.username)
        form.get_by_label("Password", exact=True).fill(carol.password)
        form.get_by_label("Password", exact=True).press("Enter")
        rows = sidebar.locator(".mantik-run-row")
        expect(rows).to_have_count(100, timeout=60_000)
        more = sidebar.locator('[data-testid="mantik-runs-more"]')
        expect(more).to_contain_text("The 100 newest runs are shown.")

        # The oldest run is not loaded: the filter says it looked at the newest 100 only.
        sidebar.get_by_label("Filter runs by name or id").fill("old-000")
        expect(sidebar.locator(".mantik-runs-empty")).to_have_text(
            'No run among the 100 newest matches the filters: text "old-000".'
        )
        more.get_by_role("button", name="Load older runs").click()
        expect(rows).to_have_count(1)
        expect(rows.locator(".mantik-run-name")).to_have_text("old-000")
        expect(more).to_have_count(0)

        # The keyboard: the list is one Tab stop however long it is; End, Home and the
        # arrows move inside it.
        sidebar.get_by_label("Filter runs by name or id").fill("")
        expect(rows).to_have_count(102)
        rows.first.focus()
        page.keyboard.press("End")
        expect(rows.last).to_be_focused()
        expect(rows.last.locator(".mantik-run-name")).to_have_text("old-000")
        page.keyboard.press("Tab")
        assert page.evaluate("!document.activeElement.closest('.mantik-RunList')")
        page.keyboard.press("Shift+Tab")
        expect(rows.last).to_be_focused()
        page.keyboard.press("Home")
        expect(rows.first).to_be_focused()

        # At a laptop's height the details open below the panel's fold: selecting a run
        # brings their header and actions into sight.
        page.set_viewport_size({"width": 1366, "height": 660})
        rows.nth(2).click()
        details = sidebar.locator('[data-testid="mantik-run-details"]')
        expect(details.locator(".mantik-details-title")).to_have_text("old-099")
        expect(details.locator(".mantik-details-title")).to_be_in_viewport()
        expect(details.get_by_role("button", name="Open in MLflow")).to_be_in_viewport()
        rows.nth(2).click()
        expect(details).to_have_count(0)
        page.set_viewport_size({"width": 1400, "height": 900})

        # The long name: cut short in the row (its tooltip has it), whole in the details.
        sidebar.get_by_label("Filter runs by name or id").fill("calibrated")
        expect(rows).to_have_count(1)
        assert long_name in (rows.locator(".mantik-run-name").get_attribute("title") or "")
        rows.first.click()
        title = sidebar.locator('[data-testid="mantik-run-details"] .mantik-details-title')
        expect(title).to_have_text(long_name)
        width, visible = title.evaluate("e => [e.scrollWidth, e.clientWidth]")
        assert width <= visible, (width, visible)
        sidebar.screenshot(path=str(ARTIFACTS / "sidebar-long-run-name.png"))
        # Closing the details from the keyboard leaves the focus on the run's row.
        sidebar.get_by_role("button", name="Close run details").focus()
        page.keyboard.press("Enter")
        expect(sidebar.locator('[data-testid="mantik-run-details"]')).to_have_count(0)
        expect(rows.first).to_be_focused()
    finally:
        _log_out(tracked_lab)


def test_runs_list_names_and_filters_by_experiment(page, tracked_lab, mlflow_server):
    """Each row names its run's experiment; the experiment filter is the server's search
    (it finds an experiment's runs beyond the newest 100 of all), kept across refreshes
    and a reload of the lab; an empty list names the filters that emptied it."""
    from playwright.sync_api import expect

    from mantik_jupyter.tracking.rest import TrackingClient
    from mantik_jupyter.tracking.runs_api import RunsApi

    dana = mlflow_server.create_user()
    api = RunsApi(TrackingClient(mlflow_server.uri, dana))
    study_a, _ = api.get_or_create_experiment("browser-study-a")
    study_b, _ = api.get_or_create_experiment("browser-study-b")
    tags = {"mantik.backend": "local", "mantik.state": "FINISHED"}
    start = int(time.time() * 1000) - 3_600_000
    api.create_run(study_a, run_name="a-baseline", tags=tags, start_time=start)
    for i in range(100):
        api.create_run(study_b, run_name=f"b-{i:03d}", tags=tags, start_time=start + 1 + i)

    sidebar = open_lab(page, tracked_lab)
    by_experiment = sidebar.get_by_label("Filter runs by experiment")
    try:
        _log_in_form(sidebar, dana)
        rows = sidebar.locator(".mantik-run-row")
        expect(rows).to_have_count(100, timeout=60_000)
        expect(rows.first.locator(".mantik-run-experiment")).to_have_text("browser-study-b")
        expect(rows.filter(has_text="a-baseline")).to_have_count(0)

        # Study A's run is older than the newest 100: the server's search finds it.
        expect(by_experiment.locator("option")).to_have_text(
            ["All experiments", "browser-study-a", "browser-study-b"]
        )
        by_experiment.select_option(label="browser-study-a")
        expect(rows).to_have_count(1)
        expect(rows.first.locator(".mantik-run-name")).to_have_text("a-baseline")
        expect(rows.first.locator(".mantik-run-experiment")).to_have_text("browser-study-a")
        expect(sidebar.locator('[data-testid="mantik-runs-more"]')).to_have_count(0)
        rows.first.click()
        expect(sidebar.locator(".mantik-run-experiment-name")).to_have_text("browser-study-a")
        sidebar.screenshot(path=str(ARTIFACTS / "sidebar-experiment-filter.png"))

        # The refresh button and the polls ask for the same experiment.
        with page.expect_request(
            lambda r: "/mantik/api/runs?" in r.url and f"experiment_id={study_a}" in r.url
        ):
            sidebar.get_by_role("button", name="Refresh runs").click()
        page.wait_for_timeout(1_500)
        expect(rows).to_have_count(1)

        # No failed run in study A: the list says which filters are on.
        sidebar.get_by_label("Filter runs by state").select_option("FAILED")
        expect(sidebar.locator(".mantik-runs-empty")).to_have_text(
            'No run matches the filters: experiment "browser-study-a", state "Failed".'
        )
        sidebar.get_by_label("Filter runs by state").select_option("all")

        # A reload of the lab keeps the experiment.
        page.reload()
        sidebar = open_lab(page, tracked_lab)
        by_experiment = sidebar.get_by_label("Filter runs by experiment")
        rows = sidebar.locator(".mantik-run-row")
        expect(by_experiment).to_have_value(str(study_a))
        expect(rows).to_have_count(1)
        expect(rows.first.locator(".mantik-run-name")).to_have_text("a-baseline")
    finally:
        # The filter is kept with the lab's layout: the tests after this start with all.
        if by_experiment.count():
            by_experiment.select_option("")
            page.wait_for_timeout(1_500)
        _log_out(tracked_lab)


# ---- runs: submit from the dialog, follow, cancel, open in MLflow ------------------------

# Runs on the local backend take 10-20 s on a loaded machine; MLflow answers in ~1 s.
RUN_TIMEOUT_MS = 240_000


def _copy_example(lab: LabServer) -> str:
    from .browser_helpers import REPO

    target = lab.root / "weather-forecast"
    if not target.exists():
        shutil.copytree(REPO / "examples" / "weather-forecast", target)
    return target.name


def _open_submit_dialog(page, folder: str):
    """Right-click ``folder`` in the file browser and pick "Submit to HPC…"."""
    from playwright.sync_api import expect

    tab = page.locator('.jp-SideBar.jp-mod-left [data-id="filebrowser"]')
    if "lm-mod-current" not in (tab.get_attribute("class") or ""):
        tab.click()  # the tab toggles: a click on the current one would close it
    item = page.locator(".jp-DirListing-item").filter(
        has=page.locator(".jp-DirListing-itemText", has_text=re.compile(f"^{folder}$"))
    )
    expect(item).to_be_visible()
    item.click(button="right")
    menu_item = page.locator(".lm-Menu-item").filter(has_text="Submit to HPC…")
    expect(menu_item).to_be_visible()
    menu_item.click()
    dialog = page.locator('[data-testid="mantik-submit-dialog"]')
    expect(dialog.get_by_role("dialog")).to_be_visible()
    return dialog


def _submit_from_file_browser(page, folder: str, entry_point: str, run_name: str, **params):
    """Right-click the project folder, "Submit to HPC…", fill the form, submit."""
    from playwright.sync_api import expect

    dialog = _open_submit_dialog(page, folder)
    expect(dialog.locator(".mantik-submit-project")).to_contain_text(folder)
    # Every control has a label (accessibility), so the test fills the form by label.
    expect(dialog.get_by_label("Backend config")).to_have_value("compute-backend-config.yaml")
    dialog.get_by_label("Entry point").select_option(entry_point)
    for name, value in params.items():
        field = dialog.get_by_label(re.compile(f"^{name}"))
        expect(field).to_be_visible()
        field.fill(str(value))
    dialog.get_by_label("Experiment").fill("e2e-sidebar")
    dialog.get_by_label("Run name").fill(run_name)
    return dialog


def _assert_modal_layout(page, dialog) -> None:
    """The submit dialog is a modal as JupyterLab's own: a backdrop over the whole lab, the
    form centred, Cancel and Submit side by side, nothing wider than the form."""
    geometry = dialog.evaluate(
        """node => {
            const box = r => { const b = r.getBoundingClientRect();
                return {x: b.x, y: b.y, w: b.width, h: b.height}; };
            const body = node.querySelector('.jp-Dialog-body');
            const content = node.querySelector('.jp-Dialog-content');
            return {
                backdrop: box(node), content: box(node.querySelector('.jp-Dialog-content')),
                cancel: box(node.querySelector('.mantik-submit-cancel')),
                submit: box(node.querySelector('.mantik-submit-button')),
                overflow: Math.max(
                    body.scrollWidth - body.clientWidth,
                    content.scrollWidth - content.clientWidth),
                viewport: {w: window.innerWidth, h: window.innerHeight},
                hit: document.elementFromPoint(5, window.innerHeight - 5) === node,
            };
        }"""
    )
    viewport, content = geometry["viewport"], geometry["content"]
    whole = {"x": 0, "y": 0, "w": viewport["w"], "h": viewport["h"]}
    assert geometry["backdrop"] == whole, geometry
    assert geometry["hit"], f"the lab behind the dialog takes clicks: {geometry}"
    assert abs(content["y"] + content["h"] / 2 - viewport["h"] / 2) < 2, geometry
    assert abs(geometry["cancel"]["y"] - geometry["submit"]["y"]) < 2, geometry
    assert geometry["cancel"]["x"] < geometry["submit"]["x"], geometry
    assert geometry["overflow"] <= 0, geometry


def _hold_requests(page, pattern, method: str) -> list:
    """Hold the page's requests to ``pattern`` made with ``method`` (the others go through);
    the test continues the held routes, in the returned list, when it wants the answers."""
    held: list = []

    def hold(route):
        if route.request.method == method:
            held.append(route)
        else:
            route.continue_()

    page.route(pattern, hold)
    return held


def _wait_for_state(run_details, states: str, what: str):
    from playwright.sync_api import expect

    chip = run_details.locator(".mantik-Section-header .mantik-run-state")
    try:
        expect(chip).to_have_attribute("data-state", re.compile(states), timeout=RUN_TIMEOUT_MS)
    except AssertionError as error:
        raise AssertionError(
            f"{what}: the run did not reach {states} within {RUN_TIMEOUT_MS / 1000:.0f} s; "
            f"it shows {chip.get_attribute('data-state')!r}. Log pane:\n"
            f"{run_details.locator('.mantik-log').inner_text()[-2000:]}"
        ) from error


def test_submit_follow_cancel_and_open_in_mlflow(page, lab, tracking_ready):
    from playwright.sync_api import expect

    folder = _copy_example(lab)
    sidebar = open_lab(page, lab)
    expect(sidebar.locator('[data-testid="mantik-login-state"]')).to_have_text("Logged in")
    expect(sidebar.locator('[data-testid="mantik-runs"]')).to_be_visible()

    # 1. Submit the example with epochs=2 from the dialog (context menu on the folder).
    dialog = _submit_from_file_browser(page, folder, "main", "e2e-forecast", epochs=2)
    _assert_modal_layout(page, dialog)
    # A wrong value is flagged inline before anything is sent, and Submit takes the
    # focus to it (else the click does nothing a keyboard or screen reader user notices).
    epochs = dialog.get_by_label(re.compile("^epochs"))
    epochs.fill("two")
    expect(dialog.locator(".mantik-field-error")).to_have_text("Must be a whole number")
    dialog.get_by_role("button", name="Submit").focus()
    page.keyboard.press("Enter")
    expect(epochs).to_be_focused()
    expect(epochs).to_have_attribute("aria-invalid", "true")
    epochs.fill("2")
    expect(dialog.locator(".mantik-field-error")).to_have_count(0)
    # Enter in a field submits the form (and does not just close the dialog).
    epochs.press("Enter")
    expect(dialog).to_have_count(0, timeout=120_000)

    # The panel comes back with the new run on top, selected, its row focused (the
    # context menu that had the focus before the dialog is gone).
    expect(sidebar).to_be_visible()
    first_row = sidebar.locator(".mantik-run-row").first
    expect(first_row.locator(".mantik-run-name")).to_have_text("e2e-forecast")
    expect(first_row).to_be_focused()
    details = sidebar.locator('[data-testid="mantik-run-details"]')
    expect(details.locator(".mantik-details-title")).to_have_text("e2e-forecast")

    # 2. It reaches FINISHED in the list; params and the log are shown.
    _wait_for_state(details, "^FINISHED$", "e2e-forecast")
    expect(first_row.locator(".mantik-run-state")).to_have_text("FINISHED")
    expect(details.locator(".mantik-params")).to_contain_text("epochs")
    log = details.locator('[data-testid="mantik-log"]')
    expect(log).to_contain_text("epoch 2/2", timeout=60_000)
    expect(details.locator(".mantik-log-state")).to_have_text("complete", timeout=60_000)
    expect(details.locator(".mantik-metrics")).to_contain_text("rmse", timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-run-finished.png"))

    # Files of the run, with download links.
    status, info = lab.get_json(f"mantik/api/runs/{details.get_attribute('data-run-id')}")
    assert status == 200, info
    gone = Path(info["tags"]["mantik.run_dir"]) / "gone soon.txt"
    gone.write_text("here\n")
    details.locator(".mantik-files summary").click()
    expect(details.locator(".mantik-FileList a").first).to_be_visible(timeout=60_000)
    files = details.locator(".mantik-files")
    files.screenshot(path=str(ARTIFACTS / "sidebar-run-files.png"))
    # The user's files first; the ones mantik wrote to run the job apart, closed and
    # dimmed, and still there to download (the job script is how the run ran).
    yours = files.get_by_label("Files in the run directory")
    expect(yours.get_by_role("button", name="Open folder code")).to_be_visible()
    expect(yours.get_by_role("link", name=re.compile("^Download mantik.log "))).to_be_visible()
    for internal_file in ("mantik-job.sh", "package.tar.gz", "mantik.exitcode"):
        expect(
            yours.get_by_role("link", name=re.compile(f"^Download {internal_file} "))
        ).to_have_count(0)
    internal = files.locator('[data-testid="mantik-files-internal"]')
    expect(internal).not_to_have_attribute("open", "")
    expect(internal.locator("summary")).to_contain_text("mantik files")
    internal.locator("summary").click()
    script = internal.get_by_role("link", name=re.compile("^Download mantik-job.sh "))
    expect(script).to_be_visible()
    files.screenshot(path=str(ARTIFACTS / "sidebar-run-files-mantik.png"))
    with page.expect_download() as download:
        script.click()
    assert download.value.failure() is None
    assert "MLFLOW_RUN_ID" in Path(download.value.path()).read_text()
    link = details.get_by_role("link", name=re.compile("^Download gone soon.txt"))
    with page.expect_download() as download:
        link.click()
    assert download.value.failure() is None
    assert Path(download.value.path()).read_text() == "here\n"
    # Gone by the time it is clicked: the server's word, not a download that silently fails.
    gone.unlink()
    link.click()
    expect(details.locator(".mantik-files .mantik-error")).to_contain_text(
        "Cannot download gone soon.txt: There is no 'gone soon.txt' in the run directory"
    )
    # A folder downloads as one zip archive named after the run and the folder, and so
    # does the whole run (the download refused folders): what the run has, links up and
    # mantik's credential file left out.
    run_dir = gone.parent
    (run_dir / "code" / "outputs" / "up").symlink_to("../MLproject")
    (run_dir / ".mantik-credentials").write_text("MLFLOW_TRACKING_PASSWORD=never-served\n")
    with page.expect_download() as download:
        yours.get_by_role("link", name="Download folder code as zip").click()
    assert download.value.failure() is None
    assert download.value.suggested_filename == "e2e-forecast-code.zip"
    with zipfile.ZipFile(download.value.path()) as zipped:
        assert zipped.testzip() is None
        names = zipped.namelist()
        assert "code/MLproject" in names and "code/outputs/" in names, names
        forecast = (run_dir / "code" / "outputs" / "forecast.csv").read_bytes()
        assert zipped.read("code/outputs/forecast.csv") == forecast
        assert "code/outputs/up" not in names, names
    with page.expect_download() as download:
        files.get_by_role("link", name="Download the whole run as zip").click()
    assert download.value.failure() is None
    assert download.value.suggested_filename == "e2e-forecast.zip"
    whole = Path(download.value.path()).read_bytes()
    assert b"never-served" not in whole
    names = zipfile.ZipFile(io.BytesIO(whole)).namelist()
    run_id = details.get_attribute("data-run-id")
    assert f"{run_id}/mantik.log" in names and f"{run_id}/code/outputs/forecast.csv" in names
    assert not [n for n in names if ".mantik-credentials" in n], names
    (run_dir / ".mantik-credentials").unlink()
    # The folder asked for last is the one shown, whatever order the answers come in:
    # the listing of code/outputs is held back until the run directory's has been shown.
    files.get_by_role("button", name="Open folder code").click()
    expect(files.get_by_label("Files in code", exact=True)).to_be_visible(timeout=60_000)
    held = []

    def hold_outputs(route):
        if "path=code%2Foutputs" in route.request.url:
            held.append(route)
        else:
            route.continue_()

    files_api = re.compile(r".*/mantik/api/runs/[^/]+/files\?.*")
    page.route(files_api, hold_outputs)
    files.get_by_role("button", name="Open folder outputs").click()
    for _ in range(200):
        if held:
            break
        page.wait_for_timeout(50)
    assert len(held) == 1, held
    files.get_by_role("button", name="../").click()
    expect(files.get_by_label("Files in the run directory")).to_be_visible(timeout=60_000)
    held[0].continue_()
    page.wait_for_timeout(1000)
    expect(files.get_by_label("Files in the run directory")).to_be_visible()
    expect(files.locator(".mantik-muted", has_text="Loading")).to_have_count(0)
    page.unroute(files_api)

    # 3. A long run (the `sleep` entry point) is cancelled after confirming.
    dialog = _submit_from_file_browser(page, folder, "sleep", "e2e-sleep", seconds=600)
    page.screenshot(path=str(ARTIFACTS / "submit-dialog.png"))
    dialog.get_by_role("button", name="Submit").click()
    expect(dialog).to_have_count(0, timeout=120_000)
    details = sidebar.locator('[data-testid="mantik-run-details"]')
    expect(details.locator(".mantik-details-title")).to_have_text("e2e-sleep")
    _wait_for_state(details, "^(QUEUED|RUNNING)$", "e2e-sleep")
    details.locator('[data-testid="mantik-cancel-run"]').click()
    confirm = page.locator(".jp-Dialog").filter(has_text="Cancel run?")
    expect(confirm).to_be_visible()
    expect(confirm.get_by_role("button", name="Keep running")).to_be_focused()
    confirm.get_by_role("button", name="Cancel run").click()
    _wait_for_state(details, "^KILLED$", "e2e-sleep after cancel")
    expect(details.locator('[data-testid="mantik-cancel-run"]')).to_have_count(0)
    # The focus was on Cancel run, gone now: it is on the run's row, which says KILLED.
    expect(sidebar.locator(".mantik-run-row").first).to_be_focused()
    expect(sidebar.locator(".mantik-run-row").first.locator(".mantik-run-state")).to_have_text(
        "KILLED"
    )
    # Filters: only the finished run is left under "Finished".
    sidebar.get_by_label("Filter runs by state").select_option("FINISHED")
    expect(sidebar.locator(".mantik-run-row")).to_have_count(1)
    expect(sidebar.locator(".mantik-run-row .mantik-run-name")).to_have_text("e2e-forecast")
    sidebar.get_by_label("Filter runs by state").select_option("all")
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-runs.png"))

    # 4. "Open in MLflow" opens the run's page in the MLflow tab.
    details.locator('[data-testid="mantik-open-run-mlflow"]').click()
    mlflow = page.locator("#mantik-mlflow")
    expect(mlflow).to_be_visible()
    src = mlflow.locator("iframe").get_attribute("src") or ""
    # The link the server gives with the run, not one the sidebar builds itself.
    status, sleeping = lab.get_json(f"mantik/api/runs/{details.get_attribute('data-run-id')}")
    assert status == 200, sleeping
    assert src == sleeping["mlflow_url"], (src, sleeping["mlflow_url"])
    assert "/lab-under-test/mantik/mlflow/#/experiments/" in src, src
    frame = page.frame_locator("#mantik-mlflow iframe")
    expect(frame.locator("body")).to_contain_text("e2e-sleep", timeout=90_000)
    page.screenshot(path=str(ARTIFACTS / "mlflow-run-in-lab.png"))


def test_submit_dialog_shows_server_errors_inline(page, lab, tracking_ready):
    from playwright.sync_api import expect

    folder = _copy_example(lab)
    broken = lab.root / folder / "broken-config.yaml"
    broken.write_text("Local: {}\nResources:\n  Queue: local\n  Nodez: 2\n")
    long_folder = lab.root / ("ERA5_downscaling_ensemble_" * 4 + "v2")
    long_folder.mkdir(exist_ok=True)
    long_param = "boundary_conditions_" * 5 + "path"
    (long_folder / "MLproject").write_text(
        f"name: {'ERA5_downscaling_ensemble_' * 4}v2\nentry_points:\n  main:\n"
        f"    parameters:\n      {long_param}: {{type: string, default: {'/p/scratch' * 12}}}\n"
        f"    command: python -c pass\n"
    )
    (long_folder / "compute-backend-config.yaml").write_text("Local: {}\nResources: {Queue: q}\n")
    broken_project = lab.root / "broken-mlproject"
    broken_project.mkdir(exist_ok=True)
    (broken_project / "MLproject").write_text(
        "name: b\nentry_points:\n  main:\n    parameters:\n      e: {type: int default: 5}\n"
    )
    try:
        sidebar = open_lab(page, lab)
        # The sidebar's Submit… with the launcher in focus takes the file browser's folder,
        # the root here, which has no MLproject: the dialog says so and how to pick one.
        submit_open = sidebar.locator('[data-testid="mantik-submit-open"]')
        submit_open.click()
        dialog = page.locator('[data-testid="mantik-submit-dialog"]')
        expect(dialog.locator(".mantik-submit-load-error")).to_contain_text("No MLproject")
        expect(dialog.locator('[data-testid="mantik-submit-load-hint"]')).to_contain_text(
            "right-click its folder in the file browser"
        )
        _assert_modal_layout(page, dialog)
        page.keyboard.press("Escape")
        expect(dialog).to_have_count(0)
        expect(submit_open).to_be_focused()

        # A broken MLproject: the YAML parser's caret stays under the column it points at.
        dialog = _open_submit_dialog(page, broken_project.name)
        load_error = dialog.locator(".mantik-submit-load-error")
        expect(load_error).to_contain_text("is not valid YAML")
        lines = load_error.inner_text().split("\n")
        caret = next((i for i, line in enumerate(lines) if line.strip() == "^"), None)
        assert caret is not None, f"no line with the caret alone: {lines}"
        assert lines[caret - 1][lines[caret].index("^")] == "{", lines
        page.keyboard.press("Escape")
        expect(dialog).to_have_count(0)

        # Long names without spaces (project, parameter, default) wrap inside the form.
        dialog = _submit_from_file_browser(page, long_folder.name, "main", "e2e-long")
        expect(dialog.get_by_label(re.compile("^boundary_conditions_"))).to_be_visible()
        _assert_modal_layout(page, dialog)
        page.keyboard.press("Escape")
        expect(dialog).to_have_count(0)

        dialog = _submit_from_file_browser(page, folder, "main", "e2e-broken")
        # Chosen by the user: no hint about how the folder was found.
        expect(dialog.locator('[data-testid="mantik-submit-load-hint"]')).to_have_count(0)
        dialog.get_by_label("Backend config").select_option("broken-config.yaml")
        # The config check from the server is shown before submitting ...
        expect(dialog.locator(".mantik-config-error")).to_contain_text("Nodez")
        # ... and the server's answer to the submission too, with the dialog left open.
        dialog.get_by_role("button", name="Submit").click()
        error = dialog.locator('[data-testid="mantik-submit-error"]')
        expect(error).to_contain_text("Nodes", timeout=60_000)
        expect(error).to_have_attribute("data-reason", "invalid_config")
        page.screenshot(path=str(ARTIFACTS / "submit-dialog-error.png"))
        page.keyboard.press("Escape")
        expect(dialog).to_have_count(0)

        # Once a submission is on its way it cannot be taken back: Cancel and Escape wait
        # for the answer, and the run it made is shown (the server's answer is held here).
        held = _hold_requests(page, re.compile(r".*/mantik/api/runs(\?.*)?$"), "POST")
        dialog = _submit_from_file_browser(page, folder, "main", "e2e-held", epochs=1)
        dialog.get_by_role("button", name="Submit").click()
        expect(dialog.locator('[data-testid="mantik-submit-button"]')).to_have_text("Submitting…")
        # A large folder takes minutes to send: the dialog says what it waits for, how long.
        progress = dialog.locator(".mantik-submit-progress")
        expect(progress).to_have_attribute("role", "status")
        expect(progress).to_contain_text(re.compile(r"handing it to the backend: \d+ s so far"))
        expect(progress).to_contain_text("Exclude")
        page.wait_for_function("() => true")  # lets the held request reach the handler
        expect(dialog.get_by_role("button", name="Cancel")).to_be_disabled()
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        expect(dialog.get_by_role("dialog")).to_be_visible()
        assert len(held) == 1, held
        held[0].continue_()
        expect(dialog).to_have_count(0, timeout=120_000)
        details = page.locator('[data-testid="mantik-run-details"]')
        expect(details.locator(".mantik-details-title")).to_have_text("e2e-held")
    finally:
        broken.unlink()
        shutil.rmtree(long_folder)
        shutil.rmtree(broken_project)


def test_submit_dialog_says_which_parameter_names_mlflow_refuses(page, lab, tracking_ready):
    """A parameter named 'T_2m (°C)' was refused after Submit with the tracking server's
    raw answer (\\u00b0 escapes, params[0].key); the dialog says at the field what MLflow
    allows and which characters it does not, and sends nothing. Letters of any alphabet
    are fine ('température')."""
    from playwright.sync_api import expect

    folder = lab.root / "parameter-names"
    folder.mkdir(exist_ok=True)
    (folder / "MLproject").write_text(
        "name: parameter-names\nentry_points:\n  main:\n    parameters:\n"
        '      "température": {type: float, default: 1.5}\n'
        '      "T_2m (°C)": {type: float, default: 2}\n'
        '    command: "echo {température} {T_2m (°C)}"\n',
        encoding="utf-8",
    )
    (folder / "compute-backend-config.yaml").write_text("Local: {}\nResources: {Queue: q}\n")
    posts: list[str] = []
    page.on(
        "request",
        lambda r: (
            posts.append(r.url) if r.method == "POST" and "/mantik/api/runs" in r.url else None
        ),
    )
    open_lab(page, lab)
    dialog = _open_submit_dialog(page, folder.name)
    refused = dialog.get_by_label(re.compile("^T_2m"))
    expect(refused).to_be_visible()
    expect(refused).to_have_attribute("aria-invalid", "true")
    error = dialog.locator(".mantik-param-name-error")
    expect(error).to_have_count(1)
    expect(error).to_have_text(
        'MLflow cannot record a parameter named "T_2m (°C)": a name may contain only letters '
        'and digits (of any alphabet), spaces and _ - . : /, not "(", "°", ")". '
        "Rename it in the MLproject."
    )
    expect(refused).to_have_accessible_description(re.compile("^MLflow cannot record"))
    expect(dialog.get_by_label(re.compile("^température"))).not_to_have_attribute(
        "aria-invalid", "true"
    )
    dialog.screenshot(path=str(ARTIFACTS / "submit-dialog-parameter-name.png"))
    # Submit goes to the field at fault instead of to the server.
    dialog.get_by_role("button", name="Submit").click()
    expect(refused).to_be_focused()
    page.wait_for_timeout(1_000)
    assert posts == []
    expect(dialog.locator('[data-testid="mantik-submit-error"]')).to_have_count(0)
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)


def test_runs_list_says_when_the_tracking_server_is_slow(page, lab, tracking_ready):
    """A hung tracking server answers the runs search only after the lab's 60 s timeout:
    meanwhile the list said nothing and looked up to date. It now says it is waiting."""
    from playwright.sync_api import expect

    sidebar = open_lab(page, lab)
    runs = sidebar.locator('[data-testid="mantik-runs"]')
    expect(runs).to_have_attribute("aria-busy", "false")
    search = re.compile(r".*/mantik/api/runs\?.*")
    held = _hold_requests(page, search, "GET")
    try:
        sidebar.get_by_role("button", name="Refresh runs").click()
        waiting = runs.locator(".mantik-runs-waiting")
        expect(waiting).to_have_attribute("role", "status")
        expect(waiting).to_contain_text(re.compile(r"no answer for \d+ s"))
        expect(runs).to_have_attribute("aria-busy", "true")
    finally:
        released = list(held)
        for route in released:
            route.continue_()
        # Unrouting lets through a search held meanwhile.
        page.unroute(search)
    expect(waiting).to_have_text("")
    expect(runs).to_have_attribute("aria-busy", "false")


def _log_in_form(sidebar, user) -> None:
    from playwright.sync_api import expect

    form = sidebar.locator(".mantik-login-form")
    form.get_by_label("Username", exact=True).fill(user.username)
    form.get_by_label("Password", exact=True).fill(user.password)
    form.get_by_label("Password", exact=True).press("Enter")
    expect(sidebar.locator('[data-testid="mantik-login-state"]')).to_have_text(
        "Logged in", timeout=60_000
    )


def test_runs_not_followed_here_and_queued_duration(page, tracked_lab, mlflow_server):
    """Runs whose binding does not verify here (submitted elsewhere) answer 403 to logs of
    an active run, files, downloads and cancel: the details grey those out, saying why and
    what to do, and keep what the server allows (MLflow, an ended run's stored log). A
    QUEUED run's duration is the time it has been queued, not a running time; once a job
    ran (mantik.running_since) the queue wait and the running time show apart."""
    import json

    from playwright.sync_api import expect

    from mantik_jupyter.tracking.rest import TrackingClient
    from mantik_jupyter.tracking.runs_api import RunsApi

    erin = mlflow_server.create_user()
    api = RunsApi(TrackingClient(mlflow_server.uri, erin))
    experiment, _ = api.get_or_create_experiment("browser-not-followed")
    # What another installation records: a job bound with a key this lab does not know.
    elsewhere = {
        "mantik.backend": "local",
        "mantik.backend_spec": json.dumps({"kind": "local", "Directory": "/nonexistent"}),
        "mantik.job_id": "4242",
        "mantik.run_dir": "/nonexistent/run",
        "mantik.binding": "v1:0000000000000000:" + "0" * 64,
    }
    now = int(time.time() * 1000)
    running = api.create_run(
        experiment,
        run_name="elsewhere-running",
        tags={
            **elsewhere,
            "mantik.state": "RUNNING",
            "mantik.running_since": str(now - 60_000),
        },
        start_time=now - 120_000,
    )
    ended = api.create_run(
        experiment,
        run_name="elsewhere-finished",
        tags={
            **elsewhere,
            "mantik.state": "FINISHED",
            "mantik.running_since": str(now - 420_000),
        },
        start_time=now - 600_000,
    )
    api.upload_artifact(ended, "mantik/mantik.log", b"stored log of the finished run\n")
    api.update_run(ended["info"]["run_id"], status="FINISHED", end_time=now - 300_000)
    queued = api.create_run(
        experiment,
        run_name="elsewhere-queued",
        tags={**elsewhere, "mantik.state": "QUEUED"},
        start_time=now - 330_000,
    )

    sidebar = open_lab(page, tracked_lab)
    try:
        _log_in_form(sidebar, erin)
        running_id, ended_id = running["info"]["run_id"], ended["info"]["run_id"]
        # What the server allows for such runs (the sidebar offers exactly that).
        for path in (f"{running_id}/files", f"{ended_id}/files", f"{running_id}/logs"):
            status, body = tracked_lab.get_json(f"mantik/api/runs/{path}")
            assert status == 403, (path, status, body)
        status, body = tracked_lab.get_json(f"mantik/api/runs/{ended_id}/logs")
        assert status == 200 and "stored log" in body["text"], (status, body)  # type: ignore[index]

        rows = sidebar.locator(".mantik-run-row")
        details = sidebar.locator('[data-testid="mantik-run-details"]')

        # An active run followed elsewhere: no cancel, files or log from here.
        running_row = rows.filter(has_text="elsewhere-running")
        # Its row tells a screen reader the submission, the queue wait and the running time.
        expect(running_row).to_have_attribute(
            "aria-label",
            re.compile(r"submitted 2 min ago, queued 1 min 0 s, running for 1 min \d+ s"),
        )
        running_row.click()
        expect(details).to_have_attribute("data-run-id", running_id)
        expect(details.locator(".mantik-run-duration")).to_have_text(
            re.compile(r"^queued 1 min 0 s, running for 1 min \d+ s$")
        )
        cancel = details.get_by_role("button", name="Cancel run")
        expect(cancel).to_be_disabled()
        expect(cancel).to_have_attribute("title", re.compile("another mantik installation"))
        notice = details.locator(".mantik-not-followed")
        expect(notice).to_contain_text("another mantik installation")
        expect(cancel).to_have_accessible_description(re.compile("another mantik installation"))
        files = details.locator(".mantik-files summary")
        expect(files).to_have_attribute("aria-disabled", "true")
        expect(files).to_have_attribute("title", re.compile("another mantik installation"))
        files.click()
        files.press("Enter")
        page.wait_for_timeout(300)
        expect(details.locator(".mantik-files")).not_to_have_attribute("open", "")
        expect(details.locator(".mantik-log")).to_contain_text("not followed here")
        # The keyboard still reaches the greyed-out actions (their names and reasons are
        # read out); Enter on Cancel asks nothing and cancels nothing.
        mlflow_button = details.get_by_role("button", name="Open in MLflow")
        expect(mlflow_button).to_be_enabled()
        mlflow_button.focus()
        page.keyboard.press("Tab")
        expect(cancel).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator(".jp-Dialog")).to_have_count(0)
        page.wait_for_timeout(1_000)
        expect(details.locator(".mantik-error")).to_have_count(0)
        sidebar.screenshot(path=str(ARTIFACTS / "sidebar-run-not-followed.png"))

        # An ended one: its stored log is readable; its files are not.
        rows.filter(has_text="elsewhere-finished").click()
        expect(details).to_have_attribute("data-run-id", ended_id)
        expect(details.locator(".mantik-run-duration")).to_have_text(
            "queued 3 min 0 s, ran 2 min 0 s"
        )
        expect(details.locator(".mantik-log")).to_contain_text("stored log of the finished run")
        expect(details.get_by_role("button", name="Cancel run")).to_have_count(0)
        expect(details.locator(".mantik-files summary")).to_have_attribute("aria-disabled", "true")
        expect(details.get_by_role("button", name="Open in MLflow")).to_be_enabled()
        expect(details.locator(".mantik-error")).to_have_count(0)

        # Queued for 5.5 minutes: that is what the duration says, not a running time.
        rows.filter(has_text="elsewhere-queued").click()
        expect(details).to_have_attribute("data-run-id", queued["info"]["run_id"])
        duration = details.locator(".mantik-run-duration")
        expect(duration).to_have_text(re.compile(r"^queued for 5 min"))

        # The REST run says why the run is not followed here (the message of the 403s).
        status, body = tracked_lab.get_json(f"mantik/api/runs/{running_id}")
        assert status == 200, (status, body)
        why = body["not_followed"]  # type: ignore[index]
        assert "another mantik installation" in why and "trusted" in why, why
    finally:
        _log_out(tracked_lab)


def test_filters_fit_the_narrowest_sidebar(page, tracked_lab, mlflow_server):
    """At the narrowest width the sidebar can be dragged to, every filter shows its whole
    text (the backend filter's 'All backends' was cut off)."""
    from playwright.sync_api import expect

    sidebar = open_lab(page, tracked_lab)
    filters = sidebar.locator(".mantik-filters")
    expect(filters).to_be_visible()
    # Drag the sidebar's edge far to the left: the lab stops it at the panel's minimum.
    handle = page.locator("#jp-main-split-panel > .lm-SplitPanel-handle").first
    box = handle.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(5, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.wait_for_timeout(500)
    panel_width = sidebar.evaluate("e => e.getBoundingClientRect().width")
    assert panel_width < 260, panel_width
    sidebar.screenshot(path=str(ARTIFACTS / "sidebar-narrowest-filters.png"))
    panel_right = sidebar.evaluate("e => e.getBoundingClientRect().right")
    for control in filters.locator("input, select").all():
        expect(control).to_be_visible()
        width, needed, right = control.evaluate(
            """e => {
                const shown = e.getBoundingClientRect();
                const saved = e.style.cssText;
                e.style.cssText += ';width:max-content !important;' +
                    'max-width:none !important;flex:none !important';
                const needed = e.getBoundingClientRect().width;
                e.style.cssText = saved;
                return [shown.width, needed, shown.right];
            }"""
        )
        label = control.get_attribute("aria-label")
        assert right <= panel_right + 0.5, (label, right, panel_right)
        if control.evaluate("e => e.tagName") == "SELECT":
            assert width + 0.5 >= needed, (label, width, needed)
    filters.get_by_label("Filter runs by backend").select_option("")
