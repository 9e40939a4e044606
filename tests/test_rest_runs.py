"""The REST face of runs and backends, against a real MLflow server and the local backend.

The Jupyter server runs with ``allow_unauthenticated_access: False`` under a
non-root base URL, as the design asks. The example MLproject is submitted
through ``POST runs`` and followed to its end with the other routes.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import re
import shutil
import time
import tracemalloc
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from tornado.httpclient import HTTPResponse
from tornado.simple_httpclient import HTTPStreamClosedError, SimpleAsyncHTTPClient
from traitlets.config import Config

from mantik_jupyter.compute.backends import local as local_backend

from .lab_fixtures import lab_config
from .mlflow_fixtures import MlflowServer
from .runs_helpers import admin_api

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "weather-forecast"
FINAL = {"FINISHED", "FAILED", "KILLED"}
RUN_TIMEOUT = 180


@pytest.fixture
def jp_base_url() -> str:
    return "/lab/base/"


@pytest.fixture
def mantik_data(tmp_path: Path) -> Path:
    return tmp_path / "mantik-data"


@pytest.fixture
def jp_server_config(mlflow_server: MlflowServer, mantik_data: Path) -> Config:
    return lab_config(mantik_data, mlflow_server.uri, sync_interval=1.0)


@pytest.fixture
def project(jp_root_dir: Path) -> str:
    """The example project inside the Jupyter root; its config uses the Local backend."""
    shutil.copytree(EXAMPLE, jp_root_dir / "weather-forecast")
    return "weather-forecast"


async def call(
    jp_fetch: Any, *parts: str, method: str = "GET", body: Any = None, **params: Any
) -> tuple[int, Any]:
    """Status and decoded JSON body; errors are answers to look at, not exceptions."""
    kwargs: dict[str, Any] = {"method": method, "raise_error": False}
    if method != "GET":
        kwargs["body"] = body if isinstance(body, str | bytes) else json.dumps(body or {})
    resp: HTTPResponse = await jp_fetch(
        "mantik", "api", *parts, params={k: v for k, v in params.items() if v is not None}, **kwargs
    )
    data = json.loads(resp.body, parse_constant=_not_json) if resp.body else None
    return resp.code, data


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} in an answer: not JSON (JSON.parse and jq refuse it)")


@pytest.fixture
def logged_in(
    jp_fetch: Any, mlflow_server: MlflowServer, jp_asyncio_loop: asyncio.AbstractEventLoop
) -> str:
    """A fresh MLflow user (no rights but its own experiments), logged in through the API."""
    user = mlflow_server.create_user()
    code, data = jp_asyncio_loop.run_until_complete(
        call(
            jp_fetch,
            "auth",
            "login",
            method="POST",
            body={"username": user.username, "password": user.password},
        )
    )
    assert code == 200, data
    assert data["logged_in"] and data["username"] == user.username
    assert user.password not in json.dumps(data)
    return user.username


def experiment() -> str:
    return f"rest-{uuid.uuid4().hex[:8]}"


async def submit(jp_fetch: Any, project: str, **fields: Any) -> dict[str, Any]:
    body = {
        "project_dir": project,
        "backend_config": "compute-backend-config.yaml",
        "experiment_name": experiment(),
        **fields,
    }
    code, data = await call(jp_fetch, "runs", method="POST", body=body)
    assert code == 201, data
    return data


async def wait_for(
    jp_fetch: Any, run_id: str, states: set[str], timeout: float = RUN_TIMEOUT
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, run = await call(jp_fetch, "runs", run_id)
        assert code == 200, run
        if run["state"] in states:
            return run
        assert time.monotonic() < deadline, f"run still {run['state']} after {timeout} s"
        await asyncio.sleep(1)


# ---- authentication on every route -----------------------------------------------------


def _mantik_patterns(app: Any) -> set[str]:
    """Every URL pattern of the tornado app under mantik/, however it was registered."""
    found: set[str] = set()

    def walk(router: Any) -> None:
        for rule in getattr(router, "rules", []):
            regex = getattr(rule.matcher, "regex", None)
            if regex is not None and "mantik/" in regex.pattern:
                found.add(regex.pattern)
            walk(rule.target)

    walk(app.default_router)
    walk(app.wildcard_router)
    return found


def _sample_url(pattern: str) -> str:
    """A concrete path matching a route pattern: every group becomes 'x'."""
    path = re.sub(r"\((?:\?P<\w+>)?[^()]*\)", "x", pattern)
    return path.replace("?", "").rstrip("$").lstrip("^")


async def test_every_route_needs_authentication(
    jp_serverapp: Any, http_server_client: Any, jp_base_url: str
) -> None:
    patterns = _mantik_patterns(jp_serverapp.web_app)
    urls = {_sample_url(p) for p in patterns}
    # The registry is the source of truth; this only guards against it coming back empty
    # (an extension that failed to load would make the test pass vacuously).
    for expected in ("mantik/api/auth/status", "mantik/api/runs", "mantik/api/backends"):
        assert f"{jp_base_url}{expected}" in urls, sorted(urls)
    assert any("mantik/api/runs/x/download" in u for u in urls), sorted(urls)
    assert any("mantik/mlflow/" in u for u in urls), sorted(urls)
    for url in sorted(urls):
        for method in ("GET", "POST"):
            resp = await http_server_client.fetch(
                url,
                method=method,
                body=b"{}" if method == "POST" else None,
                raise_error=False,
                follow_redirects=False,
            )
            assert resp.code == 403, f"{method} {url} answered {resp.code} without authentication"
            assert b"Traceback" not in (resp.body or b"")


def _openapi_path(pattern: str, base_url: str) -> str:
    """``/base/mantik/api/runs/(?P<ref>[^/]+)/logs$`` -> ``/api/runs/{ref}/logs``."""
    path = re.sub(r"\(\?P<(\w+)>[^()]*\)", r"{\1}", pattern)
    path = re.sub(r"/\?\([^()]*\)", "/{path}", path)
    return path.rstrip("$").removeprefix(f"{base_url}mantik")


def test_openapi_describes_every_route(jp_serverapp: Any, jp_base_url: str) -> None:
    spec = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
    registered = {_openapi_path(p, jp_base_url) for p in _mantik_patterns(jp_serverapp.web_app)}
    assert registered == set(spec["paths"]), (registered, set(spec["paths"]))
    for path, item in spec["paths"].items():
        for verb, op in item.items():
            if verb in ("get", "post", "put", "patch", "delete", "head", "options"):
                assert "403" in op["responses"], (verb, path)
                if "{ref}" in path:
                    # Every {ref} is resolved: unknown (404), or an ambiguous prefix or a
                    # run without a backend job (409).
                    assert {"404", "409"} <= set(op["responses"]), (verb, path)


async def test_error_reasons_are_documented(
    jp_serverapp: Any, http_server_client: Any, jp_base_url: str
) -> None:
    """Errors the Jupyter server itself answers under mantik/api carry a documented reason."""
    spec = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
    reasons = set(spec["components"]["schemas"]["Error"]["properties"]["reason"]["enum"])
    auth = {"Authorization": f"token {jp_serverapp.identity_provider.token}"}
    for path, status in (
        ("runs/x/cancel", 405),  # GET on a POST route
        ("runs/x/files?path=%ff", 400),  # a query string that is not UTF-8
    ):
        resp = await http_server_client.fetch(
            f"{jp_base_url}mantik/api/{path}", headers=auth, raise_error=False
        )
        err = json.loads(resp.body)
        assert resp.code == status and err["reason"] in reasons, (path, resp.code, err)


# ---- the lifecycle ---------------------------------------------------------------------


async def _download_abandoned(
    jp_serverapp: Any, port: int, base_url: str, run: dict[str, Any]
) -> None:
    """A download the browser gives up half-way (the user cancelled it) ends quietly: no
    'Uncaught exception' with a traceback in the server log."""
    big = Path(run["tags"]["mantik.run_dir"]) / "big.bin"
    with big.open("wb") as out:
        out.truncate(64 * 1024 * 1024)
    records: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.DEBUG)
    catcher.emit = records.append  # type: ignore[method-assign]
    # The handlers log through the extension's logger, tornado's errors through the server's.
    loggers = [jp_serverapp.log, logging.getLogger("MantikApp")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(catcher)
        logger.setLevel(logging.DEBUG)
    try:
        reader, writer = await asyncio.open_connection("localhost", port)
        writer.write(
            f"GET {base_url}mantik/api/runs/{run['run_id']}/download?path=big.bin HTTP/1.1\r\n"
            f"Host: localhost\r\nAuthorization: token {jp_serverapp.identity_provider.token}"
            "\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await reader.readexactly(1024 * 1024)
        writer.close()
        # The handler notices at its next flush.
        for _ in range(50):
            await asyncio.sleep(0.1)
            if any("stopped by the client" in r.getMessage() for r in records):
                break
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(catcher)
            logger.setLevel(level)
        big.unlink()
    errors = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not errors, errors
    assert any("stopped by the client" in r.getMessage() for r in records), records


async def _big_folder_streams(
    lab: tuple[int, str, str], run_id: str, run_dir: Path, tmp: Path
) -> None:
    """A folder of 384 MiB reaches the browser while the lab holds a few chunks of it."""
    big = run_dir / "big"
    big.mkdir()
    for i in range(3):
        with (big / f"part-{i}.npz").open("wb") as out:  # stored as it is: quick to send
            out.truncate(128 * 1024 * 1024)
    out_file = tmp / "big.zip"
    port, base_url, token = lab
    tracemalloc.start()
    try:
        # A client of its own: the test's stops reading at 100 MB.
        client = SimpleAsyncHTTPClient(force_instance=True, max_body_size=2**31)
        with out_file.open("wb") as sink:
            resp = await client.fetch(
                f"http://localhost:{port}{base_url}mantik/api/runs/{run_id}/download?path=big",
                headers={"Authorization": f"token {token}"},
                streaming_callback=lambda chunk: sink.write(chunk) and None,
                request_timeout=120,
            )
        client.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        shutil.rmtree(big)
    assert resp.code == 200
    assert peak < 32 * 1024 * 1024, f"the lab held {peak / 2**20:.0f} MiB of a 384 MiB folder"
    with zipfile.ZipFile(out_file) as zipped:
        assert zipped.testzip() is None
        assert [i.file_size for i in zipped.infolist()] == [0] + [128 * 1024 * 1024] * 3
    out_file.unlink()


async def _failure_half_way_fails_the_download(
    lab: tuple[int, str, str], run_id: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder whose reading fails after the first bytes went out (a disk error, a lost
    cluster): the connection drops, so the browser says the download failed. Finishing
    the response had the browser keep a cut-off archive as a complete one."""
    port, base_url, token = lab
    (run_dir / "failing").mkdir()
    (run_dir / "failing" / "a.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    reads = local_backend._read_all

    def disk_error(f: Any) -> Any:
        chunks = reads(f)
        for _ in range(4):  # a megabyte: the first of it went out
            yield next(chunks)
        raise OSError(errno.EIO, "Input/output error", f.name)

    monkeypatch.setattr(local_backend, "_read_all", disk_error)
    client = SimpleAsyncHTTPClient(force_instance=True)
    try:
        with pytest.raises(HTTPStreamClosedError):
            await client.fetch(
                f"http://localhost:{port}{base_url}mantik/api/runs/{run_id}/download?path=failing",
                headers={"Authorization": f"token {token}"},
            )
    finally:
        client.close()
        monkeypatch.undo()
        shutil.rmtree(run_dir / "failing")


async def test_submit_follow_download(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    jp_fetch: Any,
    project: str,
    logged_in: str,
    mlflow_server: MlflowServer,
    jp_serverapp: Any,
    jp_http_port: int,
    jp_base_url: str,
) -> None:
    name = experiment()
    run = await submit(
        jp_fetch,
        project,
        experiment_name=name,
        entry_point="main",
        params={"epochs": 2, "station": "Jülich 1; touch pwned"},
        run_name="rest-lifecycle",
    )
    run_id = run["run_id"]
    assert run["run_name"] == "rest-lifecycle"
    assert run["source"] == "lab"
    assert run["backend"]
    assert "password" not in json.dumps(run).lower()
    # The link every face shows in a lab: its MLflow proxy, which the browser opens.
    page = f"#/experiments/{run['experiment_id']}/runs/{run_id}"
    assert run["mlflow_url"] == f"{jp_base_url}mantik/mlflow/{page}", run

    run = await wait_for(jp_fetch, run_id, FINAL)
    assert run["state"] == "FINISHED", run
    assert run["mlflow_status"] == "FINISHED"
    assert run["params"]["epochs"] == "2"
    assert run["params"]["station"] == "Jülich 1; touch pwned"
    # A diverged metric is still JSON, spelled as MLflow spells it.
    admin_api(mlflow_server).client.api(
        "POST", "runs/log-metric", run_id=run_id, key="loss", value="NaN", timestamp=1, step=99
    )
    code, run = await call(jp_fetch, "runs", run_id)
    assert run["metrics"]["loss"] == "NaN", run

    # A unique prefix names the run as well as the full id.
    code, by_prefix = await call(jp_fetch, "runs", run_id[:10])
    assert code == 200 and by_prefix["run_id"] == run_id

    code, listing = await call(jp_fetch, "runs", experiment_name=name)
    assert code == 200
    assert [r["run_id"] for r in listing["runs"]] == [run_id]
    assert "next_page_token" in listing
    code, listing = await call(
        jp_fetch, "runs", experiment_id=run["experiment_id"], state="FINISHED"
    )
    assert code == 200 and run_id in [r["run_id"] for r in listing["runs"]]

    code, log = await call(jp_fetch, "runs", run_id, "logs")
    assert code == 200, log
    assert "exit status 0" in log["text"] and log["offset"] == len(log["text"].encode())
    # Read to the end of an ended run: empty and final, so a client knows to stop polling.
    code, rest = await call(jp_fetch, "runs", run_id, "logs", offset=log["offset"])
    assert code == 200, rest
    assert rest == {"text": "", "offset": log["offset"], "final": True}

    code, files = await call(jp_fetch, "runs", run_id, "files")
    assert code == 200, files
    names = {f["path"]: f for f in files["files"]}
    assert "mantik.log" in names and not names["mantik.log"]["is_dir"]

    resp = await jp_fetch(
        "mantik", "api", "runs", run_id, "download", params={"path": "mantik.log"}
    )
    assert resp.code == 200
    assert resp.headers["Content-Disposition"] == 'attachment; filename="mantik.log"'
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.body.decode() == log["text"]
    await _download_abandoned(jp_serverapp, jp_http_port, jp_base_url, run)

    # A name beyond ASCII (a station's) is saved under its own name, with an ASCII fallback.
    station = Path(run["tags"]["mantik.run_dir"]) / "Jülich 2m temp.csv"
    station.write_text("t\n1\n")
    resp = await jp_fetch(
        "mantik", "api", "runs", run_id, "download", params={"path": station.name}
    )
    disposition = resp.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="J_lich_2m_temp.csv"; '), disposition
    assert disposition.endswith("filename*=UTF-8''J%C3%BClich%202m%20temp.csv"), disposition
    assert resp.body == b"t\n1\n"

    # A folder, and the whole run directory, as one zip archive named after the run (the
    # download refused folders and sent the user to `mantik runs download`).
    code_dir = Path(run["tags"]["mantik.run_dir"]) / "code"
    (code_dir / "outputs").mkdir(exist_ok=True)
    (code_dir / "outputs" / "t2m.csv").write_text("t2m\n280.1\n")
    (code_dir / "outputs" / "up").symlink_to("../MLproject")
    resp = await jp_fetch(
        "mantik", "api", "runs", run_id, "download", params={"path": "code/outputs/"}
    )
    assert resp.code == 200
    assert resp.headers["Content-Type"] == "application/zip"
    disposition = 'attachment; filename="rest-lifecycle-outputs.zip"'
    assert resp.headers["Content-Disposition"] == disposition
    zipped = zipfile.ZipFile(io.BytesIO(resp.body))
    # The link up (to the project's MLproject) is left out, as from every download.
    names = zipped.namelist()
    assert names == ["outputs/", "outputs/forecast.csv", "outputs/t2m.csv"], names
    assert zipped.read("outputs/t2m.csv") == b"t2m\n280.1\n"
    resp = await jp_fetch("mantik", "api", "runs", run_id, "download")
    assert resp.headers["Content-Disposition"] == 'attachment; filename="rest-lifecycle.zip"'
    names = zipfile.ZipFile(io.BytesIO(resp.body)).namelist()
    assert f"{run_id}/mantik.log" in names and f"{run_id}/code/outputs/t2m.csv" in names
    lab = (jp_http_port, jp_base_url, jp_serverapp.identity_provider.token)
    await _big_folder_streams(lab, run_id, code_dir.parent, tmp_path)
    await _failure_half_way_fails_the_download(lab, run_id, code_dir.parent, monkeypatch)
    # A folder that is not there: the domain's 404, before any byte.
    code, err = await call(jp_fetch, "runs", run_id, "download", path="code/nothing")
    assert code == 404 and err["reason"] == "not_found", err
    assert "There is no 'code/nothing'" in err["message"], err
    # Neither a file nor a folder: said so (it was "is not a folder", for a named pipe).
    os.mkfifo(code_dir / "outputs" / "pipe")
    code, err = await call(jp_fetch, "runs", run_id, "download", path="code/outputs/pipe")
    assert code == 400 and "neither a file nor a folder" in err["message"], err

    for what in ("files", "download"):
        code, err = await call(jp_fetch, "runs", run_id, what, path="ü" * 200)
        assert code == 400 and "longer than 255 bytes" in err["message"], err

    code, err = await call(jp_fetch, "runs", run_id, "download", path="../../etc/passwd")
    assert code in (400, 404) and err["reason"] in ("unsafe_path", "not_found"), err

    code, err = await call(jp_fetch, "runs", run_id, "cancel", method="POST")
    # Cancelling a finished run: a conflict or a no-op, never a server error.
    assert code in (200, 409), err


async def test_cancel_running(jp_fetch: Any, project: str, logged_in: str) -> None:
    submitted = await submit(jp_fetch, project, entry_point="sleep", params={"seconds": 600})
    assert submitted["running_since"] is None, submitted  # not running yet
    run = await wait_for(jp_fetch, submitted["run_id"], {"RUNNING"} | FINAL, timeout=60)
    assert run["state"] == "RUNNING", run
    # When the job started running, apart from its submission (start_time).
    since = run["running_since"]
    assert isinstance(since, int) and since >= run["start_time"], run
    assert run["tags"]["mantik.running_since"] == str(since)
    code, cancelled = await call(jp_fetch, "runs", run["run_id"], "cancel", method="POST")
    assert code == 200, cancelled
    run = await wait_for(jp_fetch, run["run_id"], FINAL, timeout=60)
    assert run["state"] == "KILLED" and run["mlflow_status"] == "KILLED", run
    assert run["running_since"] == since, run


async def test_backends(jp_fetch: Any, logged_in: str) -> None:
    code, data = await call(jp_fetch, "backends")
    assert code == 200, data
    assert isinstance(data["backends"], list) and data["backends"]
    assert all("name" in b for b in data["backends"])


async def test_experiments_by_name(jp_fetch: Any, mlflow_server: MlflowServer) -> None:
    """The sidebar names runs' experiments and filters by one: every experiment the user
    may read, by name (case aside), with its id."""
    from mantik_jupyter.tracking.rest import TrackingClient
    from mantik_jupyter.tracking.runs_api import RunsApi

    user = mlflow_server.create_user()
    body = {"username": user.username, "password": user.password}
    code, data = await call(jp_fetch, "auth", "login", method="POST", body=body)
    assert code == 200, data
    api = RunsApi(TrackingClient(mlflow_server.uri, user))
    suffix = uuid.uuid4().hex[:8]
    made = {
        name: api.create_experiment(name) for name in (f"study-b-{suffix}", f"Study-A-{suffix}")
    }
    code, data = await call(jp_fetch, "experiments")
    assert code == 200, data
    listed = {e["name"]: e["experiment_id"] for e in data["experiments"]}
    assert {name: listed.get(name) for name in made} == made
    names = [e["name"] for e in data["experiments"]]
    assert names == sorted(names, key=str.casefold), names


# ---- errors ----------------------------------------------------------------------------


async def test_request_errors(
    jp_fetch: Any, project: str, logged_in: str, jp_root_dir: Path, tmp_path: Path
) -> None:
    async def post(body: Any) -> tuple[int, Any]:
        return await call(jp_fetch, "runs", method="POST", body=body)

    code, err = await post("{not json")
    assert code == 400 and err["reason"] == "invalid_request", err

    code, err = await post({"backend_config": "compute-backend-config.yaml"})
    assert code == 400 and "project_dir" in err["message"], err

    for field, value in (
        ("project_dir", 3),
        ("entry_point", ["main"]),
        ("run_name", {"a": 1}),
        ("experiment_name", True),
        ("params", ["epochs=2"]),
    ):
        body = {"project_dir": project, field: value}
        code, err = await post(body)
        assert code == 400 and err["reason"] == "invalid_request", (field, err)
        assert field in err["message"], (field, err)
    code, err = await post({"project_dir": project, "params": {"epochs": [2]}})
    assert code == 400 and "params.epochs" in err["message"], err

    code, err = await post({"project_dir": project, "experiment_name": "a", "experiment_id": "1"})
    assert code == 400, err
    # A 5 MB name was stored, then sent back with every list the sidebar polled.
    code, err = await post({"project_dir": project, "run_name": "n" * 251})
    assert code == 400 and "run_name has 251 characters" in err["message"], err

    # Paths that leave the Jupyter root: relative, absolute, through a symlink.
    outside = tmp_path / "outside"
    shutil.copytree(EXAMPLE, outside)
    (jp_root_dir / "escape").symlink_to(outside)
    for body in (
        {"project_dir": "../outside"},
        {"project_dir": str(outside)},
        {"project_dir": "escape"},
        {"project_dir": project, "backend_config": "../../outside/compute-backend-config.yaml"},
        {"project_dir": project, "backend_config": "/etc/passwd"},
    ):
        code, err = await post(body)
        assert code == 400 and err["reason"] == "unsafe_path", (body, err)

    # A name no file system holds: a 400 that says so, not ENAMETOOLONG as a 500.
    long = "ü" * 200  # 400 bytes
    for body in (
        {"project_dir": long},
        {"project_dir": project, "backend_config": f"{long}.yaml"},
    ):
        code, err = await post(body)
        assert code == 400 and "longer than 255 bytes" in err["message"], (body, err)
    code, err = await call(jp_fetch, "projects", path=f"{project}/{long}")
    assert code == 400 and "longer than 255 bytes" in err["message"], err

    # Config errors reach the user with the core's message.
    code, err = await post(
        {"project_dir": project, "backend_config": "missing.yaml", "experiment_name": experiment()}
    )
    assert code == 400 and err["reason"] == "invalid_config", err
    assert "missing.yaml" in err["message"]
    bad = jp_root_dir / project / "bad-config.yaml"
    bad.write_text("Local: {}\nResources:\n  Queue: local\n  Nodez: 2\n")
    code, err = await post(
        {
            "project_dir": project,
            "backend_config": "bad-config.yaml",
            "experiment_name": experiment(),
        }
    )
    assert code == 400 and err["reason"] == "invalid_config", err
    assert "Nodez" in err["message"], err

    code, err = await post(
        {
            "project_dir": project,
            "backend_config": "compute-backend-config.yaml",
            "params": {"no_such_param": 1},
            "experiment_name": experiment(),
        }
    )
    assert code == 400 and err["reason"] == "invalid_project", err

    code, err = await call(jp_fetch, "runs", experiment_id="1", experiment_name="x")
    assert code == 400 and "not both" in err["message"], err
    code, err = await call(jp_fetch, "runs", max_results="many")
    assert code == 400 and "max_results" in err["message"], err
    code, err = await call(jp_fetch, "runs", max_results="0")
    assert code == 400, err
    code, err = await call(jp_fetch, "runs", refresh="maybe")
    assert code == 400 and "'refresh' must be true or false" in err["message"], err
    code, listing = await call(jp_fetch, "runs", refresh="False", max_results="1")
    assert code == 200, listing


async def test_bodies_that_are_not_requests(jp_fetch: Any, project: str) -> None:
    """Deep nesting, a huge body and non-JSON constants are the caller's mistake: a 400 that
    says what is wrong, read before anything is submitted (never a RecursionError as a 500,
    never a run made from a megabyte of run name)."""
    deep = "[" * 100_000 + "]" * 100_000
    nested_params = '{"project_dir": "x", "params": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001
    for body in (deep, nested_params):
        code, err = await call(jp_fetch, "runs", method="POST", body=body)
        assert code == 400 and err["reason"] == "invalid_request", err
        assert "nested too deeply" in err["message"], err

    huge = json.dumps({"project_dir": project, "run_name": "x" * (2 * 1024 * 1024)})
    code, err = await call(jp_fetch, "runs", method="POST", body=huge)
    assert code == 400 and err["reason"] == "invalid_request", err
    assert "at most 1048576 bytes" in err["message"], err

    body = json.dumps({"project_dir": project, "params": {"epochs": 1}}).replace("1", "NaN")
    code, err = await call(jp_fetch, "runs", method="POST", body=body)
    assert code == 400 and "NaN is not a JSON value" in err["message"], err


@pytest.mark.parametrize("unknown", ["ffffffff", "no-such-run"])
async def test_unknown_run(jp_fetch: Any, logged_in: str, unknown: str) -> None:
    for parts, method in (
        ((unknown,), "GET"),
        ((unknown, "logs"), "GET"),
        ((unknown, "files"), "GET"),
        ((unknown, "download"), "GET"),
        ((unknown, "cancel"), "POST"),
    ):
        code, err = await call(jp_fetch, "runs", *parts, method=method)
        assert code == 404 and err["reason"] == "not_found", (parts, err)
    code, err = await call(jp_fetch, "runs", unknown, "logs", offset="-1")
    assert code == 400, err


async def test_unknown_full_run_id(jp_fetch: Any, logged_in: str) -> None:
    code, err = await call(jp_fetch, "runs", "f" * 32)
    assert code == 404 and err["reason"] == "not_found", err


async def test_not_logged_in(jp_fetch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Authenticated to Jupyter, but no tracking credential stored: 401 from the core.
    code, err = await call(jp_fetch, "runs")
    assert code == 401 and err["reason"] == "not_logged_in", err
