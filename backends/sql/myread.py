"""MariaDB/MySQL tables read as ``mytext`` lines (:mod:`.mytext`).

A snapshot's reads go through the ``mariadb`` (or ``mysql``) client, a child process in
batch mode: one session for the whole source, which starts ``START TRANSACTION WITH
CONSISTENT SNAPSHOT, READ ONLY`` and then reads the tables one after another on the same
transaction (one point in time for every table, as the driver's own snapshot gives), each
result followed by a line holding a random token that no row can be.  The client prints
rows at C speed; Python only cuts its output into lines, in blocks of 1 MiB.  The
connection parameters go in a temporary defaults file (mode 0600, removed once the
client is connected), never on its command line; a read that stalls longer than the
source's ``timeout`` ends the child, and so does an error, a closed read or the end of the
reader's transaction.  ``SNAPSHOTTER_MY_CLIENT=0`` turns this off; a URL the client cannot
be given (TLS options, other drivers' settings) or no client on the PATH does too.

Every other read (the restore's, inside its write transaction and with locking reads; reads
by key; a snapshot without the client) goes through PyMySQL with its converters off: the
server's bytes per field, formatted into the same lines in Python (the same bytes, so the
same digests, as the tests check).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import weakref
from typing import TYPE_CHECKING, Any, Iterator

from snapshotter.errors import SourceError

from .. import lazy_module
from . import base
from .dialect import of
from .mytext import encoding_doc, format_row, iter_lines, mask_expressions

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

sa = lazy_module("sqlalchemy")

#: bytes read from the client at a time
BLOCK = 1 << 20
#: rows per batch of the driver's path
ROW_BATCH = 2000

#: connections whose transaction is a snapshot's (``begin_snapshot``): only their reads use
#: the client, whose own transaction then stands for theirs
SNAPSHOT_CONNS: "weakref.WeakSet[Any]" = weakref.WeakSet()
#: the client session of each such connection
_SESSIONS: "weakref.WeakKeyDictionary[Any, ClientSession | None]" = weakref.WeakKeyDictionary()
#: (what, timeout) of each engine, from the dialect's ``watch``
WATCHED: "weakref.WeakKeyDictionary[Any, tuple[str, float]]" = weakref.WeakKeyDictionary()


def client_enabled() -> bool:
    return os.environ.get("SNAPSHOTTER_MY_CLIENT", "1").strip().lower() not in ("0", "false", "no", "off")


def client_binary() -> str | None:
    return shutil.which("mariadb") or shutil.which("mysql")


def line_select(conn: Connection, schema_doc: dict, where=None, for_update: bool = False) -> tuple[Any, dict]:
    """The SELECT of a table's lines (key columns first, then the mask fields), in key order,
    and the encoding document."""
    d = of(conn)
    t = base.lightweight_table(schema_doc)
    pk = list(schema_doc["primary_key"])
    types = {c["name"]: c["type"] for c in schema_doc["columns"]}
    names = pk + [c["name"] for c in schema_doc["columns"] if c["name"] not in pk]
    plain = sa.select(*[t.c[n] for n in names]).select_from(t)
    doc = encoding_doc(_fields(conn, plain.limit(0)), pk)
    q = conn.dialect.identifier_preparer.quote
    masks = [sa.literal_column(m) for m in mask_expressions([q(c) for c in doc["masked"]])]
    stmt = plain.add_columns(*masks) if masks else plain
    if where is not None:
        stmt = stmt.where(where(t))
    stmt = stmt.order_by(*[d.order_key(conn, t.c[k], types[k]) for k in pk])
    return (d.locking_read(stmt) if for_update else stmt), doc


def _fields(conn: Connection, stmt) -> list[tuple[str, int, int, int]]:
    """Name, type code, character set number and flags of each field of a result."""
    raw = conn.connection.dbapi_connection
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    cur = raw.cursor()
    try:
        cur.execute(sql)
        return [(f.name, f.type_code, f.charsetnr, f.flags) for f in cur._result.fields]
    finally:
        cur.close()


def read_lines(conn: Connection, schema_doc: dict, *, where=None, fast: bool | None = None,
               batch: int | None = None, for_update: bool = False) -> tuple[dict, Iterator[list[bytes]]]:
    """The table's encoding document and batches of its lines in key order: through the
    client for a whole table read in a snapshot's transaction, else through the driver
    (``for_update``: with a locking read)."""
    stmt, doc = line_select(conn, schema_doc, where, for_update)
    session = None
    if where is None and not for_update and fast is not False and conn in SNAPSHOT_CONNS:
        session = _session(conn)
    if fast and session is None:
        raise SourceError(f"table {schema_doc['table']} cannot be read through the mariadb/mysql client")
    if session is not None:
        sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        return doc, session.lines(sql)
    return doc, driver_lines(conn, stmt, doc, batch or ROW_BATCH)


# -- the driver's path --------------------------------------------------------------------

def driver_lines(conn: Connection, stmt, doc: dict, batch: int = ROW_BATCH) -> Iterator[list[bytes]]:
    """The statement's rows as lines, through PyMySQL with its converters off (the server's
    bytes per field), formatted as the client prints them."""
    raw = conn.connection.dbapi_connection
    charset = getattr(raw, "charset", "utf8mb4")
    results_set = charset not in ("utf8mb4", "utf8mb3", "utf8")
    masked_index = [doc["columns"].index(c) for c in doc["masked"]]
    ncol = len(doc["columns"])
    if results_set:
        conn.exec_driver_sql("SET character_set_results = utf8mb4")
    try:
        use_unicode, decoders = raw.use_unicode, raw.decoders
        raw.use_unicode, raw.decoders = False, {}
        try:
            # the converters are chosen when the result's fields are read (at execute)
            result = conn.execute(stmt, execution_options={"stream_results": True, "yield_per": batch})
        finally:
            raw.use_unicode, raw.decoders = use_unicode, decoders
        for part in result.partitions(batch):
            yield [format_row(tuple(row)[:ncol], masked_index) for row in part]
    finally:
        if results_set:
            with contextlib.suppress(Exception):
                conn.exec_driver_sql(f"SET character_set_results = {charset}")


# -- the client's path --------------------------------------------------------------------

def _session(conn: Connection) -> "ClientSession | None":
    """The client session reading for this snapshot connection, started at its first read;
    None when the client is not used (then every read of the connection takes the driver's
    path: one transaction for all of them)."""
    if conn in _SESSIONS:
        s = _SESSIONS[conn]
        if s is not None and s.broken:
            raise SourceError("the mariadb/mysql client reading this snapshot ended before the snapshot did")
        return s
    s = None
    if client_enabled():
        binary = client_binary()
        options = _client_options(conn.engine.url) if binary else None
        if options is not None:
            what, timeout = WATCHED.get(conn.engine, (base.redact(conn.engine.url), 30.0))
            tz = conn.exec_driver_sql("SELECT @@session.time_zone").scalar()
            s = ClientSession(binary, options, what, timeout, tz)
            base.tracked(conn, s)  # ended with the reader's transaction
    _SESSIONS[conn] = s
    return s


def _client_options(url) -> dict[str, str] | None:
    """The client's settings for a URL (None: settings the client cannot be given)."""
    if url.get_driver_name() not in ("pymysql", "", None):
        return None
    query = dict(url.query)
    socket = query.pop("unix_socket", None)
    query.pop("charset", None)
    if query:
        return None  # TLS and other driver settings: the driver's path
    out = {"user": url.username or "", "database": url.database or ""}
    if url.password is not None:
        out["password"] = url.password
    if socket:
        out["socket"] = socket
        out["protocol"] = "SOCKET"
    else:
        out["host"] = url.host or "localhost"
        out["port"] = str(url.port or 3306)
        out["protocol"] = "TCP"
    return out


def _option_value(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _end(proc) -> None:
    with contextlib.suppress(Exception):
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


class ClientSession:
    """One ``mariadb``/``mysql`` client in batch mode, reading a snapshot's tables on one
    consistent-snapshot transaction."""

    def __init__(self, binary: str, options: dict[str, str], what: str, timeout: float, time_zone: str | None):
        import subprocess
        import tempfile

        self.what = what
        self.timeout = float(timeout)
        self.broken = False
        self.token = b"snapshotter-end-" + secrets.token_hex(16).encode()
        self._line = self.token + b"\n"
        self._tail = b"\n" + self._line
        fd, self._defaults = tempfile.mkstemp(prefix="snapshotter-my-", suffix=".cnf")
        try:
            os.fchmod(fd, 0o600)
            text = "[client]\n" + "".join(f"{k}={_option_value(v)}\n" for k, v in options.items() if k != "database")
            text += "default-character-set=utf8mb4\nmax-allowed-packet=1073741824\n"
            os.write(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
        env = {k: v for k, v in os.environ.items() if k not in ("MYSQL_PWD", "MYSQL_HOST", "MYSQL_TCP_PORT")}
        argv = [binary, f"--defaults-file={self._defaults}", "--batch", "--skip-column-names", "--quick",
                "--unbuffered", "--skip-auto-rehash", "--connect-timeout", str(max(1, int(self.timeout)))]
        if options.get("database"):
            argv.append(options["database"])
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            self._remove_defaults()
            raise SourceError(f"{what}: cannot start the mariadb/mysql client: {exc}") from None
        # ended if this object is dropped without close (its transaction is the server's to end)
        weakref.finalize(self, _end, self.proc)
        start = "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ;\n"
        if time_zone:
            start += f"SET time_zone = '{time_zone.replace(chr(39), '')}';\n"
        start += "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY;\n"
        try:
            for _ in self._run(start):
                pass
        finally:
            self._remove_defaults()

    def _remove_defaults(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._defaults)

    def lines(self, sql: str) -> Iterator[list[bytes]]:
        """Batches of the lines of one SELECT's rows."""
        blocks = self._run(sql + ";\n")
        try:
            for block in blocks:
                yield iter_lines(block)
        finally:
            blocks.close()

    def _run(self, statements: str) -> Iterator[bytes]:
        """Send statements, then blocks of whole lines of their output until the token."""
        import select

        if self.broken:
            raise SourceError(f"{self.what}: the mariadb/mysql client ended before the snapshot did")
        done = False
        try:
            try:
                self.proc.stdin.write(statements.encode("utf-8") + b"SELECT '" + self.token + b"';\n")
                self.proc.stdin.flush()
            except OSError:
                raise SourceError(self._failure()) from None
            fd = self.proc.stdout.fileno()
            carry = b""
            while True:
                ready, _, _ = select.select([fd], [], [], self.timeout)
                if not ready:
                    from snapshotter.timeouts import timed_out
                    raise SourceError(timed_out(self.what, self.timeout, "no rows from the mariadb/mysql client"))
                block = os.read(fd, BLOCK)
                if not block:
                    raise SourceError(self._failure())
                data = carry + block if carry else block
                if data.endswith(self._tail) or data == self._line:
                    body = data[:-len(self._line)]
                    if body:
                        yield body
                    done = True
                    return
                cut = data.rfind(b"\n") + 1
                carry = data[cut:]
                if cut:
                    yield data[:cut]
        finally:
            if not done:
                self.close()

    def _failure(self) -> str:
        """The client's error as one line."""
        import subprocess

        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        err = self.proc.stderr.read().decode("utf-8", "replace") if self.proc.stderr else ""
        lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith("---")]
        found = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
        detail = found[0] if found else f"exit status {self.proc.returncode}"
        return f"{self.what}: the mariadb/mysql client failed: {detail}"

    def close(self) -> None:
        """End the child (a transaction it holds is rolled back by the server)."""
        if self.broken:
            return
        self.broken = True
        p = self.proc
        with contextlib.suppress(Exception):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=5)
        for f in (p.stdin, p.stdout, p.stderr):
            with contextlib.suppress(Exception):
                f.close()
        self._remove_defaults()
