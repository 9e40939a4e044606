"""Keep-alive HTTP/1.1 connections from the lab to the tracking server.

tornado's own HTTP clients open a new connection per request (``simple_httpclient``)
or need pycurl. Through the MLflow proxy every call would then pay a TCP (and TLS)
handshake plus the tracking server's per-connection set-up, a third of what the
proxy adds to a small MLflow call. This pool keeps a few idle connections per
upstream for a short while; what is said on one is in ``upstream_http.py``.

Reusing a connection has one classic race: the server may close it while it sits
idle. Three things keep that from reaching a user:

- a connection idle longer than ``idle_seconds`` (well below the keep-alive
  timeouts of uvicorn (5 s), gunicorn (2 s) and nginx (75 s)) is never reused;
- an idle connection that the server closed, or that received anything unasked,
  is dropped at once (the protocol is told);
- a request whose body is in memory is sent again on a new connection when a
  reused one fails before any byte of the response came back (what browsers do).
  Streamed bodies (uploads of unknown or large size) always get a new connection.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tornado import httputil

from ..tracking import tls
from .upstream_http import (
    BodyProducer,
    Connection,
    UpstreamProtocolError,
    Watch,
    read_response,
    request_head,
    send_body,
)

MAX_BODY = 1 << 40
IDLE_SECONDS = 1.0
MAX_IDLE_PER_ORIGIN = 8
CONNECT_TIMEOUT = 10.0
# Seconds a streamed body may wait for the tracking server to read on: nginx's
# proxy_send_timeout. Between two reads, not for the whole upload.
STALL_TIMEOUT = 60.0


class UploadInterrupted(ConnectionError):
    """The connection to the tracking server broke while a streamed body was being sent,
    before any answer: the server has an incomplete body, if anything."""

    def __init__(self, sent: int, cause: BaseException) -> None:
        super().__init__(f"connection lost after {sent} bytes of the body: {cause!r}")
        self.sent = sent
        self.cause = cause


class UploadStalled(TimeoutError):
    """The tracking server stopped reading a streamed body and did not answer."""

    def __init__(self, sent: int, seconds: float) -> None:
        super().__init__(f"no byte of the body was read for {seconds:g} s after {sent} bytes")
        self.sent = sent
        self.seconds = seconds


class NoAnswer(ConnectionError):
    """The tracking server had the whole request but closed the connection before its
    answer began: it was reached, and may have acted on the request."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the connection was closed before an answer came: {cause!r}")
        self.cause = cause


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        """The value of a ``Host`` header naming this origin."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        return cls(scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))


@dataclass
class UpstreamRequest:
    method: str
    target: str  # path and query, as sent on the request line
    headers: httputil.HTTPHeaders
    body: bytes | None = None  # in memory: may be sent again on a fresh connection
    body_producer: BodyProducer | None = None  # streamed: sent once, on a new connection
    stall_timeout: float | None = None  # for a streamed body; None: the pool's
    aborted: bool = False
    _conn: Connection | None = field(default=None, repr=False)

    def abort(self) -> None:
        """Give the exchange up (the client went away): its connection is closed at once,
        whatever the upstream is doing, and the request is not sent again."""
        self.aborted = True
        if self._conn is not None:
            self._conn.close()


class UpstreamPool:
    """Idle keep-alive connections per origin, for one event loop."""

    def __init__(
        self,
        idle_seconds: float = IDLE_SECONDS,
        max_idle: int = MAX_IDLE_PER_ORIGIN,
        connect_timeout: float = CONNECT_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.opened = 0  # connections opened so far: what tests and benchmarks look at
        self._idle: dict[Origin, list[Connection]] = {}
        self._prune_timer: asyncio.TimerHandle | None = None

    async def exchange(
        self, origin: Origin, request: UpstreamRequest, delegate: httputil.HTTPMessageDelegate
    ) -> None:
        """Send ``request`` and hand the response to ``delegate``.

        Raises ``OSError`` (``ConnectionError``, ``TimeoutError``, an ``ssl`` error)
        when the upstream cannot be reached or drops the connection; ``UploadInterrupted``
        or ``UploadStalled`` when that happens to a streamed body that is not all sent;
        ``NoAnswer`` when it had the whole request and closed before answering;
        ``UpstreamProtocolError`` when its answer is not HTTP/1.1.
        """
        if request.aborted:
            raise ConnectionAbortedError("the request was given up")
        conn = None if request.body_producer else self._take(origin)
        if conn is not None:
            watch = Watch(delegate)
            try:
                await self._send(origin, conn, request, watch)
                return
            except ConnectionError:
                if conn.answered or request.aborted:
                    raise
                # The server closed the idle connection as the request went out:
                # nothing of it was answered, so it is sent again on a new one.
        conn = await self._connect(origin)
        await self._send(origin, conn, request, Watch(delegate))

    async def _send(
        self, origin: Origin, conn: Connection, request: UpstreamRequest, watch: Watch
    ) -> None:
        done = False
        request._conn = conn
        try:
            if request.aborted:  # while the connection was being opened
                raise ConnectionAbortedError("the request was given up")
            conn.expect_response()
            streamed = request.body_producer is not None
            head = request_head(
                request.method, request.target, request.headers, request.body, streamed
            )
            conn.write(head + (request.body or b""))
            if request.body_producer is not None:
                stall = request.stall_timeout
                if stall is None:
                    stall = self.stall_timeout
                try:
                    await send_body(conn, request.body_producer, request.headers, stall)
                except TimeoutError:
                    raise UploadStalled(conn.body_sent, stall) from None
                except ConnectionError as exc:
                    if not conn.answered:
                        raise UploadInterrupted(conn.body_sent, exc) from exc
                    # The server answered before it took the whole body (it refused it,
                    # often closing at once): that answer is the client's, not the error.
                    conn.spoiled = True
            try:
                done = await read_response(conn, request.method, watch)
            except UpstreamProtocolError:
                raise
            except ConnectionError as exc:
                if watch.final or request.aborted:
                    raise
                raise NoAnswer(exc) from exc
        finally:
            request._conn = None
            reuse = done and watch.reusable and not request.aborted
            if reuse and not conn.closed() and not conn.spoiled:
                self._give(origin, conn)
            else:
                conn.close()

    async def _connect(self, origin: Origin) -> Connection:
        context = tls.ssl_context() if origin.scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            connecting = loop.create_connection(
                Connection, origin.host, origin.port, ssl=context, happy_eyeballs_delay=0.3
            )
        except TypeError:  # a lab on uvloop, whose loop has no happy eyeballs
            connecting = loop.create_connection(Connection, origin.host, origin.port, ssl=context)
        _, conn = await asyncio.wait_for(connecting, self.connect_timeout)
        self.opened += 1
        return conn

    def _take(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.idle_seconds and not conn.closed():
                return conn
            conn.close()
        return None

    def _give(self, origin: Origin, conn: Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        # Idle sockets are closed soon after they expire, not only on the next request.
        if self._prune_timer is None:
            self._prune_timer = asyncio.get_running_loop().call_later(
                self.idle_seconds * 2, self._prune
            )

    def _prune(self) -> None:
        self._prune_timer = None
        now = time.monotonic()
        for origin, idle in self._idle.items():
            fresh = []
            for conn in idle:
                if now - conn.idle_since < self.idle_seconds and not conn.closed():
                    fresh.append(conn)
                else:
                    conn.close()
            self._idle[origin] = fresh
        if any(self._idle.values()):
            self._prune_timer = asyncio.get_running_loop().call_later(
                self.idle_seconds, self._prune
            )

    def close(self) -> None:
        if self._prune_timer is not None:
            self._prune_timer.cancel()
            self._prune_timer = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, UpstreamPool] = (
    weakref.WeakKeyDictionary()
)


def upstream_pool() -> UpstreamPool:
    """The pool of the running event loop (connections belong to one loop)."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = UpstreamPool()
    return pool
