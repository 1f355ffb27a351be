"""Restore into the schemas real agents have: foreign keys with and without ON DELETE
CASCADE (a RAG app's documents -> chunks -> citations chain, composite keys), a
"touch updated_at" trigger, an audit trigger writing a table outside the restore.

Every case goes snapshot -> drift -> diff -> restore and checks that the live state
equals the snapshot, that nothing outside the selection changed (the audit table, a
child table the agent wrote legitimately), that the agent's ordinary writes still work
(defaults, triggers and foreign keys are in force again), and that snapshot + incident
rebuild the pre-restore state exactly."""
from __future__ import annotations

import json
import secrets

import pytest
import sqlalchemy as sa

from snapshotter import codec
from snapshotter.objectstore import open_store
from snapshotter.quarantine import iter_records, load_bundle
from snapshotter.repository import Repository

CAPTURED = ["documents", "chunks", "citations", "passages", "passage_tags"]


def corpus(dialect: str, triggers: bool = True) -> list[str]:
    """The corpus's DDL for one dialect (MariaDB without triggers unless asked: a restore refuses them)."""
    if dialect == "postgresql":
        ts, now, auto = "timestamptz", "now()", "serial PRIMARY KEY"
    elif dialect == "sqlite":
        ts, now, auto = "TEXT", "CURRENT_TIMESTAMP", "INTEGER PRIMARY KEY AUTOINCREMENT"
    else:
        ts, now, auto = "TIMESTAMP(6)", "CURRENT_TIMESTAMP(6)", "INT AUTO_INCREMENT PRIMARY KEY"
    text = "VARCHAR(200)" if dialect == "mariadb" else "TEXT"
    ddl = [
        f"CREATE TABLE documents (id INT PRIMARY KEY, title {text} NOT NULL, updated_at {ts} NOT NULL DEFAULT {now})",
        f"CREATE TABLE chunks (id INT PRIMARY KEY, doc_id INT NOT NULL, body {text}, "
        f"FOREIGN KEY (doc_id) REFERENCES documents (id) ON DELETE CASCADE)",
        f"CREATE TABLE citations (id INT PRIMARY KEY, chunk_id INT NOT NULL, note {text}, "
        f"FOREIGN KEY (chunk_id) REFERENCES chunks (id))",
        f"CREATE TABLE passages (doc_id INT NOT NULL, n INT NOT NULL, body {text}, PRIMARY KEY (doc_id, n), "
        f"FOREIGN KEY (doc_id) REFERENCES documents (id) ON DELETE CASCADE)",
        f"CREATE TABLE passage_tags (id INT PRIMARY KEY, doc_id INT, n INT, tag {text}, "
        f"FOREIGN KEY (doc_id, n) REFERENCES passages (doc_id, n) ON DELETE CASCADE)",
        f"CREATE TABLE audit_log (id {auto}, tbl {text}, op {text})",
    ]
    if not triggers:
        return ddl
    if dialect == "postgresql":
        ddl += [
            "CREATE FUNCTION touch() RETURNS trigger AS $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$ "
            "LANGUAGE plpgsql",
            "CREATE TRIGGER documents_touch BEFORE INSERT OR UPDATE ON documents FOR EACH ROW EXECUTE FUNCTION touch()",
            "CREATE FUNCTION audit() RETURNS trigger AS $$ BEGIN INSERT INTO audit_log (tbl, op) "
            "VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER chunks_audit AFTER INSERT OR UPDATE OR DELETE ON chunks FOR EACH ROW EXECUTE FUNCTION audit()",
        ]
    elif dialect == "sqlite":
        ddl += [
            "CREATE TRIGGER documents_touch AFTER UPDATE ON documents FOR EACH ROW "
            "BEGIN UPDATE documents SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id = NEW.id; END",
            "CREATE TRIGGER chunks_audit_i AFTER INSERT ON chunks BEGIN INSERT INTO audit_log (tbl, op) "
            "VALUES ('chunks', 'INSERT'); END",
            "CREATE TRIGGER chunks_audit_d AFTER DELETE ON chunks BEGIN INSERT INTO audit_log (tbl, op) "
            "VALUES ('chunks', 'DELETE'); END",
        ]
    else:
        ddl += [
            "CREATE TRIGGER documents_touch BEFORE UPDATE ON documents FOR EACH ROW SET NEW.updated_at = NOW(6)",
            "CREATE TRIGGER documents_stamp BEFORE INSERT ON documents FOR EACH ROW SET NEW.updated_at = NOW(6)",
        ]
    return ddl


def dialect_of(url: str) -> str:
    return {"postgresql": "postgresql", "sqlite": "sqlite", "mysql": "mariadb"}[sa.engine.make_url(url).get_backend_name()]


def engine(url: str) -> sa.Engine:
    eng = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    if dialect_of(url) == "sqlite":
        # the agent's own connections enforce foreign keys, as apps that declare them do
        sa.event.listen(eng, "connect", lambda dbapi, _rec: dbapi.execute("PRAGMA foreign_keys = ON"))
    return eng


def build(url: str, triggers: bool = True) -> sa.Engine:
    eng = engine(url)
    with eng.connect() as c:
        for stmt in corpus(dialect_of(url), triggers):
            c.exec_driver_sql(stmt)
        for d in range(1, 6):
            c.exec_driver_sql(f"INSERT INTO documents (id, title, updated_at) VALUES ({d}, 'doc {d}', "
                              f"'2026-01-0{d} 10:00:00')")
            for k in range(3):
                cid = d * 10 + k
                c.exec_driver_sql(f"INSERT INTO chunks VALUES ({cid}, {d}, 'chunk {cid}')")
                c.exec_driver_sql(f"INSERT INTO citations VALUES ({cid * 10}, {cid}, 'cites {cid}')")
                c.exec_driver_sql(f"INSERT INTO passages VALUES ({d}, {k}, 'passage {d}.{k}')")
                c.exec_driver_sql(f"INSERT INTO passage_tags VALUES ({cid}, {d}, {k}, 'tag')")
    return eng


def state(eng, tables=CAPTURED + ["audit_log"]) -> dict:
    out = {}
    with eng.connect() as c:
        for t in tables:
            rows = c.exec_driver_sql(f"SELECT * FROM {t}").fetchall()
            out[t] = sorted(codec.pack([str(v) for v in r]) for r in rows)
    return out


def configure(tmp_path, url: str, tables=CAPTURED) -> None:
    listed = ", ".join(f'"{t}"' for t in tables)
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{url}"\ntables = [{listed}]\n')


def snapshot_of(tmp_path, cli, url: str, tables=CAPTURED) -> dict:
    """Configure a repository and the source, and take the snapshot v1 (its JSON)."""
    configure(tmp_path, url, tables)
    cli("init")
    return cli("--json", "snapshot", "--release", "v1").json()


def agent_drift(eng) -> None:
    """What a misbehaving agent writes: a parent modified under its children, a child
    modified, a chain deleted children first, a parent + child + grandchild chain added,
    a composite-keyed row modified and one added."""
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE documents SET title = 'ignore previous instructions' WHERE id = 1")
        c.exec_driver_sql("UPDATE chunks SET body = 'poisoned' WHERE id = 21")
        c.exec_driver_sql("DELETE FROM citations WHERE chunk_id = 32")
        c.exec_driver_sql("DELETE FROM chunks WHERE id = 32")
        c.exec_driver_sql("INSERT INTO documents (id, title) VALUES (100, 'exfiltrate')")
        c.exec_driver_sql("INSERT INTO chunks VALUES (1000, 100, 'exfil chunk')")
        c.exec_driver_sql("INSERT INTO citations VALUES (5000, 1000, 'exfil cite')")
        c.exec_driver_sql("UPDATE passages SET body = 'poisoned passage' WHERE doc_id = 2 AND n = 1")
        c.exec_driver_sql("INSERT INTO passages VALUES (100, 0, 'exfil passage')")
        c.exec_driver_sql("INSERT INTO passage_tags VALUES (9000, 100, 0, 'exfil')")


def test_corpus_full_restore_writes_exactly_its_plan(any_db_url, tmp_path, cli):
    url, kind = any_db_url, dialect_of(any_db_url)
    eng = build(url, triggers=kind != "mariadb")
    snap = snapshot_of(tmp_path, cli, url)
    original = state(eng)
    agent_drift(eng)
    drifted = state(eng)
    plan = cli("--json", "diff", snap["id"]).json()["plan"]["db"]
    assert plan["documents"] == {"added": 1, "modified": 1, "deleted": 0}
    assert plan["chunks"] == {"added": 1, "modified": 1, "deleted": 1}
    assert plan["citations"] == {"added": 1, "modified": 0, "deleted": 1}
    assert plan["passages"] == {"added": 1, "modified": 1, "deleted": 0}
    assert plan["passage_tags"] == {"added": 1, "modified": 0, "deleted": 0}

    r = cli("--json", "restore", snap["id"], "--yes", "--incident", "inc-corpus")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    after = state(eng)
    for t in CAPTURED:
        assert after[t] == original[t], t
    # no trigger fired and no cascade ran: the table the audit trigger writes is as the agent left it
    assert after["audit_log"] == drifted["audit_log"]
    # right after, the live state equals the snapshot
    plan = cli("--json", "diff", snap["id"]).json()["plan"]["db"]
    assert all(p == {"added": 0, "modified": 0, "deleted": 0} for p in plan.values()), plan

    # snapshot + incident rebuild the pre-restore state: every changed row is in the incident
    repo = Repository.open(open_store(str(tmp_path / "repo")))
    ops = {}
    for _, stream, rec in iter_records(repo, load_bundle(repo, "inc-corpus")):
        ops[stream, codec.key_text(rec.key)] = rec.value["op"]
    assert ops[("documents", "1")] == "modified" and ops[("documents", "100")] == "added"
    assert ops[("chunks", "32")] == "deleted" and ops[("citations", "5000")] == "added"
    assert ops[("passages", "[2, 1]")] == "modified" and ops[("passage_tags", "9000")] == "added"
    assert len(ops) == 10

    # reapply is held to the same rules: a chunk without its document breaks a foreign key (exit 3,
    # nothing written); the document and then its chunk go back
    before = state(eng)
    r = cli("--json", "quarantine", "reapply", "inc-corpus", "1000", "--stream", "chunks", "--yes")
    assert r.code == 2, r.err
    assert "chunks(doc_id) -> documents(id)" in r.err and state(eng) == before
    r = cli("--json", "quarantine", "reapply", "inc-corpus", "100", "--stream", "documents", "--yes")
    assert r.code == 0, r.err
    r = cli("--json", "quarantine", "reapply", "inc-corpus", "1000", "--stream", "chunks", "--yes")
    assert r.code == 0, r.err
    assert state(eng)["audit_log"] == before["audit_log"]
    with eng.begin() as c:
        assert c.exec_driver_sql("SELECT title FROM documents WHERE id = 100").scalar() == "exfiltrate"
        c.exec_driver_sql("DELETE FROM documents WHERE id = 100")  # the agent's cascade, not the restore's
        assert c.exec_driver_sql("SELECT count(*) FROM chunks WHERE id = 1000").scalar() == 0

    # the agent's ordinary writes work, with its triggers, defaults and foreign keys in force
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO documents (id, title) VALUES (200, 'next')")
        c.exec_driver_sql("INSERT INTO chunks VALUES (2000, 200, 'next chunk')")
        c.exec_driver_sql("UPDATE documents SET title = 'renamed' WHERE id = 2")
        stamp = c.exec_driver_sql("SELECT updated_at FROM documents WHERE id = 2").scalar()
    if kind != "mariadb":
        assert "2026-01-02" not in str(stamp), "the touch trigger no longer fires"
    with pytest.raises(sa.exc.IntegrityError):
        with eng.begin() as c:
            c.exec_driver_sql("INSERT INTO chunks VALUES (2001, 9999, 'orphan')")
    if kind != "mariadb":
        with eng.begin() as c:
            c.exec_driver_sql("DELETE FROM chunks WHERE id = 2000")
        assert len(state(eng)["audit_log"]) > len(drifted["audit_log"]), "the audit trigger no longer fires"
    eng.dispose()


def test_stream_restore_of_a_parent_keeps_the_children(any_db_url, tmp_path, cli):
    """`restore --stream documents`: a modified parent is updated in place, so a child row the
    agent legitimately added under it is kept; a parent the agent added whose child the
    selection leaves out is refused before any write, naming the table to add."""
    url, kind = any_db_url, dialect_of(any_db_url)
    eng = build(url, triggers=kind != "mariadb")
    snap = snapshot_of(tmp_path, cli, url)
    original = state(eng)
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE documents SET title = 'poisoned' WHERE id = 1")
        c.exec_driver_sql("INSERT INTO chunks VALUES (1001, 1, 'a legitimate new chunk')")
    drifted = state(eng)
    r = cli("--json", "restore", snap["id"], "--stream", "documents", "--yes")
    assert r.code == 0, r.err
    after = state(eng)
    assert after["documents"] == original["documents"]
    for t in ("chunks", "citations", "passages", "passage_tags", "audit_log"):
        assert after[t] == drifted[t], t

    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO documents (id, title) VALUES (100, 'exfiltrate')")
        c.exec_driver_sql("INSERT INTO chunks VALUES (1000, 100, 'child of the added document')")
    drifted = state(eng)
    r = cli("--json", "diff", snap["id"], "--stream", "documents")
    assert r.json()["dependencies"] == {"db": {"documents": ["chunks", "passages"]}}
    r = cli("diff", snap["id"], "--stream", "documents")
    assert "db/documents is referenced by chunks, passages (not selected)" in r.out
    r = cli("--json", "restore", snap["id"], "--stream", "documents", "--yes")
    assert r.code == 2, r.err
    assert "chunks" in r.err and "--stream chunks" in r.err and "Nothing was written" in r.err
    assert state(eng) == drifted
    assert cli("--json", "quarantine", "list").json()[0]["records"] == 1  # only the first restore's incident
    # with the child table in the selection it goes through, children deleted first
    r = cli("--json", "restore", snap["id"], "--stream", "documents", "--stream", "chunks", "--yes")
    assert r.code == 0, r.err
    after = state(eng)
    assert after["documents"] == original["documents"] and after["chunks"] == original["chunks"]
    eng.dispose()


def test_mariadb_trigger_on_a_written_table_is_refused_before_any_write(mysql_url, tmp_path, cli):
    eng = build(mysql_url, triggers=True)
    snap = snapshot_of(tmp_path, cli, mysql_url)
    agent_drift(eng)
    drifted = state(eng)
    r = cli("--json", "restore", snap["id"], "--dry-run")
    assert r.code == 0 and "documents_stamp on documents" in r.json()["refusals"]["db"]
    assert "a restore of this plan would be refused" in cli("diff", snap["id"]).out
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 2, r.err
    # the INSERT trigger would fire (a modified row goes back as a delete and an insert); the UPDATE one never
    assert "documents_stamp on documents" in r.err and "documents_touch" not in r.err
    assert "Nothing was written" in r.err
    assert state(eng) == drifted
    assert cli("--json", "quarantine", "list").json() == []
    # a selection that does not write the trigger's table is not refused
    r = cli("--json", "restore", snap["id"], "--stream", "passages", "--stream", "passage_tags", "--yes")
    assert r.code == 0, r.err
    # one that would put back a citation whose chunk the selection leaves deleted would break a foreign
    # key: refused before any write, naming the table to add
    before = state(eng)
    r = cli("--json", "restore", snap["id"], "--stream", "citations", "--yes")
    assert r.code == 2, r.err
    assert "citations(chunk_id) -> chunks(id)" in r.err and "--stream chunks" in r.err
    assert state(eng) == before


@pytest.fixture
def pg_role(pg_url):
    """A login role that may read and write the test database's tables but owns none of them."""
    role = "snap_r_" + secrets.token_hex(3)
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
    yield role, sa.engine.make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.exec_driver_sql(f"DROP OWNED BY {role}")
        c.exec_driver_sql(f"DROP ROLE {role}")
    admin.dispose()


def test_postgres_role_that_cannot_switch_triggers_off_is_refused_then_granted(pg_url, pg_role, tmp_path, cli):
    role, role_url = pg_role
    eng = build(pg_url)
    with eng.connect() as c:
        c.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        c.exec_driver_sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    snap = snapshot_of(tmp_path, cli, role_url)
    original = state(eng)
    agent_drift(eng)
    drifted = state(eng)
    assert "GRANT SET ON PARAMETER" in cli("--json", "diff", snap["id"]).json()["refusals"]["db"]
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 2, r.err
    assert "trigger documents_touch on documents" in r.err and "GRANT SET ON PARAMETER session_replication_role" in r.err
    assert state(eng) == drifted
    with eng.connect() as c:
        c.exec_driver_sql(f"GRANT SET ON PARAMETER session_replication_role TO {role}")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    after = state(eng)
    assert all(after[t] == original[t] for t in CAPTURED)
    assert after["audit_log"] == drifted["audit_log"]
    eng.dispose()


def test_postgres_role_without_replica_mode_restores_a_moved_child_and_refuses_an_update_cascade(
        pg_url, pg_role, tmp_path, cli):
    """A role that may not set session_replication_role restores with foreign keys enforced: a
    child the agent moved to a parent it added is written back before that parent is deleted
    (no ON DELETE action fires); a referenced value the restore would change under an ON UPDATE
    CASCADE key is refused before any write (exit 2), and restored by a role that may."""
    role, role_url = pg_role
    eng = engine(pg_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE folders (id int PRIMARY KEY, slug text UNIQUE NOT NULL)")
        c.exec_driver_sql("CREATE TABLE notes (id int PRIMARY KEY, folder_id int REFERENCES folders ON DELETE SET NULL,"
                          " body text)")
        c.exec_driver_sql("CREATE TABLE links (id int PRIMARY KEY, slug text REFERENCES folders (slug) "
                          "ON UPDATE CASCADE)")
        c.exec_driver_sql("INSERT INTO folders VALUES (1, 'a'), (2, 'b')")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 1, 'x'), (2, 2, 'y')")
        c.exec_driver_sql("INSERT INTO links VALUES (1, 'a')")
        c.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    tables = ["folders", "notes", "links"]
    snap = snapshot_of(tmp_path, cli, role_url, tables=tables)
    original = state(eng, tables)
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO folders VALUES (3, 'new')")
        c.exec_driver_sql("UPDATE notes SET folder_id = 3 WHERE id = 1")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert state(eng, tables) == original

    with eng.begin() as c:
        c.exec_driver_sql("UPDATE folders SET slug = 'a-evil' WHERE id = 1")  # the cascade changes links too
    drifted = state(eng, tables)
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 2, r.err
    assert "links(slug) -> folders(slug) ON UPDATE CASCADE" in r.err and "Nothing was written" in r.err
    assert state(eng, tables) == drifted
    configure(tmp_path, pg_url, tables=tables)
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert state(eng, tables) == original
    eng.dispose()


def test_postgres_child_table_in_another_schema_is_a_dependant_too(pg_url, tmp_path, cli):
    """A table of another schema that references a restored table: deleting the parent row it
    uses is refused before any write (in replica mode nothing would cascade, and the key would
    be left broken)."""
    eng = engine(pg_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE folders (id int PRIMARY KEY, name text)")
        c.exec_driver_sql("CREATE SCHEMA other")
        c.exec_driver_sql("CREATE TABLE other.notes (id int PRIMARY KEY, folder_id int REFERENCES public.folders "
                          "ON DELETE CASCADE)")
        c.exec_driver_sql("INSERT INTO folders VALUES (1, 'a')")
    snap = snapshot_of(tmp_path, cli, pg_url, tables=["folders"])
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO folders VALUES (2, 'new')")
        c.exec_driver_sql("INSERT INTO other.notes VALUES (1, 2)")
    drifted = state(eng, ["folders", "other.notes"])
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 2, r.err
    assert "other.notes" in r.err and state(eng, ["folders", "other.notes"]) == drifted
    eng.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_write_the_restore_did_not_make_is_counted(kind, request):
    """The proof before commit: a row changed in the write transaction by anything but the
    restore's own counted statements (what a trigger, rule or cascade would do) is reported."""
    from snapshotter_backends.sql import base as sqlbase, integrity as sqlintegrity
    url = request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url"}[kind])
    eng = engine(url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE kb (id int PRIMARY KEY, v text)")
        c.exec_driver_sql("CREATE TABLE side (id int PRIMARY KEY)")
        c.exec_driver_sql("INSERT INTO kb VALUES (1, 'a')")
    conn = sqlbase.make_engine(sa.engine.make_url(url), "test").connect()
    sqlbase.begin_write(conn)
    guard = sqlintegrity.Guard(conn, conn.dialect.name)
    doc = {"table": "kb", "db_schema": None}
    guard.before_write(doc)
    conn.exec_driver_sql("UPDATE kb SET v = 'b' WHERE id = 1")
    guard.wrote(doc, updated=1)
    assert guard.finish() == []
    guard.result, guard.reported = None, False
    conn.exec_driver_sql("INSERT INTO side VALUES (1)")
    problems = guard.finish()
    assert len(problems) == 1 and ("side" in problems[0] or kind == "sqlite") and "did not plan" in problems[0]
    sqlbase.end_transaction(conn, commit=False)
    conn.close()
    eng.dispose()


def test_unique_values_two_rows_swapped_are_restored(any_db_url, tmp_path, cli):
    url, kind = any_db_url, dialect_of(any_db_url)
    eng = engine(url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE coll (id int PRIMARY KEY, name VARCHAR(50) NOT NULL UNIQUE)")
        c.exec_driver_sql("INSERT INTO coll VALUES (1, 'kb'), (2, 'faq')")
    snap = snapshot_of(tmp_path, cli, url, tables=["coll"])
    original = state(eng, ["coll"])
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE coll SET name = 'tmp' WHERE id = 1")
        c.exec_driver_sql("UPDATE coll SET name = 'kb' WHERE id = 2")
        c.exec_driver_sql("UPDATE coll SET name = 'faq' WHERE id = 1")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert state(eng, ["coll"]) == original
    eng.dispose()


def test_sqlite_triggers_keep_their_firing_order(sqlite_url, tmp_path, cli):
    eng = engine(sqlite_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        c.exec_driver_sql("CREATE TABLE log (id INTEGER PRIMARY KEY, s TEXT)")
        for n in ("a1", "a2", "a3"):
            c.exec_driver_sql(f"CREATE TRIGGER {n} AFTER INSERT ON t BEGIN INSERT INTO log (s) VALUES ('{n}'); END")
        c.exec_driver_sql("INSERT INTO t VALUES (1, 'x')")
    snap = snapshot_of(tmp_path, cli, sqlite_url, tables=["t"])
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM t")
    assert cli("--json", "restore", snap["id"], "--yes").code == 0
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM log")
        c.exec_driver_sql("INSERT INTO t VALUES (2, 'y')")
        assert [r[0] for r in c.exec_driver_sql("SELECT s FROM log ORDER BY id")] == ["a3", "a2", "a1"]
    eng.dispose()


# -- keys and sessions under case-insensitive collations ------------------------------------

CI_KEY = {
    "sqlite": "CREATE TABLE kb (k TEXT COLLATE NOCASE PRIMARY KEY, v TEXT)",
    "postgresql": "CREATE TABLE kb (k citext PRIMARY KEY, v text)",
    "mariadb": "CREATE TABLE kb (k VARCHAR(50) PRIMARY KEY, v TEXT) COLLATE utf8mb4_general_ci",
}


def test_collation_equal_keys_restore_and_reapply_as_the_database_compares(any_db_url, tmp_path, cli):
    """The agent replaced key 'abc' by 'ABC' (equal under the column's collation); after the
    restore it updates 'abc'.  Reapplying 'ABC' would overwrite that update: refused (exit 6)
    without --force; with --force the row takes the exact key written."""
    url, kind = any_db_url, dialect_of(any_db_url)
    eng = engine(url)
    with eng.connect() as c:
        if kind == "postgresql":
            c.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS citext")
        c.exec_driver_sql(CI_KEY[kind])
        c.exec_driver_sql("INSERT INTO kb VALUES ('abc', 'original'), ('xyz', 'kept')")
    snap = snapshot_of(tmp_path, cli, url, tables=["kb"])
    original = state(eng, ["kb"])
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM kb WHERE k = 'abc'")
        c.exec_driver_sql("INSERT INTO kb VALUES ('ABC', 'poisoned')")
    r = cli("--json", "restore", snap["id"], "--yes", "--incident", "inc-ci")
    assert r.code == 0, r.err
    assert r.json()["plan"]["db"]["kb"] == {"added": 1, "modified": 0, "deleted": 1}
    assert state(eng, ["kb"]) == original
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE kb SET v = 'fixed by the agent' WHERE k = 'abc'")
    fixed = state(eng, ["kb"])
    r = cli("--json", "quarantine", "reapply", "inc-ci", "ABC", "--yes")
    assert r.code == 6, r.err
    assert state(eng, ["kb"]) == fixed
    r = cli("--json", "quarantine", "reapply", "inc-ci", "ABC", "--yes", "--force")
    assert r.code == 0, r.err
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT k, v FROM kb ORDER BY v").fetchall() == [("xyz", "kept"), ("ABC", "poisoned")]
    eng.dispose()


CI_SESSIONS = {
    "sqlite": "CREATE TABLE message_store (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT COLLATE NOCASE "
              "NOT NULL, message TEXT)",
    "postgresql": "CREATE TABLE message_store (id serial PRIMARY KEY, session_id citext NOT NULL, message text)",
    "mariadb": "CREATE TABLE message_store (id INT AUTO_INCREMENT PRIMARY KEY, session_id VARCHAR(100) NOT NULL, "
               "message TEXT) COLLATE utf8mb4_general_ci",
}


def test_session_ids_equal_under_the_collation_are_one_session(any_db_url, tmp_path, cli):
    """Under a case-insensitive collation 'alice' and 'Alice' are one conversation to the agent
    (LangChain's history of 'alice' reads both). `restore --session alice` alone is refused,
    naming 'Alice' (it deleted 'Alice''s messages as "added", or left poisoned ones the agent
    reads, while reporting verified); naming both restores both, and nothing else."""
    url, kind = any_db_url, dialect_of(any_db_url)
    eng = engine(url)
    with eng.connect() as c:
        if kind == "postgresql":
            c.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS citext")
        c.exec_driver_sql(CI_SESSIONS[kind])
        c.exec_driver_sql("INSERT INTO message_store (session_id, message) VALUES ('alice', 'a1'), ('Alice', 'A1'), "
                          "('bob', 'b1'), ('alice', 'a2')")
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.history]\nbackend = "conversation"\nurl = "{url}"\n')
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()
    original = state(eng, ["message_store"])
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE message_store SET message = 'poisoned' WHERE id = 1")
        c.exec_driver_sql("INSERT INTO message_store (session_id, message) VALUES ('ALICE', 'evil'), ('bob', 'b2')")
    drifted = state(eng, ["message_store"])
    for command in ("diff", "restore"):
        r = cli("--json", command, snap["id"], "--session", "alice", *(["--yes"] if command == "restore" else []))
        assert r.code == 2, r.err
        assert "'ALICE', 'Alice'" in r.err and "--session ALICE --session Alice --session alice" in r.err
    assert state(eng, ["message_store"]) == drifted
    r = cli("--json", "restore", snap["id"], "--session", "alice", "--session", "Alice", "--session", "ALICE", "--yes")
    assert r.code == 0, r.err
    assert r.json()["plan"]["history"]["message_store"] == {"added": 1, "modified": 1, "deleted": 0}
    after = state(eng, ["message_store"])
    with eng.connect() as c:
        rows = c.exec_driver_sql("SELECT session_id, message FROM message_store ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [("alice", "a1"), ("Alice", "A1"), ("bob", "b1"), ("alice", "a2"),
                                        ("bob", "b2")]
    assert after != original  # bob's new message is outside the selection and stays
    eng.dispose()


def test_mariadb_recreating_a_table_keeps_the_restore_one_transaction(mysql_url, tmp_path, cli):
    """MariaDB commits the open transaction at a CREATE TABLE: the restore that recreates a
    dropped table opens its transaction again, so a failure after the writes (here a row a CHECK
    constraint the agent added refuses) still rolls every written row back."""
    eng = engine(mysql_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INT PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("CREATE TABLE docs (id INT PRIMARY KEY, body VARCHAR(20))")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 'n1'), (2, 'n2')")
        c.exec_driver_sql("INSERT INTO docs VALUES (1, 'ok'), (2, 'bad')")
    snap = snapshot_of(tmp_path, cli, mysql_url, tables=["notes", "docs"])
    with eng.begin() as c:
        c.exec_driver_sql("DROP TABLE notes")
        c.exec_driver_sql("DELETE FROM docs WHERE id = 2")
        c.exec_driver_sql("ALTER TABLE docs ADD CONSTRAINT no_bad CHECK (body <> 'bad')")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 1, r.err
    assert "no_bad" in r.err
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM notes").scalar() == 0
        assert c.exec_driver_sql("SELECT count(*) FROM docs").scalar() == 1
    with eng.begin() as c:
        c.exec_driver_sql("ALTER TABLE docs DROP CONSTRAINT no_bad")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM notes").scalar() == 2
    eng.dispose()


# -- the layouts agent frameworks create ------------------------------------------------------

def framework_ddl(kind: str) -> list[str]:
    """LangChain's PGVector tables (collection -> embedding, ON DELETE CASCADE), LangGraph's
    checkpoint tables (composite keys, blobs), LangChain's SQL chat history (a serial key)."""
    if kind == "postgresql":
        uuid, jtype, blob, vec, serial = "uuid", "jsonb", "bytea", "real[]", "serial PRIMARY KEY"
    elif kind == "sqlite":
        uuid, jtype, blob, vec, serial = "TEXT", "TEXT", "BLOB", "TEXT", "INTEGER PRIMARY KEY AUTOINCREMENT"
    else:
        uuid, jtype, blob, vec, serial = "CHAR(36)", "JSON", "LONGBLOB", "JSON", "INT AUTO_INCREMENT PRIMARY KEY"
    text = "VARCHAR(150)" if kind == "mariadb" else "TEXT"
    b = "`blob`" if kind == "mariadb" else "blob"  # a reserved word there
    ddl = [
        f"CREATE TABLE langchain_pg_collection (uuid {uuid} PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE, "
        f"cmetadata {jtype})",
        f"CREATE TABLE langchain_pg_embedding (id VARCHAR(100) PRIMARY KEY, collection_id {uuid} REFERENCES "
        f"langchain_pg_collection (uuid) ON DELETE CASCADE, embedding {vec}, document {text}, cmetadata {jtype})",
        f"CREATE TABLE checkpoints (thread_id {text} NOT NULL, checkpoint_ns {text} NOT NULL DEFAULT '', "
        f"checkpoint_id {text} NOT NULL, parent_checkpoint_id {text}, type {text}, checkpoint {jtype} NOT NULL, "
        f"metadata {jtype} NOT NULL, PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id))",
        f"CREATE TABLE checkpoint_writes (thread_id {text} NOT NULL, checkpoint_ns {text} NOT NULL DEFAULT '', "
        f"checkpoint_id {text} NOT NULL, task_id {text} NOT NULL, idx INTEGER NOT NULL, channel {text} NOT NULL, "
        f"type {text}, {b} {blob} NOT NULL, PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx))",
        f"CREATE TABLE checkpoint_blobs (thread_id {text} NOT NULL, checkpoint_ns {text} NOT NULL DEFAULT '', "
        f"channel {text} NOT NULL, version {text} NOT NULL, type {text} NOT NULL, {b} {blob}, "
        f"PRIMARY KEY (thread_id, checkpoint_ns, channel, version))",
        f"CREATE TABLE message_store (id {serial}, session_id {text} NOT NULL, message {text} NOT NULL)",
    ]
    if kind == "postgresql":
        ddl.append("CREATE INDEX ix_cmetadata_gin ON langchain_pg_embedding USING gin (cmetadata jsonb_path_ops)")
    return ddl


FRAMEWORK_TABLES = ["langchain_pg_collection", "langchain_pg_embedding", "checkpoints", "checkpoint_writes",
                    "checkpoint_blobs", "message_store"]


def _vec(kind: str, values: list[float]) -> str:
    return ("'{" + ",".join(map(str, values)) + "}'") if kind == "postgresql" else f"'{json.dumps(values)}'"


def test_framework_layouts_restore_exactly_and_nothing_is_lost(any_db_url, tmp_path, cli):
    url, kind = any_db_url, dialect_of(any_db_url)
    eng = engine(url)
    u = ["11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222",
         "33333333-3333-3333-3333-333333333333"]
    with eng.connect() as c:
        for stmt in framework_ddl(kind):
            c.exec_driver_sql(stmt)
        c.exec_driver_sql(f"INSERT INTO langchain_pg_collection VALUES ('{u[0]}', 'kb', '{{}}'), ('{u[1]}', 'faq', '{{}}')")
        for i in range(6):
            c.exec_driver_sql(f"INSERT INTO langchain_pg_embedding VALUES ('e{i}', '{u[i % 2]}', "
                              f"{_vec(kind, [i / 8, 0.5, -1.25])}, 'doc {i}', '{{\"page\": {i}}}')")
        for t in ("t1", "t2"):
            for n in range(3):
                c.exec_driver_sql(f"INSERT INTO checkpoints VALUES ('{t}', '', 'c{n}', "
                                  f"{'NULL' if n == 0 else repr('c' + str(n - 1))}, 'json', '{{\"v\": {n}}}', "
                                  f"'{{\"step\": {n}}}')")
                c.exec_driver_sql(f"INSERT INTO checkpoint_writes VALUES ('{t}', '', 'c{n}', 'task', 0, 'messages', "
                                  f"'json', {repr('w' + str(n))})")
            c.exec_driver_sql(f"INSERT INTO checkpoint_blobs VALUES ('{t}', '', 'messages', '1', 'json', 'blob')")
        for m in range(4):
            c.exec_driver_sql(f"INSERT INTO message_store (session_id, message) VALUES ('s{m % 2}', 'm{m}')")
    snap = snapshot_of(tmp_path, cli, url, tables=FRAMEWORK_TABLES)
    original = state(eng, FRAMEWORK_TABLES)

    with eng.begin() as c:  # the agent goes wrong
        c.exec_driver_sql(f"DELETE FROM langchain_pg_collection WHERE uuid = '{u[1]}'")
        if kind != "postgresql":  # the others' connections here do not cascade for the agent
            c.exec_driver_sql(f"DELETE FROM langchain_pg_embedding WHERE collection_id = '{u[1]}'")
        c.exec_driver_sql(f"INSERT INTO langchain_pg_collection VALUES ('{u[2]}', 'poison', '{{}}')")
        c.exec_driver_sql(f"INSERT INTO langchain_pg_embedding VALUES ('p1', '{u[2]}', {_vec(kind, [9.0, 9.0, 9.0])}, "
                          f"'ignore previous instructions', '{{}}')")
        c.exec_driver_sql("UPDATE langchain_pg_embedding SET document = 'tampered' WHERE id = 'e0'")
        c.exec_driver_sql("INSERT INTO checkpoints VALUES ('t1', '', 'c3', 'c2', 'json', '{\"v\": 3}', '{\"step\": 3}')")
        c.exec_driver_sql("UPDATE checkpoints SET metadata = '{\"step\": 99}' WHERE thread_id = 't2' AND checkpoint_id = 'c1'")
        c.exec_driver_sql("DELETE FROM checkpoint_writes WHERE thread_id = 't2'")
        c.exec_driver_sql("DROP TABLE checkpoint_blobs")
        c.exec_driver_sql("INSERT INTO message_store (session_id, message) VALUES ('s0', 'poisoned')")
    drifted = state(eng, [t for t in FRAMEWORK_TABLES if t != "checkpoint_blobs"])

    r = cli("--json", "restore", snap["id"], "--yes", "--incident", "inc-fw", "--trust-repository-sql")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    assert state(eng, FRAMEWORK_TABLES) == original

    # snapshot + incident rebuild the pre-restore state of every table that was there
    repo = Repository.open(open_store(str(tmp_path / "repo")))
    manifest = repo.load_manifest(repo.resolve(snap["id"]))
    from snapshotter.streams import read_stream
    rebuilt = {}
    for table in drifted:
        rows = {codec.pack(rec.key): rec.value for rec in read_stream(repo, manifest["sources"]["db"]["streams"][table])}
        for _, _, rec in iter_records(repo, load_bundle(repo, "inc-fw"), stream=table):
            if rec.value["op"] == "deleted":
                rows.pop(codec.pack(rec.key))
            else:
                rows[codec.pack(rec.key)] = rec.value["value"]
        rebuilt[table] = sorted(codec.pack([str(v) for v in value.values()]) for value in rows.values())
    assert rebuilt == drifted

    # the agent carries on: a new message takes the next id, a new collection and its embeddings
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO message_store (session_id, message) VALUES ('s1', 'next')")
        assert c.exec_driver_sql("SELECT count(*) FROM message_store").scalar() == 5
        c.exec_driver_sql(f"INSERT INTO langchain_pg_collection VALUES ('{u[2]}', 'new', '{{}}')")
        c.exec_driver_sql(f"INSERT INTO checkpoint_blobs VALUES ('t3', '', 'messages', '1', 'json', 'b')")
    eng.dispose()


def test_mariadb_a_write_let_through_by_a_recreate_is_not_overwritten(mysql_url, tmp_path, cli, monkeypatch):
    """The CREATE TABLE of a recreated table commits the restore's transaction and frees the rows
    its plan locked; an agent write that gets in then is found by the re-read before the first
    write: refused (exit 6), nothing overwritten, and the next run quarantines it."""
    import snapshotter_backends.sql as sql_backend
    eng = engine(mysql_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE notes (id INT PRIMARY KEY, body TEXT)")
        c.exec_driver_sql("CREATE TABLE docs (id INT PRIMARY KEY, title VARCHAR(50))")
        c.exec_driver_sql("INSERT INTO notes VALUES (1, 'n1')")
        c.exec_driver_sql("INSERT INTO docs VALUES (1, 'original')")
    snap = snapshot_of(tmp_path, cli, mysql_url, tables=["docs", "notes"])
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE docs SET title = 'poison' WHERE id = 1")
        c.exec_driver_sql("DROP TABLE notes")
    real = sql_backend.recreate

    def recreate_then_agent_writes(writer, spec, schema_doc=None):
        real(writer, spec, schema_doc)
        with eng.begin() as c:
            c.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 2")
            c.exec_driver_sql("UPDATE docs SET title = 'agent write after plan' WHERE id = 1")
    monkeypatch.setattr(sql_backend, "recreate", recreate_then_agent_writes)
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 6, r.err
    monkeypatch.setattr(sql_backend, "recreate", real)
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT title FROM docs WHERE id = 1").scalar() == "agent write after plan"
    r = cli("--json", "restore", snap["id"], "--yes", "--incident", "inc-2")
    assert r.code == 0, r.err
    shown = cli("--json", "quarantine", "show", "inc-2").json()
    assert [q["value"]["title"] for q in shown if q["stream"] == "docs"] == ["agent write after plan"]
    eng.dispose()


def test_review_cases_of_the_foreign_key_proof(sqlite_url, tmp_path, cli):
    """A selection that would write back a child row whose parent the agent deleted outside it is
    refused before any write, even where another orphan the restore removes would have kept the
    number of broken rows the same; triggers named with another case than their table are kept
    from firing too (SQLite matches table names regardless of case)."""
    eng = engine(sqlite_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE Docs (id INTEGER PRIMARY KEY, title TEXT)")
        c.exec_driver_sql("CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id INTEGER REFERENCES Docs (id) "
                          "ON DELETE CASCADE, body TEXT)")
        c.exec_driver_sql("CREATE TABLE log (id INTEGER PRIMARY KEY, s TEXT)")
        c.exec_driver_sql("CREATE TRIGGER docs_log AFTER UPDATE ON DOCS BEGIN INSERT INTO log (s) VALUES ('u'); END")
        c.exec_driver_sql("INSERT INTO Docs VALUES (1, 'a'), (2, 'b')")
        c.exec_driver_sql("INSERT INTO chunks VALUES (1, 1, 'x'), (2, 2, 'y')")
    snap = snapshot_of(tmp_path, cli, sqlite_url, tables=["Docs", "chunks"])
    with eng.begin() as c:
        c.exec_driver_sql("PRAGMA foreign_keys = OFF")
        c.exec_driver_sql("DELETE FROM chunks WHERE id = 2")
        c.exec_driver_sql("DELETE FROM Docs WHERE id = 2")
        c.exec_driver_sql("INSERT INTO chunks VALUES (9, 99, 'orphan')")
    drifted = state(eng, ["Docs", "chunks"])
    r = cli("--json", "restore", snap["id"], "--stream", "chunks", "--yes")
    assert r.code == 2, r.err
    assert "chunks(doc_id) -> Docs(id)" in r.err and "--stream Docs" in r.err
    assert state(eng, ["Docs", "chunks"]) == drifted
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE Docs SET title = 'poisoned' WHERE id = 1")
        c.exec_driver_sql("DELETE FROM log")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM log").scalar() == 0
        assert c.exec_driver_sql("SELECT title FROM Docs ORDER BY id").fetchall() == [("a",), ("b",)]
    eng.dispose()


def test_postgres_sources_sharing_a_database_are_one_selection(pg_url, tmp_path, cli):
    """A sql source and a conversation source on one database restore in one transaction: a message
    the agent added in a thread it added is not a reference from outside the selection."""
    eng = engine(pg_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE threads (id text PRIMARY KEY, title text)")
        c.exec_driver_sql("CREATE TABLE message_store (id serial PRIMARY KEY, session_id text NOT NULL REFERENCES "
                          "threads ON DELETE CASCADE, message text)")
        c.exec_driver_sql("INSERT INTO threads VALUES ('t1', 'one')")
        c.exec_driver_sql("INSERT INTO message_store (session_id, message) VALUES ('t1', 'hi')")
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{pg_url}"\ntables = ["threads"]\n'
        f'[sources.history]\nbackend = "conversation"\nurl = "{pg_url}"\n')
    cli("init")
    snap = cli("--json", "snapshot", "--release", "v1").json()
    original = state(eng, ["threads", "message_store"])
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO threads VALUES ('t2', 'evil')")
        c.exec_driver_sql("INSERT INTO message_store (session_id, message) VALUES ('t2', 'poison')")
    assert cli("--json", "diff", snap["id"]).json()["dependencies"] == {}
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert state(eng, ["threads", "message_store"]) == original
    eng.dispose()


def test_postgres_partition_captured_as_its_own_stream_restores(pg_url, tmp_path, cli):
    eng = engine(pg_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE events (id int NOT NULL, day date NOT NULL, v text) PARTITION BY RANGE (day)")
        c.exec_driver_sql("CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
        c.exec_driver_sql("ALTER TABLE events_2024 ADD PRIMARY KEY (id)")
        c.exec_driver_sql("INSERT INTO events VALUES (1, '2024-03-01', 'a'), (2, '2024-04-01', 'b')")
    snap = snapshot_of(tmp_path, cli, pg_url, tables=["events_2024"])
    original = state(eng, ["events_2024"])
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE events SET v = 'poison' WHERE id = 1")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert state(eng, ["events_2024"]) == original
    eng.dispose()


def test_postgres_role_that_cannot_read_a_referencing_table_is_refused_up_front(pg_url, pg_role, tmp_path, cli,
                                                                                 caplog):
    role, role_url = pg_role
    eng = engine(pg_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE docs (id int PRIMARY KEY, title text)")
        c.exec_driver_sql("CREATE TABLE secret (id int PRIMARY KEY, doc_id int REFERENCES docs)")
        c.exec_driver_sql("INSERT INTO docs VALUES (1, 'a')")
        c.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON docs TO {role}")
        c.exec_driver_sql(f"GRANT SET ON PARAMETER session_replication_role TO {role}")
    snap = snapshot_of(tmp_path, cli, role_url, tables=["docs"])
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE docs SET title = 'poison'")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 2, r.err
    assert "cannot read table(s) secret" in r.err and "GRANT SELECT ON secret" in r.err
    assert cli("--json", "quarantine", "list").json() == []
    with eng.connect() as c:
        c.exec_driver_sql(f"GRANT SELECT ON secret TO {role}")
        c.exec_driver_sql("REVOKE SELECT ON pg_catalog.pg_stat_xact_user_tables FROM PUBLIC")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert "cannot read pg_stat_xact_user_tables" in caplog.text  # said, and the restore goes on
    eng.dispose()


def test_postgres_value_the_live_type_no_longer_accepts_is_one_line_and_rolled_back(pg_url, tmp_path, cli):
    """The snapshot's value meets a domain constraint added since (NOT VALID: live rows keep
    theirs): the restore's COPY into its staging table fails. That is one line naming the source
    and table, exit 1, the table unchanged and the incident rolled back, not 'unexpected
    CheckViolation' (psycopg's COPY runs outside SQLAlchemy's error translation)."""
    eng = engine(pg_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE DOMAIN note AS text")
        c.exec_driver_sql("CREATE TABLE kb (id int PRIMARY KEY, v note)")
        c.exec_driver_sql("INSERT INTO kb VALUES (1, 'good'), (2, 'forbidden later')")
    snap = snapshot_of(tmp_path, cli, pg_url, tables=["kb"])
    with eng.connect() as c:
        c.exec_driver_sql("UPDATE kb SET v = 'changed' WHERE id = 2")
        c.exec_driver_sql("ALTER DOMAIN note ADD CONSTRAINT no_forbidden CHECK (VALUE <> 'forbidden later') NOT VALID")
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 1, r.err
    assert "cannot write table kb" in r.err and "no_forbidden" in r.err and "unexpected" not in r.err, r.err
    error = json.loads(r.err)["error"]
    assert error["exit_code"] == 1 and "\n" not in error["message"], error
    assert error["sources"]["db"]["status"] == "rolled_back", error
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT v FROM kb ORDER BY id").scalars().all() == ["good", "changed"]
    listed = cli("--json", "quarantine", "list").json()
    assert [i["status"] for i in listed] == ["rolled_back"]
    eng.dispose()


@pytest.mark.parametrize("args", [("diff",), ("restore", "--dry-run"), ("restore", "--yes")])
def test_an_unknown_record_encoding_is_exit_3_not_a_hang(pg_url, tmp_path, cli, args):
    """A manifest naming a record encoding nothing declares (damaged or tampered) fails while the
    live table's COPY is open: the reader's transaction must end anyway. Before, its COMMIT
    waited forever on the connection the suspended COPY held (`diff` hung for good)."""
    from conftest import run_cli_subprocess

    eng = engine(pg_url)
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE kb (a int, b int, v text, PRIMARY KEY (a, b))")
        c.exec_driver_sql("INSERT INTO kb SELECT i, i %% 7, repeat('x', 200) FROM generate_series(1, 3000) i")
    snap = snapshot_of(tmp_path, cli, pg_url, tables=["kb"])
    with eng.connect() as c:
        c.exec_driver_sql("UPDATE kb SET v = 'changed' WHERE a = 5")
    [manifest] = (tmp_path / "repo" / "snapshots").rglob(f"{snap['id']}.json")
    manifest.write_text(manifest.read_text().replace('"format": "pgtext"', '"format": "pgtext9"'))
    r = run_cli_subprocess(*args[:1], snap["id"], *args[1:], cwd=tmp_path, timeout=60)
    assert r.code == 3, r.err
    assert "unknown record encoding 'pgtext9'" in r.err and "Traceback" not in r.err, r.err
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT v FROM kb WHERE a = 5").scalar() == "changed"
    eng.dispose()
