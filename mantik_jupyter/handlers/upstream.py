"""Keep-alive HTTP/1.1 connections from the lab to the tracking server.

tornado's own HTTP clients open a new connection per request (``simple_httpclient``)
or need pycurl. Through the MLflow proxy every call would then pay a TCP (and TLS)
handshake plus the tracking server's per-connection set-up, a third of what the
proxy adds to a small MLflow call. This pool keeps a few idle connections per
upstream for a short while and speaks HTTP/1.1 on them with tornado's
``HTTP1Connection``, the same code that parses requests on the lab's side.

Reusing a connection has one classic race: the server may close it while it sits
idle. Three things keep that from reaching a user:

- a connection idle longer than ``idle_seconds`` (well below the keep-alive
  timeouts of uvicorn (5 s), gunicorn (2 s) and nginx (75 s)) is never reused;
- before reuse the socket is polled: a closed or chattering connection is dropped;
- a request whose body is in memory is sent again on a new connection when a
  reused one fails before any byte of the response came back (what browsers do).
  Streamed bodies (uploads of unknown or large size) always get a new connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import select
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import DefaultLoopResolver, Resolver
from tornado.tcpclient import TCPClient

from ..tracking import tls

MAX_BODY = 1 << 40
IDLE_SECONDS = 1.0
MAX_IDLE_PER_ORIGIN = 8
CONNECT_TIMEOUT = 10.0

BodyProducer = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


class _LiteralFirstResolver(Resolver):
    """Answers IP literals (the embedded server's 127.0.0.1) at once; tornado's default
    resolver would hop to a thread for getaddrinfo on every new connection."""

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
    aborted: bool = False
    _stream: IOStream | None = field(default=None, repr=False)

    def abort(self) -> None:
        """Give the exchange up (the client went away): its connection is closed at once,
        whatever the upstream is doing, and the request is not sent again."""
        self.aborted = True
        if self._stream is not None:
            self._stream.close()


class _Watch(httputil.HTTPMessageDelegate):
    """Passes a response on and notes what connection reuse depends on."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate) -> None:
        self.delegate = delegate
        self.started = False
        self.reusable = False

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        if start_line.code >= 200:
            self.started = True
            delimited = (
                "Content-Length" in headers
                or "chunked" in headers.get("Transfer-Encoding", "").lower()
                or start_line.code in (204, 304)
            )
            self.reusable = (
                start_line.version == "HTTP/1.1"
                and "close" not in headers.get("Connection", "").lower()
                and delimited
            )
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.reusable = False
        self.delegate.on_connection_close()


def _dropped(stream: IOStream) -> bool:
    """True when an idle connection was closed by the server (or sent something
    unasked, which makes it unusable as well)."""
    if stream.closed() or stream.socket is None:
        return True
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class UpstreamPool:
    """Idle keep-alive connections per origin, for one event loop."""

    def __init__(
        self,
        idle_seconds: float = IDLE_SECONDS,
        max_idle: int = MAX_IDLE_PER_ORIGIN,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.opened = 0  # connections opened so far: what tests and benchmarks look at
        self._idle: dict[Origin, list[tuple[IOStream, float]]] = {}
        self._tcp = TCPClient(resolver=_LiteralFirstResolver())
        self._prune_timer: asyncio.TimerHandle | None = None
        self._params = HTTP1ConnectionParameters(
            max_body_size=MAX_BODY, max_header_size=1 << 20, decompress=False
        )

    async def exchange(
        self, origin: Origin, request: UpstreamRequest, delegate: httputil.HTTPMessageDelegate
    ) -> None:
        """Send ``request`` and hand the response to ``delegate``.

        Raises ``OSError`` (``StreamClosedError``, ``TimeoutError``, an ``ssl`` error)
        when the upstream cannot be reached or drops the connection.
        """
        if request.aborted:
            raise StreamClosedError()
        stream = None if request.body_producer else self._take(origin)
        if stream is not None:
            watch = _Watch(delegate)
            try:
                await self._send(origin, stream, request, watch)
                return
            except StreamClosedError:
                if watch.started or request.aborted:
                    raise
                # The server closed the idle connection as the request went out:
                # nothing of it was answered, so it is sent again on a new one.
        stream = await self._connect(origin)
        await self._send(origin, stream, request, _Watch(delegate))

    async def _send(
        self, origin: Origin, stream: IOStream, request: UpstreamRequest, watch: _Watch
    ) -> None:
        conn = HTTP1Connection(stream, True, self._params)
        done = False
        request._stream = stream
        try:
            if request.aborted:  # while the connection was being opened
                raise StreamClosedError()
            start = httputil.RequestStartLine(request.method, request.target, "HTTP/1.1")
            conn.write_headers(start, request.headers, request.body or None)
            if request.body_producer is not None:
                await request.body_producer(conn.write)
            conn.finish()
            done = await conn.read_response(watch)
        finally:
            request._stream = None
            if done and watch.reusable and not stream.closed() and not request.aborted:
                self._give(origin, stream)
            else:
                stream.close()

    async def _connect(self, origin: Origin) -> IOStream:
        ssl_options = tls.ssl_context() if origin.scheme == "https" else None
        stream = await self._tcp.connect(
            origin.host,
            origin.port,
            ssl_options=ssl_options,
            max_buffer_size=64 << 20,
            timeout=self.connect_timeout,
        )
        self.opened += 1
        return stream

    def _take(self, origin: Origin) -> IOStream | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            stream, since = idle.pop()
            if now - since < self.idle_seconds and not _dropped(stream):
                return stream
            stream.close()
        return None

    def _give(self, origin: Origin, stream: IOStream) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle:
            stream.close()
            return
        idle.append((stream, time.monotonic()))
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
            for stream, since in idle:
                if now - since < self.idle_seconds:
                    fresh.append((stream, since))
                else:
                    stream.close()
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
            for stream, _ in idle:
                stream.close()
        self._idle.clear()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, UpstreamPool] = (
    weakref.WeakKeyDictionary()
)


def upstream_pool() -> UpstreamPool:
    """The pool of the running event loop (IOStreams belong to one loop)."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = UpstreamPool()
    return pool
