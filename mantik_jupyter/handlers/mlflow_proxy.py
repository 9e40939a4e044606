"""``{base_url}mantik/mlflow/<path>``: the MLflow API and UI through the lab.

The upstream is always the configured tracking server, never something named
by the request. Bodies stream both ways (an artifact of gigabytes is never held
in memory). The browser's ``Cookie`` and ``Authorization`` never reach MLflow:
the credential stored on the server side is injected instead. ``Host`` and
``Origin`` are rewritten to the upstream's, which MLflow's security middleware
requires.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import httputil, web
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.netutil import DefaultLoopResolver, Resolver
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from ..errors import TrackingUnavailable
from .base import MantikMixin

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
# Browser credentials of the lab must not reach MLflow.
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "cookie",
    "authorization",
    "x-xsrftoken",
    "x-csrftoken",
    "referer",
}
# A 401 challenge would make the browser pop a password dialog; cookies of the
# upstream must not land on the lab's origin.
# CORS headers are dropped: the lab and the proxied UI share one origin.
DROP_RESPONSE = HOP_BY_HOP | {"set-cookie", "www-authenticate", "server", "date"}

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
MAX_BODY = 1 << 40
CHUNK_QUEUE = 16


class _LiteralFirstResolver(Resolver):
    """Answers IP literals (the embedded server's 127.0.0.1) at once; tornado's default
    resolver would hop to a thread for getaddrinfo on every proxied request."""

    def initialize(self) -> None:  # type: ignore[override]
        self._fallback = DefaultLoopResolver()

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return await self._fallback.resolve(host, port, family)
        if address.version == 6:
            return [(socket.AF_INET6, (host, port, 0, 0))]
        return [(socket.AF_INET, (host, port))]


_clients: dict[int, SimpleAsyncHTTPClient] = {}


def _client() -> SimpleAsyncHTTPClient:
    # One instance per event loop, configured once; the default 100 MB body limit
    # would cut large artifacts.
    loop = id(asyncio.get_running_loop())
    client = _clients.get(loop)
    if client is None:
        client = SimpleAsyncHTTPClient(
            force_instance=True,
            max_body_size=MAX_BODY,
            max_buffer_size=64 << 20,
            resolver=_LiteralFirstResolver(),
        )
        _clients[loop] = client
    return client


@web.stream_request_body
class MlflowProxyHandler(MantikMixin, JupyterHandler):
    def get_login_url(self) -> str:
        # A proxy has no login page of its own: answer 403 like the API does.
        raise web.HTTPError(403, "Authentication is required.")

    def check_xsrf_cookie(self) -> None:
        try:
            super().check_xsrf_cookie()
        except web.HTTPError:
            # The MLflow UI in the lab's iframe sends no XSRF header. A same-origin
            # Origin header proves the request comes from a page of this lab.
            if not self._same_origin():
                raise

    def _same_origin(self) -> bool:
        origin = self.request.headers.get("Origin")
        if origin:
            return urlsplit(origin).netloc == self.request.host
        return self.request.headers.get("Sec-Fetch-Site") == "same-origin"

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        self._fetch: asyncio.Future[Any] | None = None
        self._body: asyncio.Queue[bytes | None] | None = None
        self._started = False
        await self.check_authorized()
        # The raw path keeps its percent-encoding (artifact names with spaces or slashes).
        self._prefix = url_path_join(self.base_url, "mantik/mlflow/")
        path = (
            self.request.path[len(self._prefix) :]
            if self.request.path.startswith(self._prefix)
            else ""
        )
        if not path and not self.request.path.endswith("/"):
            # Without the slash the UI's relative asset paths point one level up.
            query = f"?{self.request.query}" if self.request.query else ""
            self.redirect(self.request.path + "/" + query, permanent=False)
            return
        tracking = self.mantik.tracking
        if not tracking.ready:
            await self.in_thread(tracking.wait_ready)
        credential = tracking.require_credential()
        upstream = tracking.uri
        url = f"{upstream}/{path}" + (f"?{self.request.query}" if self.request.query else "")
        headers = httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() not in DROP_REQUEST and name.lower() != "origin":
                headers.add(name, value)
        if "Origin" in self.request.headers:
            headers["Origin"] = upstream
        headers["Authorization"] = credential.auth_header()
        headers["X-Forwarded-Prefix"] = self._prefix.rstrip("/")
        method = self.request.method or "GET"
        producer = None
        if method in BODY_METHODS and self._has_body():
            self.request.connection.set_max_body_size(MAX_BODY)  # type: ignore[union-attr]
            self._body = asyncio.Queue(maxsize=CHUNK_QUEUE)
            producer = self._produce
        self._upstream = upstream
        request = HTTPRequest(
            url,
            method=method,
            headers=headers,
            body_producer=producer,
            body=b"" if method in BODY_METHODS and producer is None else None,
            allow_nonstandard_methods=True,
            follow_redirects=False,
            decompress_response=False,
            connect_timeout=10,
            request_timeout=24 * 3600,
            header_callback=self._on_header,
            streaming_callback=self._on_chunk,
        )
        self._up_status: int | None = None
        self._up_headers = httputil.HTTPHeaders()
        self._fetch = asyncio.ensure_future(_client().fetch(request, raise_error=False))

    def _has_body(self) -> bool:
        length = self.request.headers.get("Content-Length")
        if length is not None:
            return length.strip() != "0"
        return "chunked" in self.request.headers.get("Transfer-Encoding", "").lower()

    async def data_received(self, chunk: bytes) -> None:
        if self._body is not None:
            await self._body.put(chunk)

    async def _produce(self, write: Any) -> None:
        assert self._body is not None
        while (chunk := await self._body.get()) is not None:
            await write(chunk)

    def _on_header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            status = httputil.parse_response_start_line(line.strip())
            if status.code == 100:
                return
            self._up_status, self._up_reason = status.code, status.reason
            self._up_headers = httputil.HTTPHeaders()
        elif line in ("\r\n", "\n"):
            if self._up_status is not None and self._up_status != 100:
                self._start_response()
        else:
            self._up_headers.parse_line(line)

    def _start_response(self) -> None:
        assert self._up_status is not None
        self._started = True
        self.set_status(self._up_status, self._up_reason or None)
        self.clear_header("Content-Type")
        seen: set[str] = set()
        for name, value in self._up_headers.get_all():
            lname = name.lower()
            if lname in DROP_RESPONSE or lname.startswith("access-control-"):
                continue
            if lname == "location":
                value = self._rewrite_location(value)
            # The upstream's value replaces the lab's default; repeated headers add up.
            if lname in seen:
                self.add_header(name, value)
            else:
                self.set_header(name, value)
                seen.add(lname)

    def _rewrite_location(self, value: str) -> str:
        # MLflow's redirects name its internal address; point them at the proxy.
        if value.startswith(self._upstream):
            return self._prefix.rstrip("/") + value[len(self._upstream) :]
        return value

    def _on_chunk(self, chunk: bytes) -> Any:
        self.write(chunk)
        return self.flush()

    @web.authenticated
    async def _proxy(self, *args: Any) -> None:
        if self._fetch is None:
            return
        if self._body is not None:
            await self._body.put(None)
        try:
            response = await self._fetch
            error = response.error
        except (OSError, HTTPClientError) as exc:
            error = exc
        if self._started:
            self.finish()
            return
        if isinstance(error, HTTPClientError) and error.code != 599:
            raise error
        raise TrackingUnavailable(
            f"The tracking server {self._upstream} cannot be reached "
            f"({type(error).__name__ if error else 'no response'}). Check that it runs."
        )

    def on_connection_close(self) -> None:
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
        if self._body is not None and not self._body.full():
            self._body.put_nowait(None)

    get = post = put = patch = delete = head = options = _proxy


handlers = [(r"mantik/mlflow/?(.*)", MlflowProxyHandler)]
