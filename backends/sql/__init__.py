"""``sql``: tables of any SQLAlchemy database, one stream per table, keyed by primary key.

All tables of one database are read inside one read-only REPEATABLE READ
transaction (``START TRANSACTION WITH CONSISTENT SNAPSHOT`` on MariaDB/MySQL,
a deferred ``BEGIN`` on SQLite), so a snapshot is one point in time.  Rows are
streamed with server-side cursors in batches; memory does not grow with the
table.

The package: this module (the backend, its reader and writer), :mod:`.base` (engines,
transactions, schemas, reads), :mod:`.writing` (a restore's writes), :mod:`.integrity`
(what a restore's writes may touch, and the proof), :mod:`.ddl` (table definitions), and
behind :mod:`.dialect` one module per database: :mod:`.postgresql` (with :mod:`.pgcopy`, :mod:`.pgbulk`
and :mod:`.pgddl`), :mod:`.mysql`, :mod:`.sqlite`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
from typing import Any, Sequence

from snapshotter.backend import Option, SourceBackend, SourceReader, SourceWriter, StreamSpec, idle_timeout_option, timeout_option
from snapshotter import codec
from snapshotter.errors import ConfigError, IntegrityError, NotFound, SchemaMismatch

from .. import lazy_module
from . import base, ddl, integrity, writing
from .dialect import of

sa = lazy_module("sqlalchemy")


log = logging.getLogger(__name__)

#: the line encodings this backend's tables are read in (:meth:`SQLReader.read_encoded`)
LINE_FORMATS = ("pgtext", "mytext", "sqltext")


class SQLBackend(base.SQLConnection, SourceBackend):
    name = "sql"
    #: PostgreSQL tables are captured as COPY text lines (:mod:`.pgtext`), MariaDB/MySQL tables
    #: as the client's batch text (:mod:`.mytext`), SQLite tables as lines SQLite writes (:mod:`.sqltext`)
    encodings = {"pgtext": "snapshotter_backends.sql.pgtext:PgTextCodec",
                 "mytext": "snapshotter_backends.sql.mytext:MyTextCodec",
                 "sqltext": "snapshotter_backends.sql.sqltext:SqlTextCodec"}
    description = "Tables of any SQLAlchemy database (PostgreSQL, MariaDB/MySQL, SQLite, ...), keyed by primary key"
    options = (
        Option("url", str, required=True, help="SQLAlchemy database URL; ${VAR} keeps passwords out of the file", secret=True),
        Option("tables", list, help="tables to capture (default: every table with a primary key)"),
        Option("exclude", list, default=[], help="tables to leave out"),
        Option("schema", str, help="database schema (PostgreSQL) to read instead of the default"),
        Option("timestamp_column", str, help="column holding each row's last write time, for --failure-at"),
        timeout_option(),
        idle_timeout_option(),
    )

    def __init__(self, source_name: str, options: dict[str, Any]):
        super().__init__(source_name, options)
        self.base_dir: str | None = None

    @property
    def where(self) -> str:
        return f"source {self.source_name!r}"

    def location(self) -> str:
        return base.redact(self.url)

    def reader(self) -> "SQLReader":
        return SQLReader(self)

    def writer(self) -> "SQLWriter":
        return SQLWriter(self)

    def written_at(self, spec: StreamSpec, key, value) -> _dt.datetime | None:
        col = self.config.get("timestamp_column")
        if col and isinstance(value, dict):
            v = value.get(col)
            if isinstance(v, _dt.datetime):
                return v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)
            if isinstance(v, str):
                try:
                    t = _dt.datetime.fromisoformat(v)
                    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)
                except ValueError:
                    return None
        return None

    def schema_differences(self, snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        return base.schema_differences(snapshot.schema, live.schema)

    def recreate_omissions(self, spec: StreamSpec, reader) -> list[str]:
        return recreate_omissions(self, spec, reader)

    # -- table selection ----------------------------------------------------

    def select_tables(self, conn) -> list[dict]:
        docs = self._select_tables(conn)
        col = self.config.get("timestamp_column")
        if col and docs and not any(col in (c["name"] for c in d["columns"]) for d in docs):
            # tables without the column are fine (their rows have no write time); none having it is a
            # typo, or the agent dropped the table that had it: said, but a snapshot is never held up
            # by an option only forensics use
            log.warning("snapshotter: warning: %s: timestamp_column %r: none of the tables has such a column "
                        "(%s); their rows have no write time, so post_failure will be null",
                        self.where, col, ", ".join(d["table"] for d in docs))
        return docs

    def _select_tables(self, conn) -> list[dict]:
        schema = self.config.get("schema")
        insp = sa.inspect(conn)
        all_tables = sorted(insp.get_table_names(schema=schema))
        wanted = self.config.get("tables")
        exclude = set(self.config.get("exclude") or [])
        out = []
        roots = of(conn).partition_roots(conn, schema)
        if wanted:
            missing = [t for t in wanted if t not in all_tables]
            if missing:
                raise NotFound(f"{self.where}: no table {', '.join(missing)} in {self.location()}")
            both = [t for t in wanted if roots.get(t) in wanted]
            if both:
                # the partitioned table's stream already holds every row of its partitions
                raise ConfigError(f"{self.where}: tables: {', '.join(both)} is a partition of "
                                  f"{roots[both[0]]}, which is also listed and holds its rows; list one of them")
            for t in wanted:
                doc = base.table_schema(conn, t, schema)
                if not doc["primary_key"]:
                    raise ConfigError(f"{self.where}: table {t} has no primary key; snapshotter needs one "
                                      f"to key its rows (add one, or leave the table out)")
                out.append(doc)
            return out
        captured = set()
        keyless = []
        virtual = of(conn).virtual_tables(conn, schema)
        for t in all_tables:
            if t in exclude or t.startswith("sqlite_") or t in roots or t in virtual:
                continue
            doc = base.table_schema(conn, t, schema)
            if doc["primary_key"]:
                out.append(doc)
                captured.add(t)
            else:
                keyless.append(t)
        for t in all_tables:
            # a partition is part of its partitioned table: read with it (one stream, every row
            # once), left out with it; on its own only when that table is not captured (no key)
            if t in roots and roots[t] not in captured and roots[t] not in exclude and t not in exclude:
                doc = base.table_schema(conn, t, schema)
                if doc["primary_key"]:
                    out.append(doc)
                    keyless = [k for k in keyless if k != roots[t]]  # its rows are captured, by partition
                elif roots[t] not in keyless:
                    keyless.append(t)
        if keyless:
            # left out of the default selection: said every time, or a table the agent relies on
            # would silently never be snapshotted (nor restored)
            log.warning("snapshotter: warning: %s: table(s) %s left out: no primary key, and a row needs a "
                        "key to be compared and restored; add one, or list the table(s) in exclude to "
                        "silence this", self.where, ", ".join(sorted(set(keyless))))
        return sorted(out, key=lambda d: d["table"])


class SQLReader(SourceReader):
    def __init__(self, backend: SQLBackend, conn=None):
        self.b = backend
        # a reader inside a writer's transaction borrows its connection and leaves it open
        self._owns = conn is None
        self.conn = conn if conn is not None else backend.connect()
        if self._owns:
            with base.translate_errors(f"{backend.where}: cannot start a read transaction"):
                self.consistency = base.begin_snapshot(self.conn)

    def streams(self) -> list[StreamSpec]:
        with base.translate_errors(f"{self.b.where}: cannot list tables"):
            return [StreamSpec(doc["table"], doc, estimated_bytes=base.estimated_bytes(self.conn, doc))
                    for doc in self.b.select_tables(self.conn)]

    def read(self, spec: StreamSpec, sessions: Sequence[str] | None = None):
        return base.tracked(self.conn, self._read(spec))

    def _read(self, spec: StreamSpec):
        with base.translate_errors(f"{self.b.where}: cannot read table {spec.name}"):
            yield from self.fast_or_generic(spec)

    def read_encoded(self, spec: StreamSpec, sessions: Sequence[str] | None = None):
        if not base.reads_lines(self.conn, LINE_FORMATS):
            return None
        with base.translate_errors(f"{self.b.where}: cannot read table {spec.name}"):
            if of(self.conn).keeps_msgpack(self.conn, spec.schema):
                return None
            doc, batches = base.read_lines(self.conn, spec.schema, blocks=self.encoded_blocks)
        return doc, base.tracked(self.conn, base.translating(batches, f"{self.b.where}: cannot read table {spec.name}"))

    def read_keys(self, spec: StreamSpec, keys: list):
        """The rows with these keys (a reapply's check of what it would overwrite), locked
        like the restore's own reads when inside the writer's transaction."""
        def rows(part: list):
            return [rec for batch in base.read_rows(
                self.conn, spec.schema, for_update=not self._owns,
                where=lambda t: base.key_condition(t, spec.schema, part, of(self.conn)))
                for rec in batch]

        def batches():
            with base.translate_errors(f"{self.b.where}: cannot read table {spec.name}"):
                for i in range(0, len(keys), 500):
                    part = keys[i:i + 500]
                    got = rows(part)
                    asked = {codec.pack(k) for k in part}
                    if all(codec.pack(k) in asked for k, _ in got):
                        yield got
                        continue
                    # a row the database counts equal to an asked key under its collation ('abc' for
                    # 'ABC', case-insensitive): it is that key's live record, so its value says
                    # whether the record is what was expected (an agent's write to 'abc' is a change)
                    found = {codec.pack(k) for k, _ in got}
                    out = [(k, v) for k, v in got if codec.pack(k) in asked]
                    for key in part:
                        if codec.pack(key) not in found:
                            out += [(key, v) for _, v in rows([key])]
                    out.sort(key=lambda r: r[0])
                    yield out
        return base.tracked(self.conn, batches())

    def read_encoded_keys(self, spec: StreamSpec, keys: list):
        got = base.lines_of_keys(self.conn, spec.schema, keys, f"{self.b.where}: cannot read table {spec.name}",
                                 LINE_FORMATS)
        return None if got is None else (got[0], base.tracked(self.conn, got[1]))

    def fast_or_generic(self, spec: StreamSpec):
        # a reader inside a writer's transaction reads what it is about to overwrite
        yield from base.read_rows(self.conn, spec.schema, for_update=not self._owns)

    def outside_references(self, streams: list[str]) -> dict[str, list[str]]:
        schema = self.b.config.get("schema")
        with base.translate_errors(f"{self.b.where}: cannot list foreign keys"):
            fks = integrity.foreign_keys(self.conn, schema)
        out: dict[str, set] = {}
        for fk in fks:
            if fk.parent[1] in streams and fk.child[1] not in streams:
                out.setdefault(fk.parent[1], set()).add(fk.child[1])
        return {k: sorted(v) for k, v in out.items()}

    def restore_refusal(self, streams: list) -> str | None:
        return writing.restore_refusal(self.conn, streams, self.b.where)

    def key_problem(self, spec: StreamSpec) -> str | None:
        """NULL in a key column, or (SQLite, whose columns take any type) values of several
        types in one: a table whose rows no single order of Python values can follow."""
        pk = spec.schema.get("primary_key") or []
        quote = self.conn.dialect.identifier_preparer.quote
        schema = self.b.config.get("schema")
        table = (quote(schema) + "." if schema else "") + quote(spec.name)
        found = []
        with base.translate_errors(f"{self.b.where}: cannot inspect table {spec.name}"):
            for col in pk:
                c = quote(col)
                nulls = self.conn.exec_driver_sql(f"SELECT count(*) FROM {table} WHERE {c} IS NULL").scalar()
                kinds = []
                if self.conn.dialect.name == "sqlite":
                    kinds = self.conn.exec_driver_sql(
                        f"SELECT typeof({c}), count(*) FROM {table} WHERE {c} IS NOT NULL GROUP BY 1 ORDER BY 1").all()
                parts = [f"NULL in {nulls} row(s)"] if nulls else []
                if len({"number" if t in ("integer", "real") else t for t, _ in kinds}) > 1:  # 1 < 2.5 < 3 in Python too
                    listed = [f"{t} ({n} row(s))" for t, n in kinds]
                    parts.append(f"values of types {', '.join(listed[:-1])} and {listed[-1]}")
                if parts:
                    found.append(f"key column {col} holds {' and '.join(parts)}")
        if not found:
            return None
        return (f"table {spec.name}: {'; '.join(found)}: its rows cannot be ordered by key, which a snapshot "
                f"and a restore need (a key is never NULL and of one type); fix those rows, or leave the table "
                f"out (exclude)")

    def live_spec(self, name: str) -> StreamSpec | None:
        schema = self.b.config.get("schema")
        with base.translate_errors(f"{self.b.where}: cannot inspect table {name}"):
            if name not in sa.inspect(self.conn).get_table_names(schema=schema):
                return None
            return StreamSpec(name, base.table_schema(self.conn, name, schema))

    def close(self) -> None:
        if self._owns:
            base.end_transaction(self.conn, commit=True)
            self.conn.close()


class SQLWriter(writing.SQLWriterMixin, SourceWriter):
    transactional = True

    def __init__(self, backend: SQLBackend):
        self.b = backend
        self.txn = writing.WriteTransaction.join(backend)
        self.conn = self.txn.conn

    def reader(self) -> SQLReader:
        return SQLReader(self.b, self.conn)

    def prepare(self, spec: StreamSpec) -> None:
        with base.translate_errors(f"{self.b.where}: cannot inspect table {spec.name}"):
            insp = sa.inspect(self.conn)
            schema = spec.schema.get("db_schema")
            if spec.name not in insp.get_table_names(schema=schema):
                recreate(self, spec)
                return
            live = base.table_schema(self.conn, spec.name, schema)
        diffs = base.schema_differences(spec.schema, live)
        if diffs:
            raise SchemaMismatch(f"{self.b.where}: table {spec.name} changed since the snapshot: " + "; ".join(diffs))

    def finish(self, spec: StreamSpec) -> None:
        finish_recreated(self, spec)

    def upsert(self, spec: StreamSpec, records: list) -> None:
        with base.translate_errors(f"{self.b.where}: cannot write table {spec.name}"):
            self.upsert_rows(spec, records)

    def delete(self, spec: StreamSpec, keys: list) -> None:
        with base.translate_errors(f"{self.b.where}: cannot delete from table {spec.name}"):
            self.delete_keys(spec, keys)

    def upsert_encoded(self, spec: StreamSpec, encoding: dict, records: list[bytes]) -> bool:
        with base.translate_errors(f"{self.b.where}: cannot write table {spec.name}"):
            return writing.upsert_lines(self.conn, spec.schema, encoding, records, self.txn.guard)

    def commit(self) -> None:
        self.txn.leave(True, self.b.where)

    def rollback(self) -> None:
        self.txn.leave(False, self.b.where)


# -- a dropped table recreated (shared with the conversation backend) -------------------

def recreate_omissions(backend, spec: StreamSpec, reader) -> list[str]:
    """A dropped table's plan: its stored column types must be type names of this
    database (else the repository was tampered with: exit 3, before any write), and what
    recreating it leaves out without ``--trust-repository-sql``."""
    conn = getattr(reader, "conn", None)
    if conn is not None and "columns" in spec.schema:
        with base.translate_errors(f"{backend.where}: cannot check the types of table {spec.name}"):
            ddl.check_types(conn, spec.schema, f"{backend.where}: table {spec.name}")
    return ddl.omissions(spec.schema, bool(getattr(backend, "trust_repository_sql", False)))


@contextlib.contextmanager
def _damaged_definition(where: str):
    """A stored definition missing a part, or of the wrong shape: a damaged or edited manifest
    (exit 3; the restore's transaction rolls back), not an unexpected failure."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise IntegrityError(f"{where}: the snapshot's stored definition of the table is damaged "
                             f"({type(exc).__name__}: {exc}); nothing was written") from None


def recreate(writer, spec: StreamSpec, schema_doc: dict | None = None) -> None:
    """Create a dropped table (without its foreign keys and triggers: :func:`finish_recreated`)."""
    where = f"{writer.b.where}: table {spec.name}"
    with base.translate_errors(f"{where}: cannot recreate the table"), _damaged_definition(where):
        ddl.create_table(writer.conn, schema_doc or spec.schema,
                         trusted=bool(getattr(writer.b, "trust_repository_sql", False)), where=where)
        if of(writer.conn).ddl_commits:
            # MariaDB/MySQL commit the open transaction at every DDL statement: the writes that follow
            # (every table is prepared before the first write) need a transaction again, or each
            # would commit by itself and a failure could not roll the restore back
            base.begin_write(writer.conn)
            writer.transaction_restarted = True
    writer.recreated = getattr(writer, "recreated", set()) | {spec.name}


def finish_recreated(writer, spec: StreamSpec, schema_doc: dict | None = None) -> None:
    """A table this writer recreated, after its rows: foreign keys and triggers, sequences
    past the restored maximum, and the check that it is what the repository says it was."""
    if spec.name not in getattr(writer, "recreated", ()):
        return
    where = f"{writer.b.where}: table {spec.name}"
    with base.translate_errors(f"{where}: cannot finish recreating the table"), _damaged_definition(where):
        ddl.finish(writer.conn, schema_doc or spec.schema,
                   trusted=bool(getattr(writer.b, "trust_repository_sql", False)), where=where)
