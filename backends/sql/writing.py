"""A restore's writes into a SQL database: one write transaction per database shared by every
writer pointing at it, rows updated in place or inserted (``pgtext`` lines through the
dialect's exact path where it has one), keys deleted, in foreign-key order, each statement
counted by the transaction's :class:`~.integrity.Guard`.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any

from snapshotter import codec

from .. import lazy_module
from . import integrity
from .base import begin_write, close_reads, end_transaction, key_condition, lightweight_table, odd_key, translate_errors
from .dialect import of

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

sa = lazy_module("sqlalchemy")


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
        self.guard = integrity.Guard(conn)

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
                close_reads(self.conn)
                with translate_errors(f"{where}: commit failed"):
                    self.conn.exec_driver_sql("COMMIT")
        finally:
            try:
                with contextlib.suppress(Exception):
                    self.guard.end()
            finally:
                self.conn.close()


def upsert_lines(conn: Connection, schema_doc: dict, encoding: dict, lines: list[bytes],
                 guard: integrity.Guard | None = None) -> bool:
    """Replace rows by ``pgtext`` lines, exactly, where the dialect can
    (:meth:`.Dialect.upsert_lines`); False when this connection cannot: the caller decodes."""
    return of(conn).upsert_lines(conn, schema_doc, encoding, lines, guard)


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
        always = frozenset(c["name"] for c in cols if of(conn).overrides_identity
                           and (c.get("identity") or {}).get("always"))
        cache[name] = (generated, always)
    return cache[name]


def restore_refusal(conn: Connection, streams: list, where: str) -> str | None:
    """For a dry run: why a restore of these planned streams would be refused before any write
    (a trigger that cannot be kept from firing), or None."""
    tables = [integrity.PlannedTable(p.spec.schema, p.added, p.modified, p.deleted, p.recreate, p.records)
              for p in streams if "table" in p.spec.schema]
    if not tables:
        return None
    with translate_errors(f"{where}: cannot list triggers"):
        return integrity.Guard(conn).refusal(tables, where)


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
        t, d = self._table(spec), of(self.conn)
        self.txn.guard.before_write(spec.schema)
        for i in range(0, len(keys), 500):
            n = self.conn.execute(sa.delete(t).where(key_condition(t, spec.schema, keys[i:i + 500], d))).rowcount
            self.txn.guard.wrote(spec.schema, deleted=n)

    def _write_alone(self, t, spec, existing: list, new: list) -> tuple[list, list]:
        """Rows holding an SQL expression (:meth:`.Dialect.adapt_for_write`) written one at
        a time; the others returned for the batched statements."""
        def has_expression(row: dict) -> bool:
            return any(isinstance(v, sa.sql.ClauseElement) for v in row.values())
        d = of(self.conn)
        pk = spec.schema["primary_key"]
        rest_existing, rest_new = [], []
        for k, row in existing:
            if not has_expression(row) and not odd_key(d, pk, k):
                rest_existing.append((k, row))
                continue
            stmt = sa.update(t).where(key_condition(t, spec.schema, [k], d)) \
                .values({c: v for c, v in row.items() if c not in pk})
            n = self.conn.execute(stmt).rowcount
            self.txn.guard.wrote(spec.schema, updated=n if n is not None and n >= 0 else 1)
        for row in new:
            if not has_expression(row):
                rest_new.append(row)
                continue
            self.conn.execute(sa.insert(t).values(row))
            self.txn.guard.wrote(spec.schema, inserted=1)
        return rest_existing, rest_new

    def upsert_rows(self, spec, records: list) -> None:
        """Rows whose keys are live are updated in place (a delete and insert would fire
        ``ON DELETE`` actions on the rows referencing them); the others are inserted."""
        if not records:
            return
        t = self._table(spec)
        d = of(self.conn)
        pk = spec.schema["primary_key"]
        live = set()
        odd = [k for k, _ in records if odd_key(d, pk, k)]
        for i in range(0, len(records), 500):
            part = [k for k, _ in records[i:i + 500] if not odd or not odd_key(d, pk, k)]
            for row in self.conn.execute(sa.select(*[t.c[k] for k in pk]).where(key_condition(t, spec.schema, part, d))):
                live.add(codec.pack(row[0] if len(pk) == 1 else list(row)))
        for k in odd:
            # a key the driver cannot bind cannot be read back either (SQLite text that is not
            # UTF-8): asked for by itself
            if self.conn.execute(sa.select(sa.literal(1)).select_from(t)
                                 .where(key_condition(t, spec.schema, [k], d)).limit(1)).first():
                live.add(codec.pack(k))
        self.txn.guard.before_write(spec.schema)
        generated, identity = write_rules(self.conn, spec.schema)
        rows = [(k, d.adapt_for_write(spec.schema, v)) for k, v in records]
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
        if d.writes_expressions:
            existing, new = self._write_alone(t, spec, existing, new)
        if existing:
            settable = [c for c in existing[0][1] if c not in pk and c not in identity]
            if settable:
                stmt = sa.update(t).where(*[t.c[k] == sa.bindparam(f"snapshotter_k{i}", type_=sa.types.NullType())
                                            for i, k in enumerate(pk)]) \
                    .values({c: sa.bindparam(f"snapshotter_v{j}", type_=sa.types.NullType()) for j, c in enumerate(settable)})
                params = [{**{f"snapshotter_k{i}": v for i, v in enumerate(d.key_binds(spec.schema, k))},
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
