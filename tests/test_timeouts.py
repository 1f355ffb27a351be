"""No unbounded waits: every store that takes a connection and never answers (a "black hole"
listener on a loopback port) ends a snapshot or a restore within about its ``timeout``, with
one line naming the source or the repository, exit 1; a restore's SQL transaction is rolled
back and never left idle in transaction."""
from __future__ import annotations

import secrets
import socket
import threading
import time

import pytest

sa = pytest.importorskip("sqlalchemy")


class BlackHole:
    """A TCP listener that accepts every connection and never sends a byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)  # read nothing, answer nothing, keep it open

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def hole():
    h = BlackHole()
    yield h
    h.close()


def write_config(tmp_path, sources: str, repository: str = 'url = "./repo"\n') -> None:
    (tmp_path / "snapshotter.toml").write_text(f"[repository]\n{repository}\n{sources}")


def timed(cli, *args):
    start = time.monotonic()
    r = cli(*args)
    return r, time.monotonic() - start


def assert_timed_out(r, elapsed: float, name: str, limit: float, bound: str = "1") -> None:
    assert r.code == 1, (r.code, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert "Traceback" not in r.err
    assert name in lines[0] and f"timed out after {bound} s" in lines[0], lines[0]
    assert elapsed < limit, (elapsed, lines[0])


# -- configuration -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", '"30s"', "true", "[1]"])
def test_a_bad_timeout_is_a_one_line_config_error(tmp_path, cli, value):
    for backend, extra in (("sql", 'url = "sqlite:///agent.db"'), ("conversation", 'url = "redis://127.0.0.1:6379/0"'),
                           ("chroma", 'url = "http://127.0.0.1:8000"')):
        write_config(tmp_path, f'[sources.s]\nbackend = "{backend}"\n{extra}\ntimeout = {value}\n')
        r = cli("list")
        assert r.code == 2, (backend, value, r.err)
        assert len(r.err.strip().splitlines()) == 1 and "sources.s.timeout" in r.err, r.err
    write_config(tmp_path, "", repository=f'url = "s3://bucket/p"\ntimeout = {value}\n')
    r = cli("list")
    assert r.code == 2 and "repository.timeout" in r.err and len(r.err.strip().splitlines()) == 1, r.err


def test_timeouts_take_fractions_and_have_finite_defaults(tmp_path):
    from snapshotter.config import load_config
    write_config(tmp_path, '[sources.a]\nbackend = "sql"\nurl = "sqlite:///agent.db"\ntimeout = 2.5\n'
                           '[sources.b]\nbackend = "chroma"\nurl = "http://127.0.0.1:8000"\n',
                 repository='url = "s3://bucket/p"\ntimeout = 7\n')
    cfg = load_config(str(tmp_path / "snapshotter.toml"))
    assert cfg.sources["a"].options["timeout"] == 2.5
    assert cfg.sources["a"].options["idle_timeout"] == 600
    assert cfg.sources["b"].options["timeout"] == 30
    assert cfg.repository_timeout == 7.0


# -- hung servers --------------------------------------------------------------------

def test_a_hung_chroma_server_ends_snapshot_and_restore(tmp_path, cli, hole, chroma_server):
    import chromadb
    name = f"t{secrets.token_hex(3)}-kb"
    client = chromadb.HttpClient(host=chroma_server)
    client.create_collection(name, embedding_function=None).add(ids=["a", "b"], embeddings=[[1.0, 2.0], [3.0, 4.0]])
    try:
        src = f'[sources.kb]\nbackend = "chroma"\ncollections = ["{name}"]\ntimeout = 1\n'
        write_config(tmp_path, src + f'url = "{chroma_server}"\n')
        assert cli("init").code == 0
        r = cli("--json", "snapshot", "--release", "r1")
        assert r.code == 0, r.err
        snap = r.json()["id"]
        write_config(tmp_path, src + f'url = "http://127.0.0.1:{hole.port}"\n')
        r, elapsed = timed(cli, "snapshot", "--release", "r2")
        assert_timed_out(r, elapsed, "source 'kb'", 8)
        r, elapsed = timed(cli, "restore", snap, "--yes")
        assert_timed_out(r, elapsed, "source 'kb'", 8)
        # the lock of the failed commands is gone: prune is not locked out
        assert cli("prune").code == 0
    finally:
        client.delete_collection(name)


def test_a_hung_redis_server_ends_snapshot_and_restore(tmp_path, cli, hole, redis_client):
    prefix = redis_client.test_prefix
    redis_client.lpush(f"{prefix}s1".encode(), b'{"type": "human", "data": {"content": "hi"}}')
    src = f'[sources.chat]\nbackend = "conversation"\nkey_prefix = "{prefix}"\ntimeout = 1\n'
    write_config(tmp_path, src + 'url = "redis://127.0.0.1:6379/0"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    snap = r.json()["id"]
    write_config(tmp_path, src + f'url = "redis://127.0.0.1:{hole.port}/0"\n')
    r, elapsed = timed(cli, "snapshot", "--release", "r2")
    assert_timed_out(r, elapsed, "source 'chat'", 8)
    r, elapsed = timed(cli, "restore", snap, "--yes")
    assert_timed_out(r, elapsed, "source 'chat'", 8)


@pytest.mark.parametrize("db", ["postgresql", "mariadb"])
def test_a_hung_database_server_ends_snapshot_and_restore(tmp_path, cli, hole, request, db):
    url = request.getfixturevalue({"postgresql": "pg_url", "mariadb": "mysql_url"}[db])
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body VARCHAR(40))")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 'one'), (2, 'two')")
    eng.dispose()
    src = '[sources.db]\nbackend = "sql"\ntimeout = 1\n'
    write_config(tmp_path, src + f'url = "{url}"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    snap = r.json()["id"]
    hung = sa.engine.make_url(url).set(host="127.0.0.1", port=hole.port).render_as_string(hide_password=False)
    write_config(tmp_path, src + f'url = "{hung}"\n')
    bound = "2" if db == "postgresql" else "1"  # libpq's connect_timeout is 2 s at least
    r, elapsed = timed(cli, "snapshot", "--release", "r2")
    assert_timed_out(r, elapsed, "source 'db'", 8, bound)
    r, elapsed = timed(cli, "restore", snap, "--yes")
    assert_timed_out(r, elapsed, "source 'db'", 8, bound)


def test_a_hung_s3_endpoint_ends_snapshot_and_restore(tmp_path, cli, hole, s3_server, s3_bucket, sqlite_url):
    eng = sa.create_engine(sqlite_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 'one')")
    eng.dispose()
    src = f'[sources.db]\nbackend = "sql"\nurl = "{sqlite_url}"\n'
    repo = f'url = "s3://{s3_bucket}/r"\nregion = "us-east-1"\ntimeout = 1\n'
    write_config(tmp_path, src, repository=repo + f'endpoint_url = "{s3_server}"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    snap = r.json()["id"]
    write_config(tmp_path, src, repository=repo + f'endpoint_url = "http://127.0.0.1:{hole.port}"\n')
    # three attempts before the endpoint ever answered, each bounded by the timeout
    r, elapsed = timed(cli, "snapshot", "--release", "r2")
    assert_timed_out(r, elapsed, f"s3://{s3_bucket}/r", 12)
    r, elapsed = timed(cli, "restore", snap, "--yes")
    assert_timed_out(r, elapsed, f"s3://{s3_bucket}/r", 12)


def test_an_s3_endpoint_that_stalls_mid_command_ends_it_within_a_few_timeouts(tmp_path, cli, s3_server, s3_bucket,
                                                                             sqlite_url):
    """Once the endpoint has answered, a request that keeps timing out is given up after a few
    timeouts, not after eight attempts with backoff (a stalled endpoint took minutes to fail a
    snapshot at a timeout of seconds)."""
    from tests.s3_fault_proxy import FaultProxy
    eng = sa.create_engine(sqlite_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 'one')")
    eng.dispose()
    with FaultProxy(s3_server) as proxy:
        src = f'[sources.db]\nbackend = "sql"\nurl = "{sqlite_url}"\n'
        write_config(tmp_path, src, repository=f'url = "s3://{s3_bucket}/r"\nregion = "us-east-1"\ntimeout = 1\n'
                                                f'endpoint_url = "{proxy.url}"\n')
        assert cli("init").code == 0
        proxy.configure(stall_pattern=r"(^|/)chunks/", stall_seconds=20.0)
        r, elapsed = timed(cli, "snapshot", "--release", "r1")
        assert r.code == 1 and "timed out after 1 s" in r.err and "Traceback" not in r.err, r.err
        assert elapsed < 15, elapsed
        proxy.configure(stall_pattern=None)


# -- a restore's SQL transaction while another store hangs ---------------------------------

def _idle_in_transaction(admin, database: str) -> list[float]:
    """Seconds each session of ``database`` has been idle in transaction."""
    with admin.connect() as c:
        rows = c.exec_driver_sql(
            "SELECT extract(epoch FROM now() - state_change) FROM pg_stat_activity "
            "WHERE datname = %(d)s AND state LIKE 'idle in transaction%%'", {"d": database}).fetchall()
    return [float(r[0]) for r in rows]


def _pg_and_chroma(tmp_path, cli, pg_url, chroma_server, *, pg_extra: str, chroma_timeout: float):
    import chromadb
    name = f"t{secrets.token_hex(3)}-kb"
    client = chromadb.HttpClient(host=chroma_server)
    client.create_collection(name, embedding_function=None).add(ids=["a"], embeddings=[[1.0, 2.0]])
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 'one'), (2, 'two')")
    pg = f'[sources.db]\nbackend = "sql"\nurl = "{pg_url}"\n{pg_extra}\n'
    kb = f'[sources.kb]\nbackend = "chroma"\ncollections = ["{name}"]\ntimeout = {chroma_timeout}\n'
    write_config(tmp_path, pg + kb + f'url = "{chroma_server}"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE notes SET body = 'poisoned' WHERE id = 1")
    return client, name, eng, pg, kb, r.json()["id"]


def _restore_watching(cli, admin, database: str, snap: str):
    """Run the restore while another thread samples the database's idle-in-transaction ages."""
    ages: list[float] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            ages.extend(_idle_in_transaction(admin, database))
            time.sleep(0.2)

    t = threading.Thread(target=watch)
    t.start()
    try:
        r, elapsed = timed(cli, "restore", snap, "--yes")
    finally:
        done.set()
        t.join()
    return r, elapsed, ages


def test_a_hung_chroma_server_rolls_the_sql_restore_back(tmp_path, cli, hole, pg_url, chroma_server):
    client, name, eng, pg, kb, snap = _pg_and_chroma(tmp_path, cli, pg_url, chroma_server,
                                                     pg_extra="", chroma_timeout=1)
    try:
        write_config(tmp_path, pg + kb + f'url = "http://127.0.0.1:{hole.port}"\n')
        admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
        database = sa.engine.make_url(pg_url).database
        r, elapsed, ages = _restore_watching(cli, admin, database, snap)
        assert_timed_out(r, elapsed, "source 'kb'", 8)
        # the SQL transaction waited no longer than Chroma's timeout, and is gone
        assert max(ages, default=0) < 3, ages
        assert _idle_in_transaction(admin, database) == []
        with eng.connect() as c:
            assert c.exec_driver_sql("SELECT body FROM notes WHERE id = 1").scalar() == "poisoned"
        admin.dispose()
    finally:
        eng.dispose()
        client.delete_collection(name)


def test_the_database_ends_a_restore_transaction_left_idle_beyond_its_bound(tmp_path, cli, hole, pg_url,
                                                                             chroma_server):
    # Chroma's bound is longer than the SQL source's idle_timeout: the server ends the transaction
    client, name, eng, pg, kb, snap = _pg_and_chroma(tmp_path, cli, pg_url, chroma_server,
                                                     pg_extra="idle_timeout = 1", chroma_timeout=5)
    try:
        write_config(tmp_path, pg + kb + f'url = "http://127.0.0.1:{hole.port}"\n')
        admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
        database = sa.engine.make_url(pg_url).database
        r, elapsed, ages = _restore_watching(cli, admin, database, snap)
        assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r.err
        assert "timed out after 5 s" in r.err
        assert ages and max(ages) < 2.5, ages  # seen idle, then ended by the server after about 1 s
        assert _idle_in_transaction(admin, database) == []
        with eng.connect() as c:
            assert c.exec_driver_sql("SELECT body FROM notes WHERE id = 1").scalar() == "poisoned"
        admin.dispose()
    finally:
        eng.dispose()
        client.delete_collection(name)


# -- a PostgreSQL server that keeps its connection but stops answering mid-statement ----------

def _through(url: str, proxy) -> str:
    return sa.engine.make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def _busy(admin, database: str, within: float = 3.0) -> list[tuple]:
    """The server processes of ``database`` still in a statement or a transaction after ``within``
    seconds at most: (state, wait_event)."""
    deadline = time.monotonic() + within
    while True:
        with admin.connect() as c:
            busy = [tuple(r) for r in c.exec_driver_sql(
                "SELECT state, wait_event FROM pg_stat_activity WHERE datname = %(d)s AND state <> 'idle' "
                "AND pid <> pg_backend_pid()", {"d": database}).fetchall()]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)


@pytest.fixture
def pg_proxy(pg_url):
    from tests.tcp_stall_proxy import StallProxy
    u = sa.engine.make_url(pg_url)
    with StallProxy(u.host or "127.0.0.1", u.port or 5432) as proxy:
        yield proxy


def _big_table(pg_url: str) -> None:
    """~30 MB in table big: more than the socket buffers between the server and us hold."""
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE big (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO big SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 150000) g")
    eng.dispose()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path, drain, counters", [("copy", False, True), ("copy", True, True),
                                                   ("cursor", False, True), ("copy", False, False),
                                                   ("psql", False, True), ("psql", True, True)],
                         ids=["copy-server-blocked", "copy-server-done", "cursor-server-blocked",
                              "copy-server-blocked-no-tcp-counters", "psql-server-blocked", "psql-server-done"])
def test_a_postgresql_server_that_stalls_mid_read_ends_the_snapshot(tmp_path, cli, pg_url, pg_proxy, monkeypatch,
                                                                   path, drain, counters):
    """The connection stays open and acknowledged (a hung proxy or pooler): libpq would wait for
    ever.  Server blocked writing to us (ClientWrite) or done and idle in transaction: either way
    the command ends within a few timeouts, and the server process is not left holding its
    transaction.  Without the kernel's byte counters (not Linux), after two looks."""
    if path == "cursor":
        monkeypatch.setenv("SNAPSHOTTER_PG_COPY", "0")
    # the COPY through libpq in this process, or run by a psql child (backends/sql/pgbulk.py)
    monkeypatch.setenv("SNAPSHOTTER_PG_PSQL", "always" if path == "psql" else "off")
    if not counters:
        from snapshotter_backends.sql import pgwatch
        monkeypatch.setattr(pgwatch, "_TCP_INFO", None)
    _big_table(pg_url)
    write_config(tmp_path, f'[sources.db]\nbackend = "sql"\ntimeout = 1\nurl = "{_through(pg_url, pg_proxy)}"\n')
    assert cli("init").code == 0
    pg_proxy.stall_after(2_000_000, drain=drain)
    r, elapsed = timed(cli, "snapshot", "--release", "r1")
    assert pg_proxy.stalled.is_set()
    assert_timed_out(r, elapsed, "source 'db'", 10)
    assert "in the middle of a statement" in r.err
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        # terminated: not left blocked behind the proxy, holding its snapshot's transaction
        assert _busy(admin, sa.engine.make_url(pg_url).database) == []
    finally:
        admin.dispose()
    assert cli("--json", "list").json() == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("psql", ["always", "off"], ids=["psql", "libpq"])
def test_a_postgresql_proxy_that_hangs_every_connection_ends_the_snapshot(tmp_path, cli, pg_url, pg_proxy,
                                                                          monkeypatch, psql):
    """The server cannot be asked about the stalled connection (a second one hangs too): that
    is a timeout as well."""
    monkeypatch.setenv("SNAPSHOTTER_PG_PSQL", psql)
    _big_table(pg_url)
    write_config(tmp_path, f'[sources.db]\nbackend = "sql"\ntimeout = 1\nurl = "{_through(pg_url, pg_proxy)}"\n')
    assert cli("init").code == 0
    pg_proxy.stall_after(2_000_000, hang_new=True)
    r, elapsed = timed(cli, "snapshot", "--release", "r1")
    assert pg_proxy.stalled.is_set()
    assert_timed_out(r, elapsed, "source 'db'", 10)
    assert "a second connection" in r.err


@pytest.mark.timeout(90)
@pytest.mark.parametrize("statement", [b"FROM STDIN", b"UPDATE "], ids=["copy-in", "update"])
def test_a_postgresql_server_that_stalls_mid_restore_rolls_it_back(tmp_path, cli, pg_url, pg_proxy, statement):
    """The restore's statement reaches the server (COPY of the rows, the UPDATE that writes them)
    and then nothing more comes through: the restore ends within a few timeouts, its transaction
    rolled back by the server, the live table as it was."""
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 1000) g")
    write_config(tmp_path, f'[sources.db]\nbackend = "sql"\ntimeout = 1\nurl = "{_through(pg_url, pg_proxy)}"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    snap = r.json()["id"]
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE notes SET body = 'poisoned' WHERE id <= 10")
    pg_proxy.stall_on(statement)
    r, elapsed = timed(cli, "restore", snap, "--yes")
    assert pg_proxy.stalled.is_set()
    assert_timed_out(r, elapsed, "source 'db'", 10)
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        assert _busy(admin, sa.engine.make_url(pg_url).database) == []
    finally:
        admin.dispose()
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM notes WHERE body = 'poisoned'").scalar() == 10
    eng.dispose()


# -- ... but a server that works on a statement for longer than the timeout is waited for -------

def _hold_for(seconds: float, eng, *statements: str) -> threading.Thread:
    """Run ``statements`` in a transaction of another session, held ``seconds``, then rolled back."""
    ready = threading.Event()

    def hold():
        with eng.connect() as c:
            c.exec_driver_sql("BEGIN")
            for sql in statements:
                c.exec_driver_sql(sql)
            ready.set()
            time.sleep(seconds)
            c.exec_driver_sql("ROLLBACK")

    t = threading.Thread(target=hold)
    t.start()
    assert ready.wait(10)
    return t


@pytest.mark.timeout(90)
@pytest.mark.parametrize("psql", ["always", "off"], ids=["psql", "libpq"])
def test_a_snapshot_waiting_for_a_lock_longer_than_the_timeout_is_not_timed_out(tmp_path, cli, pg_url, monkeypatch,
                                                                               psql):
    monkeypatch.setenv("SNAPSHOTTER_PG_PSQL", psql)
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 'one'), (2, 'two')")
    write_config(tmp_path, f'[sources.db]\nbackend = "sql"\ntimeout = 1\nurl = "{pg_url}"\n')
    assert cli("init").code == 0
    # a migration holds the table: the snapshot's read waits for it, sending nothing, 3 timeouts long
    holder = _hold_for(3.5, eng, "LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
    r, elapsed = timed(cli, "--json", "snapshot", "--release", "r1")
    holder.join()
    eng.dispose()
    assert r.code == 0, r.err
    assert elapsed >= 3, elapsed
    assert r.json()["sources"]["db"]["streams"]["notes"]["records"] == 2


@pytest.mark.timeout(90)
def test_a_restore_waiting_for_a_row_lock_longer_than_the_timeout_is_not_timed_out(tmp_path, cli, pg_url):
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 'one'), (2, 'two')")
    write_config(tmp_path, f'[sources.db]\nbackend = "sql"\ntimeout = 1\nurl = "{pg_url}"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    with eng.connect() as c:
        c.exec_driver_sql("UPDATE notes SET body = 'poisoned' WHERE id = 1")
    # the agent holds the row the restore writes: its UPDATE waits, 3 timeouts long
    holder = _hold_for(3.5, eng, "SELECT * FROM notes WHERE id = 1 FOR UPDATE")
    r, elapsed = timed(cli, "--json", "restore", r.json()["id"], "--yes")
    holder.join()
    assert r.code == 0, r.err
    assert elapsed >= 3, elapsed
    assert r.json()["verified"] is True
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT body FROM notes WHERE id = 1").scalar() == "one"
    eng.dispose()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("psql", ["always", "off"], ids=["psql", "libpq"])
def test_a_snapshot_whose_server_pauses_mid_copy_to_work_is_not_timed_out(tmp_path, cli, pg_url, monkeypatch,
                                                                            psql):
    """Rows stream, then the server works on the next one for 3 timeouts, sending nothing (a slow
    row-level security check), then the rest stream: the read is waited for."""
    monkeypatch.setenv("SNAPSHOTTER_PG_PSQL", psql)
    role = "snap_reader_" + secrets.token_hex(3)
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        c.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("INSERT INTO notes SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g")
        c.exec_driver_sql("CREATE FUNCTION visible(i integer) RETURNS boolean LANGUAGE sql VOLATILE AS "
                          "$$ SELECT CASE WHEN i = 10000 THEN pg_sleep(3.5) IS NOT NULL ELSE true END $$")
        c.exec_driver_sql("ALTER TABLE notes ENABLE ROW LEVEL SECURITY")
        c.exec_driver_sql("CREATE POLICY readable ON notes FOR SELECT USING (visible(id))")
        c.exec_driver_sql(f"GRANT SELECT ON notes TO {role}")
        c.exec_driver_sql("ANALYZE notes")  # read in key order through the index: rows 1-9999 first
    try:
        url = sa.engine.make_url(pg_url).set(username=role, password=None).render_as_string(hide_password=False)
        write_config(tmp_path, f'[sources.db]\nbackend = "sql"\ntimeout = 1\nurl = "{url}"\n')
        assert cli("init").code == 0
        r, elapsed = timed(cli, "--json", "snapshot", "--release", "r1")
        assert r.code == 0, r.err
        assert elapsed >= 3, elapsed
        assert r.json()["sources"]["db"]["streams"]["notes"]["records"] == 20000
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP OWNED BY {role}")
            c.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()
