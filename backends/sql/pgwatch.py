"""A watchdog for PostgreSQL (psycopg) connections whose server stops answering mid-statement.

libpq has no bound on a read: a 20 GB ``COPY`` is one statement, and a big sort
may send nothing for minutes before its first row.  TCP keepalives and
``tcp_user_timeout`` (:func:`snapshotter_backends.sqlbase._connect_args`) find a
server or network that went away, but not a server, proxy or pooler that keeps
the connection open and acknowledged while sending nothing: the read would
wait forever.

Every connection of a watched engine notes when it starts and ends waiting for
the server (psycopg's ``Connection.wait``, which every statement, fetch and
``COPY`` read or write goes through).  One thread per process looks at the
connections a few times per ``timeout``.  Once one has waited ``timeout``
seconds with no byte moving on its socket (the kernel's counters, on Linux;
elsewhere the time since the wait began), the watchdog asks the server about
the connection's process in ``pg_stat_activity``, on a second, short-lived
connection:

* ``active`` and not waiting on the client connection (running, sorting,
  reading, waiting for a lock): the server works; it is asked again every
  ``timeout`` seconds while the wait lasts;
* ``active`` but blocked writing its answer to us or reading our request
  (``ClientWrite``, ``ClientRead``) while no byte moves (without the kernel's
  counters: seen so on two questions ``timeout`` apart), ``idle`` or ``idle in
  transaction`` (for ``timeout``/2 at least, so that an answer still on its way
  is not taken for a lost one), the process gone, or no answer to the second
  connection within the bound: the connection is stuck.

A stuck connection's server process is terminated when the second connection
can (its transaction is rolled back, its locks released: nothing is left
holding them behind a hung proxy; a cancel would not reach a process blocked
writing to us, nor end an idle transaction), and its socket is shut down, which
ends the blocked read.  The wait raises :class:`Stalled`, a one-line
:class:`~snapshotter.errors.SourceError` naming the source and the bound, like
every other timeout (:mod:`snapshotter.timeouts`).

The process is known by ``pg_backend_pid()`` and its start time, asked once per
connection (a pooler's own pid would name no server process).  Behind a pooler
in transaction mode the process serving a statement may be another one, which
the watchdog cannot see.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import psycopg

from snapshotter.errors import SourceError
from snapshotter.redaction import redact_text
from snapshotter.timeouts import timed_out

#: how many times per ``timeout`` the watchdog looks at the connections waiting for their server
LOOKS_PER_TIMEOUT = 4

#: pg_stat_activity's wait events of a process blocked on its client connection
CLIENT_WAITS = frozenset({"ClientWrite", "ClientRead"})

_PROBE = ("SELECT state, wait_event, backend_start = %(start)s, "
          "extract(epoch FROM clock_timestamp() - state_change) FROM pg_stat_activity WHERE pid = %(pid)s")
_TERMINATE = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %(pid)s AND backend_start = %(start)s"


class Stalled(SourceError):
    """A PostgreSQL server the watchdog found stuck in the middle of a statement."""


@dataclass
class _Source:
    """What the watchdog knows of one engine: its message prefix, bound, and how to connect."""

    what: str
    timeout: float
    connect_params: tuple[tuple, dict] = ((), {})


@dataclass
class _Watch:
    """One connection as the watchdog sees it.  The connection's thread writes ``since`` and
    ``op``; the watchdog (and the probe it waits for) everything else."""

    source: _Source
    fd: int
    pid: int | None = None
    backend_start: Any = None
    since: float | None = None  # when the current wait began; None while not waiting
    op: int = 0  # waits begun so far: tells one wait from the next
    broken: str | None = None  # the message, once the watchdog has broken the connection
    # the watchdog's notes on the current wait
    seen_op: int = -1
    progress_at: float = 0.0
    counters: tuple[int, int] | None = None
    next_probe: float = 0.0
    client_wait_at: float | None = None


class WatchedConnection(psycopg.Connection):
    """A psycopg connection whose waits for the server the watchdog can see and end."""

    _watch: _Watch | None = None

    def wait(self, gen, *args, **kwargs):
        w = self._watch
        if w is None:
            return super().wait(gen, *args, **kwargs)
        w.op += 1
        w.since = time.monotonic()
        try:
            return super().wait(gen, *args, **kwargs)
        except psycopg.Error as exc:
            if w.broken is not None:
                raise Stalled(w.broken) from exc
            raise
        finally:
            w.since = None


def watch(engine, what: str, timeout: float) -> None:
    """Watch every connection ``engine`` makes: a wait for the server that gets nothing for
    ``timeout`` seconds while the server is not working on it ends in :class:`Stalled`,
    whose message is ``what: timed out after N s (why)``."""
    import sqlalchemy as sa

    source = _Source(what, timeout)

    def connect(dialect, conn_rec, cargs, cparams):
        source.connect_params = (tuple(cargs), dict(cparams))
        conn = WatchedConnection.connect(*cargs, **cparams)
        w = conn._watch = _Watch(source, conn.pgconn.socket)
        _Watchdog.get().add(conn)  # the query below is watched too
        try:
            autocommit = conn.autocommit
            conn.autocommit = True
            try:
                w.pid, w.backend_start = conn.execute(
                    "SELECT pg_backend_pid(), (SELECT backend_start FROM pg_stat_activity "
                    "WHERE pid = pg_backend_pid())").fetchone()
            except psycopg.Error:
                if conn.closed:  # lost: the pool's error, not ours
                    raise
                w.pid = conn.pgconn.backend_pid  # and no start time: never terminated
            conn.autocommit = autocommit
        except BaseException:
            conn.close()
            raise
        return conn

    sa.event.listen(engine, "do_connect", connect)


class _Watchdog:
    """The one thread of the process that looks at watched connections."""

    _instance: "_Watchdog | None" = None
    _lock = threading.Lock()

    def __init__(self):
        self.conns: "weakref.WeakSet[WatchedConnection]" = weakref.WeakSet()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="snapshotter-pgwatch", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> "_Watchdog":
        with cls._lock:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = cls()
            return cls._instance

    def add(self, conn: WatchedConnection) -> None:
        with self._lock:
            self.conns.add(conn)
        self.wake.set()

    def _run(self) -> None:
        while True:
            with self._lock:
                watches = [c._watch for c in list(self.conns) if c._watch is not None]
            pause = min((w.source.timeout / LOOKS_PER_TIMEOUT for w in watches), default=None)
            for w in watches:
                try:
                    self._look(w)
                except Exception:  # noqa: BLE001 - the watchdog must outlive any one look
                    pass
            self.wake.wait(pause)
            self.wake.clear()

    def _look(self, w: _Watch) -> None:
        op, since = w.op, w.since
        if since is None or w.broken is not None:
            return
        now = time.monotonic()
        timeout = w.source.timeout
        if w.seen_op != op:  # a new wait: nothing known of it yet
            w.seen_op, w.progress_at, w.counters, w.next_probe, w.client_wait_at = op, since, None, 0.0, None
        sock = _socket_of(w, op)
        if sock is None:
            return  # the wait ended meanwhile
        with sock:
            counters = _byte_counters(sock)
            if counters is not None:
                if w.counters is not None and counters != w.counters:
                    w.progress_at = now
                w.counters = counters
            if now - w.progress_at < timeout or now < w.next_probe:
                return
            w.next_probe = now + timeout
            if _Probe(w, op, counted=counters is not None).run():
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns; the wait raises Stalled


def _judge(w: _Watch, row: tuple | None, *, counted: bool) -> str | None:
    """Why the connection is stuck, from its server process's row of pg_stat_activity (None:
    no such process), or None while the server works on its statement."""
    timeout = w.source.timeout
    if row is None or row[2] is False:  # no process of that pid, or another one that took it
        return "in the middle of a statement; the server process running it is gone"
    state, wait_event, _, idle_for = row
    if state is not None and state.startswith("idle"):  # idle, idle in transaction (aborted)
        if idle_for is not None and idle_for >= timeout / 2:
            return f"in the middle of a statement; the server is not working on it ({state})"
        w.next_probe = time.monotonic() + timeout / LOOKS_PER_TIMEOUT  # an answer may be on its way
        return None
    if state != "active":  # a fast-path call, or track_activities off ("disabled"): it cannot tell
        return None
    if wait_event not in CLIENT_WAITS:
        w.client_wait_at = None
        return None
    now = time.monotonic()
    if counted or (w.client_wait_at is not None and now - w.client_wait_at >= timeout):
        doing = "send its answer" if wait_event == "ClientWrite" else "read the rest of the request"
        return f"in the middle of a statement; the server waits to {doing} ({wait_event}) and nothing comes through"
    if w.client_wait_at is None:
        w.client_wait_at = now
    return None


class _Probe:
    """A second, short-lived connection that asks about a watched connection's server process
    and terminates it when it is stuck.  Run in a thread of its own, so that a server that does
    not answer it either holds nothing up: after the bound its socket is shut down."""

    def __init__(self, w: _Watch, op: int, *, counted: bool):
        self.w = w
        self.op = op
        self.counted = counted
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.done = False

    def run(self) -> bool:
        """Whether the connection is stuck (then :attr:`_Watch.broken` says why)."""
        timeout = self.w.source.timeout
        t = threading.Thread(target=self._ask, name="snapshotter-pgwatch-probe", daemon=True)
        t.start()
        t.join(max(2.0, timeout))  # libpq's connect_timeout is 2 s at least
        with self.lock:
            if not self.done:
                self.done = True
                if self.fd is not None:
                    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self.fd)) as s:
                        s.shutdown(socket.SHUT_RDWR)
                self._stuck("in the middle of a statement; a second connection got no answer either")
        return self.w.broken is not None

    def _stuck(self, why: str | None) -> bool:
        """Note the connection stuck, unless its wait ended meanwhile (the server answered after all)."""
        w = self.w
        if w.broken is None:
            if why is None or w.since is None or w.op != self.op:
                return False
            w.broken = timed_out(w.source.what, w.source.timeout, why)
        return True

    def _ask(self) -> None:
        w = self.w
        cargs, cparams = w.source.connect_params
        params = {**cparams, "autocommit": True, "connect_timeout": max(2, math.ceil(w.source.timeout))}
        try:
            conn = psycopg.Connection.connect(*cargs, **params)
        except psycopg.Error as exc:
            sqlstate = getattr(exc, "sqlstate", None)
            if sqlstate is None or sqlstate.startswith("57P"):
                # no answer, refused, or a server shutting down or recovering from a crash
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self._answer(f"in the middle of a statement; a second connection failed too: {redact_text(first)}")
            else:  # the server answered (too many connections, say): it cannot tell; ask again later
                self._answer(None)
            return
        except Exception:  # noqa: BLE001 - nothing escapes this thread
            self._answer(None)
            return
        try:
            with self.lock:
                if self.done:
                    return
                self.fd = conn.pgconn.socket
            args = {"pid": w.pid if w.pid is not None else -1, "start": w.backend_start}
            row = conn.execute(_PROBE, args).fetchone()
            with self.lock:
                if self.done:
                    return
                stuck = self._stuck(_judge(w, row, counted=self.counted))
            if stuck and row is not None and row[2] is not False:
                # its transaction rolled back and its locks released now, not once TCP gives up
                conn.execute(_TERMINATE, args)
            self._answer(None)
        except Exception:  # noqa: BLE001 - it cannot tell; asked again later (the bound still holds)
            self._answer(None)
        finally:
            with self.lock:
                self.fd = None
            conn.close()

    def _answer(self, why: str | None) -> None:
        with self.lock:
            if not self.done:
                self._stuck(why)
                self.done = True


def _socket_of(w: _Watch, op: int) -> socket.socket | None:
    """A socket object on the watched connection's socket, made while its wait ``op`` lasts (so
    that the descriptor is that connection's, not a later one's that took its number)."""
    try:
        sock = socket.socket(fileno=os.dup(w.fd))
    except OSError:
        return None
    if w.since is None or w.op != op:
        sock.close()
        return None
    return sock


_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
#: struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, Linux 4.1 and later
_TCP_INFO_COUNTERS = struct.Struct("=QQ")
_TCP_INFO_COUNTERS_AT = 120


def _byte_counters(sock: socket.socket) -> tuple[int, int] | None:
    """Bytes the peer acknowledged and bytes received on ``sock`` (Linux), or None."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < _TCP_INFO_COUNTERS_AT + _TCP_INFO_COUNTERS.size:
        return None
    return _TCP_INFO_COUNTERS.unpack_from(info, _TCP_INFO_COUNTERS_AT)


# -- another process's connection (a psql child reading for the reader: pgbulk.py) -------

def source_of(conn) -> _Source | None:
    """The watched engine's source (message prefix, bound, how to connect) of a connection,
    or None when it is not watched."""
    w = getattr(conn, "_watch", None)
    return w.source if w is not None else None


def stuck(source: _Source, pid: int, backend_start: Any, since: float) -> str | None:
    """Why the server process ``pid`` (started at ``backend_start``), serving a connection
    on which nothing has come through since ``since`` (a monotonic time), is stuck, as the
    watchdog judges its own connections; None while it works.  Run in the waiting thread
    (it waits for the probe, ``max(2, timeout)`` at most); a stuck process is terminated."""
    w = _Watch(source, -1, pid=pid, backend_start=backend_start, since=since, op=1, seen_op=1)
    if _Probe(w, 1, counted=True).run():
        return w.broken
    return None
