"""PostgreSQL tables read in bulk: the snapshot's ``COPY`` run by a ``psql`` child process.

Through libpq in this process, a ``COPY ... TO STDOUT`` hands over one message per
row, each taken by Python: at two million narrow rows that is most of a snapshot's
time, while the server waits for us.  Run by ``psql`` in a child process instead, the
same ``COPY`` arrives on a pipe in big blocks: the server and ``psql`` produce rows on
one CPU while this process cuts the blocks into lines and chunks on another.

The lines are the very bytes the libpq path gets (the server writes both, under the
same :data:`.pgtext.SESSION_SETTINGS`, in UTF-8), so stream digests do not depend on
the path.  The child sees the reader's point in time: the reader's REPEATABLE READ READ
ONLY transaction exports its snapshot (``pg_export_snapshot()``) and the child's
transaction imports it (``SET TRANSACTION SNAPSHOT``) before it reads.  Only whole-table
reads of such a transaction take this path (a restore reads live rows inside its own
write transaction, whose changes no other session sees: it keeps libpq).

The child gets the live connection's parameters through libpq's environment variables
(``PGHOST``, ``PGPASSWORD``, ...; never on its command line, which other users of the
machine can read), ``-X`` (no ``psqlrc``), ``ON_ERROR_STOP``, its statements on stdin and
its stderr in a file.  Its first output line names its server process, so that a read
that gets nothing for ``timeout`` seconds is judged as the watchdog judges the reader's
own connection (:mod:`.pgwatch`): a server that works (a sort, a lock wait) is waited
for; a server blocked writing to a connection on which nothing comes through, or idle
in the middle of the ``COPY``, is stuck: its process is terminated and the read ends as
a timeout.  The child is killed whenever the read ends early (an error, a timeout,
Ctrl-C, a stream abandoned), and its server process, which then finds its client gone,
ends too.

``SNAPSHOTTER_PG_PSQL`` chooses (:func:`mode`): ``auto`` (the default) takes ``psql``
from ``PATH`` for tables of :data:`MIN_TABLE_BYTES` or more and falls back to libpq when
there is none or it cannot connect; ``off`` never runs it; ``always`` runs it for every
whole-table read and makes its failure an error; any other value is the path of the
``psql`` to run (as ``auto``).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from snapshotter.errors import SourceError
from snapshotter.redaction import redact_text
from snapshotter.timeouts import timed_out

from .. import lazy_module

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

sa = lazy_module("sqlalchemy")
log = logging.getLogger(__name__)

ENV_SWITCH = "SNAPSHOTTER_PG_PSQL"

#: tables smaller than this (``pg_table_size``) are read through libpq in ``auto`` mode:
#: starting ``psql`` and its connection costs about what libpq takes for this much
MIN_TABLE_BYTES = 2 << 20

#: bytes of COPY text handed on at a time (whole lines)
BLOCK_BYTES = 1 << 20

#: the pipe from the child, enlarged when the system allows (Linux: up to pipe-max-size)
PIPE_BYTES = 1 << 20

#: prefix of the child's first output line: its server process id and start time
_PID_TAG = b"snapshotter-pid|"

#: the read's checks per ``timeout`` while nothing comes through the pipe
LOOKS_PER_TIMEOUT = 4


class PsqlFailed(Exception):
    """``psql`` ended with an error; the message is its own first line of it."""


@dataclass
class Mode:
    mode: str  # "auto", "off" or "always"
    binary: str  # the psql to run (name or path)


def mode() -> Mode:
    raw = os.environ.get(ENV_SWITCH, "").strip()
    low = raw.lower()
    if low in ("", "auto", "1", "on", "yes", "true"):
        return Mode("auto", "psql")
    if low in ("0", "off", "no", "false", "never"):
        return Mode("off", "psql")
    if low == "always":
        return Mode("always", "psql")
    return Mode("auto", raw)


def plan(conn: Connection, schema_doc: dict) -> str | None:
    """The ``psql`` to read this whole table with, or None to keep libpq."""
    from .pgcopy import _psycopg_connection

    m = mode()
    if m.mode == "off":
        return None
    pg = _psycopg_connection(conn)
    if pg is None:
        return _refuse(m, "the driver is not psycopg")
    import shutil

    binary = shutil.which(m.binary)
    if binary is None:
        return _refuse(m, f"no {m.binary} program found")
    iso, ro, idle = conn.exec_driver_sql(
        "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only'), "
        "current_setting('idle_in_transaction_session_timeout')").fetchone()
    if iso not in ("repeatable read", "serializable") or ro != "on":
        return _refuse(m, "not in a read-only snapshot transaction", strict=False)
    if m.mode == "auto":
        q = conn.dialect.identifier_preparer.quote
        name = q(schema_doc["table"]) if not schema_doc.get("db_schema") else \
            f"{q(schema_doc['db_schema'])}.{q(schema_doc['table'])}"
        size = conn.exec_driver_sql("SELECT pg_table_size(%(t)s::regclass)", {"t": name}).scalar() or 0
        if size < MIN_TABLE_BYTES:
            return None
    if idle not in ("0", "0ms"):
        # the reader's transaction waits for the child without a statement of its own: a
        # server that ends idle transactions must not end it meanwhile (libpq's COPY is a statement)
        conn.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
    return binary


def _refuse(m: Mode, why: str, *, strict: bool = True) -> None:
    if m.mode == "always" and strict:
        raise SourceError(f"{ENV_SWITCH}=always: the table cannot be read through psql: {why}")
    log.debug("snapshotter: reading through libpq, not psql: %s", why)
    return None


def child_env(pg) -> dict[str, str]:
    """The environment of a ``psql`` that connects as ``pg`` did: every parameter of the
    live connection that libpq reads from an environment variable, the password included
    (the environment of a process is readable by its user only; its command line by all)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGSERVICE", "PGSERVICEFILE", "PSQLRC")}
    for opt in pg.pgconn.info:
        if opt.envvar and opt.val:
            env[opt.envvar.decode()] = opt.val.decode("utf-8", "surrogateescape")
    env["PGCLIENTENCODING"] = "UTF8"
    env["PGAPPNAME"] = "snapshotter-copy-" + secrets.token_hex(4)
    return env


def script(select: str, snapshot: str, server_version: int, search_path: str | None = None) -> bytes:
    from .pgtext import SESSION_SETTINGS

    lines = ["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;",
             f"SET TRANSACTION SNAPSHOT '{snapshot}';"]
    if search_path is not None:
        # unqualified names resolve as on the reader's connection (current_setting's text is SET's syntax)
        lines.append(f"SET LOCAL search_path = {search_path};")
    lines += [f"SET LOCAL {name} = '{value}';" for name, value in SESSION_SETTINGS]
    if server_version >= 140000:
        # the server process notices a client that went away (the child killed) even while it
        # sorts and sends nothing, instead of at its next write
        lines.append("SET LOCAL client_connection_check_interval = 1000;")
    lines.append(f"SELECT '{_PID_TAG[:-1].decode()}', pg_backend_pid(), backend_start FROM pg_stat_activity "
                 "WHERE pid = pg_backend_pid();")
    lines.append(f"COPY ({select}) TO STDOUT;")
    lines.append("COMMIT;")
    return ("\n".join(lines) + "\n").encode("utf-8")


def psql_lines(conn: Connection, stmt: sa.Select, binary: str, *, blocks: bool = False
               ) -> Iterator[list[bytes] | bytes]:
    """Batches of the statement's rows as COPY text lines (UTF-8), read by ``psql``; with
    ``blocks``, each batch is one ``bytes`` of whole lines instead of a list.

    Raises :class:`PsqlFailed` when the child ends in an error before its first row
    (it could not connect, say): the caller may read through libpq instead."""
    from .pgcopy import _client_select, _psycopg_connection
    from . import pgwatch

    if blocks and "numpy" not in sys.modules:
        # the block boundaries need numpy (pgtext.py), from the second block on: imported
        # while the child connects and the server starts its scan
        threading.Thread(target=importlib.import_module, args=("numpy",), daemon=True).start()
    pg = _psycopg_connection(conn)
    snapshot, search_path = conn.exec_driver_sql(
        "SELECT pg_export_snapshot(), current_setting('search_path')").fetchone()
    select = _client_select(conn, stmt)
    source = pgwatch.source_of(pg)
    text = script(select, snapshot, pg.info.server_version, search_path or None)
    with _Child(binary, child_env(pg), text) as child:
        yield from child.lines(source, blocks)


class _Child:
    def __init__(self, binary: str, env: dict[str, str], text: bytes):
        import subprocess
        import tempfile

        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [binary, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env,
            start_new_session=True)  # Ctrl-C reaches this process only, which ends the child
        with contextlib.suppress(OSError, AttributeError):
            import fcntl
            fcntl.fcntl(self.proc.stdout.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
        try:
            self.proc.stdin.write(text)
            self.proc.stdin.close()
        except OSError:
            pass  # it ended already: its stderr says why
        self.pid: int | None = None
        self.backend_start: str | None = None
        self.rows = False  # whether a line of the COPY came yet

    def __enter__(self) -> "_Child":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        with contextlib.suppress(OSError):
            self.proc.stdout.close()
        self.proc.wait()
        self.stderr.close()

    def error(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode("utf-8", "replace")
        for line in text.splitlines():
            line = line.strip()
            if line:
                # psql:<stdin>:7: ERROR:  permission denied for table t
                parts = line.split(":", 3)
                if len(parts) == 4 and parts[0] == "psql" and parts[2].isdigit():
                    line = parts[3].strip()
                line = line.replace("ERROR:  ", "ERROR: ").replace("FATAL:  ", "FATAL: ")
                return redact_text(line)
        return f"psql exited with status {self.proc.returncode}"

    def lines(self, source, blocks: bool) -> Iterator[list[bytes] | bytes]:
        import select

        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        poll = select.poll()
        poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        timeout = source.timeout if source is not None else None
        look_ms = int(1000 * timeout / LOOKS_PER_TIMEOUT) if timeout else 1000
        started = progress_at = time.monotonic()
        next_probe = 0.0
        parts: list[bytes] = []
        size = 0
        carry = b""
        read = os.read
        while True:
            try:
                data = read(fd, PIPE_BYTES)
            except BlockingIOError:
                if not poll.poll(look_ms):
                    if timeout is not None:
                        now = time.monotonic()
                        if now - progress_at >= timeout and now >= next_probe:
                            next_probe = now + timeout
                            self._check_stall(source, started, progress_at)
                continue
            if not data:
                break
            progress_at = time.monotonic()
            parts.append(data)
            size += len(data)
            if size >= BLOCK_BYTES:
                block = carry + b"".join(parts) if carry else b"".join(parts)
                parts, size = [], 0
                end = block.rfind(b"\n") + 1
                carry = block[end:]
                data = self._take(block, end)
                if data:
                    yield data if blocks else data.splitlines(keepends=True)
        block = carry + b"".join(parts)
        if self.proc.wait() != 0:
            if not self.rows:
                raise PsqlFailed(self.error())
            raise sa.exc.DBAPIError("COPY", None, PsqlFailed(self.error()))
        if block and not block.endswith(b"\n"):
            raise SourceError("the COPY output of psql ended in the middle of a line")
        data = self._take(block, len(block))
        if self.pid is None:
            raise PsqlFailed("psql did not say which server process read the table")
        if data:
            yield data if blocks else data.splitlines(keepends=True)

    def _take(self, block: bytes, end: int) -> bytes:
        """The COPY lines of ``block[:end]`` (the first block starts with the process line)."""
        if self.pid is None:
            nl = block.find(b"\n")
            if nl < 0 or nl >= end:
                return b""
            head = block[:nl]
            if not head.startswith(_PID_TAG):
                raise SourceError("psql wrote something before the COPY that is not its process id")
            pid, start = head[len(_PID_TAG):].split(b"|", 1)
            self.pid, self.backend_start = int(pid), start.decode()
            data = block[nl + 1:end]
        else:
            data = block[:end] if end < len(block) else block
        if data:
            self.rows = True
        return data

    def _check_stall(self, source, started: float, progress_at: float) -> None:
        """Nothing came through the pipe for ``timeout`` seconds: ask the server about the
        child's process, as the watchdog asks about the reader's own connection."""
        from . import pgwatch

        if self.proc.poll() is not None:
            return  # it ended: its output is read next
        if self.pid is None:
            # no answer to the child's first statements yet; its connect is bounded by its own
            # connect_timeout, which it reports
            if time.monotonic() - started < 2 * source.timeout + 2:
                return
            self.close()
            raise pgwatch.Stalled(timed_out(source.what, source.timeout,
                                            "the read's own connection got no answer from the server"))
        why = pgwatch.stuck(source, self.pid, self.backend_start, progress_at)
        if why is not None:
            self.close()
            raise pgwatch.Stalled(why)
