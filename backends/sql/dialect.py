"""The dialect interface: what the SQL backends do differently on PostgreSQL, MariaDB/MySQL
and SQLite, as one object per engine (:func:`of`).

The shared modules (:mod:`.base`, :mod:`.writing`, :mod:`.ddl`, :mod:`.integrity`) say what is
done; a dialect says how its database does it: the driver's timeouts, the point-in-time read
and the write transaction, key order and how keys are sent, locking reads, its fast paths
(COPY), a table's definition in the database's own terms, and how a restore keeps triggers
and foreign-key actions from firing and counts what the database wrote.

:class:`Dialect` itself is what any other database SQLAlchemy knows gets: plain SQL, no fast
path, no definition beyond columns and keys, nothing to switch off.  The three dialects live
in :mod:`.postgresql`, :mod:`.mysql` and :mod:`.sqlite`, imported when first used.
"""
from __future__ import annotations

import importlib
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from snapshotter.errors import SourceError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection, Engine

    from .integrity import ForeignKey, Guard


def is_text_type(type_text: str) -> bool:
    """Whether a column's type (as its text) holds text."""
    t = type_text.upper()
    return any(w in t for w in ("CHAR", "TEXT", "CLOB", "STRING", "CITEXT", "NAME"))


def ended_idle(orig: BaseException) -> bool:
    """Whether a driver error says the database ended a transaction that sat idle too long."""
    text = str(orig).lower()
    return getattr(orig, "sqlstate", None) == "25P03" or "idle-in-transaction timeout" in text \
        or "idle_transaction_timeout" in text


class Dialect:
    """A database's ways, one object per engine (what depends on the server, such as a
    MariaDB server behind a ``mysql://`` URL, is asked of the connection)."""

    #: the ``dialect`` of the table definitions it captures and recreates (``ddl`` part of a
    #: table's schema); None: it captures none
    ddl_kind: ClassVar[str | None] = None
    #: the pool checks a connection before handing it out (not for a local file)
    pool_pre_ping: ClassVar[bool] = True
    #: every DDL statement commits the open transaction (MariaDB/MySQL)
    ddl_commits: ClassVar[bool] = False
    #: tables are captured as ``pgtext`` lines (:meth:`read_lines`)
    reads_lines: ClassVar[bool] = False
    #: the record encoding of :meth:`read_lines` when not ``pgtext`` (MariaDB/MySQL: ``mytext``;
    #: SQLite: ``sqltext``, read by the ``sql`` backend only)
    line_format: ClassVar[str | None] = None
    #: :meth:`adapt_for_write` may give SQL expressions (SQLite: text that is not UTF-8)
    writes_expressions: ClassVar[bool] = False
    #: a column type SQLAlchemy did not know was once recorded as ``NULL``, which then matches
    #: whatever the live column is (PostgreSQL snapshots from before type names were recorded)
    null_type_matches_any: ClassVar[bool] = False
    #: an INSERT of a ``GENERATED ALWAYS`` identity column's stored values needs ``OVERRIDING
    #: SYSTEM VALUE``, and an UPDATE must leave the column alone (PostgreSQL)
    overrides_identity: ClassVar[bool] = False
    #: the restore compares tables by schema-qualified names (:meth:`current_schema` fills in
    #: the schema of an unqualified one)
    qualifies_names: ClassVar[bool] = False
    #: :meth:`foreign_keys` returns the keys of every schema at once
    foreign_keys_span_schemas: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- the URL and the connections -------------------------------------------------

    def resolve_url(self, url: sa.URL, base_dir: str | None) -> sa.URL:
        """The URL with what is relative in it resolved against the config file's folder."""
        return url

    def local_file(self, url: sa.URL) -> str | None:
        """The file the URL opens, for a database that is a local file."""
        return None

    def check_local_file(self, url: sa.URL, where: str, *, create: bool) -> None:
        """Refuse a local database file that does not exist (``create``: let it be created)."""

    def connect_args(self, url: sa.URL, timeout: float) -> dict[str, Any]:
        """The driver's bounds on each connect and each read (:mod:`snapshotter.timeouts`), by
        the URL's driver."""
        return {}

    def watch(self, engine: Engine, what: str, timeout: float) -> None:
        """Bound what the driver leaves unbounded on ``engine``'s connections (``what`` names
        the source and database in messages)."""

    def timeout_kind(self, orig: BaseException | None) -> str | None:
        """What kind of timeout a driver error is: "timeout", "idle" (the database ended an
        idle transaction), "locked" (another connection's lock was waited on too long) or
        None (another error)."""
        if orig is None:
            return None
        if ended_idle(orig):
            return "idle"
        text = str(orig).lower()
        return "timeout" if "timeout expired" in text or "timed out" in text else None

    # -- transactions ----------------------------------------------------------------

    def begin_snapshot(self, conn: Connection) -> str:
        """Start a read-only transaction that sees one point in time. Returns the guarantee."""
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        conn.exec_driver_sql("BEGIN")
        return "snapshot-isolation"

    def begin_write(self, conn: Connection) -> None:
        """Start the restore's write transaction."""
        conn.exec_driver_sql("BEGIN")

    def bound_idle_transaction(self, conn: Connection, idle: float) -> None:
        """Have the database end the connection's transaction once it sat idle ``idle`` seconds."""

    # -- reading -----------------------------------------------------------------------

    def order_key(self, conn: Connection, column: sa.ColumnClause, type_text: str):
        """ORDER BY term so the database sorts the key column as Python sorts its values."""
        return column

    def unknown_type_names(self, conn: Connection, table: str, schema: str | None) -> dict[str, str]:
        """The database's own text of column types SQLAlchemy does not know, by column."""
        return {}

    def estimated_bytes(self, conn: Connection, schema_doc: dict) -> int | None:
        """The table's size as the database's statistics tell it, without a scan."""
        return None

    def partition_roots(self, conn: Connection, schema: str | None) -> dict[str, str]:
        """Each partition of the schema, with the partitioned table at its root."""
        return {}

    def virtual_tables(self, conn: Connection, schema: str | None) -> set[str]:
        """Tables whose rows a module keeps in tables of its own (SQLite's FTS5, R*Tree):
        those tables are captured, the virtual table is not a stream and needs no key."""
        return set()

    def locking_read(self, stmt: sa.Select) -> sa.Select:
        """A restore's planning read, locking what it reads where the database needs that for
        a concurrent write not to be overwritten unseen."""
        return stmt

    def copies_by_default(self) -> bool:
        """Whether rows are read through :meth:`copy_rows` unless told otherwise."""
        return False

    def copy_rows(self, conn: Connection, stmt: sa.Select, names: list[str], key_index: list[int],
                  batch: int, binary: bool | None) -> Iterator[list[tuple]] | None:
        """The statement's records through the database's bulk path, exactly as a cursor gives
        them, or None when this connection has none or it cannot be exact."""
        return None

    def read_lines(self, conn: Connection, schema_doc: dict, *, where=None, fast: bool | None = None,
                   batch: int | None = None, blocks: bool = False) -> tuple[dict, Iterator[list[bytes]]]:
        """The table's encoding document and batches of its rows as lines (``pgtext``, or
        :attr:`line_format`; with ``blocks``, a batch may also be one ``bytes`` of whole lines)."""
        raise SourceError(f"table {schema_doc.get('table')} cannot be read as pgtext lines "
                          f"(the database is not PostgreSQL)")

    def keeps_msgpack(self, conn: Connection, schema_doc: dict) -> bool:
        """Whether a snapshot stores this table as msgpack records although the database
        reads tables as lines (SQLite: a table of blobs, :func:`.sqlite.keeps_msgpack`)."""
        return False

    # -- writing -----------------------------------------------------------------------

    def sent_keys(self, schema_doc: dict, keys: list) -> list:
        """Key values as the reader returned them, as they must be sent for the database to
        match them."""
        return keys

    def key_sql(self, value: Any):
        """An SQL expression sending one key column's value the driver cannot send as a
        bind parameter, or None (the value is bound as it is)."""
        return None

    def key_binds(self, schema_doc: dict, key: Any) -> list:
        """The values of one key's columns, as bind parameters of an UPDATE."""
        key = self.sent_keys(schema_doc, [key])[0]
        return [key] if len(schema_doc["primary_key"]) == 1 else list(key)

    def adapt_for_write(self, schema_doc: dict, values: dict) -> dict:
        """Driver-level adaptation of a row the driver will not do by itself.  Where
        :attr:`writes_expressions`, a value may be an SQL expression (the row is then
        written on its own)."""
        return values

    def upsert_lines(self, conn: Connection, schema_doc: dict, encoding: dict, lines: list[bytes],
                     guard: Guard | None = None) -> bool:
        """Replace rows by stored lines, exactly; False when this connection cannot (the
        caller decodes them)."""
        return False

    def exact_text(self, col):
        """A text column compared byte for byte whatever its collation, or None where the
        plain comparison is exact."""
        return None

    def exactly_in(self, col, values: list[str]):
        """``col IN values`` compared byte for byte, or None where the plain ``IN`` is exact."""
        exact = self.exact_text(col)
        return None if exact is None else exact.in_(values)

    # -- a table's definition (:mod:`.ddl`) ------------------------------------------

    def capture_definition(self, conn: Connection, table: str, schema: str | None) -> dict | None:
        """What the database says the table is (stored as the schema's ``ddl`` part)."""
        return None

    def checked_type(self, conn: Connection, text: str) -> str | None:
        """The type text to put in DDL for a stored type name, or None when it names no type
        of this database."""
        return None

    def create_from_definition(self, conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str],
                               trusted: bool, where: str) -> None:
        """Create the table from a definition this dialect captured (:attr:`ddl_kind`), without
        its foreign keys and triggers."""
        raise NotImplementedError

    def finish_definition(self, conn: Connection, schema_doc: dict, ddl: dict, trusted: bool,
                          where: str) -> None:
        """After the rows of a table created from its definition: foreign keys, triggers,
        sequences."""

    @staticmethod
    def omissions(ddl: dict, trusted: bool) -> list[str]:
        """What recreating a table from a definition of this kind leaves out."""
        return []

    @staticmethod
    def definition_items(ddl: dict, trusted: bool) -> dict[str, Any]:
        """The parts of a definition of this kind that a recreate puts back, by name."""
        return {}

    # -- a restore's writes (:class:`.integrity.Guard`) ------------------------------

    def foreign_keys(self, conn: Connection, schema: str | None) -> list[ForeignKey]:
        """Every foreign key of the tables of ``schema`` (the database's default when None)."""
        from .integrity import reflected_foreign_keys
        return reflected_foreign_keys(conn, schema)

    def current_schema(self, conn: Connection) -> str | None:
        """The schema unqualified table names are in (with :attr:`qualifies_names`)."""
        return None

    def will_enforce(self, guard: Guard) -> bool:
        """Before the writes: whether the database will enforce foreign keys (and run their
        actions) during them."""
        return True

    def firing(self, guard: Guard, where: str, names: list) -> str | None:
        """Why the writes to these live tables would be refused: triggers or rules that would
        fire and cannot be switched off; None when nothing would."""
        return None

    def check_readable(self, guard: Guard, where: str) -> None:
        """Refuse (:class:`~snapshotter.errors.UsageError`) a role that could not prove what the
        writes did."""

    def start_writes(self, guard: Guard) -> bool:
        """Before the first write: switch off what the restore keeps from firing for the whole
        transaction.  Returns whether foreign keys are still enforced."""
        return True

    def switch_off(self, guard: Guard, name: tuple) -> None:
        """Before the first write to a table: switch off its triggers, appending to
        ``guard.switched_off`` the statements that switch them back on."""

    def side_effects(self, guard: Guard) -> list[str]:
        """Before commit: the rows the database changed besides the restore's counted writes."""
        return []

    def end_writes(self, guard: Guard) -> None:
        """After commit or rollback: session settings back as they were."""


#: dialect modules by SQLAlchemy's names (MariaDB is MySQL's dialect either way)
_MODULES = {"postgresql": ("postgresql", "PostgreSQL"), "mysql": ("mysql", "MySQL"),
            "mariadb": ("mysql", "MySQL"), "sqlite": ("sqlite", "SQLite")}

_BY_ENGINE: "weakref.WeakKeyDictionary[Any, Dialect]" = weakref.WeakKeyDictionary()
_BY_NAME: dict[str | None, Dialect] = {}


def _make(name: str | None) -> Dialect:
    where = _MODULES.get(name or "")
    if where is None:
        return Dialect()
    module = importlib.import_module(f"{__package__}.{where[0]}")
    return getattr(module, where[1])()


def for_url(url: sa.URL) -> Dialect:
    """The dialect of a database URL (before an engine is made for it)."""
    return _make(url.get_backend_name())


def of(conn_or_engine) -> Dialect:
    """The dialect of a connection or engine: made once per engine (its SQLAlchemy dialect)."""
    sa_dialect = conn_or_engine.dialect
    found = _BY_ENGINE.get(sa_dialect)
    if found is None:
        found = _BY_ENGINE[sa_dialect] = _make(sa_dialect.name)
    return found


def register(engine, dialect: Dialect) -> None:
    """``dialect`` (made by :func:`for_url` for the engine's URL) is the engine's."""
    _BY_ENGINE[engine.dialect] = dialect


def named(name: str | None) -> Dialect:
    """The dialect a stored document names (a table schema's ``dialect``, a definition's kind)."""
    found = _BY_NAME.get(name)
    if found is None:
        found = _BY_NAME[name] = _make(name)
    return found
