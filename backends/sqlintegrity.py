"""A restore's writes into a real SQL schema: in foreign-key order, with user
triggers, rules and ``ON DELETE`` actions kept from firing, and the proof,
before commit, that the database changed only the rows the restore wrote and
that every foreign key still holds (docs/design.md, "Restore into real schemas").

Per dialect:

* PostgreSQL: ``session_replication_role = replica`` for the write transaction,
  where the role may set it (a superuser, or ``GRANT SET ON PARAMETER``): user
  triggers and rules do not fire, nor do the triggers behind foreign keys, so
  neither checks nor cascades happen and the restore proves the keys itself.
  Where the role may not, keys are enforced as usual (the writes are ordered so
  that they hold) and a table with a trigger or rule that would fire is
  switched off by ``ALTER TABLE ... DISABLE`` if the role owns it (transactional),
  else refused before any write.  Proof: ``pg_stat_xact_user_tables`` counts,
  per table, equal the rows the restore's own statements wrote.
* MariaDB/MySQL: ``foreign_key_checks = 0`` for the transaction (no checks, no
  cascades); a trigger cannot be switched off inside a transaction, so a write
  to a table that has one is refused before any write.
* SQLite: the restore's connection does not enforce foreign keys; a written
  table's triggers are dropped inside the write transaction and created again
  before it commits.  Proof: ``total_changes()`` equals the rows written.

Wherever enforcement was off, every foreign key into or out of a written table
is counted for violations before the first write and before commit; a key with
more violations after than before fails the restore (exit 3, rolled back).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from snapshotter import codec
from snapshotter.errors import UsageError

from . import lazy_module

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

sa = lazy_module("sqlalchemy")
log = logging.getLogger(__name__)

Name = tuple  # (db schema or None, table)


@dataclass(frozen=True)
class ForeignKey:
    name: str | None
    child: Name
    child_columns: tuple[str, ...]
    parent: Name
    parent_columns: tuple[str, ...]
    on_update: str = "NO ACTION"
    on_delete: str = "NO ACTION"

    def describe(self) -> str:
        return (f"{_show(self.child)}({', '.join(self.child_columns)}) -> "
                f"{_show(self.parent)}({', '.join(self.parent_columns)})")


def _show(name: Name) -> str:
    return name[1] if not name[0] else f"{name[0]}.{name[1]}"


def table_name(schema_doc: dict) -> Name:
    return (schema_doc.get("db_schema"), schema_doc["table"])


def _quoted(conn: Connection, name: Name) -> str:
    q = conn.dialect.identifier_preparer.quote
    return q(name[1]) if not name[0] else f"{q(name[0])}.{q(name[1])}"


_PG_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


def _pg_foreign_keys(conn: Connection, schema: str | None) -> list[ForeignKey]:
    """Every foreign key of the database, whatever schema its tables are in (a table of another
    schema referencing a restored one is as much a dependant); tables of ``schema`` (the current
    schema when None) are named as the source names them."""
    home = schema or conn.exec_driver_sql("SELECT current_schema()").scalar()
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

    def named(nsp: str, rel: str) -> Name:
        return (None if nsp == home and schema is None else nsp, rel)
    return [ForeignKey(r[0], named(r[1], r[2]), tuple(r[5]), named(r[3], r[4]), tuple(r[6]),
                       _PG_ACTIONS.get(r[7], "NO ACTION"), _PG_ACTIONS.get(r[8], "NO ACTION")) for r in rows]


def foreign_keys(conn: Connection, schema: str | None) -> list[ForeignKey]:
    """Every foreign key of the tables of ``schema`` (the database's default when None); on
    PostgreSQL, of every schema."""
    if conn.dialect.name == "postgresql":
        return _pg_foreign_keys(conn, schema)
    insp = sa.inspect(conn)
    out = []
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=sa.exc.SAWarning)
        multi = insp.get_multi_foreign_keys(schema=schema)
    for (sch, table), fks in multi.items():
        for fk in fks:
            if not fk.get("constrained_columns") or not fk.get("referred_table"):
                continue
            parent_schema = fk.get("referred_schema")
            if parent_schema == sch:
                parent_schema = sch
            options = fk.get("options") or {}
            out.append(ForeignKey(fk.get("name"), (sch, table), tuple(fk["constrained_columns"]),
                                  (parent_schema if parent_schema is not None else sch, fk["referred_table"]),
                                  tuple(fk["referred_columns"]),
                                  str(options.get("onupdate") or "NO ACTION").upper(),
                                  str(options.get("ondelete") or "NO ACTION").upper()))
    return out


def write_order(names: Sequence[Name], fks: Iterable[ForeignKey]) -> list[int]:
    """Indexes of ``names`` with every parent before its children (a cycle keeps the given order)."""
    index = {n: i for i, n in enumerate(names)}
    parents: dict[int, set[int]] = {i: set() for i in range(len(names))}
    for fk in fks:
        c, p = index.get(fk.child), index.get(fk.parent)
        if c is not None and p is not None and c != p:
            parents[c].add(p)
    out: list[int] = []
    state: dict[int, int] = {}

    def visit(i: int) -> None:
        if state.get(i):
            return  # done, or on the current path (a cycle)
        state[i] = 1
        for p in sorted(parents[i]):
            visit(p)
        state[i] = 2
        out.append(i)

    for i in range(len(names)):
        visit(i)
    return out


@dataclass
class PlannedTable:
    """What a restore will write to one table (from the core's plan)."""

    schema_doc: dict
    added: int
    modified: int
    deleted: int
    recreate: bool
    records: Any  # callable -> iterator of (key, op, live value, snapshot value)

    @property
    def writes(self) -> bool:
        return bool(self.added or self.modified or self.deleted or self.recreate)


@dataclass
class Guard:
    """One write transaction's protections and bookkeeping (shared by every writer in it)."""

    conn: Connection
    dialect: str
    #: tables the restore will write, with the whole selection (tables restored, written or not)
    planned: dict = field(default_factory=dict)
    selected: set = field(default_factory=set)
    started: bool = False
    #: whether the database enforces foreign keys (and runs their actions) during the writes
    enforcing: bool = True
    replica: bool | None = None
    counts: dict = field(default_factory=dict)  # Name -> [inserted, updated, deleted]
    oids: dict = field(default_factory=dict)  # PostgreSQL: Name -> oid
    switched_off: list = field(default_factory=list)  # statements that switch back on what the writes switched off
    baseline: dict = field(default_factory=dict)  # ForeignKey -> violations before the writes
    changes_before: int = 0
    fks: list | None = None
    prepared: set = field(default_factory=set)
    result: list | None = None

    # -- before the quarantine is committed -------------------------------------

    def preflight(self, tables: list[PlannedTable], schema: str | None, where: str) -> None:
        """Refuse, before anything is written, a restore this database cannot do exactly."""
        for t in tables:
            name = table_name(t.schema_doc)
            self.selected.add(name)
            if t.writes:
                self.planned[name] = t
        if not self.planned:
            return
        if self.dialect == "postgresql" and self.replica is None:
            self.replica = self._try_replica(keep=False)
        firing = self._firing(where)
        if firing:
            raise UsageError(firing)
        self._check_closure(schema, where)

    def refusal(self, tables: list[PlannedTable], where: str) -> str | None:
        """What :meth:`preflight` would refuse for triggers and rules, without refusing: a dry run's
        note (its records are not kept, so the selection's closure is left to the restore)."""
        self.planned = {table_name(t.schema_doc): t for t in tables if t.writes}
        if not self.planned:
            return None
        if self.dialect == "postgresql" and self.replica is None:
            self.replica = self._try_replica(keep=False)
        return self._firing(where)

    def will_enforce(self) -> bool:
        """Whether the database will enforce foreign keys (and run their actions) during the writes."""
        if self.started:
            return self.enforcing
        if self.dialect == "postgresql":
            if self.replica is None:
                self.replica = self._try_replica(keep=False)
            return not self.replica
        if self.dialect == "sqlite":
            return bool(self.conn.exec_driver_sql("PRAGMA foreign_keys").scalar())
        return self.dialect not in ("mysql", "mariadb")

    def _try_replica(self, keep: bool) -> bool:
        c = self.conn
        c.exec_driver_sql("SAVEPOINT snapshotter_role")
        try:
            c.exec_driver_sql("SET LOCAL session_replication_role = replica")
        except sa.exc.DBAPIError:
            c.exec_driver_sql("ROLLBACK TO SAVEPOINT snapshotter_role")
            return False
        if keep:
            c.exec_driver_sql("RELEASE SAVEPOINT snapshotter_role")
        else:
            c.exec_driver_sql("ROLLBACK TO SAVEPOINT snapshotter_role")
        return True

    def _firing(self, where: str) -> str | None:
        """Triggers and rules that would fire on the written tables and cannot be switched off."""
        live = [n for n, t in self.planned.items() if not t.recreate]
        if not live:
            return None
        if self.dialect in ("mysql", "mariadb"):
            rows = self.conn.execute(sa.text(
                "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS "
                "WHERE EVENT_OBJECT_SCHEMA = COALESCE(:s, DATABASE()) AND EVENT_OBJECT_TABLE IN :t"
            ).bindparams(sa.bindparam("t", expanding=True)), {"s": live[0][0], "t": [n[1] for n in live]}).fetchall()
            if rows:
                shown = ", ".join(f"{r[0]} on {r[1]}" for r in rows)
                return (f"{where}: the restore would write tables with triggers ({shown}); MariaDB/MySQL cannot keep a "
                        f"trigger from firing inside a transaction, and its writes would change what the restore "
                        f"did not plan. Nothing was written: drop the trigger(s) for the restore (SHOW CREATE TRIGGER "
                        f"gives their text) and create them again afterwards")
            return None
        if self.dialect != "postgresql":
            return None
        stuck = [f"{kind} {name} on {rel}" for rel, kind, name, _, owner in self._pg_firing(live) if not owner]
        if stuck and self.replica:
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

    def _pg_firing(self, names: list[Name]) -> list[tuple]:
        """(relation, "trigger"|"rule", name, enable statement, role owns the relation) for each
        user trigger and rule of these tables, and of their partitions (rows written through a
        partitioned table fire the partition's triggers), that fires in the mode the writes
        will run in."""
        modes = ("A", "R") if self.replica else ("O", "A")
        out = []
        for name in names:
            oid = self._oid(name)
            rows = self.conn.exec_driver_sql("""
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

    def _oid(self, name: Name) -> int:
        if name not in self.oids:
            self.oids[name] = int(self.conn.exec_driver_sql("SELECT %(t)s::regclass::oid",
                                                            {"t": _quoted(self.conn, name)}).scalar())
        return self.oids[name]

    def _foreign_keys(self, schema: str | None) -> list[ForeignKey]:
        if self.fks is None:
            self.fks = foreign_keys(self.conn, schema)
        return self.fks

    def _check_closure(self, schema: str | None, where: str) -> None:
        """A row the restore deletes (or whose referenced columns it changes) that a table outside
        the restore references: the write would cascade into that table or break its key."""
        blocked: dict[Name, str] = {}
        enforcing = self.will_enforce()
        for fk in self._foreign_keys(schema):
            t = self.planned.get(fk.parent)
            if t is None or t.recreate or not (t.added or t.modified):
                continue
            fires = enforcing and fk.on_update not in ("NO ACTION", "RESTRICT")
            if fk.child in self.selected and not fires:
                continue
            gone, changed = set(), set()
            for _, op, live, snap in t.records():
                if not isinstance(live, dict):
                    continue
                old = tuple(live.get(c) for c in fk.parent_columns)
                if any(v is None for v in old):
                    continue
                if op == "added":
                    gone.add(old)
                elif op == "modified" and isinstance(snap, dict) and old != tuple(snap.get(c) for c in fk.parent_columns):
                    changed.add(old)
            if fires and changed and self._referenced(fk, sorted(changed, key=codec.pack)):
                raise UsageError(f"{where}: the restore would change referenced values of {_show(fk.parent)} and "
                                 f"foreign key {fk.describe()} ON UPDATE {fk.on_update} would change rows of "
                                 f"{_show(fk.child)} the restore did not plan; the connecting role cannot keep "
                                 f"foreign-key actions from firing. Nothing was written: restore as a superuser, or "
                                 f"GRANT SET ON PARAMETER session_replication_role TO the role (PostgreSQL 15+)")
            if fk.child in self.selected:
                continue
            gone |= changed
            if gone and self._referenced(fk, sorted(gone, key=codec.pack)):
                blocked[fk.child] = fk.describe()
        if blocked:
            names = ", ".join(_show(n) for n in blocked)
            raise UsageError(f"{where}: the restore would delete or change rows that table(s) {names} outside the "
                             f"selection reference ({'; '.join(blocked.values())}): its writes would cascade into "
                             f"them or break their foreign keys. Nothing was written: add them to the restore "
                             f"(--stream {' --stream '.join(n[1] for n in blocked)}), or restore the whole source")

    def _referenced(self, fk: ForeignKey, values: list[tuple]) -> bool:
        child = sa.table(fk.child[1], *[sa.column(c) for c in fk.child_columns], schema=fk.child[0])
        for i in range(0, len(values), 500):
            part = values[i:i + 500]
            if len(fk.child_columns) == 1:
                cond = child.c[fk.child_columns[0]].in_(
                    sa.bindparam(None, [v[0] for v in part], expanding=True, type_=sa.types.NullType()))
            else:
                cond = sa.tuple_(*[child.c[c] for c in fk.child_columns]).in_(part)
            if self.conn.execute(sa.select(sa.literal(1)).select_from(child).where(cond).limit(1)).first():
                return True
        return False

    # -- while writing -----------------------------------------------------------

    def before_write(self, schema_doc: dict) -> None:
        """Called before each write statement to a table."""
        if not self.started:
            self._start()
        name = table_name(schema_doc)
        if name in self.prepared:
            return
        self.prepared.add(name)
        self.counts.setdefault(name, [0, 0, 0])
        if self.dialect == "postgresql":
            self._oid(name)
            q = self.conn.dialect.identifier_preparer.quote
            for rel, kind, tname, how, _owner in self._pg_firing([name]):
                verb = "TRIGGER" if kind == "trigger" else "RULE"
                self.conn.exec_driver_sql(f"ALTER TABLE {rel} DISABLE {verb} {q(tname)}")
                self.switched_off.append(f"ALTER TABLE {rel} {how} {verb} {q(tname)}")
        elif self.dialect == "sqlite":
            rows = self.conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? ORDER BY rowid",
                (name[1],)).fetchall()
            q = self.conn.dialect.identifier_preparer.quote
            for tname, sql in rows:
                self.conn.exec_driver_sql(f"DROP TRIGGER {q(tname)}")
                self.switched_off.append(sql)

    def _start(self) -> None:
        self.started = True
        if self.dialect == "postgresql":
            self.replica = self._try_replica(keep=True)
            self.enforcing = not self.replica
        elif self.dialect in ("mysql", "mariadb"):
            self.conn.exec_driver_sql("SET SESSION foreign_key_checks = 0")
            self.enforcing = False
        elif self.dialect == "sqlite":
            self.enforcing = bool(self.conn.exec_driver_sql("PRAGMA foreign_keys").scalar())
            self.changes_before = self._total_changes()
        if not self.enforcing:
            schema = next(iter(self.planned))[0] if self.planned else None
            for fk in self._relevant_fks(schema):
                self.baseline[fk] = self._violations(fk)

    def wrote(self, schema_doc: dict, inserted: int = 0, updated: int = 0, deleted: int = 0) -> None:
        c = self.counts.setdefault(table_name(schema_doc), [0, 0, 0])
        c[0] += max(inserted, 0)
        c[1] += max(updated, 0)
        c[2] += max(deleted, 0)

    # -- before commit -------------------------------------------------------------

    def finish(self) -> list[str]:
        """Switch back on what the writes switched off, and the problems found: changes the
        restore's statements did not make, foreign keys that no longer hold.  Empty: commit."""
        if self.result is not None:
            return self.result
        problems: list[str] = []
        if not self.started:
            self.result = problems
            return problems
        # in the order they were made: SQLite fires the triggers of one event in reverse creation order
        for statement in self.switched_off:
            self.conn.exec_driver_sql(statement)
        self.switched_off = []
        problems += self._side_effects()
        if not self.enforcing:
            for fk, before in self.baseline.items():
                after = self._violations(fk)
                if after > before:
                    outside = [n for n in (fk.parent, fk.child) if n not in self.selected]
                    hint = f": add {', '.join(f'--stream {n[1]}' for n in outside)}" if outside else ""
                    problems.append(f"foreign key {fk.describe()} would be broken by the restore "
                                    f"({after - before} row(s) of {_show(fk.child)} without their "
                                    f"{_show(fk.parent)} row){hint}")
        self.result = problems
        return problems

    def end(self) -> None:
        """After commit or rollback: session settings back as they were."""
        if self.started and self.dialect in ("mysql", "mariadb"):
            self.conn.exec_driver_sql("SET SESSION foreign_key_checks = 1")

    def _relevant_fks(self, schema: str | None) -> list[ForeignKey]:
        written = set(self.planned)
        return [fk for fk in self._foreign_keys(schema) if fk.child in written or fk.parent in written]

    def _violations(self, fk: ForeignKey) -> int:
        c, p = _quoted(self.conn, fk.child), _quoted(self.conn, fk.parent)
        q = self.conn.dialect.identifier_preparer.quote
        not_null = " AND ".join(f"c.{q(col)} IS NOT NULL" for col in fk.child_columns)
        match = " AND ".join(f"p.{q(pc)} = c.{q(cc)}" for cc, pc in zip(fk.child_columns, fk.parent_columns))
        return int(self.conn.exec_driver_sql(
            f"SELECT COUNT(*) FROM {c} c WHERE {not_null} AND NOT EXISTS (SELECT 1 FROM {p} p WHERE {match})").scalar())

    def _total_changes(self) -> int:
        return int(self.conn.connection.driver_connection.total_changes)

    def _side_effects(self) -> list[str]:
        if self.dialect == "sqlite":
            made = self._total_changes() - self.changes_before
            wrote = sum(sum(c) for c in self.counts.values())
            if made != wrote:
                return [f"the database changed {made} row(s) where the restore wrote {wrote}: a trigger or a "
                        f"foreign-key action wrote rows the restore did not plan"]
            return []
        if self.dialect != "postgresql":
            return []  # MariaDB: no triggers on written tables (refused), no cascades (checks off)
        if str(self.conn.exec_driver_sql("SHOW track_counts").scalar()).lower() != "on":
            log.warning("snapshotter: warning: track_counts is off: the restore cannot count what the database "
                        "changed besides its own writes")
            return []
        rows = self.conn.exec_driver_sql("""
            SELECT COALESCE(pg_partition_root(s.relid)::oid, s.relid), sum(n_tup_ins), sum(n_tup_upd), sum(n_tup_del)
            FROM pg_stat_xact_user_tables s JOIN pg_class c ON c.oid = s.relid
            WHERE c.relpersistence <> 't' AND n_tup_ins + n_tup_upd + n_tup_del > 0
            GROUP BY 1""").fetchall()
        by_oid = {oid: name for name, oid in self.oids.items()}
        seen = {int(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}
        problems = []
        for oid in sorted(set(seen) | {self.oids[n] for n in self.counts if n in self.oids}):
            name = by_oid.get(oid)
            got = seen.get(oid, (0, 0, 0))
            want = tuple(self.counts.get(name, (0, 0, 0))) if name else (0, 0, 0)
            if got != want:
                shown = _show(name) if name else self.conn.exec_driver_sql(
                    "SELECT %(o)s::regclass::text", {"o": oid}).scalar()
                problems.append(f"table {shown}: the database inserted/updated/deleted {got[0]}/{got[1]}/{got[2]} "
                                f"row(s) where the restore wrote {want[0]}/{want[1]}/{want[2]} (a trigger, rule or "
                                f"foreign-key action changed rows the restore did not plan)")
        return problems
