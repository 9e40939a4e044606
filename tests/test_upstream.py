"""The proxy's keep-alive connections to the tracking server, against a real HTTP server.

The upstream here is a tornado HTTP server on loopback: it can be told to close idle
connections at once, which is the race a connection pool has to survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Iterator

import pytest
import tornado.web
from tornado import httputil
from tornado.httpserver import HTTPServer

from mantik_jupyter.handlers import upstream_http
from mantik_jupyter.handlers.upstream import (
    Origin,
    UploadInterrupted,
    UploadStalled,
    UpstreamPool,
    UpstreamRequest,
)
from mantik_jupyter.tracking.embedded import free_port
from mantik_jupyter.tracking.tls import ENV_CERT_PATH, ENV_INSECURE

from .tls_helpers import make_test_ca


class Collect(httputil.HTTPMessageDelegate):
    def __init__(self) -> None:
        self.code = 0
        self.headers = httputil.HTTPHeaders()
        self.body = b""
        self.closed = False

    def headers_received(self, start_line, headers):  # type: ignore[no-untyped-def]
        self.code, self.headers = start_line.code, headers

    def data_received(self, chunk):  # type: ignore[no-untyped-def]
        self.body += chunk

    def on_connection_close(self) -> None:
        self.closed = True


class Upstream:
    """What each request saw: the client's port tells connections apart."""

    def __init__(self, idle_timeout: float | None = None, ssl_options=None) -> None:  # type: ignore[no-untyped-def]
        self.seen: list[tuple[str, int, bytes]] = []
        seen = self.seen

        class Echo(tornado.web.RequestHandler):
            async def _reply(self, path: str) -> None:
                seen.append((path, self.request.connection.context.address[1], self.request.body))
                if path == "close":
                    self.set_header("Connection", "close")
                if path == "parts":  # no length known: the answer goes out chunked
                    self.write(b"one,")
                    await self.flush()
                    self.finish(b"two")
                    return
                if path == "slow":
                    self.write(b"x" * 1000)
                    await self.flush()
                    await asyncio.sleep(30)
                self.finish({"path": path, "body": self.request.body.decode()})

            get = post = put = _reply

        self.port = free_port()
        self.server = HTTPServer(
            tornado.web.Application([(r"/base/(.*)", Echo)]),
            idle_connection_timeout=idle_timeout,
            ssl_options=ssl_options,
        )
        self.server.listen(self.port, "127.0.0.1")
        self.origin = Origin("https" if ssl_options else "http", "127.0.0.1", self.port)

    def connections(self) -> int:
        return len({port for _, port, _ in self.seen})


@contextlib.contextmanager
def serving(up: Upstream, pool: UpstreamPool) -> Iterator[tuple[Upstream, UpstreamPool]]:
    """The upstream and the pool under test, both closed however the test ends."""
    try:
        yield up, pool
    finally:
        pool.close()
        up.server.stop()


def request(path: str, method: str = "GET", body: bytes | None = None) -> UpstreamRequest:
    headers = httputil.HTTPHeaders({"Host": "upstream"})
    if body is not None:
        headers["Content-Length"] = str(len(body))
    return UpstreamRequest(method, f"/base/{path}", headers, body=body)


async def test_sequential_requests_share_one_connection() -> None:
    with serving(Upstream(), UpstreamPool()) as (up, pool):
        for i in range(5):
            got = Collect()
            await pool.exchange(up.origin, request(f"r{i}", "POST", b'{"i": %d}' % i), got)
            expected = b'{"path": "r%d", "body": "{\\"i\\": %d}"}' % (i, i)
            assert got.code == 200 and got.body == expected
        assert up.connections() == 1 and pool.opened == 1


async def test_concurrent_requests_get_their_own_connections() -> None:
    with serving(Upstream(), UpstreamPool()) as (up, pool):
        results = [Collect() for _ in range(4)]
        await asyncio.gather(*(pool.exchange(up.origin, request("c"), r) for r in results))
        assert [r.code for r in results] == [200] * 4
        assert pool.opened == 4
        # ... and are then kept for the next burst.
        await asyncio.gather(*(pool.exchange(up.origin, request("d"), Collect()) for _ in range(4)))
        assert pool.opened == 4


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    with serving(Upstream(idle_timeout=0.05), UpstreamPool()) as (up, pool):
        await pool.exchange(up.origin, request("first"), Collect())
        await asyncio.sleep(0.3)  # the server has closed it by now
        got = Collect()
        await pool.exchange(up.origin, request("second"), got)
        assert got.code == 200 and pool.opened == 2


async def test_a_request_lost_on_a_stale_connection_is_sent_again(monkeypatch) -> None:
    # The race the poll cannot see: the server's close is still on its way when the
    # request goes out on the idle connection.
    with serving(Upstream(idle_timeout=0.05), UpstreamPool()) as (up, pool):
        await pool.exchange(up.origin, request("first"), Collect())
        await asyncio.sleep(0.3)
        # The pool has been told the connection is gone; here it behaves as if not yet.
        monkeypatch.setattr(upstream_http.Connection, "closed", lambda self: False)
        got = Collect()
        await pool.exchange(up.origin, request("again", "POST", b"payload"), got)
        assert got.code == 200 and b"payload" in got.body
        assert [p for p, _, _ in up.seen] == ["first", "again"]  # sent once, answered once
        assert pool.opened == 2


async def test_streamed_bodies_get_a_new_connection() -> None:
    with serving(Upstream(idle_timeout=0.05), UpstreamPool()) as (up, pool):
        await pool.exchange(up.origin, request("warm"), Collect())

        async def produce(write):  # type: ignore[no-untyped-def]
            for part in (b"a" * 10, b"b" * 10):
                await write(part)

        streamed = request("upload", "PUT")
        streamed.headers["Content-Length"] = "20"
        streamed.body_producer = produce
        got = Collect()
        await pool.exchange(up.origin, streamed, got)
        assert got.code == 200 and up.seen[-1][2] == b"a" * 10 + b"b" * 10
        assert pool.opened == 2


async def test_connection_close_from_the_server_is_honoured() -> None:
    with serving(Upstream(), UpstreamPool()) as (up, pool):
        await pool.exchange(up.origin, request("close"), Collect())
        await pool.exchange(up.origin, request("after"), Collect())
        assert pool.opened == 2 and up.connections() == 2


async def test_idle_connections_expire() -> None:
    with serving(Upstream(), UpstreamPool(idle_seconds=0.05)) as (up, pool):
        await pool.exchange(up.origin, request("one"), Collect())
        await asyncio.sleep(0.2)
        await pool.exchange(up.origin, request("two"), Collect())
        assert pool.opened == 2


async def test_an_abandoned_exchange_closes_its_connection() -> None:
    # The browser went away mid-response: the half-read connection must not be reused.
    with serving(Upstream(), UpstreamPool()) as (up, pool):
        got = Collect()
        task = asyncio.ensure_future(pool.exchange(up.origin, request("slow"), got))
        while not got.body:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.exchange(up.origin, request("next"), Collect())
        assert pool.opened == 2


async def test_an_unreachable_upstream_raises() -> None:
    pool = UpstreamPool()
    with pytest.raises(OSError):  # ConnectionRefusedError
        await pool.exchange(Origin("http", "127.0.0.1", free_port()), request("x"), Collect())
    assert pool.opened == 0


@pytest.mark.parametrize(
    ("url", "netloc"),
    [
        ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
        ("https://mlflow.example.org/team", "mlflow.example.org"),
        ("http://[::1]:8080", "[::1]:8080"),
        ("https://user@host:443", "host"),
    ],
)
def test_origin_of_a_tracking_uri(url: str, netloc: str) -> None:
    assert Origin.of(url).netloc == netloc


def test_origin_refuses_what_is_not_http() -> None:
    with pytest.raises(ValueError, match="file:///tmp"):
        Origin.of("file:///tmp")


async def test_expired_idle_connections_are_closed_without_a_next_request() -> None:
    with serving(Upstream(), UpstreamPool(idle_seconds=0.05)) as (up, pool):
        await pool.exchange(up.origin, request("one"), Collect())
        [conn] = pool._idle[up.origin]
        await asyncio.sleep(0.3)
        assert conn.closed() and pool._idle[up.origin] == []


async def test_https_upstreams_are_verified_against_the_configured_ca(
    tmp_path, monkeypatch
) -> None:
    ca = make_test_ca(tmp_path)
    with serving(Upstream(ssl_options=ca.server_context()), UpstreamPool()) as (up, pool):
        monkeypatch.delenv(ENV_CERT_PATH, raising=False)
        monkeypatch.delenv(ENV_INSECURE, raising=False)
        with pytest.raises(ssl.SSLCertVerificationError):
            await pool.exchange(up.origin, request("untrusted"), Collect())
        monkeypatch.setenv(ENV_CERT_PATH, str(ca.ca_pem))
        for _ in range(3):
            got = Collect()
            await pool.exchange(up.origin, request("trusted"), got)
            assert got.code == 200
        assert pool.opened == 1  # TLS sessions are kept alive too


RESET = object()


class Canned:
    """A raw loopback server that answers each request with the next canned bytes, for
    what a tornado server will not send: interim answers, bodies ended by closing,
    broken answers. ``None`` in the script closes the connection after answering,
    ``RESET`` resets it."""

    def __init__(self, *answers: object, read_bodies: bool = True) -> None:
        self.script = list(answers)
        self.read_bodies = read_bodies
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = free_port()
        self.origin = Origin("http", "127.0.0.1", self.port)

    async def __aenter__(self) -> Canned:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while self.script:
                head = await reader.readuntil(b"\r\n\r\n")
                length = [
                    line
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                size = int(length[0].split(b":")[1]) if length and self.read_bodies else 0
                body = await reader.readexactly(size)
                self.requests.append(head + body)
                writer.write(self.script.pop(0) or b"")  # type: ignore[arg-type]
                await writer.drain()
                if self.script and self.script[0] is RESET:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if self.script and self.script[0] is None:
                    self.script.pop(0)
                    break
        writer.close()


async def test_an_interim_answer_is_passed_over() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    async with Canned(answer) as up:
        got = Collect()
        await UpstreamPool().exchange(up.origin, request("x", "POST", b"{}"), got)
        assert (got.code, got.body) == (201, b"ok")


async def test_a_head_answer_has_no_body_and_keeps_the_connection() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    async with Canned(head, head + b"hello") as up:
        pool = UpstreamPool()
        first, second = Collect(), Collect()
        await pool.exchange(up.origin, request("x", "HEAD"), first)
        await pool.exchange(up.origin, request("y"), second)
        assert (first.code, first.body, second.body) == (200, b"", b"hello")
        assert pool.opened == 1 and up.connections == 1
        pool.close()


async def test_a_body_ended_by_closing_is_whole_and_the_connection_not_kept() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with Canned(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", None, ok) as up:
        pool = UpstreamPool()
        got = Collect()
        await pool.exchange(up.origin, request("x"), got)
        assert got.body == b"until the end" and not got.closed
        await pool.exchange(up.origin, request("y"), Collect())
        assert pool.opened == 2
        pool.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SPDY/9 what\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 << 20) + b"\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
    ids=["malformed", "headers-too-long", "upgrade"],
)
async def test_an_unreadable_answer_raises_and_closes(answer: bytes) -> None:
    async with Canned(answer) as up:
        pool = UpstreamPool()
        got = Collect()
        with pytest.raises(upstream_http.UpstreamProtocolError, match="tracking server"):
            await pool.exchange(up.origin, request("x"), got)
        assert got.closed and pool._idle.get(up.origin, []) == []


async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    async with Canned(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as up:
        smuggling = request("x")
        smuggling.headers["X-Note"] = "a\r\nX-Admin: yes"
        with pytest.raises(ValueError, match="line break"):
            await UpstreamPool().exchange(up.origin, smuggling, Collect())
        await asyncio.sleep(0.05)
        assert up.requests == []


async def test_a_body_of_unknown_length_is_sent_chunked() -> None:
    with serving(Upstream(), UpstreamPool()) as (up, pool):

        async def produce(write):  # type: ignore[no-untyped-def]
            for part in (b"first,", b"", b"second"):
                await write(part)

        streamed = request("chunked", "POST")
        streamed.body_producer = produce
        got = Collect()
        await pool.exchange(up.origin, streamed, got)
        assert got.code == 200 and up.seen[-1][2] == b"first,second"


async def test_a_chunked_answer_is_whole_and_keeps_the_connection() -> None:
    with serving(Upstream(), UpstreamPool()) as (up, pool):
        for _ in range(2):
            got = Collect()
            await pool.exchange(up.origin, request("parts"), got)
            assert got.body == b"one,two" and got.headers["Transfer-Encoding"] == "chunked"
        assert pool.opened == 1


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_the_pool_frames_requests_itself() -> None:
    async with Canned(OK, OK, OK) as up:
        pool = UpstreamPool()
        stray = request("get")  # a client's length for a GET whose body the proxy dropped
        stray.headers["Content-Length"] = "10"
        await pool.exchange(up.origin, stray, Collect())
        await pool.exchange(up.origin, request("empty", "POST"), Collect())
        wrong = request("post", "POST", b"12345")
        wrong.headers["Content-Length"] = "99"
        await pool.exchange(up.origin, wrong, Collect())
        heads = [r.lower() for r in up.requests]
        assert b"content-length" not in heads[0]
        assert b"content-length: 0\r\n" in heads[1]
        assert heads[2].count(b"content-length") == 1 and heads[2].endswith(b"\r\n\r\n12345")
        assert up.connections == 1
        pool.close()


async def test_a_request_is_not_sent_again_once_anything_came_back() -> None:
    # A broken answer on a reused connection: the server has seen the request.
    async with Canned(OK, b"HTTP/1.1 2oops\r\n\r\n") as up:
        pool = UpstreamPool()
        await pool.exchange(up.origin, request("first"), Collect())
        with pytest.raises(upstream_http.UpstreamProtocolError):
            await pool.exchange(up.origin, request("create", "POST", b"{}"), Collect())
        assert len(up.requests) == 2 and pool.opened == 1
        pool.close()


async def test_trailers_do_not_reach_the_next_answer() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    async with Canned(chunked, OK) as up:
        pool = UpstreamPool()
        first, second = Collect(), Collect()
        await pool.exchange(up.origin, request("a"), first)
        await pool.exchange(up.origin, request("b"), second)
        assert first.body == second.body == b"ok" and up.connections == 1
        assert "X-Checksum" not in first.headers and "X-Checksum" not in second.headers
        pool.close()


async def test_a_connection_that_said_more_than_asked_is_not_reused() -> None:
    async with Canned(OK + b"HTTP/1.1 500 Stale\r\nContent-Length: 0\r\n\r\n", OK) as up:
        pool = UpstreamPool()
        got = Collect()
        await pool.exchange(up.origin, request("a"), got)
        await pool.exchange(up.origin, request("b"), Collect())
        assert got.body == b"ok" and pool.opened == 2
        pool.close()


async def test_a_reset_is_not_the_end_of_a_body_that_ends_with_the_connection() -> None:
    async with Canned(b"HTTP/1.1 200 OK\r\n\r\npart of it", RESET) as up:
        got = Collect()
        with pytest.raises(ConnectionResetError):
            await UpstreamPool().exchange(up.origin, request("a"), got)
        assert got.closed and got.body.startswith(b"part")


def upload(size: int) -> UpstreamRequest:
    async def produce(write):  # type: ignore[no-untyped-def]
        for _ in range(size >> 18):
            await write(b"y" * (1 << 18))

    streamed = request("upload", "PUT")
    streamed.headers["Content-Length"] = str(size)
    streamed.body_producer = produce
    return streamed


@pytest.mark.parametrize("then", [None, "stalls"], ids=["closes", "stops-reading"])
async def test_an_answer_before_the_whole_upload_is_the_answer(then: str | None) -> None:
    # A server refusing an upload answers at once and closes, or stops reading: the
    # client must get that answer, not a broken pipe or a hang.
    refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\ndenied!"
    script = [refusal, None] if then is None else [refusal, OK]
    async with Canned(*script, read_bodies=False) as up:
        pool = UpstreamPool()
        got = Collect()
        await asyncio.wait_for(pool.exchange(up.origin, upload(64 << 20), got), 20)
        assert (got.code, got.body) == (403, b"denied!")
        assert pool._idle.get(up.origin, []) == []  # the rest of the body is on that one
        pool.close()


@contextlib.asynccontextmanager
async def taking_part_of_an_upload(then: str):  # type: ignore[no-untyped-def]
    """A raw server that reads a request's head and 1 MB of its body, then resets the
    connection (``then="reset"``) or reads no more until the test ends (``"stall"``)."""
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(1 << 20)
        if then == "stall":
            await done.wait()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        yield Origin("http", "127.0.0.1", port)
    finally:
        done.set()
        server.close()
        await asyncio.sleep(0)


async def test_a_reset_mid_upload_says_how_much_was_sent() -> None:
    async with taking_part_of_an_upload("reset") as origin:
        pool = UpstreamPool()
        with pytest.raises(UploadInterrupted) as caught:
            await asyncio.wait_for(pool.exchange(origin, upload(64 << 20), Collect()), 20)
        assert (1 << 20) <= caught.value.sent < 64 << 20
        assert isinstance(caught.value.cause, ConnectionError)
        assert pool._idle.get(origin, []) == []


async def test_an_upload_the_server_stops_reading_is_given_up() -> None:
    # Without a limit the upload, and the client's connection behind it, waited for ever.
    async with taking_part_of_an_upload("stall") as origin:
        pool = UpstreamPool(stall_timeout=0.5)
        with pytest.raises(UploadStalled) as caught:
            await asyncio.wait_for(pool.exchange(origin, upload(64 << 20), Collect()), 20)
        assert caught.value.seconds == 0.5 and caught.value.sent >= 1 << 20
        assert pool._idle.get(origin, []) == []


def test_the_pool_works_in_a_lab_running_on_uvloop() -> None:
    # uvloop's transports are not asyncio.Transport subclasses and its loop has no happy
    # eyeballs: both once broke every proxied call of a lab started on uvloop.
    import uvloop

    async def exchanges() -> None:
        with serving(Upstream(), UpstreamPool()) as (up, pool):
            for path in ("one", "parts", "two"):
                got = Collect()
                await pool.exchange(up.origin, request(path, "POST", b"{}"), got)
                assert got.code == 200, path
            assert got.body == b'{"path": "two", "body": "{}"}'
            assert pool.opened == 1

            big = b"x" * (8 << 20)  # far beyond the socket buffers: writing must wait

            async def produce(write):  # type: ignore[no-untyped-def]
                for start in range(0, len(big), 1 << 16):
                    await write(big[start : start + (1 << 16)])

            streamed = request("upload", "PUT")
            streamed.headers["Content-Length"] = str(len(big))
            streamed.body_producer = produce
            got = Collect()
            await pool.exchange(up.origin, streamed, got)
            assert got.code == 200 and up.seen[-1][2] == big
            assert len(got.body) > len(big)  # the echo came back whole

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(exchanges())
