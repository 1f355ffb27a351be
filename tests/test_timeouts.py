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
