"""PostgreSQL tables read in bulk by a ``psql`` child (backends/sql/pgbulk.py): the same lines
and digests as the libpq path, the reader's point in time, the fallback to libpq, secrets kept
off the command line, the child and its server process gone whenever a read ends early, and a
stalled read bounded by ``timeout``."""
from __future__ import annotations

import os
import shutil
import stat
import time

import pytest

sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg")

from snapshotter_backends.sql import base as sqlbase, pgbulk  # noqa: E402
from snapshotter.errors import SourceError  # noqa: E402
from test_pgcopy import db, conn, win1252_url  # noqa: E402,F401 - fixtures shared with the COPY tests

PSQL = shutil.which("psql")
pytestmark = pytest.mark.skipif(PSQL is None, reason="no psql program")

SHAPES = [
    "CREATE TABLE narrow (id bigint PRIMARY KEY, a integer, t text, r real)",
    "INSERT INTO narrow SELECT g, g * 7, 'row ' || g, g / 3.0 FROM generate_series(1, 30000) g",
    "CREATE TABLE wide (id bigint PRIMARY KEY, body text, doc jsonb)",
    "INSERT INTO wide SELECT g, repeat('the agent said ' || mod(g, 97) || E'\\t\\n\\\\ ', 20), "
    "jsonb_build_object('g', g, 'tags', jsonb_build_array('a', mod(g, 5))) FROM generate_series(1, 3000) g",
    "CREATE TABLE noise (id integer PRIMARY KEY, raw bytea)",
    "INSERT INTO noise SELECT g, decode(repeat(md5(random()::text), 9), 'hex') FROM generate_series(1, 5000) g",
    "CREATE TABLE embeddings (id integer PRIMARY KEY, v real[])",
    "INSERT INTO embeddings SELECT g, ARRAY(SELECT random()::real FROM generate_series(1, 384) WHERE g > 0) "
    "FROM generate_series(1, 500) g",
]


@pytest.fixture
def shapes(db):
    with db.connect() as c:
        for sql in SHAPES:
            c.exec_driver_sql(sql)
    return db


def lines_of(conn, table, mode, monkeypatch, where=None):
    monkeypatch.setenv(pgbulk.ENV_SWITCH, mode)
    doc = sqlbase.table_schema(conn, table, None)
    enc, batches = sqlbase.read_lines(conn, doc, where=where)
    return enc, [line for part in batches for line in part]


def spy_psql(tmp_path, log):
    """A ``psql`` that notes its command line (in ``log``, ``---`` after each call) and its
    environment (in ``log.env``), then runs the real one."""
    path = tmp_path / "psql"
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" --- >> {log}\nenv >> {log}.env\n"
                    f"exec {PSQL} \"$@\"\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize("table", ["awkward", "turns", "docs", "events", "narrow", "wide", "noise", "embeddings"])
def test_psql_reads_the_lines_libpq_reads(shapes, conn, table, monkeypatch):
    enc_libpq, by_libpq = lines_of(conn, table, "off", monkeypatch)
    enc_psql, by_psql = lines_of(conn, table, "always", monkeypatch)
    assert enc_psql == enc_libpq
    assert by_psql == by_libpq and len(by_libpq) > 0


def test_psql_is_used_for_big_tables_only_and_never_for_selections(shapes, conn, monkeypatch, tmp_path):
    log = tmp_path / "calls"
    psql = spy_psql(tmp_path, log)
    lines_of(conn, "narrow", psql, monkeypatch)  # ~1.4 MB: below MIN_TABLE_BYTES
    assert not log.exists()
    monkeypatch.setattr(pgbulk, "MIN_TABLE_BYTES", 1 << 20)
    _, lines = lines_of(conn, "narrow", psql, monkeypatch)
    assert log.read_text().count("---") == 1 and len(lines) == 30000
    _, some = lines_of(conn, "narrow", "always", monkeypatch, where=lambda t: t.c.id < 10)
    assert len(some) == 9 and log.read_text().count("---") == 1  # a selection keeps libpq


def test_psql_reads_the_transaction_snapshot(db, conn, monkeypatch):
    _, before = lines_of(conn, "events", "off", monkeypatch)
    with db.connect() as other:
        other.exec_driver_sql("DELETE FROM events WHERE mod(id, 2) = 0")
        other.exec_driver_sql("INSERT INTO events VALUES (999999, now(), 'late', 1)")
    _, after = lines_of(conn, "events", "always", monkeypatch)
    assert after == before


def test_a_write_transaction_keeps_libpq(db, monkeypatch, tmp_path):
    """A restore reads live rows inside its write transaction, whose changes no child sees."""
    log = tmp_path / "calls"
    monkeypatch.setenv(pgbulk.ENV_SWITCH, spy_psql(tmp_path, log))
    monkeypatch.setattr(pgbulk, "MIN_TABLE_BYTES", 0)
    with db.connect() as c:
        c.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
        c.exec_driver_sql("DELETE FROM events WHERE id > 10")
        _, batches = sqlbase.read_lines(c, sqlbase.table_schema(c, "events", None))
        assert sum(len(b) for b in batches) == 10
        c.exec_driver_sql("ROLLBACK")
    assert not log.exists()


def test_non_utf8_database_gives_the_same_lines(win1252_url, monkeypatch):  # noqa: F811
    eng = sa.create_engine(win1252_url)  # the connection speaks WIN1252; the child UTF8
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE words (w text PRIMARY KEY, n integer, note text)")
        c.exec_driver_sql("INSERT INTO words SELECT w || g, g, E'tab\\there ' || w FROM "
                          "unnest(ARRAY['a', 'é', '€uro', 'Ž', 'œuvre', 'naïve']) w, generate_series(1, 50) g")
    with eng.connect() as c:
        sqlbase.begin_snapshot(c)
        _, by_libpq = lines_of(c, "words", "off", monkeypatch)
        _, by_psql = lines_of(c, "words", "always", monkeypatch)
        sqlbase.end_transaction(c, commit=True)
    eng.dispose()
    assert by_psql == by_libpq and len(by_psql) == 300
    assert any("€".encode() in line for line in by_psql)


def test_snapshot_digests_agree_and_unchanged_resnapshot_reuses_chunks(pg_url, shapes, cli, tmp_path, monkeypatch):
    monkeypatch.setattr(pgbulk, "MIN_TABLE_BYTES", 0)
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{pg_url}"\n', encoding="utf-8")
    assert cli("init").code == 0
    out = {}
    for mode in ("off", "always", "auto"):
        monkeypatch.setenv(pgbulk.ENV_SWITCH, mode)
        r = cli("--json", "snapshot", "--release", "r")
        assert r.code == 0, r.err
        out[mode] = r.json()
    digests = {m: {n: s["digest"] for n, s in j["sources"]["db"]["streams"].items()} for m, j in out.items()}
    assert digests["off"] == digests["always"] == digests["auto"] and len(digests["off"]) == 8
    # the same chunks: the psql snapshot after the libpq one stores nothing new
    assert out["always"]["bytes_written"] == 0 and out["auto"]["bytes_written"] == 0


def test_without_psql_or_when_it_cannot_connect_libpq_reads(shapes, conn, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(pgbulk, "MIN_TABLE_BYTES", 0)
    _, expected = lines_of(conn, "wide", "off", monkeypatch)
    _, got = lines_of(conn, "wide", str(tmp_path / "no-such-psql"), monkeypatch)
    assert got == expected
    broken = tmp_path / "psql"
    broken.write_text("#!/bin/sh\necho 'psql: error: connection to server failed: Connection refused' >&2\nexit 2\n")
    broken.chmod(0o755)
    caplog.set_level("DEBUG", logger="snapshotter_backends.sql.postgresql")
    _, got = lines_of(conn, "wide", str(broken), monkeypatch)
    assert got == expected
    assert "psql failed (psql: error: connection to server failed: Connection refused)" in caplog.text
    # forced: no fallback, one line
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SourceError, match=r"^SNAPSHOTTER_PG_PSQL=always: .*no psql program found$"):
        lines_of(conn, "wide", "always", monkeypatch)


def test_a_sql_error_in_the_child_is_one_line(shapes, conn, monkeypatch):
    monkeypatch.setenv(pgbulk.ENV_SWITCH, "always")
    doc = sqlbase.table_schema(conn, "noise", None)
    pg = conn.connection.driver_connection
    script = pgbulk.script
    monkeypatch.setattr(pgbulk, "script", lambda select, *args: script(
        select.replace("FROM noise", "FROM noise WHERE 1 / (id - 4000) IS NOT NULL"), *args))
    _, batches = sqlbase.read_lines(conn, doc)
    with pytest.raises(sa.exc.DBAPIError) as err:
        for _ in batches:
            pass
    assert str(err.value.orig) == "ERROR: division by zero"
    assert pg.info.transaction_status.name == "INTRANS"  # the reader's transaction goes on


def test_secrets_go_to_the_child_in_its_environment_not_its_command_line(pg_url, shapes, monkeypatch, tmp_path):
    log = tmp_path / "calls"
    url = sa.engine.make_url(pg_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    eng = sa.create_engine(url)  # trust authentication: the password is sent, not needed
    monkeypatch.setenv(pgbulk.ENV_SWITCH, spy_psql(tmp_path, log))
    monkeypatch.setattr(pgbulk, "MIN_TABLE_BYTES", 0)
    with eng.connect() as c:
        sqlbase.begin_snapshot(c)
        _, lines = lines_of(c, "wide", os.environ[pgbulk.ENV_SWITCH], monkeypatch)
        sqlbase.end_transaction(c, commit=True)
    eng.dispose()
    assert len(lines) == 3000
    argv, env = log.read_text(), (tmp_path / "calls.env").read_text()
    assert argv.count("---") == 1 and "s3cret" not in argv
    assert "PGPASSWORD=s3cret-pw" in env.splitlines()
    assert f"PGDATABASE={sa.engine.make_url(pg_url).database}" in env.splitlines()


def _children(ppid: int) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == ppid and fields[0] != "Z":
                out.append(int(pid))
    return out


def _copy_backends(admin) -> list:
    deadline = time.monotonic() + 5
    while True:
        with admin.connect() as c:
            rows = c.exec_driver_sql("SELECT pid, state FROM pg_stat_activity "
                                     "WHERE starts_with(application_name, 'snapshotter-copy-') "
                                     "AND datname = current_database()").fetchall()
        if not rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["abandoned", "error"])
def test_a_read_ended_early_leaves_no_child_and_no_server_process(pg_url, db, conn, monkeypatch, how):
    with db.connect() as c:
        c.exec_driver_sql("CREATE TABLE big (id integer PRIMARY KEY, body text)")
        c.exec_driver_sql("INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 150000) g")
    monkeypatch.setenv(pgbulk.ENV_SWITCH, "always")
    before = set(_children(os.getpid()))
    _, batches = sqlbase.read_lines(conn, sqlbase.table_schema(conn, "big", None))
    next(batches)
    assert len(set(_children(os.getpid())) - before) == 1  # the psql child, still sending
    if how == "abandoned":
        batches.close()
    else:
        with pytest.raises(ZeroDivisionError):
            batches.throw(ZeroDivisionError)
    assert set(_children(os.getpid())) - before == set()
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        assert _copy_backends(admin) == []
    finally:
        admin.dispose()
    assert conn.exec_driver_sql("SELECT count(*) FROM big").scalar() == 150000  # the reader goes on


# -- blocks of lines into chunks (StreamWriter.add_encoded_block) ---------------------------

@pytest.mark.parametrize("D", [None, 256])
@pytest.mark.parametrize("key", ["single", "composite", "long", "unordered"])
def test_blocks_are_cut_where_their_lines_are(tmp_path, key, D):
    """The same chunks, digest and counts whether lines come one list at a time or as blocks
    of any size, max_bytes cuts included; keys too long for numpy, and keys whose order is
    checked line by line, go through the lines."""
    import random

    from snapshotter.repository import Repository
    from snapshotter.objectstore import open_store
    from snapshotter.streams import ChunkUploader, StreamWriter
    from snapshotter_backends.sql.pgtext import encoding_doc

    rnd = random.Random(7)
    oids = {"single": [20, 25, 25], "composite": [25, 23, 25], "long": [25, 25], "unordered": [1700, 25]}[key]
    cols = [f"c{i}" for i in range(len(oids))]
    doc = encoding_doc(cols, oids, cols[:2] if key == "composite" else cols[:1])
    lines = []
    for i in range(20000):
        k = {"single": str(i * 3), "composite": f"s{i // 100:05d}\t{i % 100}", "long": f"{'k' * 60}{i:08d}",
             "unordered": str(i)}[key]
        body = "x" * rnd.choice([1, 5, 40, 300 if rnd.random() < 0.9 else 9000])
        lines.append(f"{k}\t{body}\\t\\\\{'' if key == 'long' else chr(9) + 'é'}\n".encode())
    results = []
    for how in ("lines", "blocks", "small blocks"):
        repo, _ = Repository.init(open_store(str(tmp_path / f"repo-{how}")))
        repo.chunk_target_bytes, repo.chunk_max_bytes = 4096, 64 * 1024
        up = ChunkUploader(repo)
        w = StreamWriter(up, encoding=doc, records_per_boundary=D)
        size = {"lines": 0, "blocks": 1000, "small blocks": 7}[how]
        for i in range(0, len(lines), size or 1000):
            part = lines[i:i + (size or 1000)]
            if size:
                w.add_encoded_block(b"".join(part))
            else:
                w.add_encoded(part)
        entry = w.finish_entry()
        up.close()
        results.append((entry.digest, entry.records, entry.bytes, [tuple(c) for c in entry.chunks]))
    assert results[0] == results[1] == results[2]
    assert results[0][1] == 20000 and len(results[0][3]) > 20
    if D:
        assert any(c[2] >= 64 * 1024 for c in results[0][3])  # max_bytes cuts too


# -- the chunk's compression level --------------------------------------------------------

def test_chunks_with_few_repeats_are_compressed_at_level_1_and_read_back(tmp_path):
    """Random bytes as hex (incompressible bytea), floats and numbers come out of level 1 as
    small as out of level 3, several times faster; repetitive text keeps level 3."""
    import random

    import zstandard

    from snapshotter.objectstore import open_store
    from snapshotter.repository import Repository

    repo, _ = Repository.init(open_store(str(tmp_path / "repo")))
    rnd = random.Random(3)
    hexes = b"".join(b"%d\t\\\\x%s\n" % (i, rnd.randbytes(300).hex().encode()) for i in range(2000))
    floats = b"".join(b"%d\t{%s}\n" % (i, b",".join(b"%r" % rnd.random() for _ in range(40))) for i in range(2000))
    text = b"".join(b"%d\tthe agent answered the user about item %d of the plan\n" % (i, i % 50) for i in range(20000))
    level = {lvl: zstandard.ZstdCompressor(level=lvl, write_content_size=True) for lvl in (1, 3)}
    for raw, want in ((hexes, 1), (floats, 1), (text, 3), (hexes[:100_000], 3)):  # small chunks: level 3
        assert repo.compress(raw) == level[want].compress(raw)
        chunk_id, _, _ = repo.put_chunk(raw)
        assert repo.get_chunk(chunk_id, len(raw)) == raw
    at_1 = Repository.open(open_store(str(tmp_path / "repo")), compression_level=1)
    assert at_1.compress(text) == level[1].compress(text)


def test_the_reader_is_not_ended_as_idle_while_the_child_reads(pg_url, shapes, cli, tmp_path, monkeypatch):
    """A server that ends transactions idle for 1 s: the reader waits for its child longer than
    that without a statement of its own (the server works on a row for 2 s: a slow row-level
    security check), and its next table is still read."""
    import secrets

    role = "snap_idle_" + secrets.token_hex(3)
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        c.exec_driver_sql("CREATE FUNCTION slow(i bigint) RETURNS boolean LANGUAGE sql VOLATILE AS "
                          "$$ SELECT CASE WHEN i = 100 THEN pg_sleep(2) IS NOT NULL ELSE true END $$")
        c.exec_driver_sql("ALTER TABLE narrow ENABLE ROW LEVEL SECURITY")
        c.exec_driver_sql("CREATE POLICY p ON narrow FOR SELECT USING (slow(id))")
        c.exec_driver_sql(f"GRANT SELECT ON embeddings, narrow, wide TO {role}")
        c.exec_driver_sql(f"ALTER ROLE {role} SET idle_in_transaction_session_timeout = 1000")
    try:
        monkeypatch.setenv(pgbulk.ENV_SWITCH, "always")
        url = sa.engine.make_url(pg_url).set(username=role, password=None).render_as_string(hide_password=False)
        (tmp_path / "snapshotter.toml").write_text(
            f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{url}"\n'
            f'tables = ["embeddings", "narrow", "wide"]\n', encoding="utf-8")
        assert cli("init").code == 0
        r = cli("--json", "snapshot", "--release", "r")
        assert r.code == 0, r.err
        assert {n: s["records"] for n, s in r.json()["sources"]["db"]["streams"].items()} == \
            {"embeddings": 500, "narrow": 30000, "wide": 3000}
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP OWNED BY {role}")
            c.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()


def test_unqualified_names_resolve_as_on_the_readers_connection(db, monkeypatch):
    """The reader's search_path, set on its session (not in the connection's parameters),
    holds for the child too: another schema's table of the same name is not read."""
    with db.connect() as c:
        c.exec_driver_sql("CREATE SCHEMA other")
        c.exec_driver_sql("CREATE TABLE other.events (id bigint PRIMARY KEY, at timestamptz, payload text, "
                          "n numeric)")
        c.exec_driver_sql("INSERT INTO other.events VALUES (1, now(), 'other', 1)")
    with db.connect() as c:
        c.exec_driver_sql("SET search_path = other, public")
        sqlbase.begin_snapshot(c)
        doc = sqlbase.table_schema(c, "events", None)
        _, by_libpq = lines_of(c, "events", "off", monkeypatch)
        _, by_psql = lines_of(c, "events", "always", monkeypatch)
        sqlbase.end_transaction(c, commit=True)
    assert by_psql == by_libpq and len(by_psql) == 1 and doc["table"] == "events"
