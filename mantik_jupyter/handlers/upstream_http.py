"""HTTP/1.1 on one connection to the tracking server: the request's framing, the answer
parsed as it arrives, flow control both ways. The pool (``upstream.py``) decides which
connection a request goes on and whether it is kept.

Each connection is an asyncio protocol that parses answers with httptools (llhttp, the
parser of Node.js and uvicorn): against tornado's ``IOStream`` and pure-Python
``HTTP1Connection``, 0.04–0.14 ms less per proxied call in ``bench/proxy.py``, and the
protocol learns at once when an idle connection is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
from tornado import httputil

MAX_HEADER = 1 << 20
# Reading stops while this much of an answer waits for a slow client (a 1 GB artifact
# download must not pile up in the lab's memory).
PAUSE_READING_AT = 1 << 20

# Methods whose requests carry a length even when empty (servers wait for one).
LENGTH_EXPECTED = frozenset({"POST", "PUT", "PATCH"})

BodyProducer = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


class UpstreamProtocolError(ConnectionError):
    """The tracking server's answer was not HTTP/1.1 this proxy can read."""


class Watch(httputil.HTTPMessageDelegate):
    """Passes a response on and notes what connection reuse depends on."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate) -> None:
        self.delegate = delegate
        self.delimited = True  # False: the body ends when the server closes the connection
        self.reusable = False
        self.final = False  # the final (>= 200) answer's head was handed on

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        if start_line.code >= 200:
            self.final = True
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


def request_head(
    method: str, target: str, headers: httputil.HTTPHeaders, body: bytes | None, streamed: bool
) -> bytes:
    """The request line and headers. The framing is set here: a length the caller names
    is kept only for a streamed body (sent as it comes, chunked if no length is named)."""
    chunked = streamed and _chunked(headers)
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers.get_all():
        lname = name.lower()
        if lname == "transfer-encoding" or (lname == "content-length" and not streamed):
            continue
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif not streamed and (body or method in LENGTH_EXPECTED):
        lines.append(f"Content-Length: {len(body or b'')}")
    head = "\r\n".join(lines)
    if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
        # A header value with a line break would smuggle a header (or a request) in.
        raise ValueError("line break in a request header for the tracking server")
    return (head + "\r\n\r\n").encode("latin-1")


def _chunked(headers: httputil.HTTPHeaders) -> bool:
    """Whether a streamed body goes chunked: when no length is named for it."""
    return "Content-Length" not in headers


async def send_body(
    conn: Connection, produce: BodyProducer, headers: httputil.HTTPHeaders, stall_timeout: float
) -> None:
    """A streamed body, sent as ``produce`` hands it over and as fast as the server reads.
    ``TimeoutError`` when the server takes none of it for ``stall_timeout`` seconds."""
    chunked = _chunked(headers)

    async def write(chunk: bytes) -> None:
        if chunk:
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            conn.body_sent += len(chunk)
            await conn.drain(stall_timeout)

    await produce(write)
    if chunked:
        conn.write(b"0\r\n\r\n")


class Connection(asyncio.Protocol):
    """One connection to the tracking server. Answers are parsed as they arrive and
    queued as events, so that the delegate can be awaited between them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._lost = False
        self._error: BaseException | None = None
        self._parser: httptools.HttpResponseParser | None = None  # None: nothing asked
        self.answered = False  # some byte of the answer came: the request was seen
        self.body_sent = 0  # bytes of a streamed body handed to the connection
        self._final = False  # the answer's head is the final (>= 200) one
        self._complete = False  # the final answer has ended
        self.spoiled = False  # never reuse: more came than asked, or a body was cut short
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

    async def drain(self, timeout: float | None = None) -> None:
        if self._drained is not None:
            # A server that stops reading mid-body would otherwise hold the upload, the
            # client's connection and this one for ever: the client's bytes stop being
            # read, so the lab never even learns that the client gave up.
            async with asyncio.timeout(timeout):
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
        self.body_sent = 0

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
        # A stream transport, though not always an ``asyncio.Transport`` subclass (uvloop's).
        self.transport = cast(asyncio.Transport, transport)

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


async def read_response(conn: Connection, method: str, watch: Watch) -> bool:
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
