"""What one relay hop costs right after the machine sat idle, for an event loop and for
blocking code: the context for ``bench/proxy.py``.

A server answers 300 bytes at once ("no wait") or after sleeping 9 ms ("after 9 ms
idle"; it sleeps, so no CPU is busy meanwhile). A client calls it directly and through
two relays on loopback, interleaved: one with blocking sockets, one on asyncio (what
tornado, and so Jupyter and the MLflow proxy, run on). Prints p50 of the latency each
relay adds, in both cases, and the ratio idle/no wait.

On a machine where caches stay warm while a CPU idles, the two cases cost the same. On
a shared VM they do not, and the more Python runs after the wake-up, the more the hop
costs: that is what the proxy pays on top of its work when MLflow takes 10 ms.

    python bench/idle_wakeup.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import threading
import time

from mantik_jupyter.tracking.embedded import free_port

ANSWER = b"r" * 300
WAIT = 0.009


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def server(port: int) -> None:
    def answer(conn: socket.socket) -> None:
        _nodelay(conn)
        while request := conn.recv(64):
            if request.startswith(b"w"):
                time.sleep(WAIT)
            conn.sendall(ANSWER)

    listener = _listen(port)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def blocking_relay(port: int, upstream: int) -> None:
    conn, _ = _listen(port).accept()
    _nodelay(conn)
    up = _nodelay(socket.create_connection(("127.0.0.1", upstream)))
    while request := conn.recv(64):
        up.sendall(request)
        conn.sendall(_read_answer(up))


def asyncio_relay(port: int, upstream: int) -> None:
    async def main() -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while request := await reader.read(64):
                up_writer.write(request)
                writer.write(await up_reader.readexactly(len(ANSWER)))

        listener = await asyncio.start_server(relay, "127.0.0.1", port)
        await listener.serve_forever()

    asyncio.run(main())


def _read_answer(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < len(ANSWER):
        data += sock.recv(len(ANSWER) - len(data))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    up, ports = free_port(), {"blocking": free_port(), "asyncio": free_port()}
    procs = [multiprocessing.Process(target=server, args=(up,), daemon=True)]
    procs += [
        multiprocessing.Process(target=fn, args=(ports[name], up), daemon=True)
        for name, fn in (("blocking", blocking_relay), ("asyncio", asyncio_relay))
    ]
    for proc in procs:
        proc.start()
        time.sleep(0.3)
    try:
        targets = {"direct": up, **ports}
        socks = {
            name: _nodelay(socket.create_connection(("127.0.0.1", port)))
            for name, port in targets.items()
        }
        times: dict[tuple[str, str], list[float]] = {}
        for i in range(args.requests + 20):
            for case, request in (("no wait", b"n"), ("after 9 ms idle", b"w")):
                for name, sock in socks.items():
                    t0 = time.perf_counter()
                    sock.sendall(request)
                    _read_answer(sock)
                    if i >= 20:  # warm-up
                        elapsed = (time.perf_counter() - t0) * 1000
                        times.setdefault((name, case), []).append(elapsed)
        p50 = {key: statistics.median(values) for key, values in times.items()}
        print(f"{'relay':10} {'added, no wait':>15} {'added, after 9 ms idle':>23} {'ratio':>6}")
        for name in ports:
            warm = p50[(name, "no wait")] - p50[("direct", "no wait")]
            idle = p50[(name, "after 9 ms idle")] - p50[("direct", "after 9 ms idle")]
            print(f"{name:10} {warm:13.3f}ms {idle:21.3f}ms {idle / warm:6.1f}")
    finally:
        for proc in procs:
            proc.terminate()


if __name__ == "__main__":
    main()
