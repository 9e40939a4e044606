"""What both routes of the MLflow proxy share: the call as the tracking server gets it,
its answer relayed as it arrives, and what the client is told when no answer comes.

The routes differ only in how a call is admitted (``mlflow_proxy.py``: Jupyter's own
authentication, for browsers and streamed uploads; ``token_proxy.py``: calls that carry
the lab's token and nothing else Jupyter would weigh).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from jupyter_server.utils import url_path_join
from tornado import httputil

from ..errors import MantikError, TrackingTimeout, TrackingUnavailable, UnsafePath
from ..tracking.tls import certificate_hint
from .upstream import NoAnswer, Origin, UploadInterrupted, UploadStalled, UpstreamRequest
from .upstream_http import UpstreamProtocolError

if TYPE_CHECKING:
    from ..app import MantikApp

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
# Seconds after which a request the embedded tracking server has not begun to answer is
# reported: the lab then checks the server and restarts it if it hangs. The proxy itself
# gives no request up (a large search or download may take long).
UNANSWERED_AFTER = 10.0
PROXY_PATH = "mantik/mlflow/"


def named_length(headers: httputil.HTTPHeaders) -> int | None:
    """The body's length that a call's ``Content-Length`` names; None without one, or for
    a value that is no number of bytes ('12, 12'; '\u00b2', a digit to ``str.isdigit``
    that ``int`` refuses)."""
    length = headers.get("Content-Length", "").strip()
    return int(length) if length.isascii() and length.isdigit() else None


@functools.lru_cache(maxsize=8)
def _split_upstream(uri: str) -> tuple[Origin, str]:
    """Where the tracking server listens, and the path it is mounted under."""
    return Origin.of(uri), urlsplit(uri).path.rstrip("/")


class Relay(httputil.HTTPMessageDelegate):
    """Hands the upstream's response to the client as it arrives."""

    def __init__(self, handler: Any) -> None:
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


class ProxyRelay:
    """A tornado ``RequestHandler`` mixin: one call relayed to the tracking server.

    The handler class provides ``mantik`` (the extension app), ``log`` and
    ``in_thread``."""

    mantik: MantikApp
    # Per-request state, defined before ``prepare`` runs: the client may go away
    # while the call is still being admitted (``on_connection_close``).
    _request: UpstreamRequest | None = None
    _started = False
    _watchdog: asyncio.TimerHandle | None = None
    _prefix = ""
    _upstream = ""
    _origin: Origin

    def proxy_prefix(self) -> str:
        """``{base_url}mantik/mlflow/``: what the lab's paths start with."""
        return url_path_join(self.settings.get("base_url", "/"), PROXY_PATH)  # type: ignore[attr-defined]

    async def upstream_request(self, path: str) -> UpstreamRequest:
        """The call as the tracking server gets it: its path under the server's own, the
        client's headers but its credentials, and the lab's credential."""
        if ".." in unquote(path).split("/"):
            # A server mounted under a path (https://apps.example.org/mlflow) sits behind a
            # web server that resolves '..': the call, with the lab's credential, would
            # reach whatever else that server serves.
            raise UnsafePath(
                f"The path {path!r} climbs with '..' above the tracking server's; the MLflow "
                "proxy passes only paths below it."
            )
        tracking = self.mantik.tracking
        if not tracking.ready:
            await self.in_thread(tracking.wait_ready)  # type: ignore[attr-defined]
        credential = tracking.require_credential()
        self._upstream = tracking.uri
        self._origin, base_path = _split_upstream(self._upstream)
        request: httputil.HTTPServerRequest = self.request  # type: ignore[attr-defined]
        target = f"{base_path}/{path}"
        if request.query:
            target += f"?{request.query}"
        headers = httputil.HTTPHeaders()
        for name, value in request.headers.get_all():
            if name.lower() not in DROP_REQUEST:
                headers.add(name, value)
        headers["Host"] = self._origin.netloc
        if "Origin" in headers:
            headers["Origin"] = f"{self._origin.scheme}://{self._origin.netloc}"
        headers["Authorization"] = credential.auth_header()
        headers["X-Forwarded-Prefix"] = self._prefix.rstrip("/")
        self._request = UpstreamRequest(request.method or "GET", target, headers)
        return self._request

    async def answer(self, exchange: Awaitable[None]) -> None:
        """Await the exchange with the tracking server, and end the client's answer."""
        assert self._request is not None
        error: BaseException | None = None
        embedded = self.mantik.tracking.embedded_server
        if embedded is not None:
            # From when the whole request is out: an upload's own time does not count.
            self._watchdog = asyncio.get_running_loop().call_later(
                UNANSWERED_AFTER, embedded.report_unanswered
            )
        try:
            # Awaited here, not in a task of its own: the request goes upstream in this
            # loop turn, and once it is out the lab has nothing left to do until the
            # answer comes (work after sending would compete with the tracking server
            # for the CPU). A call's latency is what the proxy adds.
            await exchange
        except OSError as exc:  # ConnectionError and TimeoutError among them
            error = exc
        finally:
            self._stop_watchdog()
        if self._request.aborted:
            return  # the client went away: nobody to answer
        if error is not None and embedded is not None:
            embedded.report_unanswered()
        if self._started:
            if error is None:
                self.finish()  # type: ignore[attr-defined]
            else:
                self._cut_off(error)
            return
        raise self._failure(error)

    def start_response(self, status: int, reason: str, headers: httputil.HTTPHeaders) -> None:
        self._started = True
        self._stop_watchdog()
        self.set_status(status, reason or None)  # type: ignore[attr-defined]
        self.clear_header("Content-Type")  # type: ignore[attr-defined]
        seen: set[str] = set()
        for name, value in headers.get_all():
            lname = name.lower()
            if lname in DROP_RESPONSE or lname.startswith("access-control-"):
                continue
            if lname == "location":
                value = self._rewrite_location(value)
            # The upstream's value replaces the lab's default; repeated headers add up.
            if lname in seen:
                self.add_header(name, value)  # type: ignore[attr-defined]
            else:
                self.set_header(name, value)  # type: ignore[attr-defined]
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
        method = self.request.method  # type: ignore[attr-defined]
        if isinstance(error, NoAnswer):
            return TrackingUnavailable(
                f"The tracking server {self._upstream} closed the connection without "
                f"answering {method} {self._api_path()} "
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
        return "/" + self.request.path[len(self._prefix) :]  # type: ignore[attr-defined]

    def _sent(self, sent: int) -> str:
        length = named_length(self.request.headers)  # type: ignore[attr-defined]
        total = f" of {length / 2**20:.1f} MB" if length is not None else " MB"
        return f"{sent / 2**20:.1f}{total}"

    def _cut_off(self, error: BaseException) -> None:
        # The tracking server broke off its answer. Ending it in order (a chunked
        # answer's last chunk) would hand the client a short copy that looks whole:
        # the client's connection is closed instead, so that it sees the answer cut off.
        request = self.request  # type: ignore[attr-defined]
        self.log.warning(  # type: ignore[attr-defined]
            "%s %s: the tracking server %s broke off its answer (%s); the client's "
            "connection was closed so that it does not take the part it got for the whole.",
            request.method, request.path, self._upstream, type(error).__name__,
        )  # fmt: skip
        request.connection.close()
        self.finish()  # type: ignore[attr-defined]  # writes nothing more; logs the request

    def note_activity(self) -> None:
        # Working in the MLflow UI or with the MLflow client through the lab is use of
        # the lab, as Jupyter's own API calls are (same rule as ``APIHandler``): a
        # JupyterHub idle culler must not stop a lab that is in use only through here.
        if "no_track_activity" not in self.request.query_arguments:  # type: ignore[attr-defined]
            self.settings["api_last_activity"] = datetime.now(UTC)  # type: ignore[attr-defined]

    def on_connection_close(self) -> None:
        self._stop_watchdog()
        # The upstream connection is closed with the client's, also mid-answer.
        if self._request is not None:
            self._request.abort()
        super().on_connection_close()  # type: ignore[misc]
