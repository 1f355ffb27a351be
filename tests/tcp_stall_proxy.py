"""A TCP proxy that forwards normally until told to stall one connection.

It listens on a free loopback port and forwards each connection to an upstream
``host:port`` (PostgreSQL in the tests), byte for byte, in both directions.  A
stall keeps both of that connection's sockets open and forwards nothing more,
as a proxy or pooler that hangs does: TCP still acknowledges for it, so the
client's keepalives and ``tcp_user_timeout`` see a healthy connection.

Two triggers, each armed for the next connection that meets it:

* :meth:`StallProxy.stall_after` ``n`` bytes from the server on one connection
  (the one a big ``COPY ... TO STDOUT`` runs on);
* :meth:`StallProxy.stall_on` the first chunk from the client that holds a
  pattern (a statement's text): that chunk is forwarded, the server's answer
  is not.

``drain``: the stalled connection keeps reading from the server and throws the
bytes away (the server finishes its statement and waits idle for the next);
without it, it reads nothing more (the server blocks writing to the client
once the socket buffers are full).  ``hang_new``: once stalled, the proxy also
accepts new connections and forwards nothing on them (a hung pooler), so a
second connection gets no answer either.  ``release``: seconds after which the
stalled connection is closed, so that a client that would wait for ever ends
(with another error) and a test fails instead of hanging.
"""
from __future__ import annotations

import contextlib
import socket
import threading


class StallProxy:
    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.stalled = threading.Event()  # set once a connection has stalled
        self._lock = threading.Lock()
        self._after: int | None = None
        self._pattern: bytes | None = None
        self._drain = False
        self._hang_new = False
        self._release = 30.0
        self._links: list[_Link] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> "StallProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stall_after(self, n: int, *, drain: bool = False, hang_new: bool = False, release: float = 30.0) -> None:
        """Stall the next connection that gets more than ``n`` bytes from the server from now on."""
        with self._lock:
            self._after, self._pattern = n, None
            self._drain, self._hang_new, self._release = drain, hang_new, release
            self.stalled.clear()

    def stall_on(self, pattern: bytes, *, drain: bool = False, hang_new: bool = False, release: float = 30.0) -> None:
        """Stall the next connection whose client sends ``pattern`` (that chunk is forwarded)."""
        with self._lock:
            self._after, self._pattern = None, pattern
            self._drain, self._hang_new, self._release = drain, hang_new, release
            self.stalled.clear()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
                if self._hang_new and self.stalled.is_set():
                    self._stall(link, 0)
            threading.Thread(target=self._pump, args=(client, server, link, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, link, True), daemon=True).start()

    def _trigger(self, link: "_Link", data: bytes, from_server: bool) -> int | None:
        """How many bytes of ``data`` to forward before this connection stalls, or None."""
        with self._lock:
            if link.stalled:
                return 0
            if from_server and self._after is not None:
                link.server_bytes += len(data)
                if link.server_bytes > self._after:
                    over = link.server_bytes - self._after
                    self._after = None
                    return self._stall(link, len(data) - over)
            if not from_server and self._pattern is not None and self._pattern in data:
                self._pattern = None
                return self._stall(link, len(data))
            return None

    def _stall(self, link: "_Link", forward: int) -> int:
        link.stalled, link.drain = True, self._drain
        self.stalled.set()
        timer = threading.Timer(self._release, link.close)
        timer.daemon = True
        timer.start()
        return max(0, forward)

    def _pump(self, src: socket.socket, dst: socket.socket, link: "_Link", from_server: bool) -> None:
        while not self._closed.is_set():
            if link.stalled:
                if from_server and link.drain:
                    try:
                        if not src.recv(65536):
                            break
                    except OSError:
                        break
                    continue
                link.closed.wait()  # forward nothing, read nothing: the sockets stay open
                break
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                break
            forward = self._trigger(link, data, from_server)
            try:
                dst.sendall(data if forward is None else data[:forward])
            except OSError:
                break


class _Link:
    """The state of one proxied connection."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.sockets = (client, server)
        self.stalled = False
        self.drain = False
        self.server_bytes = 0
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
