"""MariaDB/MySQL: its transactions and the driver's timeouts, key order by UTF-8 bytes
whatever the collation, BIT keys sent as numbers, locking reads while a restore plans, a
table's definition (``SHOW CREATE TABLE`` and ``information_schema``), and a restore's
writes with ``foreign_key_checks = 0`` for the transaction (no checks, no cascades): a
trigger cannot be switched off inside a transaction, so a write to a table that has one
that would fire is refused before any write.  Every DDL statement commits the open
transaction, so a recreated table's foreign keys and triggers come back only when the
repository is trusted (``SHOW CREATE TABLE`` replayed whole, triggers left out).
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Iterator

from .. import lazy_module
from .ddl import create_structured, integer, qualified, quoted
from .dialect import Dialect, is_text_type

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .integrity import Guard

sa = lazy_module("sqlalchemy")

#: key types (leading word of the type's text) whose values the database orders as Python
#: orders the values the driver returns; other non-text key types (ENUM and SET: their
#: declaration order) are ordered by their text, as text keys are
VALUE_ORDERED_TYPES = frozenset({
    "SMALLINT", "INTEGER", "INT", "BIGINT", "TINYINT", "MEDIUMINT", "NUMERIC", "DECIMAL", "REAL",
    "DOUBLE", "FLOAT", "DATE", "DATETIME", "TIMESTAMP", "TIME", "YEAR", "UUID", "BOOLEAN", "BOOL",
    "BLOB", "TINYBLOB", "MEDIUMBLOB", "LONGBLOB", "BINARY", "VARBINARY", "BIT",
})


class MySQL(Dialect):
    ddl_kind = "mysql"
    ddl_commits = True
    #: tables are captured as ``mytext`` lines (:mod:`.mytext`, read by :mod:`.myread`)
    reads_lines = True
    line_format = "mytext"

    def connect_args(self, url, timeout: float) -> dict[str, Any]:
        # bounds on each socket connect, read and write
        driver = url.get_driver_name()
        if driver == "pymysql":
            return {"connect_timeout": timeout, "read_timeout": timeout, "write_timeout": timeout}
        if driver == "mysqldb":
            whole = max(1, math.ceil(timeout))
            return {"connect_timeout": whole, "read_timeout": whole, "write_timeout": whole}
        return {}

    def watch(self, engine, what: str, timeout: float) -> None:
        from . import myread
        myread.WATCHED[engine] = (what, timeout)  # the client's bound on a stalled read

    # -- transactions ----------------------------------------------------------------

    def begin_snapshot(self, conn: Connection) -> str:
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        from . import myread
        myread.SNAPSHOT_CONNS.add(conn)  # its reads of whole tables may go through the client
        return "snapshot-isolation"

    def begin_write(self, conn: Connection) -> None:
        from . import myread
        myread.SNAPSHOT_CONNS.discard(conn)
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("START TRANSACTION")

    def bound_idle_transaction(self, conn: Connection, idle: float) -> None:
        if getattr(conn.dialect, "is_mariadb", False):  # MySQL has no such bound
            conn.exec_driver_sql(f"SET SESSION idle_transaction_timeout = {max(1, math.ceil(idle))}")

    # -- reading -----------------------------------------------------------------------

    def order_key(self, conn: Connection, column: sa.ColumnClause, type_text: str):
        if not _orders_as_text(type_text):
            return column
        # the bytes of the text as UTF-8: a latin1 column's own bytes (cp1252: '€' is 0x80)
        # are not in code point order; an ENUM converted to text is its label
        return _utf8_bytes(column)

    def estimated_bytes(self, conn: Connection, schema_doc: dict) -> int | None:
        v = conn.exec_driver_sql("SELECT data_length FROM information_schema.tables WHERE table_schema = "
                                 "COALESCE(%(s)s, DATABASE()) AND table_name = %(t)s",
                                 {"s": schema_doc.get("db_schema"), "t": schema_doc["table"]}).scalar()
        return int(v or 0) or None

    def read_lines(self, conn: Connection, schema_doc: dict, *, where=None, fast: bool | None = None,
                   batch: int | None = None, blocks: bool = False) -> tuple[dict, Iterator[list[bytes]]]:
        """``mytext`` lines (in batches of lines, whether or not the caller takes ``blocks``): through the client inside a snapshot (unless ``fast`` is False),
        else through the driver, locking what a restore reads (:mod:`.myread`)."""
        from . import myread
        # outside a snapshot's transaction, a restore's: its reads lock what they read, as its
        # reads of values do
        return myread.read_lines(conn, schema_doc, where=where, fast=fast, batch=batch,
                                 for_update=conn not in myread.SNAPSHOT_CONNS)

    def locking_read(self, stmt: sa.Select) -> sa.Select:
        # a restore plans with locking reads: its writes act on the latest rows, so without
        # locks a concurrent change could be overwritten unseen (PostgreSQL's REPEATABLE READ
        # fails the commit instead)
        return stmt.with_for_update()

    # -- writing -----------------------------------------------------------------------

    def sent_keys(self, schema_doc: dict, keys: list) -> list:
        # a BIT column comes back as bytes but matches only a number (b'..' = _binary'..' is false)
        pk = schema_doc["primary_key"]
        types = {c["name"]: c["type"].upper() for c in schema_doc["columns"]}
        bits = [types.get(k, "").startswith("BIT") for k in pk]
        return [_bit_key(k, bits) for k in keys] if any(bits) else keys

    def exact_text(self, col):
        return _utf8_bytes(col)

    def exactly_in(self, col, values: list[str]):
        return self.exact_text(col).in_(sa.bindparam(None, [s.encode("utf-8") for s in values], expanding=True,
                                                     type_=sa.LargeBinary()))

    # -- a table's definition ----------------------------------------------------------

    def capture_definition(self, conn: Connection, table: str, schema: str | None) -> dict | None:
        return _capture(conn, table, schema)

    def checked_type(self, conn: Connection, text: str) -> str | None:
        m = _TYPE.match(text)
        return text if m and m.group("name").upper() in _TYPE_NAMES else None

    def create_from_definition(self, conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str],
                               trusted: bool, where: str) -> None:
        _create(conn, schema_doc, ddl, types, trusted)

    # finish_definition: CREATE TRIGGER would commit the restore's transaction before it is
    # verified; the triggers come back when the table is recreated with the repository trusted

    @staticmethod
    def omissions(ddl: dict, trusted: bool) -> list[str]:
        if trusted:
            # every DDL statement commits on MariaDB/MySQL: no trigger is made inside the restore
            return [f"trigger {tg['name']} (MariaDB/MySQL would commit the restore's transaction)"
                    for tg in ddl.get("triggers", [])]
        out = [f"default of column {c['name']}" for c in ddl.get("columns", []) if c.get("default") is not None]
        out += [f"generated expression of column {c['name']}" for c in ddl.get("columns", []) if c.get("generated")]
        out += [f"check constraint {c['name']}" for c in ddl.get("checks", [])]
        out += [f"foreign key {f['name']}" for f in ddl.get("foreign_keys", [])]
        out += [f"index {ix['name']} ({ix.get('method')})" for ix in ddl.get("indexes", []) if ix.get("columns") is None]
        out += [f"trigger {tg['name']}" for tg in ddl.get("triggers", [])]
        return out

    @staticmethod
    def definition_items(ddl: dict, trusted: bool) -> dict[str, Any]:
        if trusted:
            return {"table definition": re.sub(r" AUTO_INCREMENT=\d+", "", ddl.get("create_table") or "")}
        out: dict[str, Any] = {"auto_increment column": ddl.get("auto_increment")}
        for ix in ddl.get("indexes", []):
            if ix.get("columns") is not None:
                out[f"index {ix['name']}"] = [ix.get("method"), ix.get("unique"), ix["columns"], ix.get("prefixes")]
        return out

    # -- a restore's writes --------------------------------------------------------------

    def will_enforce(self, guard: Guard) -> bool:
        return False

    def firing(self, guard: Guard, where: str, names: list) -> str | None:
        # foreign-key checks are off, so a modified row is deleted and inserted again ("replace"):
        # an UPDATE trigger never fires, an INSERT or DELETE one only where rows go in or out
        events = {n: {e for e, on in (("INSERT", t.modified or t.deleted), ("DELETE", t.added or t.modified),
                                      ("UPDATE", False)) if on}
                  for n, t in ((n, guard.planned[n]) for n in names)}
        rows = [r for r in guard.conn.execute(sa.text(
            "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE, EVENT_MANIPULATION FROM information_schema.TRIGGERS "
            "WHERE EVENT_OBJECT_SCHEMA = COALESCE(:s, DATABASE()) AND EVENT_OBJECT_TABLE IN :t"
        ).bindparams(sa.bindparam("t", expanding=True)), {"s": names[0][0], "t": [n[1] for n in names]}).fetchall()
            if str(r[2]).upper() in events.get((names[0][0], r[1]), {"INSERT", "DELETE", "UPDATE"})]
        if rows:
            triggers = ", ".join(f"{r[0]} on {r[1]}" for r in rows)
            return (f"{where}: the restore would write tables with triggers ({triggers}); MariaDB/MySQL cannot keep a "
                    f"trigger from firing inside a transaction, and its writes would change what the restore "
                    f"did not plan. Nothing was written: drop the trigger(s) for the restore (SHOW CREATE TRIGGER "
                    f"gives their text) and create them again afterwards")
        return None

    def start_writes(self, guard: Guard) -> bool:
        guard.conn.exec_driver_sql("SET SESSION foreign_key_checks = 0")
        return False

    def end_writes(self, guard: Guard) -> None:
        guard.conn.exec_driver_sql("SET SESSION foreign_key_checks = 1")


def _utf8_bytes(column):
    """A column's text as UTF-8 bytes, compared and ordered byte for byte whatever its collation."""
    return sa.cast(sa.func.convert(column, sa.literal_column("CHAR CHARACTER SET utf8mb4")), sa.LargeBinary)


def _orders_as_text(type_text: str) -> bool:
    if is_text_type(type_text):
        return True
    words = type_text.upper().replace("(", " ").split()
    return bool(words) and words[0] not in VALUE_ORDERED_TYPES


def _bit_key(key: Any, bits: list[bool]) -> Any:
    def number(v: Any) -> Any:
        return int.from_bytes(v, "big") if isinstance(v, (bytes, bytearray)) else v
    if len(bits) == 1:
        return number(key)
    return [number(v) if bit else v for v, bit in zip(key, bits)]


# -- table definitions ------------------------------------------------------------------

def _capture(conn: Connection, table: str, schema: str | None) -> dict:
    """``SHOW CREATE TABLE`` with its parts from ``information_schema`` (defaults, generated
    columns, indexes, checks, foreign keys, triggers)."""
    q = conn.exec_driver_sql
    name = qualified(conn, table, schema)
    create = q(f"SHOW CREATE TABLE {name}").fetchone()[1]
    args = {"s": schema, "t": table}
    where = "TABLE_SCHEMA = COALESCE(%(s)s, DATABASE()) AND TABLE_NAME = %(t)s"
    engine, collation = q(f"SELECT ENGINE, TABLE_COLLATION FROM information_schema.TABLES WHERE {where}", args).fetchone()
    charset = q("SELECT CHARACTER_SET_NAME FROM information_schema.COLLATIONS WHERE COLLATION_NAME = %(c)s",
                {"c": collation}).scalar()
    columns, auto = [], None
    for cname, default, extra, gen in q(f"""SELECT COLUMN_NAME, COLUMN_DEFAULT, EXTRA, GENERATION_EXPRESSION
                                           FROM information_schema.COLUMNS WHERE {where} ORDER BY ORDINAL_POSITION""",
                                        args):
        extra = (extra or "").lower()
        if "auto_increment" in extra:
            auto = cname
        generated = gen if "generated" in extra and gen else None
        if default is not None and default.upper() == "NULL":
            default = None
        if default is not None or generated:
            columns.append({"name": cname, "default": None if generated else default, "generated": generated})
    indexes: dict[str, dict] = {}
    for iname, non_unique, itype, col, sub in q(f"""SELECT INDEX_NAME, NON_UNIQUE, INDEX_TYPE, COLUMN_NAME, SUB_PART
                                                   FROM information_schema.STATISTICS WHERE {where}
                                                   ORDER BY INDEX_NAME, SEQ_IN_INDEX""", args):
        if iname == "PRIMARY":
            continue
        ix = indexes.setdefault(iname, {"name": iname, "method": itype, "unique": not int(non_unique),
                                        "columns": [], "prefixes": []})
        if col is None:  # a functional key part (MySQL 8)
            ix["columns"] = None
        elif ix["columns"] is not None:
            ix["columns"].append(col)
            ix["prefixes"].append(int(sub) if sub is not None else None)
    checks = []
    try:
        checks = [{"name": r[0], "definition": r[1]} for r in q(
            "SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
            "WHERE CONSTRAINT_SCHEMA = COALESCE(%(s)s, DATABASE()) AND TABLE_NAME = %(t)s ORDER BY CONSTRAINT_NAME",
            args)]
    except sa.exc.DBAPIError:
        pass
    fks = [{"name": r[0]} for r in q(
        "SELECT CONSTRAINT_NAME FROM information_schema.REFERENTIAL_CONSTRAINTS "
        "WHERE CONSTRAINT_SCHEMA = COALESCE(%(s)s, DATABASE()) AND TABLE_NAME = %(t)s ORDER BY CONSTRAINT_NAME", args)]
    triggers = []
    for (tname,) in q("SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_SCHEMA = "
                      "COALESCE(%(s)s, DATABASE()) AND EVENT_OBJECT_TABLE = %(t)s ORDER BY ACTION_ORDER", args).fetchall():
        row = q(f"SHOW CREATE TRIGGER {qualified(conn, tname, schema)}").fetchone()
        triggers.append({"name": tname, "definition": row[2]})
    return {"dialect": "mysql", "create_table": create, "engine": engine, "charset": charset, "collation": collation,
            "auto_increment": auto, "columns": columns, "indexes": sorted(indexes.values(), key=lambda i: i["name"]),
            "checks": checks, "foreign_keys": fks, "triggers": triggers}


_TYPE_NAMES = frozenset("""
    TINYINT SMALLINT MEDIUMINT INT INTEGER BIGINT DECIMAL DEC NUMERIC FIXED FLOAT DOUBLE REAL BIT BOOL BOOLEAN
    SERIAL DATE DATETIME TIMESTAMP TIME YEAR CHAR VARCHAR NCHAR NVARCHAR BINARY VARBINARY TINYBLOB BLOB
    MEDIUMBLOB LONGBLOB TINYTEXT TEXT MEDIUMTEXT LONGTEXT ENUM SET JSON UUID INET4 INET6 GEOMETRY POINT
    LINESTRING POLYGON MULTIPOINT MULTILINESTRING MULTIPOLYGON GEOMETRYCOLLECTION VECTOR""".split())
_STRING = r"'(?:[^'\\]|'')*'"
_TYPE = re.compile(
    r"^(?P<name>[A-Za-z0-9]+)(?: (?:PRECISION|VARYING))?"
    rf"(?:\((?:\d+(?:, ?\d+)?|{_STRING}(?:, ?{_STRING})*)\))?"
    r"(?: (?:UNSIGNED|ZEROFILL|BINARY|CHARACTER SET [A-Za-z0-9_]+|COLLATE [A-Za-z0-9_]+))*$", re.I)

_INDEX_KINDS = {"BTREE": "", "HASH": "", "FULLTEXT": "FULLTEXT ", "SPATIAL": "SPATIAL "}
_WORD = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _create(conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str], trusted: bool) -> None:
    """``SHOW CREATE TABLE`` replayed when trusted; else columns, AUTO_INCREMENT, plain indexes
    and table options that are plain words."""
    if trusted:
        # SHOW CREATE TABLE as it was, foreign keys included: on MariaDB/MySQL every DDL
        # statement commits the transaction, so none is added after the rows are written
        conn.exec_driver_sql(ddl["create_table"])
        return
    auto = ddl.get("auto_increment")
    extra = {auto: " AUTO_INCREMENT"} if auto in types else {}
    tail = []
    for ix in ddl.get("indexes", []):
        if ix.get("columns") is None or str(ix.get("method")).upper() not in _INDEX_KINDS:
            continue
        kind = "UNIQUE " if ix.get("unique") else _INDEX_KINDS[str(ix["method"]).upper()]
        cols = ", ".join(quoted(conn, c) + (f"({integer(p, 'index prefix length')})" if p is not None else "")
                         for c, p in zip(ix["columns"], ix.get("prefixes") or [None] * len(ix["columns"])))
        tail.append(f"{kind}INDEX {quoted(conn, ix['name'])} ({cols})")
    options = ""
    for key, word in (("engine", "ENGINE"), ("charset", "DEFAULT CHARSET"), ("collation", "COLLATE")):
        value = ddl.get(key)
        if isinstance(value, str) and _WORD.match(value):
            options += f" {word}={value}"
    create_structured(conn, schema_doc, types, extra, tail, options)
