"""``{base_url}mantik/mlflow/<path>``: the MLflow API and UI through the lab.

The upstream is always the configured tracking server, never something named
by the request. Bodies stream both ways (an artifact of gigabytes is never held
in memory). The browser's ``Cookie`` and ``Authorization`` never reach MLflow:
the credential stored on the server side is injected instead. ``Host`` and
``Origin`` are rewritten to the upstream's, which MLflow's security middleware
requires.

This is the route with Jupyter's own authentication, which every call can take.
Calls that carry nothing but the lab's token take a lighter one (``token_proxy.py``);
what both do with a call is in ``proxy_relay.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from jupyter_server.base.handlers import JupyterHandler
from tornado import web

from .base import MantikMixin
from .proxy_relay import BODY_METHODS, BUFFER_LIMIT, PROXY_PATH, ProxyRelay, Relay, named_length
from .upstream import MAX_BODY, upstream_pool

CHUNK_QUEUE = 16


@web.stream_request_body
class MlflowProxyHandler(ProxyRelay, MantikMixin, JupyterHandler):
    # Per-request state of an upload, defined before ``prepare`` runs.
    _fetch: asyncio.Future[None] | None = None
    _body: asyncio.Queue[bytes | None] | None = None
    _buffered: list[bytes] | None = None
    _body_complete = False

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

    def set_signed_cookie(self, name: str, value: str | bytes, *args: Any, **kwargs: Any) -> None:
        # A client that sends its token in the Authorization header on every call (the
        # MLflow client with MLFLOW_TRACKING_TOKEN) gets no Jupyter login cookie: it would
        # never need it, yet carry it on every later call, making its HTTP library match
        # and the lab verify it each time. Not signing it also saves the lab an HMAC per
        # call. A browser that opened ``?token=`` still gets it.
        if (
            "Authorization" in self.request.headers
            and "token" not in self.request.query_arguments
            and name == self.identity_provider.get_cookie_name(self)
        ):
            return
        super().set_signed_cookie(name, value, *args, **kwargs)

    # Jupyter sets its login cookie under tornado's older name for the same method.
    set_secure_cookie = set_signed_cookie

    def _same_origin(self) -> bool:
        origin = self.request.headers.get("Origin")
        if origin:
            return urlsplit(origin).netloc == self.request.host
        return self.request.headers.get("Sec-Fetch-Site") == "same-origin"

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        await self.check_authorized()
        # The raw path keeps its percent-encoding (artifact names with spaces or slashes).
        self._prefix = self.proxy_prefix()
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
        request = await self.upstream_request(path)
        method = request.method
        length = self.request.headers.get("Content-Length", "").strip()
        chunked = "chunked" in self.request.headers.get("Transfer-Encoding", "").lower()
        if method in BODY_METHODS and (chunked or length not in ("", "0")):
            self.request.connection.set_max_body_size(MAX_BODY)  # type: ignore[union-attr]
            size = named_length(self.request.headers)
            if size is not None and size <= BUFFER_LIMIT:
                self._buffered = []
            else:
                self._body = asyncio.Queue(maxsize=CHUNK_QUEUE)
                request.body_producer = self._produce
                request.stall_timeout = self.mantik.upload_stall_timeout
                # Streaming starts now, while the body is still arriving.
                self._fetch = asyncio.ensure_future(
                    upstream_pool().exchange(self._origin, request, Relay(self))
                )
                self._fetch.add_done_callback(self._exchange_ended)

    async def data_received(self, chunk: bytes) -> None:
        if self._buffered is not None:
            self._buffered.append(chunk)
        elif self._body is not None and self._fetch is not None and not self._fetch.done():
            await self._body.put(chunk)

    def _exchange_ended(self, fetch: asyncio.Future[None]) -> None:
        # The exchange ended before the upload did (the tracking server refused it
        # early): the rest of the body has nowhere to go, and must not wait for room.
        assert self._body is not None and self._request is not None
        while not self._body.empty():
            self._body.get_nowait()
        if fetch.cancelled() or self._body_complete or self._finished or self._request.aborted:
            return  # ``_proxy`` or ``on_connection_close`` deals with the end
        error = fetch.exception()
        if error is None:
            return  # an early answer, relayed: it is finished once the body is in
        # The upload broke off (reset, stall) while the client is still sending: it is
        # told now, not after sending the rest for nothing. tornado then closes the
        # connection, the only way not to read the rest (curl stops at the answer;
        # urllib3, under requests and MLflow's client, reads it when its send fails).
        if self._started:
            self._cut_off(error)
            return
        embedded = self.mantik.tracking.embedded_server
        if embedded is not None:
            embedded.report_unanswered()  # a crashed or hung embedded server is restarted
        failure = self._failure(error)
        self.log_exception(type(failure), failure, None)
        self.clear()
        self.set_header("Connection", "close")
        self.write_error(failure.status, exc_info=(type(failure), failure, None))

    async def _produce(self, write: Any) -> None:
        assert self._body is not None
        while (chunk := await self._body.get()) is not None:
            await write(chunk)

    @web.authenticated
    async def _proxy(self, *args: Any) -> None:
        self._body_complete = True
        if self._request is None or self._finished:
            return  # redirected in prepare, or the upload's failure was answered already
        if self._fetch is None:
            if self._buffered is not None:
                self._request.body = b"".join(self._buffered)
            await self.answer(upstream_pool().exchange(self._origin, self._request, Relay(self)))
        else:
            await self.answer(self._end_upload())

    async def _end_upload(self) -> None:
        assert self._body is not None and self._fetch is not None
        await self._body.put(None)
        await self._fetch

    def on_finish(self) -> None:
        if getattr(self, "_jupyter_current_user", None):
            self.note_activity()
        super().on_finish()

    def on_connection_close(self) -> None:
        # A streamed upload's task is cancelled as well: once tornado gives up on the
        # body nobody awaits it, and a failed task would be reported when collected.
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
        if self._body is not None and not self._body.full():
            self._body.put_nowait(None)
        super().on_connection_close()

    get = post = put = patch = delete = head = options = _proxy


handlers = [(PROXY_PATH.rstrip("/") + "/?(.*)", MlflowProxyHandler)]
