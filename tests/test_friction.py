"""What a new user trips on, each through the real CLI on real stores: readable names in
messages, verify's report on stdout, the audit log checked before any work, restore's
progress, sessions that exist nowhere, tables left out for want of a key, keys a table
cannot order, and a Redis reapply beyond a list's end."""
from __future__ import annotations

import json
import sqlite3

import pytest

from conftest import run_cli_subprocess


def sqlite_agent(tmp_path, cli, extra: str = "") -> sqlite3.Connection:
    """A SQLite database with table ``kb`` (10 rows), configured as source ``db`` of a new repository."""
    db = sqlite3.connect(tmp_path / "agent.db")
    db.execute("CREATE TABLE kb (id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO kb VALUES (?, ?)", [(i, f"fact {i}") for i in range(10)])
    db.commit()
    (tmp_path / "snapshotter.toml").write_text(
        f"[repository]\nurl = './repo'\n\n[sources.db]\nbackend = 'sql'\nurl = 'sqlite:///agent.db'\n{extra}")
    assert cli("init").code == 0
    return db


# -- names are shown readably ------------------------------------------------------------

def test_a_refused_name_is_shown_as_typed_with_control_characters_escaped_once(tmp_path, cli):
    sqlite_agent(tmp_path, cli)
    r = cli("snapshot", "--release", "ünï")
    assert r.code == 2
    assert "invalid release name 'ünï'" in r.err and "\\x" not in r.err
    r = cli("--json", "snapshot", "--release", "ünï")
    assert "'ünï'" in json.loads(r.err)["error"]["message"]
    r = cli("restore", "--release", "a\x1b[2Jb", "--dry-run")
    assert r.code == 2
    assert "'a\\x1b[2Jb'" in r.err and "\x1b" not in r.err and "\\\\x1b" not in r.err
    r = cli("snapshot", "--release", "r1", "--source", "sourcé")
    assert r.code == 2 and "invalid source name 'sourcé'" in r.err


# -- verify's report ---------------------------------------------------------------------

def test_verify_prints_its_problems_on_stdout_and_the_failure_on_stderr(tmp_path, cli):
    sqlite_agent(tmp_path, cli)
    snap = cli("--json", "snapshot", "--release", "r1").json()["id"]
    chunk = next(p for p in (tmp_path / "repo" / "chunks").rglob("*") if p.is_file())
    chunk.unlink()
    r = cli("verify")
    assert r.code == 3
    assert snap in r.out and chunk.name in r.out and "missing" in r.out
    assert r.err.strip().splitlines() == ["snapshotter: verify found 1 problem(s)"]


# -- the audit log is checked before any work ----------------------------------------------

def test_an_audit_log_that_cannot_be_appended_stops_a_command_before_its_work(tmp_path, cli):
    db = sqlite_agent(tmp_path, cli)
    snap = cli("--json", "snapshot", "--release", "r1").json()["id"]
    db.execute("UPDATE kb SET body = 'poisoned' WHERE id = 3")
    db.commit()
    audit = tmp_path / "repo" / "audit"
    audit.rename(tmp_path / "audit.saved")
    audit.write_text("a file where the audit log's folder belongs")
    chunks_before = sorted(p.name for p in (tmp_path / "repo" / "chunks").rglob("*"))
    try:
        r = cli("snapshot", "--release", "r1")
        assert r.code == 2, r.err
        assert len(r.err.strip().splitlines()) == 1 and "audit log" in r.err and "nothing was done" in r.err
        assert len(list((tmp_path / "repo" / "snapshots").rglob("*.json"))) == 1  # no second snapshot
        assert sorted(p.name for p in (tmp_path / "repo" / "chunks").rglob("*")) == chunks_before
        r = cli("--json", "restore", snap, "--yes")
        assert r.code == 2 and json.loads(r.err)["error"]["exit_code"] == 2
        assert db.execute("SELECT body FROM kb WHERE id = 3").fetchone() == ("poisoned",)  # not restored
        assert not (tmp_path / "repo" / "quarantine").exists()
        assert cli("mark-good", snap).code == 2
        assert cli("--json", "list").json()[0]["good"] is False
        assert cli("forget", "--keep-last", "1").code == 2
    finally:
        audit.unlink()
        (tmp_path / "audit.saved").rename(audit)
    assert cli("restore", snap, "--yes").code == 0


# -- a table left out for want of a key ------------------------------------------------------

@pytest.mark.parametrize("verbose", [(), ("-v",)])
def test_a_table_without_a_primary_key_left_out_is_named_at_snapshot_time(tmp_path, cli, verbose):
    db = sqlite_agent(tmp_path, cli)
    db.execute("CREATE TABLE scratch (a TEXT, b TEXT)")
    db.execute("INSERT INTO scratch VALUES ('x', 'y')")
    db.commit()
    # in a child process: the warning as the console program prints it
    r = run_cli_subprocess(*verbose, "--json", "snapshot", "--release", "r1", cwd=tmp_path)
    assert r.code == 0, r.err
    assert list(r.json()["sources"]["db"]["streams"]) == ["kb"]
    warning = [line for line in r.err.splitlines() if "scratch" in line]
    assert len(warning) == 1 and "no primary key" in warning[0] and "left out" in warning[0]
    # excluded on purpose: nothing to say
    (tmp_path / "snapshotter.toml").write_text((tmp_path / "snapshotter.toml").read_text() + "exclude = ['scratch']\n")
    r = run_cli_subprocess(*verbose, "snapshot", "--release", "r1", cwd=tmp_path)
    assert r.code == 0 and "scratch" not in r.err


# -- Redis: a reapply beyond a list's end ------------------------------------------------------

def test_reapplying_a_redis_position_beyond_the_list_end_is_refused_with_nothing_written(redis_client, tmp_path, cli):
    from conftest import REDIS_URL
    prefix = redis_client.test_prefix + "message_store:"
    key = prefix + "s1"
    msg = lambda i: json.dumps({"type": "human", "data": {"content": f"m{i}"}})  # noqa: E731
    redis_client.lpush(key, *[msg(i) for i in range(9)])  # newest first: positions 0..8
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.history]\nbackend = "conversation"\nurl = "{REDIS_URL}"\n'
        f'key_prefix = "{prefix}"\n')
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r1").json()["id"]
    redis_client.lpush(key, msg(9), msg(10))
    assert cli("restore", snap, "--yes", "--incident", "inc").code == 0
    assert redis_client.llen(key) == 9
    before = redis_client.lrange(key, 0, -1)
    r = cli("quarantine", "reapply", "inc", '["s1", 10]', "--yes")
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert "position 10" in r.err and '["s1", 9]' in r.err
    assert redis_client.lrange(key, 0, -1) == before  # nothing written
    r = cli("--json", "quarantine", "reapply", "inc", '["s1", 10]', "--yes")
    assert r.code == 2 and json.loads(r.err)["error"]["exit_code"] == 2
    # both, in one reapply: written
    r = cli("quarantine", "reapply", "inc", '["s1", 10]', '["s1", 9]', "--yes")
    assert r.code == 0, r.err
    assert redis_client.llen(key) == 11


# -- keys a SQLite table cannot order -------------------------------------------------------

def test_sqlite_null_and_mixed_type_keys_are_named_at_snapshot_and_restore(tmp_path, cli):
    db = sqlite_agent(tmp_path, cli)
    db.execute("CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT)")
    db.execute("CREATE TABLE tags (id PRIMARY KEY, body TEXT)")  # no type: any value goes
    db.executemany("INSERT INTO notes VALUES (?, ?)", [("a", "x"), ("b", "y")])
    db.executemany("INSERT INTO tags VALUES (?, ?)", [(1, "x"), (2, "y")])
    db.commit()
    snap = cli("--json", "snapshot", "--release", "r1").json()["id"]
    db.execute("INSERT INTO tags VALUES ('three', 'z')")
    db.commit()
    r = cli("snapshot", "--release", "r1")
    assert r.code == 2, r.err
    assert "table tags: key column id holds values of types integer (2 row(s)) and text (1 row(s))" in r.err
    assert len(r.err.strip().splitlines()) == 1
    db.execute("DELETE FROM tags WHERE id = 'three'")
    db.executemany("INSERT INTO notes VALUES (?, ?)", [(None, "n1"), (None, "n2")])
    db.commit()
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 2 and "table notes: key column id holds NULL in 2 row(s)" in json.loads(r.err)["error"]["message"]
    for args in (("restore", snap, "--yes"), ("diff", snap), ("restore", snap, "--dry-run")):
        r = cli(*args)
        assert r.code == 2, (args, r.err)
        assert "table notes: key column id holds NULL in 2 row(s)" in r.err and "Traceback" not in r.err
    assert db.execute("SELECT count(*) FROM notes").fetchone() == (4,)  # nothing written
    assert len(list((tmp_path / "repo" / "snapshots").rglob("*.json"))) == 1


# -- a --session that names nothing --------------------------------------------------------

def conversation_agent(tmp_path, cli, backend_url: str | None = None, prefix: str = "") -> sqlite3.Connection | None:
    """Sessions alice-1 (3 messages) and bob-2 (2) in a SQLite message table, or in Redis lists
    under ``prefix`` when ``backend_url`` is a Redis URL; source ``history``."""
    if backend_url is None:
        db = sqlite3.connect(tmp_path / "agent.db")
        db.execute("CREATE TABLE message_store (id INTEGER PRIMARY KEY, session_id TEXT, message TEXT)")
        db.executemany("INSERT INTO message_store (session_id, message) VALUES (?, ?)",
                       [("alice-1", "a0"), ("alice-1", "a1"), ("bob-2", "b0"), ("alice-1", "a2"), ("bob-2", "b1")])
        db.commit()
        url, extra = "sqlite:///agent.db", ""
    else:
        db, url, extra = None, backend_url, f'key_prefix = "{prefix}"\n'
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.history]\nbackend = "conversation"\nurl = "{url}"\n{extra}')
    assert cli("init").code == 0
    return db


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_session_that_exists_nowhere_is_refused_with_the_sessions_that_look_alike(store, tmp_path, cli, request):
    if store == "redis":
        from conftest import REDIS_URL
        client = request.getfixturevalue("redis_client")
        prefix = client.test_prefix + "message_store:"
        for s, n in (("alice-1", 3), ("bob-2", 2)):
            client.rpush(prefix + s, *[json.dumps({"type": "human", "data": {"content": f"{s} {i}"}}) for i in range(n)])
        conversation_agent(tmp_path, cli, REDIS_URL, prefix)
    else:
        db = conversation_agent(tmp_path, cli)
    snap = cli("--json", "snapshot", "--release", "r1").json()["id"]
    for args in (("restore", snap, "--yes"), ("restore", snap, "--dry-run"), ("diff", snap)):
        r = cli(*args, "--session", "alice-l")
        assert r.code == 5, (args, r.err)
        assert len(r.err.strip().splitlines()) == 1
        assert "'alice-l'" in r.err and "exist neither" in r.err and "look alike: 'alice-1'" in r.err
        r = cli("--json", *args, "--session", "alice-1", "--session", "carol")
        err = json.loads(r.err)["error"]
        assert r.code == 5 and r.out == ""
        assert err["unknown_sessions"] == ["carol"] and err["exit_code"] == 5
    assert not (tmp_path / "repo" / "quarantine").exists()
    # a session only the live store holds (started after the snapshot) is a restore's to remove
    if store == "redis":
        client.rpush(prefix + "dave-3", json.dumps({"type": "human", "data": {"content": "poison"}}))
    else:
        db.execute("INSERT INTO message_store (session_id, message) VALUES ('dave-3', 'poison')")
        db.commit()
    r = cli("--json", "restore", snap, "--yes", "--session", "dave-3")
    assert r.code == 0, r.err
    assert r.json()["quarantined"] == 1
    # one the snapshot alone holds (deleted since) is put back
    if store == "redis":
        client.delete(prefix + "bob-2")
    else:
        db.execute("DELETE FROM message_store WHERE session_id = 'bob-2'")
        db.commit()
    r = cli("--json", "restore", snap, "--yes", "--session", "bob-2")
    assert r.code == 0 and r.json()["quarantined"] == 2


# -- restore's progress ------------------------------------------------------------------------

def test_restore_shows_its_progress_per_stream_on_a_terminal_only(tmp_path, cli):
    from conftest import on_terminal
    db = sqlite_agent(tmp_path, cli)
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    db.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(3000)])
    db.commit()
    snap = cli("--json", "snapshot", "--release", "r1").json()["id"]

    def drift():
        db.execute("UPDATE notes SET body = 'poisoned' WHERE id % 3 = 0")
        db.execute("INSERT INTO kb VALUES (100, 'injected')")
        db.commit()

    drift()
    code, out = on_terminal(["restore", snap, "--yes"], tmp_path, None)
    assert code == 0, out
    for step in ("plan and quarantine db/kb", "plan and quarantine db/notes", "delete db/kb", "write db/notes",
                 "verify"):
        assert step in out, (step, out)
    assert "restored snapshot" in out
    # asked first: the bar is off the terminal while the plan is shown, and back for the work
    drift()
    code, out = on_terminal(["restore", snap], tmp_path, "y")
    assert code == 0, out
    asked = out.index("[y/N]")
    assert "plan db/notes" in out[:asked] and "write db/notes" in out[asked:]
    # diff too; and never with -q or --no-progress, nor without a terminal
    code, out = on_terminal(["diff", snap], tmp_path, None)
    assert code == 0 and "plan db/notes" in out
    drift()
    for quiet in (["-q"], ["--no-progress"]):
        code, out = on_terminal([*quiet, "restore", snap, "--yes"], tmp_path, None)
        assert code == 0 and "plan and quarantine" not in out and "write db/" not in out
        drift()
    r = cli("restore", snap, "--yes")
    assert r.code == 0 and "plan and quarantine" not in r.err
