"""The MLflow proxy: MLflow's own client and UI through the lab, header hygiene, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import struct
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from traitlets import TraitError

from mantik_jupyter.app import MantikApp
from mantik_jupyter.errors import TrackingUnavailable
from mantik_jupyter.tracking.credentials import Credential
from mantik_jupyter.tracking.embedded import free_port
from mantik_jupyter.tracking.rest import TrackingClient
from mantik_jupyter.tracking.tls import ENV_CERT_PATH

from .lab_fixtures import lab_config, login_as
from .tls_helpers import make_test_ca


def lab_url(jp_serverapp, jp_base_url: str) -> str:
    return f"http://127.0.0.1:{jp_serverapp.port}{jp_base_url}"


async def login_as_new_user(jp_fetch, mlflow_server):
    user = mlflow_server.create_user()
    await login_as(jp_fetch, user)
    return user


async def run_python(script: str, env: dict[str, str], timeout: float = 240) -> str:
    """Run MLflow's client in a child process so the in-process lab keeps serving."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(script),
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode()


CLIENT_ROUND_TRIP = """
    import json, os, tempfile, mlflow
    from mlflow import MlflowClient
    mlflow.set_experiment("through-the-proxy")
    with mlflow.start_run() as run:
        mlflow.log_param("lr", "0.01")
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        path = os.path.join(tempfile.mkdtemp(), "forecast.csv")
        open(path, "w").write("t,temp\\n0,12.5\\n")
        mlflow.log_artifact(path, "outputs")
    client = MlflowClient()
    got = client.get_run(run.info.run_id)
    history = client.get_metric_history(run.info.run_id, "loss")
    local = client.download_artifacts(run.info.run_id, "outputs/forecast.csv", tempfile.mkdtemp())
    print(json.dumps({
        "params": got.data.params, "steps": [m.step for m in history],
        "artifact": open(local).read(), "artifact_uri": got.info.artifact_uri,
    }))
"""


async def test_mlflow_client_through_the_proxy_with_a_jupyter_token(
    jp_fetch, jp_serverapp, jp_base_url, mlflow_server
):
    await login_as_new_user(jp_fetch, mlflow_server)
    out = await run_python(
        CLIENT_ROUND_TRIP,
        {
            "MLFLOW_TRACKING_URI": lab_url(jp_serverapp, jp_base_url) + "mantik/mlflow",
            "MLFLOW_TRACKING_TOKEN": jp_serverapp.identity_provider.token,
        },
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["params"] == {"lr": "0.01"}
    assert result["steps"] == [0, 1, 2, 3, 4]
    assert result["artifact"] == "t,temp\n0,12.5\n"


async def test_proxy_keeps_upstream_status_and_serves_the_ui(jp_fetch, mlflow_server):
    user = await login_as_new_user(jp_fetch, mlflow_server)
    params = {"run_id": "0" * 32}
    direct = requests.get(
        f"{mlflow_server.uri}/api/2.0/mlflow/runs/get",
        params=params,
        auth=(user.username, user.password),
        timeout=30,
    )
    assert direct.status_code >= 400
    resp = await jp_fetch(
        "mantik", "mlflow", "api", "2.0", "mlflow", "runs", "get",
        params=params, raise_error=False,
    )  # fmt: skip
    assert resp.code == direct.status_code
    assert resp.body == direct.content

    resp = await jp_fetch("mantik", "mlflow", raise_error=False, follow_redirects=False)
    assert resp.code == 302 and resp.headers["Location"].endswith("/mantik/mlflow/")
    resp = await jp_fetch("mantik", "mlflow/", raise_error=False, follow_redirects=False)
    assert resp.code == 200 and b"<html" in resp.body.lower()
    assert "frame-ancestors 'self'" in resp.headers.get("Content-Security-Policy", "")


async def test_proxied_calls_count_as_activity_of_the_lab(jp_fetch, jp_serverapp, mlflow_server):
    # A JupyterHub idle culler reads this; using MLflow through the lab is using the lab.
    await login_as_new_user(jp_fetch, mlflow_server)
    settings = jp_serverapp.web_app.settings
    path = ("mantik", "mlflow", "api", "2.0", "mlflow", "experiments", "search")
    settings["api_last_activity"] = before = settings["started"]
    await jp_fetch(*path, params={"max_results": "1"})
    assert settings["api_last_activity"] > before
    settings["api_last_activity"] = before
    await jp_fetch(*path, params={"max_results": "1", "no_track_activity": "1"})
    assert settings["api_last_activity"] == before


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


LARGE_ARTIFACT = """
    import hashlib, json, os, tempfile, mlflow
    from mlflow import MlflowClient
    mlflow.set_experiment("large-artifacts")
    path = os.path.join(tempfile.mkdtemp(), "big.bin")
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for i in range(200):
            block = os.urandom(1 << 20)
            digest.update(block)
            fh.write(block)
    with mlflow.start_run() as run:
        mlflow.log_artifact(path)
    os.remove(path)
    local = MlflowClient().download_artifacts(run.info.run_id, "big.bin", tempfile.mkdtemp())
    back = hashlib.sha256()
    with open(local, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            back.update(block)
    same = back.hexdigest() == digest.hexdigest()
    print(json.dumps({"same": same, "size": os.path.getsize(local)}))
"""


async def test_a_200_mb_artifact_streams_through_without_growing_the_server(
    jp_fetch, jp_serverapp, jp_base_url, mlflow_server
):
    await login_as_new_user(jp_fetch, mlflow_server)
    before = _rss_mb()
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, _rss_mb())
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    try:
        out = await run_python(
            LARGE_ARTIFACT,
            {
                "MLFLOW_TRACKING_URI": lab_url(jp_serverapp, jp_base_url) + "mantik/mlflow",
                "MLFLOW_TRACKING_TOKEN": jp_serverapp.identity_provider.token,
            },
        )
    finally:
        sampler.cancel()
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"same": True, "size": 200 << 20}
    # The lab runs in this process: 200 MB went up and came back; it must not have been held.
    assert peak - before < 80, f"server memory grew by {peak - before:.0f} MB"


REFUSED_UPLOAD = """
    import json, os, requests
    resp = requests.put(
        os.environ["URL"], data=b"x" * (8 << 20), timeout=120,
        headers={"Authorization": "token " + os.environ["TOKEN"]},
    )
    print(json.dumps({"status": resp.status_code, "body": resp.text[:500]}))
"""


async def test_an_upload_the_tracking_server_refuses_gets_its_refusal(
    jp_fetch, jp_serverapp, jp_base_url, mlflow_server
):
    # MLflow refuses an artifact upload into a colleague's experiment as soon as it has
    # the headers; the browser must see that 403, not "cannot be reached". (MLflow reads
    # the rest of the body; servers that close at once instead, as nginx does past its
    # body limit, are covered in test_upstream.py.)
    await login_as_new_user(jp_fetch, mlflow_server)
    admin = requests.Session()
    admin.auth = (mlflow_server.admin.username, mlflow_server.admin.password)
    api = f"{mlflow_server.uri}/api/2.0/mlflow"
    name = f"theirs-{time.time()}"
    exp = admin.post(f"{api}/experiments/create", json={"name": name}, timeout=30).json()
    run = admin.post(f"{api}/runs/create", json=exp, timeout=30).json()
    exp, run_id = exp["experiment_id"], run["run"]["info"]["run_id"]
    url = lab_url(jp_serverapp, jp_base_url) + (
        f"mantik/mlflow/api/2.0/mlflow-artifacts/artifacts/{exp}/{run_id}/artifacts/big.bin"
    )
    out = await run_python(
        REFUSED_UPLOAD, {"URL": url, "TOKEN": jp_serverapp.identity_provider.token}
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == 403, result
    assert "permission" in result["body"].lower(), result


class WithStandInUpstream:
    """Test classes whose lab talks to a tornado stand-in for the tracking server."""

    port: int
    mantik_settings: dict = {}  # more c.MantikApp settings of the lab

    @contextlib.contextmanager
    def serving(self, handler: type[tornado.web.RequestHandler]) -> Iterator[None]:
        self.port = free_port()
        server = HTTPServer(tornado.web.Application([(r"/(.*)", handler)]))
        server.listen(self.port, "127.0.0.1")
        try:
            yield
        finally:
            server.stop()

    @pytest.fixture
    def jp_server_config(self, tmp_path, upstream, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "proxyuser")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "proxy-password-123")
        config = lab_config(tmp_path / "mantik", f"http://127.0.0.1:{self.port}")
        config["MantikApp"].update(self.mantik_settings)
        return config


def capturing_upstream(seen: list[dict]) -> type[tornado.web.RequestHandler]:
    """A stand-in tracking server that notes each request in ``seen`` and answers with
    what a proxy must not pass on (a cookie, a password challenge, CORS)."""

    class Capture(tornado.web.RequestHandler):
        def _reply(self, path: str) -> None:
            seen.append(
                {"method": self.request.method, "path": self.request.path,
                 "query": self.request.query, "headers": dict(self.request.headers),
                 "body": self.request.body.decode(),
                 "port": self.request.connection.context.address[1]}
            )  # fmt: skip
            if path == "redirect":
                self.redirect(f"http://{self.request.host}/next?x=1")
                return
            self.set_status(418)
            self.set_header("Set-Cookie", "upstream=1")
            self.set_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.set_header("Access-Control-Allow-Origin", "*")
            self.set_header("X-Upstream", "yes")
            self.finish({"ok": True})

        get = post = put = delete = _reply

    return Capture


class TestHeaderHygiene(WithStandInUpstream):
    """A capturing upstream shows exactly what the proxy forwards."""

    @pytest.fixture
    def upstream(self):
        seen: list[dict] = []
        with self.serving(capturing_upstream(seen)):
            yield seen

    async def test_forwarded_request_and_response(self, jp_fetch, upstream, jp_base_url):
        resp = await jp_fetch(
            "mantik", "mlflow", "api", "2.0", "some path", method="POST",
            body=b'{"a": 1}', params={"q": "1 2"},
            headers={"Cookie": "_xsrf=abc; secret-session=xyz", "Origin": "http://127.0.0.1"},
            raise_error=False,
        )  # fmt: skip
        assert resp.code == 418
        # The lab may set its own cookies (_xsrf); the upstream's never reach the browser.
        assert not any("upstream=" in c for c in resp.headers.get_list("Set-Cookie"))
        assert "WWW-Authenticate" not in resp.headers
        assert resp.headers["X-Upstream"] == "yes"
        got = upstream[-1]
        assert got["path"] == "/api/2.0/some%20path" and got["query"] == "q=1+2"
        assert got["body"] == '{"a": 1}'
        headers = {k.lower(): v for k, v in got["headers"].items()}
        assert "cookie" not in headers
        assert headers["authorization"].startswith("Basic ")
        assert headers["host"] == f"127.0.0.1:{self.port}"
        assert headers["origin"] == f"http://127.0.0.1:{self.port}"

    async def test_upstream_redirects_point_back_at_the_proxy(self, jp_fetch, jp_base_url):
        resp = await jp_fetch(
            "mantik", "mlflow", "redirect", raise_error=False, follow_redirects=False
        )
        assert resp.code == 302
        assert resp.headers["Location"] == f"{jp_base_url}mantik/mlflow/next?x=1"

    async def test_only_a_token_in_the_url_earns_a_login_cookie(
        self, jp_fetch, jp_serverapp, http_server_client, jp_base_url
    ):
        def login_cookies(resp) -> list[str]:
            return [c for c in resp.headers.get_list("Set-Cookie") if c.startswith("username-")]

        # The MLflow client sends its token on every call: no cookie to carry and check.
        resp = await jp_fetch("mantik", "mlflow", "api", "x", raise_error=False)
        assert resp.code == 418 and login_cookies(resp) == []
        # A browser opening the UI with ?token= needs the cookie for the UI's own calls.
        token = jp_serverapp.identity_provider.token
        resp = await http_server_client.fetch(
            f"{jp_base_url}mantik/mlflow/api/x?token={token}", raise_error=False
        )
        assert resp.code == 418 and len(login_cookies(resp)) == 1
        # Jupyter's own endpoints behave as before.
        resp = await jp_fetch("api", "status")
        assert len(login_cookies(resp)) == 1

    async def test_calls_share_a_kept_alive_connection_to_the_upstream(self, jp_fetch, upstream):
        for _ in range(4):
            await jp_fetch("mantik", "mlflow", "api", "x", raise_error=False)
        await jp_fetch("mantik", "mlflow", "api", "y", method="POST", body=b"{}", raise_error=False)
        assert len({seen["port"] for seen in upstream[-5:]}) == 1

    async def test_a_ca_setting_does_not_affect_plain_http(self, jp_fetch, tmp_path, monkeypatch):
        # The bundle is needed (and checked) only for HTTPS servers.
        monkeypatch.setenv(ENV_CERT_PATH, str(tmp_path / "no-such-ca.pem"))
        resp = await jp_fetch("mantik", "mlflow", "api", raise_error=False)
        assert resp.code == 418
        # The lab's REST client reaches it as well (this upstream refuses logins with 418).
        resp = await jp_fetch(
            "mantik", "api", "auth", "login", method="POST",
            body=json.dumps({"username": "u", "password": "p-123456"}), raise_error=False,
        )  # fmt: skip
        message = json.loads(resp.body)["message"]
        assert "rejected the request" in message and ENV_CERT_PATH not in message


class TestAbandonedCall(WithStandInUpstream):
    """A browser that leaves mid-answer takes the proxy's upstream connection with it."""

    @pytest.fixture
    def upstream(self):
        state: dict[str, float | int] = {}

        class Slow(tornado.web.RequestHandler):
            async def get(self, path: str) -> None:
                state.setdefault("port", self.request.connection.context.address[1])
                if path != "slow":
                    self.finish({"port": self.request.connection.context.address[1]})
                    return
                # Two chunks, then a long pause: only the proxy can end the exchange early.
                try:
                    for _ in range(2):
                        self.write(b"x" * 65536)
                        await self.flush()
                    for _ in range(300):
                        await asyncio.sleep(0.1)
                        if "closed_at" in state:
                            return
                    self.finish()
                except StreamClosedError:
                    self.on_connection_close()

            def on_connection_close(self) -> None:
                state.setdefault("closed_at", time.monotonic())

        with self.serving(Slow):
            yield state

    async def test_leaving_mid_download_closes_the_upstream_connection(
        self, jp_fetch, jp_serverapp, jp_base_url, upstream, caplog
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", jp_serverapp.port)
        token = jp_serverapp.identity_provider.token
        writer.write(
            f"GET {jp_base_url}mantik/mlflow/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: token {token}\r\n\r\n".encode()
        )
        await reader.readexactly(100_000)  # headers and the first chunks
        left = time.monotonic()
        writer.close()
        deadline = left + 10
        while "closed_at" not in upstream and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert upstream.get("closed_at", deadline) - left < 5, "the upstream connection stayed open"
        # The lab goes on: the next call gets a new upstream connection and its answer.
        resp = await jp_fetch("mantik", "mlflow", "fast")
        assert json.loads(resp.body)["port"] != upstream["port"]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class TestHttpsUpstream:
    """A team's tracking server behind HTTPS with a certificate of the site's own CA."""

    @pytest.fixture
    def ca(self, tmp_path):
        return make_test_ca(tmp_path / "ca")

    @pytest.fixture
    def jp_server_config(self, tmp_path, ca, monkeypatch):
        class Teapot(tornado.web.RequestHandler):
            def get(self, path: str) -> None:
                self.set_status(418)
                self.finish({"path": path})

            post = get

        port = free_port()
        server = HTTPServer(
            tornado.web.Application([(r"/(.*)", Teapot)]), ssl_options=ca.server_context()
        )
        server.listen(port, "127.0.0.1")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "tlsuser")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tls-password-123")
        monkeypatch.delenv(ENV_CERT_PATH, raising=False)
        self.uri = f"https://127.0.0.1:{port}"
        yield lab_config(tmp_path / "mantik", self.uri)
        server.stop()

    async def test_an_untrusted_certificate_names_the_setting_that_fixes_it(
        self, jp_fetch, ca, monkeypatch
    ):
        resp = await jp_fetch("mantik", "mlflow", "api", raise_error=False)
        assert resp.code == 502
        body = json.loads(resp.body)
        assert self.uri in body["message"] and ENV_CERT_PATH in body["message"]
        # The lab's REST client (login) says the same.
        resp = await jp_fetch(
            "mantik", "api", "auth", "login", method="POST",
            body=json.dumps({"username": "u", "password": "wrong-but-irrelevant"}),
            raise_error=False,
        )  # fmt: skip
        assert resp.code == 502 and ENV_CERT_PATH in json.loads(resp.body)["message"]

        monkeypatch.setenv(ENV_CERT_PATH, str(ca.ca_pem))
        resp = await jp_fetch("mantik", "mlflow", "api", raise_error=False)
        assert resp.code == 418 and json.loads(resp.body) == {"path": "api"}

    async def test_a_missing_ca_bundle_is_named(self, jp_fetch, tmp_path, monkeypatch):
        monkeypatch.setenv(ENV_CERT_PATH, str(tmp_path / "no-such-ca.pem"))
        resp = await jp_fetch("mantik", "mlflow", "api", raise_error=False)
        assert resp.code == 400
        assert "no-such-ca.pem is not a file" in json.loads(resp.body)["message"]


class TestEarlyRefusal(WithStandInUpstream):
    """An upstream that refuses an upload from its headers, answers in full and reads
    no more of the body: the client gets the refusal, and the lab is not left waiting
    on an upload nobody takes."""

    @pytest.fixture
    def upstream(self):
        @tornado.web.stream_request_body
        class Refuse(tornado.web.RequestHandler):
            async def prepare(self) -> None:
                self.gone = asyncio.Event()
                self.set_status(413)
                self.set_header("Content-Length", "23")
                self.write("too big for this server")
                await self.flush()

            async def data_received(self, chunk: bytes) -> None:
                await self.gone.wait()  # reads nothing more while the client is there

            def on_connection_close(self) -> None:
                self.gone.set()

        with self.serving(Refuse):
            yield

    async def test_an_upload_refused_mid_body_gets_the_refusal(
        self, jp_serverapp, jp_base_url, jp_fetch
    ):
        url = lab_url(jp_serverapp, jp_base_url) + "mantik/mlflow/api/2.0/upload"
        out = await run_python(
            REFUSED_UPLOAD, {"URL": url, "TOKEN": jp_serverapp.identity_provider.token}, 60
        )
        assert json.loads(out.strip().splitlines()[-1]) == {
            "status": 413, "body": "too big for this server"
        }  # fmt: skip
        resp = await jp_fetch("mantik", "api", "auth", "status")
        assert resp.code == 200


class FaultyTrackingServer:
    """A stand-in for a tracking server (or the load balancer in front of it) that fails
    mid-transfer, which a real MLflow server cannot be made to do on cue. A raw TCP
    server in a thread; what it does depends on the request's path:

    - ``.../reset/...``: reads ``AFTER`` bytes of the request, then resets (SO_LINGER 0);
    - ``.../stall/...``: reads ``AFTER`` bytes, then no more until ``resume`` is set, then
      reads to the end and notes whether the lab had closed the connection;
    - ``.../cut/...`` and ``.../cut-chunked/...``: answers a GET with 4 MB of a 200 MB
      file (``Content-Length``, or chunked), then resets;
    - ``.../drop/...``: reads the request, then resets without a byte of an answer (a
      server that crashed on it, or a load balancer that gave up on it);
    - ``.../garbage/...``: answers with bytes that are not HTTP (a TLS alert: an https
      port addressed as http://);
    - anything else: a small 200, so that the next call through the lab can be checked.
    """

    AFTER = 4 << 20

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.resume = threading.Event()
        self.closed_by_lab: list[bool] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.resume.set()
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            path = data.split(b" ", 2)[1]
            if b"/cut" in path:
                chunked = b"/cut-chunked/" in path
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    if chunked
                    else b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (200 << 20)
                )
                for _ in range(64):
                    block = b"d" * 65536
                    conn.sendall(b"10000\r\n%b\r\n" % block if chunked else block)
            elif b"/garbage/" in path:
                conn.sendall(b"\x15\x03\x01\x00\x02\x02\x46")
                return
            elif b"/drop/" in path:
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                while length and len(body) < int(length.group(1)):
                    body += conn.recv(65536)
            elif b"/reset/" in path or b"/stall/" in path:
                while len(data) < self.AFTER and (more := conn.recv(65536)):
                    data += more
                if b"/stall/" in path:
                    self.resume.wait(120)
                    self.closed_by_lab.append(self._reads_to_the_end(conn))
                    return
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    @staticmethod
    def _reads_to_the_end(conn: socket.socket) -> bool:
        conn.settimeout(5)
        try:
            while conn.recv(1 << 20):
                pass
        except TimeoutError:
            return False  # the lab still holds the connection
        except ConnectionError:
            pass
        return True


REQUESTS_UPLOAD = """
    import json, os, time, requests
    start = time.monotonic()
    try:
        with open(os.environ["FILE"], "rb") as fh:
            resp = requests.put(
                os.environ["URL"], data=fh, timeout=float(os.environ["TIMEOUT"]),
                headers={"Authorization": "token " + os.environ["TOKEN"]},
            )
        out = {"status": resp.status_code, "body": resp.text}
    except requests.RequestException as exc:
        out = {"error": repr(exc)}
    print(json.dumps({**out, "seconds": time.monotonic() - start}))
"""

REQUESTS_DOWNLOAD = """
    import json, os, requests
    try:
        resp = requests.get(
            os.environ["URL"], timeout=60,
            headers={"Authorization": "token " + os.environ["TOKEN"]},
        )
        out = {"status": resp.status_code, "size": len(resp.content)}
    except requests.RequestException as exc:
        out = {"error": type(exc).__name__}
    print(json.dumps(out))
"""


async def curl(*args: str) -> tuple[int, str, str, float]:
    """curl's exit status, its ``-w`` output and stderr, and the seconds it took."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "60", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - start


def test_an_answer_the_tracking_server_broke_off_is_unavailable_not_a_crash():
    # The lab's own calls (auth status, runs) raised requests' ChunkedEncodingError, which
    # no handler expected: a 500 with a traceback in the lab's log.
    server = FaultyTrackingServer()
    try:
        client = TrackingClient(f"http://127.0.0.1:{server.port}/cut", Credential(token="t"))
        with pytest.raises(TrackingUnavailable) as caught:
            client.api("GET", "experiments/search", max_results=1)
        message = caught.value.message
        assert f"127.0.0.1:{server.port}/cut" in message and "broke off its answer" in message
    finally:
        server.close()


def test_an_upload_stall_timeout_that_is_not_above_zero_is_refused_by_name():
    with pytest.raises(TraitError, match=r"c\.MantikApp\.upload_stall_timeout .* got 0"):
        MantikApp(upload_stall_timeout=0)


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("drop", "closed the connection without answering GET /api/2.0/mlflow/experiments/search:"),
        ("garbage", "answered with something that is not HTTP to GET /api/2.0/mlflow/experiments/"),
    ],
)
def test_the_lab_says_when_the_tracking_server_gave_no_answer_to_read(fault, said):
    # Both read "cannot be reached (ConnectionError). Check that it runs", about a server
    # that had been reached and may have acted on the call.
    server = FaultyTrackingServer()
    try:
        client = TrackingClient(f"http://127.0.0.1:{server.port}/{fault}", Credential(token="t"))
        with pytest.raises(TrackingUnavailable) as caught:
            client.api("GET", "experiments/search", max_results=1)
        message = caught.value.message
        assert said in message and "cannot be reached" not in message
    finally:
        server.close()


class TestUpstreamFaults(WithStandInUpstream):
    """The tracking server's connection breaks in the middle of a large transfer: the
    client hears so at once and plainly, and the lab keeps nothing of it."""

    @pytest.fixture
    def upstream(self):
        server = FaultyTrackingServer()
        self.port = server.port
        self.uri = f"http://127.0.0.1:{server.port}"
        yield server
        server.close()

    @pytest.fixture
    def artifact(self, tmp_path) -> Path:
        path = tmp_path / "big.bin"
        with path.open("wb") as fh:
            fh.truncate(200 << 20)
        return path

    # What a team whose artifact store pauses long would raise; here it is made short.
    mantik_settings = {"upload_stall_timeout": 2.0}

    def url(self, jp_serverapp, jp_base_url: str, fault: str) -> str:
        return lab_url(jp_serverapp, jp_base_url) + (
            f"mantik/mlflow/api/2.0/mlflow-artifacts/artifacts/{fault}/1/run/artifacts/big.bin"
        )

    async def assert_the_lab_goes_on(self, jp_fetch, caplog) -> None:
        resp = await jp_fetch("mantik", "mlflow", "api", "next")
        assert resp.body == b"ok"
        await asyncio.sleep(0.2)
        exchanges = [t for t in asyncio.all_tasks() if "exchange" in repr(t.get_coro())]
        assert exchanges == [], "an exchange with the tracking server is still going on"
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"

    async def test_a_reset_mid_upload_is_answered_at_once(
        self, jp_fetch, jp_serverapp, jp_base_url, upstream, artifact, caplog
    ):
        url = self.url(jp_serverapp, jp_base_url, "reset")
        token = jp_serverapp.identity_provider.token
        # curl sends at 50 MB/s: taking in the rest of the 200 MB would take 4 s.
        code, out, err, seconds = await curl(
            "-T", str(artifact), "--limit-rate", "50M", "-H", f"Authorization: token {token}",
            "-o", "/dev/stdout", "-w", "\n%{http_code}", url,
        )  # fmt: skip
        body, status = out.rsplit("\n", 1)
        assert (code, status) == (0, "502"), err
        assert seconds < 2, f"curl waited {seconds:.1f} s for the answer"
        answer = json.loads(body)
        assert answer["reason"] == "tracking_unavailable"
        assert self.uri in answer["message"]
        assert "lost during the upload" in answer["message"]
        assert "Retry" in answer["message"]
        # requests (under MLflow's client) sends to the end unless its send fails.
        out = await run_python(
            REQUESTS_UPLOAD,
            {"URL": url, "TOKEN": token, "FILE": str(artifact), "TIMEOUT": "60"},
        )
        result = json.loads(out.strip().splitlines()[-1])
        assert result.get("status") == 502, result
        assert json.loads(result["body"])["reason"] == "tracking_unavailable"
        assert "lost during the upload" in result["body"]
        await self.assert_the_lab_goes_on(jp_fetch, caplog)

    @pytest.mark.parametrize("fault", ["cut", "cut-chunked"])
    async def test_a_reset_mid_download_cuts_the_download_off(
        self, jp_fetch, jp_serverapp, jp_base_url, fault, caplog
    ):
        # A chunked answer was ended in order (a whole-looking short file, status 200);
        # one with a length was cut off, but logged a traceback.
        url = self.url(jp_serverapp, jp_base_url, fault)
        token = jp_serverapp.identity_provider.token
        out = await run_python(REQUESTS_DOWNLOAD, {"URL": url, "TOKEN": token})
        # Not a 200 with a short file that looks whole.
        assert json.loads(out.strip().splitlines()[-1]) == {"error": "ChunkedEncodingError"}
        code, _, err, _ = await curl("-H", f"Authorization: token {token}", "-o", "/dev/null", url)
        assert code == 18, err  # CURLE_PARTIAL_FILE
        await self.assert_the_lab_goes_on(jp_fetch, caplog)

    async def test_a_stalled_upload_ends_within_the_stall_timeout(
        self, jp_fetch, jp_serverapp, jp_base_url, upstream, artifact, caplog
    ):
        url = self.url(jp_serverapp, jp_base_url, "stall")
        out = await run_python(
            REQUESTS_UPLOAD,
            {
                "URL": url, "TOKEN": jp_serverapp.identity_provider.token,
                "FILE": str(artifact), "TIMEOUT": "20",
            },
        )  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        assert result.get("status") == 504, result
        assert result["seconds"] < 10
        answer = json.loads(result["body"])
        assert answer["reason"] == "tracking_timeout"
        assert self.uri in answer["message"]
        assert "took none of the upload for 2 s" in answer["message"]
        upstream.resume.set()
        for _ in range(100):
            if upstream.closed_by_lab:
                break
            await asyncio.sleep(0.1)
        assert upstream.closed_by_lab == [True], "the lab kept the stalled connection"
        await self.assert_the_lab_goes_on(jp_fetch, caplog)

    async def unavailable(self, jp_serverapp, jp_base_url, path: str, *args: str) -> str:
        """The message of the 502 the lab gives for ``path`` (curl's ``args`` added)."""
        token = jp_serverapp.identity_provider.token
        url = lab_url(jp_serverapp, jp_base_url) + "mantik/mlflow/" + path
        code, out, err, _ = await curl(
            "-H", f"Authorization: token {token}", "-w", "\n%{http_code}", *args, url
        )  # fmt: skip
        body, status = out.rsplit("\n", 1)
        assert (code, status) == (0, "502"), err
        answer = json.loads(body)
        assert answer["reason"] == "tracking_unavailable"
        assert self.uri in answer["message"] and "cannot be reached" not in answer["message"]
        return answer["message"]

    async def test_a_call_the_tracking_server_dropped_unanswered_says_so(
        self, jp_fetch, jp_serverapp, jp_base_url, upstream, caplog
    ):
        # It read "cannot be reached ... Check that it runs": the server was reached, took
        # the call, and may have acted on it before it went away.
        message = await self.unavailable(
            jp_serverapp, jp_base_url, "api/2.0/mlflow/drop/runs/create",
            "-H", "Content-Type: application/json", "-d", '{"experiment_id": "1"}',
        )  # fmt: skip
        assert (
            "closed the connection without answering POST /api/2.0/mlflow/drop/runs/create"
            in message
        )
        assert "may or may not have taken effect" in message
        await self.assert_the_lab_goes_on(jp_fetch, caplog)

    async def test_an_answer_that_is_not_http_says_what_to_check(
        self, jp_fetch, jp_serverapp, jp_base_url, upstream, caplog
    ):
        message = await self.unavailable(jp_serverapp, jp_base_url, "garbage/")
        assert "not HTTP/1.1" in message and "https://" in message
        await self.assert_the_lab_goes_on(jp_fetch, caplog)
