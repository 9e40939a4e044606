"""The MLflow proxy's two routes: which calls take the light token route, and that both
treat a call alike. Routing is asked of the real lab's router; calls go through a real lab
to a stand-in tracking server that shows what it received."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import tornado.web
from jupyter_server.auth.authorizer import Authorizer
from jupyter_server.auth.identity import IdentityProvider
from jupyter_server.base.handlers import JupyterHandler
from tornado import httputil

from mantik_jupyter.handlers.mlflow_proxy import MlflowProxyHandler
from mantik_jupyter.handlers.token_proxy import TokenCallProxyHandler

from .lab_fixtures import lab_config
from .test_proxy import (
    FaultyTrackingServer,
    WithStandInUpstream,
    capturing_upstream,
    curl,
    lab_url,
)

PATH = "mantik/mlflow/api/2.0/mlflow/runs/search"


def route_of(app: Any, base_url: str, method: str = "POST", path: str = PATH, **headers: str):
    """The handler class the lab's router picks for a call."""
    headers.setdefault("Host", "127.0.0.1:8888")
    request = httputil.HTTPServerRequest(
        method=method, uri=f"{base_url}{path}", headers=httputil.HTTPHeaders(headers)
    )
    return app.web_app.find_handler(request).handler_class


def token_of(app: Any) -> str:
    return app.identity_provider.token


class TestWhichRoute:
    @pytest.fixture
    def jp_server_config(self, tmp_path):
        return lab_config(tmp_path / "mantik", "http://127.0.0.1:9")

    def test_a_call_with_the_lab_token_alone_takes_the_token_route(self, jp_serverapp, jp_base_url):
        token = token_of(jp_serverapp)
        for auth in (f"token {token}", f"Bearer {token}", f"TOKEN {token}"):
            length = {"Content-Length": "20"}
            got = route_of(jp_serverapp, jp_base_url, Authorization=auth, **length)
            assert got is TokenCallProxyHandler, auth
        for method in ("GET", "DELETE", "HEAD"):
            got = route_of(jp_serverapp, jp_base_url, method, Authorization=f"token {token}")
            assert got is TokenCallProxyHandler, method
        got = route_of(jp_serverapp, jp_base_url, Authorization=f"token {token}", Host="localhost")
        assert got is TokenCallProxyHandler

    @pytest.mark.parametrize(
        "why, change",
        [
            ("no token", {"Authorization": None}),
            ("a wrong token", {"Authorization": "token wrong"}),
            ("a token one character short", {"Authorization": "short"}),
            ("basic auth", {"Authorization": "Basic dXNlcjpwdw=="}),
            ("a browser's cookie", {"Cookie": "_xsrf=1"}),
            ("a browser's Origin", {"Origin": "http://127.0.0.1:8888"}),
            ("a token in the URL too", {"query": "?token=other"}),
            ("a body too large to hold", {"Content-Length": str((1 << 20) + 1)}),
            ("a body of unknown length", {"Transfer-Encoding": "chunked"}),
            ("a length that is not a number", {"Content-Length": "12, 12"}),
            ("a Host Jupyter refuses", {"Host": "evil.example:8888"}),
            ("the proxy's root", {"path": "mantik/mlflow"}),
            ("the proxy's root with a slash", {"path": "mantik/mlflow/"}),
        ],
    )
    def test_every_other_call_takes_the_jupyter_route(self, jp_serverapp, jp_base_url, why, change):
        token = token_of(jp_serverapp)
        headers = {"Authorization": f"token {token}", "Content-Length": "20"}
        path = change.pop("path", PATH) + change.pop("query", "")
        if change.get("Authorization") == "short":
            change["Authorization"] = f"token {token[:-1]}"
        headers.update(change)
        headers = {k: v for k, v in headers.items() if v is not None}
        assert route_of(jp_serverapp, jp_base_url, path=path, **headers) is MlflowProxyHandler


class ReadOnlyAuthorizer(Authorizer):
    """A site's authorizer: reading only."""

    def is_authorized(self, handler, user, action, resource) -> bool:
        return action == "read"


class CautiousIdentityProvider(IdentityProvider):
    """A site's identity provider that takes no token (JupyterHub's decides by its own)."""

    async def get_user(self, handler):
        return None


class TestASiteAuthorizesItsOwnWay(WithStandInUpstream):
    """A lab whose authorizer or identity provider is not Jupyter's default: the token
    route stands aside, and the site's decision holds."""

    @pytest.fixture
    def upstream(self):
        seen: list[str] = []

        class Capture(tornado.web.RequestHandler):
            def _reply(self, path: str) -> None:
                seen.append(f"{self.request.method} {path}")
                self.finish({"ok": True})

            get = post = _reply

        with self.serving(Capture):
            yield seen

    @pytest.fixture(params=["authorizer", "identity provider"])
    def site(self, request):
        return request.param

    @pytest.fixture
    def jp_server_config(self, tmp_path, upstream, monkeypatch, site):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "proxyuser")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "proxy-password-123")
        config = lab_config(tmp_path / "mantik", f"http://127.0.0.1:{self.port}")
        if site == "authorizer":
            config.ServerApp.authorizer_class = ReadOnlyAuthorizer
        else:
            config.ServerApp.identity_provider_class = CautiousIdentityProvider
        return config

    async def test_the_sites_decision_holds_for_token_calls(
        self, jp_serverapp, http_server_client, jp_base_url, upstream, site
    ):
        token = token_of(jp_serverapp)
        assert route_of(jp_serverapp, jp_base_url, Authorization=f"token {token}") is (
            MlflowProxyHandler
        )
        url = lab_url(jp_serverapp, jp_base_url) + PATH
        code, out, err, _ = await curl(
            "-H", f"Authorization: token {token}", "-d", "{}", "-w", "\n%{http_code}", url
        )  # fmt: skip
        assert out.rsplit("\n", 1)[1] == "403", (out, err)
        code, out, err, _ = await curl(
            "-H", f"Authorization: token {token}", "-w", "\n%{http_code}", url
        )  # fmt: skip
        expected = "200" if site == "authorizer" else "403"
        assert out.rsplit("\n", 1)[1] == expected, (out, err)
        assert upstream == (["GET api/2.0/mlflow/runs/search"] if expected == "200" else [])


def hub_user(handler):
    """Jupyter's deprecated way to authenticate (JupyterHub before 3.0): an overridden
    ``get_current_user``, asked instead of the identity provider. This site knows a user
    by its own header only."""
    return "hub-user" if handler.request.headers.get("X-Hub-User") == "yes" else None


class WithCapturingUpstream(WithStandInUpstream):
    @pytest.fixture
    def upstream(self):
        seen: list[dict] = []
        with self.serving(capturing_upstream(seen)):
            yield seen


class TestAnOverriddenGetCurrentUserDecides(WithCapturingUpstream):
    @pytest.fixture
    def jp_server_config(self, tmp_path, upstream, monkeypatch):
        monkeypatch.setattr(JupyterHandler, "get_current_user", hub_user)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "proxyuser")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "proxy-password-123")
        config = lab_config(tmp_path / "mantik", f"http://127.0.0.1:{self.port}")
        # Only with this provider does Jupyter ask the override (a password lab's ignores it).
        config.ServerApp.identity_provider_class = IdentityProvider
        return config

    async def test_the_lab_token_alone_admits_nothing(
        self, jp_serverapp, http_server_client, jp_base_url, upstream
    ):
        # The token route admitted the lab's token, which such a lab does not look at.
        token = token_of(jp_serverapp)
        assert route_of(jp_serverapp, jp_base_url, Authorization=f"token {token}") is (
            MlflowProxyHandler
        )
        url = lab_url(jp_serverapp, jp_base_url) + PATH
        code, out, err, _ = await curl(
            "-H", f"Authorization: token {token}", "-w", "\n%{http_code}", url
        )  # fmt: skip
        assert out.rsplit("\n", 1)[1] != "418" and upstream == [], (out, err)
        code, out, err, _ = await curl(
            "-H", f"Authorization: token {token}", "-H", "X-Hub-User: yes",
            "-w", "\n%{http_code}", url,
        )  # fmt: skip
        assert out.rsplit("\n", 1)[1] == "418", (out, err)  # the site's user passes


async def raw_call(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


ROUTES = {
    # The MLflow client in a kernel: the token and nothing else.
    "token": {},
    # The same call with a cookie, as a browser's: Jupyter's own authentication.
    "jupyter": {"Cookie": "unrelated=1"},
}


@pytest.fixture(params=sorted(ROUTES))
def route(request) -> dict[str, str]:
    return dict(ROUTES[request.param])  # a copy: jp_fetch adds its token to the headers given


class TestBothRoutesRelayAlike(WithCapturingUpstream):
    async def test_the_call_and_its_answer(self, jp_fetch, jp_serverapp, upstream, route):
        settings = jp_serverapp.web_app.settings
        settings["api_last_activity"] = before = settings["started"]
        resp = await jp_fetch(
            "mantik", "mlflow", "api", "2.0", "some path", method="POST", body=b'{"a": 1}',
            params={"q": "1 2"}, headers={"X-Client": "mlflow", **route}, raise_error=False,
        )  # fmt: skip
        assert resp.code == 418 and json.loads(resp.body) == {"ok": True}
        assert resp.headers["X-Upstream"] == "yes"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert "WWW-Authenticate" not in resp.headers
        # The upstream's CORS headers never pass (Jupyter's route sets its own).
        assert resp.headers.get("Access-Control-Allow-Origin") != "*"
        assert not any("upstream=" in c for c in resp.headers.get_list("Set-Cookie"))
        got = upstream[-1]
        assert got["path"] == "/api/2.0/some%20path" and got["query"] == "q=1+2"
        assert got["body"] == '{"a": 1}'
        headers = {k.lower(): v for k, v in got["headers"].items()}
        assert headers["x-client"] == "mlflow" and "cookie" not in headers
        assert headers["authorization"].startswith("Basic ")
        assert token_of(jp_serverapp) not in json.dumps(headers)
        assert headers["host"] == f"127.0.0.1:{self.port}"
        assert headers["x-forwarded-prefix"].endswith("/mantik/mlflow")
        assert settings["api_last_activity"] > before

    async def test_a_body_only_where_the_method_has_one(
        self, jp_serverapp, http_server_client, jp_base_url, upstream, route
    ):
        # The token route sent a GET's body on to MLflow; the Jupyter route drops it.
        url = lab_url(jp_serverapp, jp_base_url) + PATH
        extra = [arg for name, value in route.items() for arg in ("-H", f"{name}: {value}")]
        code, out, err, _ = await curl(
            "-X", "GET", "-H", f"Authorization: token {token_of(jp_serverapp)}", *extra,
            "-d", "a body", "-w", "\n%{http_code}", url,
        )  # fmt: skip
        assert out.rsplit("\n", 1)[1] == "418", (out, err)
        assert upstream[-1]["method"] == "GET" and upstream[-1]["body"] == ""

    async def test_a_length_that_is_no_number_is_answered(
        self, jp_serverapp, http_server_client, jp_base_url, upstream, route
    ):
        # '\u00b2' is a digit to str.isdigit, not to int: the token route's check raised, and
        # the client's connection was dropped unanswered (the Jupyter route: a 500).
        extra = "".join(f"{name}: {value}\r\n" for name, value in route.items())
        answer = await raw_call(
            jp_serverapp.port,
            (
                f"POST {jp_base_url}{PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: token {token_of(jp_serverapp)}\r\n{extra}"
                "Content-Length: \u00b2\r\nConnection: close\r\n\r\nab"
            ).encode("latin-1"),
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert upstream == []

    @pytest.mark.parametrize("path", ["../../api/contents", "a/%2e%2E/%2E./x", "a%2F..%2Fx"])
    async def test_no_path_climbs_above_the_tracking_server(
        self, jp_serverapp, http_server_client, jp_base_url, upstream, route, path
    ):
        # '..' went to the tracking server as it came, with the lab's credential: under a
        # server mounted at https://apps.example.org/mlflow, nginx (normalising the path)
        # handed '/mlflow/../grafana/...' and that credential to another application.
        url = lab_url(jp_serverapp, jp_base_url) + "mantik/mlflow/" + path
        extra = [arg for name, value in route.items() for arg in ("-H", f"{name}: {value}")]
        code, out, err, _ = await curl(
            "--path-as-is", "-H", f"Authorization: token {token_of(jp_serverapp)}", *extra,
            "-w", "\n%{http_code}", url,
        )  # fmt: skip
        body, status = out.rsplit("\n", 1)
        assert status == "400" and "'..'" in json.loads(body)["message"], (out, err)
        assert upstream == []

    async def test_redirects_point_back_at_the_proxy(self, jp_fetch, jp_base_url, route):
        resp = await jp_fetch(
            "mantik", "mlflow", "redirect", headers=route, raise_error=False,
            follow_redirects=False,
        )  # fmt: skip
        assert resp.code == 302
        assert resp.headers["Location"] == f"{jp_base_url}mantik/mlflow/next?x=1"


class TestBothRoutesReportAlike(WithStandInUpstream):
    @pytest.fixture
    def upstream(self):
        server = FaultyTrackingServer()
        self.port = server.port
        yield server
        server.close()

    async def test_a_dropped_call_is_named(
        self, jp_serverapp, http_server_client, jp_base_url, upstream, route
    ):
        url = lab_url(jp_serverapp, jp_base_url) + "mantik/mlflow/api/2.0/mlflow/drop/runs/create"
        extra = [arg for name, value in route.items() for arg in ("-H", f"{name}: {value}")]
        code, out, err, _ = await curl(
            "-H", f"Authorization: token {token_of(jp_serverapp)}", *extra,
            "-d", '{"experiment_id": "1"}', "-w", "\n%{http_code}", url,
        )  # fmt: skip
        body, status = out.rsplit("\n", 1)
        assert (code, status) == (0, "502"), err
        answer = json.loads(body)
        assert answer["reason"] == "tracking_unavailable"
        assert (
            "closed the connection without answering POST /api/2.0/mlflow/drop/"
            in (answer["message"])
        )


class TestBothRoutesCarryTheSitesHeaders(WithCapturingUpstream):
    """A site's headers for every answer of its lab (``tornado_settings["headers"]``)."""

    @pytest.fixture
    def jp_server_config(self, tmp_path, upstream, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "proxyuser")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "proxy-password-123")
        config = lab_config(tmp_path / "mantik", f"http://127.0.0.1:{self.port}")
        config.ServerApp.tornado_settings = {"headers": {"X-Site-Policy": "kept"}}
        return config

    async def test_on_both_routes(self, jp_fetch, route):
        resp = await jp_fetch("mantik", "mlflow", "api", "x", headers=route, raise_error=False)
        assert resp.code == 418 and resp.headers["X-Upstream"] == "yes"
        assert resp.headers["X-Site-Policy"] == "kept"
