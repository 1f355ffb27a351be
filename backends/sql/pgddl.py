"""PostgreSQL table definitions (:mod:`.ddl`): what the catalog says a table is (columns'
defaults, identity and serial sequences, constraints, indexes, triggers, partitioning), type
names resolved by the server, and a dropped table recreated from them: created before its
rows, its foreign keys, triggers and sequence positions after them.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from snapshotter.errors import IntegrityError

from .. import lazy_module
from .ddl import create_index, create_structured, integer, qualified, qualified_table, quoted

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

sa = lazy_module("sqlalchemy")

FK_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
_CONTYPES = {"c": "check", "u": "unique", "x": "exclude", "f": "foreign key"}


# -- capture ------------------------------------------------------------------------

def capture(conn: Connection, table: str, schema: str | None) -> dict:
    """The table's definition from the catalog (``pg_get_expr``, ``pg_get_constraintdef``,
    ``pg_get_indexdef``, ``pg_get_triggerdef``, as pg_dump replays them)."""
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
        con = {"name": name, "type": _CONTYPES[contype], "columns": list(cols or []), "definition": definition}
        if contype == "u":
            con["plain"] = bool(plain)
        if contype == "f":
            con["references"] = {"schema": ref_schema, "table": ref_table, "columns": list(ref_cols or [])}
            con.update(on_delete=FK_ACTIONS.get(deltype, "NO ACTION"), on_update=FK_ACTIONS.get(updtype, "NO ACTION"),
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
           "partitioning": _partitioning(conn, t["t"]) if relkind == "p" else None}
    return doc


def _partitioning(conn: Connection, name: str) -> dict:
    q = conn.exec_driver_sql
    key = q("SELECT pg_get_partkeydef(%(t)s::regclass)", {"t": name}).scalar()
    parts = []
    for pname, pschema, bound, relkind, qualified_name in q("""
            SELECT c.relname, n.nspname, pg_get_expr(c.relpartbound, c.oid), c.relkind,
                   quote_ident(n.nspname) || '.' || quote_ident(c.relname)
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE i.inhparent = %(t)s::regclass ORDER BY c.relname""", {"t": name}).fetchall():
        parts.append({"name": pname, "schema": pschema, "bound": bound,
                      "partitioning": _partitioning(conn, qualified_name) if relkind == "p" else None})
    return {"key": key, "partitions": parts}


# -- type names -----------------------------------------------------------------------

_TYPE_TEXT = re.compile(r'^[A-Za-z0-9_ ."(),\[\]]{1,200}$')
_TYPE_ARGS = re.compile(r"\(([^()]*)\)")
_TYPE_ARG = re.compile(r"^(?:-?\d+|[A-Za-z_][A-Za-z0-9_]*)$")


def canonical_type(conn: Connection, text: str) -> str | None:
    """PostgreSQL's canonical text of a stored type name, resolved by the server with the
    text as a bind parameter; None when it names no type."""
    if not isinstance(text, str) or not _TYPE_TEXT.match(text) or text.count("(") > 1:
        return None
    q = conn.exec_driver_sql
    q("SAVEPOINT snapshotter_type")
    try:
        oid = q("SELECT to_regtype(%(t)s)::oid", {"t": text}).scalar()
        if oid is None:
            return None
        m = _TYPE_ARGS.search(text)
        typmod = None
        if m:
            args = [a.strip() for a in m.group(1).split(",")]
            if not all(_TYPE_ARG.match(a) for a in args):
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


# -- what is recreated, and what is not ------------------------------------------------

_SEQ_TYPES = {"smallint", "integer", "bigint"}
_LITERAL_DEFAULT = re.compile(r"^(?:-?\d+(?:\.\d+)?|true|false|NULL)$")


def _default_is_structured(col: dict) -> bool:
    return isinstance(col.get("default"), str) and bool(_LITERAL_DEFAULT.match(col["default"]))


def _serial_of(ddl: dict) -> dict[str, dict]:
    return {s["column"]: s for s in ddl.get("sequences", []) if s.get("owner") == "serial"}


def _serial_default(col: dict, seq: dict | None) -> bool:
    return seq is not None and isinstance(col.get("default"), str) and col["default"].startswith("nextval(")


def omissions(ddl: dict, trusted: bool) -> list[str]:
    """Without trust every part that is SQL text: defaults that are not literals or serials,
    generated expressions, constraints other than plain UNIQUE ones, indexes other than plain
    ones, triggers, partitioning."""
    out: list[str] = []
    serial = _serial_of(ddl)
    for col in ddl.get("columns", []):
        if trusted:
            continue
        if col.get("default") and not _serial_default(col, serial.get(col["name"])) \
                and not _default_is_structured(col):
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
    return out


def items(ddl: dict, trusted: bool) -> dict[str, Any]:
    """The parts a recreate puts back, by name (compared with the recreated table's)."""
    out: dict[str, Any] = {}
    serial = _serial_of(ddl)
    for col in ddl.get("columns", []):
        n = col["name"]
        if col.get("identity"):
            out[f"identity of column {n}"] = col["identity"]
        if col.get("default") and (trusted or _serial_default(col, serial.get(n))
                                   or _default_is_structured(col)):
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
    return out


# -- recreate ---------------------------------------------------------------------------

def _literal(text: str) -> str:
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _seq_options(seq: dict) -> str:
    return (f"START WITH {integer(seq['start'], 'sequence start')} "
            f"INCREMENT BY {integer(seq['increment'], 'increment')} "
            f"MINVALUE {integer(seq['min'], 'sequence minimum')} MAXVALUE {integer(seq['max'], 'sequence maximum')} "
            f"CACHE {integer(seq['cache'], 'sequence cache')} {'CYCLE' if seq.get('cycle') is True else 'NO CYCLE'}")


def create(conn: Connection, schema_doc: dict, ddl: dict, types: dict[str, str], trusted: bool,
           where: str) -> None:
    """Columns with their identity, serial sequence, generated expression or default, the
    primary key, constraints and indexes; partitions when trusted."""
    q = conn.exec_driver_sql
    name = qualified_table(conn, schema_doc)
    cols = {c["name"]: c for c in ddl.get("columns", [])}
    seqs = {s["column"]: s for s in ddl.get("sequences", [])}
    extra: dict[str, str] = {}
    for cname in types:
        col, seq = cols.get(cname, {}), seqs.get(cname)
        clause = ""
        if col.get("identity") in ("always", "by default") and seq is not None:
            clause += (f" GENERATED {'ALWAYS' if col['identity'] == 'always' else 'BY DEFAULT'} AS IDENTITY "
                       f"(SEQUENCE NAME {qualified(conn, seq['name'], seq.get('schema'))} {_seq_options(seq)})")
        elif _serial_default(col, seq):
            if seq.get("type") not in _SEQ_TYPES:
                raise IntegrityError(f"{where}: sequence type {seq.get('type')!r} is not an integer type")
            seq_name = qualified(conn, seq["name"], seq.get("schema"))
            q(f"CREATE SEQUENCE IF NOT EXISTS {seq_name} AS {seq['type']} {_seq_options(seq)}")
            clause += f" DEFAULT nextval({_literal(seq_name)}::regclass)"
        elif col.get("generated") and trusted:
            clause += f" GENERATED ALWAYS AS ({col['generated']}) STORED"
        elif col.get("default") and (trusted or _default_is_structured(col)):
            clause += f" DEFAULT {col['default']}"
        if clause:
            extra[cname] = clause
    tail = []
    for con in ddl.get("constraints", []):
        if con["type"] == "foreign key":
            continue
        if trusted:
            tail.append(f"CONSTRAINT {quoted(conn, con['name'])} {con['definition']}")
        elif con["type"] == "unique" and con.get("plain") and con.get("columns"):
            tail.append(f"CONSTRAINT {quoted(conn, con['name'])} UNIQUE "
                        f"({', '.join(quoted(conn, c) for c in con['columns'])})")
    part = ddl.get("partitioning") if trusted else None
    create_structured(conn, schema_doc, types, extra, tail, f" PARTITION BY {part['key']}" if part else "")
    for cname, seq in seqs.items():
        if seq.get("owner") == "serial" and cname in extra and "nextval(" in extra[cname]:
            q(f"ALTER SEQUENCE {qualified(conn, seq['name'], seq.get('schema'))} OWNED BY {name}.{quoted(conn, cname)}")
    if part:
        _create_partitions(conn, name, part)
    for ix in ddl.get("indexes", []):
        if trusted:
            q(ix["definition"])
        elif ix.get("columns"):
            if q("SELECT 1 FROM pg_am WHERE amname = %(m)s AND amtype = 'i'", {"m": ix.get("method")}).scalar() is None:
                raise IntegrityError(f"{where}: index {ix['name']}: the repository gives access method "
                                     f"{ix.get('method')!r}, which this database does not have; nothing was written")
            create_index(conn, schema_doc, ix["name"], ix["columns"], bool(ix.get("unique")), ix["method"])


def _create_partitions(conn: Connection, parent: str, part: dict) -> None:
    for p in part.get("partitions", []):
        pname = qualified(conn, p["name"], p.get("schema"))
        sub = p.get("partitioning")
        conn.exec_driver_sql(f"CREATE TABLE {pname} PARTITION OF {parent} {p['bound']}"
                             f"{' PARTITION BY ' + sub['key'] if sub else ''}")
        if sub:
            _create_partitions(conn, pname, sub)


# -- after the rows ---------------------------------------------------------------------

def finish(conn: Connection, schema_doc: dict, ddl: dict, trusted: bool, where: str) -> None:
    """Foreign keys (from their structured parts unless trusted), triggers (trusted only), and
    each sequence set past the restored maximum."""
    name = qualified_table(conn, schema_doc)
    for con in ddl.get("constraints", []):
        if con["type"] != "foreign key":
            continue
        if trusted:
            body = con["definition"]
        else:
            ref = con["references"]
            body = (f"FOREIGN KEY ({', '.join(quoted(conn, c) for c in con['columns'])}) REFERENCES "
                    f"{qualified(conn, ref['table'], ref.get('schema'))} "
                    f"({', '.join(quoted(conn, c) for c in ref['columns'])})"
                    f"{' MATCH FULL' if con.get('match_full') is True else ''}")
            for key, word in (("on_update", "UPDATE"), ("on_delete", "DELETE")):
                if con.get(key) not in FK_ACTIONS.values():
                    raise IntegrityError(f"{where}: foreign key {con['name']}: unknown action {con.get(key)!r}")
                body += f" ON {word} {con[key]}"
            if con.get("deferrable") is True:
                body += " DEFERRABLE" + (" INITIALLY DEFERRED" if con.get("deferred") is True else "")
        conn.exec_driver_sql(f"ALTER TABLE {name} ADD CONSTRAINT {quoted(conn, con['name'])} {body}")
    if trusted:
        for tg in ddl.get("triggers", []):
            conn.exec_driver_sql(tg["definition"])
            if tg.get("enabled") == "D":
                conn.exec_driver_sql(f"ALTER TABLE {name} DISABLE TRIGGER {quoted(conn, tg['name'])}")
    for seq in ddl.get("sequences", []):
        col = quoted(conn, seq["column"])
        seq_name = conn.exec_driver_sql("SELECT pg_get_serial_sequence(%(t)s, %(c)s)",
                                        {"t": name, "c": seq["column"]}).scalar()
        if seq_name is None:
            continue
        top = conn.exec_driver_sql(f"SELECT max({col}) FROM {name}").scalar()
        if top is not None:
            conn.exec_driver_sql("SELECT setval(%(s)s::regclass, %(v)s, true)", {"s": seq_name, "v": top})
