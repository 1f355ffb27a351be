"""A table's full definition: captured from the database's own catalog, stored in the
stream schema's ``ddl`` part, and used to recreate a dropped table as it was.  This
module holds what every dialect shares (quoting, the type check, the recreate and the
check of what was recreated); what a definition holds and how it is replayed is the
dialect's (:class:`~.dialect.Dialect`, :mod:`.pgddl`, :mod:`.mysql`, :mod:`.sqlite`).

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

from typing import TYPE_CHECKING, Any

from snapshotter.errors import IntegrityError

from .dialect import named, of

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


def quoted(conn: Connection, name: str) -> str:
    """An identifier, always quoted (and its quote characters escaped) by the dialect."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise IntegrityError(f"the repository holds an invalid identifier {name!r}")
    return conn.dialect.identifier_preparer.quote_identifier(name)


def qualified(conn: Connection, table: str, schema: str | None) -> str:
    return f"{quoted(conn, schema)}.{quoted(conn, table)}" if schema else quoted(conn, table)


def qualified_table(conn: Connection, schema_doc: dict) -> str:
    return qualified(conn, schema_doc["table"], schema_doc.get("db_schema"))


def integer(value: Any, what: str) -> int:
    if type(value) is not int:
        raise IntegrityError(f"the repository holds a non-integer {what} ({value!r})")
    return value


# -- type names -----------------------------------------------------------------------

def checked_type(conn: Connection, text: Any, where: str) -> str:
    """The type text to put in DDL for a stored type name, or IntegrityError naming ``where``."""
    out = of(conn).checked_type(conn, text) if isinstance(text, str) else None
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

def omissions(schema_doc: dict, trusted: bool) -> list[str]:
    """What recreating this table leaves out: without trust every part that is SQL text."""
    ddl = schema_doc.get("ddl")
    if not isinstance(ddl, dict):
        return []
    return named(ddl.get("dialect")).omissions(ddl, trusted)


# -- recreate ---------------------------------------------------------------------------

def _own_definition(conn: Connection, schema_doc: dict) -> dict | None:
    """The stored definition, when this kind of database captured it (else its columns and
    keys are all a recreate uses)."""
    ddl = schema_doc.get("ddl")
    kind = of(conn).ddl_kind
    return ddl if isinstance(ddl, dict) and kind is not None and ddl.get("dialect") == kind else None


def create_table(conn: Connection, schema_doc: dict, *, trusted: bool, where: str) -> None:
    """Create the table (columns, types, defaults, identity, generated columns, primary key,
    CHECK/UNIQUE constraints, indexes), without foreign keys and triggers (:func:`finish`)."""
    types = check_types(conn, schema_doc, where)
    ddl = _own_definition(conn, schema_doc)
    if ddl is None:
        create_structured(conn, schema_doc, types)
        for idx in schema_doc.get("indexes", []):
            create_index(conn, schema_doc, idx["name"], idx["columns"], idx["unique"])
        return
    of(conn).create_from_definition(conn, schema_doc, ddl, types, trusted, where)


def create_structured(conn: Connection, schema_doc: dict, types: dict[str, str], extra: dict | None = None,
                      tail: list[str] | None = None, suffix: str = "") -> None:
    """``CREATE TABLE`` of the columns (each with its ``extra`` clause), the primary key and
    the ``tail`` clauses."""
    extra = extra or {}
    parts = []
    for c in schema_doc["columns"]:
        parts.append(f"{quoted(conn, c['name'])} {types[c['name']]}{extra.get(c['name'], '')}"
                     f"{'' if c.get('nullable', True) else ' NOT NULL'}")
    if schema_doc.get("primary_key"):
        parts.append(f"PRIMARY KEY ({', '.join(quoted(conn, k) for k in schema_doc['primary_key'])})")
    parts += tail or []
    conn.exec_driver_sql(f"CREATE TABLE {qualified_table(conn, schema_doc)} ({', '.join(parts)}){suffix}")


def create_index(conn: Connection, schema_doc: dict, name: str, columns: list, unique: bool,
                 method: str | None = None, prefixes: list | None = None) -> None:
    cols = []
    for i, c in enumerate(columns):
        p = (prefixes or [None] * len(columns))[i]
        cols.append(quoted(conn, c) + (f"({integer(p, 'index prefix length')})" if p is not None else ""))
    using = f" USING {quoted(conn, method)}" if method else ""
    conn.exec_driver_sql(f"CREATE {'UNIQUE ' if unique else ''}INDEX {quoted(conn, name)} ON "
                         f"{qualified_table(conn, schema_doc)}{using} ({', '.join(cols)})")


# -- after the rows: foreign keys, triggers, sequences, the check ---------------------

def finish(conn: Connection, schema_doc: dict, *, trusted: bool, where: str) -> None:
    ddl = _own_definition(conn, schema_doc)
    if ddl is None:
        return
    of(conn).finish_definition(conn, schema_doc, ddl, trusted, where)
    _check(conn, schema_doc, trusted, where)


def _check(conn: Connection, schema_doc: dict, trusted: bool, where: str) -> None:
    """The recreated table against the stored definition (what was recreated of it)."""
    from . import base
    live = base.table_schema(conn, schema_doc["table"], schema_doc.get("db_schema"))
    diffs = base.schema_differences(schema_doc, live)
    diffs += differences(schema_doc.get("ddl"), live.get("ddl"), trusted)
    if diffs:
        raise IntegrityError(f"{where}: the recreated table {schema_doc['table']} differs from its stored definition: "
                             + "; ".join(diffs[:5]) + " (rolled back)")


def _items(ddl: dict, trusted: bool) -> dict[str, Any]:
    """The parts of a definition that a recreate puts back, by name."""
    return named(ddl.get("dialect")).definition_items(ddl, trusted)


def differences(stored: Any, live: Any, trusted: bool) -> list[str]:
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
