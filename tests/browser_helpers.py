"""A real ``jupyter lab`` for browser tests, isolated from the user's Jupyter directories.

Also the fixtures the browser test modules share (import them into the module; they are not
a conftest plugin, because ``jp_asyncio_loop`` and ``jp_server_cleanup`` switch off
pytest-jupyter's in-process server for the whole module): ``lab`` (a lab on the embedded
tracking server), ``tracking_ready``, ``browser`` (Debian's Chromium through Playwright) and
``page``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
LABEXTENSION_BUILD = REPO / "mantik_jupyter" / "labextension"
BASE_URL = "/lab-under-test/"

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed"),
]

# Environment variables that would point the lab at the user's files or a real tracking server.
_SCRUBBED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "JUPYTER_PATH",
    "JUPYTER_CONFIG_PATH",
    "JUPYTER_TOKEN",
    "JUPYTER_PREFER_ENV_PATH",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LabServer:
    """A running ``jupyter lab`` subprocess."""

    tmp: Path
    root: Path
    port: int
    token: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False)
    stray_pids: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        """Absolute URL of the server's base, ending with a slash."""
        return f"http://127.0.0.1:{self.port}{BASE_URL}"

    @property
    def lab_url(self) -> str:
        return f"{self.base}lab?token={self.token}"

    def get_json(self, path: str, timeout: float = 10.0) -> tuple[int, object]:
        """GET ``<base><path>`` with the token; returns (status, parsed JSON or text)."""
        request = urllib.request.Request(  # noqa: S310 (http URL built here)
            self.base + path, headers={"Authorization": f"token {self.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no server log>"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, predicate, timeout: float, what: str, interval: float = 0.5):
        """Poll ``predicate()`` until it returns a truthy value; fail with the server log."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"jupyter lab exited with {self.process.returncode} while waiting for "
                    f"{what}.\n--- server log ---\n{self.log_tail()}"
                )
            try:
                last = predicate()
            except OSError as error:  # connection refused while starting
                last = error
            else:
                if last:
                    return last
            time.sleep(interval)
        raise AssertionError(
            f"Timed out after {timeout:.0f} s waiting for {what} (last: {last!r}).\n"
            f"--- server log ---\n{self.log_tail()}"
        )

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                # SIGTERM lets jupyter_server run stop_extension (stops the embedded MLflow).
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    # A blocked event loop ignores SIGTERM: SIGABRT makes faulthandler
                    # (PYTHONFAULTHANDLER) write every thread's stack to the server log first.
                    self.process.send_signal(signal.SIGABRT)
                    try:
                        self.process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        os.killpg(self.process.pid, signal.SIGKILL)
                        self.process.wait(timeout=10)
        finally:
            self._reap_strays()

    def _reap_strays(self) -> None:
        """End processes this lab left behind (e.g. an embedded MLflow in its own session).

        Only processes whose command line names this lab's private temporary directory are
        ended, by pid; a failure here is reported so that leaks do not go unnoticed.
        """
        marker = str(self.tmp) + os.sep
        strays: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                strays.append(int(entry.name))
        for pid in strays:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for pid in strays:
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.2)
            if Path(f"/proc/{pid}").exists():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.stray_pids = strays


def start_lab(tmp: Path, extra_args: tuple[str, ...] = ()) -> LabServer:
    """Start ``jupyter lab`` with every Jupyter directory under ``tmp``.

    The server extension is enabled through the isolated config dir and the labextension is the
    build in this work tree (linked into the isolated data dir), so the test does not depend on
    the project being pip-installed and never touches the user's Jupyter directories.
    """
    root = tmp / "root"
    data = tmp / "data"
    config = tmp / "config"
    runtime = tmp / "runtime"
    home = tmp / "home"
    for path in (root, data / "labextensions", config, runtime, home):
        path.mkdir(parents=True, exist_ok=True)

    link = data / "labextensions" / "mantik-jupyter"
    link.symlink_to(LABEXTENSION_BUILD, target_is_directory=True)

    (config / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "ServerApp": {
                    "jpserver_extensions": {"mantik_jupyter": True},
                    "allow_unauthenticated_access": False,
                },
                "LabApp": {
                    "news_url": None,
                    "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                },
            }
        )
    )

    # No "get notified about Jupyter news?" toast over the panels in screenshots.
    notification = tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false"})
    )

    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        {
            "HOME": str(home),
            "JUPYTER_DATA_DIR": str(data),
            # In a venv, jupyter_core looks in the venv's share/ first, where an installed
            # (possibly older) build of the extension would win over this work tree's.
            "JUPYTER_PREFER_ENV_PATH": "0",
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_RUNTIME_DIR": str(runtime),
            "JUPYTERLAB_SETTINGS_DIR": str(tmp / "lab-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "lab-workspaces"),
            "MANTIK_DATA_DIR": str(tmp / "mantik"),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
            "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1",
        }
    )

    port = free_port()
    token = secrets.token_hex(24)
    env["JUPYTER_TOKEN"] = token  # not on the command line, where `ps` would show it
    log_path = tmp / "jupyter-lab.log"
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--allow-root",
        "--no-browser",
        f"--ServerApp.base_url={BASE_URL}",
        "--ServerApp.ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LabServer(
        tmp=tmp, root=root, port=port, token=token, process=process, log_path=log_path, env=env
    )


def open_and_run_all(page, lab: LabServer, name: str) -> None:
    """Open the notebook ``name`` of the lab's root and run all its cells once its kernel
    is up (the command palette's Run All Cells)."""
    from playwright.sync_api import expect

    page.goto(f"{lab.base}lab/tree/{name}?token={lab.token}")
    expect(page.locator(".jp-NotebookPanel")).to_be_visible()
    # The kernel is up when its status says idle.
    expect(
        page.locator(".jp-Notebook-ExecutionIndicator, .jp-Toolbar-kernelName")
    ).not_to_have_count(0)
    page.wait_for_timeout(1000)
    page.keyboard.press("Control+Shift+C")
    page.locator(".lm-CommandPalette-input").fill("Run All Cells")
    page.locator(".lm-CommandPalette-item").filter(has_text="Run All Cells").first.click()


def save_log(server: LabServer, name: str = "jupyter-lab.log") -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(server.log_path, ARTIFACTS / name)


# The embedded MLflow takes 5-15 s on two cores, more when the machine is busy.
TRACKING_READY_TIMEOUT = 120.0
UI_TIMEOUT_MS = 60_000


def running_lab(tmp, extra_args=()) -> Iterator[LabServer]:
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
    yield from running_lab(tmp_path_factory.mktemp("lab-embedded"))


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
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    # Assertions wait as long as actions: the lab loads slowly on a busy machine.
    expect.set_options(timeout=UI_TIMEOUT_MS)
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"[{msg.type}] {msg.text}"))
    page.on("pageerror", lambda err: console.append(f"[pageerror] {err}"))
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"{request.node.name}-console.log").write_text("\n".join(console))
        context.close()
