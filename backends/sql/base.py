"""What every SQLAlchemy-based backend shares: engines, the point-in-time read
transaction per dialect, key ordering that matches Python's, schema capture and
recreation, and the translation of SQLAlchemy errors.

Values are read *raw* (as the DB-API driver returns them, without SQLAlchemy
type processing) and written back the same way, so what is restored is what
was stored, bit for bit, on every dialect.
"""
from __future__ import annotations

import contextlib
import decimal
import hashlib
import math
import os
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from snapshotter import codec
from snapshotter.errors import ConfigError, Refused, SourceError
from snapshotter.redaction import redact_text, redact_url

from .. import lazy_module
from . import integrity, pgcopy

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

sa = lazy_module("sqlalchemy")

FETCH_BATCH = 5000


def resolve_url(url: str, base_dir: str | None, where: str) -> sa.URL:
    try:
        u = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ConfigError(redact_text(f"{where}: invalid database URL: {exc}")) from None
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" \
            and not u.database.startswith("file:") and not os.path.isabs(u.database) and base_dir:
        u = u.set(database=os.path.normpath(os.path.join(base_dir, u.database)))
    return u


def sqlite_file(url: sa.URL) -> str | None:
    """The file a SQLite URL opens, or None when it opens an in-memory database
    (``sqlite://``, ``:memory:``, a ``file:`` URI with ``mode=memory``)."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    db = url.database
    uri = str(url.query.get("uri", "")).lower() in ("true", "1", "yes")
    if not (uri and db.startswith("file:")):
        return db
    from urllib.parse import parse_qs, unquote
    path, _, query = db[len("file:"):].partition("?")
    mode = parse_qs(query).get("mode", [None])[-1] or url.query.get("mode")
    if path.startswith("//"):  # file://HOST/path: SQLite accepts an empty host or localhost
        path = "/" + path[2:].partition("/")[2]
    path = unquote(path)
    return None if mode == "memory" or path in ("", ":memory:") else path


def check_sqlite_file(url: sa.URL, where: str, *, create: bool) -> None:
    """A SQLite URL must name an existing file: SQLite would create an empty database
    in its place, and a typo in a path would snapshot nothing and restore into that
    empty file.  ``create`` (``restore --create-missing``) makes the missing folders
    and lets SQLite create the file, for a database that is really gone."""
    path = sqlite_file(url)
    if path is None or os.path.exists(path):
        return
    folder = os.path.dirname(os.path.abspath(path))
    if create:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot create the folder of SQLite database {path}: "
                              f"{exc.strerror or exc}") from None
        return
    what = "neither the file nor its folder exists" if not os.path.isdir(folder) else "the file does not exist"
    raise ConfigError(f"{where}: no SQLite database at {path} ({what}); check the url "
                      f"(restore --create-missing recreates a database that is gone)")


def redact(url: sa.URL) -> str:
    """The URL for manifests and messages: no password, in its userinfo or its query."""
    return redact_url(url.render_as_string(hide_password=False))


def _connect_args(url: sa.URL, timeout: float) -> dict[str, Any]:
    """The driver's timeouts (module docs of :mod:`snapshotter.timeouts`): each connect and
    each read bounded, never a whole scan.  A setting the URL's query gives wins."""
    backend, driver = url.get_backend_name(), url.get_driver_name()
    whole = max(1, math.ceil(timeout))
    if backend == "sqlite":
        # how long a statement waits for another connection's lock ("database is locked")
        args: dict[str, Any] = {"timeout": timeout}
    elif backend == "postgresql" and driver in ("psycopg", "psycopg2"):
        # libpq: connect_timeout bounds the connect (2 s at least); a read has no client-side
        # bound (a 20 GB COPY is one statement), so a server or network that went away is
        # found by TCP: keepalive probes on an idle socket and tcp_user_timeout for data
        # left unacknowledged, each within about the timeout
        args = {"connect_timeout": max(2, whole), "keepalives": 1, "keepalives_idle": whole,
                "keepalives_interval": max(1, math.ceil(timeout / 3)), "keepalives_count": 3,
                "tcp_user_timeout": int(timeout * 1000)}
    elif backend in ("mysql", "mariadb") and driver == "pymysql":
        # bounds on each socket connect, read and write
        args = {"connect_timeout": timeout, "read_timeout": timeout, "write_timeout": timeout}
    elif backend in ("mysql", "mariadb") and driver == "mysqldb":
        args = {"connect_timeout": whole, "read_timeout": whole, "write_timeout": whole}
    else:
        args = {}
    return {k: v for k, v in args.items() if k not in url.query}


def _timeout_error(orig: BaseException | None, backend: str) -> str | None:
    """What kind of timeout a driver error is: "timeout", "idle" (the database ended an idle
    transaction) or None (another error)."""
    if orig is None:
        return None
    text = str(orig).lower()
    if getattr(orig, "sqlstate", None) == "25P03" or "idle-in-transaction timeout" in text \
            or "idle_transaction_timeout" in text:
        return "idle"
    if backend == "sqlite":
        return "timeout" if "database is locked" in text or "database table is locked" in text else None
    if "timeout expired" in text or "timed out" in text:
        return "timeout"
    return None


def make_engine(url: sa.URL, where: str, timeout: float | None = None,
                idle_timeout: float | None = None) -> Engine:
    """An engine whose connections wait at most ``timeout`` seconds for each connect and read
    (:data:`~snapshotter.timeouts.DEFAULT_TIMEOUT` when None); a driver timeout becomes one
    line naming ``where``, the database and the bound."""
    from snapshotter.timeouts import DEFAULT_TIMEOUT, seconds, timed_out
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    try:
        connect_args = _connect_args(url, timeout)
        kwargs: dict[str, Any] = {"isolation_level": "AUTOCOMMIT", "connect_args": connect_args}
        if url.get_backend_name() != "sqlite":
            kwargs["pool_pre_ping"] = True
        engine = sa.create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{where}: the database driver is not installed ({exc.name}); "
                          f"install the matching extra, e.g. snapshotter[postgres]") from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigError(redact_text(f"{where}: {exc}")) from None
    backend = url.get_backend_name()

    def on_error(context) -> None:
        if getattr(context, "is_pre_ping", False):
            return  # the pool opens a new connection in its place
        orig = context.original_exception
        kind = _timeout_error(orig, backend)
        if kind is None:
            return
        args = getattr(orig, "args", ())
        text = args[1] if len(args) == 2 and isinstance(args[0], int) else str(orig)  # PyMySQL: (code, text)
        detail = str(text).strip().splitlines()[0] if str(text).strip() else type(orig).__name__
        if kind == "idle":
            bound = f" ({seconds(idle_timeout)} s, idle_timeout)" if idle_timeout else ""
            raise SourceError(f"{where}: {redact(url)} ended the restore's transaction: it was idle longer "
                              f"than the database allows{bound}: {detail}") from orig
        if backend == "sqlite":
            # SQLite may also answer "locked" at once (a read transaction that cannot become a write)
            raise SourceError(f"{where}: {redact(url)}: {detail} (another connection holds its lock; a "
                              f"statement waits up to {seconds(timeout)} s, the timeout)") from orig
        connecting = context.connection is None
        what = f"{where}: {'cannot connect to ' if connecting else ''}{redact(url)}"
        bound = timeout
        if connecting and "connect_timeout" in connect_args and "connect_timeout" not in url.query:
            bound = connect_args["connect_timeout"]  # libpq waits 2 s at least
        raise SourceError(timed_out(what, bound, detail)) from orig

    sa.event.listen(engine, "handle_error", on_error)
    return engine


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """SQLAlchemy and driver errors become one-line SourceErrors (no SQL, no parameters)."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        orig = getattr(exc, "orig", None)
        msg = str(orig).strip().splitlines()[0] if orig is not None and str(orig).strip() else type(exc).__name__
        if _conflict(orig):
            # a serialization failure or deadlock: another transaction wrote the same rows meanwhile
            raise Refused(redact_text(f"{what}: {msg}: the store changed under the command; its transaction was "
                                      f"rolled back: run it again")) from exc
        raise SourceError(redact_text(f"{what}: {msg}")) from exc
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(redact_text(f"{what}: {str(exc).splitlines()[0]}")) from exc


def _conflict(orig: Any) -> bool:
    """A driver error that says another transaction got in the way (PostgreSQL 40001/40P01,
    MariaDB/MySQL deadlock 1213)."""
    if getattr(orig, "sqlstate", None) in ("40001", "40P01"):
        return True
    args = getattr(orig, "args", ())
    return bool(args) and args[0] == 1213 and type(orig).__module__.startswith("pymysql")


def translating(it: Iterator, what: str) -> Iterator:
    """``it``, with its errors translated as by :func:`translate_errors`."""
    with translate_errors(what):
        yield from it


def dialect(conn_or_engine) -> str:
    return conn_or_engine.dialect.name


def begin_snapshot(conn: Connection) -> str:
    """Start a read-only transaction that sees one point in time. Returns the guarantee."""
    d = dialect(conn)
    if d == "postgresql":
        conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    elif d in ("mysql", "mariadb"):
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
    elif d == "sqlite":
        # a deferred transaction takes its read snapshot at the first SELECT and
        # keeps it (WAL) or holds the shared lock (rollback journal) until COMMIT
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    else:
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        conn.exec_driver_sql("BEGIN")
    return "snapshot-isolation"


def end_transaction(conn: Connection, commit: bool) -> None:
    with contextlib.suppress(Exception):
        conn.exec_driver_sql("COMMIT" if commit else "ROLLBACK")


def begin_write(conn: Connection) -> None:
    d = dialect(conn)
    if d == "sqlite":
        # the restore keeps foreign-key actions from firing and proves the keys itself
        # (backends/integrity.py); the pragma is a no-op inside a transaction
        conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif d in ("mysql", "mariadb"):
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("START TRANSACTION")
    elif d == "postgresql":
        # a concurrent write to a row the restore also writes fails the commit
        # instead of being silently overwritten without quarantine
        conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
    else:
        conn.exec_driver_sql("BEGIN")


class SQLConnection:
    """The database side of a SQL-backed source: its URL (relative SQLite paths
    resolved against the config file's folder), a lazily made engine, and
    connections whose errors name the source without its password.  Mixed into
    backends that set ``config["url"]``, ``base_dir`` and ``where``."""

    _url: sa.URL | None = None
    _engine: Engine | None = None
    _empty_engine: Engine | None = None
    #: ``restore --create-missing``: a SQLite file that is gone is created by the restore's
    #: writer; a read (the plan, a dry run) sees an empty database in its place
    create_missing: bool = False

    @property
    def url(self) -> sa.URL:
        if self._url is None:
            self._url = resolve_url(self.config["url"], getattr(self, "base_dir", None), self.where)
        return self._url

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.url, self.where, self.config.get("timeout"),
                                       self.config.get("idle_timeout"))
        return self._engine

    def connect(self, *, write: bool = False) -> Connection:
        """A connection; ``write``: for the restore's write transaction (which alone
        may create a missing SQLite file, with :attr:`create_missing`)."""
        path = sqlite_file(self.url)
        if path is not None and not os.path.exists(path):
            if self.create_missing and not write:
                # nothing is created before the restore writes: plan against an empty database
                if self._empty_engine is None:
                    self._empty_engine = make_engine(sa.engine.make_url("sqlite://"), self.where)
                return self._empty_engine.connect()
            check_sqlite_file(self.url, self.where, create=self.create_missing)
        with translate_errors(f"{self.where}: cannot connect to {redact(self.url)}"):
            conn = self.engine.connect()
        if write:
            self._bound_idle_transaction(conn)
        return conn

    def _bound_idle_transaction(self, conn: Connection) -> None:
        """The restore's write transaction is ended by the database once it has been idle
        ``idle_timeout`` seconds (while the restore plans, writes and verifies other stores):
        a restore stuck beyond that never leaves it open, holding its locks."""
        from snapshotter.timeouts import DEFAULT_IDLE_TIMEOUT
        idle = self.config.get("idle_timeout") or DEFAULT_IDLE_TIMEOUT
        d = dialect(conn)
        try:
            with translate_errors(f"{self.where}: cannot set up the write transaction"):
                if d == "postgresql":
                    conn.exec_driver_sql(f"SET idle_in_transaction_session_timeout = {max(1, int(idle * 1000))}")
                elif d in ("mysql", "mariadb") and getattr(conn.dialect, "is_mariadb", False):
                    conn.exec_driver_sql(f"SET SESSION idle_transaction_timeout = {max(1, math.ceil(idle))}")
        except BaseException:
            conn.close()
            raise


class WriteTransaction:
    """One write transaction per database, shared by every writer of this process
    that points at it.

    Two sources on one database (a ``conversation`` table and ``sql`` tables in
    the same SQLite file, say) would otherwise each hold a write transaction,
    and on SQLite the second would wait for the first until it timed out.
    Shared, they also commit or roll back together: the restore of one
    database is atomic.  The last writer to leave commits, unless any left
    with a rollback.
    """

    _open: dict[str, "WriteTransaction"] = {}
    _guard = threading.Lock()

    def __init__(self, key: str, conn: Connection):
        self.key = key
        self.conn = conn
        self.users = 0
        self.failed = False
        self.guard = integrity.Guard(conn, dialect(conn))

    @classmethod
    def join(cls, backend) -> "WriteTransaction":
        key = backend.url.render_as_string(hide_password=False)
        with cls._guard:
            txn = cls._open.get(key)
            if txn is None:
                conn = backend.connect(write=True)
                try:
                    with translate_errors(f"{backend.where}: cannot start a write transaction"):
                        begin_write(conn)
                except BaseException:
                    conn.close()
                    raise
                txn = cls._open[key] = cls(key, conn)
            txn.users += 1
            return txn

    def leave(self, commit: bool, where: str) -> None:
        with self._guard:
            if not commit:
                self.failed = True
            self.users -= 1
            if self.users > 0:
                return
            del self._open[self.key]
        try:
            if self.failed:
                end_transaction(self.conn, commit=False)
            else:
                with translate_errors(f"{where}: commit failed"):
                    self.conn.exec_driver_sql("COMMIT")
        finally:
            try:
                with contextlib.suppress(Exception):
                    self.guard.end()
            finally:
                self.conn.close()


def is_text_type(type_text: str) -> bool:
    t = type_text.upper()
    return any(w in t for w in ("CHAR", "TEXT", "CLOB", "STRING", "CITEXT", "NAME"))


#: PostgreSQL server encodings whose byte order is code point order (LATIN1 maps bytes
#: to U+0000-U+00FF one to one); in any other, text keys are ordered as UTF-8 bytes
BYTES_IN_CODE_POINT_ORDER = {"UTF8", "SQL_ASCII", "LATIN1"}


def _pg_server_encoding(conn: Connection) -> str:
    cache = conn.info
    if "snapshotter.server_encoding" not in cache:
        cache["snapshotter.server_encoding"] = str(conn.exec_driver_sql("SHOW server_encoding").scalar()).upper()
    return cache["snapshotter.server_encoding"]


#: MariaDB/MySQL key types (leading word of the type's text) whose values the database
#: orders as Python orders the values the driver returns; other non-text key types (ENUM
#: and SET: their declaration order) are ordered by their text, as text keys are.
#: PostgreSQL decides by the column's base type instead (:data:`PG_VALUE_ORDERED_TYPES`)
VALUE_ORDERED_TYPES = frozenset({
    "SMALLINT", "INTEGER", "INT", "BIGINT", "TINYINT", "MEDIUMINT", "NUMERIC", "DECIMAL", "REAL",
    "DOUBLE", "FLOAT", "DATE", "DATETIME", "TIMESTAMP", "TIME", "YEAR", "UUID", "BOOLEAN", "BOOL",
    "BLOB", "TINYBLOB", "MEDIUMBLOB", "LONGBLOB", "BINARY", "VARBINARY", "BIT",
})


def _orders_as_text(type_text: str) -> bool:
    if is_text_type(type_text):
        return True
    words = type_text.upper().replace("(", " ").split()
    return bool(words) and words[0] not in VALUE_ORDERED_TYPES


#: PostgreSQL base types whose values psycopg loads as Python values that order as the
#: database orders them (money and the reg* types are numeric to PostgreSQL but load as text)
PG_VALUE_ORDERED_TYPES = frozenset({
    "int2", "int4", "int8", "float4", "float8", "numeric", "oid", "bool", "date", "time", "timetz",
    "timestamp", "timestamptz", "interval", "uuid", "bytea", "bit", "varbit",
})


def _pg_orders_as_text(conn: Connection, column: sa.ColumnClause) -> bool:
    """Decided by the column's base type (a domain's ``typbasetype``; its name says nothing):
    enums, network addresses, ranges and unknown types load as text or order otherwise."""
    table = column.table
    q = conn.dialect.identifier_preparer.quote
    name = q(table.name) if not getattr(table, "schema", None) else f"{q(table.schema)}.{q(table.name)}"
    row = conn.exec_driver_sql("""
        SELECT b.typcategory, b.typname FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
        WHERE a.attrelid = %(t)s::regclass AND a.attname = %(c)s""", {"t": name, "c": column.name}).fetchone()
    if row is None:
        return False
    category, typname = row
    if category == "A":  # arrays order element by element, as Python lists do
        return False
    return typname not in PG_VALUE_ORDERED_TYPES


def order_expr(conn: Connection, column: sa.ColumnClause, type_text: str):
    """ORDER BY term so the database sorts like Python does (code point order)."""
    d = dialect(conn)
    if d == "sqlite":
        return column.collate("BINARY") if is_text_type(type_text) else column
    if d == "postgresql" and not is_text_type(type_text):
        if not _pg_orders_as_text(conn, column):
            return column
    elif not _orders_as_text(type_text):
        return column
    if d == "postgresql":
        # citext compares case-folded whatever the collation ('a' < 'B'), an enum in its
        # declaration order, inet by address: their text does not
        text = column if is_text_type(type_text) and "CITEXT" not in type_text.upper() else sa.cast(column, sa.Text)
        if _pg_server_encoding(conn) not in BYTES_IN_CODE_POINT_ORDER:
            # COLLATE "C" compares the server encoding's bytes: in WIN1252 '€' (0x80) sorts
            # before 'é' (0xE9); the same text as UTF-8 bytes sorts by code point
            return sa.func.convert_to(text, sa.literal_column("'UTF8'"))
        return text.collate("C")
    if d in ("mysql", "mariadb"):
        # the bytes of the text as UTF-8: a latin1 column's own bytes (cp1252: '€' is 0x80)
        # are not in code point order; an ENUM converted to text is its label
        return sa.cast(sa.func.convert(column, sa.literal_column("CHAR CHARACTER SET utf8mb4")), sa.LargeBinary)
    return column


def type_text(conn: Connection, coltype: Any) -> str:
    try:
        return coltype.compile(dialect=conn.dialect)
    except Exception:
        return str(coltype)


def _pg_type_names(conn: Connection, table: str, schema: str | None) -> dict[str, str]:
    """PostgreSQL's own text of each column's type (``format_type``), for types SQLAlchemy
    does not know (point, tsvector, PostGIS geometry, ...), so a dropped table is recreated
    with them."""
    name = conn.dialect.identifier_preparer.quote(table)
    if schema:
        name = conn.dialect.identifier_preparer.quote(schema) + "." + name
    # format_type leaves out the schema of a type that is on the session's search path; the
    # schema is added back, so the name is the same whatever the path is
    rows = conn.exec_driver_sql("""
        SELECT a.attname,
               CASE WHEN n.nspname = 'pg_catalog' OR NOT pg_type_is_visible(b.oid)
                    THEN format_type(a.atttypid, a.atttypmod)
                    ELSE quote_ident(n.nspname) || '.' || format_type(a.atttypid, a.atttypmod) END
        FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        JOIN pg_type b ON b.oid = CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE t.oid END
        JOIN pg_namespace n ON n.oid = b.typnamespace
        WHERE a.attrelid = %(t)s::regclass AND a.attnum > 0 AND NOT a.attisdropped""", {"t": name}).fetchall()
    return {r[0]: r[1] for r in rows}


def table_schema(conn: Connection, table: str, schema: str | None) -> dict:
    insp = sa.inspect(conn)
    with warnings.catch_warnings():
        # an unrecognised type is reflected as NullType; its real name is asked for below
        warnings.filterwarnings("ignore", message="Did not recognize type", category=sa.exc.SAWarning)
        cols = insp.get_columns(table, schema=schema)
    unknown = [c["name"] for c in cols if isinstance(c["type"], sa.types.NullType)]
    if unknown and dialect(conn) == "postgresql":
        names = _pg_type_names(conn, table, schema)
        for c in cols:
            if c["name"] in unknown and c["name"] in names:
                c["type_text"] = names[c["name"]]
    pk = insp.get_pk_constraint(table, schema=schema).get("constrained_columns") or []
    try:
        with warnings.catch_warnings():
            # an expression index is left out here; the "ddl" part below holds it
            warnings.filterwarnings("ignore", message="Skipped unsupported reflection", category=sa.exc.SAWarning)
            indexes = insp.get_indexes(table, schema=schema)
    except NotImplementedError:
        indexes = []
    doc = {
        "dialect": dialect(conn),
        "table": table,
        "db_schema": schema,
        "columns": [{"name": c["name"], "type": c.get("type_text") or type_text(conn, c["type"]),
                     "nullable": bool(c.get("nullable", True))} for c in cols],
        "primary_key": list(pk),
        "indexes": [{"name": i["name"], "columns": [c for c in i["column_names"] if c], "unique": bool(i.get("unique"))}
                    for i in indexes if i.get("name") and all(i.get("column_names") or [None])],
    }
    from . import ddl
    definition = ddl.capture(conn, table, schema)
    if definition is not None:
        # what the database says the table is, for recreating it as it was (docs/design.md)
        doc["ddl"] = definition
    return doc


def estimated_bytes(conn: Connection, schema_doc: dict) -> int | None:
    """The table's size as the database's statistics tell it, without a scan (None if unknown)."""
    d = dialect(conn)
    try:
        if d == "postgresql":
            name = conn.dialect.identifier_preparer.quote(schema_doc["table"])
            if schema_doc.get("db_schema"):
                name = conn.dialect.identifier_preparer.quote(schema_doc["db_schema"]) + "." + name
            return int(conn.exec_driver_sql("SELECT pg_table_size(%(t)s::regclass)", {"t": name}).scalar() or 0) or None
        if d in ("mysql", "mariadb"):
            v = conn.exec_driver_sql("SELECT data_length FROM information_schema.tables WHERE table_schema = "
                                     "COALESCE(%(s)s, DATABASE()) AND table_name = %(t)s",
                                     {"s": schema_doc.get("db_schema"), "t": schema_doc["table"]}).scalar()
            return int(v or 0) or None
        if d == "sqlite" and not schema_doc.get("db_schema"):
            # the table's pages (dbstat, when SQLite was built with it; else no estimate)
            v = conn.exec_driver_sql("SELECT sum(pgsize) FROM dbstat WHERE name = ?", (schema_doc["table"],)).scalar()
            return int(v or 0) or None
    except sa.exc.SQLAlchemyError:
        return None
    return None


def lightweight_table(schema_doc: dict) -> sa.TableClause:
    """A table clause without types: values pass to and from the driver unprocessed."""
    return sa.table(schema_doc["table"], *[sa.column(c["name"]) for c in schema_doc["columns"]],
                    schema=schema_doc.get("db_schema"))


def select_stmt(conn: Connection, schema_doc: dict, where=None) -> sa.Select:
    """Every column of the table, in key order (Python's order; see :func:`order_expr`)."""
    t = lightweight_table(schema_doc)
    types = {c["name"]: c["type"] for c in schema_doc["columns"]}
    stmt = sa.select(*[t.c[c["name"]] for c in schema_doc["columns"]]).select_from(t)
    if where is not None:
        stmt = stmt.where(where(t))
    return stmt.order_by(*[order_expr(conn, t.c[k], types[k]) for k in schema_doc["primary_key"]])


def reads_lines(conn: Connection) -> bool:
    """Whether tables of this database are captured as ``pgtext`` lines (PostgreSQL)."""
    return dialect(conn) == "postgresql"


def read_lines(conn: Connection, schema_doc: dict, *, where=None, fast: bool | None = None,
               batch: int = pgcopy.LINE_BATCH) -> tuple[dict, Iterator[list[bytes]]]:
    """PostgreSQL: the table's encoding document and batches of its rows as ``pgtext``
    lines, in key order.  Through COPY when the driver is psycopg (unless ``fast``
    is False or ``SNAPSHOTTER_PG_COPY=0``), else through a cursor; the lines are
    the same either way."""
    from snapshotter.pgtext import encoding_doc

    stmt = select_stmt(conn, schema_doc, where)
    names = [c["name"] for c in schema_doc["columns"]]
    oids = pgcopy.column_oids(conn, stmt)
    doc = encoding_doc(names, oids, schema_doc["primary_key"])
    use_copy = (fast if fast is not None else pgcopy.enabled()) and pgcopy._psycopg_connection(conn) is not None
    if fast and not use_copy:
        raise SourceError(f"table {schema_doc['table']} cannot be read through COPY (the driver is not psycopg)")

    def lines() -> Iterator[list[bytes]]:
        with pgcopy.pgtext_settings(conn):
            if use_copy:
                yield from pgcopy.copy_lines(conn, stmt, batch)
            else:
                yield from pgcopy.cursor_lines(conn, stmt, batch)
    return doc, lines()


def read_rows(conn: Connection, schema_doc: dict, *, where=None, batch: int = FETCH_BATCH,
              fast: bool | str | None = None, for_update: bool = False) -> Iterator[list[Record]]:
    """Batches of ``(key, {column: value})`` in key order.

    On PostgreSQL the rows come through COPY (:mod:`snapshotter_backends.sql.pgcopy`) when it
    can promise the same records as the cursor below.  ``fast`` forces a
    path: ``False`` the cursor, ``True`` COPY, ``"text"``/``"binary"`` COPY
    in that format; a forced COPY that cannot be exact is an error.
    """
    stmt = select_stmt(conn, schema_doc, where)
    pk = schema_doc["primary_key"]
    names = [c["name"] for c in schema_doc["columns"]]
    if for_update and dialect(conn) in ("mysql", "mariadb"):
        # a restore plans on MariaDB/MySQL with locking reads: their writes act on the
        # latest rows, so without locks a concurrent change could be overwritten unseen
        # (PostgreSQL's REPEATABLE READ fails the commit instead)
        stmt = stmt.with_for_update()
    pk_idx = [names.index(k) for k in pk]
    use_copy = fast if fast is not None else (dialect(conn) == "postgresql" and pgcopy.enabled())
    if use_copy:
        binary = {"text": False, "binary": True}.get(fast) if isinstance(fast, str) else None
        copy_plan = pgcopy.plan(conn, stmt, binary=binary) if dialect(conn) == "postgresql" else None
        if copy_plan is not None:
            yield from pgcopy.read_rows(conn, copy_plan, names, pk_idx, batch)
            return
        if fast is not None:
            raise SourceError(f"table {schema_doc['table']} cannot be read exactly through COPY"
                              f"{' in ' + fast + ' format' if isinstance(fast, str) else ''}")
    single = len(pk_idx) == 1
    # per statement (Connection.execution_options() would set server-side cursors for the connection)
    result = conn.execute(stmt, execution_options={"stream_results": True, "yield_per": batch})
    for part in result.partitions(batch):
        out = []
        for row in part:
            row = tuple(row)
            key = row[pk_idx[0]] if single else [row[i] for i in pk_idx]
            out.append((key, dict(zip(names, row))))
        yield out


Record = tuple


#: what PostgreSQL snapshots from before type names were recorded hold for a type SQLAlchemy
#: did not know: it matches whatever the live column is (other dialects still record it, and
#: there it must match exactly)
UNKNOWN_TYPE = "NULL"


def schema_differences(snap: dict, live: dict) -> list[str]:
    diffs = []
    scols = {c["name"]: c for c in snap["columns"]}
    lcols = {c["name"]: c for c in live["columns"]}
    for name in scols:
        if name not in lcols:
            diffs.append(f"column {name} missing from the live table")
        elif scols[name]["type"].upper() != lcols[name]["type"].upper() and not (
                scols[name]["type"] == UNKNOWN_TYPE and snap.get("dialect") == "postgresql"):
            diffs.append(f"column {name} is {lcols[name]['type']} (snapshot: {scols[name]['type']})")
    for name in lcols:
        if name not in scols:
            diffs.append(f"column {name} is not in the snapshot")
    if list(snap["primary_key"]) != list(live["primary_key"]):
        diffs.append(f"primary key is ({', '.join(live['primary_key'])}) (snapshot: ({', '.join(snap['primary_key'])}))")
    return diffs


def create_table(conn: Connection, schema_doc: dict, *, trusted: bool = False, where: str = "") -> None:
    """Recreate a dropped table from its stored schema (see :mod:`snapshotter_backends.sql.ddl`: nothing
    from the repository runs as SQL unless ``trusted``)."""
    from . import ddl
    ddl.create_table(conn, schema_doc, trusted=trusted, where=where or f"table {schema_doc.get('table')!r}")


def adapt_for_write(conn: Connection, schema_doc: dict, values: dict) -> dict:
    """Driver-level adaptation the driver will not do by itself (JSON on PostgreSQL)."""
    if dialect(conn) != "postgresql":
        return values
    out = dict(values)
    for c in schema_doc["columns"]:
        t = c["type"].upper()
        v = out.get(c["name"])
        if t in ("JSON", "JSONB") and v is not None:
            from psycopg.types.json import Json, Jsonb
            out[c["name"]] = (Jsonb if t == "JSONB" else Json)(v)
    return out


def lines_of_keys(conn: Connection, schema_doc: dict, keys: list, what: str):
    """The rows with these keys as ``pgtext`` lines, with the encoding document (a
    restore's verification of what it wrote)."""
    where = (lambda t: key_condition(t, schema_doc, keys, dialect(conn)))
    with translate_errors(what):
        doc, batches = read_lines(conn, schema_doc, where=where)
    return doc, translating(batches, what)


def upsert_lines(conn: Connection, schema_doc: dict, encoding: dict, lines: list[bytes],
                 guard: "integrity.Guard | None" = None) -> bool:
    """PostgreSQL: replace rows by ``pgtext`` lines, exactly (the server's own input
    functions read the text its output functions wrote).  The lines are copied into a
    temporary table; rows whose keys are live are updated in place (a delete and insert
    would fire ``ON DELETE`` actions on the rows that reference them), the others
    inserted.  False when this connection cannot (another database or driver): the
    caller decodes."""
    if dialect(conn) != "postgresql" or pgcopy._psycopg_connection(conn) is None:
        return False
    if encoding.get("format") != "pgtext" or \
            sorted(encoding["columns"]) != sorted(c["name"] for c in schema_doc["columns"]):
        return False
    q = conn.dialect.identifier_preparer.quote
    target = q(schema_doc["table"])
    if schema_doc.get("db_schema"):
        target = f"{q(schema_doc['db_schema'])}.{target}"
    cols = ", ".join(q(c) for c in encoding["columns"])
    # one staging table per target table and transaction (dropped at its end)
    stage = q("snapshotter_stage_" + hashlib.sha256(target.encode("utf-8")).hexdigest()[:16])
    keys = encoding["key"]
    pg = pgcopy._psycopg_connection(conn)
    with pgcopy.pgtext_settings(conn):
        conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DROP AS "
                             f"SELECT {cols} FROM {target} WITH NO DATA")
        conn.exec_driver_sql(f"TRUNCATE {stage}")
        with pg.cursor() as cur, cur.copy(f"COPY {stage} ({cols}) FROM STDIN") as copy:
            # stored lines are UTF-8; the server reads COPY data in the client encoding
            copy.write(b"".join(pgcopy.from_utf8(lines, pg.info.encoding, target)))
        if guard is not None:
            guard.before_write(schema_doc)
        match = " AND ".join(f"t.{q(k)} = s.{q(k)}" for k in keys)
        generated, identity = write_rules(conn, schema_doc)
        # text keys are set too: a live key equal under the column's collation ('abc' = 'ABC' in citext)
        # is matched by the join and must take the snapshot's exact bytes
        text_keys = {c["name"] for c in schema_doc["columns"] if c["name"] in keys and is_text_type(c["type"])}
        settable = [c for c in encoding["columns"] if (c not in keys or c in text_keys)
                    and c not in generated and c not in identity]
        updated = 0
        if settable:
            updated = conn.exec_driver_sql(
                f"UPDATE {target} AS t SET {', '.join(f'{q(c)} = s.{q(c)}' for c in settable)} "
                f"FROM {stage} AS s WHERE {match}").rowcount
        written = ", ".join(q(c) for c in encoding["columns"] if c not in generated)
        overriding = " OVERRIDING SYSTEM VALUE" if identity else ""
        inserted = conn.exec_driver_sql(
            f"INSERT INTO {target} ({written}){overriding} SELECT {written} FROM {stage} AS s "
            f"WHERE NOT EXISTS (SELECT 1 FROM {target} AS t WHERE {match})").rowcount
        if guard is not None:
            guard.wrote(schema_doc, inserted=inserted, updated=updated)
    return True


_WRITE_RULES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def write_rules(conn: Connection, schema_doc: dict) -> tuple[frozenset[str], frozenset[str]]:
    """What an INSERT of whole rows must respect in the live table: its generated columns
    (computed by the database, never written; the restored rows compute the values the
    snapshot holds) and its ``GENERATED ALWAYS AS IDENTITY`` columns (PostgreSQL takes
    the stored values only with ``OVERRIDING SYSTEM VALUE``, and never in an UPDATE).  Asked once per table
    and transaction."""
    txn = conn.get_transaction()
    cache = _WRITE_RULES.setdefault(txn, {}) if txn is not None else {}
    name = (schema_doc.get("db_schema"), schema_doc["table"])
    if name not in cache:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Did not recognize type", category=sa.exc.SAWarning)
            cols = sa.inspect(conn).get_columns(name[1], schema=name[0])
        generated = frozenset(c["name"] for c in cols if c.get("computed"))
        always = frozenset(c["name"] for c in cols if dialect(conn) == "postgresql"
                           and (c.get("identity") or {}).get("always"))
        cache[name] = (generated, always)
    return cache[name]


def _bit_key(key: Any, bits: list[bool]) -> Any:
    def number(v: Any) -> Any:
        return int.from_bytes(v, "big") if isinstance(v, (bytes, bytearray)) else v
    if len(bits) == 1:
        return number(key)
    return [number(v) if bit else v for v, bit in zip(key, bits)]


def _pg_key(key: Any) -> Any:
    if isinstance(key, float):
        if math.isfinite(key):
            return repr(key)
        return "NaN" if key != key else "Infinity" if key > 0 else "-Infinity"
    if isinstance(key, list) and any(isinstance(k, float) for k in key):  # a composite key
        return [_pg_key(k) for k in key]
    return key


def _array_literal(value: Any) -> Any:
    """A list of numbers (nested, NULLs allowed) as PostgreSQL array text; anything else as is."""
    def numeric(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return all(numeric(x) for x in v)
        return v is None or (isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool))

    def text(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return "{" + ",".join(text(x) for x in v) + "}"
        return "NULL" if v is None else repr(v) if isinstance(v, float) else str(v)

    return text(value) if isinstance(value, (list, tuple)) and numeric(value) else value


def key_condition(t: sa.TableClause, schema_doc: dict, keys: list, dialect_name: str):
    """``key IN (keys)`` over the table's primary key, for key values as the reader returned
    them, sent so that the database matches them."""
    pk = schema_doc["primary_key"]
    if dialect_name == "postgresql":
        # a float key goes as its shortest text, which the column's own type reads: a real key
        # 0.2 compared as a float8 bind (0.2000000000000000111) matched nothing
        keys = [_pg_key(k) for k in keys]
    elif dialect_name in ("mysql", "mariadb"):
        # a BIT column comes back as bytes but matches only a number (b'..' = _binary'..' is false)
        types = {c["name"]: c["type"].upper() for c in schema_doc["columns"]}
        bits = [types.get(k, "").startswith("BIT") for k in pk]
        if any(bits):
            keys = [_bit_key(k, bits) for k in keys]
    if len(pk) == 1:
        if any(isinstance(k, (list, tuple)) for k in keys):
            # an array key (PostgreSQL int[]): an expanding IN would take each list for a row, and a
            # list of numbers is sent as the smallest array type (int2[] = int4[] has no operator):
            # numbers go as an untyped array literal the column's type reads
            return sa.or_(*[t.c[pk[0]] == sa.bindparam(None, _array_literal(k), type_=sa.types.NullType())
                            for k in keys])
        # untyped: a key held as text (money, an enum, inet) is then read by the column's own type;
        # a str bind would be cast to VARCHAR on PostgreSQL ("operator does not exist: money = varchar")
        return t.c[pk[0]].in_(sa.bindparam(None, list(keys), expanding=True, type_=sa.types.NullType()))
    return sa.tuple_(*[t.c[k] for k in pk]).in_([tuple(k) for k in keys])


def key_binds(schema_doc: dict, key: Any, dialect_name: str) -> list:
    """The values of one key's columns, as :func:`key_condition` sends them."""
    pk = schema_doc["primary_key"]
    if dialect_name == "postgresql":
        key = _pg_key(key)
    elif dialect_name in ("mysql", "mariadb"):
        types = {c["name"]: c["type"].upper() for c in schema_doc["columns"]}
        bits = [types.get(k, "").startswith("BIT") for k in pk]
        if any(bits):
            key = _bit_key(key, bits)
    values = [key] if len(pk) == 1 else list(key)
    return [_array_literal(v) for v in values] if dialect_name == "postgresql" else values


def restore_refusal(conn: Connection, streams: list, where: str) -> str | None:
    """For a dry run: why a restore of these planned streams would be refused before any write
    (a trigger that cannot be kept from firing), or None."""
    tables = [integrity.PlannedTable(p.spec.schema, p.added, p.modified, p.deleted, p.recreate, p.records)
              for p in streams if "table" in p.spec.schema]
    if not tables:
        return None
    with translate_errors(f"{where}: cannot list triggers"):
        return integrity.Guard(conn, dialect(conn)).refusal(tables, where)


class SQLWriterMixin:
    """upsert/delete on one connection inside one transaction (used by sql and conversation),
    under the transaction's :class:`~snapshotter_backends.integrity.Guard`: modified rows are updated
    in place, every statement's rows are counted, and triggers and foreign-key actions are
    kept from firing."""

    conn: Connection
    schemas: dict
    txn: WriteTransaction

    def _table(self, spec) -> sa.TableClause:
        return lightweight_table(spec.schema)

    # -- the restore's view of the transaction (SourceWriter hooks) -----------------

    def write_order(self, specs: list) -> list:
        guard = self.txn.guard
        if len(specs) < 2 or not all("table" in s.schema for s in specs):
            return list(specs)
        with translate_errors(f"{self.b.where}: cannot list foreign keys"):
            names = [guard.name(s.schema) for s in specs]
            guard.selected.update(names)
            fks = guard._foreign_keys()
        return [specs[i] for i in integrity.write_order(names, fks)]

    def write_mode(self) -> str:
        """"replace" when nothing fires during the writes (replica mode, foreign-key checks off): a
        modified row is deleted with the others and inserted again, so values that move between rows
        (a unique name two rows swapped) never collide; else "update-in-place", so that no
        ``ON DELETE`` action fires."""
        return "update-in-place" if self.txn.guard.will_enforce() else "replace"

    def preflight(self, streams: list) -> None:
        tables = [integrity.PlannedTable(p.spec.schema, p.added, p.modified, p.deleted, p.recreate, p.records)
                  for p in streams if "table" in p.spec.schema]
        if tables:
            with translate_errors(f"{self.b.where}: cannot check the restore's plan"):
                self.txn.guard.preflight(tables, self.b.where)

    def check_selection(self) -> None:
        with translate_errors(f"{self.b.where}: cannot check the restore's plan"):
            self.txn.guard.check_selection(self.b.where)

    def check_writes(self) -> list[str]:
        with translate_errors(f"{self.b.where}: cannot check the restore's writes"):
            return [f"{self.b.where}: {p}" for p in self.txn.guard.finish()]

    # -- writes ---------------------------------------------------------------------

    def delete_keys(self, spec, keys: list) -> None:
        if not keys:
            return
        t = self._table(spec)
        self.txn.guard.before_write(spec.schema)
        for i in range(0, len(keys), 500):
            n = self.conn.execute(sa.delete(t).where(key_condition(t, spec.schema, keys[i:i + 500],
                                                                   dialect(self.conn)))).rowcount
            self.txn.guard.wrote(spec.schema, deleted=n)

    def upsert_rows(self, spec, records: list) -> None:
        """Rows whose keys are live are updated in place (a delete and insert would fire
        ``ON DELETE`` actions on the rows referencing them); the others are inserted."""
        if not records:
            return
        t = self._table(spec)
        d = dialect(self.conn)
        pk = spec.schema["primary_key"]
        live = set()
        for i in range(0, len(records), 500):
            part = [k for k, _ in records[i:i + 500]]
            for row in self.conn.execute(sa.select(*[t.c[k] for k in pk]).where(key_condition(t, spec.schema, part, d))):
                live.add(codec.pack(row[0] if len(pk) == 1 else list(row)))
        self.txn.guard.before_write(spec.schema)
        generated, identity = write_rules(self.conn, spec.schema)
        rows = [(k, adapt_for_write(self.conn, spec.schema, v)) for k, v in records]
        if generated:
            rows = [(k, {c: v for c, v in row.items() if c not in generated}) for k, row in rows]
        existing = [(k, row) for k, row in rows if codec.pack(k) in live]
        new = [row for k, row in rows if codec.pack(k) not in live]
        if len(existing) < len(live):
            # a live row equal to a written key only under the column's collation ('abc' for 'ABC'): it is
            # replaced by the exact key (an UPDATE by key would keep the live key's bytes)
            n = 0
            absent = [k for k, _ in rows if codec.pack(k) not in live]
            for i in range(0, len(absent), 500):
                n += self.conn.execute(sa.delete(t).where(key_condition(t, spec.schema, absent[i:i + 500], d))).rowcount
            self.txn.guard.wrote(spec.schema, deleted=n)
        if existing:
            settable = [c for c in existing[0][1] if c not in pk and c not in identity]
            if settable:
                stmt = sa.update(t).where(*[t.c[k] == sa.bindparam(f"snapshotter_k{i}", type_=sa.types.NullType())
                                            for i, k in enumerate(pk)]) \
                    .values({c: sa.bindparam(f"snapshotter_v{j}", type_=sa.types.NullType()) for j, c in enumerate(settable)})
                params = [{**{f"snapshotter_k{i}": v for i, v in enumerate(key_binds(spec.schema, k, d))},
                           **{f"snapshotter_v{j}": row[c] for j, c in enumerate(settable)}} for k, row in existing]
                n = self.conn.execute(stmt, params).rowcount
                self.txn.guard.wrote(spec.schema, updated=n if n is not None and n >= 0 else len(params))
        if not new:
            return
        stmt = sa.insert(t)
        if identity:
            # a literal INSERT ... OVERRIDING SYSTEM VALUE VALUES (...) with the same bind names
            names = list(new[0])
            q = self.conn.dialect.identifier_preparer.quote
            target = q(spec.schema["table"])
            if spec.schema.get("db_schema"):
                target = f"{q(spec.schema['db_schema'])}.{target}"
            stmt = sa.text(f"INSERT INTO {target} ({', '.join(q(c) for c in names)}) OVERRIDING SYSTEM VALUE "
                           f"VALUES ({', '.join(f':p{i}' for i in range(len(names)))})")
            new = [{f"p{i}": row[c] for i, c in enumerate(names)} for row in new]
        self.conn.execute(stmt, new)
        self.txn.guard.wrote(spec.schema, inserted=len(new))
