"""A Jupyter server extension for ``bench/proxy.py`` only: what the cheapest relay inside the
lab costs, to read the proxy's figures against.

``{base_url}bench-floor/<path>`` is a plain tornado handler that checks the Jupyter token with
one comparison, injects the tracking credential and relays the call with the same upstream
pool as the MLflow proxy. It has none of Jupyter's handler machinery (identity provider,
authorizer, default headers, login cookie) and none of the proxy's header hygiene or body
streaming. What it adds over a direct call is the share of the machine, tornado and the extra
hop; what the proxy adds beyond it is Jupyter's authentication and the proxy's own work.

It is loaded only into the benchmark's throwaway lab and is not part of the product.
"""

from __future__ import annotations

import hmac
from typing import Any

from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from tornado import httputil, web

from mantik_jupyter.app import MantikApp
from mantik_jupyter.handlers.proxy_relay import DROP_REQUEST, DROP_RESPONSE, Relay
from mantik_jupyter.handlers.upstream import Origin, UpstreamRequest, upstream_pool


class FloorRelay(web.RequestHandler):
    def initialize(self, token: str) -> None:
        self.token = token.encode()

    def check_xsrf_cookie(self) -> None:
        pass  # token-authenticated, as Jupyter's API skips it for tokens too

    def start_response(self, status: int, reason: str, headers: httputil.HTTPHeaders) -> None:
        self.set_status(status, reason or None)
        for name, value in headers.get_all():
            if name.lower() not in DROP_RESPONSE:
                self.set_header(name, value)

    async def _relay(self, path: str) -> None:
        given = self.request.headers.get("Authorization", "").partition(" ")[2]
        if not hmac.compare_digest(given.encode(), self.token):
            raise web.HTTPError(403)
        tracking = self.settings[MantikApp.name].tracking
        origin = Origin.of(tracking.uri)
        headers = httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() not in DROP_REQUEST:
                headers.add(name, value)
        headers["Host"] = origin.netloc
        headers["Authorization"] = tracking.require_credential().auth_header()
        target = f"/{path}?{self.request.query}" if self.request.query else f"/{path}"
        request = UpstreamRequest(self.request.method or "GET", target, headers)
        request.body = self.request.body or None
        await upstream_pool().exchange(origin, request, Relay(self))
        self.finish()

    get = post = _relay


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "floor_relay"}]


def _load_jupyter_server_extension(serverapp: ServerApp) -> None:
    pattern = url_path_join(serverapp.base_url, "bench-floor/(.*)")
    token = serverapp.identity_provider.token
    serverapp.web_app.add_handlers(".*$", [(pattern, FloorRelay, {"token": token})])
