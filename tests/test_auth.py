"""auth/status, auth/login, auth/logout against a real MLflow basic-auth server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest
import tornado.httpclient
import tornado.web

from mantik_jupyter.handlers import proxy_relay
from mantik_jupyter.tracking.embedded import free_port

from .lab_fixtures import api_json, lab_config, login_as


async def search_through_proxy(jp_fetch, max_results: int = 5, **kw) -> list[str]:
    """Experiment names, searched with MLflow's REST API through the lab's proxy."""
    resp = await jp_fetch(
        "mantik", "mlflow", "api", "2.0", "mlflow", "experiments", "search",
        method="POST", body=json.dumps({"max_results": max_results}),
        headers={"Content-Type": "application/json"}, raise_error=False, **kw,
    )  # fmt: skip
    assert resp.code == 200, resp.body
    return [e["name"] for e in json.loads(resp.body).get("experiments", [])]


async def test_status_before_login(jp_fetch, mlflow_server):
    code, body = await api_json(jp_fetch, "auth", "status")
    assert code == 200
    assert body["tracking_uri"] == mlflow_server.uri
    assert body["logged_in"] is False
    assert body["embedded"] is False


async def test_login_status_logout(jp_fetch, mlflow_server, tmp_path):
    user = mlflow_server.create_user()
    body = await login_as(jp_fetch, user)
    assert body["logged_in"] is True and body["username"] == user.username
    assert user.password not in json.dumps(body)

    cred_file = tmp_path / "mantik" / "credentials.json"
    assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cred_file.parent.stat().st_mode) & 0o077 == 0

    code, body = await api_json(jp_fetch, "auth", "status")
    assert body["logged_in"] is True and body["username"] == user.username

    code, body = await api_json(jp_fetch, "auth", "logout", method="POST", body={})
    assert code == 200 and body["logged_in"] is False
    assert user.username not in cred_file.read_text()


async def test_wrong_password_is_401_naming_the_server(jp_fetch, mlflow_server):
    user = mlflow_server.create_user()
    code, body = await api_json(
        jp_fetch, "auth", "login", method="POST",
        body={"username": user.username, "password": "not-the-password-at-all"},
    )  # fmt: skip
    assert code == 401
    assert body["reason"] == "authentication_failed"
    assert mlflow_server.uri in body["message"]
    assert "not-the-password-at-all" not in body["message"]
    code, body = await api_json(jp_fetch, "auth", "status")
    assert body["logged_in"] is False


async def test_a_credential_the_server_refuses_is_no_login(jp_fetch, mlflow_server, monkeypatch):
    # One from the environment is never checked at a login: the status asks the server.
    user = mlflow_server.create_user()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password-at-all")
    code, body = await api_json(jp_fetch, "auth", "status")
    assert code == 200 and body["credential_source"] == "environment"
    assert body["logged_in"] is False
    assert mlflow_server.uri in body["message"] and "MLFLOW_TRACKING_USERNAME" in body["message"]
    assert "not-the-password-at-all" not in json.dumps(body)
    # A login with the right password is used instead of the environment's.
    assert (await login_as(jp_fetch, user))["logged_in"] is True
    code, body = await api_json(jp_fetch, "auth", "logout", method="POST", body={})
    assert body["logged_in"] is False and "message" in body
    # The right password in the environment is a login (the earlier answer is not reused).
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user.password)
    code, body = await api_json(jp_fetch, "auth", "status")
    assert body["logged_in"] is True and "message" not in body


async def test_token_rejected_by_basic_auth_server(jp_fetch, mlflow_server):
    code, body = await api_json(
        jp_fetch, "auth", "login", method="POST", body={"token": "definitely-not-valid"}
    )
    assert code == 401 and "refused" in body["message"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{not json", "invalid_request"),
        ("[1, 2]", "invalid_request"),
        (json.dumps({"username": "x"}), "invalid_request"),
        (json.dumps({"username": 3, "password": "x"}), "invalid_request"),
    ],
)
async def test_malformed_login_is_400(jp_fetch, raw, reason):
    code, body = await api_json(jp_fetch, "auth", "login", method="POST", body=raw)
    assert code == 400 and body["reason"] == reason
    assert "Traceback" not in body["message"]


class TestUnreachable:
    @pytest.fixture
    def jp_server_config(self, tmp_path):
        self.uri = f"http://127.0.0.1:{free_port()}"
        return lab_config(tmp_path / "mantik", self.uri)

    async def test_unreachable_tracking_server_is_502_naming_it(self, jp_fetch):
        code, body = await api_json(
            jp_fetch, "auth", "login", method="POST", body={"username": "u", "password": "p" * 12}
        )
        assert code == 502
        assert body["reason"] == "tracking_unavailable" and self.uri in body["message"]

    async def test_proxy_to_unreachable_server_is_502(self, jp_fetch, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "u")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p" * 12)
        resp = await jp_fetch("mantik", "mlflow", "health", raise_error=False)
        assert resp.code == 502 and self.uri in json.loads(resp.body)["message"]


@pytest.mark.parametrize(
    "uri",
    [
        "admin:pw-secret@localhost:5000",
        "ftp://admin:pw-secret@host",
        "http://admin:pw-secret@[::1",
        "https:/admin:pw-secret@host",
        # Unencoded, these end the host part inside the password.
        "https://admin:pw#secret@host",
        "https://admin:pw/secret@host:5000",
        "https://admin:pw?secret@host",
        # A password that starts with digits reads as a port: the URI parsed, host 'admin'.
        "https://admin:2024/secret@host",
        "https://admin:12#secret@host:5000",
    ],
)
def test_a_refused_uri_is_shown_without_its_password(uri):
    from mantik_jupyter.errors import InvalidRequest
    from mantik_jupyter.tracking.service import check_http_uri

    with pytest.raises(InvalidRequest) as err:
        check_http_uri(uri, "from $MLFLOW_TRACKING_URI")
    message = err.value.message
    assert "secret" not in message and "$MLFLOW_TRACKING_URI" in message
    assert "percent-encoded" in message and "log in" in message


class TestMalformedUri:
    @pytest.fixture
    def jp_server_config(self, tmp_path):
        return lab_config(tmp_path / "mantik", "admin:s3cret-pass@localhost:5000")

    async def test_the_lab_says_what_is_wrong_and_the_extension_stays_off(self, capfd, jp_fetch):
        resp = await jp_fetch("mantik", "api", "auth", "status", raise_error=False)
        assert resp.code == 404
        logged = capfd.readouterr().err
        said = [line for line in logged.splitlines() if "c.MantikApp.tracking_uri" in line]
        assert said and "'localhost:5000'" in said[0] and "http://" in said[0]
        # (Jupyter's own debug dump of the config, which pytest-jupyter turns on, has it.)
        ours = [line for line in logged.splitlines() if "tracking URI" in line]
        assert ours and not any("s3cret-pass" in line for line in ours)


class TestEnvironmentCredential:
    @pytest.fixture
    def jp_server_config(self, tmp_path, mlflow_server, monkeypatch):
        user = mlflow_server.create_user()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user.password)
        self.user = user
        return lab_config(tmp_path / "mantik", mlflow_server.uri)

    async def test_environment_credential_is_honoured(self, jp_fetch):
        code, body = await api_json(jp_fetch, "auth", "status")
        assert body["logged_in"] is True and body["username"] == self.user.username
        await search_through_proxy(jp_fetch, 1)


async def test_every_route_requires_authentication(jp_fetch, jp_serverapp, jp_base_url):
    """Enumerates the extension's routes, so routes added later are covered too."""
    from mantik_jupyter.app import MantikApp

    ext = next(
        point.app
        for pkg in jp_serverapp.extension_manager.extensions.values()
        for point in pkg.extension_points.values()
        if isinstance(point.app, MantikApp)
    )
    patterns = [h[0] for h in ext.handlers]
    assert len(patterns) >= 4
    client = tornado.httpclient.AsyncHTTPClient()
    port = jp_serverapp.port
    for pattern in patterns:
        # Fill every regex group with a plausible value.
        path = re.sub(r"\(\?P<\w+>[^)]*\)|\([^)]*\)", "abc123", pattern).replace("?", "")
        for method in ("GET", "POST", "PUT", "DELETE"):
            resp = await client.fetch(
                f"http://127.0.0.1:{port}{jp_base_url}{path}",
                method=method,
                body=b"{}" if method in ("POST", "PUT") else None,
                allow_nonstandard_methods=True,
                follow_redirects=False,
                raise_error=False,
            )
            assert resp.code == 403, (pattern, method, resp.code)
            assert b"Traceback" not in resp.body


def test_credentials_are_never_in_repr(tmp_path: Path):
    from mantik_jupyter.tracking.credentials import Credential

    cred = Credential(username="alice", password="s3cret-password-1")
    assert "s3cret" not in repr(cred)


class TestEmbeddedDefault:
    """No tracking URI: the lab starts its own MLflow and logs the user in."""

    @pytest.fixture
    def jp_server_config(self, tmp_path, monkeypatch):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return lab_config(tmp_path / "mantik", None)

    async def test_embedded_server_with_automatic_login(self, jp_fetch, tmp_path):
        code, body = await api_json(jp_fetch, "auth", "status")
        assert code == 200
        assert body["embedded"] is True and body["logged_in"] is True
        assert body["tracking_uri"].startswith("http://127.0.0.1:")
        # The proxy waits for MLflow to boot instead of failing.
        assert "Default" in await search_through_proxy(jp_fetch, request_timeout=120)
        anonymous = await tornado.httpclient.AsyncHTTPClient().fetch(
            body["tracking_uri"] + "/api/2.0/mlflow/experiments/search",
            method="POST", body=b"{}", raise_error=False,
        )  # fmt: skip
        assert anonymous.code == 401, "the embedded MLflow must require authentication"
        secrets_file = tmp_path / "mantik" / "tracking" / "secrets.json"
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600

    async def test_a_crashed_embedded_server_is_started_again(self, jp_fetch, tmp_path):
        state_file = tmp_path / "mantik" / "tracking" / "server.json"
        await search_through_proxy(jp_fetch, request_timeout=120)
        code, before = await api_json(jp_fetch, "auth", "status")
        crashed = json.loads(state_file.read_text())["pid"]
        os.killpg(crashed, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            code, body = await api_json(jp_fetch, "runs")
            if code == 200:
                break
            # Until it is back: a 502 that names the server, or the wait for it.
            assert code in (502, 504) and before["tracking_uri"] in body["message"], body
            await asyncio.sleep(0.5)
        assert code == 200, body
        assert json.loads(state_file.read_text())["pid"] != crashed
        code, after = await api_json(jp_fetch, "auth", "status")
        assert after == before, "the restarted server keeps its address and login"
        assert "Default" in await search_through_proxy(jp_fetch)


class TestHungEmbeddedServer:
    """The embedded MLflow runs but answers nothing (stopped here; deadlocked in life)."""

    @pytest.fixture
    def jp_server_config(self, tmp_path, monkeypatch):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.setattr(proxy_relay, "UNANSWERED_AFTER", 1.0)
        return lab_config(tmp_path / "mantik", None, embedded_hang_grace=3.0)

    async def test_a_hung_embedded_server_is_started_again(self, jp_fetch, tmp_path):
        state_file = tmp_path / "mantik" / "tracking" / "server.json"
        await search_through_proxy(jp_fetch, request_timeout=120)
        _, before = await api_json(jp_fetch, "auth", "status")
        hung = json.loads(state_file.read_text())["pid"]
        os.killpg(hung, signal.SIGSTOP)
        try:
            # Before, the call waited for as long as the browser did (here: a timeout
            # error), and so did every later one.
            resp = await jp_fetch(
                "mantik", "mlflow", "api", "2.0", "mlflow", "experiments", "search",
                method="POST", body=json.dumps({"max_results": 5}),
                headers={"Content-Type": "application/json"}, raise_error=False,
                request_timeout=90,
            )  # fmt: skip
            # The hung server is stopped with SIGTERM, and continued so that it can act on
            # it: uvicorn may then still answer the waiting call as it shuts down
            # gracefully. Otherwise the call ends with a 502 naming the server.
            assert resp.code in (200, 502, 504), resp.body
            if resp.code != 200:
                assert before["tracking_uri"] in json.loads(resp.body)["message"]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hung, signal.SIGCONT)
        assert "Default" in await search_through_proxy(jp_fetch, request_timeout=120)
        assert json.loads(state_file.read_text())["pid"] != hung
        _, after = await api_json(jp_fetch, "auth", "status")
        assert after == before, "the restarted server keeps its address and login"


class TestTokenLogin:
    """A team's tracking server that takes tokens: here another lab's MLflow proxy.

    jupyter_server accepts ``Authorization: Bearer <token>``, so a lab that shares
    its tracking (e.g. on a hub) is a tracking server reached with a token.
    """

    @pytest.fixture(scope="class")
    def other_lab(self, tmp_path_factory):
        from .browser_helpers import start_lab

        lab = start_lab(tmp_path_factory.mktemp("other-lab"))
        try:
            lab.wait_until(
                lambda: lab.get_json("mantik/api/auth/status")[1].get("ready"),
                timeout=180,
                what="the other lab's embedded MLflow",
            )
            yield lab
        finally:
            lab.stop()

    @pytest.fixture
    def jp_server_config(self, tmp_path, other_lab):
        return lab_config(tmp_path / "mantik", other_lab.base + "mantik/mlflow")

    async def test_token_login_and_proxy_use(self, jp_fetch, other_lab):
        code, body = await api_json(jp_fetch, "auth", "login", method="POST", body={"token": "x"})
        assert code == 401
        code, body = await api_json(
            jp_fetch, "auth", "login", method="POST", body={"token": other_lab.token}
        )
        assert code == 200, body
        assert body["logged_in"] is True and other_lab.token not in json.dumps(body)
        assert "Default" in await search_through_proxy(jp_fetch)


class TestCredentialInTheTrackingUri:
    """``http://user:password@host`` as the tracking URI: a credential, never shown."""

    @pytest.fixture
    def user(self, mlflow_server):
        return mlflow_server.create_user()

    @pytest.fixture
    def jp_server_config(self, tmp_path, mlflow_server, user, monkeypatch):
        scheme, rest = mlflow_server.uri.split("://", 1)
        password = user.password.replace("-", "%2D")  # percent-escapes are undone
        # From the environment, as MLflow's client takes it: Jupyter logs its own config
        # (c.MantikApp.tracking_uri too) at debug level, which no extension can prevent.
        uri = f"{scheme}://{user.username}:{password}@{rest}/"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        config = lab_config(tmp_path / "mantik", None)
        del config.MantikApp["tracking_uri"]  # unset: taken from the environment
        return config

    async def test_it_logs_in_and_the_uri_shown_has_no_password(
        self, jp_fetch, mlflow_server, user
    ):
        code, body = await api_json(jp_fetch, "auth", "status")
        assert code == 200, body
        assert body["tracking_uri"] == mlflow_server.uri
        assert body["logged_in"] is True and body["username"] == user.username
        await search_through_proxy(jp_fetch, 1)


async def test_a_hand_edited_credential_store_is_named_not_a_500_traceback(
    jp_fetch, mlflow_server, tmp_path
):
    store = tmp_path / "mantik" / "credentials.json"
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text("{not json")
    code, body = await api_json(jp_fetch, "auth", "status")
    assert code == 500 and body["reason"] == "invalid_local_state", body
    assert str(store) in body["message"] and "line 1" in body["message"]

    # A broken entry of another server does not matter here; one of this server is named.
    store.write_text(json.dumps({"https://other.example": "junk"}))
    code, body = await api_json(jp_fetch, "auth", "status")
    assert code == 200 and body["logged_in"] is False
    store.write_text(json.dumps({mlflow_server.uri: {"username": "only-a-name"}}))
    code, body = await api_json(jp_fetch, "auth", "status")
    assert code == 500 and mlflow_server.uri in body["message"], body
    # Logging in replaces the broken entry and keeps the other server's.
    user = mlflow_server.create_user()
    await login_as(jp_fetch, user)
    code, body = await api_json(jp_fetch, "auth", "status")
    assert code == 200 and body["username"] == user.username


def test_a_credential_store_open_to_others_is_made_0600(tmp_path, caplog):
    from mantik_jupyter.tracking.credentials import Credential, CredentialStore

    path = tmp_path / "credentials.json"
    CredentialStore(path).set("http://x", Credential(username="alice", password="p" * 12))
    path.chmod(0o644)
    assert CredentialStore(path).get("http://x").username == "alice"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in caplog.text and "0600" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_credential_store_of_another_user_is_refused(tmp_path):
    from mantik_jupyter.errors import LocalStateInvalid
    from mantik_jupyter.tracking.credentials import Credential, CredentialStore

    path = tmp_path / "credentials.json"
    CredentialStore(path).set("http://x", Credential(username="mallory", password="p" * 12))
    os.chown(path, 65534, 65534)
    with pytest.raises(LocalStateInvalid) as err:
        CredentialStore(path).get("http://x")
    assert str(path) in err.value.message and "65534" in err.value.message


class TestBrokenEmbeddedSecrets:
    """The extension loads and says what is wrong instead of failing to load."""

    @pytest.fixture
    def jp_server_config(self, tmp_path, monkeypatch):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking = tmp_path / "mantik" / "tracking"
        tracking.mkdir(parents=True)
        (tracking / "auth.db").write_bytes(b"")  # an admin was made with the lost password
        (tracking / "secrets.json").write_text("{truncated")
        return lab_config(tmp_path / "mantik", None)

    async def test_status_names_the_secrets_file(self, jp_fetch, tmp_path):
        for route in (("auth", "status"), ("runs",)):
            code, body = await api_json(jp_fetch, *route)
            assert code == 500 and body["reason"] == "invalid_local_state", (route, body)
            assert str(tmp_path / "mantik" / "tracking" / "secrets.json") in body["message"]


class TestEnvironmentPasswordAndToken:
    """Both set, as MLflow's client takes them: the user name and password win."""

    @pytest.fixture
    def jp_server_config(self, tmp_path, mlflow_server, monkeypatch):
        self.user = mlflow_server.create_user()
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", self.user.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", self.user.password)
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "a-token-this-server-does-not-take")
        return lab_config(tmp_path / "mantik", mlflow_server.uri)

    async def test_the_lab_uses_the_credential_mlflows_client_uses(self, jp_fetch, mlflow_server):
        from mlflow.tracking import MlflowClient

        # MLflow's own client in a kernel or job with this environment:
        MlflowClient(mlflow_server.uri).search_experiments(max_results=1)
        code, body = await api_json(jp_fetch, "auth", "status")
        assert body["logged_in"] is True and body["username"] == self.user.username
        await search_through_proxy(jp_fetch, 1)


class TestUnwritableCredentialStore:
    @pytest.fixture
    def jp_server_config(self, tmp_path, mlflow_server):
        self.blocker = tmp_path / "a-file"
        self.blocker.write_text("not a folder")
        return lab_config(
            tmp_path / "mantik",
            mlflow_server.uri,
            credentials_path=str(self.blocker / "credentials.json"),
        )

    async def test_login_names_the_file_it_cannot_write(self, jp_fetch, mlflow_server):
        user = mlflow_server.create_user()
        code, body = await api_json(
            jp_fetch, "auth", "login", method="POST",
            body={"username": user.username, "password": user.password},
        )  # fmt: skip
        assert code == 500 and body["reason"] == "invalid_local_state", body
        assert str(self.blocker / "credentials.json") in body["message"]
        assert user.password not in body["message"]


class TestCABundleThatIsNoCA:
    """MLFLOW_TRACKING_SERVER_CERT_PATH set to a file that holds no certificate."""

    @pytest.fixture
    def jp_server_config(self, tmp_path, monkeypatch):
        from tornado.httpserver import HTTPServer

        from .tls_helpers import make_test_ca

        ca = make_test_ca(tmp_path / "ca")
        port = free_port()
        server = HTTPServer(
            tornado.web.Application([(r"/(.*)", _Teapot)]), ssl_options=ca.server_context()
        )
        server.listen(port, "127.0.0.1")
        self.bundle = tmp_path / "site-ca.pem"
        self.bundle.write_text("this is the key, not the CA\n")
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(self.bundle))
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "tlsuser")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tls-password-123")
        yield lab_config(tmp_path / "mantik", f"https://127.0.0.1:{port}")
        server.stop()

    async def test_login_and_proxy_name_the_file(self, jp_fetch):
        code, body = await api_json(
            jp_fetch, "auth", "login", method="POST", body={"username": "u", "password": "p" * 12}
        )
        assert code == 400 and body["reason"] == "invalid_config", body
        assert str(self.bundle) in body["message"]
        resp = await jp_fetch("mantik", "mlflow", "api", raise_error=False)
        body = json.loads(resp.body)
        assert resp.code == 400 and str(self.bundle) in body["message"], body

    async def test_a_ca_that_did_not_sign_it_is_named(self, jp_fetch, tmp_path):
        from .tls_helpers import make_test_ca

        self.bundle.write_bytes(make_test_ca(tmp_path / "other-ca").ca_pem.read_bytes())
        code, body = await api_json(
            jp_fetch, "auth", "login", method="POST", body={"username": "u", "password": "p" * 12}
        )
        assert code == 502 and str(self.bundle) in body["message"], body
        assert "could not be verified" in body["message"]


class _Teapot(tornado.web.RequestHandler):
    def get(self, path: str) -> None:
        self.set_status(418)
        self.finish({"path": path})

    post = get


def test_logins_from_several_processes_at_once_are_all_kept(tmp_path):
    """The lab, `mantik login` and kernels write one store: none may undo another."""
    import subprocess
    import sys

    path = tmp_path / "credentials.json"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mantik_jupyter.tracking.credentials import Credential, CredentialStore\n"
        "store = CredentialStore(Path(sys.argv[1]))\n"
        "for i in range(100):\n"
        "    store.set(f'http://{sys.argv[2]}-{i}', Credential(username='u', password='p' * 12))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), who], env=env)
        for who in ("lab", "cli", "kernel")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert len(json.loads(path.read_text())) == 300


async def test_a_password_and_a_token_together_are_refused(jp_fetch, mlflow_server, tmp_path):
    # The token won silently: right password, junk token, "refused the credential".
    user = mlflow_server.create_user()
    code, body = await api_json(
        jp_fetch, "auth", "login", method="POST",
        body={"username": user.username, "password": user.password, "token": "junk-token"},
    )  # fmt: skip
    assert code == 400 and body["reason"] == "invalid_request", body
    assert "token" in body["message"] and user.password not in body["message"]
    assert not (tmp_path / "mantik" / "credentials.json").exists()


class TestTwoLabsOneDataDir:
    """Another lab already runs the embedded server of this data dir."""

    @pytest.fixture
    def other_lab_server(self, tmp_path):
        from mantik_jupyter.tracking.embedded import EmbeddedTrackingServer

        server = EmbeddedTrackingServer(tmp_path / "mantik" / "tracking", check_interval=0.5)
        server.start()
        server.wait_ready(120)
        yield server
        server.stop()

    @pytest.fixture
    def jp_server_config(self, tmp_path, monkeypatch, other_lab_server):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return lab_config(tmp_path / "mantik", None)

    async def test_the_lab_uses_it_and_takes_over_when_it_stops(self, jp_fetch, other_lab_server):
        other_pid = other_lab_server._proc.pid
        code, body = await api_json(jp_fetch, "auth", "status")
        assert body["tracking_uri"] == other_lab_server.uri
        assert "Default" in await search_through_proxy(jp_fetch, request_timeout=60)
        assert other_lab_server._proc.pid == other_pid, "the other lab's server was stopped"
        other_lab_server.stop()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            code, body = await api_json(jp_fetch, "runs")
            if code == 200:
                break
            await asyncio.sleep(0.5)
        assert code == 200, body
        assert "Default" in await search_through_proxy(jp_fetch)


class _LoginPage(tornado.web.RequestHandler):
    """What a site's single sign-on in front of MLflow answers: a redirect to a page."""

    def get(self, path: str) -> None:
        if path != "sso/login":
            self.redirect("/sso/login")
            return
        self.finish("<html><body>Sign in with your institution</body></html>")

    post = get


class TestNotAnMlflowServer:
    @pytest.fixture
    def jp_server_config(self, tmp_path):
        from tornado.httpserver import HTTPServer

        port = free_port()
        server = HTTPServer(tornado.web.Application([(r"/(.*)", _LoginPage)]))
        server.listen(port, "127.0.0.1")
        self.uri = f"http://127.0.0.1:{port}"
        yield lab_config(tmp_path / "mantik", self.uri)
        server.stop()

    async def test_login_says_the_answer_is_not_mlflows(self, jp_fetch):
        code, body = await api_json(
            jp_fetch, "auth", "login", method="POST", body={"username": "u", "password": "p" * 12}
        )
        assert code == 502 and body["reason"] == "tracking_unavailable", body
        assert self.uri in body["message"] and "MLflow" in body["message"]
