"""``conversation``: an agent's chat history, one record per message, selectable by session.

Two layouts, chosen by the ``url``:

**A message table in any SQLAlchemy database** (LangChain's
``SQLChatMessageHistory`` by default: table ``message_store`` with ``id``
primary key, ``session_id`` and ``message`` JSON text).  One stream named after
the table; a record's key is the row's primary key (or ``order_column``, which
must then be unique and non-null), its value the row as the driver returns it.
The read runs inside the same read-only point-in-time transaction as the
``sql`` backend, so the manifest records ``snapshot-isolation``.

**Redis lists** (LangChain's ``RedisChatMessageHistory``): the key
``key_prefix + session_id`` holds one session's messages, each a JSON string.
One stream named ``messages``; a record's key is ``[session_id, position]``.
*Position 0 is the oldest message* and positions count forward in time,
whichever end of the list the application pushes to (``list_order``:
LangChain LPUSHes, so its lists are ``newest-first``).  Counting from the
oldest message keeps every message's key stable while the agent keeps
talking; counting list indexes would renumber a whole session on every new
message and turn a one-message drift into a whole-session one.

A Redis message's value is ``{"message": TEXT}``: the stored string verbatim
(``bytes`` when it is not UTF-8), the same shape as the ``message`` column of
a SQL message table.  Verbatim is exact by construction - a restore writes
back the very bytes that were read, whatever JSON spelling wrote them.  A
parsed JSON object would read better in quarantine, but it is exact only when
re-serialising it gives the same text, and checking that costs several times
more per message than the whole rest of the read; the text is parsed only
where a message's content is needed (``written_at``).

Consistency on Redis: Redis has no multi-key snapshot.  Each session's list is
read with one ``LRANGE`` (atomic per list); sessions are found with ``SCAN``
(never ``KEYS``) and read in key order, many per round trip.  After the read,
the session keys are scanned again and every list's length and both end
elements compared with what was read: unchanged, the manifest records
``checked``; otherwise ``best-effort`` (each session is still internally
consistent, but sessions were captured at slightly different moments).  What
agents do to their history - push, trim to a window (``LTRIM``), clear, start a
session - is always detected; an in-place ``LSET`` in the middle of a list is
not.  Each session's remaining TTL (``PTTL``, read with its ``LRANGE``) goes into the
stream's schema as ``ttl_ms`` (session -> milliseconds; sessions without a TTL are left
out), not into the records: a TTL counts down, so in a record it would make every
session look modified to the next plan, and it would change the records' digests.

Restoring.  SQL: everything happens in one transaction.  Redis: the writer
collects the core's upserts and deletes per session and, on commit, applies
them in one ``WATCH``/``MULTI``/``EXEC`` transaction over every session it
changes: all lists are checked against the plan before anything is written, so
the sessions are restored all or none, and a re-run converges.  Because a list is
positional, the changes for one session must describe a list whose positions
are contiguous from 0 (they do when they are the difference between a live
read and a snapshot):

* deleted positions must be the newest messages (a tail): the list is trimmed
  to the lowest deleted position;
* upserted positions below the live length replace those messages in place;
* upserted positions at or beyond the live length are appended, oldest first,
  and must leave no gap.

Anything else (deleting a message from the middle, a position past the end)
is refused before any session is touched.  A rewritten session gets the TTL the
snapshot's ``ttl_ms`` gives it (``PEXPIRE``), or none (``PERSIST``) when the snapshot
has the map but not the session; a snapshot without the map (taken before TTLs were
kept) leaves each list's TTL as it is.

A restore of some sessions must not overwrite anything outside them: only
their records were planned and quarantined.  ``writer(sessions=[...])`` scopes
a writer to those sessions; a SQL writer whose own transaction's reader
(``writer.reader()``) was asked for some sessions only takes those as its
scope too.  A scoped writer refuses any record outside its sessions, and in
SQL refuses to overwrite a row whose key now belongs to another session
(SQLite, and MariaDB after a restart, hand out freed ids again), so that row,
absent from the quarantine, is never lost.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

from snapshotter.backend import (Option, SourceBackend, SourceReader, SourceWriter, StreamSpec, idle_timeout_option,
                                 timeout_option)
from snapshotter.codec import key_text
from snapshotter.errors import ConfigError, NotFound, Refused, SchemaMismatch, SourceError, UsageError
from snapshotter.redaction import redact_text, redact_url
from snapshotter.timeouts import timed_out

from . import lazy_module
from .sql import base, writing
from .sql.dialect import is_text_type, named, of

sa = lazy_module("sqlalchemy")

REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_STREAM = "messages"
REDIS_KIND = "redis-list"
NEWEST_FIRST, OLDEST_FIRST = "newest-first", "oldest-first"

SQL_ONLY = ("table", "session_column", "message_column", "order_column", "timestamp_column", "schema",
            "idle_timeout")
REDIS_ONLY = ("key_prefix", "list_order")

#: where a write time may sit inside a message's JSON, tried in order.  LangChain
#: messages carry none by default; applications commonly add one to
#: ``additional_kwargs``, and some providers (Ollama) report ``created_at``.
MESSAGE_TIME_FIELDS = (
    ("data", "additional_kwargs", "timestamp"),
    ("data", "additional_kwargs", "created_at"),
    ("data", "response_metadata", "timestamp"),
    ("data", "response_metadata", "created_at"),
    ("data", "timestamp"),
    ("timestamp",),
    ("created_at",),
)

#: Redis lists fetched per round trip; a batch holds at most this many sessions.
SESSIONS_PER_ROUND_TRIP = 64
ESTIMATE_SAMPLE = 32  # lists whose memory use estimates a Redis history's size


class ConversationBackend(base.SQLConnection, SourceBackend):
    name = "conversation"
    description = ("Conversation history: a SQL message table (LangChain SQLChatMessageHistory) or "
                   "Redis lists (LangChain RedisChatMessageHistory), one record per message, --session aware")
    options = (
        Option("url", str, required=True, secret=True,
               help="SQLAlchemy database URL, or redis://HOST:PORT/DB; ${VAR} keeps passwords out of the file"),
        Option("table", str, default="message_store", help="SQL: the message table"),
        Option("session_column", str, default="session_id", help="SQL: column holding the session id"),
        Option("message_column", str, default="message", help="SQL: column holding the message JSON"),
        Option("order_column", str,
               help="SQL: unique column that keys and orders messages (default: the primary key)"),
        Option("timestamp_column", str, help="SQL: column holding each message's write time, for --failure-at"),
        Option("schema", str, help="SQL: database schema (PostgreSQL) holding the table"),
        Option("key_prefix", str, default="message_store:", help="Redis: prefix of the session keys"),
        Option("list_order", str, default=NEWEST_FIRST,
               help="Redis: newest-first (LPUSH, as LangChain) or oldest-first (RPUSH)"),
        Option("timestamp_field", str,
               help="dotted path of a write time inside the message JSON, e.g. data.additional_kwargs.timestamp "
                    "(default: common LangChain places)"),
        timeout_option(),
        idle_timeout_option("SQL: seconds the restore's write transaction may wait idle (on the other sources) "
                            "before PostgreSQL or MariaDB ends it"),
    )
    supports_sessions = True

    def __init__(self, source_name: str, options: dict[str, Any]):
        super().__init__(source_name, options)
        self.base_dir: str | None = None
        scheme = urlsplit(str(options.get("url") or "")).scheme.lower()
        self.kind = "redis" if scheme in REDIS_SCHEMES else "sql"
        # a setting of the other layout is a mistake worth stopping for, unless it is just the default
        wrong = REDIS_ONLY if self.kind == "sql" else SQL_ONLY
        misplaced = [o for o in wrong if options.get(o, self.defaults[o]) != self.defaults[o]]
        if misplaced:
            other = "Redis" if self.kind == "sql" else "SQL"
            raise ConfigError(f"{self.where}: option {', '.join(misplaced)} applies to {other} stores only "
                              f"(url is a {'Redis' if self.kind == 'redis' else 'SQL database'} URL)")
        if self.kind == "redis" and self.list_order not in (NEWEST_FIRST, OLDEST_FIRST):
            raise ConfigError(f"{self.where}: list_order must be {NEWEST_FIRST} or {OLDEST_FIRST}, "
                              f"not {self.list_order!r}")

    @property
    def where(self) -> str:
        return f"source {self.source_name!r}"

    @property
    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def opt(self, name: str) -> Any:
        value = self.config.get(name)
        return self.defaults[name] if value is None else value

    @property
    def timeout(self) -> float:
        from snapshotter.timeouts import DEFAULT_TIMEOUT
        return float(self.config.get("timeout") or DEFAULT_TIMEOUT)

    @property
    def key_prefix(self) -> str:
        return self.opt("key_prefix")

    @property
    def list_order(self) -> str:
        return self.opt("list_order")

    # -- connections ---------------------------------------------------------

    def redis(self):
        try:
            import redis
        except ImportError:
            raise ConfigError(f"{self.where}: the redis package is not installed; "
                              f"install the extra snapshotter[redis]") from None
        from redis.backoff import ExponentialWithJitterBackoff
        from redis.retry import Retry
        timeout = self.timeout
        # a dropped connection is made again (redis-py's retries); a request that timed out is
        # not sent again: it may have taken effect, and a hung server would be waited on again
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1), retries=3,
                      supported_errors=(redis.exceptions.ConnectionError,))
        try:
            return redis.Redis.from_url(self.config["url"], socket_connect_timeout=timeout, socket_timeout=timeout,
                                        retry=retry)
        except ValueError as exc:
            raise ConfigError(redact_text(f"{self.where}: invalid Redis URL: {exc}")) from None

    def location(self) -> str:
        if self.kind == "sql":
            return base.redact(self.url)
        return redact_url(self.config["url"])

    def reader(self) -> SourceReader:
        return RedisListReader(self) if self.kind == "redis" else MessageTableReader(self)

    def writer(self, sessions: Sequence[str] | None = None) -> SourceWriter:
        """A writer; ``sessions`` scopes it to a ``--session`` restore (see the module docs)."""
        scope = None if sessions is None else frozenset(sessions)
        return RedisListWriter(self, scope) if self.kind == "redis" else MessageTableWriter(self, scope)

    # -- knowledge of messages -----------------------------------------------

    def session_of(self, spec: StreamSpec, key, value) -> str | None:
        if spec.schema.get("kind") == REDIS_KIND:
            return key[0] if isinstance(key, list) and key else None
        conv = spec.schema.get("conversation", {})
        session = value.get(conv.get("session_column")) if isinstance(value, dict) else None
        return None if session is None else str(session)

    def written_at(self, spec: StreamSpec, key, value) -> _dt.datetime | None:
        if not isinstance(value, dict):
            return None
        if spec.schema.get("kind") == REDIS_KIND:
            return self._message_time(value.get("message"))
        conv = spec.schema.get("conversation", {})
        if conv.get("timestamp_column"):
            return as_utc_datetime(value.get(conv["timestamp_column"]))
        return self._message_time(value.get(conv.get("message_column")))

    def _message_time(self, message: Any) -> _dt.datetime | None:
        if isinstance(message, (str, bytes)):
            try:
                message = json.loads(message)
            except ValueError:
                return None
        if not isinstance(message, dict):
            return None
        field_path = self.config.get("timestamp_field")
        paths = [tuple(field_path.split("."))] if field_path else MESSAGE_TIME_FIELDS
        for path in paths:
            node: Any = message
            for step in path:
                node = node.get(step) if isinstance(node, dict) else None
            when = as_utc_datetime(node)
            if when is not None:
                return when
        return None

    def recreate_omissions(self, spec: StreamSpec, reader) -> list[str]:
        if "columns" not in spec.schema:
            return []
        from .sql import recreate_omissions
        return recreate_omissions(self, spec, reader)

    def schema_differences(self, snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        kinds = ["Redis lists" if s.schema.get("kind") == REDIS_KIND else "a SQL table" for s in (snapshot, live)]
        if kinds[0] != kinds[1]:
            return [f"the snapshot holds {kinds[0]}, the live source is {kinds[1]}"]
        if live.schema.get("kind") == REDIS_KIND:
            return []  # positions count from the oldest message in either list order
        diffs = base.schema_differences(snapshot.schema, live.schema)
        snap_conv, live_conv = snapshot.schema.get("conversation", {}), live.schema.get("conversation", {})
        if snap_conv.get("key") != live_conv.get("key"):
            diffs.append(f"messages are keyed by {', '.join(live_conv.get('key') or [])} "
                         f"(snapshot: {', '.join(snap_conv.get('key') or [])})")
        if snap_conv.get("session_column") != live_conv.get("session_column"):
            diffs.append(f"sessions are in column {live_conv.get('session_column')} "
                         f"(snapshot: {snap_conv.get('session_column')})")
        return diffs

    # -- SQL stream ----------------------------------------------------------

    def table_stream(self, conn, table: str | None = None) -> StreamSpec | None:
        """The message table as a stream (the configured one unless named), None when it does not exist."""
        table, db_schema = table or self.opt("table"), self.config.get("schema")
        insp = sa.inspect(conn)
        if table not in insp.get_table_names(schema=db_schema):
            return None
        doc = base.table_schema(conn, table, db_schema)
        names = [c["name"] for c in doc["columns"]]
        for opt in ("session_column", "message_column", "order_column", "timestamp_column"):
            col = self.opt(opt)
            if col is not None and col not in names:
                raise ConfigError(f"{self.where}: {opt} {col!r}: table {table} has no such column "
                                  f"(columns: {', '.join(names)})")
        doc["conversation"] = {
            "session_column": self.opt("session_column"),
            "message_column": self.opt("message_column"),
            "timestamp_column": self.opt("timestamp_column"),
            "key": self._key_columns(insp, doc),
        }
        return StreamSpec(table, doc, estimated_bytes=base.estimated_bytes(conn, doc))

    def _key_columns(self, insp, doc: dict) -> list[str]:
        order, pk, table = self.opt("order_column"), doc["primary_key"], doc["table"]
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


def as_utc_datetime(v: Any) -> _dt.datetime | None:
    """A stored time as an aware datetime; naive times are taken as UTC, numbers as Unix time."""
    if isinstance(v, _dt.datetime):
        return v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)
    if isinstance(v, str):
        try:
            t = _dt.datetime.fromisoformat(v)
        except ValueError:
            return None
        return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds = v / 1000 if abs(v) > 1e11 else v  # beyond year 5138 in seconds: milliseconds
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    return None


# -- SQL message tables ----------------------------------------------------------

class MessageTableReader(SourceReader):
    def __init__(self, backend: ConversationBackend, conn=None, writer: "MessageTableWriter | None" = None):
        self.b = backend
        self.writer = writer
        # a reader inside a writer's transaction borrows its connection and leaves it open
        self._owns = conn is None
        self.conn = backend.connect() if conn is None else conn
        if self._owns:
            with base.translate_errors(f"{backend.where}: cannot start a read transaction"):
                self.consistency = base.begin_snapshot(self.conn)

    def streams(self) -> list[StreamSpec]:
        table = self.b.opt("table")
        with base.translate_errors(f"{self.b.where}: cannot inspect table {table}"):
            spec = self.b.table_stream(self.conn)
        if spec is None:
            raise NotFound(f"{self.b.where}: no table {table} in {self.b.location()}")
        return [spec]

    def restore_refusal(self, streams: list) -> str | None:
        return writing.restore_refusal(self.conn, streams, self.b.where)

    def live_spec(self, name: str) -> StreamSpec | None:
        with base.translate_errors(f"{self.b.where}: cannot inspect table {name}"):
            return self.b.table_stream(self.conn, name)

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
        if self.writer is not None:
            self.writer.planned_with(sessions)
        with base.translate_errors(f"{self.b.where}: cannot read table {spec.name}"):
            yield from base.read_rows(self.conn, keyed(spec).schema, where=where)

    def read_encoded(self, spec: StreamSpec, sessions: Sequence[str] | None = None):
        if not base.reads_lines(self.conn):
            return None
        if sessions is not None:
            self._check_session_variants(spec, sessions)
        where = None if sessions is None else (lambda t: in_sessions(t, spec, sessions))
        if self.writer is not None:
            self.writer.planned_with(sessions)
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

    def __init__(self, backend: ConversationBackend, sessions: frozenset[str] | None):
        self.b = backend
        self.sessions = sessions
        self._scope_given = sessions is not None
        self._read_all = False
        self.txn = writing.WriteTransaction.join(backend)
        self.conn = self.txn.conn

    def reader(self) -> MessageTableReader:
        return MessageTableReader(self.b, self.conn, writer=self)

    def planned_with(self, sessions: Sequence[str] | None) -> None:
        """A restore planned in this transaction saw only these sessions' rows (None: all),
        so only their rows were quarantined and only they may be overwritten."""
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
                from .sql import recreate
                recreate(self, spec, spec.schema if spec.schema["primary_key"] else keyed(spec).schema)
                return
            live = self.b.table_stream(self.conn, spec.name)
        diffs = self.b.schema_differences(spec, live)
        if diffs:
            raise SchemaMismatch(f"{self.b.where}: table {spec.name} changed since the snapshot: " + "; ".join(diffs))

    def finish(self, spec: StreamSpec) -> None:
        from .sql import finish_recreated
        finish_recreated(self, spec, spec.schema if spec.schema.get("primary_key") else keyed(spec).schema)

    def upsert(self, spec: StreamSpec, records: list) -> None:
        spec = keyed(spec)
        with base.translate_errors(f"{self.b.where}: cannot write table {spec.name}"):
            if self.sessions is not None:
                self._check_scope(spec, records)
            self.upsert_rows(spec, records)

    def upsert_encoded(self, spec: StreamSpec, encoding: dict, records: list[bytes]) -> bool:
        """Rows back from their ``pgtext`` lines (exact), within the restored sessions."""
        spec = keyed(spec)
        with base.translate_errors(f"{self.b.where}: cannot write table {spec.name}"):
            if self.sessions is not None:
                from snapshotter import pgtext
                rc = pgtext.Codec(encoding)
                col = spec.schema["conversation"]["session_column"]
                for line in records:
                    field = rc.field(line, col)
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


# -- Redis lists -------------------------------------------------------------------

@contextlib.contextmanager
def translate_redis_errors(what: str, timeout: float | None = None) -> Iterator[None]:
    """redis-py errors become one-line SourceErrors (a timeout says its bound)."""
    import redis
    try:
        yield
    except redis.exceptions.TimeoutError as exc:
        raise SourceError(timed_out(what, timeout)) from exc
    except redis.exceptions.RedisError as exc:
        raise SourceError(redact_text(f"{what}: {redis_error_text(exc)}")) from exc


# redis-py names the failing command of a pipeline with its arguments (a message's text
# among them): "Command # 3 (LSET key 0 {...}) of pipeline caused error: OOM ..."
_PIPELINE_ERROR = re.compile(r"Command # (\d+) \((.*)\) of pipeline caused error: ", re.S)
# Redis itself echoes the arguments of a command it does not know
_ARGS_ECHO = re.compile(r",? with args beginning with: .*$", re.S)


def redis_error_text(exc: BaseException) -> str:
    """The error's first line without the arguments of the command that failed: they can
    hold a message's content, which must not reach an error message or a log."""
    text = str(exc).strip()
    found = None
    for found in _PIPELINE_ERROR.finditer(text):
        pass
    if found is not None:
        command = found.group(2).split(" ", 1)[0].upper()
        text = f"command {found.group(1)} ({command}) of the pipeline failed: {text[found.end():]}"
    text = _ARGS_ECHO.sub("", text)
    return text.splitlines()[0] if text else type(exc).__name__


def glob_escape(text: bytes) -> bytes:
    for ch in (b"\\", b"*", b"?", b"[", b"]"):
        text = text.replace(ch, b"\\" + ch)
    return text


def session_text(raw: bytes) -> str:
    """A Redis list's session id (its key after the prefix) as text.  Keys are bytes and
    need not be UTF-8: a byte that is not part of UTF-8 text becomes U+DC80-U+DCFF
    (Python's ``surrogateescape``), which the record encoding keeps and
    :func:`session_bytes` turns back into the same byte, so such a session is captured
    and restored exactly (shown as base64 where text is needed)."""
    return raw.decode("utf-8", "surrogateescape")


def session_bytes(session: str) -> bytes:
    return session.encode("utf-8", "surrogateescape")


def message_value(raw: bytes) -> dict:
    """A stored message as a record value that writes back to the same bytes (module docs)."""
    try:
        return {"message": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"message": raw}


def message_bytes(value: Any, key: Any) -> bytes:
    message = value.get("message") if type(value) is dict else None
    if type(message) is str:
        return message.encode("utf-8")
    if type(message) is bytes:
        return message
    raise SourceError(f"message {key_text(key)}: a Redis message record is {{\"message\": text or bytes}}, "
                      f"not {key_text(value)[:80]}")


@dataclass
class SessionChanges:
    """The core's upserts and deletes for one session's list, by position."""

    put: dict[int, bytes] = field(default_factory=dict)
    drop: set[int] = field(default_factory=set)
    #: what the restore planned over (:meth:`RedisListWriter.expect`): position -> message, or None: absent
    expected: dict[int, bytes | None] = field(default_factory=dict)
    #: the live list's length when planned, where the plan tells it
    planned_len: int | None = None

    def changed(self, items: list[bytes]) -> str | None:
        """Why the live list (oldest first) is not the one planned over, or None."""
        if self.planned_len is not None and len(items) != self.planned_len:
            return f"it has {len(items)} messages, the restore planned over {self.planned_len}"
        for pos in sorted(self.expected):
            live = items[pos] if pos < len(items) else None
            if live != self.expected[pos]:
                return f"message {pos} changed"
        return None

    def edits(self, live_len: int, session: str) -> tuple[int, dict[int, bytes], list[bytes]]:
        """(final length, in-place replacements, messages to append oldest first) for a live list.

        Refuses changes that do not describe a list with contiguous positions
        (the rules in the module docs) rather than guess.
        """
        end = max(live_len, max(self.put) + 1) if self.put else live_len
        final = min(end, min(self.drop)) if self.drop else end
        kept_drop = [p for p in range(final, live_len) if p not in self.drop]
        if kept_drop:
            raise SourceError(f"session {session!r}: cannot delete position {final} while keeping "
                              f"position {kept_drop[0]}; a list can only lose its newest messages")
        beyond = [p for p in self.put if p >= final]
        if beyond:
            raise SourceError(f"session {session!r}: position {min(beyond)} is both written and deleted")
        gap = [p for p in range(live_len, final) if p not in self.put]
        if gap:
            raise SourceError(f"session {session!r}: cannot write position {final - 1} without position "
                              f"{gap[0]} (the live list has {live_len} messages)")
        in_place = {p: v for p, v in self.put.items() if p < min(live_len, final)}
        appended = [self.put[p] for p in range(live_len, final)]
        return final, in_place, appended


class RedisListReader(SourceReader):
    consistency = "checked"

    def __init__(self, backend: ConversationBackend):
        self.b = backend
        self.client = backend.redis()
        self.prefix = backend.key_prefix.encode("utf-8")
        self._listed: set[bytes] | None = None
        with translate_redis_errors(f"{backend.where}: cannot reach Redis at {backend.location()}", backend.timeout):
            self.client.ping()

    def streams(self) -> list[StreamSpec]:
        with translate_redis_errors(f"{self.b.where}: cannot list the sessions at {self.b.location()}", self.b.timeout):
            self._listed = self._scan()
            estimate = self._estimate(self._listed)
        return [StreamSpec(REDIS_STREAM, redis_schema(self.b), estimated_bytes=estimate)]

    def live_spec(self, name: str) -> StreamSpec | None:
        # what restore, diff and verify ask: no listing and no size estimate (a read lists)
        return StreamSpec(REDIS_STREAM, redis_schema(self.b)) if name == REDIS_STREAM else None

    def _estimate(self, keys: set[bytes]) -> int | None:
        """The lists' size from the memory of a sample of them (chunks are sized by it:
        without it a large history would be cut into tens of kilobytes per object)."""
        sample = sorted(keys)[::max(1, len(keys) // ESTIMATE_SAMPLE)][:ESTIMATE_SAMPLE]
        if not sample:
            return None
        pipe = self.client.pipeline(transaction=False)
        for k in sample:
            pipe.memory_usage(k)  # Redis samples a few nodes of each list: cheap, near enough
        # a server where MEMORY is disabled or renamed answers with errors: no estimate
        sizes = [n for n in pipe.execute(raise_on_error=False) if isinstance(n, int)]
        return int(sum(sizes) / len(sizes) * len(keys)) if sizes else None

    def read(self, spec: StreamSpec, sessions: Sequence[str] | None = None):
        with translate_redis_errors(f"{self.b.where}: cannot read {self.b.location()}", self.b.timeout):
            yield from self._read(spec, sessions)

    def _scan(self) -> set[bytes]:
        return set(self.client.scan_iter(match=glob_escape(self.prefix) + b"*", count=1000, _type="list"))

    def _read(self, spec: StreamSpec, sessions: Sequence[str] | None):
        if sessions is None:
            # the listing streams() made just before, once (a retry lists again)
            listed, self._listed = self._listed, None
            keys = sorted(listed if listed is not None else self._scan(), key=self._session)
        else:
            keys = sorted({self.prefix + session_bytes(s) for s in sessions}, key=self._session)
        # in the order of their sessions (key order); for UTF-8 keys that is their byte order
        newest_first = self.b.list_order == NEWEST_FIRST
        seen: dict[bytes, tuple] = {}
        # each session's length as read, for a restore's writer (RedisListWriter.expect): the
        # plan that follows this read is the one the writer checks against
        lengths: dict[str, int] = {}
        self.b.read_lengths = lengths
        # each session's remaining time to live, in the stream's schema (the manifest keeps it;
        # a restore sets it again on the sessions it rewrites); sessions without one are left out
        ttls: dict[str, int] = {}
        spec.schema[TTL_FIELD] = ttls
        for i in range(0, len(keys), SESSIONS_PER_ROUND_TRIP):
            group = keys[i:i + SESSIONS_PER_ROUND_TRIP]
            pipe = self.client.pipeline(transaction=False)
            for k in group:
                pipe.lrange(k, 0, -1).pttl(k)
            replies = pipe.execute(raise_on_error=False)
            batch = []
            for j, k in enumerate(group):
                items, ttl = replies[2 * j], replies[2 * j + 1]
                if isinstance(items, Exception):
                    raise SourceError(f"{self.b.where}: key {k.decode('utf-8', 'replace')!r}: {items}")
                session = self._session(k)
                seen[k] = list_state(items)
                lengths[session] = len(items)
                if items and isinstance(ttl, int) and ttl > 0:
                    ttls[session] = ttl
                if newest_first:
                    items.reverse()
                batch.extend(([session, pos], message_value(raw)) for pos, raw in enumerate(items))
            if batch:
                yield batch
        if not self._unchanged(seen, rescan=sessions is None):
            self.consistency = "best-effort"

    def _session(self, key: bytes) -> str:
        return session_text(key[len(self.prefix):])

    def _unchanged(self, seen: dict[bytes, tuple], rescan: bool) -> bool:
        """Whether every list still has the length and end elements it was read with
        (and no session appeared)."""
        keys = sorted(set(seen) | (self._scan() if rescan else set()))
        for i in range(0, len(keys), 1000):
            group = keys[i:i + 1000]
            pipe = self.client.pipeline(transaction=False)
            for k in group:
                pipe.llen(k).lindex(k, 0).lindex(k, -1)
            now = pipe.execute()
            for j, k in enumerate(group):
                n, first, last = now[3 * j:3 * j + 3]
                if (n, hash(first), hash(last)) != seen.get(k, EMPTY_LIST):
                    return False
        return True

    def close(self) -> None:
        self.client.close()


EMPTY_LIST = (0, hash(None), hash(None))

#: the stream schema's map of session -> remaining time to live in milliseconds, as read
#: (sessions without a TTL are absent; a snapshot made before TTLs were kept has no map)
TTL_FIELD = "ttl_ms"


def list_state(items: list[bytes]) -> tuple:
    """What the after-read check compares: length and (hashes of) both end elements."""
    if not items:
        return EMPTY_LIST
    return len(items), hash(items[0]), hash(items[-1])


def redis_schema(backend: ConversationBackend) -> dict:
    return {"kind": REDIS_KIND, "key_prefix": backend.key_prefix, "list_order": backend.list_order,
            "key": ["session", "position"], "position": "0 is the oldest message"}


class RedisListWriter(SourceWriter):
    transactional = False

    def __init__(self, backend: ConversationBackend, sessions: frozenset[str] | None):
        self.b = backend
        self.sessions = sessions
        self.client = backend.redis()
        self.prefix = backend.key_prefix.encode("utf-8")
        self.pending: dict[str, SessionChanges] = {}
        #: session -> remaining TTL in ms at the snapshot (prepare); None: the snapshot did not keep TTLs
        self.ttls: dict[str, int] | None = None
        with translate_redis_errors(f"{backend.where}: cannot reach Redis at {backend.location()}", backend.timeout):
            self.client.ping()

    def prepare(self, spec: StreamSpec) -> None:
        if spec.schema.get("kind") != REDIS_KIND:
            raise SchemaMismatch(f"{self.b.where}: stream {spec.name} was captured from a SQL table; "
                                 f"this source is Redis lists")
        ttls = spec.schema.get(TTL_FIELD)
        # a snapshot taken before TTLs were kept says nothing about them: each list keeps its own
        self.ttls = ttls if isinstance(ttls, dict) else None

    def _changes(self, key: Any) -> tuple[SessionChanges, int]:
        if not (isinstance(key, list) and len(key) == 2 and isinstance(key[0], str)
                and type(key[1]) is int and key[1] >= 0):
            raise SourceError(f"{self.b.where}: {key_text(key)} is not a [session, position] key")
        session, pos = key
        if self.sessions is not None and session not in self.sessions:
            raise SourceError(f"{self.b.where}: message {key_text(key)} is outside the sessions being restored")
        return self.pending.setdefault(session, SessionChanges()), pos

    def upsert(self, spec: StreamSpec, records: list) -> None:
        for key, value in records:
            changes, pos = self._changes(key)
            changes.put[pos] = message_bytes(value, key)

    def delete(self, spec: StreamSpec, keys: list) -> None:
        for key in keys:
            changes, pos = self._changes(key)
            changes.drop.add(pos)

    def expect(self, spec: StreamSpec, records: Iterable) -> bool:
        added: dict[str, list[int]] = {}  # positions the snapshot lacks, per session
        absent: dict[str, list[int]] = {}  # positions the live list lacked
        for key, op, value in records:
            changes, pos = self._changes(key)
            changes.expected[pos] = None if op == "deleted" else message_bytes(value, key)
            if op in ("added", "deleted"):
                (added if op == "added" else absent).setdefault(key[0], []).append(pos)
        # the planned length: one past the highest message the snapshot lacks, else the
        # first position the live list lacked
        # a session whose plan only modified messages: the length its reader saw
        lengths = getattr(self.b, "read_lengths", None) or {}
        for session, changes in self.pending.items():
            if session in added:
                changes.planned_len = max(added[session]) + 1
            elif session in absent:
                changes.planned_len = min(absent[session])
            else:
                changes.planned_len = lengths.get(session)
        return True

    def commit(self) -> None:
        """Every session of the restore in one ``WATCH``/``MULTI``/``EXEC`` transaction: each
        list is checked against what was planned (and quarantined) before anything is
        written, so a session the agent changed meanwhile stops the restore of this source
        with nothing written to any of its sessions, and otherwise all are rewritten at once."""
        if not self.pending:
            return
        sessions = sorted(self.pending)
        keys = [self.prefix + session_bytes(s) for s in sessions]
        with translate_redis_errors(f"{self.b.where}: cannot restore sessions "
                                    f"{', '.join(map(repr, sessions[:5]))}{', ...' if len(sessions) > 5 else ''}",
                                    self.b.timeout):
            # WATCH makes the checks and the edits one atomic step; redis-py retries on a race
            self.client.transaction(lambda pipe: self._rewrite(pipe, sessions, keys), *keys)
        self.pending.clear()

    def _rewrite(self, pipe, sessions: list[str], keys: list[bytes]) -> None:
        newest_first = self.b.list_order == NEWEST_FIRST
        edits = []
        # the lists are read on another connection, many per round trip: a write after the
        # WATCH (on ``pipe``'s connection) fails the EXEC and the whole check runs again
        for i in range(0, len(keys), SESSIONS_PER_ROUND_TRIP):
            group = list(zip(sessions[i:i + SESSIONS_PER_ROUND_TRIP], keys[i:i + SESSIONS_PER_ROUND_TRIP]))
            reader = self.client.pipeline(transaction=False)
            for _, key in group:
                reader.lrange(key, 0, -1)
            for (session, key), items in zip(group, reader.execute()):
                changes = self.pending[session]
                if changes.expected or changes.planned_len is not None:
                    if newest_first:
                        items.reverse()
                    why = changes.changed(items)
                    if why is not None:
                        raise Refused(f"{self.b.where}: session {session!r} changed after the restore planned it "
                                      f"({why}); nothing was written to any session of this source: run the "
                                      f"restore again")
                edits.append((session, key, len(items), *changes.edits(len(items), session)))
        pipe.multi()
        for session, key, live_len, final, in_place, appended in edits:
            if final == 0:
                pipe.delete(key)
                continue
            if final < live_len:
                if newest_first:  # the newest messages are at the head
                    pipe.ltrim(key, live_len - final, -1)
                else:
                    pipe.ltrim(key, 0, final - 1)
            kept = min(live_len, final)
            for pos, raw in sorted(in_place.items()):
                pipe.lset(key, kept - 1 - pos if newest_first else pos, raw)
            if appended:
                # LPUSH a b c leaves c at the head: the last pushed is the newest, as it should be
                (pipe.lpush if newest_first else pipe.rpush)(key, *appended)
            if self.ttls is not None:
                # the time to live the session had when the snapshot was taken (none: none)
                ttl = self.ttls.get(session)
                if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > 0:
                    pipe.pexpire(key, ttl)
                else:
                    pipe.persist(key)

    def rollback(self) -> None:
        self.pending.clear()

    def close(self) -> None:
        self.client.close()
