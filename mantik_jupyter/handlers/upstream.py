"""Keep-alive HTTP/1.1 connections from the lab to the tracking server.

tornado's own HTTP clients open a new connection per request (``simple_httpclient``)
or need pycurl. Through the MLflow proxy every call would then pay a TCP (and TLS)
handshake plus the tracking server's per-connection set-up, a third of what the
proxy adds to a small MLflow call. This pool keeps a few idle connections per
upstream for a short while. Each is an asyncio protocol that parses answers as they
arrive with httptools (llhttp, the parser of Node.js and uvicorn): against tornado's
``IOStream`` and pure-Python ``HTTP1Connection``, 0.04–0.14 ms less per proxied call in
``bench/proxy.py``. The protocol also learns at once when an idle connection is closed.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
from tornado import httputil

from ..tracking import tls

MAX_BODY = 1 << 40
IDLE_SECONDS = 1.0
MAX_IDLE_PER_ORIGIN = 8
CONNECT_TIMEOUT = 10.0
MAX_HEADER = 1 << 20
# Reading stops while this much of an answer waits for a slow client (a 1 GB artifact
# download must not pile up in the lab's memory).
PAUSE_READING_AT = 1 << 20

# Methods whose requests carry a length even when empty (servers wait for one).
LENGTH_EXPECTED = frozenset({"POST", "PUT", "PATCH"})

BodyProducer = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


class UpstreamProtocolError(ConnectionError):
    """The tracking server's answer was not HTTP/1.1 this pool can read."""


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
    _conn: _Connection | None = field(default=None, repr=False)

    def abort(self) -> None:
        """Give the exchange up (the client went away): its connection is closed at once,
        whatever the upstream is doing, and the request is not sent again."""
        self.aborted = True
        if self._conn is not None:
            self._conn.close()


class _Watch(httputil.HTTPMessageDelegate):
    """Passes a response on and notes what connection reuse depends on."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate) -> None:
        self.delegate = delegate
        self.delimited = True  # False: the body ends when the server closes the connection
        self.reusable = False

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        if start_line.code >= 200:
            self.delimited = (
                "Content-Length" in headers
                or "chunked" in headers.get("Transfer-Encoding", "").lower()
                or start_line.code in (204, 304)
            )
            self.reusable = (
                start_line.version == "HTTP/1.1"
                and "close" not in headers.get("Connection", "").lower()
                and self.delimited
            )
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.reusable = False
        self.delegate.on_connection_close()


def _request_head(request: UpstreamRequest, chunked: bool) -> bytes:
    """The request line and headers. The framing is this pool's: a length the caller
    names is kept only for a streamed body, which is sent as it comes."""
    streamed = request.body_producer is not None
    lines = [f"{request.method} {request.target} HTTP/1.1"]
    for name, value in request.headers.get_all():
        lname = name.lower()
        if lname == "transfer-encoding" or (lname == "content-length" and not streamed):
            continue
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif not streamed and (request.body or request.method in LENGTH_EXPECTED):
        lines.append(f"Content-Length: {len(request.body or b'')}")
    head = "\r\n".join(lines)
    if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
        # A header value with a line break would smuggle a header (or a request) in.
        raise ValueError("line break in a request header for the tracking server")
    return (head + "\r\n\r\n").encode("latin-1")


class _Connection(asyncio.Protocol):
    """One connection to the tracking server. Answers are parsed as they arrive and
    queued as events, so that the delegate can be awaited between them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._lost = False
        self._error: BaseException | None = None
        self._parser: httptools.HttpResponseParser | None = None  # None: nothing asked
        self.answered = False  # some byte of the answer came: the request was seen
        self._final = False  # the answer's head is the final (>= 200) one
        self._complete = False  # the final answer has ended
        self.spoiled = False  # more came than was asked for: never reuse
        self._events: list[tuple[str, Any]] = []
        self._queued = 0
        self._head_bytes = 0
        self._headers = httputil.HTTPHeaders()
        self._reason = b""
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    def closed(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # at once, with whatever is still buffered

    # -- sending

    def write(self, data: bytes) -> None:
        self._check_sending()
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self._drained is not None:
            await self._drained
        self._check_sending()

    def _check_sending(self) -> None:
        if self.closed():
            raise self._closed_error()
        if self._complete:  # a server that answered mid-body may not read the rest
            raise ConnectionAbortedError("the tracking server answered before the whole body")

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- receiving

    def expect_response(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events, self._queued, self._head_bytes = [], 0, 0
        self._headers, self._reason = httputil.HTTPHeaders(), b""
        self.answered = self._final = self._complete = False

    def done_with_response(self) -> None:
        self._parser = None
        if self._events:
            self.spoiled = True

    async def events(self) -> list[tuple[str, Any]]:
        """What arrived since the last call; raises once the connection is gone."""
        while not self._events:
            if self._lost:
                raise self._closed_error()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        events, self._events, self._queued = self._events, [], 0
        if self._paused and not self._lost:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self._complete:  # unasked: the connection cannot be trusted
            self.spoiled = True
            self.close()
            return
        self.answered = True
        # Counted as read, not as body: a body of tiny chunks weighs more than its bytes.
        self._queued += len(data)
        if self._head_bytes >= 0:  # still in the headers
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER:
                self._fail(UpstreamProtocolError("the tracking server's headers are too long"))
                return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamProtocolError(f"malformed answer from the tracking server: {exc}"))
            return
        if self._queued > PAUSE_READING_AT and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._error is None:
            self._error = exc
        self.resume_writing()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def closed_cleanly(self) -> bool:
        """The server ended the connection in order (not reset, not a broken answer)."""
        return self._lost and self._error is None

    def _closed_error(self) -> BaseException:
        return self._error or ConnectionResetError("the tracking server closed the connection")

    # -- httptools' callbacks

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer to one request
            self.spoiled = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._final:
            return  # a chunked body's trailer: nothing a relay passes on
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        version = f"HTTP/{self._parser.get_http_version()}"
        code = self._parser.get_status_code()
        start = httputil.ResponseStartLine(version, code, self._reason.decode("latin-1"))
        self._events.append(("head", (start, self._headers)))
        self._headers, self._reason = httputil.HTTPHeaders(), b""
        self._final = code >= 200
        self._head_bytes = -1 if self._final else 0

    def on_body(self, body: bytes) -> None:
        self._events.append(("body", body))

    def on_message_complete(self) -> None:
        if self._final:
            self._complete = True
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)  # the body being sent is no longer wanted
        self._events.append(("done", None))


async def _read_response(conn: _Connection, method: str, watch: _Watch) -> bool:
    """Hand one response to ``watch``; True once it came complete."""
    start: httputil.ResponseStartLine | None = None
    try:
        while True:
            try:
                events = await conn.events()
            except ConnectionError:
                final = start is not None and start.code >= 200
                if final and not watch.delimited and conn.closed_cleanly():
                    watch.finish()  # a body that ends with the connection
                    return False
                raise
            for i, (kind, value) in enumerate(events, 1):
                if kind == "head":
                    start = value[0]
                    await _awaited(watch.headers_received(*value))
                    if start.code >= 200 and method == "HEAD":
                        conn.spoiled |= i < len(events)  # the length it announces is not sent
                        watch.finish()
                        return True
                elif kind == "body":
                    await _awaited(watch.data_received(value))
                elif start is not None and start.code >= 200:
                    conn.spoiled |= i < len(events)
                    watch.finish()
                    return True
                # else an interim 1xx answer is complete: the real one follows
    except BaseException:
        watch.on_connection_close()
        raise
    finally:
        conn.done_with_response()


async def _awaited(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


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
        self._idle: dict[Origin, list[_Connection]] = {}
        self._prune_timer: asyncio.TimerHandle | None = None

    async def exchange(
        self, origin: Origin, request: UpstreamRequest, delegate: httputil.HTTPMessageDelegate
    ) -> None:
        """Send ``request`` and hand the response to ``delegate``.

        Raises ``OSError`` (``ConnectionError``, ``TimeoutError``, an ``ssl`` error)
        when the upstream cannot be reached or drops the connection.
        """
        if request.aborted:
            raise ConnectionAbortedError("the request was given up")
        conn = None if request.body_producer else self._take(origin)
        if conn is not None:
            watch = _Watch(delegate)
            try:
                await self._send(origin, conn, request, watch)
                return
            except ConnectionError:
                if conn.answered or request.aborted:
                    raise
                # The server closed the idle connection as the request went out:
                # nothing of it was answered, so it is sent again on a new one.
        conn = await self._connect(origin)
        await self._send(origin, conn, request, _Watch(delegate))

    async def _send(
        self, origin: Origin, conn: _Connection, request: UpstreamRequest, watch: _Watch
    ) -> None:
        done = False
        request._conn = conn
        try:
            if request.aborted:  # while the connection was being opened
                raise ConnectionAbortedError("the request was given up")
            chunked = request.body_producer is not None and "Content-Length" not in request.headers
            conn.expect_response()
            conn.write(_request_head(request, chunked) + (request.body or b""))
            if request.body_producer is not None:

                async def write(chunk: bytes) -> None:
                    if chunk:
                        conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                        await conn.drain()

                try:
                    await request.body_producer(write)
                    if chunked:
                        conn.write(b"0\r\n\r\n")
                except ConnectionError:
                    if not conn.answered:
                        raise
                    # The server answered before it took the whole body (it refused it,
                    # often closing at once): that answer is the client's, not the error.
                    conn.spoiled = True
            done = await _read_response(conn, request.method, watch)
        finally:
            request._conn = None
            reuse = done and watch.reusable and not request.aborted
            if reuse and not conn.closed() and not conn.spoiled:
                self._give(origin, conn)
            else:
                conn.close()

    async def _connect(self, origin: Origin) -> _Connection:
        context = tls.ssl_context() if origin.scheme == "https" else None
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                _Connection, origin.host, origin.port, ssl=context, happy_eyeballs_delay=0.3
            ),
            self.connect_timeout,
        )
        self.opened += 1
        return conn

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.idle_seconds and not conn.closed():
                return conn
            conn.close()
        return None

    def _give(self, origin: Origin, conn: _Connection) -> None:
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
