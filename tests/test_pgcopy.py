"""The PostgreSQL COPY path reads exactly the records the cursor path reads.

Both paths run explicitly on the same connection and transaction, over tables
holding every awkward type; records are compared by their encoded bytes (what
digests and plans see) and by Python type and repr (what restore writes).
"""
from __future__ import annotations

import datetime
import json

import pytest

sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg")

from snapshotter_backends.sql import base as sqlbase, pgcopy  # noqa: E402
from conftest import drift_then_restore  # noqa: E402
from snapshotter import codec  # noqa: E402
from snapshotter.errors import SourceError  # noqa: E402
from snapshotter.streams import stream_digest_of  # noqa: E402

AWKWARD_DDL = [
    "CREATE TYPE mood AS ENUM ('calm', 'Angry', 'zé')",
    "CREATE DOMAIN positive AS integer CHECK (VALUE > 0)",
    """CREATE TABLE awkward (
        id text PRIMARY KEY,
        ts timestamptz, ts_plain timestamp, d date, tm time, tmtz timetz, iv interval,
        num numeric, num_fixed numeric(30, 10), raw bytea, j json, jb jsonb, body text,
        u uuid, ints integer[], texts text[], stamps timestamptz[], big bigint, small smallint,
        f double precision, f4 real, flag boolean, v varchar(20), c char(5),
        m mood, pos positive, addr macaddr, o oid
    )""",
]

AWKWARD_ROWS = """
INSERT INTO awkward VALUES
 ('a', '2026-11-29 10:15:00.123456+05:30', '2026-11-29 10:15:00.5', '2026-02-28', '23:59:59.999999',
  '04:05:06+02', '1 year 2 mons 3 days 04:05:06.789', 12345678901234567890.123456789012345678901234567890,
  1.5, '\\x00ff5c0a', '{"b": 1, "a": [1, 2.5, null], "b": 2}', '{"z": {"y": "ü"}, "a": [true, false]}',
  E'caf\\u00e9 \\u65e5\\u672c \\x01\\x02 tab\\t nl\\n cr\\r back\\\\slash',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,NULL,-3}', '{"x,y","q\\"uote",NULL,"","NULL"}',
  '{"2026-01-01 00:00:00+00","1999-12-31 23:59:59.5-08"}', 9223372036854775807, -32768,
  'NaN', 'Infinity', true, 'ünïcödé', 'ab', 'zé', 7, '08:00:2b:01:02:03', 4294967295),
 ('B', '0001-01-01 00:00:00+00', '9999-12-31 23:59:59.999999', '0001-01-01', '00:00:00',
  '00:00:00-14:59', '-1 years -2 days +00:00:00.000001', '-0.000000000000000000000000000001',
  '-99999999999999999999.9999999999', '\\x', '[]', '{}', '', '00000000-0000-0000-0000-000000000000',
  '{}', '{}', '{}', -9223372036854775808, 0, '-Infinity', '-0', false, '', '     ', 'calm', 1,
  '08-00-2b-01-02-04', 0),
 ('Ä', now(), now()::timestamp, now()::date, now()::time, now()::timetz, '0', 'NaN', 0,
  '\\x5c5c', 'null', '"just a string"', 'x', gen_random_uuid(), '{{1,2},{3,4}}', '{"日本"}',
  '{NULL}', 0, 1, 2.2250738585072014e-308, 1.17549435e-38, NULL, 'x', 'x', 'Angry', 2, '0800.2b01.0205', 1),
 ('é', '2026-03-29 01:30:00+00', NULL, NULL, NULL, NULL, '100 years', 'Infinity', 0.0000000001,
  NULL, '{"deep": {"deeper": [1e400, -0.0, 1.0]}}', '{"n": 1.0e+2, "k": 12345678901234567890}',
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0.1, 0.1, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 ('z', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 ('日本', NULL, NULL, NULL, NULL, NULL, NULL, '1.500', '2.50', NULL,
  E' \t{"x": "\\u00e9\\ud83d\\ude00", "big": 123456789012345678901234567890}\n ',
  '{"k": "\\u00e9 \\"q\\"", "e": 1e-7, "deep": [[[[{"a": [1]}]]]]}', 'x''y', NULL, NULL,
  NULL, NULL, 1, NULL, 3.141592653589793, 3.14159, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 ('A b', NULL, NULL, NULL, NULL, NULL, NULL, '-0.00', '0', NULL, '"s"', '123', NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, 1e308, 'NaN', NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 ('🙂', NULL, NULL, NULL, NULL, NULL, NULL, '1e-40', '1e19', NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, 5e-324, '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL)
"""

COMPOSITE_DDL = """CREATE TABLE turns (
    session text NOT NULL, seq integer NOT NULL, at timestamptz NOT NULL, role text, content text,
    meta jsonb, score numeric(8, 3), PRIMARY KEY (session, seq)
)"""

COMPOSITE_ROWS = """
INSERT INTO turns
SELECT s.name, g, timestamptz '2026-11-29 10:00:00+00' + g * interval '1 minute',
       CASE WHEN mod(g, 2) = 0 THEN 'user' ELSE 'assistant' END,
       CASE WHEN mod(g, 7) = 0 THEN NULL ELSE s.name || E' says\\t' || repeat('é', mod(g, 5)) END,
       CASE WHEN mod(g, 3) = 0 THEN NULL ELSE jsonb_build_object('g', g, 'tags', jsonb_build_array(s.name)) END,
       CASE WHEN mod(g, 4) = 0 THEN NULL ELSE g / 7.0 END
FROM (VALUES ('sess-a'), ('Sess-B'), ('séss-c'), ('x''y'), ('back\\slash'), ('日本')) AS s(name),
     generate_series(1, 40) g
"""

DOCS_DDL = "CREATE TABLE docs (id integer PRIMARY KEY, doc jsonb, raw json)"

# every shape of JSON value, and json text with the whitespace it was written with
DOCS_ROWS = """
INSERT INTO docs
SELECT g, d, CASE mod(g, 3) WHEN 0 THEN d::text WHEN 1 THEN E' \\n' || d::text || E'\\t ' ELSE NULL END::json
FROM generate_series(1, 3000) g,
     LATERAL (SELECT CASE mod(g, 6)
        WHEN 0 THEN jsonb_build_object('i', g, 'f', g / 7.0, 'e', (g * 1e-3)::float8, 'neg', -g,
                                       's', repeat(chr(200 + mod(g, 500)), mod(g, 5)), 'q', E'a"b\\\\c\\u0001',
                                       'a', jsonb_build_array(g, NULL, true, false, 'x'), 'o', '{}'::jsonb)
        WHEN 1 THEN to_jsonb(g * 1e20)
        WHEN 2 THEN to_jsonb('é' || g::text)
        WHEN 3 THEN jsonb_build_array(jsonb_build_array(jsonb_build_array(g)), '[]'::jsonb)
        WHEN 4 THEN 'null'::jsonb
        ELSE to_jsonb(mod(g, 2) = 0) END AS d) x
"""

BIG_ROWS = 12_000  # more than one fetch batch, so batching is exercised on both paths


@pytest.fixture
def db(pg_url):
    engine = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        for ddl in AWKWARD_DDL:
            c.exec_driver_sql(ddl)
        c.exec_driver_sql(AWKWARD_ROWS)
        c.exec_driver_sql(COMPOSITE_DDL)
        c.exec_driver_sql(COMPOSITE_ROWS)
        c.exec_driver_sql(DOCS_DDL)
        c.exec_driver_sql(DOCS_ROWS)
        c.exec_driver_sql("CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz, payload text, n numeric)")
        c.exec_driver_sql(f"""INSERT INTO events SELECT g, timestamptz '2026-01-01' + g * interval '1 second',
                              md5(g::text), g / 3.0 FROM generate_series(1, {BIG_ROWS}) g""")
    yield engine
    engine.dispose()


@pytest.fixture
def conn(db):
    """One point-in-time read transaction, as the SQL reader opens it."""
    c = db.connect()
    sqlbase.begin_snapshot(c)
    yield c
    sqlbase.end_transaction(c, commit=True)
    c.close()


def read(conn, table, fast, *, where=None, columns=None, batch=sqlbase.FETCH_BATCH):
    doc = sqlbase.table_schema(conn, table, None)
    if columns is not None:
        doc["columns"] = [c for c in doc["columns"] if c["name"] in columns]
    return [rec for part in sqlbase.read_rows(conn, doc, where=where, fast=fast, batch=batch) for rec in part]


def typed(records):
    """Each field's exact Python type and repr (tzinfo kind, Decimal exponent, NaN and -0.0 included)."""
    def one(v):
        return type(v).__name__, repr(v)
    return [(one(k) if not isinstance(k, list) else [one(x) for x in k], {c: one(v) for c, v in value.items()})
            for k, value in records]


def assert_same(expected, got):
    assert typed(got) == typed(expected)
    assert [codec.pack(k) + codec.pack(v) for k, v in got] == [codec.pack(k) + codec.pack(v) for k, v in expected]
    assert stream_digest_of(iter(got), "blake3") == stream_digest_of(iter(expected), "blake3")


def binary_columns(conn, table):
    pg = conn.connection.driver_connection
    cols = [c["name"] for c in sqlbase.table_schema(conn, table, None)["columns"]]
    with pg.cursor() as cur:
        cur.execute(f'SELECT * FROM "{table}" LIMIT 0')
        oids = [d.type_code for d in cur.description]
    return [c for c, oid in zip(cols, oids) if pgcopy._binary_exact(pg, oid)]


@pytest.mark.parametrize("table", ["awkward", "turns", "docs", "events"])
def test_copy_text_matches_cursor(conn, table):
    generic = read(conn, table, False)
    assert len(generic) == {"awkward": 8, "turns": 240, "docs": 3000, "events": BIG_ROWS}[table]
    assert_same(generic, read(conn, table, "text"))
    assert_same(generic, read(conn, table, None))  # whatever the dispatcher picks


def test_awkward_values_survive(conn):
    recs = dict(read(conn, "awkward", "text"))
    assert [k for k, _ in read(conn, "awkward", "text")] == sorted(recs)  # code point order, like Python
    a = recs["a"]
    assert a["body"].endswith("back\\slash") and "\t" in a["body"] and "\n" in a["body"] and "\x01" in a["body"]
    assert a["raw"] == b"\x00\xff\\\n"
    assert a["texts"] == ["x,y", 'q"uote', None, "", "NULL"]
    assert a["f"] != a["f"] and a["f4"] == float("inf")
    assert str(a["num"]) == "12345678901234567890.123456789012345678901234567890"
    assert a["j"] == {"b": 2, "a": [1, 2.5, None]}
    assert all(v is None for c, v in recs["z"].items() if c != "id")
    assert str(recs["日本"]["num"]) == "1.500" and recs["日本"]["body"] == "x'y"
    assert recs["日本"]["j"] == {"x": "é\U0001f600", "big": 123456789012345678901234567890}
    assert recs["日本"]["jb"]["k"] == 'é "q"' and recs["A b"]["j"] == "s" and recs["A b"]["jb"] == 123


@pytest.mark.parametrize("table", ["awkward", "turns", "docs", "events"])
def test_copy_binary_matches_cursor_for_binary_exact_types(conn, table):
    cols = binary_columns(conn, table)
    # every type the binary path claims is exercised by these tables
    if table == "awkward":
        assert {"ts", "ts_plain", "d", "num", "num_fixed", "raw", "j", "jb", "body", "u", "big", "small",
                "f", "flag", "v", "c", "o", "pos"} <= set(cols)  # a domain reads as its base type
        assert not {"f4", "iv", "tm", "ints", "m", "addr"} & set(cols)
    generic = read(conn, table, False, columns=cols)
    assert_same(generic, read(conn, table, "binary", columns=cols))
    if set(cols) == {c["name"] for c in sqlbase.table_schema(conn, table, None)["columns"]}:
        assert_same(generic, read(conn, table, None))


@pytest.mark.parametrize("fmt", ["text", "binary"])
def test_json_columns_go_through_the_scanner_loaders(conn, fmt):
    from psycopg.pq import Format
    doc = sqlbase.table_schema(conn, "docs", None)
    t = sqlbase.lightweight_table(doc)
    copy_plan = pgcopy.plan(conn, sa.select(t.c.id, t.c.doc, t.c.raw).order_by(t.c.id), binary=fmt == "binary")
    with conn.connection.driver_connection.cursor() as cur:
        pgcopy._use_json_scanner(cur, copy_plan)
        fmt_code = Format.BINARY if fmt == "binary" else Format.TEXT
        assert {cur.adapters.get_loader(oid, fmt_code).__name__ for oid in copy_plan.oids[1:]} == {"JsonScannerLoader"}
    docs = dict(read(conn, "docs", fmt))
    assert docs[6]["doc"]["q"] == 'a"b\\c\x01' and docs[7]["doc"] == 7e20 and docs[3]["raw"] == [[[3]], []]


def test_custom_json_deserializer_is_honoured_on_both_paths(pg_url, db):
    engine = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT",
                              json_deserializer=lambda text: {"custom": json.loads(text)})
    with engine.connect() as c:
        sqlbase.begin_snapshot(c)
        generic = read(c, "awkward", False)
        assert dict(generic)["A b"]["jb"] == {"custom": 123}
        assert_same(generic, read(c, "awkward", "text"))
        assert_same(generic, read(c, "awkward", None))
        cols = binary_columns(c, "awkward")
        assert {"j", "jb"} <= set(cols)
        assert_same(read(c, "awkward", False, columns=cols), read(c, "awkward", "binary", columns=cols))
        sqlbase.end_transaction(c, commit=True)
    engine.dispose()


def test_binary_refused_for_types_it_cannot_reproduce(conn):
    with pytest.raises(SourceError, match="binary"):
        read(conn, "awkward", "binary")


SESSIONS = ["séss-c", "x'y", "back\\slash"]


@pytest.mark.parametrize("table,where,expected", [
    ("awkward", lambda t: t.c.id.in_(["Ä", "日本", "x'y", "no\\such"]), ["Ä", "日本"]),
    ("awkward", lambda t: sa.and_(t.c.id != "z", t.c.num.is_not(None), t.c.body.is_(None)), ["A b", "é", "🙂"]),
    ("turns", lambda t: t.c.session.in_(SESSIONS), [[s, g] for s in sorted(SESSIONS) for g in range(1, 41)]),
    ("turns", lambda t: sa.tuple_(t.c.session, t.c.seq).in_([("日本", 3), ("Sess-B", 40), ("sess-a", 99)]),
     [["Sess-B", 40], ["日本", 3]]),
    ("turns", lambda t: t.c.session.in_([]), []),
    ("turns", lambda t: sa.and_(t.c.session == "x'y", t.c.seq > 37,
                                t.c.at >= datetime.datetime(2026, 11, 29, 10, 39, tzinfo=datetime.timezone.utc)),
     [["x'y", 39], ["x'y", 40]]),
])
def test_where_selection_on_both_paths(conn, table, where, expected):
    generic = read(conn, table, False, where=where)
    assert [k for k, _ in generic] == expected
    assert_same(generic, read(conn, table, "text", where=where))
    assert_same(generic, read(conn, table, None, where=where))


@pytest.mark.parametrize("fast", ["text", "binary"])
def test_batches_are_bounded_and_complete(conn, fast):
    doc = sqlbase.table_schema(conn, "events", None)
    sizes = [len(p) for p in sqlbase.read_rows(conn, doc, fast=fast, batch=5000)]
    assert sum(sizes) == BIG_ROWS and max(sizes) <= min(5000, pgcopy.COPY_BATCH) and min(sizes[:-1]) == max(sizes)
    assert [len(p) for p in sqlbase.read_rows(conn, doc, fast=fast, batch=7)][:3] == [7, 7, 7]


def test_abandoned_copy_keeps_the_transaction_and_its_snapshot(db, conn):
    with db.connect() as c:
        # large enough that the server is still sending when the reader walks away
        c.exec_driver_sql("CREATE TABLE big (id integer PRIMARY KEY, body text)")
        c.exec_driver_sql("INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 150000) g")
    doc = sqlbase.table_schema(conn, "big", None)
    it = sqlbase.read_rows(conn, doc, fast=True, batch=100)
    first = next(it)
    with db.connect() as other:
        other.exec_driver_sql("DELETE FROM big WHERE id <= 1000")
    it.close()
    pg = conn.connection.driver_connection
    assert pg.info.transaction_status.name == "INTRANS"
    again = read(conn, "big", True)
    assert again[:100] == first and len(again) == 150000  # same transaction, same point in time


def test_copy_reads_the_transaction_snapshot(db, conn):
    before = read(conn, "events", False)
    with db.connect() as other:
        other.exec_driver_sql("DELETE FROM events WHERE mod(id, 2) = 0")
        other.exec_driver_sql("INSERT INTO events VALUES (999999, now(), 'late', 1)")
    assert_same(before, read(conn, "events", True))


def test_switch_off_and_other_dialects(conn, monkeypatch, sqlite_url):
    monkeypatch.setenv(pgcopy.ENV_SWITCH, "0")
    assert not pgcopy.enabled()
    monkeypatch.setenv(pgcopy.ENV_SWITCH, "1")
    assert pgcopy.enabled()
    eng = sa.create_engine(sqlite_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE t (id integer PRIMARY KEY, v text)")
        c.exec_driver_sql("INSERT INTO t VALUES (2, 'b'), (1, 'a')")
        assert read(c, "t", None) == [(1, {"id": 1, "v": "a"}), (2, {"id": 2, "v": "b"})]
        with pytest.raises(SourceError, match="COPY"):
            read(c, "t", True)
    eng.dispose()


def test_snapshot_digests_agree_whichever_path_ran(pg_url, db, cli, tmp_path, monkeypatch):
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{pg_url}"\n', encoding="utf-8")
    assert cli("init").code == 0
    digests = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(pgcopy.ENV_SWITCH, switch)
        r = cli("--json", "snapshot", "--release", f"r{switch}")
        assert r.code == 0, r.err
        digests[switch] = {name: st["digest"] for name, st in r.json()["sources"]["db"]["streams"].items()}
    assert set(digests["1"]) == {"awkward", "turns", "docs", "events"}
    assert digests["1"] == digests["0"]


def test_restore_with_the_copy_path_switched_off(pg_url, db, cli, tmp_path, monkeypatch):
    """SNAPSHOTTER_PG_COPY=0 (the escape hatch) restores too: the cursor read used to leave
    the connection on server-side cursors, and the restore's CREATE TEMP TABLE then failed
    ('syntax error at or near "CREATE"')."""
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{pg_url}"\n', encoding="utf-8")
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r").json()["id"]
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM docs WHERE ctid = (SELECT ctid FROM docs LIMIT 1)")
    eng.dispose()
    monkeypatch.setenv(pgcopy.ENV_SWITCH, "0")
    r = cli("--json", "restore", snap, "--yes")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True and r.json()["plan"]["db"]["docs"]["deleted"] == 1
    assert cli("--json", "diff", snap).json()["plan"]["db"]["docs"] == {"added": 0, "modified": 0, "deleted": 0}


def snapshot_on_both_paths(cli, monkeypatch, table: str) -> dict:
    """A snapshot through COPY and one through the cursor: their stream digests must agree.
    Returns the COPY one (the path left switched on)."""
    snaps = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(pgcopy.ENV_SWITCH, switch)
        r = cli("--json", "snapshot", "--release", f"r{switch}")
        assert r.code == 0, r.err
        snaps[switch] = r.json()
    digests = {s: snaps[s]["sources"]["db"]["streams"][table]["digest"] for s in snaps}
    assert digests["1"] == digests["0"]
    return snaps["1"]


def test_citext_keys_snapshot_and_restore_on_both_paths(pg_url, cli, tmp_path, monkeypatch):
    """citext orders case-folded ('a' before 'B') even under COLLATE "C"; a stream must
    be in code-point order, so such keys are ordered by their text."""
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS citext")
        c.exec_driver_sql("CREATE TABLE handles (handle citext PRIMARY KEY, owner text)")
        c.exec_driver_sql("INSERT INTO handles SELECT CASE WHEN i %% 2 = 0 THEN upper(chr(97 + i %% 26)) "
                          "ELSE chr(97 + i %% 26) END || i, 'owner ' || i FROM generate_series(1, 3000) i")

    def rows():
        with eng.connect() as c:
            return sorted(c.exec_driver_sql("SELECT handle::text, owner FROM handles").all())

    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{pg_url}"\ntables = ["handles"]\n')
    assert cli("init").code == 0
    snap = snapshot_on_both_paths(cli, monkeypatch, "handles")
    assert snap["sources"]["db"]["streams"]["handles"]["records"] == 3000
    drift_then_restore(cli, eng, snap["id"], "handles", [
        "UPDATE handles SET owner = 'drifted' WHERE right(handle::text, 1) = '7'",
        "DELETE FROM handles WHERE right(handle::text, 1) = '3'",
        "INSERT INTO handles VALUES ('Zz-new', 'new'), ('aa-new', 'new')",
    ], {"added": 2, "modified": 300, "deleted": 300}, rows)
    eng.dispose()


@pytest.fixture
def win1252_url():
    """A database in WIN1252, where COLLATE "C" orders '€' (0x80) before 'é' (0xE9)."""
    from conftest import PG_ADMIN_URL, service_down
    import secrets
    name = "snap_w1252_" + secrets.token_hex(3)
    try:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE \"{name}\" ENCODING 'WIN1252' LC_COLLATE 'C' LC_CTYPE 'C' "
                              f"TEMPLATE template0")
    except Exception as exc:  # noqa: BLE001 - the service is not usable
        service_down("PostgreSQL", str(exc).splitlines()[0])
    yield sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def test_non_utf8_database_keys_in_code_point_order_and_restored(win1252_url, cli, tmp_path, monkeypatch):
    eng = sa.create_engine(win1252_url, connect_args={"client_encoding": "utf8"})
    words = ["a", "z", "é", "€uro", "Ž", "b€", "ë-old", "œuvre", "naïve"]
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE words (w text PRIMARY KEY, n integer)")
        c.execute(sa.text("INSERT INTO words VALUES (:w, :n)"), [{"w": w, "n": i} for i, w in enumerate(words)])

    def rows():
        with eng.connect() as c:
            return sorted(c.exec_driver_sql("SELECT w, n FROM words").all())

    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{win1252_url}"\n')
    assert cli("init").code == 0
    snap = snapshot_on_both_paths(cli, monkeypatch, "words")
    drift_then_restore(cli, eng, snap["id"], "words", [
        "UPDATE words SET n = -1 WHERE w IN ('€uro', 'a')",
        "DELETE FROM words WHERE w = 'Ž'",
        "INSERT INTO words VALUES ('ë', 99)",
    ], {"added": 1, "modified": 2, "deleted": 1}, rows)
    eng.dispose()


def test_lines_the_database_encoding_cannot_store_are_a_clear_error():
    # a snapshot taken from a UTF8 database restored into a LATIN1 one: 'Ω' has no byte there
    lines = ["1\tcafé\n".encode(), "2\tΩmega\n".encode()]
    assert pgcopy.from_utf8(lines[:1], "latin-1", "public.words") == ["1\tcafé\n".encode("latin-1")]
    with pytest.raises(SourceError) as err:
        pgcopy.from_utf8(lines, "latin-1", "public.words")
    assert "public.words" in str(err.value) and "'Ω'" in str(err.value) and "latin-1" in str(err.value)
