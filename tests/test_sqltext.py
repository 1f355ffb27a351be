"""SQLite tables as lines SQLite writes (the ``sqltext`` record encoding).

The lines decode to exactly the values Python's ``sqlite3`` returns for every storage
class (awkward text, blobs, the extreme integers, doubles that SQLite's ``quote()``
rounds off, -0.0, infinities, mixed-type columns), on the paged path of rowid tables
and the cursor path of other keys alike; the fast expression and the generic one give
the same bytes; a restore from a ``sqltext`` snapshot and from an older msgpack one
writes the rows back exactly.
"""
from __future__ import annotations

import json
import math
import random
import re
import sqlite3
import struct

import pytest
import sqlalchemy as sa

from snapshotter import codec
from snapshotter_backends.sql import base as sqlbase
from snapshotter_backends.sql import sqlite as sqlite_dialect
from snapshotter_backends.sql import sqltext

from conftest import drift_then_restore


def _values() -> list:
    rng = random.Random(11)
    doubles = [struct.unpack("<d", rng.randbytes(8))[0] for _ in range(300)]
    return ([None, "", "plain", "quote ' and '' twice", "tab\there", "new\nline", "cr\rlf\r\n", "back\\slash \\n",
             "nul\x00inside", "\x00", "日本語 🙂 é", 0, 1, -1, 2**63 - 1, -2**63, 0.1, 1e308, -1e308, 5e-324,
             -0.0, 0.0, math.inf, -math.inf, 1 / 3, 123456789012345678.0, b"", b"\x00\xff\n\t'\\", b"X'00'",
             "NULL", "X'00'", "T'00'", "1.5", "Inf", float("nan")]
            + [d for d in doubles if d == d])


TABLES = {
    "rowid": "CREATE TABLE t (id INTEGER PRIMARY KEY, a, b TEXT, c REAL, d INTEGER, e BLOB)",
    "without_rowid": "CREATE TABLE t (id INTEGER PRIMARY KEY, a, b TEXT, c REAL, d INTEGER, e BLOB) WITHOUT ROWID",
    "int_key": "CREATE TABLE t (id INT PRIMARY KEY, a, b TEXT, c REAL, d INTEGER, e BLOB)",
    "composite": "CREATE TABLE t (b TEXT, id INTEGER, a, c REAL, d INTEGER, e BLOB, PRIMARY KEY (id, b))",
}
# the same tables without a BLOB column or an untyped one, which a snapshot stores as sqltext
# (a table with blobs stays msgpack: keeps_msgpack)
TABLES.update({f"{name}_typed": body.replace(" a,", " a ANY,").replace("e BLOB", "e ANY")
               for name, body in list(TABLES.items()) if name in ("rowid", "composite")})


@pytest.fixture
def awkward(tmp_path, request):
    """A table of every awkward value in every column (each value once in each column)."""
    path = tmp_path / "awkward.db"
    db = sqlite3.connect(path)
    db.execute(TABLES[request.param])
    vals = _values()
    for i, v in enumerate(vals):
        w = vals[(i * 7) % len(vals)]
        db.execute("INSERT INTO t (id, a, b, c, d, e) VALUES (?, ?, ?, ?, ?, ?)", (i, v, v, w, v, w))
    db.execute("INSERT INTO t (id, a, b, c, d, e) VALUES (-5, 1, 'x', 2.5, 3, x'01')")  # the fast expression's row
    db.commit()
    db.close()
    eng = sa.create_engine(f"sqlite:///{path}")
    yield eng
    eng.dispose()


def _lines(conn, doc, **kw) -> tuple[dict, list[bytes]]:
    enc, batches = sqlbase.read_lines(conn, doc, **kw)
    return enc, [line for batch in batches for line in batch]


@pytest.mark.parametrize("awkward", list(TABLES), indirect=True)
def test_lines_decode_to_what_the_cursor_returns(awkward):
    with awkward.connect() as conn:
        sqlbase.begin_snapshot(conn)
        doc = sqlbase.table_schema(conn, "t", None)
        rows = [rec for batch in sqlbase.read_rows(conn, doc) for rec in batch]
        enc, lines = _lines(conn, doc)
        _, slow = _lines(conn, doc, fast=False)
        _, small = _lines(conn, doc, batch=3)
    assert enc["format"] == "sqltext"
    assert lines == slow == small
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    rc = sqltext.SqlTextCodec(enc)
    decoded = [rc.decode(line) for line in lines]
    # packed, so that -0.0 and 0.0 differ and types count (1 and 1.0)
    assert [codec.pack(list(r)) for r in decoded] == [codec.pack([k, v]) for k, v in rows]
    assert [rc.key(line) for line in lines] == [k for k, _ in rows]
    assert b"".join(lines).count(b"\n") == rc.count_records(b"".join(lines)) == len(rows)
    assert rc.iter_records(b"".join(lines)) == lines


def test_rowid_is_recognised(tmp_path):
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'k.db'}")
    with eng.begin() as c:
        for name, body in TABLES.items():
            c.exec_driver_sql(body.replace("TABLE t ", f"TABLE {name} "))
    with eng.connect() as c:
        got = {name: sqlite_dialect.is_rowid_key(c, sqlbase.table_schema(c, name, None)) for name in TABLES}
    assert got == {"rowid": True, "without_rowid": False, "int_key": False, "composite": False,
                   "rowid_typed": True, "composite_typed": False}


def test_fields_round_trip_and_refuse_damage():
    for f, v in [(b"NULL", None), (b"-9223372036854775808", -2**63), (b"'a\\tb\\\\'", "a\tb\\"),
                 (b"T'610062'", "a\x00b"), (b"X''", b""), (b"-0.0", -0.0), (b"-Inf", -math.inf),
                 (b"'\xff'", "\udcff")]:
        assert codec.pack(sqltext.parse_field(f)) == codec.pack(v)
    for bad in (b"'open", b"X'0", b"'\\q'", b"12x"):
        with pytest.raises(ValueError):
            sqltext.parse_field(bad)


def _config(tmp_path, url):
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{url}"\n')


def _rows(eng, table):
    def rows():
        with eng.connect() as c:
            return [codec.pack(list(r)) for r in c.exec_driver_sql(f"SELECT * FROM {table} ORDER BY 1, 2")]
    return rows


def _manifest(tmp_path) -> dict:
    (path,) = list((tmp_path / "repo" / "snapshots").rglob("*.json"))
    return json.loads(path.read_text())


@pytest.mark.parametrize("awkward", ["rowid_typed", "composite_typed"], indirect=True)
def test_restore_from_a_sqltext_snapshot(awkward, tmp_path, cli):
    _config(tmp_path, awkward.url.render_as_string())
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    sid = r.json()["id"]
    entry = _manifest(tmp_path)["sources"]["db"]["streams"]["t"]
    assert entry["encoding"]["format"] == "sqltext"
    # an unchanged re-snapshot stores no new chunk
    r2 = cli("--json", "snapshot", "--release", "r")
    assert r2.code == 0 and r2.json()["bytes_written"] < 1000
    drift_then_restore(cli, awkward, sid, "t", [
        "UPDATE t SET a = 'poisoned\nline', c = -0.0 WHERE id = 3",
        "DELETE FROM t WHERE id IN (4, 5)",
        "INSERT INTO t (id, b, a) VALUES (100000, 'new', x'00')",
    ], {"added": 1, "modified": 1, "deleted": 2}, _rows(awkward, "t"))


@pytest.mark.parametrize("awkward", ["rowid"], indirect=True)
def test_an_older_msgpack_snapshot_still_restores(awkward, tmp_path, cli, monkeypatch):
    from snapshotter_backends import sql
    _config(tmp_path, awkward.url.render_as_string())
    assert cli("init").code == 0
    with monkeypatch.context() as m:
        m.setattr(sql.SQLReader, "read_encoded", lambda self, spec, sessions=None: None)
        r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    assert "encoding" not in _manifest(tmp_path)["sources"]["db"]["streams"]["t"]
    drift_then_restore(cli, awkward, r.json()["id"], "t", [
        "UPDATE t SET b = 'poisoned' WHERE id = 3",
        "DELETE FROM t WHERE id = 4",
    ], {"added": 0, "modified": 1, "deleted": 1}, _rows(awkward, "t"))


def test_records_out_of_key_order_are_still_refused(tmp_path, cli):
    """A key column of mixed types is read through the cursor path, its keys checked."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE m (id PRIMARY KEY, v TEXT)")
        c.exec_driver_sql("INSERT INTO m VALUES (1, 'a'), ('b', 'c')")
    _config(tmp_path, url)
    assert cli("init").code == 0
    r = cli("snapshot", "--release", "r")
    # named by its cause (a key column holding values of two types), exit 2
    assert r.code == 2 and "values of types integer" in r.err and "text" in r.err, r.err


def _narrow(path, rows: int, body=None) -> sa.Engine:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, label TEXT, score REAL)")
    db.executemany("INSERT INTO t VALUES (?, ?, ?, ?)",
                   [(i * 3 - 1000, i % 7, body(i) if body else f"item-{i}", i / 7) for i in range(rows)])
    db.commit()
    db.close()
    return sa.create_engine(f"sqlite:///{path}")


def test_a_rowid_table_is_read_in_an_order_sqlite_promises(tmp_path):
    """Every statement reading lines is ordered at its outer level (SQLite does not promise
    that an aggregate such as group_concat keeps a subquery's order), and the lines come in
    key order across batches, including a batch read again for a text that needs an escape."""
    eng = _narrow(tmp_path / "o.db", 3000, body=lambda i: "tab\there" if i in (5, 1700) else f"item-{i}")
    seen: list[str] = []
    with eng.connect() as conn:
        sqlbase.begin_snapshot(conn)
        doc = sqlbase.table_schema(conn, "t", None)
        conn.connection.driver_connection.set_trace_callback(seen.append)
        enc, lines = _lines(conn, doc, batch=100)
        conn.connection.driver_connection.set_trace_callback(None)
        _, slow = _lines(conn, doc, fast=False)
    assert enc["rowid"] is True and lines == slow
    rc = sqltext.SqlTextCodec(enc)
    assert [rc.key(line) for line in lines] == [i * 3 - 1000 for i in range(3000)]
    reads = [sql for sql in seen if re.search(r' FROM "?t"? ', sql + " ")]
    assert len(reads) >= 2 and not [sql for sql in reads if "group_concat" in sql.lower()]
    assert all(re.search(r'ORDER BY "?id"?( LIMIT \S+)?\s*$', sql) for sql in reads), reads


def test_check_same_thread_true_in_the_url(tmp_path, cli):
    """A connection that refuses other threads is read on the caller's thread."""
    eng = _narrow(tmp_path / "s.db", 2000)
    url = f"sqlite:///{tmp_path / 's.db'}"
    strict = sa.create_engine(url + "?check_same_thread=true")
    got = []
    for e in (eng, strict):
        with e.connect() as conn:
            sqlbase.begin_snapshot(conn)
            got.append(_lines(conn, sqlbase.table_schema(conn, "t", None), batch=64)[1])
    assert len(got[0]) == 2000 and got[0] == got[1]
    _config(tmp_path, url + "?check_same_thread=true")
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    assert _manifest(tmp_path)["sources"]["db"]["streams"]["t"]["encoding"]["format"] == "sqltext"


def _snapshot(cli) -> str:
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    return r.json()["id"]


def _entries(tmp_path) -> dict:
    out = {}
    for path in (tmp_path / "repo" / "snapshots").rglob("*.json"):
        m = json.loads(path.read_text())
        out[m["id"]] = m["sources"]["db"]["streams"]
    return out


def test_tables_of_blobs_stay_msgpack_and_may_switch_between_snapshots(tmp_path, cli):
    """A column declared BLOB keeps the table msgpack; an untyped column decides by the
    blobs among the first rows, so a table may switch encodings between snapshots, and a
    restore to either snapshot works from the other state."""
    path = tmp_path / "b.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, payload BLOB)")
    db.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v)")
    db.executemany("INSERT INTO blobs VALUES (?, ?)", [(i, bytes([i % 256]) * 40) for i in range(50)])
    db.executemany("INSERT INTO kv VALUES (?, ?)", [(i, f"value {i}") for i in range(50)])
    db.commit()
    db.close()
    eng = sa.create_engine(f"sqlite:///{path}")
    _config(tmp_path, f"sqlite:///{path}")
    assert cli("init").code == 0
    first = _snapshot(cli)
    e = _entries(tmp_path)[first]
    assert "encoding" not in e["blobs"] and e["kv"]["encoding"]["format"] == "sqltext"
    rows_kv = _rows(eng, "kv")
    as_text = rows_kv()
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE kv SET v = x'00ff' WHERE k = 2")
    second = _snapshot(cli)
    assert "encoding" not in _entries(tmp_path)[second]["kv"]
    as_blob = rows_kv()
    # back to the sqltext snapshot from the msgpack state, then forward again
    drift_then_restore(cli, eng, first, "kv", ["DELETE FROM kv WHERE k = 7"],
                       {"added": 0, "modified": 1, "deleted": 1}, lambda: as_text)
    assert rows_kv() == as_text
    drift_then_restore(cli, eng, second, "kv", ["UPDATE kv SET v = 'x' WHERE k = 9"],
                       {"added": 0, "modified": 2, "deleted": 0}, lambda: as_blob)
    assert rows_kv() == as_blob


def test_text_that_is_not_utf8_round_trips(tmp_path, cli):
    """A TEXT value whose bytes are not UTF-8 is snapshotted and written back byte for byte,
    still TEXT."""
    path = tmp_path / "u.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT, note TEXT)")
    db.execute("INSERT INTO t VALUES (1, CAST(x'ff61' AS TEXT), 'ok'), (2, CAST(x'c328e2' AS TEXT), "
               "CAST(x'80' AS TEXT)), (3, 'plain', 'x')")
    db.commit()
    db.close()
    eng = sa.create_engine(f"sqlite:///{path}")

    def raw_rows():
        with eng.connect() as c:
            return [tuple(r) for r in c.exec_driver_sql(
                "SELECT id, typeof(body), CAST(body AS BLOB), typeof(note), CAST(note AS BLOB) FROM t ORDER BY id")]
    before = raw_rows()
    _config(tmp_path, f"sqlite:///{path}")
    assert cli("init").code == 0
    sid = _snapshot(cli)
    assert _entries(tmp_path)[sid]["t"]["encoding"]["format"] == "sqltext"
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE t SET body = 'changed' WHERE id = 1")
        c.exec_driver_sql("DELETE FROM t WHERE id = 2")
        c.exec_driver_sql("UPDATE t SET note = CAST(x'fe' AS TEXT) WHERE id = 3")
    r = cli("--json", "restore", sid, "--yes")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    assert raw_rows() == before
