"""PostgreSQL tables as COPY text lines (the ``pgtext`` record encoding).

The lines are what PostgreSQL's own COPY writes; these tests pin the promises
built on that: the COPY and the cursor paths produce the same lines, the lines
decode to the values a cursor returns, a restore writes the snapshot's rows
back exactly (types a client library would round off included), keys whose
database order is not Python's are refused, and snapshots of the older msgpack
encoding still restore onto PostgreSQL.
"""
from __future__ import annotations

import datetime
import decimal
import random

import pytest

sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg")

from snapshotter_backends.sql import base as sqlbase  # noqa: E402
from snapshotter_backends.sql import pgtext  # noqa: E402
from snapshotter.repository import Repository  # noqa: E402
from snapshotter.streams import read_stream  # noqa: E402

from conftest import drift_then_restore  # noqa: E402
from test_pgcopy import db  # noqa: E402,F401 - the database of every awkward type, shared


def test_escaping_round_trips_every_awkward_character():
    rng = random.Random(5)
    alphabet = "\\\t\n\r\b\f\v\x00\x01 aZé日🙂N"
    for _ in range(2000):
        fields = [None if rng.random() < 0.1 else "".join(rng.choices(alphabet.replace("\x00", ""), k=rng.randint(0, 12)))
                  for _ in range(rng.randint(1, 5))]
        line = pgtext.format_line(fields)
        assert line.endswith(b"\n") and line.count(b"\n") == 1  # an escaped newline never ends a line
        assert pgtext.split_line(line) == [None if f is None else f.encode("utf-8") for f in fields]
    # the literal text \N is not NULL
    assert pgtext.split_line(pgtext.format_line(["\\N", None])) == [b"\\N", None]


def _norm(v):
    """Values compared by meaning: aware times as UTC instants, NaN as text."""
    if isinstance(v, (float, decimal.Decimal)) and v != v:
        return "NaN"
    if isinstance(v, datetime.datetime) and v.tzinfo is not None:
        return ("tz", v.astimezone(datetime.timezone.utc))
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


@pytest.mark.parametrize("table", ["awkward", "turns"])
def test_lines_are_the_same_on_both_paths_and_decode_to_the_cursor_values(db, table):
    with db.connect() as conn:
        sqlbase.begin_snapshot(conn)
        doc = sqlbase.table_schema(conn, table, None)
        enc, batches = sqlbase.read_lines(conn, doc, fast=True)
        copied = [line for b in batches for line in b]
        enc2, batches = sqlbase.read_lines(conn, doc, fast=False)
        cursor = [line for b in batches for line in b]
        rows = [r for part in sqlbase.read_rows(conn, doc, fast=False) for r in part]
        sqlbase.end_transaction(conn, commit=True)
    assert enc == enc2 and enc["format"] == "pgtext"
    assert copied == cursor and len(copied) == len(rows) > 0
    rc = pgtext.PgTextCodec(enc)
    for line, (key, value) in zip(copied, rows):
        k, v = rc.decode(line)
        assert rc.key(line) == k == key
        assert _norm(v) == _norm(value)


def test_lines_do_not_depend_on_the_session_settings(db):
    """A snapshot taken under another time zone or date style stores the same lines."""
    out = []
    for settings in ([], ["SET TimeZone = 'America/Los_Angeles'", "SET DateStyle = 'SQL, DMY'",
                          "SET IntervalStyle = 'sql_standard'", "SET extra_float_digits = 3",
                          "SET bytea_output = 'escape'"]):
        with db.connect() as conn:
            for stmt in settings:
                conn.exec_driver_sql(stmt)
            sqlbase.begin_snapshot(conn)
            doc = sqlbase.table_schema(conn, "awkward", None)
            out.append([line for b in sqlbase.read_lines(conn, doc)[1] for line in b])
            # the reader's own settings are back once the lines are read
            if settings:
                assert conn.exec_driver_sql("SHOW TimeZone").scalar() == "America/Los_Angeles"
            sqlbase.end_transaction(conn, commit=True)
    assert out[0] == out[1]


def write_config(tmp_path, url, extra=""):
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{url}"\n{extra}', encoding="utf-8")


def snapshot_of(cli, tmp_path, url, table) -> dict:
    """A repository holding one snapshot of ``table``; its JSON."""
    write_config(tmp_path, url, f'tables = ["{table}"]\n')
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r")
    assert snap.code == 0, snap.err
    return snap.json()


def table_text(engine, table):
    with engine.connect() as c:
        return c.exec_driver_sql(f'SELECT t::text FROM "{table}" t ORDER BY 1').scalars().all()


def changed_then_restored(cli, eng, table: str, change: str, incident: str) -> dict:
    """Run ``change``, restore the repository's only snapshot as ``incident``: it must verify
    and give the table back as it was (every value's text); the restore's JSON."""
    original = table_text(eng, table)
    with eng.connect() as c:
        c.exec_driver_sql(change)
    snap = cli("--json", "list").json()[0]["id"]
    r = cli("--json", "restore", snap, "--yes", "--incident", incident)
    assert r.code == 0, r.err
    assert r.json()["verified"] is True and table_text(eng, table) == original
    return r.json()


def test_restore_writes_back_exactly_what_a_client_would_round_off(pg_url, tmp_path, cli):
    """Months in an interval, float4, char padding, inet, ranges: a decoded round trip
    would change some of them; lines written back through COPY change none."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("""CREATE TABLE odd (id int PRIMARY KEY, iv interval, f4 real, c char(6),
                             addr inet, net cidr, r int4range, tr tstzrange, pt point, m money, bits bit varying(12))""")
        c.exec_driver_sql("""INSERT INTO odd SELECT g, make_interval(months => g, days => g), g / 3.0,
                             'x' || g, ('10.0.' || mod(g, 250) || '.1/24')::inet, '10.1.0.0/16', int4range(g, g + 5),
                             tstzrange('2026-01-01', '2026-02-01'), point(g, -g), g * 1.25, B'101'
                             FROM generate_series(1, 300) g""")
    snap = snapshot_of(cli, tmp_path, pg_url, "odd")
    original = table_text(eng, "odd")
    with eng.connect() as c:
        c.exec_driver_sql("UPDATE odd SET iv = iv + interval '1 day', f4 = f4 + 1, addr = '192.168.0.1' WHERE mod(id, 3) = 0")
        c.exec_driver_sql("DELETE FROM odd WHERE mod(id, 7) = 0")
        c.exec_driver_sql("INSERT INTO odd (id, iv) VALUES (1000, '1 year')")
    diff = cli("--json", "diff", snap["id"]).json()["plan"]["db"]["odd"]
    assert diff == {"added": 1, "modified": 86, "deleted": 42}
    r = cli("--json", "restore", snap["id"], "--yes", "--incident", "inc-odd")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    assert table_text(eng, "odd") == original
    # the quarantine shows what was overwritten, network addresses and ranges as their text
    shown = cli("--json", "quarantine", "show", "inc-odd").json()
    assert len(shown) == 129 and {x["op"] for x in shown} == {"added", "modified", "deleted"}
    third = next(x for x in shown if x["key"] == 3)
    assert third["value"]["addr"] == "192.168.0.1" and third["snapshot_value"]["addr"] == "10.0.3.1/24"
    assert third["snapshot_value"]["r"] == "[3,8)"
    assert cli("--json", "diff", snap["id"]).json()["plan"]["db"]["odd"] == \
        {"added": 0, "modified": 0, "deleted": 0}
    eng.dispose()


def test_keys_the_database_orders_by_value_not_text_are_read_in_text_order(pg_url, tmp_path, cli):
    """An enum sorts in its declaration order and inet by address ('10.0.0.9' before
    '10.0.0.10'); their keys come back as text, so they are read in the order of their
    text (they could not be snapshotted at all before: 'records out of key order')."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TYPE level AS ENUM ('low', 'high', 'critical')")
        c.exec_driver_sql("CREATE DOMAIN posint AS integer CHECK (VALUE > 0)")
        # a domain over a number keeps its number order (its type name says nothing of that)
        c.exec_driver_sql("CREATE TABLE alerts (lvl level, host inet, mac macaddr, n posint, note text, "
                          "PRIMARY KEY (lvl, host, mac, n))")
        c.exec_driver_sql("""INSERT INTO alerts VALUES ('low', '10.0.0.9', '08:00:2b:01:02:03', 1, 'a'),
                             ('low', '10.0.0.10', '08:00:2b:01:02:03', 1, 'b'), ('high', '::1', '08:00:2b:01:02:04', 1, 'c'),
                             ('critical', '10.0.0.9', '08:00:2b:01:02:04', 1, 'd')""")
        c.exec_driver_sql("""INSERT INTO alerts SELECT 'low', '10.0.0.9', '08:00:2b:01:02:03', g, 'n'
                             FROM generate_series(2, 12) g""")
    snap = snapshot_of(cli, tmp_path, pg_url, "alerts")
    assert snap["records"] == 15
    drift_then_restore(cli, eng, snap["id"], "alerts", [
        "UPDATE alerts SET note = 'x' WHERE host = '10.0.0.10'",
        "DELETE FROM alerts WHERE lvl = 'high'",
        "INSERT INTO alerts VALUES ('critical', '10.0.0.1', '08:00:2b:01:02:05', 1, 'new')",
        "INSERT INTO alerts VALUES ('low', '10.0.0.9', '08:00:2b:01:02:03', 100, 'new')",
    ], {"added": 2, "modified": 1, "deleted": 1}, lambda: table_text(eng, "alerts"))
    eng.dispose()


def keyed_table_restores(cli, tmp_path, pg_url: str, table: str, setup: list[str], changes: list[str],
                         plan: dict):
    """Build ``table`` with ``setup``, snapshot it, apply ``changes``: diff must count ``plan``
    and a restore must verify and give the table back; the engine, for more checks."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        for sql in setup:
            c.exec_driver_sql(sql)
    snap = snapshot_of(cli, tmp_path, pg_url, table)
    drift_then_restore(cli, eng, snap["id"], table, changes, plan, lambda: table_text(eng, table))
    return eng


def test_money_keys_keep_text_order(pg_url, tmp_path, cli):
    """money is a number to PostgreSQL but loads as text ('$1,000.00'): read in text order."""
    keyed_table_restores(cli, tmp_path, pg_url, "prices", [
        "CREATE TABLE prices (amt money PRIMARY KEY, note text)",
        "INSERT INTO prices VALUES (2, 'a'), (10, 'b'), (1000, 'c')",
    ], ["UPDATE prices SET note = 'x' WHERE amt = 10::money"], {"added": 0, "modified": 1, "deleted": 0}).dispose()


def test_array_keys_restore(pg_url, tmp_path, cli):
    """An int[] primary key: the restore's keyed re-read matches arrays, not rows
    ('operator does not exist: integer[] = record')."""
    keyed_table_restores(cli, tmp_path, pg_url, "paths", [
        "CREATE TABLE paths (p int[] PRIMARY KEY, note text)",
        "INSERT INTO paths VALUES ('{1,2}', 'a'), ('{1,10}', 'b'), ('{3}', 'c')",
    ], ["UPDATE paths SET note = 'x' WHERE p = '{1,10}'", "DELETE FROM paths WHERE p = '{3}'"],
        {"added": 0, "modified": 1, "deleted": 1}).dispose()


def test_real_keys_restore_and_reapply(pg_url, tmp_path, cli):
    """A real (float4) key: the restore's keyed reads and deletes must find 0.2, which a
    float8 bind (0.2000000000000000111) never equals; verification failed and rolled back."""
    eng = keyed_table_restores(cli, tmp_path, pg_url, "weights", [
        "CREATE TABLE weights (k real PRIMARY KEY, v text)",
        "INSERT INTO weights VALUES (0.1, 'a'), (0.2, 'b'), (1.5, 'c')",
    ], ["UPDATE weights SET v = 'x' WHERE k = 0.2::real", "INSERT INTO weights VALUES (0.3, 'injected')"],
        {"added": 1, "modified": 1, "deleted": 0})
    inc = cli("--json", "quarantine", "list").json()[0]["incident"]
    r = cli("quarantine", "reapply", inc, "0.2", "0.3", "--yes")
    assert r.code == 0, r.err
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT v FROM weights WHERE k = 0.2::real").scalar_one() == "x"
        assert c.exec_driver_sql("SELECT v FROM weights WHERE k = 0.3::real").scalar_one() == "injected"
    eng.dispose()


def test_values_python_cannot_hold_are_shown_as_text_and_restored(pg_url, tmp_path, cli):
    """infinity, -infinity, BC dates, years past 9999: a cursor cannot load them, so
    diff and the quarantine show their text; restore writes the stored lines back."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE valid (id int PRIMARY KEY, until timestamptz, born date, note text)")
        c.exec_driver_sql("""INSERT INTO valid VALUES (1, '-infinity', '0044-03-15 BC', 'a'),
                             (2, 'infinity', 'infinity', 'b'), (3, '2026-01-01', '10000-01-01', 'c'),
                             (4, '2026-01-01', '2026-01-01', 'd')""")
    snapshot_of(cli, tmp_path, pg_url, "valid")
    changed_then_restored(cli, eng, "valid", "UPDATE valid SET note = 'x', until = 'infinity' WHERE id <> 2",
                          "inc-inf")
    shown = {x["key"]: x for x in cli("--json", "quarantine", "show", "inc-inf").json()}
    assert sorted(shown) == [1, 3, 4]
    assert shown[1]["snapshot_value"]["until"] == "-infinity" and shown[1]["snapshot_value"]["born"] == "0044-03-15 BC"
    assert shown[1]["value"]["until"] == "infinity"
    assert shown[3]["snapshot_value"]["born"] == "10000-01-01"
    assert shown[4]["snapshot_value"]["born"] == datetime.date(2026, 1, 1).isoformat()
    eng.dispose()


def test_snapshots_in_the_msgpack_encoding_still_restore_onto_postgresql(db, pg_url, tmp_path, cli, monkeypatch):
    """Snapshots taken before PostgreSQL tables were stored as lines decode and restore as before."""
    from snapshotter_backends.sql import SQLReader
    write_config(tmp_path, pg_url, 'tables = ["turns"]\n')
    assert cli("init").code == 0
    with monkeypatch.context() as m:
        m.setattr(SQLReader, "read_encoded", lambda self, spec, sessions=None: None)
        snap = cli("--json", "snapshot", "--release", "old").json()
    from snapshotter.objectstore import open_store
    repo = Repository.open(open_store(str(tmp_path / "repo")))
    assert "encoding" not in repo.load_manifest(repo.resolve(snap["id"]))["sources"]["db"]["streams"]["turns"]
    original = table_text(db, "turns")
    with db.connect() as c:
        c.exec_driver_sql("UPDATE turns SET content = 'changed' WHERE mod(seq, 5) = 0")
        c.exec_driver_sql("DELETE FROM turns WHERE seq = 40")
    d = cli("--json", "diff", snap["id"])
    assert d.code == 0, d.err
    assert d.json()["plan"]["db"]["turns"] == {"added": 0, "modified": 42, "deleted": 6}
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert table_text(db, "turns") == original
    # and a new snapshot of the same table is stored as lines
    new = cli("--json", "snapshot", "--release", "new").json()
    assert repo.load_manifest(repo.resolve(new["id"]))["sources"]["db"]["streams"]["turns"]["encoding"]["format"] \
        == "pgtext"


def test_stored_lines_read_back_as_records(db, pg_url, tmp_path, cli):
    snap = snapshot_of(cli, tmp_path, pg_url, "turns")
    from snapshotter.objectstore import open_store
    repo = Repository.open(open_store(str(tmp_path / "repo")))
    entry = repo.load_manifest(repo.resolve(snap["id"]))["sources"]["db"]["streams"]["turns"]
    assert entry["encoding"]["format"] == "pgtext" and entry["encoding"]["key"] == ["session", "seq"]
    records = list(read_stream(repo, entry))
    with db.connect() as c:
        rows = c.exec_driver_sql("SELECT session, seq, content FROM turns ORDER BY session COLLATE \"C\", seq").all()
    assert [r.key for r in records] == [[s, q] for s, q, _ in rows]
    assert [r.value["content"] for r in records] == [c for _, _, c in rows]
    assert b"".join(r.raw for r in records).count(b"\n") == len(rows)
    assert cli("--json", "verify", "--read-data").json()["ok"] is True


def test_a_trigger_that_alters_rows_does_not_fire_during_the_restore(pg_url, tmp_path, cli):
    """A trigger that alters rows as they are written (here: only row 15) is kept from
    firing by the restore (session_replication_role = replica), so the table comes back
    exactly; afterwards it fires again for the agent's own writes."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE notes (id int PRIMARY KEY, note text)")
        c.exec_driver_sql("INSERT INTO notes SELECT g, 'n' || g FROM generate_series(1, 2000) g")
    snap = snapshot_of(cli, tmp_path, pg_url, "notes")
    original = table_text(eng, "notes")
    with eng.connect() as c:
        c.exec_driver_sql("UPDATE notes SET note = 'bad' WHERE id BETWEEN 10 AND 20")
        c.exec_driver_sql("INSERT INTO notes VALUES (5000, 'new')")
        c.exec_driver_sql("""CREATE FUNCTION mangle() RETURNS trigger AS $$
                             BEGIN IF NEW.id IN (15, 6000) THEN NEW.note := NEW.note || '!'; END IF; RETURN NEW; END
                             $$ LANGUAGE plpgsql""")
        c.exec_driver_sql("CREATE TRIGGER mangle BEFORE INSERT OR UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION mangle()")
    r = cli("--json", "restore", snap["id"], "--yes", "--incident", "inc-v")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert table_text(eng, "notes") == original
    with eng.connect() as c:
        c.exec_driver_sql("INSERT INTO notes VALUES (6000, 'x')")
        assert c.exec_driver_sql("SELECT note FROM notes WHERE id = 6000").scalar() == "x!"
    eng.dispose()


def test_rows_big_enough_to_fill_chunks_are_cut_at_max_bytes(pg_url, tmp_path, cli):
    """Lines are cut by size when a run between two boundaries outgrows max_bytes, and
    such a table still verifies and restores exactly."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE blobs (id int PRIMARY KEY, body text)")
        # small rows first, so the boundary divisor is chosen from them and big runs form later
        c.exec_driver_sql("INSERT INTO blobs SELECT g, CASE WHEN mod(g, 300) = 0 AND g > 600 "
                          "THEN repeat(md5(g::text), 100000) ELSE 'small ' || g END FROM generate_series(1, 3000) g")
    snap = snapshot_of(cli, tmp_path, pg_url, "blobs")
    from snapshotter.objectstore import open_store
    repo = Repository.open(open_store(str(tmp_path / "repo")))
    entry = repo.load_manifest(repo.resolve(snap["id"]))["sources"]["db"]["streams"]["blobs"]
    sizes = [row[2] for row in entry["chunks"]]
    assert sum(row[1] for row in entry["chunks"]) == 3000
    assert len(sizes) >= 2 and max(sizes) < repo.chunk_max_bytes + 3_300_000  # one 3.2 MB row past max_bytes at most
    assert cli("--json", "verify", "--read-data").json()["ok"] is True
    original = table_text(eng, "blobs")
    with eng.connect() as c:
        c.exec_driver_sql("UPDATE blobs SET body = 'gone' WHERE id IN (40, 900, 1200)")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0 and r.json()["quarantined"] == 3, r.err
    assert table_text(eng, "blobs") == original
    eng.dispose()


def _reference_ops(live: dict, snap: dict) -> list:
    ops = []
    for k in sorted(set(live) | set(snap)):
        if k not in snap:
            ops.append(("added", k))
        elif k not in live:
            ops.append(("deleted", k))
        elif live[k] != snap[k]:
            ops.append(("modified", k))
    return ops


@pytest.mark.parametrize("seed", range(12))
def test_block_merge_finds_exactly_the_differing_lines_across_chunk_and_batch_edges(seed):
    """The restore plan's merge compares blocks of lines against the snapshot's chunk
    bytes: whatever the drift (none, sparse, runs, everything), the chunk cuts and the
    live batch sizes, its plan is the plain key-by-key comparison's, the snapshot's
    digest and record count are those of all its lines, and quarantined lines are the
    exact live and snapshot lines."""
    import hashlib
    from snapshotter.restore.plan import StreamPlan, _merge_lines

    rng = random.Random(seed)
    rc = pgtext.PgTextCodec({"format": "pgtext", "columns": ["id", "body"], "oids": [20, 25], "key": ["id"]})
    n = rng.choice([0, 1, 7, 300, 3000])
    rate = rng.choice([0.0, 0.001, 0.01, 0.3, 1.0])
    snap = {i: f"row {i} " + "x" * rng.randint(0, 40) for i in range(0, 2 * n, 2)}
    live = dict(snap)
    for k in list(snap):
        r = rng.random()
        if r < rate / 3:
            del live[k]
        elif r < 2 * rate / 3:
            live[k] = snap[k] + "\\ drift\t\n"  # escaped characters in a changed line
    for k in range(1, 2 * n + 2, 2):
        if rng.random() < rate / 3:
            live[k] = f"new {k}"
    if seed % 4 == 0 and n:  # a long run of changes and one line longer than any block
        for k in sorted(snap)[n // 3: n // 3 + 50]:
            live[k] = "y" * 5000

    def line(k, v):
        return pgtext.format_line([str(k), v])

    snap_lines = [line(k, snap[k]) for k in sorted(snap)]
    live_lines = [line(k, live[k]) for k in sorted(live)]
    chunks, i = [], 0
    while i < len(snap_lines):
        j = i + rng.randint(1, 400)
        chunks.append(b"".join(snap_lines[i:j]))
        i = j
    batches, i = [], 0
    while i < len(live_lines):
        j = i + rng.randint(1, 700)
        batches.append(live_lines[i:j])
        i = j

    got, raws = [], {}

    def quarantine(key, op, live_value, snap_value, live_raw=None, snap_raw=None):
        got.append((op, key))
        raws[key] = (live_raw, snap_raw)

    plan, digest = StreamPlan(), hashlib.sha256()
    _merge_lines(iter(chunks), iter(batches), rc, plan, digest, quarantine)
    assert got == _reference_ops(live, snap)
    assert plan.snapshot_records == len(snap_lines)
    assert digest.hexdigest() == hashlib.sha256(b"".join(snap_lines)).hexdigest()
    assert (plan.added, plan.modified, plan.deleted) == tuple(sum(op == o for op, _ in got)
                                                              for o in ("added", "modified", "deleted"))
    for op, key in got:
        live_raw, snap_raw = raws[key]
        assert live_raw == (line(key, live[key]) if op != "deleted" else None)
        assert snap_raw == (line(key, snap[key]) if op != "added" else None)


def test_reapply_writes_back_the_quarantined_rows_exactly(pg_url, tmp_path, cli):
    """A row re-applied from the quarantine is the row the agent had, to the last
    month of an interval and bit of a real: the bundle keeps its line and the
    encoding of that line, and reapply writes the line back through COPY."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE odd (id int PRIMARY KEY, iv interval, f4 real, c char(6), r int4range)")
        c.exec_driver_sql("""INSERT INTO odd SELECT g, make_interval(months => g, days => g), g / 3.0, 'x' || g,
                             int4range(g, g + 5) FROM generate_series(1, 50) g""")
    snap = snapshot_of(cli, tmp_path, pg_url, "odd")["id"]
    with eng.connect() as c:
        c.exec_driver_sql("UPDATE odd SET iv = make_interval(months => 7, days => 40), f4 = 1 / 7.0 WHERE id = 5")
        c.exec_driver_sql("INSERT INTO odd VALUES (99, '1 mon 35 days', 0.1, 'ab', '[1,2)')")
    agent = table_text(eng, "odd")
    r = cli("--json", "restore", snap, "--yes", "--incident", "inc-re")
    assert r.code == 0 and r.json()["verified"], r.err
    assert table_text(eng, "odd") != agent
    r = cli("--json", "quarantine", "reapply", "inc-re", "5", "99", "--yes")
    assert r.code == 0, r.err
    assert table_text(eng, "odd") == agent
    eng.dispose()


def test_a_dropped_table_with_types_sqlalchemy_does_not_know_is_recreated(pg_url, tmp_path, cli):
    """point, tsvector, a range of a custom domain...: the snapshot records PostgreSQL's
    own name of each type SQLAlchemy cannot reflect, so a dropped table comes back with
    its types and rows exactly."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE shapes (id int PRIMARY KEY, pt point, doc tsvector, box box, "
                          "cells int4range, tags text[])")
        c.exec_driver_sql("""INSERT INTO shapes SELECT g, point(g, -g), to_tsvector('english', 'refund order ' || g),
                             box(point(0, 0), point(g, g)), int4range(g, g + 3), ARRAY['a', 'b' || g]
                             FROM generate_series(1, 40) g""")
        types = c.exec_driver_sql("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                                  "WHERE attrelid = 'shapes'::regclass AND attnum > 0 ORDER BY attnum").fetchall()
    snap = snapshot_of(cli, tmp_path, pg_url, "shapes")
    original = table_text(eng, "shapes")
    with eng.connect() as c:
        c.exec_driver_sql("DROP TABLE shapes")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0 and r.json()["verified"], r.err
    assert table_text(eng, "shapes") == original
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                                 "WHERE attrelid = 'shapes'::regclass AND attnum > 0 ORDER BY attnum").fetchall() == types
        live = sqlbase.table_schema(c, "shapes", None)
    eng.dispose()
    # a snapshot from before type names were recorded ("NULL") still restores onto the table
    older = dict(live, columns=[dict(col, type="NULL") if col["name"] == "pt" else col for col in live["columns"]])
    assert sqlbase.schema_differences(older, live) == []
    assert sqlbase.schema_differences(dict(older, dialect="mysql"), live) != []  # elsewhere NULL is still a type
    assert sqlbase.schema_differences(dict(older, columns=[dict(col, type="text") if col["name"] == "pt" else col
                                                           for col in live["columns"]]), live) != []


def test_a_dropped_table_comes_back_from_its_stored_lines(pg_url, tmp_path, cli):
    """A dropped table is recreated and its rows written back through COPY from the
    stored lines, like a drifted one: interval months, json spacing and inet survive (the
    decoded values turned '1 mon' into '30 days' and failed on inet), and the restore
    verifies them line by line."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE gone (id int PRIMARY KEY, iv interval, doc json, addr inet)")
        c.exec_driver_sql("""INSERT INTO gone VALUES (1, '1 mon', '{"b": 1,  "a": 2}', '10.0.0.1/8'),
                             (2, '2 days', '[1]', NULL)""")
    snap = snapshot_of(cli, tmp_path, pg_url, "gone")
    restored = changed_then_restored(cli, eng, "gone", "DROP TABLE gone", "inc-gone")
    assert restored["plan"]["db"]["gone"]["deleted"] == 2
    assert cli("--json", "diff", snap["id"]).json()["plan"]["db"]["gone"] == {"added": 0, "modified": 0, "deleted": 0}
    shown = cli("--json", "quarantine", "show", "inc-gone").json()
    assert sorted((x["key"], x["op"]) for x in shown) == [(1, "deleted"), (2, "deleted")]
    eng.dispose()


def test_recorded_type_names_do_not_depend_on_the_search_path(pg_url):
    """A type SQLAlchemy does not know is recorded with its schema whether or not that
    schema is on the session's search_path (a role's path may change between snapshot
    and restore; the schemas must still compare equal)."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE SCHEMA ext; CREATE TYPE ext.pair AS (a int, b int); "
                          "CREATE TABLE pairs (id int PRIMARY KEY, pr ext.pair, pra ext.pair[], p point)")
        plain = sqlbase.table_schema(c, "pairs", None)
        c.exec_driver_sql("SET search_path = public, ext")
        on_path = sqlbase.table_schema(c, "pairs", None)
    eng.dispose()
    assert [col["type"] for col in plain["columns"]] == ["INTEGER", "ext.pair", "ext.pair[]", "point"]
    assert on_path == plain and sqlbase.schema_differences(plain, on_path) == []
