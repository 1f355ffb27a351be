"""A fault-injecting HTTP proxy for an S3 endpoint, for the S3 fault suite.

It listens on a free loopback port and forwards every request to an upstream
S3 endpoint (the moto server of the tests).  On a configurable fraction of
requests, chosen by a seeded RNG, it answers instead with one of the faults
an S3 client meets in production:

``500``          500 InternalError, the request never reaches the store
``503``          503 ServiceUnavailable, likewise
``slowdown``     503 with S3's ``SlowDown`` XML error body, likewise
``reset``        the connection is reset (RST) before the request is forwarded
``reset-after``  the request *is* forwarded and applied, then the connection is
                 reset instead of answering: the client cannot tell whether it
                 took effect, which is what makes retried create-only writes
                 interesting
``truncate``     the request is forwarded; the response announces a
                 Content-Length larger than the body actually sent, then the
                 connection is closed
``403``          403 AccessDenied: not transient, so never retried; drawn on
                 the separate fraction ``hard`` of requests (and by rules)

Separately, ``corrupt`` is the fraction of successful GET responses whose body
gets one byte flipped, its length unchanged (only for keys matching
``corrupt_pattern``, chunks by default: those are the objects whose names are
their hashes).  The response's ``x-amz-checksum-*`` headers are dropped with
it unless ``corrupt_keeps_checksums``: many S3-compatible stores send none, and
then only snapshotter's own hashes stand between a flipped byte and a restore.

Clients use it by pointing ``[repository] endpoint_url`` at :attr:`FaultProxy.url`.
``rules`` inject a fault deterministically into the next requests that match
a method and a key pattern, for tests that need one exact failure.  A request
that a rule already hit is left alone by every rule after (a retry of the same
key goes through), so faults from several rules spread over requests instead
of piling up on one and stretching the client's backoff.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import queue
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

FAULTS = ("500", "503", "slowdown", "reset", "reset-after", "truncate")
ALL_FAULTS = FAULTS + ("403",)

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "expect", "content-length"}

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class Rule:
    """Inject ``fault`` (or ``corrupt``) into the next ``count`` requests whose method and object key match."""

    method: str
    key_pattern: str
    fault: str
    count: int = 1

    def matches(self, method: str, key: str) -> bool:
        return self.count > 0 and method == self.method and re.search(self.key_pattern, key) is not None


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.0, faults=FAULTS, hard: float = 0.0, corrupt: float = 0.0,
                 corrupt_pattern: str = r"(^|/)chunks/",
                 corrupt_keeps_checksums: bool = False, seed: int = 0, methods: tuple[str, ...] | None = None):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rate = rate
        self.faults = tuple(faults)
        unknown = set(self.faults) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)} (known: {', '.join(ALL_FAULTS)})")
        self.hard = hard
        self.corrupt = corrupt
        self.corrupt_pattern = corrupt_pattern
        self.corrupt_keeps_checksums = corrupt_keeps_checksums
        self.methods = methods  # None: faults hit every method
        #: keys matching this pattern (every method) are answered only after ``stall_seconds``, with a
        #: reset: a stalled endpoint that accepts requests and does not answer them
        self.stall_pattern: str | None = None
        self.stall_seconds = 30.0
        self.rules: list[Rule] = []
        self._rule_hits: set[tuple[str, str]] = set()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.injected: collections.Counter = collections.Counter()
        self._pool: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                break

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def configure(self, **kwargs) -> None:
        """Change rate, faults, hard, corrupt, corrupt_pattern or methods while running."""
        with self.lock:
            for k, v in kwargs.items():
                if not hasattr(self, k):
                    raise AttributeError(k)
                setattr(self, k, tuple(v) if k == "faults" else v)

    def clear_rules(self) -> None:
        """Forget every rule, and which requests rules have hit."""
        with self.lock:
            self.rules.clear()
            self._rule_hits.clear()

    def add_rule(self, method: str, key_pattern: str, fault: str, count: int = 1) -> Rule:
        rule = Rule(method, key_pattern, fault, count)
        with self.lock:
            self.rules.append(rule)
        return rule

    # -- decisions -----------------------------------------------------------------

    def decide(self, method: str, key: str) -> tuple[str | None, bool]:
        """(fault or None, whether to corrupt a successful GET body)."""
        with self.lock:
            self.requests += 1
            for rule in self.rules:
                if (method, key) not in self._rule_hits and rule.matches(method, key):
                    rule.count -= 1
                    self._rule_hits.add((method, key))
                    if rule.fault == "corrupt":
                        self.injected["corrupt"] += 1
                        return None, True
                    self.injected[rule.fault] += 1
                    return rule.fault, False
            fault = None
            if self.hard and (self.methods is None or method in self.methods) and self.rng.random() < self.hard:
                fault = "403"
                self.injected[fault] += 1
            elif self.rate and (self.methods is None or method in self.methods) and self.rng.random() < self.rate:
                fault = self.rng.choice(self.faults)
                self.injected[fault] += 1
            corrupt = (fault is None and method == "GET" and self.corrupt > 0
                       and re.search(self.corrupt_pattern, key) is not None and self.rng.random() < self.corrupt)
            if corrupt:
                self.injected["corrupt"] += 1
            return fault, corrupt

    def flip_position(self, size: int) -> int:
        with self.lock:
            return self.rng.randrange(size)

    # -- upstream connections ------------------------------------------------------

    def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
        """(status, reason, headers, body) from the upstream; one retry on a stale pooled connection."""
        for attempt in (0, 1):
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                conn.close()
                if attempt:
                    raise
                continue
            if resp.will_close:
                conn.close()
            else:
                self._pool.put(conn)
            return resp.status, resp.reason, resp.getheaders(), data
        raise AssertionError("unreachable")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        pass  # clients that go away mid-response are part of the game


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format, *args) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _object_key(self) -> str:
        # path-style addressing: /bucket/key...; the key is what rules and corruption look at
        path = unquote(urlsplit(self.path).path)
        parts = path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) == 2 else ""

    def _reset(self) -> None:
        # SO_LINGER 0: the close (once finish() drops the file objects) sends RST instead of FIN
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    def _error(self, fault: str) -> None:
        status, code, message = _ERRORS[fault]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                f'</Message><RequestId>fault-proxy</RequestId></Error>').encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if fault == "slowdown":
            self.send_header("Retry-After", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        proxy = self.owner
        body = self._read_body()
        key = self._object_key()
        if proxy.stall_pattern and re.search(proxy.stall_pattern, key):
            time.sleep(proxy.stall_seconds)
            self._reset()
            return
        fault, corrupt = proxy.decide(self.command, key)
        if fault in _ERRORS:
            self._error(fault)
            return
        if fault == "reset":
            self._reset()
            return
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        try:
            status, reason, resp_headers, data = proxy.forward(self.command, self.path, headers, body)
        except (ConnectionError, http.client.HTTPException, OSError):
            self._reset()
            return
        if fault == "reset-after" or (fault == "truncate" and self.command == "HEAD"):
            self._reset()
            return
        drop = set()
        if corrupt and status == 200 and data:
            pos = proxy.flip_position(len(data))
            data = data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1:]
            if not proxy.corrupt_keeps_checksums:
                drop = {k.lower() for k, _ in resp_headers if k.lower().startswith("x-amz-checksum-")}
        self.send_response_only(status, reason)
        for k, v in resp_headers:
            if k.lower() not in _HOP_BY_HOP and k.lower() not in drop:
                self.send_header(k, v)
        if fault == "truncate":
            announced = len(data) if len(data) >= 2 else len(data) + 64
            self.send_header("Content-Length", str(announced))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._reset()
            return
        if self.command == "HEAD":
            # HEAD answers carry the object's length without a body
            length = dict((k.lower(), v) for k, v in resp_headers).get("content-length", "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


# BaseHTTPRequestHandler.finish() flushes wfile; after a reset the socket is closed,
# so errors from that flush are expected and swallowed.
def _finish(self) -> None:
    try:
        BaseHTTPRequestHandler.finish(self)
    except OSError:
        pass


_Handler.finish = _finish


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("upstream", help="the S3 endpoint to forward to, e.g. http://127.0.0.1:5000")
    ap.add_argument("--rate", type=float, default=0.1, help="fraction of requests that get a fault")
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated faults to choose from")
    ap.add_argument("--corrupt", type=float, default=0.0, help="fraction of chunk GETs with a flipped byte")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    proxy = FaultProxy(args.upstream, rate=args.rate, faults=args.faults.split(","), corrupt=args.corrupt,
                       seed=args.seed).start()
    print(proxy.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
