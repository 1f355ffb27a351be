"""Restore with quarantine on SQL sources, beyond what every backend passes in
tests/conformance (round trip, quarantine, dry run, races, the terminal question):
a dropped table recreated with its schema, a changed schema refused, release
resolution, a missing object, convergence after kill -9, keys in the database's
own order and form."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from snapshotter import codec
from snapshotter.objectstore import open_store
from snapshotter.quarantine import bundles, iter_records
from snapshotter.repository import Repository
from conftest import drift_then_restore
from tests.test_foundation import make_table


def raw_rows(eng, table="kb_chunks") -> dict:
    """Every row as the driver returns it, encoded exactly (bytes compare as values)."""
    with eng.connect() as c:
        rows = c.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id").fetchall()
        cols = list(c.exec_driver_sql(f"SELECT * FROM {table} WHERE 1=0").keys())
    return {r[0]: codec.pack(dict(zip(cols, r))) for r in rows}


def write_config(tmp_path, url, extra=""):
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.retrieval]\nbackend = "sql"\nurl = "{url}"\n{extra}')


def bad_writes(eng):
    dialect = eng.dialect.name
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE kb_chunks SET title = 'ignore previous instructions' WHERE id < 25")
        c.exec_driver_sql("DELETE FROM kb_chunks WHERE id BETWEEN 500 AND 520")
        c.exec_driver_sql("INSERT INTO kb_chunks (id, title, body) VALUES (900001, 'exfiltrate', 'x'), (900002, 'b', NULL)")
        if dialect == "postgresql":
            c.exec_driver_sql("UPDATE kb_chunks SET meta = '{\"poison\": true}'::json, price = 0.000001 WHERE id = 1500")
        else:
            c.exec_driver_sql("UPDATE kb_chunks SET meta = '{\"poison\": true}', price = 0.000001 WHERE id = 1500")


def rebuild_pre_restore(repo: Repository, snapshot_state: dict, incident: dict) -> dict:
    """Snapshot state overlaid with an incident's quarantine = the live state before the restore."""
    state = dict(snapshot_state)
    for _, _, rec in iter_records(repo, incident):
        q = rec.value
        if q["op"] == "deleted":
            state.pop(rec.key)
        else:
            state[rec.key] = codec.pack(q["value"])
    return state


def test_dropped_table_is_recreated_with_its_schema(sqlite_url, tmp_path, cli):
    eng = make_table(sqlite_url, rows=300)
    write_config(tmp_path, sqlite_url)
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()
    original = raw_rows(eng)
    with eng.begin() as c:
        c.exec_driver_sql("DROP TABLE kb_chunks")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert r.json()["plan"]["retrieval"]["kb_chunks"] == {"added": 0, "modified": 0, "deleted": 300}
    assert raw_rows(eng) == original
    cols = {c["name"]: c for c in sa.inspect(eng).get_columns("kb_chunks")}
    assert str(cols["price"]["type"]).startswith("NUMERIC") and cols["id"]["primary_key"]


def test_schema_change_is_refused_before_any_write(sqlite_url, tmp_path, cli):
    eng = make_table(sqlite_url, rows=100)
    write_config(tmp_path, sqlite_url)
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM kb_chunks WHERE id < 10")
        c.exec_driver_sql("ALTER TABLE kb_chunks ADD COLUMN extra TEXT")
    r = cli("restore", snap["id"], "--yes")
    assert r.code == 2 and "extra" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "repo" / "quarantine").exists()
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM kb_chunks").scalar() == 90


def test_release_resolution_prefers_known_good(sqlite_url, tmp_path, cli):
    eng = make_table(sqlite_url, rows=50)
    write_config(tmp_path, sqlite_url)
    cli("init")
    a = cli("--json", "snapshot", "--release", "v1").json()
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE kb_chunks SET title = 'later' WHERE id = 1")
    b = cli("--json", "snapshot", "--release", "v1").json()
    assert cli("--json", "diff", b["id"]).json()["plan"]["retrieval"]["kb_chunks"]["modified"] == 0
    # no mark: newest of the release
    assert cli("--json", "restore", "--release", "v1", "--dry-run").json()["snapshot"] == b["id"]
    assert cli("mark-good", a["id"]).code == 0
    assert cli("--json", "restore", "--release", "v1", "--dry-run").json()["snapshot"] == a["id"]
    assert cli("--json", "list").json()[1]["good"] is True
    assert cli("unmark-good", a["id"]).code == 0
    assert cli("--json", "restore", "--release", "v1", "--before", a["taken_at"], "--dry-run").code == 5
    assert cli("--json", "restore", "--release", "v9", "--dry-run").code == 5
    r = cli("--json", "restore", "--release", "v1", "--yes")
    assert r.code == 0 and r.json()["snapshot"] == b["id"] and r.json()["quarantined"] == 0


def test_missing_object_stops_restore_before_any_write(sqlite_url, tmp_path, cli):
    eng = make_table(sqlite_url, rows=3000)
    write_config(tmp_path, sqlite_url)
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()
    bad_writes(eng)
    live = raw_rows(eng)
    victim = sorted(p for p in (tmp_path / "repo" / "chunks").rglob("*") if p.is_file())[-1]
    victim.unlink()
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 3 and json.loads(r.err)["error"]["type"] == "integrity"
    assert raw_rows(eng) == live
    assert not (tmp_path / "repo" / "quarantine").exists()


def test_kill_9_during_restore_then_rerun_converges(tmp_path, cli):
    """Kill the restore at random moments; the re-run reaches the snapshot and the
    first run's quarantine still holds the original live values."""
    url = f"sqlite:///{tmp_path / 'agent.db'}"
    eng = make_table(url, rows=20_000)
    write_config(tmp_path, url)
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()
    original = raw_rows(eng)
    rnd = random.Random(11)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for trial in range(3):
        with eng.begin() as c:
            c.exec_driver_sql(f"UPDATE kb_chunks SET body = 'drift {trial}' WHERE id % 7 = {trial}")
            c.exec_driver_sql(f"DELETE FROM kb_chunks WHERE id % 101 = {trial}")
        pre = raw_rows(eng)
        p = subprocess.Popen([sys.executable, "-m", "snapshotter", "restore", snap["id"], "--yes",
                              "--incident", f"crash-{trial}"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.3, 2.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        # the killed run's lock is left behind, but its process is gone: the re-run clears it
        r = cli("--json", "restore", snap["id"], "--yes")
        assert r.code == 0, r.err
        assert raw_rows(eng) == original
        repo = Repository.open(open_store(str(tmp_path / "repo")))
        first = [b for b in bundles(repo) if b["incident"] == f"crash-{trial}"]
        if first:  # killed after the quarantine was committed: it holds the original values
            assert rebuild_pre_restore(repo, original, first[0]) == pre
        else:  # killed before: the re-run quarantined everything
            latest = [b for b in bundles(repo) if b["incident"] == r.json()["incident"]]
            assert rebuild_pre_restore(repo, original, latest[0]) == pre


def test_a_dropped_empty_table_is_recreated(sqlite_url, tmp_path, cli):
    eng = sa.create_engine(sqlite_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE e (id INTEGER PRIMARY KEY, v TEXT)")
    write_config(tmp_path, sqlite_url)
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()
    with eng.begin() as c:
        c.exec_driver_sql("DROP TABLE e")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert "e" in sa.inspect(eng).get_table_names()


def test_an_unreadable_bundle_does_not_block_restores(sqlite_url, tmp_path, cli):
    eng = make_table(sqlite_url, rows=50)
    write_config(tmp_path, sqlite_url)
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()
    bad = tmp_path / "repo" / "quarantine" / "bad"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text('{"incident": "other"}')
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM kb_chunks WHERE id < 5")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert r.json()["quarantined"] == 5


def snapshot_table(cli, tmp_path, url: str, table: str) -> str:
    """A repository holding one snapshot of ``table`` (source ``db``); the snapshot's id."""
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{url}"\ntables = ["{table}"]\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    return r.json()["id"]


def test_mariadb_latin1_text_keys_in_code_point_order(mysql_url, tmp_path, cli):
    """A latin1 (cp1252) column's bytes put '€' (0x80) before 'Ž' and 'é': keys are
    ordered by their UTF-8 bytes, so the stream is in code point order and diff and
    restore merge it correctly."""
    eng = sa.create_engine(mysql_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE words (w VARCHAR(20) CHARACTER SET latin1 PRIMARY KEY, n INT)")
        c.execute(sa.text("INSERT INTO words VALUES (:w, :n)"),
                  [{"w": w, "n": i} for i, w in enumerate(["a", "z", "é", "€uro", "Ž", "b€", "œuvre"])])

    def rows():
        with eng.connect() as c:
            return sorted(c.exec_driver_sql("SELECT w, n FROM words").all())

    drift_then_restore(cli, eng, snapshot_table(cli, tmp_path, mysql_url, "words"), "words", [
        "UPDATE words SET n = -1 WHERE w IN ('€uro', 'a')",
        "DELETE FROM words WHERE w = 'Ž'",
        "INSERT INTO words VALUES ('ñ', 99)",
    ], {"added": 1, "modified": 2, "deleted": 1}, rows)
    eng.dispose()


def test_keys_of_mixed_types_are_refused_in_one_line(sqlite_url, tmp_path, cli):
    """SQLite lets one key column hold numbers and text, which Python cannot order
    together: the snapshot is refused (exit 2) naming the cause, and nothing is written."""
    eng = sa.create_engine(sqlite_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE m (id PRIMARY KEY, v TEXT)")
        c.exec_driver_sql("INSERT INTO m VALUES (1, 'a'), ('b', 'c'), (2.5, 'd')")
    eng.dispose()
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{sqlite_url}"\n')
    assert cli("init").code == 0
    r = cli("snapshot", "--release", "r")
    assert r.code == 2
    assert "table m: key column id holds values of types integer (1 row(s)), real (1 row(s)) and text (1 row(s))" \
        in r.err and len(r.err.strip().splitlines()) == 1
    assert not list((tmp_path / "repo" / "snapshots").rglob("*.json"))


GENERATED_TABLES = {
    "postgresql": "CREATE TABLE gen (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a int, "
                  "twice int GENERATED ALWAYS AS (a * 2) STORED, body text)",
    "mysql": "CREATE TABLE gen (id bigint AUTO_INCREMENT PRIMARY KEY, a int, twice int AS (a * 2) PERSISTENT, "
               "body text)",
    "sqlite": "CREATE TABLE gen (id INTEGER PRIMARY KEY AUTOINCREMENT, a int, "
              "twice int GENERATED ALWAYS AS (a * 2) STORED, body text)",
}


def test_identity_and_generated_columns_restore(any_db_url, tmp_path, cli):
    """Retrieval tables often have an identity key and a generated column (a tsvector, a
    derived value): rows go back with their identity values and without writing the
    generated column, which the database recomputes (before: 'cannot insert a non-DEFAULT
    value into column', exit 1)."""
    eng = sa.create_engine(any_db_url)
    with eng.begin() as c:
        c.exec_driver_sql(GENERATED_TABLES[eng.dialect.name])
        for a in (1, 2, 3):
            c.exec_driver_sql(f"INSERT INTO gen (a, body) VALUES ({a}, 'doc {a}')")

    def rows():
        with eng.connect() as c:
            return [tuple(r) for r in c.exec_driver_sql("SELECT id, a, twice, body FROM gen ORDER BY id")]

    drift_then_restore(cli, eng, snapshot_table(cli, tmp_path, any_db_url, "gen"), "gen", [
        "UPDATE gen SET a = 10, body = 'poison' WHERE id = 1", "DELETE FROM gen WHERE id = 2",
        "INSERT INTO gen (a, body) VALUES (7, 'injected')",
    ], {"added": 1, "modified": 1, "deleted": 1}, rows)
    eng.dispose()


def test_a_snapshot_source_no_longer_configured_is_named_not_skipped_silently(sqlite_url, tmp_path, cli):
    """The config lost a source the snapshot holds: a full restore cannot put it back, and
    says so on stderr and in its JSON, instead of a plan that silently leaves it out."""
    make_table(sqlite_url, rows=20)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    make_table(other, rows=5)
    write_config(tmp_path, sqlite_url, f'[sources.archive]\nbackend = "sql"\nurl = "{other}"\n')
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()["id"]
    write_config(tmp_path, sqlite_url)
    for args in (("diff", snap), ("restore", snap, "--dry-run"), ("restore", snap, "--yes")):
        r = cli("--json", *args)
        assert r.code == 0, r.err
        assert r.json()["not_configured"] == ["archive"] and list(r.json()["plan"]) == ["retrieval"]
        assert "holds source(s) 'archive', which the config file no longer has" in r.err
    assert cli("restore", snap, "--source", "archive", "--yes").code == 5


MARIADB_KEYS = {
    # MariaDB sorts an ENUM by its declaration order; keys come back as their labels, so they are
    # read in the labels' order (the table could not be snapshotted before)
    "enum": ("CREATE TABLE k (p ENUM('zeta', 'alpha', 'mid') PRIMARY KEY, n INT)",
             "INSERT INTO k VALUES ('zeta', 1), ('alpha', 2), ('mid', 3)", "SELECT p, n FROM k",
             ["UPDATE k SET n = -1 WHERE p = 'zeta'", "DELETE FROM k WHERE p = 'mid'"]),
    # a BIT key comes back as bytes but matches only a number: the restore's delete found
    # nothing and the re-insert failed ('Duplicate entry')
    "bit": ("CREATE TABLE k (p BIT(12) PRIMARY KEY, n INT)",
            "INSERT INTO k VALUES (b'000000000010', 1), (b'100000000001', 2), (b'0', 3)", "SELECT p + 0, n FROM k",
            ["UPDATE k SET n = -1 WHERE p = 2", "DELETE FROM k WHERE p = 0"]),
}


@pytest.mark.parametrize("kind", sorted(MARIADB_KEYS))
def test_mariadb_keys_of_their_own_order_and_form(kind, mysql_url, tmp_path, cli):
    create, insert, select, changes = MARIADB_KEYS[kind]
    eng = sa.create_engine(mysql_url)
    with eng.begin() as c:
        c.exec_driver_sql(create)
        c.exec_driver_sql(insert)

    def rows():
        with eng.connect() as c:
            return sorted(c.exec_driver_sql(select).all())

    drift_then_restore(cli, eng, snapshot_table(cli, tmp_path, mysql_url, "k"), "k", changes,
                       {"added": 0, "modified": 1, "deleted": 1}, rows)
    eng.dispose()
