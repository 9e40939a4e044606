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
import functools
import ssl
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import httputil, web

from ..errors import MantikError, TrackingTimeout, TrackingUnavailable
from ..tracking.tls import certificate_hint
from .base import MantikMixin
from .upstream import (
    MAX_BODY,
    NoAnswer,
    Origin,
    UploadInterrupted,
    UploadStalled,
    UpstreamRequest,
    upstream_pool,
)
from .upstream_http import UpstreamProtocolError

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
# Browser credentials of the lab must not reach MLflow. ``Expect: 100-continue`` was
# answered by the lab already.
DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "cookie",
    "authorization",
    "x-xsrftoken",
    "x-csrftoken",
    "referer",
    "expect",
}
# A 401 challenge would make the browser pop a password dialog; cookies of the
# upstream must not land on the lab's origin.
# CORS headers are dropped: the lab and the proxied UI share one origin.
DROP_RESPONSE = HOP_BY_HOP | {"set-cookie", "www-authenticate", "server", "date"}

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Bodies up to this size (MLflow API calls) are collected before they are sent, so a
# request can be repeated when a kept-alive connection turns out closed; larger or
# chunked ones (artifact uploads) stream.
BUFFER_LIMIT = 1 << 20
CHUNK_QUEUE = 16
# Seconds after which a request the embedded tracking server has not begun to answer is
# reported: the lab then checks the server and restarts it if it hangs. The proxy itself
# gives no request up (a large search or download may take long).
UNANSWERED_AFTER = 10.0


@functools.lru_cache(maxsize=8)
def _split_upstream(uri: str) -> tuple[Origin, str]:
    """Where the tracking server listens, and the path it is mounted under."""
    return Origin.of(uri), urlsplit(uri).path.rstrip("/")


class _Relay(httputil.HTTPMessageDelegate):
    """Hands the upstream's response to the browser as it arrives."""

    def __init__(self, handler: MlflowProxyHandler) -> None:
        self.handler = handler

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        if start_line.code >= 200:  # 1xx are interim answers
            self.handler.start_response(start_line.code, start_line.reason, headers)

    def data_received(self, chunk: bytes) -> Any:
        self.handler.write(chunk)
        return self.handler.flush()


@web.stream_request_body
class MlflowProxyHandler(MantikMixin, JupyterHandler):
    # Per-request state, defined before ``prepare`` runs: the browser may go away
    # while Jupyter is still authenticating (``on_connection_close``).
    _request: UpstreamRequest | None = None
    _fetch: asyncio.Future[None] | None = None
    _body: asyncio.Queue[bytes | None] | None = None
    _buffered: list[bytes] | None = None
    _started = False
    _body_complete = False
    _watchdog: asyncio.TimerHandle | None = None

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
        self._upstream = tracking.uri
        self._origin, base_path = _split_upstream(self._upstream)
        target = f"{base_path}/{path}"
        if self.request.query:
            target += f"?{self.request.query}"
        headers = httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() not in DROP_REQUEST:
                headers.add(name, value)
        headers["Host"] = self._origin.netloc
        if "Origin" in headers:
            headers["Origin"] = f"{self._origin.scheme}://{self._origin.netloc}"
        headers["Authorization"] = credential.auth_header()
        headers["X-Forwarded-Prefix"] = self._prefix.rstrip("/")
        method = self.request.method or "GET"
        self._request = UpstreamRequest(method, target, headers)
        length = self.request.headers.get("Content-Length", "").strip()
        chunked = "chunked" in self.request.headers.get("Transfer-Encoding", "").lower()
        if method in BODY_METHODS and (chunked or length not in ("", "0")):
            self.request.connection.set_max_body_size(MAX_BODY)  # type: ignore[union-attr]
            if length.isdigit() and int(length) <= BUFFER_LIMIT:
                self._buffered = []
            else:
                self._body = asyncio.Queue(maxsize=CHUNK_QUEUE)
                self._request.body_producer = self._produce
                self._request.stall_timeout = self.mantik.upload_stall_timeout
                # Streaming starts now, while the body is still arriving.
                self._fetch = asyncio.ensure_future(
                    upstream_pool().exchange(self._origin, self._request, _Relay(self))
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

    def start_response(self, status: int, reason: str, headers: httputil.HTTPHeaders) -> None:
        self._started = True
        self._stop_watchdog()
        self.set_status(status, reason or None)
        self.clear_header("Content-Type")
        seen: set[str] = set()
        for name, value in headers.get_all():
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

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _rewrite_location(self, value: str) -> str:
        # MLflow's redirects name its internal address; point them at the proxy.
        if value.startswith(self._upstream):
            return self._prefix.rstrip("/") + value[len(self._upstream) :]
        return value

    @web.authenticated
    async def _proxy(self, *args: Any) -> None:
        self._body_complete = True
        if self._request is None or self._finished:
            return  # redirected in prepare, or the upload's failure was answered already
        error: BaseException | None = None
        embedded = self.mantik.tracking.embedded_server
        if embedded is not None:
            # From when the whole request is out: an upload's own time does not count.
            self._watchdog = asyncio.get_running_loop().call_later(
                UNANSWERED_AFTER, embedded.report_unanswered
            )
        try:
            if self._fetch is None:
                if self._buffered is not None:
                    self._request.body = b"".join(self._buffered)
                # Awaited here, not in a task of its own: the request goes upstream in
                # this loop turn, and once it is out the lab has nothing left to do
                # until the answer comes (work after sending would compete with the
                # tracking server for the CPU). A call's latency is what the proxy adds.
                await upstream_pool().exchange(self._origin, self._request, _Relay(self))
            else:
                assert self._body is not None
                await self._body.put(None)
                await self._fetch
        except OSError as exc:  # ConnectionError and TimeoutError among them
            error = exc
        finally:
            self._stop_watchdog()
        if self._request.aborted:
            return  # the browser went away: nobody to answer
        if error is not None and embedded is not None:
            embedded.report_unanswered()
        if self._started:
            if error is None:
                self.finish()
            else:
                self._cut_off(error)
            return
        raise self._failure(error)

    def _failure(self, error: BaseException | None) -> MantikError:
        """What the client is told when no answer came."""
        if isinstance(error, UploadStalled):
            return TrackingTimeout(
                f"The tracking server {self._upstream} took none of the upload for "
                f"{error.seconds:g} s, after {self._sent(error.sent)} had been sent: the "
                "upload was given up and did not complete. Retry it; if it stalls again, "
                "check the tracking server and the storage it writes artifacts to."
            )
        if isinstance(error, UploadInterrupted):
            return TrackingUnavailable(
                f"The connection to the tracking server {self._upstream} was lost during "
                f"the upload ({type(error.cause).__name__}), after {self._sent(error.sent)} "
                "had been sent: the upload did not complete. Retry it; if it fails again, "
                "check the tracking server (and any proxy in front of it) for an upload "
                "size limit or an error."
            )
        if isinstance(error, NoAnswer):
            return TrackingUnavailable(
                f"The tracking server {self._upstream} closed the connection without "
                f"answering {self.request.method} {self._api_path()} "
                f"({type(error.cause).__name__}): it may have stopped or crashed while "
                "handling it, so a call that changes data may or may not have taken effect. "
                "Retry it; if it fails again, check the tracking server's log."
            )
        if isinstance(error, UpstreamProtocolError):
            return TrackingUnavailable(
                f"The tracking server {self._upstream} answered with something that is not "
                f"HTTP/1.1 ({error}). Check that this address is an MLflow server's, and "
                "that an https:// server is not addressed as http://."
            )
        if isinstance(error, ssl.SSLCertVerificationError):
            return TrackingUnavailable(certificate_hint(self._upstream))
        return TrackingUnavailable(
            f"The tracking server {self._upstream} cannot be reached "
            f"({type(error).__name__ if error else 'no response'}). Check that it runs."
        )

    def _api_path(self) -> str:
        """The call's path as the tracking server knows it, without the lab's prefix."""
        return "/" + self.request.path[len(self._prefix) :]

    def _sent(self, sent: int) -> str:
        length = self.request.headers.get("Content-Length", "").strip()
        total = f" of {int(length) / 2**20:.1f} MB" if length.isdigit() else " MB"
        return f"{sent / 2**20:.1f}{total}"

    def _cut_off(self, error: BaseException) -> None:
        # The tracking server broke off its answer. Ending it in order (a chunked
        # answer's last chunk) would hand the client a short copy that looks whole:
        # the client's connection is closed instead, so that it sees the answer cut off.
        self.log.warning(
            "%s %s: the tracking server %s broke off its answer (%s); the client's "
            "connection was closed so that it does not take the part it got for the whole.",
            self.request.method, self.request.path, self._upstream, type(error).__name__,
        )  # fmt: skip
        self.request.connection.close()  # type: ignore[union-attr]
        self.finish()  # writes nothing more (the connection is closed); logs the request

    def on_finish(self) -> None:
        # Working in the MLflow UI or with the MLflow client through the lab is use of
        # the lab, as Jupyter's own API calls are (same rule as ``APIHandler``): a
        # JupyterHub idle culler must not stop a lab that is in use only through here.
        if (
            getattr(self, "_jupyter_current_user", None)
            and "no_track_activity" not in self.request.query_arguments
        ):
            self.settings["api_last_activity"] = datetime.now(UTC)
        super().on_finish()

    def on_connection_close(self) -> None:
        self._stop_watchdog()
        # The upstream connection is closed with the browser's, also mid-answer.
        if self._request is not None:
            self._request.abort()
        # A streamed upload's task is cancelled as well: once tornado gives up on the
        # body nobody awaits it, and a failed task would be reported when collected.
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
        if self._body is not None and not self._body.full():
            self._body.put_nowait(None)
        super().on_connection_close()

    get = post = put = patch = delete = head = options = _proxy


handlers = [(r"mantik/mlflow/?(.*)", MlflowProxyHandler)]
