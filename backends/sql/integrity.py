"""A restore's writes into a real SQL schema: in foreign-key order, with user
triggers, rules and ``ON DELETE`` actions kept from firing, and the proof,
before commit, that the database changed only the rows the restore wrote and
that every foreign key still holds (docs/design.md, "Restore into real schemas").

How each database does it is its dialect's (:class:`~.dialect.Dialect`: ``will_enforce``,
``firing``, ``start_writes``, ``switch_off``, ``side_effects``, ...); in short:

* PostgreSQL (:mod:`.postgresql`): ``session_replication_role = replica`` for the write transaction,
  where the role may set it (a superuser, or ``GRANT SET ON PARAMETER``): user
  triggers and rules do not fire, nor do the triggers behind foreign keys, so
  neither checks nor cascades happen and the restore proves the keys itself.
  Where the role may not, keys are enforced as usual (the writes are ordered so
  that they hold) and a table with a trigger or rule that would fire is
  switched off by ``ALTER TABLE ... DISABLE`` if the role owns it (transactional),
  else refused before any write.  Proof: ``pg_stat_xact_user_tables`` counts,
  per table, equal the rows the restore's own statements wrote.
* MariaDB/MySQL (:mod:`.mysql`): ``foreign_key_checks = 0`` for the transaction (no checks, no
  cascades); a trigger cannot be switched off inside a transaction, so a write
  to a table that has one is refused before any write.
* SQLite (:mod:`.sqlite`): the restore's connection does not enforce foreign keys; a written
  table's triggers are dropped inside the write transaction and created again
  before it commits.  Proof: ``total_changes()`` equals the rows written.

Wherever enforcement was off, every foreign key into or out of a written table
is counted for violations before the first write and before commit; a key with
more violations after than before fails the restore (exit 3, rolled back).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from snapshotter import codec
from snapshotter.errors import UsageError

from .. import lazy_module
from .dialect import Dialect, of

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

sa = lazy_module("sqlalchemy")

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

    def describe(self, home: str | None = None) -> str:
        return (f"{shown(self.child, home)}({', '.join(self.child_columns)}) -> "
                f"{shown(self.parent, home)}({', '.join(self.parent_columns)})")


def shown(name: Name, home: str | None = None) -> str:
    """A table's name for a message: without its schema when that is the default one."""
    return name[1] if not name[0] or name[0] == home else f"{name[0]}.{name[1]}"


def table_name(schema_doc: dict) -> Name:
    return (schema_doc.get("db_schema"), schema_doc["table"])


def quoted_name(conn: Connection, name: Name) -> str:
    q = conn.dialect.identifier_preparer.quote
    return q(name[1]) if not name[0] else f"{q(name[0])}.{q(name[1])}"


def foreign_keys(conn: Connection, schema: str | None) -> list[ForeignKey]:
    """Every foreign key of the tables of ``schema`` (the database's default when None); on
    PostgreSQL, of every schema."""
    return of(conn).foreign_keys(conn, schema)


def reflected_foreign_keys(conn: Connection, schema: str | None) -> list[ForeignKey]:
    """:func:`foreign_keys` as SQLAlchemy's inspector reflects them."""
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


def _values_in(table, columns: Sequence[str], values: list[tuple]):
    """``(columns) IN (values)``; one column's values go untyped, read by the column's own type."""
    if len(columns) == 1:
        return table.c[columns[0]].in_(
            sa.bindparam(None, [v[0] for v in values], expanding=True, type_=sa.types.NullType()))
    return sa.tuple_(*[table.c[c] for c in columns]).in_(values)


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
    #: the connection's dialect (given as its name, or not at all, the connection's own)
    dialect: Dialect | str | None = None
    #: tables the restore will write, with the whole selection (tables restored, written or not)
    planned: dict = field(default_factory=dict)
    selected: set = field(default_factory=set)
    started: bool = False
    #: whether the database enforces foreign keys (and runs their actions) during the writes
    enforcing: bool = True
    #: PostgreSQL: whether the writes run in replica mode (None: not asked yet)
    replica: bool | None = None
    counts: dict = field(default_factory=dict)  # Name -> [inserted, updated, deleted]
    oids: dict = field(default_factory=dict)  # PostgreSQL: Name -> oid
    switched_off: list = field(default_factory=list)  # statements that switch back on what the writes switched off
    #: (foreign key, packed child key) of rows the restore writes back that broke the key before it
    orphans_before: set = field(default_factory=set)
    #: SQLite: total_changes() when the writes started
    changes_before: int = 0
    fks: list | None = None
    prepared: set = field(default_factory=set)
    result: list | None = None
    reported: bool = False
    checked: bool = False
    #: PostgreSQL: the schema unqualified names are in (tables are compared schema-qualified)
    home: str | None = None
    #: PostgreSQL: the role may read the transaction's counters
    can_count: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.dialect, Dialect):
            self.dialect = of(self.conn)

    # -- before the quarantine is committed -------------------------------------

    def name(self, schema_doc_or_name) -> Name:
        """A table's name as the guard compares it (PostgreSQL: always with its schema)."""
        name = table_name(schema_doc_or_name) if isinstance(schema_doc_or_name, dict) else schema_doc_or_name
        if self.dialect.qualifies_names and name[0] is None:
            if self.home is None:
                self.home = self.dialect.current_schema(self.conn)
            return (self.home, name[1])
        return name

    def preflight(self, tables: list[PlannedTable], where: str) -> None:
        """One source's plan, before anything is written: refuse (exit 2) a trigger or rule that
        would fire and cannot be switched off.  The selection's closure is checked once every
        source sharing this transaction has been seen (:meth:`check_selection`)."""
        for t in tables:
            name = self.name(t.schema_doc)
            self.selected.add(name)
            if t.writes:
                self.planned[name] = t
        mine = {self.name(t.schema_doc) for t in tables if t.writes}
        if not mine:
            return
        firing = self._firing(where, mine)
        if firing:
            raise UsageError(firing)

    def check_selection(self, where: str) -> None:
        """After every source of the transaction: refuse (exit 2) writes that reach rows outside
        the selection through a foreign key, in either direction, and keys it could not prove."""
        if self.checked or not self.planned:
            return
        self.checked = True
        self.dialect.check_readable(self, where)
        self._check_closure(where)
        self._check_parents(where)

    def refusal(self, tables: list[PlannedTable], where: str) -> str | None:
        """What :meth:`preflight` would refuse for triggers and rules, without refusing: a dry run's
        note (its records are not kept, so the selection's closure is left to the restore)."""
        self.planned = {self.name(t.schema_doc): t for t in tables if t.writes}
        if not self.planned:
            return None
        return self._firing(where, set(self.planned))

    def will_enforce(self) -> bool:
        """Whether the database will enforce foreign keys (and run their actions) during the writes."""
        if self.started:
            return self.enforcing
        return self.dialect.will_enforce(self)

    def _firing(self, where: str, names: set) -> str | None:
        """Triggers and rules that would fire on these written tables and cannot be switched off."""
        live = [n for n in sorted(names, key=str) if not self.planned[n].recreate]
        return self.dialect.firing(self, where, live) if live else None

    def _foreign_keys(self) -> list[ForeignKey]:
        if self.fks is None:
            schemas = {n[0] for n in self.selected} or {None}
            fks = foreign_keys(self.conn, next(iter(schemas))) if len(schemas) == 1 \
                or self.dialect.foreign_keys_span_schemas \
                else [fk for sch in sorted(schemas, key=str) for fk in foreign_keys(self.conn, sch)]
            self.fks = [ForeignKey(fk.name, self.name(fk.child), fk.child_columns, self.name(fk.parent),
                                   fk.parent_columns, fk.on_update, fk.on_delete) for fk in fks]
        return self.fks

    def _check_parents(self, where: str) -> None:
        """Rows the restore writes back whose parent row is in a table outside the selection must
        find it there (else the restore would leave them without it)."""
        missing: dict[Name, str] = {}
        for fk in self._foreign_keys():
            t = self.planned.get(fk.child)
            if t is None or fk.parent in self.selected or not (t.modified or t.deleted or t.recreate):
                continue
            wanted = set()
            for _, op, _live, snap in t.records():
                if op != "added" and isinstance(snap, dict):
                    v = tuple(snap.get(c) for c in fk.child_columns)
                    if all(x is not None for x in v):
                        wanted.add(v)
            if wanted and self._absent_parents(fk, sorted(wanted, key=codec.pack)):
                missing[fk.parent] = fk.describe(self.home)
        if missing:
            names = ", ".join(shown(n, self.home) for n in missing)
            raise UsageError(f"{where}: the restore would write back rows whose parent rows in {names}, outside the "
                             f"selection, are gone ({'; '.join(missing.values())}). Nothing was written: add them to "
                             f"the restore (--stream {' --stream '.join(n[1] for n in missing)})")

    def _absent_parents(self, fk: ForeignKey, values: list[tuple]) -> bool:
        parent = sa.table(fk.parent[1], *[sa.column(c) for c in fk.parent_columns], schema=fk.parent[0])
        for i in range(0, len(values), 500):
            part = values[i:i + 500]
            cond = _values_in(parent, fk.parent_columns, part)
            found = self.conn.execute(sa.select(sa.func.count()).select_from(
                sa.select(*[parent.c[c] for c in fk.parent_columns]).where(cond).distinct().subquery())).scalar()
            if int(found or 0) < len(part):
                return True
        return False

    def _check_closure(self, where: str) -> None:
        """A row the restore deletes (or whose referenced columns it changes) that a table outside
        the restore references: the write would cascade into that table or break its key."""
        blocked: dict[Name, str] = {}
        enforcing = self.will_enforce()
        for fk in self._foreign_keys():
            t = self.planned.get(fk.parent)
            if t is None or t.recreate or not (t.added or t.modified):
                continue
            fires = enforcing and fk.on_update not in ("NO ACTION", "RESTRICT")
            if fk.child in self.selected and not fires:
                continue
            gone, changed = self._removed_values(fk, t)
            if fires and changed and self._referenced(fk, sorted(changed, key=codec.pack)):
                raise UsageError(f"{where}: the restore would change referenced values of {shown(fk.parent, self.home)} and "
                                 f"foreign key {fk.describe(self.home)} ON UPDATE {fk.on_update} would change rows of "
                                 f"{shown(fk.child, self.home)} the restore did not plan; the connecting role cannot keep "
                                 f"foreign-key actions from firing. Nothing was written: restore as a superuser, or "
                                 f"GRANT SET ON PARAMETER session_replication_role TO the role (PostgreSQL 15+)")
            if fk.child in self.selected:
                continue
            gone |= changed
            if gone and self._referenced(fk, sorted(gone, key=codec.pack)):
                blocked[fk.child] = fk.describe(self.home)
        if blocked:
            names = ", ".join(shown(n, self.home) for n in blocked)
            raise UsageError(f"{where}: the restore would delete or change rows that table(s) {names} outside the "
                             f"selection reference ({'; '.join(blocked.values())}): its writes would cascade into "
                             f"them or break their foreign keys. Nothing was written: add them to the restore "
                             f"(--stream {' --stream '.join(n[1] for n in blocked)}), or restore the whole source")

    @staticmethod
    def _removed_values(fk: ForeignKey, t: PlannedTable) -> tuple[set, set]:
        """The parent table's referenced values the plan removes: of ``added`` rows (deleted), and
        the old values of ``modified`` rows whose referenced columns change."""
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
        return gone, changed

    def _referenced(self, fk: ForeignKey, values: list[tuple], orphaned: bool = False) -> bool:
        """Whether a row of the child table references one of these parent values (``orphaned``:
        and has no parent row)."""
        child = sa.table(fk.child[1], *[sa.column(c) for c in fk.child_columns], schema=fk.child[0]).alias("c")
        parent = sa.table(fk.parent[1], *[sa.column(c) for c in fk.parent_columns], schema=fk.parent[0]).alias("p")
        for i in range(0, len(values), 500):
            part = values[i:i + 500]
            conds = [_values_in(child, fk.child_columns, part)]
            if orphaned:
                conds.append(~sa.exists().where(*[parent.c[pc] == child.c[cc]
                                                  for cc, pc in zip(fk.child_columns, fk.parent_columns)]))
            if self.conn.execute(sa.select(sa.literal(1)).select_from(child).where(*conds).limit(1)).first():
                return True
        return False

    # -- while writing -----------------------------------------------------------

    def before_write(self, schema_doc: dict) -> None:
        """Called before each write statement to a table."""
        if not self.started:
            self._start()
        name = self.name(schema_doc)
        if name in self.prepared:
            return
        self.prepared.add(name)
        self.counts.setdefault(name, [0, 0, 0])
        self.dialect.switch_off(self, name)

    def _start(self) -> None:
        self.started = True
        self.enforcing = self.dialect.start_writes(self)
        if not self.enforcing:
            # rows the restore will write back that already lack their parent (databases whose
            # applications never enforced the key): not the restore's doing, so not held against it
            for fk, t in self._child_fks():
                for key in self._orphans(fk, t, ("modified",)):
                    self.orphans_before.add((fk, key))

    def wrote(self, schema_doc: dict, inserted: int = 0, updated: int = 0, deleted: int = 0) -> None:
        c = self.counts.setdefault(self.name(schema_doc), [0, 0, 0])
        c[0] += max(inserted, 0)
        c[1] += max(updated, 0)
        c[2] += max(deleted, 0)

    # -- before commit -------------------------------------------------------------

    def finish(self) -> list[str]:
        """Switch back on what the writes switched off, and the problems found: changes the
        restore's statements did not make, foreign keys that no longer hold.  Empty: commit.
        Reported once per transaction (every writer sharing it asks)."""
        if self.result is None:
            self.result = self._finish()
        if self.reported:
            return []
        self.reported = True
        return self.result

    def _finish(self) -> list[str]:
        problems: list[str] = []
        if not self.started:
            return problems
        # in the order they were made: SQLite fires the triggers of one event in reverse creation order
        for statement in self.switched_off:
            self.conn.exec_driver_sql(statement)
        self.switched_off = []
        problems += self.dialect.side_effects(self)
        if not self.enforcing:
            problems += self._broken_keys()
        return problems

    def end(self) -> None:
        """After commit or rollback: session settings back as they were."""
        if self.started:
            self.dialect.end_writes(self)

    # -- the foreign-key proof, over what the restore wrote (not whole tables) ------------

    def _child_fks(self) -> list[tuple[ForeignKey, PlannedTable]]:
        """Keys whose child table the restore writes rows back into."""
        return [(fk, self.planned[fk.child]) for fk in self._foreign_keys()
                if fk.child in self.planned and (self.planned[fk.child].modified or self.planned[fk.child].deleted
                                                 or self.planned[fk.child].recreate)]

    def _orphans(self, fk: ForeignKey, t: PlannedTable, ops: tuple) -> Iterable:
        """Packed keys of the child rows of these ops that have no parent row now."""
        from .base import key_condition, lightweight_table
        # aliased: a self-referencing key has one table on both sides
        child = lightweight_table(t.schema_doc).alias("c")
        parent = sa.table(fk.parent[1], *[sa.column(c) for c in fk.parent_columns], schema=fk.parent[0]).alias("p")
        pk = t.schema_doc["primary_key"]
        has_parent = sa.exists().where(*[parent.c[pc] == child.c[cc]
                                         for cc, pc in zip(fk.child_columns, fk.parent_columns)])
        batch: list = []

        def check(keys: list) -> Iterable:
            stmt = sa.select(*[child.c[k] for k in pk]).where(
                key_condition(child, t.schema_doc, keys, self.dialect),
                *[child.c[c].isnot(None) for c in fk.child_columns], ~has_parent)
            for row in self.conn.execute(stmt):
                yield codec.pack(row[0] if len(pk) == 1 else list(row))

        for key, op, _live, _snap in t.records():
            if op in ops:
                batch.append(key)
                if len(batch) >= 500:
                    yield from check(batch)
                    batch = []
        if batch:
            yield from check(batch)

    def _broken_keys(self) -> list[str]:
        """Every key into or out of a written table, checked where the writes could break it: the
        rows written back must have their parent (unless they lacked it before), and no row may
        still reference a parent row the restore removed or whose referenced values it changed."""
        problems = []
        for fk, t in self._child_fks():
            new = [k for k in self._orphans(fk, t, ("modified", "deleted")) if (fk, k) not in self.orphans_before]
            if new:
                problems.append(self._broken(fk, f"{len(new)} row(s) of {shown(fk.child, self.home)} the restore wrote back "
                                                  f"without their {shown(fk.parent, self.home)} row"))
        for fk in self._foreign_keys():
            t = self.planned.get(fk.parent)
            if t is None or not (t.added or t.modified):
                continue
            gone, changed = self._removed_values(fk, t)
            gone |= changed
            if gone and self._referenced(fk, sorted(gone, key=codec.pack), orphaned=True):
                problems.append(self._broken(fk, f"rows of {shown(fk.child, self.home)} still reference {shown(fk.parent, self.home)} "
                                                 f"rows the restore removed or changed"))
        return problems

    def _broken(self, fk: ForeignKey, what: str) -> str:
        outside = [n for n in (fk.parent, fk.child) if n not in self.selected]
        hint = f": add {', '.join(f'--stream {n[1]}' for n in outside)}" if outside else ""
        return f"foreign key {fk.describe(self.home)} would be broken by the restore ({what}){hint}"
