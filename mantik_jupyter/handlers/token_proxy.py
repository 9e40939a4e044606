"""The MLflow proxy's light route, for calls that carry the lab's token and nothing else.

MLflow's client with ``MLFLOW_TRACKING_TOKEN`` (every ``log_metric`` of a training loop in
a kernel, the runs table's searches) sends the lab's token in its ``Authorization`` header
on every call. For such a call Jupyter's handler machinery decides nothing that one token
comparison does not: the default identity provider accepts the token and nothing else in
the request, the default authorizer allows everything, and the XSRF check and CORS
headers concern browsers. That machinery still cost the proxy a third of what it added
to a small MLflow call (``bench/proxy.py``), which this route saves.

A call takes this route only when Jupyter would decide exactly as it does (``TokenCall``);
any other call, and every call to a lab with another identity provider or authorizer
(JupyterHub's, a custom one), takes the Jupyter route in ``mlflow_proxy.py``, as do
uploads too large to hold in memory (that route streams them).
"""

from __future__ import annotations

import functools
import hmac
import inspect
import ipaddress
import logging
import re
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.authorizer import AllowAllAuthorizer
from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider, User
from jupyter_server.base import handlers as jupyter_handlers
from jupyter_server.utils import url_path_join
from tornado import httputil, web
from tornado.routing import PathMatches, Rule

from .base import MantikErrors
from .mlflow_proxy import MlflowProxyHandler
from .proxy_relay import (
    BODY_METHODS,
    BUFFER_LIMIT,
    PROXY_PATH,
    ProxyRelay,
    Relay,
    named_length,
)
from .upstream import upstream_pool

if TYPE_CHECKING:
    from jupyter_server.serverapp import ServerApp

    from ..app import MantikApp

# Jupyter's own identity providers, whose token check this route repeats. A subclass may
# decide differently (JupyterHub's does), so it must be one of these exactly.
TOKEN_PROVIDERS = (IdentityProvider, PasswordIdentityProvider)
# Requests a browser makes carry one of these: they take the Jupyter route, which sets the
# lab's cookies, CORS and security headers as Jupyter would.
BROWSER_HEADERS = ("Cookie", "Origin")
_HOST_PORT = re.compile(r"^(.*?)(:\d+)?$")
# Who a call admitted by the token is, in the lab's request log (Jupyter names such a
# caller "anonymous" too: a token says nothing of who holds it).
TOKEN_USER = User(username="token", name="Anonymous (lab token)")


def carries_lab_token(provider: IdentityProvider, headers: httputil.HTTPHeaders) -> bool:
    """Whether the ``Authorization`` header holds the lab's token, read as Jupyter reads it."""
    token = provider.token
    given = provider.auth_header_pat.match(headers.get("Authorization", ""))
    return bool(token) and given is not None and hmac.compare_digest(
        given.group(2).encode(), token.encode()
    )


class TokenCall(PathMatches):
    """The proxy's path, for calls that Jupyter would admit by the lab's token alone."""

    def __init__(self, prefix: str, serverapp: ServerApp) -> None:
        super().__init__(prefix.rstrip("/") + "/?(.*)")  # the Jupyter route's pattern
        self.prefix = prefix
        self.serverapp = serverapp

    def match(self, request: httputil.HTTPServerRequest) -> dict[str, Any] | None:
        if len(request.path) <= len(self.prefix) or not request.path.startswith(self.prefix):
            return None  # the proxy's root redirects, on the Jupyter route
        if not self.admits(request):
            return None
        return super().match(request)

    @functools.cached_property
    def jupyters_defaults(self) -> bool:
        """Whether the lab authenticates as Jupyter does by default; fixed once it serves."""
        app = self.serverapp
        if type(app.identity_provider) not in TOKEN_PROVIDERS:
            return False
        if type(app.authorizer) is not AllowAllAuthorizer:
            return False
        # Jupyter's deprecated way to authenticate (JupyterHub before 3.0): an overridden
        # get_current_user, which Jupyter asks instead of the identity provider.
        return inspect.getmodule(MlflowProxyHandler.get_current_user) is jupyter_handlers

    def admits(self, request: httputil.HTTPServerRequest) -> bool:
        headers = request.headers
        if not self.jupyters_defaults or any(name in headers for name in BROWSER_HEADERS):
            return False
        if "token" in request.query_arguments:
            return False  # Jupyter would take the URL's token over the header's
        if not carries_lab_token(self.serverapp.identity_provider, headers):
            return False
        if "Transfer-Encoding" in headers:
            return False  # a body of unknown length streams, on the Jupyter route
        length = named_length(headers) if "Content-Length" in headers else 0
        if length is None or length > BUFFER_LIMIT:
            return False
        return self._local_host(request)

    def _local_host(self, request: httputil.HTTPServerRequest) -> bool:
        """Jupyter's ``check_host``, or less: a Host it would refuse goes to the Jupyter
        route, which refuses it in its words."""
        settings = self.serverapp.web_app.settings
        if settings.get("allow_remote_access", False):
            return True
        found = _HOST_PORT.match(request.host)
        host = found.group(1) if found else ""
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host in settings.get("local_hostnames", ["localhost"])


class TokenCallProxyHandler(ProxyRelay, MantikErrors, web.RequestHandler):
    """Relays a call ``TokenCall`` admitted; its body is in memory."""

    def initialize(self, mantik: MantikApp) -> None:
        self.mantik = mantik

    @property
    def log(self) -> logging.Logger:
        return self.mantik.log

    def get_current_user(self) -> User | None:
        # ``TokenCall`` admitted the call already; checked again (a few microseconds) so
        # that this handler never answers a call without the token, however it was routed.
        provider = self.settings["identity_provider"]
        return TOKEN_USER if carries_lab_token(provider, self.request.headers) else None

    def get_login_url(self) -> str:
        raise web.HTTPError(403, "Authentication is required.")

    def set_default_headers(self) -> None:
        # As on every Jupyter answer, with the headers a site adds to all of them
        # (``ServerApp.tornado_settings["headers"]``). Not Jupyter's default
        # Content-Security-Policy: it concerns pages, and no browser gets this answer.
        self.set_header("X-Content-Type-Options", "nosniff")
        for name, value in self.settings.get("headers", {}).items():
            self.set_header(name, value)

    def check_xsrf_cookie(self) -> None:
        pass  # a token in the header proves the call is no cross-site forgery; Jupyter agrees

    @web.authenticated
    async def _proxy(self, *args: Any) -> None:
        # The raw path keeps its percent-encoding (artifact names with spaces or slashes).
        self._prefix = self.proxy_prefix()
        request = await self.upstream_request(self.request.path[len(self._prefix) :])
        if request.method in BODY_METHODS:  # as the Jupyter route, which drops a GET's body
            request.body = self.request.body or None
        await self.answer(upstream_pool().exchange(self._origin, request, Relay(self)))

    def on_finish(self) -> None:
        self.note_activity()

    get = post = put = patch = delete = head = options = _proxy


def add_token_route(serverapp: ServerApp, mantik: MantikApp) -> None:
    """Adds the route; call it before the Jupyter route is added, so that it is tried first
    (tornado tries routes in the order they were added)."""
    web_app = serverapp.web_app
    prefix = url_path_join(web_app.settings.get("base_url", "/"), PROXY_PATH)
    rule = Rule(TokenCall(prefix, serverapp), TokenCallProxyHandler, {"mantik": mantik})
    web_app.add_handlers(".*$", [rule])
