"""MariaDB/MySQL tables as lines of the client's batch text (the ``mytext`` record encoding).

The promises pinned here: the client's path and the driver's path give the same lines byte
for byte (so the same digests), on awkward values and on every benchmark shape; the lines
decode to exactly the values PyMySQL gives; one client session reads every table of a
snapshot at one point in time; the client is ended with the read, on an error and on a
stall, and never sees the password on its command line; restores work from a snapshot in
this encoding and from one in the older msgpack encoding.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

sa = pytest.importorskip("sqlalchemy")
pytest.importorskip("pymysql")

from snapshotter_backends.sql import base as sqlbase  # noqa: E402
from snapshotter_backends.sql import myread, mytext  # noqa: E402
from snapshotter.repository import Repository  # noqa: E402

from conftest import drift_then_restore  # noqa: E402

pytestmark = pytest.mark.skipif(myread.client_binary() is None, reason="no mariadb/mysql client on the PATH")

AWKWARD = """CREATE TABLE awkward (id BIGINT PRIMARY KEY, i INT, s VARCHAR(40), f FLOAT, d DOUBLE,
    n DECIMAL(20,6), b VARBINARY(20), bl BLOB, dt DATETIME(6), ts TIMESTAMP NULL, da DATE, tm TIME, j JSON,
    bt BIT(12), e ENUM('a','b'), st SET('x','y'), y YEAR, nn VARCHAR(10) NOT NULL, u BIGINT UNSIGNED)"""
AWKWARD_ROWS = r"""INSERT INTO awkward VALUES
 (1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'NULL', NULL),
 (2, -5, 'NULL', 1.5, 1e300, 12.5, x'00ff0a095c0d', x'4e554c4c', '2024-01-02 03:04:05.5', '2024-01-02 03:04:05',
  '2024-02-29', '-838:59:59', '{"a": [1, "x\\ty"]}', b'101', 'b', 'x,y', 2001, 'a\tb\nc\rd\\e', 18446744073709551615),
 (3, 7, 'é😀\0z', 3.4e38, -0.0, -0.000001, '', '', '1970-01-01', NULL, '1000-01-01', '00:00:00', '[]', b'0', 'a',
  '', 1901, '', 0),
 (4, 0, '\\N', 0.1, 0.1, 0, 'NULL', NULL, '9999-12-31 23:59:59.999999', NULL, '2000-01-01', '12:00:00.5',
  'null', NULL, NULL, NULL, NULL, '\\', NULL)"""


@pytest.fixture
def eng(mysql_url):
    e = sa.create_engine(mysql_url, isolation_level="AUTOCOMMIT")
    yield e
    e.dispose()


def _engine(url):
    return sqlbase.make_engine(sa.engine.make_url(url), "source 'db'", 10)


def _both_paths(url, table):
    """(client lines, driver lines, doc, values the cursor gives) of one table."""
    e = _engine(url)
    try:
        with e.connect() as conn:
            doc = sqlbase.table_schema(conn, table, None)
            rows = [r for part in sqlbase.read_rows(conn, doc) for r in part]
            sqlbase.begin_snapshot(conn)
            enc, batches = sqlbase.read_lines(conn, doc, fast=True)
            fast = [line for b in batches for line in b]
            enc2, batches = sqlbase.read_lines(conn, doc, fast=False)
            slow = [line for b in batches for line in b]
            sqlbase.end_transaction(conn, commit=True)
    finally:
        e.dispose()
    assert enc == enc2 and enc["format"] == "mytext"
    return fast, slow, enc, rows


def test_escaping_round_trips_every_awkward_byte():
    import random
    rng = random.Random(7)
    alphabet = [b"\\", b"\t", b"\n", b"\r", b"\x00", b"N", b"U", b"L", b"a", "é".encode(), b"\xff"]
    doc = {"format": "mytext", "columns": ["k", "a", "b"], "types": [253, 252, 253], "binary": [False, True, False],
           "masked": ["a", "b"], "key": ["k"]}
    rc = mytext.MyTextCodec(doc)
    for _ in range(2000):
        row = [b"k" + str(rng.random()).encode()] + [None if rng.random() < 0.2 else b"".join(
            rng.choices(alphabet, k=rng.randint(0, 8))) for _ in range(2)]
        line = mytext.format_row(row, rc.masked_index)
        assert line.count(b"\n") == 1 and line.endswith(b"\n")
        assert rc.split(line) == row
    assert rc.split(mytext.format_row([b"1", b"NULL", None], rc.masked_index)) == [b"1", b"NULL", None]


def test_awkward_values_the_same_lines_on_both_paths_decoding_to_the_cursor_values(eng, mysql_url):
    with eng.connect() as c:
        c.exec_driver_sql(AWKWARD)
        c.exec_driver_sql(AWKWARD_ROWS)
    fast, slow, enc, rows = _both_paths(mysql_url, "awkward")
    assert fast == slow and len(fast) == 4
    assert enc["masked"] == ["s", "b", "bl", "j", "bt", "e", "st"]  # numbers and dates print NULL only for NULL
    rc = mytext.MyTextCodec(enc)
    for line, (key, value) in zip(fast, rows):
        k, v = rc.decode(line)
        assert rc.key(line) == k == key
        assert v == value
        assert [type(x) for x in v.values()] == [type(x) for x in value.values()]
    assert rows[0][1]["s"] is None and rows[1][1]["s"] == "NULL" and rows[0][1]["nn"] == "NULL"


@pytest.mark.parametrize("shape", ["narrow", "wide", "incompressible", "embeddings", "keys"])
def test_every_shape_the_same_lines_on_both_paths(eng, mysql_url, shape):
    ddl, fill = {
        "narrow": ("id BIGINT PRIMARY KEY, n INT, label VARCHAR(32), score FLOAT",
                   "SELECT seq, (seq * 7919) % 100000, CONCAT('item-', seq % 1000), (seq % 9973) / 7.0 FROM seq_1_to_3000"),
        "wide": ("id BIGINT PRIMARY KEY, body TEXT, meta JSON",
                 "SELECT seq, REPEAT(CONCAT('lorem ', seq), 20), JSON_OBJECT('tags', JSON_ARRAY(seq % 7), 'n', 'x\ty') "
                 "FROM seq_1_to_500"),
        "incompressible": ("id BIGINT PRIMARY KEY, payload VARBINARY(300)",
                           "SELECT seq, RANDOM_BYTES(300) FROM seq_1_to_500"),
        "embeddings": ("id BIGINT PRIMARY KEY, embedding LONGTEXT",
                       "SELECT seq, CONCAT('[', seq / 3, ', -', seq / 7, ', 1e-30]') FROM seq_1_to_200"),
        # a composite key, text in a case-insensitive collation whose order is not Python's
        "keys": ("k VARCHAR(20) COLLATE utf8mb4_general_ci, n INT, v TEXT, PRIMARY KEY (k, n)",
                 "SELECT ELT(1 + seq % 8, 'a', 'B', 'é', 'Z', '😀', 'a b', 'E', 'ß'), seq, "
                 "IF(seq % 3, NULL, 'NULL') FROM seq_1_to_400"),
    }[shape]
    with eng.connect() as c:
        c.exec_driver_sql(f"CREATE TABLE t ({ddl})")
        c.exec_driver_sql(f"INSERT IGNORE INTO t {fill}".replace("%", "%%"))
    fast, slow, enc, rows = _both_paths(mysql_url, "t")
    assert fast == slow and len(fast) == len(rows) > 100
    rc = mytext.MyTextCodec(enc)
    keys = [rc.key(line) for line in fast]
    assert keys == [k for k, _ in rows] and keys == sorted(keys)
    assert [rc.decode(line)[1] for line in fast] == [v for _, v in rows]


def test_a_latin1_connection_gives_the_same_lines(eng, mysql_url):
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE l1 (k VARCHAR(10) PRIMARY KEY, v VARCHAR(10)) CHARACTER SET latin1")
        c.exec_driver_sql("INSERT INTO l1 VALUES ('€', 'é'), ('a', NULL), ('z', 'NULL')")
    fast, slow, enc, rows = _both_paths(mysql_url, "l1")
    latin = mysql_url.replace("charset=utf8mb4", "charset=latin1")
    fast1, slow1, enc1, rows1 = _both_paths(latin, "l1")
    assert fast == slow == fast1 == slow1


def _config(tmp_path, url, extra=""):
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{url}"\n{extra}', encoding="utf-8")


def _snapshot(cli, tmp_path, url, extra=""):
    _config(tmp_path, url, extra)
    if not (tmp_path / "repo").exists():
        assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    return r.json()["id"]


def _entry(tmp_path, sid, table):
    from snapshotter.objectstore import open_store
    repo = Repository.open(open_store(str(tmp_path / "repo")))
    return repo.load_manifest(repo.resolve(sid))["sources"]["db"]["streams"][table]


def _encoding(tmp_path, sid, table):
    return _entry(tmp_path, sid, table).get("encoding")


def _children() -> list[tuple[int, str]]:
    """This process's live children: (pid, command line)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and state != "Z":
            out.append((int(pid), cmd))
    return out


def test_one_point_in_time_for_every_table_and_the_client_ended_with_the_reader(eng, mysql_url, tmp_path):
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE a (id INT PRIMARY KEY, v TEXT)")
        c.exec_driver_sql("CREATE TABLE b (id INT PRIMARY KEY, v TEXT)")
        c.exec_driver_sql("INSERT INTO a VALUES (1, 'x'), (2, 'y')")
        c.exec_driver_sql("INSERT INTO b VALUES (1, 'x')")
    from snapshotter.config import load_config
    _config(tmp_path, mysql_url)
    reader = load_config(str(tmp_path / "snapshotter.toml")).open_source("db").reader()
    try:
        specs = {s.name: s for s in reader.streams()}
        doc, batches = reader.read_encoded(specs["a"])
        a = [line for b in batches for line in b]
        clients = [p for p in _children() if "--defaults-file=" in p[1]]
        assert len(clients) == 1
        # written between the reads of the two tables (and to the one already read)
        with eng.connect() as c:
            c.exec_driver_sql("INSERT INTO b VALUES (2, 'new')")
            c.exec_driver_sql("UPDATE a SET v = 'changed'")
        doc, batches = reader.read_encoded(specs["b"])
        b = [line for b in batches for line in b]
        assert a == [b"1\tx\t0\n", b"2\ty\t0\n"] and b == [b"1\tx\t0\n"]
        assert [p for p in _children() if "--defaults-file=" in p[1]] == clients  # the same session
    finally:
        reader.close()
    assert not [p for p in _children() if "--defaults-file=" in p[1]]


def test_no_password_on_the_command_line_and_the_defaults_file_removed(eng, mysql_url, tmp_path, cli, monkeypatch):
    user, pw = "snap_" + os.urandom(3).hex(), "Pw-" + os.urandom(6).hex()
    db = sa.engine.make_url(mysql_url).database
    with eng.connect() as c:
        c.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{pw}'")
        c.exec_driver_sql(f"GRANT ALL ON `{db}`.* TO '{user}'@'%%'")
        c.exec_driver_sql("CREATE TABLE t (id INT PRIMARY KEY, v TEXT)")
        c.exec_driver_sql("INSERT INTO t SELECT seq, 'v' FROM seq_1_to_10")
    try:
        seen = []
        real = myread.ClientSession.lines

        def lines(self, sql):
            seen.append((open(f"/proc/{self.proc.pid}/cmdline", "rb").read(), os.path.exists(self._defaults),
                         dict(os.environ)))
            yield from real(self, sql)
        monkeypatch.setattr(myread.ClientSession, "lines", lines)
        url = sa.engine.make_url(mysql_url).set(username=user, password=pw).render_as_string(hide_password=False)
        sid = _snapshot(cli, tmp_path, url)
        assert seen and all(pw.encode() not in cmd for cmd, _, _ in seen)
        assert not any(exists for _, exists, _ in seen)  # removed once the client was connected
        assert _encoding(tmp_path, sid, "t")["format"] == "mytext"
    finally:
        with eng.connect() as c:
            c.exec_driver_sql(f"DROP USER '{user}'@'%%'")


def test_an_error_in_the_client_is_one_line_and_ends_it(eng, mysql_url):
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE a (id INT PRIMARY KEY, v TEXT)")
    e = _engine(mysql_url)
    try:
        with e.connect() as conn:
            doc = sqlbase.table_schema(conn, "a", None)
            sqlbase.begin_snapshot(conn)
            _, batches = sqlbase.read_lines(conn, doc)
            assert list(batches) == []
            session = myread._SESSIONS[conn]
            try:
                with pytest.raises(myread.SourceError) as info:
                    list(session.lines("SELECT id FROM gone ORDER BY id"))
            finally:
                sqlbase.end_transaction(conn, commit=True)
            assert "ERROR 1146" in str(info.value) and "\n" not in str(info.value)
            assert session.proc.poll() is not None
    finally:
        e.dispose()


def test_a_read_left_before_its_end_ends_the_client(eng, mysql_url):
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE big (id INT PRIMARY KEY, v TEXT)")
        c.exec_driver_sql("INSERT INTO big SELECT seq, REPEAT('x', 200) FROM seq_1_to_50000")
    e = _engine(mysql_url)
    try:
        with e.connect() as conn:
            doc = sqlbase.table_schema(conn, "big", None)
            sqlbase.begin_snapshot(conn)
            _, batches = sqlbase.read_lines(conn, doc)
            assert next(batches)
            session = myread._SESSIONS[conn]
            batches.close()
            assert session.proc.poll() is not None and not os.path.exists(session._defaults)
            with pytest.raises(myread.SourceError, match="ended before the snapshot did"):
                sqlbase.read_lines(conn, doc)  # never a second point in time
            sqlbase.end_transaction(conn, commit=True)
    finally:
        e.dispose()


@pytest.mark.timeout(90)
def test_a_stalled_client_read_ends_the_snapshot_within_the_timeout(eng, mysql_url, tmp_path, cli):
    from tests.tcp_stall_proxy import StallProxy
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE big (id INT PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO big SELECT seq, REPEAT(MD5(seq), 6) FROM seq_1_to_150000")
    u = sa.engine.make_url(mysql_url)
    with StallProxy(u.host or "127.0.0.1", u.port or 3306) as proxy:
        url = u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        _config(tmp_path, url, "timeout = 1\n")
        assert cli("init").code == 0
        proxy.stall_after(2_000_000)
        t = time.monotonic()
        r = cli("snapshot", "--release", "r")
        elapsed = time.monotonic() - t
        assert proxy.stalled.is_set()
        assert r.code != 0 and "timed out after 1 s" in r.err and r.err.count("\n") == 1, r.err
        assert "Traceback" not in r.err and elapsed < 15
        assert not [p for p in _children() if "--defaults-file=" in p[1]]


def test_without_the_client_the_driver_gives_the_same_snapshot(eng, mysql_url, tmp_path, cli, monkeypatch):
    with eng.connect() as c:
        c.exec_driver_sql(AWKWARD)
        c.exec_driver_sql(AWKWARD_ROWS)
    first = _snapshot(cli, tmp_path, mysql_url)
    monkeypatch.setenv("SNAPSHOTTER_MY_CLIENT", "0")
    monkeypatch.setattr(myread.ClientSession, "__init__", None)  # never started
    second = _snapshot(cli, tmp_path, mysql_url)
    e1, e2 = _entry(tmp_path, first, "awkward"), _entry(tmp_path, second, "awkward")
    assert e1["encoding"]["format"] == "mytext"
    assert e1 == e2  # digest, chunks, encoding


def test_restore_from_a_mytext_snapshot(eng, mysql_url, tmp_path, cli):
    with eng.connect() as c:
        c.exec_driver_sql(AWKWARD)
        c.exec_driver_sql(AWKWARD_ROWS)
    sid = _snapshot(cli, tmp_path, mysql_url)
    assert _encoding(tmp_path, sid, "awkward")["format"] == "mytext"

    def rows():
        with eng.connect() as c:
            return sorted(tuple(r) for r in c.exec_driver_sql("SELECT * FROM awkward").fetchall())
    drift_then_restore(cli, eng, sid, "awkward",
                       ["UPDATE awkward SET s = NULL WHERE id = 2", "UPDATE awkward SET nn = 'x' WHERE id = 1",
                        "DELETE FROM awkward WHERE id = 3", "INSERT INTO awkward (id, nn) VALUES (9, 'new')"],
                       {"added": 1, "modified": 2, "deleted": 1}, rows)
    # nothing left to do: the live lines are the snapshot's
    r = cli("--json", "diff", sid)
    assert r.json()["plan"]["db"]["awkward"] == {"added": 0, "modified": 0, "deleted": 0}


def test_restore_from_a_msgpack_snapshot(eng, mysql_url, tmp_path, cli, monkeypatch):
    from snapshotter_backends.sql.mysql import MySQL
    with eng.connect() as c:
        c.exec_driver_sql(AWKWARD)
        c.exec_driver_sql(AWKWARD_ROWS)
    with monkeypatch.context() as m:
        m.setattr(MySQL, "reads_lines", False)  # as snapshots were taken before mytext
        m.setattr(MySQL, "line_format", None)
        sid = _snapshot(cli, tmp_path, mysql_url)
    assert _encoding(tmp_path, sid, "awkward") is None

    def rows():
        with eng.connect() as c:
            return sorted(tuple(r) for r in c.exec_driver_sql("SELECT * FROM awkward").fetchall())
    drift_then_restore(cli, eng, sid, "awkward",
                       ["UPDATE awkward SET s = 'NULL' WHERE id = 1", "DELETE FROM awkward WHERE id = 4"],
                       {"added": 0, "modified": 1, "deleted": 1}, rows)
