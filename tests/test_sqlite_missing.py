"""A SQLite url naming a file that does not exist (a typo, a deleted database) is refused
with exit 2 by every command that opens the source, for the ``sql`` and the
``conversation`` backends, and the file is never created; ``restore --create-missing``
recreates a database that is gone, with its tables and rows.  In-memory and ``file:``
URI forms keep working."""
from __future__ import annotations

import json
import sqlite3

import pytest


def write_config(tmp_path, db_url: str, history_url: str | None = None) -> None:
    history_url = history_url or db_url
    (tmp_path / "snapshotter.toml").write_text(
        '[repository]\nurl = "./repo"\n\n'
        f'[sources.db]\nbackend = "sql"\nurl = {json.dumps(db_url)}\ntables = ["docs"]\n\n'
        f'[sources.history]\nbackend = "conversation"\nurl = {json.dumps(history_url)}\n')


def make_db(path) -> None:
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT NOT NULL);"
        "INSERT INTO docs VALUES (1, 'one'), (2, 'two'), (3, 'three');"
        "CREATE TABLE message_store (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT, message TEXT);"
        "INSERT INTO message_store (session_id, message) VALUES ('s1', '{\"type\": \"human\"}'), "
        "('s1', '{\"type\": \"ai\"}');")
    con.commit()
    con.close()


def rows(path) -> tuple[list, list]:
    con = sqlite3.connect(path)
    try:
        return (con.execute("SELECT * FROM docs ORDER BY id").fetchall(),
                con.execute("SELECT * FROM message_store ORDER BY id").fetchall())
    finally:
        con.close()


def assert_refused(r, path, source: str) -> None:
    assert r.code == 2, (r.code, r.err)
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1, r.err
    assert f"source {source!r}" in lines[0] and str(path) in lines[0] and "Traceback" not in r.err, r.err


def test_a_missing_sqlite_file_is_refused_by_every_command_and_never_created(tmp_path, cli):
    real = tmp_path / "agent.db"
    make_db(real)
    write_config(tmp_path, f"sqlite:///{real}")
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r1")
    assert snap.code == 0, snap.err
    snap_id = snap.json()["id"]
    # an incident to reapply from: the agent changed a row, a restore put it back
    con = sqlite3.connect(real)
    con.execute("UPDATE docs SET body = 'poisoned' WHERE id = 2")
    con.commit()
    con.close()
    r = cli("--json", "restore", snap_id, "--yes")
    assert r.code == 0, r.err
    incident = r.json()["incident"]

    typo = tmp_path / "agnet.db"
    for db_url, history_url, bad_source in ((f"sqlite:///{typo}", f"sqlite:///{real}", "db"),
                                            (f"sqlite:///{real}", f"sqlite:///{typo}", "history")):
        write_config(tmp_path, db_url, history_url)
        assert_refused(cli("snapshot", "--release", "r2"), typo, bad_source)
        assert_refused(cli("snapshot", "--release", "r2", "--source", bad_source), typo, bad_source)
        assert_refused(cli("diff", snap_id), typo, bad_source)
        assert_refused(cli("restore", snap_id, "--dry-run"), typo, bad_source)
        assert_refused(cli("restore", snap_id, "--yes"), typo, bad_source)
        assert_refused(cli("restore", snap_id, "--yes", "--source", bad_source), typo, bad_source)
        assert not typo.exists()
    write_config(tmp_path, f"sqlite:///{typo}")
    assert_refused(cli("quarantine", "reapply", incident, "2", "--source", "db", "--yes"), typo, "db")
    r = cli("--json", "snapshot", "--release", "r2")
    assert r.code == 2 and json.loads(r.err.strip().splitlines()[-1])["error"]["exit_code"] == 2, r.err
    assert not typo.exists()

    # a missing folder: refused the same way, and no folder is made
    gone = tmp_path / "no-such-folder" / "agent.db"
    write_config(tmp_path, f"sqlite:///{gone}")
    assert_refused(cli("snapshot", "--release", "r2"), gone, "db")
    assert_refused(cli("restore", snap_id, "--yes"), gone, "db")
    assert not gone.parent.exists()
    # the only snapshot is still the first one (nothing of the typo's was committed)
    assert [s["id"] for s in cli("--json", "list").json()] == [snap_id]


def test_restore_create_missing_recreates_a_deleted_database(tmp_path, cli):
    path = tmp_path / "data" / "agent.db"
    path.parent.mkdir()
    make_db(path)
    before = rows(path)
    write_config(tmp_path, f"sqlite:///{path}")
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r1")
    assert snap.code == 0, snap.err
    snap_id = snap.json()["id"]

    path.unlink()
    path.parent.rmdir()
    assert_refused(cli("restore", snap_id, "--yes"), path, "db")
    # a dry run shows the plan (every table recreated) and creates nothing
    r = cli("--json", "restore", snap_id, "--dry-run", "--create-missing")
    assert r.code == 0, r.err
    assert r.json()["plan"] == {"db": {"docs": {"added": 0, "modified": 0, "deleted": 3}},
                                "history": {"message_store": {"added": 0, "modified": 0, "deleted": 2}}}
    assert not path.parent.exists()
    r = cli("restore", snap_id, "--dry-run", "--create-missing")
    assert r.code == 0 and "missing: will be recreated" in r.out, r.out + r.err

    r = cli("--json", "restore", snap_id, "--yes", "--create-missing")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    assert rows(path) == before
    # the recreated database is an ordinary one again: a diff finds nothing
    r = cli("--json", "diff", snap_id)
    assert r.code == 0 and r.json()["plan"] == {"db": {"docs": {"added": 0, "modified": 0, "deleted": 0}},
                                                "history": {"message_store": {"added": 0, "modified": 0,
                                                                              "deleted": 0}}}, r.out + r.err


def test_memory_and_file_uri_forms_keep_working(tmp_path, cli):
    path = tmp_path / "agent.db"
    make_db(path)
    # a read-only file: URI of an existing file snapshots it
    write_config(tmp_path, f"sqlite:///file:{path}?mode=ro&uri=true")
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    assert r.json()["sources"]["db"]["streams"]["docs"]["records"] == 3
    # the same URI naming a missing file is refused like a plain path
    missing = tmp_path / "missing.db"
    write_config(tmp_path, f"sqlite:///file:{missing}?uri=true")
    assert_refused(cli("snapshot", "--release", "r1"), missing, "db")
    assert not missing.exists()
    # in-memory databases are not files: nothing to refuse (an empty database has no message table)
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:mem1?mode=memory&cache=shared&uri=true"):
        (tmp_path / "snapshotter.toml").write_text(
            f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = {json.dumps(url)}\n')
        r = cli("--json", "snapshot", "--release", "r1")
        assert r.code == 0, (url, r.err)
        assert r.json()["sources"]["db"]["streams"] == {}
