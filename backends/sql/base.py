"""What every SQL source shares: its URL and engine (the driver's timeouts from its dialect),
connections, the point-in-time read transaction and the write transaction, a table's schema,
rows read in key order (Python's order), keys sent so that the database matches them, and
the translation of SQLAlchemy errors.  How each database does these is its dialect's
(:mod:`.dialect`); a restore's writes are :mod:`.writing`'s.

Values are read *raw* (as the DB-API driver returns them, without SQLAlchemy
type processing) and written back the same way, so what is restored is what
was stored, bit for bit, on every dialect.
"""
from __future__ import annotations

import contextlib
import decimal
import os
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Iterator

from snapshotter.errors import ConfigError, Refused, SourceError
from snapshotter.redaction import redact_text, redact_url

from .. import lazy_module
from .dialect import Dialect, for_url, named, of, register

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

sa = lazy_module("sqlalchemy")

FETCH_BATCH = 5000

Record = tuple


# -- the URL and the engine ---------------------------------------------------------------

def resolve_url(url: str, base_dir: str | None, where: str) -> sa.URL:
    try:
        u = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ConfigError(redact_text(f"{where}: invalid database URL: {exc}")) from None
    return for_url(u).resolve_url(u, base_dir)


def redact(url: sa.URL) -> str:
    """The URL for manifests and messages: no password, in its userinfo or its query."""
    return redact_url(url.render_as_string(hide_password=False))


def make_engine(url: sa.URL, where: str, timeout: float | None = None,
                idle_timeout: float | None = None, dialect: Dialect | None = None) -> Engine:
    """An engine whose connections wait at most ``timeout`` seconds for each connect and read
    (:data:`~snapshotter.timeouts.DEFAULT_TIMEOUT` when None); a driver timeout becomes one
    line naming ``where``, the database and the bound.  ``dialect`` (the URL's, when None)
    becomes the engine's (:func:`.dialect.of`)."""
    from snapshotter.timeouts import DEFAULT_TIMEOUT, seconds, timed_out
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    dialect = dialect or for_url(url)
    try:
        # a setting the URL's query gives wins
        connect_args = {k: v for k, v in dialect.connect_args(url, timeout).items() if k not in url.query}
        kwargs: dict[str, Any] = {"isolation_level": "AUTOCOMMIT", "connect_args": connect_args}
        if dialect.pool_pre_ping:
            kwargs["pool_pre_ping"] = True
        engine = sa.create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{where}: the database driver is not installed ({exc.name}); "
                          f"install the matching extra, e.g. snapshotter[postgres]") from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigError(redact_text(f"{where}: {exc}")) from None
    register(engine, dialect)

    def on_error(context) -> None:
        if getattr(context, "is_pre_ping", False):
            return  # the pool opens a new connection in its place
        orig = context.original_exception
        if isinstance(orig, SourceError):
            return  # already the one-line message (pgwatch.Stalled)
        kind = dialect.timeout_kind(orig)
        if kind is None:
            return
        args = getattr(orig, "args", ())
        text = args[1] if len(args) == 2 and isinstance(args[0], int) else str(orig)  # PyMySQL: (code, text)
        detail = str(text).strip().splitlines()[0] if str(text).strip() else type(orig).__name__
        if kind == "idle":
            bound = f" ({seconds(idle_timeout)} s, idle_timeout)" if idle_timeout else ""
            raise SourceError(f"{where}: {redact(url)} ended the restore's transaction: it was idle longer "
                              f"than the database allows{bound}: {detail}") from orig
        if kind == "locked":
            raise SourceError(f"{where}: {redact(url)}: {detail} (another connection holds its lock; a "
                              f"statement waits up to {seconds(timeout)} s, the timeout)") from orig
        connecting = context.connection is None
        what = f"{where}: {'cannot connect to ' if connecting else ''}{redact(url)}"
        bound = timeout
        if connecting and "connect_timeout" in connect_args and "connect_timeout" not in url.query:
            bound = connect_args["connect_timeout"]  # libpq waits 2 s at least
        raise SourceError(timed_out(what, bound, detail)) from orig

    sa.event.listen(engine, "handle_error", on_error)
    dialect.watch(engine, f"{where}: {redact(url)}", timeout)
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


# -- transactions -------------------------------------------------------------------------

def begin_snapshot(conn: Connection) -> str:
    """Start a read-only transaction that sees one point in time. Returns the guarantee."""
    return of(conn).begin_snapshot(conn)


#: the result iterators still open on each connection (a suspended COPY holds the driver's
#: connection until it ends): closed before the connection's transaction ends, so that an error
#: raised while one is suspended cannot leave the COMMIT or ROLLBACK waiting on it for good
_open_reads: "weakref.WeakKeyDictionary[Any, weakref.WeakSet]" = weakref.WeakKeyDictionary()


def tracked(conn: Connection, it: Iterator) -> Iterator:
    """``it`` (a generator over ``conn``'s results), closed by :func:`close_reads` if still open."""
    _open_reads.setdefault(conn, weakref.WeakSet()).add(it)
    return it


def close_reads(conn: Connection) -> None:
    """Close the result iterators left open on ``conn`` (a COPY left before its end is cancelled)."""
    for it in list(_open_reads.pop(conn, ())):
        with contextlib.suppress(Exception):
            it.close()


def end_transaction(conn: Connection, commit: bool) -> None:
    close_reads(conn)
    with contextlib.suppress(Exception):
        conn.exec_driver_sql("COMMIT" if commit else "ROLLBACK")


def begin_write(conn: Connection) -> None:
    of(conn).begin_write(conn)


class SQLConnection:
    """The database side of a SQL-backed source: its URL (relative SQLite paths
    resolved against the config file's folder), a lazily made engine, and
    connections whose errors name the source without its password.  Mixed into
    backends that set ``config["url"]``, ``base_dir`` and ``where``."""

    _url: sa.URL | None = None
    _dialect: Dialect | None = None
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
    def dialect(self) -> Dialect:
        """The database's dialect, picked once from the URL (and given to the engine)."""
        if self._dialect is None:
            self._dialect = for_url(self.url)
        return self._dialect

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.url, self.where, self.config.get("timeout"),
                                       self.config.get("idle_timeout"), self.dialect)
        return self._engine

    def connect(self, *, write: bool = False) -> Connection:
        """A connection; ``write``: for the restore's write transaction (which alone
        may create a missing SQLite file, with :attr:`create_missing`)."""
        path = self.dialect.local_file(self.url)
        if path is not None and not os.path.exists(path):
            if self.create_missing and not write:
                # nothing is created before the restore writes: plan against an empty database
                if self._empty_engine is None:
                    self._empty_engine = make_engine(sa.engine.make_url("sqlite://"), self.where)
                return self._empty_engine.connect()
            self.dialect.check_local_file(self.url, self.where, create=self.create_missing)
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
        try:
            with translate_errors(f"{self.where}: cannot set up the write transaction"):
                self.dialect.bound_idle_transaction(conn, idle)
        except BaseException:
            conn.close()
            raise


# -- a table's schema -----------------------------------------------------------------------

def type_text(conn: Connection, coltype: Any) -> str:
    try:
        return coltype.compile(dialect=conn.dialect)
    except Exception:
        return str(coltype)


def table_schema(conn: Connection, table: str, schema: str | None) -> dict:
    insp = sa.inspect(conn)
    with warnings.catch_warnings():
        # an unrecognised type is reflected as NullType; its real name is asked for below
        warnings.filterwarnings("ignore", message="Did not recognize type", category=sa.exc.SAWarning)
        cols = insp.get_columns(table, schema=schema)
    d = of(conn)
    unknown = [c["name"] for c in cols if isinstance(c["type"], sa.types.NullType)]
    if unknown:
        names = d.unknown_type_names(conn, table, schema)
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
        "dialect": conn.dialect.name,
        "table": table,
        "db_schema": schema,
        "columns": [{"name": c["name"], "type": c.get("type_text") or type_text(conn, c["type"]),
                     "nullable": bool(c.get("nullable", True))} for c in cols],
        "primary_key": list(pk),
        "indexes": [{"name": i["name"], "columns": [c for c in i["column_names"] if c], "unique": bool(i.get("unique"))}
                    for i in indexes if i.get("name") and all(i.get("column_names") or [None])],
    }
    definition = d.capture_definition(conn, table, schema)
    if definition is not None:
        # what the database says the table is, for recreating it as it was (docs/design.md)
        doc["ddl"] = definition
    return doc


def estimated_bytes(conn: Connection, schema_doc: dict) -> int | None:
    """The table's size as the database's statistics tell it, without a scan (None if unknown)."""
    try:
        return of(conn).estimated_bytes(conn, schema_doc)
    except sa.exc.SQLAlchemyError:
        return None


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
                scols[name]["type"] == UNKNOWN_TYPE and named(snap.get("dialect")).null_type_matches_any):
            diffs.append(f"column {name} is {lcols[name]['type']} (snapshot: {scols[name]['type']})")
    for name in lcols:
        if name not in scols:
            diffs.append(f"column {name} is not in the snapshot")
    if list(snap["primary_key"]) != list(live["primary_key"]):
        diffs.append(f"primary key is ({', '.join(live['primary_key'])}) (snapshot: ({', '.join(snap['primary_key'])}))")
    return diffs


# -- reading ---------------------------------------------------------------------------------

def lightweight_table(schema_doc: dict) -> sa.TableClause:
    """A table clause without types: values pass to and from the driver unprocessed."""
    return sa.table(schema_doc["table"], *[sa.column(c["name"]) for c in schema_doc["columns"]],
                    schema=schema_doc.get("db_schema"))


def select_stmt(conn: Connection, schema_doc: dict, where=None) -> sa.Select:
    """Every column of the table, in key order (Python's order; see :meth:`.Dialect.order_key`)."""
    t = lightweight_table(schema_doc)
    types = {c["name"]: c["type"] for c in schema_doc["columns"]}
    d = of(conn)
    stmt = sa.select(*[t.c[c["name"]] for c in schema_doc["columns"]]).select_from(t)
    if where is not None:
        stmt = stmt.where(where(t))
    return stmt.order_by(*[d.order_key(conn, t.c[k], types[k]) for k in schema_doc["primary_key"]])


def reads_lines(conn: Connection, formats: tuple[str, ...] = ("pgtext", "mytext")) -> bool:
    """Whether tables of this database are captured as lines of one of ``formats``
    (PostgreSQL: ``pgtext``; MariaDB/MySQL: ``mytext``; SQLite: ``sqltext``, which only the
    ``sql`` backend asks for)."""
    d = of(conn)
    return (d.line_format or ("pgtext" if d.reads_lines else None)) in formats


def read_lines(conn: Connection, schema_doc: dict, *, where=None, fast: bool | None = None,
               batch: int | None = None, blocks: bool = False) -> tuple[dict, Iterator[list[bytes]]]:
    """The table's encoding document and batches of its rows as ``pgtext`` lines, in key
    order (:meth:`.Dialect.read_lines`); with ``blocks``, a batch may also be one ``bytes``
    of whole lines."""
    return of(conn).read_lines(conn, schema_doc, where=where, fast=fast, batch=batch, blocks=blocks)


def read_rows(conn: Connection, schema_doc: dict, *, where=None, batch: int = FETCH_BATCH,
              fast: bool | str | None = None, for_update: bool = False) -> Iterator[list[Record]]:
    """Batches of ``(key, {column: value})`` in key order.

    Rows come through the dialect's bulk path (PostgreSQL: COPY, :mod:`.pgcopy`) when it can
    promise the same records as the cursor below.  ``fast`` forces a path: ``False`` the
    cursor, ``True`` the bulk path, ``"text"``/``"binary"`` COPY in that format; a forced
    bulk path that cannot be exact is an error.  ``for_update``: a restore's planning read
    (:meth:`.Dialect.locking_read`).
    """
    d = of(conn)
    stmt = select_stmt(conn, schema_doc, where)
    pk = schema_doc["primary_key"]
    names = [c["name"] for c in schema_doc["columns"]]
    if for_update:
        stmt = d.locking_read(stmt)
    pk_idx = [names.index(k) for k in pk]
    use_copy = fast if fast is not None else d.copies_by_default()
    if use_copy:
        binary = {"text": False, "binary": True}.get(fast) if isinstance(fast, str) else None
        rows = d.copy_rows(conn, stmt, names, pk_idx, batch, binary)
        if rows is not None:
            yield from rows
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


# -- keys -----------------------------------------------------------------------------------

def array_literal(value: Any) -> Any:
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


def odd_key(dialect: Dialect, pk: list, key) -> bool:
    """Whether a key has a column value the driver cannot bind (:meth:`.Dialect.key_sql`)."""
    return any(dialect.key_sql(v) is not None for v in ([key] if len(pk) == 1 else key))


def key_condition(t: sa.TableClause, schema_doc: dict, keys: list, dialect: Dialect):
    """``key IN (keys)`` over the table's primary key, for key values as the reader returned
    them, sent so that the database matches them (:meth:`.Dialect.sent_keys`)."""
    pk = schema_doc["primary_key"]
    keys = dialect.sent_keys(schema_doc, keys)
    odd = [k for k in keys if odd_key(dialect, pk, k)]
    if odd:
        # keys the driver cannot bind (SQLite text that is not UTF-8): one equality each, by expression
        plain = [k for k in keys if not odd_key(dialect, pk, k)]
        each = [sa.and_(*[t.c[c] == (dialect.key_sql(v) if dialect.key_sql(v) is not None else
                                     sa.bindparam(None, v, type_=sa.types.NullType()))
                          for c, v in zip(pk, [k] if len(pk) == 1 else k)]) for k in odd]
        return sa.or_(*each, *([_bound_keys(t, pk, plain)] if plain else []))
    return _bound_keys(t, pk, keys)


def _bound_keys(t: sa.TableClause, pk: list, keys: list):
    if len(pk) == 1:
        if any(isinstance(k, (list, tuple)) for k in keys):
            # an array key (PostgreSQL int[]): an expanding IN would take each list for a row, and a
            # list of numbers is sent as the smallest array type (int2[] = int4[] has no operator):
            # numbers go as an untyped array literal the column's type reads
            return sa.or_(*[t.c[pk[0]] == sa.bindparam(None, array_literal(k), type_=sa.types.NullType())
                            for k in keys])
        # untyped: a key held as text (money, an enum, inet) is then read by the column's own type;
        # a str bind would be cast to VARCHAR on PostgreSQL ("operator does not exist: money = varchar")
        return t.c[pk[0]].in_(sa.bindparam(None, list(keys), expanding=True, type_=sa.types.NullType()))
    return sa.tuple_(*[t.c[k] for k in pk]).in_([tuple(k) for k in keys])


def lines_of_keys(conn: Connection, schema_doc: dict, keys: list, what: str,
                  formats: tuple[str, ...] = ("pgtext", "mytext")):
    """The rows with these keys as lines (of one of ``formats``), with the encoding document
    (a restore's verification of what it wrote); None where tables are not read so."""
    if not reads_lines(conn, formats):
        return None
    where = (lambda t: key_condition(t, schema_doc, keys, of(conn)))
    with translate_errors(what):
        doc, batches = read_lines(conn, schema_doc, where=where)
    return doc, translating(batches, what)
