"""PostgreSQL: its transactions and timeouts, key order in Python's order whatever the
collation and server encoding, tables read and written as ``pgtext`` lines through COPY
(:mod:`.pgcopy`), partitions, and a restore's writes in replica mode, with the triggers
and rules that would still fire switched off and the transaction's own counters as the
proof of what the database wrote.  Table definitions: :mod:`.pgddl`.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING, Any, Iterator

from snapshotter.errors import SourceError

from .. import lazy_module
from . import pgbulk, pgcopy, pgddl
from .base import array_literal, select_stmt
from .dialect import Dialect, is_text_type
from .integrity import ForeignKey, quoted_name, shown
from .writing import write_rules

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .integrity import Guard

sa = lazy_module("sqlalchemy")
log = logging.getLogger(__name__)

#: server encodings whose byte order is code point order (LATIN1 maps bytes to U+0000-U+00FF
#: one to one); in any other, text keys are ordered as UTF-8 bytes
BYTES_IN_CODE_POINT_ORDER = {"UTF8", "SQL_ASCII", "LATIN1"}

#: base types whose values psycopg loads as Python values that order as the database orders
#: them (money and the reg* types are numeric to PostgreSQL but load as text)
VALUE_ORDERED_TYPES = frozenset({
    "int2", "int4", "int8", "float4", "float8", "numeric", "oid", "bool", "date", "time", "timetz",
    "timestamp", "timestamptz", "interval", "uuid", "bytea", "bit", "varbit",
})


class PostgreSQL(Dialect):
    ddl_kind = "postgresql"
    reads_lines = True
    null_type_matches_any = True
    overrides_identity = True
    qualifies_names = True
    foreign_keys_span_schemas = True

    def connect_args(self, url, timeout: float) -> dict[str, Any]:
        if url.get_driver_name() not in ("psycopg", "psycopg2"):
            return {}
        # libpq: connect_timeout bounds the connect (2 s at least); a read has no client-side
        # bound (a 20 GB COPY is one statement), so a server or network that went away is
        # found by TCP: keepalive probes on an idle socket and tcp_user_timeout for data
        # left unacknowledged, each within about the timeout
        whole = max(1, math.ceil(timeout))
        return {"connect_timeout": max(2, whole), "keepalives": 1, "keepalives_idle": whole,
                "keepalives_interval": max(1, math.ceil(timeout / 3)), "keepalives_count": 3,
                "tcp_user_timeout": int(timeout * 1000)}

    def watch(self, engine, what: str, timeout: float) -> None:
        if engine.url.get_driver_name() == "psycopg":
            from . import pgwatch  # libpq has no read timeout: a server that stops answering mid-statement
            pgwatch.watch(engine, what, timeout)

    # -- transactions ----------------------------------------------------------------

    def begin_snapshot(self, conn: Connection) -> str:
        conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return "snapshot-isolation"

    def begin_write(self, conn: Connection) -> None:
        # a concurrent write to a row the restore also writes fails the commit
        # instead of being silently overwritten without quarantine
        conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")

    def bound_idle_transaction(self, conn: Connection, idle: float) -> None:
        conn.exec_driver_sql(f"SET idle_in_transaction_session_timeout = {max(1, int(idle * 1000))}")

    # -- reading -----------------------------------------------------------------------

    def order_key(self, conn: Connection, column: sa.ColumnClause, type_text: str):
        if not is_text_type(type_text) and not _orders_as_text(conn, column):
            return column
        # citext compares case-folded whatever the collation ('a' < 'B'), an enum in its
        # declaration order, inet by address: their text does not
        text = column if is_text_type(type_text) and "CITEXT" not in type_text.upper() else sa.cast(column, sa.Text)
        if _server_encoding(conn) not in BYTES_IN_CODE_POINT_ORDER:
            # COLLATE "C" compares the server encoding's bytes: in WIN1252 '€' (0x80) sorts
            # before 'é' (0xE9); the same text as UTF-8 bytes sorts by code point
            return sa.func.convert_to(text, sa.literal_column("'UTF8'"))
        return text.collate("C")

    def unknown_type_names(self, conn: Connection, table: str, schema: str | None) -> dict[str, str]:
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

    def estimated_bytes(self, conn: Connection, schema_doc: dict) -> int | None:
        name = conn.dialect.identifier_preparer.quote(schema_doc["table"])
        if schema_doc.get("db_schema"):
            name = conn.dialect.identifier_preparer.quote(schema_doc["db_schema"]) + "." + name
        return int(conn.exec_driver_sql("SELECT pg_table_size(%(t)s::regclass)", {"t": name}).scalar() or 0) or None

    def partition_roots(self, conn: Connection, schema: str | None) -> dict[str, str]:
        rows = conn.exec_driver_sql("""
            SELECT c.relname, r.relname FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_class r ON r.oid = pg_partition_root(c.oid)
            WHERE c.relispartition AND n.nspname = COALESCE(%(s)s, current_schema())""", {"s": schema}).fetchall()
        return {a: b for a, b in rows}

    def copies_by_default(self) -> bool:
        return pgcopy.enabled()

    def copy_rows(self, conn: Connection, stmt: sa.Select, names: list[str], key_index: list[int],
                  batch: int, binary: bool | None) -> Iterator[list[tuple]] | None:
        copy_plan = pgcopy.plan(conn, stmt, binary=binary)
        if copy_plan is None:
            return None
        return pgcopy.read_rows(conn, copy_plan, names, key_index, batch)

    def read_lines(self, conn: Connection, schema_doc: dict, *, where=None, fast: bool | None = None,
                   batch: int | None = None, blocks: bool = False) -> tuple[dict, Iterator[list[bytes]]]:
        """Through COPY when the driver is psycopg (unless ``fast`` is False or
        ``SNAPSHOTTER_PG_COPY=0``), run by a ``psql`` child for a whole table in a snapshot
        transaction (:mod:`.pgbulk`), else through a cursor; the lines are the same either
        way.  ``blocks``: batches may also come as one ``bytes`` of whole lines."""
        from .pgtext import encoding_doc

        batch = batch or pgcopy.LINE_BATCH
        stmt = select_stmt(conn, schema_doc, where)
        names = [c["name"] for c in schema_doc["columns"]]
        oids = pgcopy.column_oids(conn, stmt)
        doc = encoding_doc(names, oids, schema_doc["primary_key"])
        use_copy = (fast if fast is not None else pgcopy.enabled()) and pgcopy._psycopg_connection(conn) is not None
        if fast and not use_copy:
            raise SourceError(f"table {schema_doc['table']} cannot be read through COPY (the driver is not psycopg)")
        # a whole table in a snapshot's transaction: the COPY in a psql child (pgbulk.py)
        psql = pgbulk.plan(conn, schema_doc) if use_copy and where is None else None

        def lines() -> Iterator[list[bytes]]:
            with pgcopy.pgtext_settings(conn):
                if psql is not None:
                    try:
                        yield from pgbulk.psql_lines(conn, stmt, psql, blocks=blocks)
                        return
                    except pgbulk.PsqlFailed as exc:  # nothing read yet
                        if pgbulk.mode().mode == "always":
                            raise SourceError(f"{pgbulk.ENV_SWITCH}=always: psql failed: {exc}") from None
                        log.debug("snapshotter: table %s: psql failed (%s); reading through libpq",
                                  schema_doc["table"], exc)
                if use_copy:
                    yield from pgcopy.copy_lines(conn, stmt, batch)
                else:
                    yield from pgcopy.cursor_lines(conn, stmt, batch)
        return doc, lines()

    # -- writing -----------------------------------------------------------------------

    def sent_keys(self, schema_doc: dict, keys: list) -> list:
        # a float key goes as its shortest text, which the column's own type reads: a real key
        # 0.2 compared as a float8 bind (0.2000000000000000111) matched nothing
        return [_float_key(k) for k in keys]

    def key_binds(self, schema_doc: dict, key: Any) -> list:
        return [array_literal(v) for v in super().key_binds(schema_doc, key)]

    def adapt_for_write(self, schema_doc: dict, values: dict) -> dict:
        """JSON and JSONB values wrapped for psycopg, which sends a dict or list as neither."""
        out = dict(values)
        for c in schema_doc["columns"]:
            t = c["type"].upper()
            v = out.get(c["name"])
            if t in ("JSON", "JSONB") and v is not None:
                from psycopg.types.json import Json, Jsonb
                out[c["name"]] = (Jsonb if t == "JSONB" else Json)(v)
        return out

    def upsert_lines(self, conn: Connection, schema_doc: dict, encoding: dict, lines: list[bytes],
                     guard: Guard | None = None) -> bool:
        """Rows replaced by ``pgtext`` lines, exactly (the server's own input functions read the
        text its output functions wrote).  The lines are copied into a temporary table; rows
        whose keys are live are updated in place (a delete and insert would fire ``ON DELETE``
        actions on the rows that reference them), the others inserted.  False when the driver
        is not psycopg or the lines are not of this table."""
        pg = pgcopy._psycopg_connection(conn)
        if pg is None:
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
        with pgcopy.pgtext_settings(conn):
            conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DROP AS "
                                 f"SELECT {cols} FROM {target} WITH NO DATA")
            conn.exec_driver_sql(f"TRUNCATE {stage}")
            import psycopg
            statement = f"COPY {stage} ({cols}) FROM STDIN"
            try:
                with pg.cursor() as cur, cur.copy(statement) as copy:
                    # stored lines are UTF-8; the server reads COPY data in the client encoding
                    copy.write(b"".join(pgcopy.from_utf8(lines, pg.info.encoding, target)))
            except psycopg.Error as exc:
                # psycopg's own COPY is outside SQLAlchemy: its errors become SQLAlchemy's, which
                # the writer turns into one line naming the source and table (a value the live
                # type no longer accepts, a conflict, a connection lost)
                raise sa.exc.DBAPIError(statement, None, exc) from exc
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

    def exact_text(self, col):
        return sa.cast(col, sa.Text).collate("C")

    # -- a table's definition ----------------------------------------------------------

    def capture_definition(self, conn: Connection, table: str, schema: str | None) -> dict | None:
        return pgddl.capture(conn, table, schema)

    def checked_type(self, conn: Connection, text: str) -> str | None:
        return pgddl.canonical_type(conn, text)

    def create_from_definition(self, conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str],
                               trusted: bool, where: str) -> None:
        pgddl.create(conn, schema_doc, ddl, types, trusted, where)

    def finish_definition(self, conn: Connection, schema_doc: dict, ddl: dict, trusted: bool,
                          where: str) -> None:
        pgddl.finish(conn, schema_doc, ddl, trusted, where)

    omissions = staticmethod(pgddl.omissions)
    definition_items = staticmethod(pgddl.items)

    # -- a restore's writes (the rules: integrity.py's module docs) -----------------------

    def foreign_keys(self, conn: Connection, schema: str | None) -> list[ForeignKey]:
        """Every foreign key of the database, whatever schema its tables are in (a table of another
        schema referencing a restored one is as much a dependant), its tables named with their schema."""
        rows = conn.exec_driver_sql("""
            SELECT c.conname, cn.nspname, cl.relname, pn.nspname, pl.relname,
                   ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i),
                   ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
                         JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i),
                   c.confupdtype::text, c.confdeltype::text
            FROM pg_constraint c
            JOIN pg_class cl ON cl.oid = c.conrelid JOIN pg_namespace cn ON cn.oid = cl.relnamespace
            JOIN pg_class pl ON pl.oid = c.confrelid JOIN pg_namespace pn ON pn.oid = pl.relnamespace
            WHERE c.contype = 'f' AND c.conparentid = 0 AND cl.relkind IN ('r', 'p') AND pl.relkind IN ('r', 'p')
            ORDER BY 2, 3, 1""").fetchall()
        actions = pgddl.FK_ACTIONS
        return [ForeignKey(r[0], (r[1], r[2]), tuple(r[5]), (r[3], r[4]), tuple(r[6]),
                           actions.get(r[7], "NO ACTION"), actions.get(r[8], "NO ACTION")) for r in rows]

    def current_schema(self, conn: Connection) -> str | None:
        return str(conn.exec_driver_sql("SELECT current_schema()").scalar())

    def will_enforce(self, guard: Guard) -> bool:
        return not self._replica(guard)

    def _replica(self, guard: Guard) -> bool:
        """Whether the role may set replica mode (asked once per transaction)."""
        if guard.replica is None:
            guard.replica = _try_replica(guard.conn, keep=False)
        return guard.replica

    def firing(self, guard: Guard, where: str, names: list) -> str | None:
        replica = self._replica(guard)
        stuck = [f"{kind} {name} on {rel}" for rel, kind, name, _, owner in _firing(guard, names) if not owner]
        if stuck and replica:
            return (f"{where}: the restore would write tables whose {', '.join(stuck)} fire even in replica mode "
                    f"(ENABLE ALWAYS or ENABLE REPLICA) and would change what the restore did not plan; the "
                    f"connecting role cannot switch them off (it does not own the table). Nothing was written: "
                    f"restore as a superuser or the tables' owner")
        if stuck:
            return (f"{where}: the restore would write tables whose {', '.join(stuck)} would fire and change what the "
                    f"restore did not plan, and the connecting role can neither set session_replication_role nor "
                    f"switch them off (it does not own the table). Nothing was written: restore as a superuser or the "
                    f"tables' owner, or GRANT SET ON PARAMETER session_replication_role TO the role (PostgreSQL 15+)")
        return None

    def check_readable(self, guard: Guard, where: str) -> None:
        """The proof reads every table with a foreign key into or out of a written table, and the
        transaction's own counters: a role that cannot is refused up front."""
        from snapshotter.errors import UsageError
        conn = guard.conn
        others = sorted({n for fk in guard._foreign_keys() if fk.child in guard.planned or fk.parent in guard.planned
                         for n in (fk.child, fk.parent)} - set(guard.planned), key=str)
        unreadable = [n for n in others if not conn.exec_driver_sql(
            "SELECT has_table_privilege(%(t)s::regclass, 'SELECT')", {"t": quoted_name(conn, n)}).scalar()]
        if unreadable:
            names = ", ".join(shown(n, guard.home) for n in unreadable)
            raise UsageError(f"{where}: the connecting role cannot read table(s) {names}, which share a foreign key "
                             f"with a table the restore writes: it could not prove the key still holds. Nothing was "
                             f"written: GRANT SELECT ON {names} TO the role, or restore as their owner")
        conn.exec_driver_sql("SAVEPOINT snapshotter_stats")
        try:
            conn.exec_driver_sql("SELECT 1 FROM pg_stat_xact_user_tables LIMIT 1").fetchall()
        except sa.exc.DBAPIError:
            conn.exec_driver_sql("ROLLBACK TO SAVEPOINT snapshotter_stats")
            guard.can_count = False
            log.warning("snapshotter: warning: %s: the connecting role cannot read pg_stat_xact_user_tables: the "
                        "restore cannot count what the database changed besides its own writes", where)
        else:
            conn.exec_driver_sql("RELEASE SAVEPOINT snapshotter_stats")

    def start_writes(self, guard: Guard) -> bool:
        guard.replica = _try_replica(guard.conn, keep=True)
        return not guard.replica

    def switch_off(self, guard: Guard, name: tuple) -> None:
        _oid(guard, name)
        q = guard.conn.dialect.identifier_preparer.quote
        for rel, kind, tname, how, _owner in _firing(guard, [name]):
            verb = "TRIGGER" if kind == "trigger" else "RULE"
            guard.conn.exec_driver_sql(f"ALTER TABLE {rel} DISABLE {verb} {q(tname)}")
            guard.switched_off.append(f"ALTER TABLE {rel} {how} {verb} {q(tname)}")

    def side_effects(self, guard: Guard) -> list[str]:
        if not guard.can_count:
            return []
        conn = guard.conn
        if str(conn.exec_driver_sql("SHOW track_counts").scalar()).lower() != "on":
            log.warning("snapshotter: warning: track_counts is off: the restore cannot count what the database "
                        "changed besides its own writes")
            return []
        # a row written through a partitioned table is counted on its partition: each counted
        # relation is charged to itself or its nearest ancestor the restore wrote
        rows = conn.exec_driver_sql("""
            SELECT s.relid, ARRAY(SELECT a.relid::oid FROM pg_partition_ancestors(s.relid) a),
                   n_tup_ins, n_tup_upd, n_tup_del
            FROM pg_stat_xact_user_tables s JOIN pg_class c ON c.oid = s.relid
            WHERE c.relpersistence <> 't' AND n_tup_ins + n_tup_upd + n_tup_del > 0""").fetchall()
        by_oid = {oid: name for name, oid in guard.oids.items()}
        seen: dict[int, list[int]] = {}
        for relid, ancestors, ins, upd, dele in rows:
            owner = next((int(a) for a in (ancestors or [relid]) if int(a) in by_oid), int(relid))
            c = seen.setdefault(owner, [0, 0, 0])
            c[0], c[1], c[2] = c[0] + int(ins), c[1] + int(upd), c[2] + int(dele)
        problems = []
        for oid in sorted(set(seen) | {guard.oids[n] for n in guard.counts if n in guard.oids}):
            name = by_oid.get(oid)
            got = tuple(seen.get(oid, (0, 0, 0)))
            want = tuple(guard.counts.get(name, (0, 0, 0))) if name else (0, 0, 0)
            if got != want:
                table = shown(name, guard.home) if name else conn.exec_driver_sql(
                    "SELECT %(o)s::regclass::text", {"o": oid}).scalar()
                problems.append(f"table {table}: the database inserted/updated/deleted {got[0]}/{got[1]}/{got[2]} "
                                f"row(s) where the restore wrote {want[0]}/{want[1]}/{want[2]} (a trigger, rule or "
                                f"foreign-key action changed rows the restore did not plan)")
        return problems


# -- key order ------------------------------------------------------------------------------

def _server_encoding(conn: Connection) -> str:
    cache = conn.info
    if "snapshotter.server_encoding" not in cache:
        cache["snapshotter.server_encoding"] = str(conn.exec_driver_sql("SHOW server_encoding").scalar()).upper()
    return cache["snapshotter.server_encoding"]


def _orders_as_text(conn: Connection, column: sa.ColumnClause) -> bool:
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
    return typname not in VALUE_ORDERED_TYPES


# -- keys as sent -----------------------------------------------------------------------------

def _float_key(key: Any) -> Any:
    if isinstance(key, float):
        if math.isfinite(key):
            return repr(key)
        return "NaN" if key != key else "Infinity" if key > 0 else "-Infinity"
    if isinstance(key, list) and any(isinstance(k, float) for k in key):  # a composite key
        return [_float_key(k) for k in key]
    return key


# -- triggers, rules and replica mode ---------------------------------------------------------

def _try_replica(conn: Connection, keep: bool) -> bool:
    conn.exec_driver_sql("SAVEPOINT snapshotter_role")
    try:
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    except sa.exc.DBAPIError:
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT snapshotter_role")
        return False
    if keep:
        conn.exec_driver_sql("RELEASE SAVEPOINT snapshotter_role")
    else:
        conn.exec_driver_sql("ROLLBACK TO SAVEPOINT snapshotter_role")
    return True


def _firing(guard: Guard, names: list) -> list[tuple]:
    """(relation, "trigger"|"rule", name, enable statement, role owns the relation) for each
    user trigger and rule of these tables, and of their partitions (rows written through a
    partitioned table fire the partition's triggers), that fires in the mode the writes
    will run in."""
    modes = ("A", "R") if guard.replica else ("O", "A")
    out = []
    for name in names:
        oid = _oid(guard, name)
        rows = guard.conn.exec_driver_sql("""
            WITH rels AS (SELECT relid FROM pg_partition_tree(%(o)s) UNION SELECT %(o)s::oid)
            SELECT c.oid::regclass::text, 'trigger', tgname, tgenabled::text, pg_has_role(c.relowner, 'USAGE')
            FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
            WHERE g.tgrelid IN (SELECT relid FROM rels) AND NOT g.tgisinternal
            UNION ALL
            SELECT c.oid::regclass::text, 'rule', rulename, ev_enabled::text, pg_has_role(c.relowner, 'USAGE')
            FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
            WHERE r.ev_class IN (SELECT relid FROM rels) AND r.rulename <> '_RETURN'
            ORDER BY 1, 3""", {"o": oid}).fetchall()
        for rel, kind, tname, enabled, owner in rows:
            if enabled in modes:
                how = {"O": "ENABLE", "A": "ENABLE ALWAYS", "R": "ENABLE REPLICA"}[enabled]
                out.append((rel, kind, tname, how, bool(owner)))
    return out


def _oid(guard: Guard, name: tuple) -> int:
    if name not in guard.oids:
        guard.oids[name] = int(guard.conn.exec_driver_sql("SELECT %(t)s::regclass::oid",
                                                          {"t": quoted_name(guard.conn, name)}).scalar())
    return guard.oids[name]
