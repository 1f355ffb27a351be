"""The ``conversation`` backend's SQL layout: a message table in any SQLAlchemy database
(LangChain's ``SQLChatMessageHistory`` by default: table ``message_store`` with ``id``
primary key, ``session_id`` and ``message`` JSON text).  One stream named after
the table; a record's key is the row's primary key (or ``order_column``, which
must then be unique and non-null), its value the row as the driver returns it.
The read runs inside the same read-only point-in-time transaction as the
``sql`` backend, so the manifest records ``snapshot-isolation``; a restore
happens in one transaction.

A restore of some sessions must not overwrite anything outside them: only
their records were planned and quarantined.  A writer made for some sessions
takes them as its scope, and so does a writer told that the restore planned over
some sessions only (:meth:`SourceWriter.planned`).  A scoped writer
refuses any record outside its sessions, and refuses to overwrite a row whose
key now belongs to another session (SQLite, and MariaDB after a restart, hand
out freed ids again), so that row, absent from the quarantine, is never lost.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
from typing import Any, Sequence

from snapshotter.backend import SourceReader, SourceWriter, StreamSpec
from snapshotter.codec import key_text
from snapshotter.errors import ConfigError, NotFound, SchemaMismatch, SourceError, UsageError

from .. import lazy_module
from ..sql import base, writing
from ..sql.dialect import is_text_type, named, of
from .store import MessageStore, MessageTime, as_utc_datetime

sa = lazy_module("sqlalchemy")


class MessageTable(MessageStore, base.SQLConnection):
    """The messages as rows of one table, keyed by its primary key or ``order_column``."""

    @property
    def config(self) -> dict:
        return self.backend.config

    @property
    def base_dir(self) -> str | None:
        return self.backend.base_dir

    @property
    def create_missing(self) -> bool:
        return self.backend.create_missing

    def location(self) -> str:
        return base.redact(self.url)

    def reader(self) -> MessageTableReader:
        return MessageTableReader(self)

    def writer(self, sessions: frozenset[str] | None) -> MessageTableWriter:
        return MessageTableWriter(self, sessions)

    @staticmethod
    def session_of(spec: StreamSpec, key: Any, value: Any) -> str | None:
        conv = spec.schema.get("conversation", {})
        session = value.get(conv.get("session_column")) if isinstance(value, dict) else None
        return None if session is None else str(session)

    @staticmethod
    def session_field(spec: StreamSpec) -> str | None:
        return spec.schema.get("conversation", {}).get("session_column")

    @staticmethod
    def written_at(spec: StreamSpec, value: dict, message_time: MessageTime) -> _dt.datetime | None:
        conv = spec.schema.get("conversation", {})
        if conv.get("timestamp_column"):
            return as_utc_datetime(value.get(conv["timestamp_column"]))
        return message_time(value.get(conv.get("message_column")))

    @staticmethod
    def schema_differences(snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        diffs = base.schema_differences(snapshot.schema, live.schema)
        snap_conv, live_conv = snapshot.schema.get("conversation", {}), live.schema.get("conversation", {})
        if snap_conv.get("key") != live_conv.get("key"):
            diffs.append(f"messages are keyed by {', '.join(live_conv.get('key') or [])} "
                         f"(snapshot: {', '.join(snap_conv.get('key') or [])})")
        if snap_conv.get("session_column") != live_conv.get("session_column"):
            diffs.append(f"sessions are in column {live_conv.get('session_column')} "
                         f"(snapshot: {snap_conv.get('session_column')})")
        return diffs

    def table_stream(self, conn, table: str | None = None) -> StreamSpec | None:
        """The message table as a stream (the configured one unless named), None when it does not exist."""
        table, db_schema = table or self.backend.opt("table"), self.config.get("schema")
        insp = sa.inspect(conn)
        if table not in insp.get_table_names(schema=db_schema):
            return None
        doc = base.table_schema(conn, table, db_schema)
        names = [c["name"] for c in doc["columns"]]
        for opt in ("session_column", "message_column", "order_column", "timestamp_column"):
            col = self.backend.opt(opt)
            if col is not None and col not in names:
                raise ConfigError(f"{self.where}: {opt} {col!r}: table {table} has no such column "
                                  f"(columns: {', '.join(names)})")
        doc["conversation"] = {
            "session_column": self.backend.opt("session_column"),
            "message_column": self.backend.opt("message_column"),
            "timestamp_column": self.backend.opt("timestamp_column"),
            "key": self._key_columns(insp, doc),
        }
        return StreamSpec(table, doc, estimated_bytes=base.estimated_bytes(conn, doc))

    def _key_columns(self, insp, doc: dict) -> list[str]:
        order, pk, table = self.backend.opt("order_column"), doc["primary_key"], doc["table"]
        if order is None:
            if not pk:
                raise ConfigError(f"{self.where}: table {table} has no primary key; set order_column to a "
                                  f"unique, non-null column that orders its messages")
            return list(pk)
        if pk == [order]:
            return pk
        unique = any(i["unique"] and i["columns"] == [order] for i in doc["indexes"])
        with contextlib.suppress(NotImplementedError):
            unique = unique or any(u["column_names"] == [order]
                                   for u in insp.get_unique_constraints(table, schema=doc["db_schema"]))
        nullable = next(c["nullable"] for c in doc["columns"] if c["name"] == order)
        if not unique or nullable:
            raise ConfigError(f"{self.where}: order_column {order!r} must be the primary key of {table} or a "
                              f"non-null column with a unique index, since it keys the records")
        return [order]


def keyed(spec: StreamSpec) -> StreamSpec:
    """The spec with the record key as its primary key (they differ only with order_column)."""
    conv = spec.schema.get("conversation", {})
    if conv.get("key") and conv["key"] != spec.schema["primary_key"]:
        return StreamSpec(spec.name, {**spec.schema, "primary_key": conv["key"]})
    return spec


def in_sessions(t: sa.TableClause, spec: StreamSpec, sessions) -> sa.ColumnElement:
    """``session_column IN sessions``, compared exactly; session ids are text, so a numeric
    column is compared as text.

    Exactly, whatever the column's collation: under a case-insensitive one (MariaDB's
    ``_ci``, PostgreSQL ``citext``, SQLite ``NOCASE``) ``alice`` would also take ``Alice``'s
    messages, which the plan (comparing the snapshot's session ids as they are) does not
    count as the session's, so a restore of ``alice`` deleted them as "added".  The plain
    ``IN`` is kept beside the exact test so that an index on the column is used."""
    name = spec.schema["conversation"]["session_column"]
    col_type = next(c["type"] for c in spec.schema["columns"] if c["name"] == name)
    if not is_text_type(col_type):
        return sa.cast(t.c[name], sa.String).in_(sorted(sessions))
    col, wanted = t.c[name], sorted(sessions)
    # by the dialect the stream was captured from
    test = named(spec.schema.get("dialect")).exactly_in(col, wanted)
    if test is None:
        return col.in_(wanted)
    return sa.and_(col.in_(_untyped(wanted)), test)


def _untyped(values) -> sa.BindParameter:
    """An IN list the database reads by the column's own type (a str bind would be sent as VARCHAR, and
    ``citext = varchar`` compares as text, case-sensitively)."""
    return sa.bindparam(None, sorted(values), expanding=True, type_=sa.types.NullType())


class MessageTableReader(SourceReader):
    def __init__(self, table: MessageTable, conn=None):
        self.table = table
        self.b = table.backend
        # a reader inside a writer's transaction borrows its connection and leaves it open
        self._owns = conn is None
        self.conn = table.connect() if conn is None else conn
        if self._owns:
            with base.translate_errors(f"{table.where}: cannot start a read transaction"):
                self.consistency = base.begin_snapshot(self.conn)

    def streams(self) -> list[StreamSpec]:
        table = self.b.opt("table")
        with base.translate_errors(f"{self.b.where}: cannot inspect table {table}"):
            spec = self.table.table_stream(self.conn)
        if spec is None:
            raise NotFound(f"{self.b.where}: no table {table} in {self.b.location()}")
        return [spec]

    def restore_refusal(self, streams: list) -> str | None:
        return writing.restore_refusal(self.conn, streams, self.b.where)

    def live_spec(self, name: str) -> StreamSpec | None:
        with base.translate_errors(f"{self.b.where}: cannot inspect table {name}"):
            return self.table.table_stream(self.conn, name)

    def _check_session_variants(self, spec: StreamSpec, sessions: Sequence[str]) -> None:
        """Sessions are selected exactly (:func:`in_sessions`); a live session id the database
        counts equal to a selected one under the column's collation ('Alice' for 'alice') is
        the same conversation to the agent, so selecting only some of them is refused."""
        name = spec.schema["conversation"]["session_column"]
        col_type = next(c["type"] for c in spec.schema["columns"] if c["name"] == name)
        if not is_text_type(col_type):
            return
        t = base.lightweight_table(spec.schema)
        exact = named(spec.schema.get("dialect")).exact_text(t.c[name])
        if exact is None:
            return
        with base.translate_errors(f"{self.b.where}: cannot read table {spec.name}"):
            # DISTINCT of the exact text: a plain DISTINCT would fold 'Alice' into 'alice' as the collation does
            found = {r[0].decode("utf-8", "replace") if isinstance(r[0], bytes) else r[0] for r in self.conn.execute(
                sa.select(exact.label("s")).where(t.c[name].in_(_untyped(sessions))).distinct())}
        others = sorted(str(v) for v in found if v not in sessions)
        if others:
            every = sorted(set(sessions) | set(others))
            raise UsageError(f"{self.b.where}: session(s) {', '.join(map(repr, others))} of table {spec.name} are "
                             f"the same session(s) as {', '.join(map(repr, sorted(sessions)))} under the column's "
                             f"collation (the agent reads them as one conversation); name every one of them: "
                             f"{' '.join('--session ' + v for v in every)}")

    def read(self, spec: StreamSpec, sessions: Sequence[str] | None = None):
        where = None if sessions is None else (lambda t: in_sessions(t, spec, sessions))
        if sessions is not None:
            self._check_session_variants(spec, sessions)
        with base.translate_errors(f"{self.b.where}: cannot read table {spec.name}"):
            yield from base.read_rows(self.conn, keyed(spec).schema, where=where)

    def read_encoded(self, spec: StreamSpec, sessions: Sequence[str] | None = None):
        if not base.reads_lines(self.conn):
            return None
        if sessions is not None:
            self._check_session_variants(spec, sessions)
        where = None if sessions is None else (lambda t: in_sessions(t, spec, sessions))
        what = f"{self.b.where}: cannot read table {spec.name}"
        with base.translate_errors(what):
            doc, batches = base.read_lines(self.conn, keyed(spec).schema, where=where)
        return doc, base.translating(batches, what)

    def read_encoded_keys(self, spec: StreamSpec, keys: list):
        return base.lines_of_keys(self.conn, keyed(spec).schema, keys,
                                     f"{self.b.where}: cannot read table {spec.name}")

    def close(self) -> None:
        if self._owns:
            base.end_transaction(self.conn, commit=True)
            self.conn.close()


class MessageTableWriter(writing.SQLWriterMixin, SourceWriter):
    transactional = True

    def __init__(self, table: MessageTable, sessions: frozenset[str] | None):
        self.table = table
        self.b = table.backend
        self.sessions = sessions
        self._scope_given = sessions is not None
        self._read_all = False
        self.txn = writing.WriteTransaction.join(table)
        self.conn = self.txn.conn

    def reader(self) -> MessageTableReader:
        return MessageTableReader(self.table, self.conn)

    def planned(self, spec: StreamSpec, sessions: Sequence[str] | None, context) -> None:
        """The restore planned over only these sessions' rows (None: all), so only their rows
        were quarantined and only they may be overwritten."""
        if self._scope_given or self._read_all:
            return
        if sessions is None:
            self._read_all, self.sessions = True, None
        else:
            self.sessions = (self.sessions or frozenset()) | frozenset(sessions)

    def prepare(self, spec: StreamSpec) -> None:
        if "columns" not in spec.schema:
            raise SchemaMismatch(f"{self.b.where}: stream {spec.name} was captured from Redis lists; "
                                 f"this source is a SQL table")
        with base.translate_errors(f"{self.b.where}: cannot inspect table {spec.name}"):
            insp = sa.inspect(self.conn)
            schema = spec.schema.get("db_schema")
            if spec.name not in insp.get_table_names(schema=schema):
                # a table without a primary key is recreated with its key column as one
                from ..sql import recreate
                recreate(self, spec, spec.schema if spec.schema["primary_key"] else keyed(spec).schema)
                return
            live = self.table.table_stream(self.conn, spec.name)
        diffs = self.b.schema_differences(spec, live)
        if diffs:
            raise SchemaMismatch(f"{self.b.where}: table {spec.name} changed since the snapshot: " + "; ".join(diffs))

    def finish(self, spec: StreamSpec) -> None:
        from ..sql import finish_recreated
        finish_recreated(self, spec, spec.schema if spec.schema.get("primary_key") else keyed(spec).schema)

    def upsert(self, spec: StreamSpec, records: list) -> None:
        spec = keyed(spec)
        with base.translate_errors(f"{self.b.where}: cannot write table {spec.name}"):
            if self.sessions is not None:
                self._check_scope(spec, records)
            self.upsert_rows(spec, records)

    def upsert_encoded(self, spec: StreamSpec, encoding: dict, records: list[bytes]) -> bool:
        """Rows back from their lines (``pgtext``: exact; ``mytext``: decoded), within the
        restored sessions."""
        spec = keyed(spec)
        with base.translate_errors(f"{self.b.where}: cannot write table {spec.name}"):
            if self.sessions is not None:
                from snapshotter.encoding import codec_for
                rc = codec_for(encoding)
                read = rc.field_reader(spec.schema["conversation"]["session_column"])
                for line in records:
                    field = read(line)
                    session = None if field is None else field.decode("utf-8", "replace")
                    if session is None or session not in self.sessions:
                        raise SourceError(f"{self.b.where}: message {key_text(rc.key(line))} belongs to session "
                                          f"{session!r}, outside the sessions being restored")
                self._check_keys_in_scope(spec, [rc.key(line) for line in records])
            return writing.upsert_lines(self.conn, spec.schema, encoding, records, self.txn.guard)

    def delete(self, spec: StreamSpec, keys: list) -> None:
        spec = keyed(spec)
        with base.translate_errors(f"{self.b.where}: cannot delete from table {spec.name}"):
            if self.sessions is None:
                self.delete_keys(spec, keys)
                return
            # a key the plan saw in a restored session may have moved to another since
            t, d = self._table(spec), of(self.conn)
            self.txn.guard.before_write(spec.schema)
            for i in range(0, len(keys), 500):
                part = base.key_condition(t, spec.schema, keys[i:i + 500], d)
                n = self.conn.execute(sa.delete(t).where(part, in_sessions(t, spec, self.sessions))).rowcount
                self.txn.guard.wrote(spec.schema, deleted=n)

    def _check_scope(self, spec: StreamSpec, records: list) -> None:
        col = spec.schema["conversation"]["session_column"]
        for key, value in records:
            session = value.get(col)
            if session is None or str(session) not in self.sessions:
                raise SourceError(f"{self.b.where}: message {key_text(key)} belongs to session "
                                  f"{session!r}, outside the sessions being restored")
        self._check_keys_in_scope(spec, [k for k, _ in records])

    def _check_keys_in_scope(self, spec: StreamSpec, keys: list) -> None:
        """No row these keys will overwrite belongs to another session now."""
        col = spec.schema["conversation"]["session_column"]
        t, pk = self._table(spec), spec.schema["primary_key"]
        for i in range(0, len(keys), 500):
            stmt = sa.select(*[t.c[k] for k in pk], t.c[col]).where(
                base.key_condition(t, spec.schema, keys[i:i + 500], of(self.conn)),
                sa.or_(t.c[col].is_(None), sa.not_(in_sessions(t, spec, self.sessions))))
            row = self.conn.execute(stmt).first()
            if row is not None:
                key = row[0] if len(pk) == 1 else list(row[:-1])
                raise SourceError(f"{self.b.where}: message {key_text(key)} now belongs to session {row[-1]!r}; "
                                  f"restoring it would overwrite that session's message, which this restore "
                                  f"does not quarantine (add that session to the restore, or restore every session)")

    def commit(self) -> None:
        self.txn.leave(True, self.b.where)

    def rollback(self) -> None:
        self.txn.leave(False, self.b.where)
