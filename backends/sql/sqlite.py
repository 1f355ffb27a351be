"""SQLite: the database file (a relative path is the config file's folder's; a file that is
gone is refused, not silently created), its locks and transactions, key order by code point
(``COLLATE BINARY``), a table's definition (the ``sqlite_master`` text and what the pragmas
say), and a restore's writes: the restore's connection does not enforce foreign keys; a
written table's triggers are dropped inside the write transaction and created again before it
commits, and ``total_changes()`` must equal the rows the restore wrote.
"""
from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Any, Iterator

from snapshotter.backend import read_ahead
from snapshotter.errors import ConfigError

from .ddl import create_index, create_structured, quoted
from .dialect import Dialect, ended_idle

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from .integrity import ForeignKey, Guard


class SQLite(Dialect):
    ddl_kind = "sqlite"
    pool_pre_ping = False
    line_format = "sqltext"

    # -- the database file -------------------------------------------------------------

    def resolve_url(self, url: sa.URL, base_dir: str | None) -> sa.URL:
        db = url.database
        if db and db != ":memory:" and not db.startswith("file:") and not os.path.isabs(db) and base_dir:
            return url.set(database=os.path.normpath(os.path.join(base_dir, db)))
        return url

    def local_file(self, url: sa.URL) -> str | None:
        """The file a SQLite URL opens, or None when it opens an in-memory database
        (``sqlite://``, ``:memory:``, a ``file:`` URI with ``mode=memory``)."""
        if not url.database or url.database == ":memory:":
            return None
        db = url.database
        uri = str(url.query.get("uri", "")).lower() in ("true", "1", "yes")
        if not (uri and db.startswith("file:")):
            return db
        from urllib.parse import parse_qs, unquote
        path, _, query = db[len("file:"):].partition("?")
        mode = parse_qs(query).get("mode", [None])[-1] or url.query.get("mode")
        if path.startswith("//"):  # file://HOST/path: SQLite accepts an empty host or localhost
            path = "/" + path[2:].partition("/")[2]
        path = unquote(path)
        return None if mode == "memory" or path in ("", ":memory:") else path

    def check_local_file(self, url: sa.URL, where: str, *, create: bool) -> None:
        """A SQLite URL must name an existing file: SQLite would create an empty database
        in its place, and a typo in a path would snapshot nothing and restore into that
        empty file.  ``create`` (``restore --create-missing``) makes the missing folders
        and lets SQLite create the file, for a database that is really gone."""
        path = self.local_file(url)
        if path is None or os.path.exists(path):
            return
        folder = os.path.dirname(os.path.abspath(path))
        if create:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{where}: cannot create the folder of SQLite database {path}: "
                                  f"{exc.strerror or exc}") from None
            return
        what = "neither the file nor its folder exists" if not os.path.isdir(folder) else "the file does not exist"
        raise ConfigError(f"{where}: no SQLite database at {path} ({what}); check the url "
                          f"(restore --create-missing recreates a database that is gone)")

    def connect_args(self, url: sa.URL, timeout: float) -> dict[str, Any]:
        # how long a statement waits for another connection's lock ("database is locked")
        return {"timeout": timeout}

    def timeout_kind(self, orig: BaseException | None) -> str | None:
        if orig is None:
            return None
        if ended_idle(orig):
            return "idle"
        text = str(orig).lower()
        # SQLite may also answer "locked" at once (a read transaction that cannot become a write)
        return "locked" if "database is locked" in text or "database table is locked" in text else None

    # -- transactions ----------------------------------------------------------------

    def begin_snapshot(self, conn: Connection) -> str:
        # a deferred transaction takes its read snapshot at the first SELECT and
        # keeps it (WAL) or holds the shared lock (rollback journal) until COMMIT
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        return "snapshot-isolation"

    def begin_write(self, conn: Connection) -> None:
        # the restore keeps foreign-key actions from firing and proves the keys itself
        # (integrity.py); the pragma is a no-op inside a transaction
        conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    # -- reading -----------------------------------------------------------------------

    def order_key(self, conn: Connection, column: sa.ColumnClause, type_text: str):
        # every key column, whatever its declared type: a column of no text type (untyped,
        # UUID, JSON) holds text too, and its COLLATE NOCASE would order it case-blind;
        # BINARY changes nothing for numbers (an integer key's index still gives the order)
        return column.collate("BINARY")

    def virtual_tables(self, conn: Connection, schema: str | None) -> set[str]:
        q = conn.dialect.identifier_preparer.quote
        master = f"{q(schema)}.sqlite_master" if schema else "sqlite_master"
        return {r[0] for r in conn.exec_driver_sql(
            f"SELECT name FROM {master} WHERE type = 'table' AND sql LIKE 'CREATE VIRTUAL TABLE%'")}

    def estimated_bytes(self, conn: Connection, schema_doc: dict) -> int | None:
        if schema_doc.get("db_schema"):
            return None
        # the table's pages (dbstat, when SQLite was built with it; else no estimate)
        v = conn.exec_driver_sql("SELECT sum(pgsize) FROM dbstat WHERE name = ?", (schema_doc["table"],)).scalar()
        return int(v or 0) or None

    def exact_text(self, col):
        return col.collate("BINARY")

    writes_expressions = True

    def adapt_for_write(self, schema_doc: dict, values: dict) -> dict:
        """Text that is not UTF-8 (read with ``surrogateescape``: the driver cannot send it)
        goes as its bytes, cast to TEXT by SQLite, so the row gets back the bytes it had."""
        for v in values.values():
            if type(v) is str and not v.isascii() and _SURROGATE.search(v):
                break
        else:
            return values
        import sqlalchemy as sa
        return {c: sa.cast(sa.literal(v.encode("utf-8", "surrogateescape"), sa.LargeBinary), sa.Text)
                if type(v) is str and _SURROGATE.search(v) else v for c, v in values.items()}

    def key_sql(self, value: Any):
        # a text key that is not UTF-8: its bytes cast to TEXT, as adapt_for_write sends a value
        if type(value) is str and not value.isascii() and _SURROGATE.search(value):
            import sqlalchemy as sa
            return sa.cast(sa.literal(value.encode("utf-8", "surrogateescape"), sa.LargeBinary), sa.Text)
        return None

    def read_lines(self, conn: Connection, schema_doc: dict, *, where=None, fast: bool | None = None,
                   batch: int | None = None, blocks: bool = False) -> tuple[dict, Iterator[list[bytes]]]:
        """The table's rows as ``sqltext`` lines (:mod:`.sqltext`), built by SQLite (in
        batches of lines, whether or not the caller takes ``blocks``)."""
        return _read_lines(conn, schema_doc, where=where, fast=fast, batch=batch)

    def keeps_msgpack(self, conn: Connection, schema_doc: dict) -> bool:
        return keeps_msgpack(conn, schema_doc)

    # -- a table's definition ----------------------------------------------------------

    def capture_definition(self, conn: Connection, table: str, schema: str | None) -> dict | None:
        return _capture(conn, table, schema)

    def checked_type(self, conn: Connection, text: str) -> str | None:
        return text if _TYPE.match(text) else None

    def create_from_definition(self, conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str],
                               trusted: bool, where: str) -> None:
        _create(conn, schema_doc, ddl, types, trusted)

    def finish_definition(self, conn: Connection, schema_doc: dict, ddl: dict, trusted: bool,
                          where: str) -> None:
        if trusted:
            for tg in ddl.get("triggers", []):
                conn.exec_driver_sql(tg["definition"])

    @staticmethod
    def omissions(ddl: dict, trusted: bool) -> list[str]:
        if trusted:
            return []
        out = [f"default of column {c}" for c in ddl.get("defaults", [])]
        out += [f"generated expression of column {c}" for c in ddl.get("generated", [])]
        if ddl.get("checks"):
            out.append("check constraints")
        out += [f"index {ix['name']} ({'partial' if ix.get('partial') else 'expression'})"
                for ix in ddl.get("indexes", []) if ix.get("columns") is None]
        out += [f"trigger {tg['name']}" for tg in ddl.get("triggers", [])]
        return out

    @staticmethod
    def definition_items(ddl: dict, trusted: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if trusted:
            out["table definition"] = ddl.get("create_table")
            for ix in ddl.get("indexes", []):
                out[f"index {ix['name']}"] = ix.get("definition") if ix.get("origin") == "c" else ix.get("columns")
            for tg in ddl.get("triggers", []):
                out[f"trigger {tg['name']}"] = tg["definition"]
        else:
            out["autoincrement"] = ddl.get("autoincrement")
            # stored before these were: a plain table on both sides
            out["without rowid"] = bool(ddl.get("without_rowid"))
            out["strict"] = bool(ddl.get("strict"))
            for ix in ddl.get("indexes", []):
                if ix.get("columns"):
                    out[f"index on ({', '.join(ix['columns'])})"] = [ix.get("unique"), ix.get("origin")]
        return out

    # -- a restore's writes --------------------------------------------------------------

    def foreign_keys(self, conn: Connection, schema: str | None) -> list[ForeignKey]:
        """As reflected, with the parent table and columns named as the tables name them:
        SQLite matches ``REFERENCES P(ID)`` to table ``p`` column ``id`` whatever the case."""
        import dataclasses

        import sqlalchemy as sa

        from .integrity import reflected_foreign_keys
        fks = reflected_foreign_keys(conn, schema)
        if not fks:
            return fks
        insp = sa.inspect(conn)
        tables: dict[tuple, str] = {}
        columns: dict[tuple, dict[str, str]] = {}
        out = []
        for fk in fks:
            sch, parent = fk.parent
            if (sch, parent.lower()) not in tables:
                names = {n.lower(): n for n in insp.get_table_names(schema=sch)}
                tables.update({(sch, k): v for k, v in names.items()})
            real = tables.get((sch, parent.lower()), parent)
            if (sch, real) not in columns:
                try:
                    columns[(sch, real)] = {c["name"].lower(): c["name"] for c in insp.get_columns(real, schema=sch)}
                except sa.exc.NoSuchTableError:
                    columns[(sch, real)] = {}
            cols = columns[(sch, real)]
            out.append(dataclasses.replace(fk, parent=(sch, real),
                                           parent_columns=tuple(cols.get(c.lower(), c) for c in fk.parent_columns)))
        return out

    def will_enforce(self, guard: Guard) -> bool:
        return bool(guard.conn.exec_driver_sql("PRAGMA foreign_keys").scalar())

    def start_writes(self, guard: Guard) -> bool:
        enforcing = self.will_enforce(guard)
        guard.changes_before = _total_changes(guard.conn)
        return enforcing

    def switch_off(self, guard: Guard, name: tuple) -> None:
        rows = guard.conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? COLLATE NOCASE "
            "ORDER BY rowid",
            (name[1],)).fetchall()
        q = guard.conn.dialect.identifier_preparer.quote
        for tname, sql in rows:
            guard.conn.exec_driver_sql(f"DROP TRIGGER {q(tname)}")
            guard.switched_off.append(sql)

    def side_effects(self, guard: Guard) -> list[str]:
        made = _total_changes(guard.conn) - guard.changes_before
        wrote = sum(sum(c) for c in guard.counts.values())
        if made != wrote:
            return [f"the database changed {made} row(s) where the restore wrote {wrote}: a trigger or a "
                    f"foreign-key action wrote rows the restore did not plan"]
        return []


#: a lone surrogate: a byte of text that was not UTF-8, decoded with ``surrogateescape``
_SURROGATE = re.compile("[\udc80-\udcff]")

# -- rows as sqltext lines -----------------------------------------------------------------

#: the SQL function that writes a zero REAL with its sign (SQLite's printf drops it)
_ZERO = "snapshotter_sqltext_zero"
#: rows per batch of a rowid table's read (fewer for long rows: about PAGE_BYTES a batch)
PAGE_ROWS = 4096
PAGE_BYTES = 1 << 21
#: batches read ahead by the reading thread
PAGES_AHEAD = 4


def _zero_text(x: float) -> str:
    return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"


def _field_sql(q: str) -> str:
    """One value as its sqltext field, whatever its storage class (:mod:`.sqltext`)."""
    text = (f"replace(replace(replace(replace({q}, '\\', '\\\\'), char(10), '\\n'), char(13), '\\r'), "
            f"char(9), '\\t')")
    return (f"CASE typeof({q}) WHEN 'integer' THEN CAST({q} AS TEXT) "
            f"WHEN 'real' THEN CASE WHEN {q} = 0 THEN {_ZERO}({q}) ELSE printf('%!.17e', {q}) END "
            f"WHEN 'text' THEN CASE WHEN instr({q}, char(0)) THEN 'T''' || hex({q}) || '''' "
            f"ELSE '''' || {text} || '''' END "
            f"WHEN 'blob' THEN 'X''' || hex({q}) || '''' ELSE 'NULL' END")


def _fast_sql(q: str, type_text: str, rowid: bool) -> tuple[str | None, str, str]:
    """``(guard, printf format, printf argument)`` writing a value of the storage class the
    column's affinity makes likely; a row whose values all pass their guards is one printf
    call.  Text is written unescaped here: a page holding a character that needs an escape
    is read again through :func:`_field_sql` (the bytes are the same where none is needed)."""
    t = type_text.upper()
    if rowid:
        return None, "%d", q
    if "INT" in t:
        return f"typeof({q}) = 'integer'", "%d", q
    if any(w in t for w in ("CHAR", "CLOB", "TEXT")):
        return f"typeof({q}) = 'text' AND instr({q}, char(0)) = 0", "'%s'", q
    if not t or "BLOB" in t:
        return f"typeof({q}) = 'blob'", "X'%s'", f"hex({q})"
    if any(w in t for w in ("REAL", "FLOA", "DOUB")):
        return f"typeof({q}) = 'real' AND {q} <> 0", "%!.17e", q
    return f"typeof({q}) = 'integer'", "%d", q  # NUMERIC affinity


def _line_sql(conn: Connection, schema_doc: dict, rowid: bool, fast: bool) -> str:
    q = conn.dialect.identifier_preparer.quote
    cols = schema_doc["columns"]
    generic = " || char(9) || ".join(_field_sql(q(c["name"])) for c in cols)
    if not fast:
        return generic
    parts = [_fast_sql(q(c["name"]), c["type"], rowid and c["name"] == schema_doc["primary_key"][0]) for c in cols]
    guards = " AND ".join(g for g, _, _ in parts if g)
    fmt = "\t".join(f for _, f, _ in parts).replace("'", "''")
    call = f"printf('{fmt}', {', '.join(a for _, _, a in parts)})"
    return f"CASE WHEN {guards} THEN {call} ELSE {generic} END" if guards else call


def is_rowid_key(conn: Connection, schema_doc: dict) -> bool:
    """Whether the table's key is its rowid (one ``INTEGER PRIMARY KEY`` of a rowid table):
    every other primary key has an index of origin ``pk``."""
    if len(schema_doc["primary_key"]) != 1:
        return False
    q = conn.dialect.identifier_preparer.quote
    prefix = f"{q(schema_doc['db_schema'])}." if schema_doc.get("db_schema") else ""
    rows = conn.exec_driver_sql(f"PRAGMA {prefix}index_list({q(schema_doc['table'])})").fetchall()
    return not any(r[3] == "pk" for r in rows)


def keeps_msgpack(conn: Connection, schema_doc: dict) -> bool:
    """Whether the table is better stored as msgpack records than as ``sqltext`` lines: a
    column declared ``BLOB`` (its type names BLOB), or a column of no declared type holding
    a blob among the first :data:`PAGE_ROWS` rows in key order.  sqltext writes a blob in
    hex, twice its bytes to hash and compress; msgpack keeps it as it is."""
    cols = schema_doc["columns"]
    if any("BLOB" in (c.get("type") or "").upper() for c in cols):
        return True
    untyped = [c["name"] for c in cols if not (c.get("type") or "").strip() or (c.get("type") or "").upper() == "NULL"]
    if not untyped:
        return False
    q = conn.dialect.identifier_preparer.quote
    table = q(schema_doc["table"])
    if schema_doc.get("db_schema"):
        table = f"{q(schema_doc['db_schema'])}.{table}"
    order = ", ".join(f"{q(k)} COLLATE BINARY" for k in schema_doc["primary_key"])
    names = ", ".join(q(c) for c in untyped)
    blob = " OR ".join(f"typeof({q(c)}) = 'blob'" for c in untyped)
    return conn.exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM (SELECT {names} FROM {table} ORDER BY {order} "
                                f"LIMIT {PAGE_ROWS}) WHERE {blob})").scalar() == 1


def _read_lines(conn: Connection, schema_doc: dict, *, where=None, fast: bool | None = None,
                batch: int | None = None) -> tuple[dict, Iterator[list[bytes]]]:
    """The table's encoding document and batches of its rows as ``sqltext`` lines in key
    order, each row one value SQLite writes.  A rowid table is read through one cursor
    ``ORDER BY`` its key (so SQLite promises the order) on a thread of its own, beside the
    caller's work on the previous batches (SQLite lets go of the GIL while it steps), or on
    the caller's thread where the connection refuses other threads (``check_same_thread``);
    other tables, and reads of some rows (``where``), through a cursor on the caller's
    thread.  ``fast`` False: every value through the generic expression (the lines are the
    same)."""
    from . import sqltext
    from .base import FETCH_BATCH, select_stmt

    rowid = is_rowid_key(conn, schema_doc)
    names = [c["name"] for c in schema_doc["columns"]]
    doc = sqltext.encoding_doc(names, schema_doc["primary_key"], rowid)
    raw = conn.connection.driver_connection
    raw.create_function(_ZERO, 1, _zero_text, deterministic=True)
    if not rowid or where is not None:
        import sqlalchemy as sa
        line = sa.literal_column(f"CAST({_line_sql(conn, schema_doc, rowid, False)} AS BLOB)")
        stmt = select_stmt(conn, schema_doc, where).with_only_columns(line)

        def by_cursor() -> Iterator[list[bytes]]:
            size = batch or FETCH_BATCH
            result = conn.execute(stmt, execution_options={"stream_results": True, "yield_per": size})
            for part in result.partitions(size):
                yield [bytes(r[0]) + b"\n" for r in part]
        return doc, by_cursor()
    q = conn.dialect.identifier_preparer.quote
    table = q(schema_doc["table"])
    if schema_doc.get("db_schema"):
        table = f"{q(schema_doc['db_schema'])}.{table}"
    key = q(schema_doc["primary_key"][0])
    generic = _line_sql(conn, schema_doc, True, False)
    first = _line_sql(conn, schema_doc, True, True) if fast is not False else generic
    scan = f"SELECT CAST(({first}) || char(10) AS BLOB) FROM {table} ORDER BY {key}"
    again = f"SELECT CAST(({generic}) || char(10) AS BLOB) FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?"
    lines = _rowid_lines(raw, scan, again if fast is not False else None, len(names),
                         names.index(schema_doc["primary_key"][0]), batch or PAGE_ROWS)
    return doc, (read_ahead(lines, PAGES_AHEAD, "sqlite-lines") if _threads_may_use(raw) else lines)


def _rowid_lines(raw, scan: str, again: str | None, ncols: int, key_index: int, rows: int) -> Iterator[list[bytes]]:
    """Batches of a rowid table's lines from one ordered cursor.  ``again``: the generic
    statement reading a batch again when the fast expression may not have written it
    exactly (a text that needs an escape, seen by its bytes)."""
    cur = raw.execute(scan)
    try:
        last: Any = float("-inf")  # below every rowid
        size = min(rows, 256)
        while True:
            lines = [r[0] for r in cur.fetchmany(size)]
            if not lines:
                return
            n = len(lines)
            page = b"".join(lines)
            if again is not None and (b"\\" in page or b"\r" in page or page.count(b"\n") != n
                                      or page.count(b"\t") != n * (ncols - 1)):
                lines = [r[0] for r in raw.execute(again, (last, n)).fetchall()]
            # a rowid is an integer, written as its digits: the line's key field
            last = int(lines[-1].split(b"\t", key_index + 1)[key_index])
            yield lines
            size = max(min(16, rows), min(rows, PAGE_BYTES * n // max(1, len(page))))
    finally:
        cur.close()


def _threads_may_use(raw) -> bool:
    """Whether another thread may use this connection (not opened ``check_same_thread``)."""
    import sqlite3
    import threading

    ok: list[bool] = []

    def probe() -> None:
        try:
            raw.cursor().close()
            ok.append(True)
        except sqlite3.ProgrammingError:
            pass
    t = threading.Thread(target=probe, name="sqlite-probe", daemon=True)
    t.start()
    t.join()
    return bool(ok)


def _total_changes(conn: Connection) -> int:
    return int(conn.connection.driver_connection.total_changes)


# -- table definitions ------------------------------------------------------------------

def _capture(conn: Connection, table: str, schema: str | None) -> dict:
    """The ``sqlite_master`` text of the table, its indexes and triggers, with what the pragmas
    say of its defaults, generated columns, indexes and foreign keys."""
    q = conn.exec_driver_sql
    prefix = f"{quoted(conn, schema)}." if schema else ""
    rows = q(f"SELECT type, name, sql FROM {prefix}sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
             f"ORDER BY type, name", (table,)).fetchall()
    create = next((r[2] for r in rows if r[0] == "table" and r[1] == table), None)
    qt = quoted(conn, table)
    defaults, generated = [], []
    for cid, cname, ctype, notnull, dflt, pk, hidden in q(f"PRAGMA {prefix}table_xinfo({qt})").fetchall():
        if hidden in (2, 3):
            generated.append(cname)
        elif dflt is not None:
            defaults.append(cname)
    indexes = []
    index_sql = {r[1]: r[2] for r in rows if r[0] == "index"}
    for _, iname, unique, origin, partial in q(f"PRAGMA {prefix}index_list({qt})").fetchall():
        if origin == "pk":
            continue
        cols = [r[2] for r in q(f"PRAGMA {prefix}index_xinfo({quoted(conn, iname)})").fetchall() if r[5]]
        plain = not partial and all(c is not None for c in cols)
        indexes.append({"name": iname, "unique": bool(unique), "origin": origin, "partial": bool(partial),
                        "columns": cols if plain else None, "definition": index_sql.get(iname)})
    fks: dict[int, dict] = {}
    for fid, seq, ref, frm, to, on_update, on_delete, match in q(f"PRAGMA {prefix}foreign_key_list({qt})").fetchall():
        fk = fks.setdefault(fid, {"table": ref, "columns": [], "ref_columns": [], "on_delete": on_delete,
                                  "on_update": on_update})
        fk["columns"].append(frm)
        fk["ref_columns"].append(to)
    without_rowid, strict = _table_options(conn, prefix, qt, create)
    return {"dialect": "sqlite", "create_table": create,
            "autoincrement": bool(create and re.search(r"\bAUTOINCREMENT\b", create, re.I)),
            "without_rowid": without_rowid, "strict": strict,
            "defaults": defaults, "generated": generated,
            "checks": bool(create and re.search(r"\bCHECK\b", create, re.I)),
            "indexes": sorted(indexes, key=lambda i: i["name"]),
            "foreign_keys": [fks[k] for k in sorted(fks)],
            "triggers": [{"name": r[1], "definition": r[2]} for r in rows if r[0] == "trigger"]}


_STRICT_TYPES = {"INT", "INTEGER", "REAL", "TEXT", "BLOB", "ANY"}
_OPTIONS = re.compile(r"\)\s*((?:WITHOUT\s+ROWID|STRICT)(?:\s*,\s*(?:WITHOUT\s+ROWID|STRICT))*)\s*;?\s*$", re.I)


def _table_options(conn: Connection, prefix: str, qt: str, create: str | None) -> tuple[bool, bool]:
    """``(WITHOUT ROWID, STRICT)`` of a table: from ``PRAGMA table_list`` (SQLite 3.37+), else
    from the options after the last parenthesis of its ``CREATE TABLE`` text."""
    import sqlalchemy as sa
    try:
        row = conn.exec_driver_sql(f"PRAGMA {prefix}table_list({qt})").first()
    except sa.exc.DBAPIError:
        row = None
    if row is not None:
        return bool(row[4]), bool(row[5])
    m = _OPTIONS.search(create or "")
    words = (m.group(1).upper() if m else "").split(",")
    return any("ROWID" in w for w in words), any(w.strip() == "STRICT" for w in words)


_TYPE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*(?: [A-Za-z_][A-Za-z0-9_]*)*"
                   r"(?: ?\( ?[+-]?\d+(?:\.\d+)? ?(?:, ?[+-]?\d+(?:\.\d+)? ?)?\))?)?$")


def _create(conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str], trusted: bool) -> None:
    """The stored ``sqlite_master`` text replayed when trusted; else columns, AUTOINCREMENT,
    UNIQUE constraints, foreign keys and plain indexes."""
    if trusted:
        conn.exec_driver_sql(ddl["create_table"])
        for ix in ddl.get("indexes", []):
            if ix.get("definition"):
                conn.exec_driver_sql(ix["definition"])
        return
    extra, pk = {}, list(schema_doc.get("primary_key") or [])
    doc = schema_doc
    if ddl.get("autoincrement") and len(pk) == 1:
        extra[pk[0]] = " PRIMARY KEY AUTOINCREMENT"
        doc = dict(schema_doc, primary_key=[])
    tail = []
    for ix in ddl.get("indexes", []):
        if ix.get("origin") == "u" and ix.get("columns"):
            tail.append(f"UNIQUE ({', '.join(quoted(conn, c) for c in ix['columns'])})")
    for fk in ddl.get("foreign_keys", []):
        actions = "".join(f" ON {w} {fk[k]}" for k, w in (("on_delete", "DELETE"), ("on_update", "UPDATE"))
                          if fk.get(k) in ("CASCADE", "RESTRICT", "SET NULL", "SET DEFAULT"))
        ref_cols = [c for c in fk.get("ref_columns", []) if c is not None]
        tail.append(f"FOREIGN KEY ({', '.join(quoted(conn, c) for c in fk['columns'])}) REFERENCES "
                    f"{quoted(conn, fk['table'])}{' (' + ', '.join(quoted(conn, c) for c in ref_cols) + ')' if ref_cols else ''}"
                    f"{actions}")
    options = [o for o, on in (("WITHOUT ROWID", ddl.get("without_rowid")), ("STRICT", ddl.get("strict"))) if on]
    if ddl.get("strict"):
        # a STRICT table's columns are of these types only; reflection reads ANY as NUMERIC
        types = {c: t if t.upper() in _STRICT_TYPES else "ANY" for c, t in types.items()}
    create_structured(conn, doc, types, extra, tail, suffix=f" {', '.join(options)}" if options else "")
    for ix in ddl.get("indexes", []):
        if ix.get("origin") == "c" and ix.get("columns"):
            create_index(conn, schema_doc, ix["name"], ix["columns"], bool(ix.get("unique")))
