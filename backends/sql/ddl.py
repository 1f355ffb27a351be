"""A table's full definition: captured from the database's own catalog, stored in the
stream schema's ``ddl`` part, and used to recreate a dropped table as it was.

Nothing read from a repository is executed as SQL unless the operator trusts the
repository (``restore --trust-repository-sql``):

* identifiers (tables, columns, constraints, indexes, sequences) are always quoted
  by the dialect's preparer;
* type names are checked against the database: PostgreSQL resolves the stored text
  through the server as a bind parameter (``to_regtype``, the type's own typmod
  input function) and the server's canonical text (``format_type``) is what is
  emitted; MariaDB/MySQL and SQLite take a strict grammar of type names with
  numeric arguments; anything else is refused as a tampered repository (exit 3);
* numbers (sequence options) are checked to be integers, keywords (foreign key
  actions, index methods) come from fixed lists or the server's catalog;
* SQL expressions (defaults, generated columns, CHECK/EXCLUDE constraints, index
  definitions, triggers, partition bounds, ``SHOW CREATE TABLE`` and
  ``sqlite_master`` text) are replayed only when trusted.  Otherwise the table is
  recreated from the structured parts and :func:`omissions` says what was left out.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from snapshotter.errors import IntegrityError

from .. import lazy_module

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

sa = lazy_module("sqlalchemy")


def dialect(conn) -> str:
    return conn.dialect.name


def _qi(conn: Connection, name: str) -> str:
    """An identifier, always quoted (and its quote characters escaped) by the dialect."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise IntegrityError(f"the repository holds an invalid identifier {name!r}")
    return conn.dialect.identifier_preparer.quote_identifier(name)


def qualified(conn: Connection, table: str, schema: str | None) -> str:
    return f"{_qi(conn, schema)}.{_qi(conn, table)}" if schema else _qi(conn, table)


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise IntegrityError(f"the repository holds a non-integer {what} ({value!r})")
    return value


# -- capture ------------------------------------------------------------------------

def capture(conn: Connection, table: str, schema: str | None) -> dict | None:
    d = dialect(conn)
    if d == "postgresql":
        return _pg_capture(conn, table, schema)
    if d in ("mysql", "mariadb"):
        return _my_capture(conn, table, schema)
    if d == "sqlite":
        return _sqlite_capture(conn, table, schema)
    return None


_FK_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
_PG_CONTYPES = {"c": "check", "u": "unique", "x": "exclude", "f": "foreign key"}


def _pg_capture(conn: Connection, table: str, schema: str | None) -> dict:
    t = {"t": qualified(conn, table, schema)}
    q = conn.exec_driver_sql
    relkind = q("SELECT relkind FROM pg_class WHERE oid = %(t)s::regclass", t).scalar()
    columns = []
    for name, default, identity, generated in q("""
            SELECT a.attname, pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated
            FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = %(t)s::regclass AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum""", t):
        col = {"name": name, "default": None, "identity": None, "generated": None}
        if generated == "s":
            col["generated"] = default
        else:
            col["default"] = default
        if identity in ("a", "d"):
            col["identity"] = "always" if identity == "a" else "by default"
        columns.append(col)
    sequences = []
    for row in q("""
            SELECT a.attname, s.relname, n.nspname, format_type(p.seqtypid, NULL), p.seqstart, p.seqincrement,
                   p.seqmin, p.seqmax, p.seqcache, p.seqcycle, d.deptype
            FROM pg_depend d
            JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
            JOIN pg_namespace n ON n.oid = s.relnamespace
            JOIN pg_sequence p ON p.seqrelid = s.oid
            JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
            WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
              AND d.refobjid = %(t)s::regclass AND d.deptype IN ('a', 'i')
            ORDER BY a.attnum""", t):
        sequences.append({"column": row[0], "name": row[1], "schema": row[2], "type": row[3],
                          "start": int(row[4]), "increment": int(row[5]), "min": int(row[6]), "max": int(row[7]),
                          "cache": int(row[8]), "cycle": bool(row[9]),
                          "owner": "identity" if row[10] == "i" else "serial"})
    constraints = []
    for name, contype, definition, cols, ref_table, ref_schema, ref_cols, deltype, updtype, match, deferrable, \
            deferred, plain in q("""
            SELECT c.conname, c.contype, pg_get_constraintdef(c.oid),
                   ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
                   rc.relname, rn.nspname,
                   ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                         JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o),
                   c.confdeltype, c.confupdtype, c.confmatchtype, c.condeferrable, c.condeferred,
                   pg_get_constraintdef(c.oid) = 'UNIQUE (' || array_to_string(ARRAY(
                       SELECT quote_ident(a.attname) FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o), ', ') || ')'
            FROM pg_constraint c
            LEFT JOIN pg_class rc ON rc.oid = c.confrelid
            LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
            WHERE c.conrelid = %(t)s::regclass AND c.contype IN ('c', 'u', 'x', 'f')
            ORDER BY c.conname""", t):
        con = {"name": name, "type": _PG_CONTYPES[contype], "columns": list(cols or []), "definition": definition}
        if contype == "u":
            con["plain"] = bool(plain)
        if contype == "f":
            con["references"] = {"schema": ref_schema, "table": ref_table, "columns": list(ref_cols or [])}
            con.update(on_delete=_FK_ACTIONS.get(deltype, "NO ACTION"), on_update=_FK_ACTIONS.get(updtype, "NO ACTION"),
                       match_full=match == "f", deferrable=bool(deferrable), deferred=bool(deferred))
        constraints.append(con)
    indexes = []
    for name, definition, method, unique, partial, exprs, nkey, natts, cols, opclasses, options in q("""
            SELECT ic.relname, pg_get_indexdef(i.indexrelid), am.amname, i.indisunique, i.indpred IS NOT NULL,
                   i.indexprs IS NOT NULL, i.indnkeyatts, i.indnatts,
                   ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o),
                   ARRAY(SELECT oc.opcdefault FROM unnest(i.indclass::oid[]) WITH ORDINALITY k(c, o)
                         JOIN pg_opclass oc ON oc.oid = k.c ORDER BY k.o),
                   i.indoption::int2[]
            FROM pg_index i
            JOIN pg_class ic ON ic.oid = i.indexrelid
            JOIN pg_am am ON am.oid = ic.relam
            WHERE i.indrelid = %(t)s::regclass
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid)
            ORDER BY ic.relname""", t):
        plain = (not partial and not exprs and nkey == natts and len(cols or []) == natts
                 and all(opclasses or []) and not any(options or []))
        if relkind == "p":
            # a partitioned table's index is shown "ON ONLY" the parent (pg_dump attaches the
            # partitions' indexes one by one); created without ONLY, it is made on every partition
            definition = definition.replace(" ON ONLY ", " ON ", 1)
        indexes.append({"name": name, "method": method, "unique": bool(unique), "partial": bool(partial),
                        "columns": list(cols) if plain else None, "definition": definition})
    triggers = [{"name": r[0], "definition": r[1], "enabled": r[2]} for r in q("""
            SELECT tgname, pg_get_triggerdef(oid), tgenabled FROM pg_trigger
            WHERE tgrelid = %(t)s::regclass AND NOT tgisinternal AND tgparentid = 0 ORDER BY tgname""", t)]
    doc = {"dialect": "postgresql", "columns": [c for c in columns if c["default"] or c["identity"] or c["generated"]],
           "sequences": sequences, "constraints": constraints, "indexes": indexes, "triggers": triggers,
           "partitioning": _pg_partitioning(conn, t["t"]) if relkind == "p" else None}
    return doc


def _pg_partitioning(conn: Connection, name: str) -> dict:
    q = conn.exec_driver_sql
    key = q("SELECT pg_get_partkeydef(%(t)s::regclass)", {"t": name}).scalar()
    parts = []
    for pname, pschema, bound, relkind, qualified_name in q("""
            SELECT c.relname, n.nspname, pg_get_expr(c.relpartbound, c.oid), c.relkind,
                   quote_ident(n.nspname) || '.' || quote_ident(c.relname)
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE i.inhparent = %(t)s::regclass ORDER BY c.relname""", {"t": name}).fetchall():
        parts.append({"name": pname, "schema": pschema, "bound": bound,
                      "partitioning": _pg_partitioning(conn, qualified_name) if relkind == "p" else None})
    return {"key": key, "partitions": parts}


def _my_capture(conn: Connection, table: str, schema: str | None) -> dict:
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


def _sqlite_capture(conn: Connection, table: str, schema: str | None) -> dict:
    q = conn.exec_driver_sql
    prefix = f"{_qi(conn, schema)}." if schema else ""
    rows = q(f"SELECT type, name, sql FROM {prefix}sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
             f"ORDER BY type, name", (table,)).fetchall()
    create = next((r[2] for r in rows if r[0] == "table" and r[1] == table), None)
    qt = _qi(conn, table)
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
        cols = [r[2] for r in q(f"PRAGMA {prefix}index_xinfo({_qi(conn, iname)})").fetchall() if r[5]]
        plain = not partial and all(c is not None for c in cols)
        indexes.append({"name": iname, "unique": bool(unique), "origin": origin, "partial": bool(partial),
                        "columns": cols if plain else None, "definition": index_sql.get(iname)})
    fks: dict[int, dict] = {}
    for fid, seq, ref, frm, to, on_update, on_delete, match in q(f"PRAGMA {prefix}foreign_key_list({qt})").fetchall():
        fk = fks.setdefault(fid, {"table": ref, "columns": [], "ref_columns": [], "on_delete": on_delete,
                                  "on_update": on_update})
        fk["columns"].append(frm)
        fk["ref_columns"].append(to)
    return {"dialect": "sqlite", "create_table": create,
            "autoincrement": bool(create and re.search(r"\bAUTOINCREMENT\b", create, re.I)),
            "defaults": defaults, "generated": generated,
            "checks": bool(create and re.search(r"\bCHECK\b", create, re.I)),
            "indexes": sorted(indexes, key=lambda i: i["name"]),
            "foreign_keys": [fks[k] for k in sorted(fks)],
            "triggers": [{"name": r[1], "definition": r[2]} for r in rows if r[0] == "trigger"]}


# -- type names -----------------------------------------------------------------------

_PG_TYPE_TEXT = re.compile(r'^[A-Za-z0-9_ ."(),\[\]]{1,200}$')
_PG_TYPE_ARGS = re.compile(r"\(([^()]*)\)")
_PG_TYPE_ARG = re.compile(r"^(?:-?\d+|[A-Za-z_][A-Za-z0-9_]*)$")


def _pg_type(conn: Connection, text: str) -> str | None:
    """PostgreSQL's canonical text of a stored type name, resolved by the server with the
    text as a bind parameter; None when it names no type."""
    if not isinstance(text, str) or not _PG_TYPE_TEXT.match(text) or text.count("(") > 1:
        return None
    q = conn.exec_driver_sql
    q("SAVEPOINT snapshotter_type")
    try:
        oid = q("SELECT to_regtype(%(t)s)::oid", {"t": text}).scalar()
        if oid is None:
            return None
        m = _PG_TYPE_ARGS.search(text)
        typmod = None
        if m:
            args = [a.strip() for a in m.group(1).split(",")]
            if not all(_PG_TYPE_ARG.match(a) for a in args):
                return None
            fn = q("""SELECT quote_ident(n.nspname) || '.' || quote_ident(p.proname)
                      FROM pg_type t JOIN pg_type e ON e.oid = CASE WHEN t.typelem <> 0 AND t.typlen = -1
                                                                    THEN t.typelem ELSE t.oid END
                      JOIN pg_proc p ON p.oid = e.typmodin JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE t.oid = %(o)s""", {"o": oid}).scalar()
            if fn is None:
                return None
            typmod = q(f"SELECT {fn}(%(a)s::cstring[])", {"a": args}).scalar()
        return q("SELECT format_type(%(o)s, %(m)s)", {"o": oid, "m": typmod}).scalar()
    except sa.exc.DBAPIError:
        q("ROLLBACK TO SAVEPOINT snapshotter_type")
        return None
    finally:
        q("RELEASE SAVEPOINT snapshotter_type")


_MY_TYPE_NAMES = frozenset("""
    TINYINT SMALLINT MEDIUMINT INT INTEGER BIGINT DECIMAL DEC NUMERIC FIXED FLOAT DOUBLE REAL BIT BOOL BOOLEAN
    SERIAL DATE DATETIME TIMESTAMP TIME YEAR CHAR VARCHAR NCHAR NVARCHAR BINARY VARBINARY TINYBLOB BLOB
    MEDIUMBLOB LONGBLOB TINYTEXT TEXT MEDIUMTEXT LONGTEXT ENUM SET JSON UUID INET4 INET6 GEOMETRY POINT
    LINESTRING POLYGON MULTIPOINT MULTILINESTRING MULTIPOLYGON GEOMETRYCOLLECTION VECTOR""".split())
_MY_STRING = r"'(?:[^'\\]|'')*'"
_MY_TYPE = re.compile(
    r"^(?P<name>[A-Za-z0-9]+)(?: (?:PRECISION|VARYING))?"
    rf"(?:\((?:\d+(?:, ?\d+)?|{_MY_STRING}(?:, ?{_MY_STRING})*)\))?"
    r"(?: (?:UNSIGNED|ZEROFILL|BINARY|CHARACTER SET [A-Za-z0-9_]+|COLLATE [A-Za-z0-9_]+))*$", re.I)
_SQLITE_TYPE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*(?: [A-Za-z_][A-Za-z0-9_]*)*"
                          r"(?: ?\( ?[+-]?\d+(?:\.\d+)? ?(?:, ?[+-]?\d+(?:\.\d+)? ?)?\))?)?$")


def checked_type(conn: Connection, text: Any, where: str) -> str:
    """The type text to put in DDL for a stored type name, or IntegrityError naming ``where``."""
    d = dialect(conn)
    out = None
    if isinstance(text, str):
        if d == "postgresql":
            out = _pg_type(conn, text)
        elif d in ("mysql", "mariadb"):
            m = _MY_TYPE.match(text)
            out = text if m and m.group("name").upper() in _MY_TYPE_NAMES else None
        elif d == "sqlite":
            out = text if _SQLITE_TYPE.match(text) else None
    if out is None:
        shown = text if isinstance(text, str) and len(text) <= 80 else (repr(text)[:80] + "...")
        raise IntegrityError(f"{where}: the repository gives type {shown!r}, which is not a type name this "
                             f"database knows; the repository may have been tampered with; nothing was written")
    return out


def check_types(conn: Connection, schema_doc: dict, where: str) -> dict[str, str]:
    cols = schema_doc.get("columns")
    if not isinstance(cols, list) or not cols:
        raise IntegrityError(f"{where}: the repository holds no column list for the table; nothing was written")
    return {c.get("name"): checked_type(conn, c.get("type"), f"{where}: column {c.get('name')!r}") for c in cols}


# -- what is recreated, and what is not ------------------------------------------------

_PG_SEQ_TYPES = {"smallint", "integer", "bigint"}
_PG_LITERAL_DEFAULT = re.compile(r"^(?:-?\d+(?:\.\d+)?|true|false|NULL)$")


def _pg_default_is_structured(col: dict) -> bool:
    return isinstance(col.get("default"), str) and bool(_PG_LITERAL_DEFAULT.match(col["default"]))


def _serial_of(ddl: dict) -> dict[str, dict]:
    return {s["column"]: s for s in ddl.get("sequences", []) if s.get("owner") == "serial"}


def _pg_serial_default(col: dict, seq: dict | None) -> bool:
    return seq is not None and isinstance(col.get("default"), str) and col["default"].startswith("nextval(")


def omissions(schema_doc: dict, trusted: bool) -> list[str]:
    """What recreating this table leaves out: without trust every part that is SQL text."""
    ddl = schema_doc.get("ddl")
    if not isinstance(ddl, dict):
        return []
    out: list[str] = []
    kind = ddl.get("dialect")
    if kind == "postgresql":
        serial = _serial_of(ddl)
        for col in ddl.get("columns", []):
            if trusted:
                continue
            if col.get("default") and not _pg_serial_default(col, serial.get(col["name"])) \
                    and not _pg_default_is_structured(col):
                out.append(f"default of column {col['name']}")
            if col.get("generated"):
                out.append(f"generated expression of column {col['name']}")
        for con in ddl.get("constraints", []):
            if con["type"] == "foreign key" or trusted or (con["type"] == "unique" and con.get("plain")):
                continue
            out.append(f"{con['type']} constraint {con['name']}")
        for ix in ddl.get("indexes", []):
            if not trusted and not ix.get("columns"):
                out.append(f"index {ix['name']} ({ix.get('method')}{', partial' if ix.get('partial') else ''}"
                           f"{', expression' if ix.get('columns') is None and not ix.get('partial') else ''})")
        if not trusted:
            out += [f"trigger {tg['name']}" for tg in ddl.get("triggers", [])]
            part = ddl.get("partitioning")
            if part:
                out.append(f"partitioning {part.get('key')} with {len(part.get('partitions', []))} partition(s) "
                           f"(recreated as one plain table)")
    elif kind == "mysql" and trusted:
        # every DDL statement commits on MariaDB/MySQL: no trigger is made inside the restore
        out += [f"trigger {tg['name']} (MariaDB/MySQL would commit the restore's transaction)"
                for tg in ddl.get("triggers", [])]
    elif kind == "mysql" and not trusted:
        out += [f"default of column {c['name']}" for c in ddl.get("columns", []) if c.get("default") is not None]
        out += [f"generated expression of column {c['name']}" for c in ddl.get("columns", []) if c.get("generated")]
        out += [f"check constraint {c['name']}" for c in ddl.get("checks", [])]
        out += [f"foreign key {f['name']}" for f in ddl.get("foreign_keys", [])]
        out += [f"index {ix['name']} ({ix.get('method')})" for ix in ddl.get("indexes", []) if ix.get("columns") is None]
        out += [f"trigger {tg['name']}" for tg in ddl.get("triggers", [])]
    elif kind == "sqlite" and not trusted:
        out += [f"default of column {c}" for c in ddl.get("defaults", [])]
        out += [f"generated expression of column {c}" for c in ddl.get("generated", [])]
        if ddl.get("checks"):
            out.append("check constraints")
        out += [f"index {ix['name']} ({'partial' if ix.get('partial') else 'expression'})"
                for ix in ddl.get("indexes", []) if ix.get("columns") is None]
        out += [f"trigger {tg['name']}" for tg in ddl.get("triggers", [])]
    return out


# -- recreate ---------------------------------------------------------------------------

def create_table(conn: Connection, schema_doc: dict, *, trusted: bool, where: str) -> None:
    """Create the table (columns, types, defaults, identity, generated columns, primary key,
    CHECK/UNIQUE constraints, indexes), without foreign keys and triggers (:func:`finish`)."""
    types = check_types(conn, schema_doc, where)
    ddl = schema_doc.get("ddl")
    d = dialect(conn)
    if isinstance(ddl, dict) and ddl.get("dialect") != ("mysql" if d == "mariadb" else d):
        ddl = None  # captured from another kind of database: its columns and keys only
    if not isinstance(ddl, dict):
        _create_structured(conn, schema_doc, types)
        for idx in schema_doc.get("indexes", []):
            _create_index(conn, schema_doc, idx["name"], idx["columns"], idx["unique"])
        return
    if d == "postgresql" and ddl.get("dialect") == "postgresql":
        _pg_create(conn, schema_doc, ddl, types, trusted, where)
    elif d in ("mysql", "mariadb") and ddl.get("dialect") == "mysql":
        _my_create(conn, schema_doc, ddl, types, trusted)
    elif d == "sqlite" and ddl.get("dialect") == "sqlite":
        _sqlite_create(conn, schema_doc, ddl, types, trusted)


def _name(conn: Connection, schema_doc: dict) -> str:
    return qualified(conn, schema_doc["table"], schema_doc.get("db_schema"))


def _create_structured(conn: Connection, schema_doc: dict, types: dict[str, str], extra: dict | None = None,
                       tail: list[str] | None = None, suffix: str = "") -> None:
    extra = extra or {}
    parts = []
    for c in schema_doc["columns"]:
        parts.append(f"{_qi(conn, c['name'])} {types[c['name']]}{extra.get(c['name'], '')}"
                     f"{'' if c.get('nullable', True) else ' NOT NULL'}")
    if schema_doc.get("primary_key"):
        parts.append(f"PRIMARY KEY ({', '.join(_qi(conn, k) for k in schema_doc['primary_key'])})")
    parts += tail or []
    conn.exec_driver_sql(f"CREATE TABLE {_name(conn, schema_doc)} ({', '.join(parts)}){suffix}")


def _create_index(conn: Connection, schema_doc: dict, name: str, columns: list, unique: bool,
                  method: str | None = None, prefixes: list | None = None) -> None:
    cols = []
    for i, c in enumerate(columns):
        p = (prefixes or [None] * len(columns))[i]
        cols.append(_qi(conn, c) + (f"({_int(p, 'index prefix length')})" if p is not None else ""))
    using = f" USING {_qi(conn, method)}" if method else ""
    conn.exec_driver_sql(f"CREATE {'UNIQUE ' if unique else ''}INDEX {_qi(conn, name)} ON "
                         f"{_name(conn, schema_doc)}{using} ({', '.join(cols)})")


def _pg_literal(text: str) -> str:
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _pg_seq_options(seq: dict) -> str:
    return (f"START WITH {_int(seq['start'], 'sequence start')} INCREMENT BY {_int(seq['increment'], 'increment')} "
            f"MINVALUE {_int(seq['min'], 'sequence minimum')} MAXVALUE {_int(seq['max'], 'sequence maximum')} "
            f"CACHE {_int(seq['cache'], 'sequence cache')} {'CYCLE' if seq.get('cycle') is True else 'NO CYCLE'}")


def _pg_create(conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str], trusted: bool,
               where: str) -> None:
    q = conn.exec_driver_sql
    name = _name(conn, schema_doc)
    cols = {c["name"]: c for c in ddl.get("columns", [])}
    seqs = {s["column"]: s for s in ddl.get("sequences", [])}
    extra: dict[str, str] = {}
    for cname in types:
        col, seq = cols.get(cname, {}), seqs.get(cname)
        clause = ""
        if col.get("identity") in ("always", "by default") and seq is not None:
            clause += (f" GENERATED {'ALWAYS' if col['identity'] == 'always' else 'BY DEFAULT'} AS IDENTITY "
                       f"(SEQUENCE NAME {qualified(conn, seq['name'], seq.get('schema'))} {_pg_seq_options(seq)})")
        elif _pg_serial_default(col, seq):
            if seq.get("type") not in _PG_SEQ_TYPES:
                raise IntegrityError(f"{where}: sequence type {seq.get('type')!r} is not an integer type")
            seq_name = qualified(conn, seq["name"], seq.get("schema"))
            q(f"CREATE SEQUENCE IF NOT EXISTS {seq_name} AS {seq['type']} {_pg_seq_options(seq)}")
            clause += f" DEFAULT nextval({_pg_literal(seq_name)}::regclass)"
        elif col.get("generated") and trusted:
            clause += f" GENERATED ALWAYS AS ({col['generated']}) STORED"
        elif col.get("default") and (trusted or _pg_default_is_structured(col)):
            clause += f" DEFAULT {col['default']}"
        if clause:
            extra[cname] = clause
    tail = []
    for con in ddl.get("constraints", []):
        if con["type"] == "foreign key":
            continue
        if trusted:
            tail.append(f"CONSTRAINT {_qi(conn, con['name'])} {con['definition']}")
        elif con["type"] == "unique" and con.get("plain") and con.get("columns"):
            tail.append(f"CONSTRAINT {_qi(conn, con['name'])} UNIQUE "
                        f"({', '.join(_qi(conn, c) for c in con['columns'])})")
    part = ddl.get("partitioning") if trusted else None
    _create_structured(conn, schema_doc, types, extra, tail, f" PARTITION BY {part['key']}" if part else "")
    for cname, seq in seqs.items():
        if seq.get("owner") == "serial" and cname in extra and "nextval(" in extra[cname]:
            q(f"ALTER SEQUENCE {qualified(conn, seq['name'], seq.get('schema'))} OWNED BY {name}.{_qi(conn, cname)}")
    if part:
        _pg_create_partitions(conn, name, part)
    for ix in ddl.get("indexes", []):
        if trusted:
            q(ix["definition"])
        elif ix.get("columns"):
            if q("SELECT 1 FROM pg_am WHERE amname = %(m)s AND amtype = 'i'", {"m": ix.get("method")}).scalar() is None:
                raise IntegrityError(f"{where}: index {ix['name']}: the repository gives access method "
                                     f"{ix.get('method')!r}, which this database does not have; nothing was written")
            _create_index(conn, schema_doc, ix["name"], ix["columns"], bool(ix.get("unique")), ix["method"])


def _pg_create_partitions(conn: Connection, parent: str, part: dict) -> None:
    for p in part.get("partitions", []):
        pname = qualified(conn, p["name"], p.get("schema"))
        sub = p.get("partitioning")
        conn.exec_driver_sql(f"CREATE TABLE {pname} PARTITION OF {parent} {p['bound']}"
                             f"{' PARTITION BY ' + sub['key'] if sub else ''}")
        if sub:
            _pg_create_partitions(conn, pname, sub)


_MY_INDEX_KINDS = {"BTREE": "", "HASH": "", "FULLTEXT": "FULLTEXT ", "SPATIAL": "SPATIAL "}
_MY_WORD = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_MY_FK_LINE = re.compile(r"^\s*CONSTRAINT .* FOREIGN KEY .*$", re.M)


def _my_create(conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str], trusted: bool) -> None:
    if trusted:
        # SHOW CREATE TABLE as it was, foreign keys included: on MariaDB/MySQL every DDL
        # statement commits the transaction, so none is added after the rows are written
        conn.exec_driver_sql(ddl["create_table"])
        return
    auto = ddl.get("auto_increment")
    extra = {auto: " AUTO_INCREMENT"} if auto in types else {}
    tail = []
    for ix in ddl.get("indexes", []):
        if ix.get("columns") is None or str(ix.get("method")).upper() not in _MY_INDEX_KINDS:
            continue
        kind = "UNIQUE " if ix.get("unique") else _MY_INDEX_KINDS[str(ix["method"]).upper()]
        cols = ", ".join(_qi(conn, c) + (f"({_int(p, 'index prefix length')})" if p is not None else "")
                         for c, p in zip(ix["columns"], ix.get("prefixes") or [None] * len(ix["columns"])))
        tail.append(f"{kind}INDEX {_qi(conn, ix['name'])} ({cols})")
    options = ""
    for key, word in (("engine", "ENGINE"), ("charset", "DEFAULT CHARSET"), ("collation", "COLLATE")):
        value = ddl.get(key)
        if isinstance(value, str) and _MY_WORD.match(value):
            options += f" {word}={value}"
    _create_structured(conn, schema_doc, types, extra, tail, options)


def _sqlite_create(conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str], trusted: bool) -> None:
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
            tail.append(f"UNIQUE ({', '.join(_qi(conn, c) for c in ix['columns'])})")
    for fk in ddl.get("foreign_keys", []):
        actions = "".join(f" ON {w} {fk[k]}" for k, w in (("on_delete", "DELETE"), ("on_update", "UPDATE"))
                          if fk.get(k) in ("CASCADE", "RESTRICT", "SET NULL", "SET DEFAULT"))
        ref_cols = [c for c in fk.get("ref_columns", []) if c is not None]
        tail.append(f"FOREIGN KEY ({', '.join(_qi(conn, c) for c in fk['columns'])}) REFERENCES "
                    f"{_qi(conn, fk['table'])}{' (' + ', '.join(_qi(conn, c) for c in ref_cols) + ')' if ref_cols else ''}"
                    f"{actions}")
    _create_structured(conn, doc, types, extra, tail)
    for ix in ddl.get("indexes", []):
        if ix.get("origin") == "c" and ix.get("columns"):
            _create_index(conn, schema_doc, ix["name"], ix["columns"], bool(ix.get("unique")))


# -- after the rows: foreign keys, triggers, sequences, the check ---------------------

def finish(conn: Connection, schema_doc: dict, *, trusted: bool, where: str) -> None:
    ddl = schema_doc.get("ddl")
    d = dialect(conn)
    if not isinstance(ddl, dict) or ddl.get("dialect") != ("mysql" if d == "mariadb" else d):
        return
    name = _name(conn, schema_doc)
    if d == "postgresql":
        for con in ddl.get("constraints", []):
            if con["type"] != "foreign key":
                continue
            if trusted:
                body = con["definition"]
            else:
                ref = con["references"]
                body = (f"FOREIGN KEY ({', '.join(_qi(conn, c) for c in con['columns'])}) REFERENCES "
                        f"{qualified(conn, ref['table'], ref.get('schema'))} "
                        f"({', '.join(_qi(conn, c) for c in ref['columns'])})"
                        f"{' MATCH FULL' if con.get('match_full') is True else ''}")
                for key, word in (("on_update", "UPDATE"), ("on_delete", "DELETE")):
                    if con.get(key) not in _FK_ACTIONS.values():
                        raise IntegrityError(f"{where}: foreign key {con['name']}: unknown action {con.get(key)!r}")
                    body += f" ON {word} {con[key]}"
                if con.get("deferrable") is True:
                    body += " DEFERRABLE" + (" INITIALLY DEFERRED" if con.get("deferred") is True else "")
            conn.exec_driver_sql(f"ALTER TABLE {name} ADD CONSTRAINT {_qi(conn, con['name'])} {body}")
        if trusted:
            for tg in ddl.get("triggers", []):
                conn.exec_driver_sql(tg["definition"])
                if tg.get("enabled") == "D":
                    conn.exec_driver_sql(f"ALTER TABLE {name} DISABLE TRIGGER {_qi(conn, tg['name'])}")
        for seq in ddl.get("sequences", []):
            col = _qi(conn, seq["column"])
            seq_name = conn.exec_driver_sql("SELECT pg_get_serial_sequence(%(t)s, %(c)s)",
                                            {"t": name, "c": seq["column"]}).scalar()
            if seq_name is None:
                continue
            top = conn.exec_driver_sql(f"SELECT max({col}) FROM {name}").scalar()
            if top is not None:
                conn.exec_driver_sql("SELECT setval(%(s)s::regclass, %(v)s, true)", {"s": seq_name, "v": top})
    elif d == "sqlite" and trusted:
        for tg in ddl.get("triggers", []):
            conn.exec_driver_sql(tg["definition"])
    elif d in ("mysql", "mariadb") and trusted:
        # MariaDB/MySQL: CREATE TRIGGER would commit the restore's transaction before it is
        # verified; the triggers come back when the table is recreated with the repository trusted
        pass
    _check(conn, schema_doc, trusted, where)


def _check(conn: Connection, schema_doc: dict, trusted: bool, where: str) -> None:
    """The recreated table against the stored definition (what was recreated of it)."""
    from . import base
    live = base.table_schema(conn, schema_doc["table"], schema_doc.get("db_schema"))
    diffs = base.schema_differences(schema_doc, live)
    diffs += differences(schema_doc.get("ddl"), live.get("ddl"), trusted, dialect(conn))
    if diffs:
        raise IntegrityError(f"{where}: the recreated table {schema_doc['table']} differs from its stored definition: "
                             + "; ".join(diffs[:5]) + " (rolled back)")


def _items(ddl: dict, trusted: bool) -> dict[str, Any]:
    """The parts of a definition that a recreate puts back, by name."""
    out: dict[str, Any] = {}
    kind = ddl.get("dialect")
    if kind == "postgresql":
        serial = _serial_of(ddl)
        for col in ddl.get("columns", []):
            n = col["name"]
            if col.get("identity"):
                out[f"identity of column {n}"] = col["identity"]
            if col.get("default") and (trusted or _pg_serial_default(col, serial.get(n))
                                       or _pg_default_is_structured(col)):
                out[f"default of column {n}"] = col["default"]
            if col.get("generated") and trusted:
                out[f"generated expression of column {n}"] = col["generated"]
        for s in ddl.get("sequences", []):
            out[f"sequence of column {s['column']}"] = {k: s.get(k) for k in
                                                        ("name", "type", "start", "increment", "min", "max",
                                                         "cache", "cycle", "owner")}
        for con in ddl.get("constraints", []):
            if trusted or con["type"] == "foreign key" or (con["type"] == "unique" and con.get("plain")):
                out[f"{con['type']} constraint {con['name']}"] = con["definition"]
        for ix in ddl.get("indexes", []):
            if trusted or ix.get("columns"):
                out[f"index {ix['name']}"] = ix["definition"]
        if trusted:
            for tg in ddl.get("triggers", []):
                out[f"trigger {tg['name']}"] = [tg["definition"], tg.get("enabled")]
            if ddl.get("partitioning"):
                out["partitioning"] = ddl["partitioning"]
    elif kind == "mysql":
        if trusted:
            out["table definition"] = re.sub(r" AUTO_INCREMENT=\d+", "", ddl.get("create_table") or "")
        else:
            out["auto_increment column"] = ddl.get("auto_increment")
            for ix in ddl.get("indexes", []):
                if ix.get("columns") is not None:
                    out[f"index {ix['name']}"] = [ix.get("method"), ix.get("unique"), ix["columns"], ix.get("prefixes")]
    elif kind == "sqlite":
        if trusted:
            out["table definition"] = ddl.get("create_table")
            for ix in ddl.get("indexes", []):
                out[f"index {ix['name']}"] = ix.get("definition") if ix.get("origin") == "c" else ix.get("columns")
            for tg in ddl.get("triggers", []):
                out[f"trigger {tg['name']}"] = tg["definition"]
        else:
            out["autoincrement"] = ddl.get("autoincrement")
            for ix in ddl.get("indexes", []):
                if ix.get("columns"):
                    out[f"index on ({', '.join(ix['columns'])})"] = [ix.get("unique"), ix.get("origin")]
    return out


def differences(stored: Any, live: Any, trusted: bool, dialect_name: str) -> list[str]:
    if not isinstance(stored, dict):
        return []
    if not isinstance(live, dict):
        return ["the live table's definition cannot be read"]
    want, got = _items(stored, trusted), _items(live, trusted)
    out = []
    for key, value in want.items():
        if key not in got:
            out.append(f"{key} missing")
        elif got[key] != value:
            out.append(f"{key} is {_short(got[key])} (stored: {_short(value)})")
    for key in got:
        if key not in want:
            out.append(f"{key} is not in the stored definition")
    return out


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


