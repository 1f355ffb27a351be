"""PostgreSQL fast path for reading a table: ``COPY (SELECT ...) TO STDOUT``.

The generic path (:func:`snapshotter_backends.sql.base.read_rows`) fetches rows through a
server-side cursor, one FETCH at a time: the server waits while the client
decodes a batch, and the client waits while the server produces the next.
A COPY streams: the server produces rows while the client decodes them, and
binary COPY is cheaper to produce and to parse.  Here the very same SELECT
(same columns, same ``WHERE``, same ``ORDER BY ... COLLATE "C"``) runs as one
COPY on the connection and inside the transaction the reader already holds,
so it sees the same point in time.

Records must be the ones the generic path produces, byte for byte once
encoded, or stream digests would depend on which path ran.  That holds
because every value is built by the loaders of the connection's own adapter
map, for the type OIDs the server reports for the SELECT:

* text COPY goes through the same text loaders as a cursor (COPY's text
  escaping is undone before loading), so it is exact for every type,
  including types psycopg does not know (they load as ``str`` either way);
* binary COPY is cheaper to parse, but a binary loader is not always the
  text loader's twin (intervals, arrays, custom loaders), so it is used only
  when every column has a type in :data:`BINARY_EXACT` and the connection
  has psycopg's stock loaders for it.

:func:`plan` returns ``None`` when this path cannot promise identical
records (another driver, bind parameters that need SQLAlchemy processing),
and the caller keeps the generic path.  ``SNAPSHOTTER_PG_COPY=0`` turns the
fast path off, for comparison or as an escape hatch.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from snapshotter.errors import SourceError

from .. import lazy_module

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

sa = lazy_module("sqlalchemy")

ENV_SWITCH = "SNAPSHOTTER_PG_COPY"

#: types whose binary loader yields exactly what the text loader yields
#: (tests/test_pgcopy.py checks each against the cursor path).  Not float4:
#: its text form is the shortest decimal (0.1), its binary form widens to
#: the double nearest the float32 (0.10000000149011612).
BINARY_EXACT = frozenset({
    "bool", "bytea", "int2", "int4", "int8", "oid", "float8", "numeric",
    "text", "varchar", "bpchar", "name", "uuid", "json", "jsonb",
    "date", "timestamp", "timestamptz",
})


#: records per yielded batch.  A COPY has no fetch round trips to amortise, so
#: the batch only decides how many decoded rows are alive at once; kept under
#: the garbage collector's young-generation threshold (700 containers: a row,
#: its dict, its JSON) they die young instead of being promoted and then
#: traversed by full collections, which cost a third of the read otherwise.
COPY_BATCH = 100


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class CopyPlan:
    select: str  # the SELECT with its parameters merged in as literals
    oids: list[int]
    binary: bool

    @property
    def statement(self) -> str:
        return f"COPY ({self.select}) TO STDOUT (FORMAT {'BINARY' if self.binary else 'TEXT'})"


def _psycopg_connection(conn: Connection):
    try:
        import psycopg
    except ImportError:
        return None
    raw = conn.connection.driver_connection
    return raw if isinstance(raw, psycopg.Connection) else None


def plan(conn: Connection, stmt: sa.Select, *, binary: bool | None = None) -> CopyPlan | None:
    """How to run ``stmt`` as a COPY on ``conn``, or ``None`` to keep the generic path.

    ``binary`` forces the COPY format (tests); by default binary is chosen
    whenever it is exact for every column.
    """
    pg = _psycopg_connection(conn)
    if pg is None:
        return None
    import psycopg

    compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    if any(b.type.bind_processor(conn.dialect) is not None for b in compiled.binds.values()):
        return None  # values SQLAlchemy would convert first: not worth reproducing here
    select = _client_select(conn, stmt)
    try:
        with pg.cursor() as cur:
            # the OIDs a cursor would load the columns with (domains report their base type)
            cur.execute(f"SELECT * FROM ({select}) AS q LIMIT 0")
            oids = [d.type_code for d in cur.description]
    except psycopg.Error as exc:
        raise sa.exc.DBAPIError(select, None, exc) from exc
    if binary is None:
        binary = all(_binary_exact(pg, oid) for oid in oids)
    elif binary and not all(_binary_exact(pg, oid) for oid in oids):
        return None
    return CopyPlan(select, oids, binary)


def _binary_exact(pg, oid: int) -> bool:
    import psycopg
    from psycopg.pq import Format

    info = pg.adapters.types.get(oid)
    if info is None or info.oid != oid or info.name not in BINARY_EXACT:  # array OIDs map to their element
        return False
    text, binary = pg.adapters.get_loader(oid, Format.TEXT), pg.adapters.get_loader(oid, Format.BINARY)
    if text is None or binary is None:
        return False
    if info.name in ("json", "jsonb"):
        # a configured deserializer (set_json_loads) replaces both loaders with
        # subclasses; the two formats agree when they share it
        loads = getattr(text, "_loads", None)
        if loads is not None and loads is getattr(binary, "_loads", None):
            return True
    return (text is psycopg.adapters.get_loader(oid, Format.TEXT)
            and binary is psycopg.adapters.get_loader(oid, Format.BINARY))


def read_rows(conn: Connection, copy_plan: CopyPlan, names: Sequence[str], key_index: Sequence[int],
              batch: int) -> Iterator[list[tuple[Any, dict]]]:
    """Batches of ``(key, {column: value})`` records, as the generic path builds them."""
    with _copy_out(conn, copy_plan.statement, prepare=lambda cur: _use_json_scanner(cur, copy_plan)) as (pg, copy):
        copy.set_types(copy_plan.oids)
        yield from _batches(pg, copy, copy_plan.binary, tuple(names), tuple(key_index), min(batch, COPY_BATCH))


@contextlib.contextmanager
def _copy_out(conn: Connection, statement: str, prepare=None) -> Iterator[tuple[Any, Any]]:
    """``(psycopg connection, Copy)`` of ``COPY ... TO STDOUT`` on the reader's connection.

    psycopg cancels a COPY that is left before its end, which would abort the
    reader's transaction; a savepoint keeps the transaction (and its snapshot)
    usable for the next stream, as closing a cursor does on the generic path.
    psycopg errors come out as SQLAlchemy's, which the reader's error translation speaks.
    """
    import psycopg
    from psycopg.pq import TransactionStatus

    pg = _psycopg_connection(conn)
    savepoint = pg.info.transaction_status == TransactionStatus.INTRANS
    try:
        with pg.cursor() as cur:
            if savepoint:
                cur.execute("SAVEPOINT snapshotter_copy")
            try:
                if prepare is not None:
                    prepare(cur)
                with cur.copy(statement) as copy:
                    yield pg, copy
            except BaseException:
                if savepoint and pg.info.transaction_status == TransactionStatus.INERROR:
                    cur.execute("ROLLBACK TO SAVEPOINT snapshotter_copy")
                raise
            if savepoint:
                cur.execute("RELEASE SAVEPOINT snapshotter_copy")
    except psycopg.Error as exc:
        raise sa.exc.DBAPIError(statement, None, exc) from exc


def _client_select(conn: Connection, stmt: sa.Select) -> str:
    """The SELECT with its parameters merged in as literals (COPY takes no server-side
    parameters), quoted by the driver as a client-side cursor would quote them."""
    import psycopg

    compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    return psycopg.ClientCursor(_psycopg_connection(conn)).mogrify(compiled.string, compiled.params)


def _batches(pg, copy, binary: bool, names: tuple[str, ...], key_index: tuple[int, ...],
             batch: int) -> Iterator[list[tuple[Any, dict]]]:
    single = len(key_index) == 1
    k0 = key_index[0]
    out: list[tuple[Any, dict]] = []
    append = out.append
    parse = getattr(getattr(copy, "formatter", None), "parse_row", None)
    if binary and parse is not None:
        rows = _binary_rows(pg, copy, parse)
    else:
        rows = copy.rows()
    for row in rows:
        append((row[k0] if single else [row[i] for i in key_index], dict(zip(names, row))))
        if len(out) >= batch:
            yield out
            out = []
            append = out.append
    if out:
        yield out


def _binary_rows(pg, copy, parse) -> Iterator[tuple]:
    for part in _copy_messages(pg, copy, COPY_BATCH):
        for data in part:
            row = parse(data)
            if row is not None:  # None: the in-band trailer; the messages end after it
                yield row


# -- json and jsonb -------------------------------------------------------------

_JSON_START = frozenset(b'{["-0123456789tfn')


def _use_json_scanner(cur, copy_plan: CopyPlan) -> None:
    """Load json/jsonb columns of this COPY through json's scanner directly.

    psycopg's stock loader calls ``json.loads(bytes)``, whose Python layers
    (encoding detection, whitespace skipping, the end check) cost more than
    scanning an agent's small metadata documents.  The loaders installed here,
    on this cursor only, return the very object ``json.loads`` returns: they
    call the same C scanner, with the default decoder's settings, on the text
    decoded the way ``json.loads`` would decode it (PostgreSQL text is UTF-8
    here and never holds NUL, so no BOM or UTF-16/32 guess applies), and they
    hand anything else (leading or trailing whitespace, errors, an unknown
    jsonb version) to the stock loader.  Only done when the connection still
    has the stock loaders, i.e. ``json.loads``.
    """
    import json

    from psycopg.pq import Format
    from psycopg.types import json as pgjson

    if cur.connection.info.encoding != "utf-8":
        return
    fmt = Format.BINARY if copy_plan.binary else Format.TEXT
    plain_load = getattr(getattr(pgjson, "_JsonLoader", None), "load", None)
    versioned_load = getattr(getattr(pgjson, "JsonbBinaryLoader", None), "load", None)
    if plain_load is None or versioned_load is None:
        return
    for oid in set(copy_plan.oids):
        info = cur.adapters.types.get(oid)
        if info is None or info.oid != oid or info.name not in ("json", "jsonb"):
            continue
        stock = cur.adapters.get_loader(oid, fmt)
        if stock is None or getattr(stock, "_loads", None) is not json.loads:
            continue
        if stock.load is plain_load:
            versioned = False
        elif stock.load is versioned_load:
            versioned = True
        else:
            continue
        cur.adapters.register_loader(oid, _json_scanner_loader(stock, versioned))


def _json_scanner_loader(stock: type, versioned: bool) -> type:
    import json

    scan = json.JSONDecoder().scan_once
    start = _JSON_START

    class JsonScannerLoader(stock):
        def load(self, data):
            if versioned:
                if not data or data[0] != 1:
                    return super().load(data)
                data = data[1:]
            b = bytes(data)
            if b and b[0] in start:
                text = b.decode("utf-8", "surrogatepass")
                try:
                    obj, end = scan(text, 0)
                except (StopIteration, ValueError):
                    pass
                else:
                    if end == len(text):
                        return obj
            return json.loads(b)

    return JsonScannerLoader


# -- pgtext: rows as COPY text lines (the stream encoding of PostgreSQL tables) --

LINE_BATCH = 2000


@contextlib.contextmanager
def pgtext_settings(conn: Connection) -> Iterator[None]:
    """Run the block under :data:`.pgtext.SESSION_SETTINGS` (transaction-local),
    and put the caller's settings back afterwards (later reads load values as before)."""
    from .pgtext import SESSION_SETTINGS

    names = [n for n, _ in SESSION_SETTINGS]
    old = conn.exec_driver_sql("SELECT " + ", ".join(f"current_setting('{n}')" for n in names)).fetchone()
    conn.exec_driver_sql("SELECT " + ", ".join(f"set_config('{n}', '{v}', true)" for n, v in SESSION_SETTINGS))
    try:
        yield
    finally:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            conn.exec_driver_sql("SELECT " + ", ".join("set_config(%s, %s, true)" for _ in names),
                                 tuple(x for pair in zip(names, old) for x in pair))


def column_oids(conn: Connection, stmt: sa.Select) -> list[int]:
    """The type OIDs the server reports for the statement's columns (domains: their base type)."""
    result = conn.execute(stmt.limit(0))
    try:
        return [int(d[1]) for d in result.cursor.description]
    finally:
        result.close()


def copy_lines(conn: Connection, stmt: sa.Select, batch: int = LINE_BATCH) -> Iterator[list[bytes]]:
    """Batches of the statement's rows as COPY text lines (UTF-8), straight from the server."""
    with _copy_out(conn, f"COPY ({_client_select(conn, stmt)}) TO STDOUT") as (pg, copy):
        encoding = pg.info.encoding
        for out in _copy_messages(pg, copy, batch):
            yield out if encoding == "utf-8" else _to_utf8(out, encoding)


def _copy_messages(pg, copy, batch: int) -> Iterator[list[bytes]]:
    """Batches of the data messages of a COPY TO (one row each), taken from libpq
    directly while it has them buffered: ``Copy.read`` costs a round through
    psycopg's wait machinery per row, more than the rest of a snapshot's per-row
    work.  Only an empty buffer waits, in ``Copy.read`` (GIL released, Ctrl-C
    honoured).  The end of the COPY is finished as ``Copy.read`` finishes it;
    a psycopg without the state this relies on gets plain ``Copy.read``."""
    import psycopg
    from psycopg.pq import ExecStatus

    out: list[bytes] = []
    if not hasattr(copy, "_finished"):
        for data in copy:
            out.append(bytes(data))
            if len(out) >= batch:
                yield out
                out = []
        if out:
            yield out
        return
    pgconn = pg.pgconn
    get = pgconn.get_copy_data
    consume = pgconn.consume_input
    read = copy.read
    append = out.append
    while True:
        n, data = get(1)
        if n == 0:
            consume()
            n, data = get(1)
        if n > 0:
            append(bytes(data))
            if len(out) >= batch:
                yield out
                out = []
                append = out.append
            continue
        if n == 0:
            data = read()  # waits for the socket
            if data:
                append(bytes(data))
                continue
            break
        if n == -1:
            results = []
            while (res := pgconn.get_result()) is not None:
                results.append(res)
            copy._finished = True
            bad = next((r for r in results if r.status != ExecStatus.COMMAND_OK), None)
            if bad is not None:
                raise psycopg.errors.error_from_result(bad, encoding=pg.info.encoding)
            if not results:
                raise psycopg.OperationalError("COPY ended without its result")
            break
        raise psycopg.OperationalError(pgconn.error_message.decode("utf-8", "replace").strip() or "COPY failed")
    if out:
        yield out


def _to_utf8(lines: list[bytes], encoding: str) -> list[bytes]:
    return [line.decode(encoding).encode("utf-8") for line in lines]


def from_utf8(lines: list[bytes], encoding: str, where: str) -> list[bytes]:
    """Stored (UTF-8) lines in a connection's client encoding, for COPY FROM."""
    if encoding == "utf-8":
        return lines
    try:
        return [line.decode("utf-8").encode(encoding) for line in lines]
    except UnicodeEncodeError as exc:
        raise SourceError(f"{where}: the snapshot holds {exc.object[exc.start:exc.end]!r}, which the "
                          f"database's encoding ({encoding}) cannot store") from None


def cursor_lines(conn: Connection, stmt: sa.Select, batch: int = LINE_BATCH) -> Iterator[list[bytes]]:
    """The same lines through an ordinary cursor, for drivers without COPY: each column is
    selected as its type's output text (``format('%s', c)`` calls the output function,
    unlike a cast to text, which differs for bool, bpchar, inet, ...), then escaped
    as COPY escapes it."""
    from .pgtext import format_line

    cols = list(stmt.selected_columns)
    texts = [sa.case((c.is_(None), sa.null()), else_=sa.func.format("%s", c)).label(c.name) for c in cols]
    text_stmt = stmt.with_only_columns(*texts, maintain_column_froms=True)
    # per statement: Connection.execution_options() would switch the whole connection to
    # server-side cursors, and a later CREATE TEMP TABLE would be sent as a DECLARE ... CURSOR
    result = conn.execute(text_stmt, execution_options={"stream_results": True, "yield_per": batch})
    for part in result.partitions(batch):
        yield [format_line(row) for row in part]
