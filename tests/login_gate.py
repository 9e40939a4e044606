"""A stand-in login node in front of the test sshd (see ``Gate``)."""

from __future__ import annotations

import socket
import struct
import threading


class Gate:
    """A loopback port that plays an SSH login node. Closed, it drops each connection
    once the client said hello (a login node in maintenance, or one that drops logins);
    open, it relays to ``target`` (the test sshd). It counts the connections. The
    client's hello is read first: closed under unread data, the connection was reset
    or ended at random, and the error read two ways."""

    def __init__(self, target: tuple[str, int] | None = None) -> None:
        self.target = target
        self.open = False
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.open and self.target is not None:
                upstream = socket.create_connection(self.target)
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            else:
                conn.settimeout(5)
                try:
                    conn.recv(1024)
                except OSError:
                    pass
                # Always a reset: closed in order, the client's next packet (sent after
                # its hello or not yet) decided between an EOF and a reset, and the error
                # read two ways.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        # A close alone leaves the port listening while the accept thread waits in it.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
