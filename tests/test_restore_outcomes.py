"""What a restore says when it cannot restore everything: a snapshot that lacks a configured
source is refused (missing_sources), and a restore that fails after writing a store without
transactions reports each source's status and the incident that finishes the job."""
from __future__ import annotations

import json

import sqlalchemy as sa

from conftest import REDIS_URL


def write_config(tmp_path, sqlite_url: str, prefix: str, tables: str = "") -> None:
    (tmp_path / "snapshotter.toml").write_text(
        '[repository]\nurl = "./repo"\n'
        f'[sources.a_history]\nbackend = "conversation"\nurl = "{REDIS_URL}"\nkey_prefix = "{prefix}"\n'
        f'[sources.b_db]\nbackend = "sql"\nurl = "{sqlite_url}"\n{tables}')


def seed(sqlite_url: str, redis_client) -> sa.Engine:
    eng = sa.create_engine(sqlite_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE chunks (id INTEGER PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("CREATE TABLE citations (id INTEGER PRIMARY KEY, chunk_id INTEGER REFERENCES chunks (id))")
        c.exec_driver_sql("INSERT INTO chunks VALUES (1, 'a'), (2, 'b')")
        c.exec_driver_sql("INSERT INTO citations VALUES (10, 1), (20, 2)")
    redis_client.rpush(redis_client.test_prefix + "s1", b'{"type": "human", "data": {"content": "hi"}}')
    return eng


def test_a_snapshot_without_a_configured_source_is_refused_not_half_restored(sqlite_url, redis_client, tmp_path,
                                                                             cli):
    prefix = redis_client.test_prefix
    eng = seed(sqlite_url, redis_client)
    write_config(tmp_path, sqlite_url, prefix)
    cli("init")
    assert cli("--json", "snapshot", "--release", "v1", "--source", "b_db").code == 0
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE chunks SET body = 'poisoned' WHERE id = 1")
    redis_client.rpush(prefix + "s1", b'{"type": "ai", "data": {"content": "poisoned"}}')

    r = cli("--json", "list")
    snap = r.json()[0]["id"]
    r = cli("--json", "diff", snap)
    assert r.code == 0 and r.json()["missing_sources"] == ["a_history"]
    assert "does not hold source(s) 'a_history'" in r.err
    for args in (["--release", "v1"], [snap]):
        r = cli("--json", "restore", *args, "--yes")
        assert r.code == 2, r.err
        err = json.loads(r.err)["error"]
        assert err["missing_sources"] == ["a_history"] and "--source b_db" in err["message"]
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT body FROM chunks WHERE id = 1").scalar() == "poisoned"
    assert cli("--json", "quarantine", "list").json() == []
    r = cli("--json", "restore", snap, "--source", "a_history", "--yes")
    assert r.code == 2 and json.loads(r.err)["error"]["missing_sources"] == ["a_history"]
    # naming the sources it holds restores those
    r = cli("--json", "restore", snap, "--source", "b_db", "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err


def test_a_restore_failing_after_a_store_without_transactions_was_written_says_which(sqlite_url, redis_client,
                                                                                    tmp_path, cli):
    """Redis is rewritten, then the SQL source fails as it writes (a unique index the agent added
    refuses a row the snapshot holds twice) and rolls back: exit 1, each source's status in text
    and JSON, the incident and the command that finishes."""
    prefix = redis_client.test_prefix
    eng = seed(sqlite_url, redis_client)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        c.exec_driver_sql("INSERT INTO items VALUES (1, 'x'), (2, 'x')")
    write_config(tmp_path, sqlite_url, prefix, 'tables = ["items"]\n')
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()["id"]
    redis_client.rpush(prefix + "s1", b'{"type": "ai", "data": {"content": "poisoned"}}')
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM items WHERE id = 2")
        c.exec_driver_sql("CREATE UNIQUE INDEX items_name ON items (name)")
    r = cli("--json", "restore", snap, "--yes", "--incident", "inc-x")
    assert r.code == 1, r.err
    err = json.loads(r.err)["error"]
    assert err["incident"] == "inc-x"
    assert err["sources"] == {"a_history": {"status": "restored"}, "b_db": {"status": "rolled_back"}}
    assert "UNIQUE constraint failed" in err["message"] and "run `snapshotter restore" in err["message"]
    assert redis_client.llen(prefix + "s1") == 1  # restored
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM items").scalar() == 1  # rolled back
    # with only the SQL source left to write, its own failure and exit code (rolled back, nothing else written)
    r = cli("--json", "restore", snap, "--yes")
    assert r.code == 1 and json.loads(r.err)["error"]["sources"]["b_db"] == {"status": "rolled_back"}
    assert "sources: " not in json.loads(r.err)["error"]["message"]
    redis_client.rpush(prefix + "s1", b'{"type": "ai", "data": {"content": "again"}}')
    r = cli("restore", snap, "--yes")
    assert r.code == 1
    assert "sources: a_history restored, b_db rolled back; incident" in r.err
