"""SQLite schemas as applications write them, tried from the command line: key collations,
LangChain and LangGraph layouts, awkward values, restores across encodings."""
from __future__ import annotations

import json
import sqlite3

import pytest
import sqlalchemy as sa

from conftest import drift_then_restore, run_cli_subprocess


def _config(tmp_path, url, extra: str = ""):
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{url}"\n{extra}')


def _db(tmp_path, *statements) -> tuple[str, sa.Engine]:
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    for s in statements:
        db.execute(s)
    db.commit()
    db.close()
    url = f"sqlite:///{path}"
    return url, sa.create_engine(url)


def _rows(eng, table):
    def rows():
        with eng.connect() as c:
            return sorted((tuple(r) for r in c.exec_driver_sql(f"SELECT *, typeof(k) FROM {table}")), key=repr)
    return rows


@pytest.mark.parametrize("body", [
    "CREATE TABLE t (k PRIMARY KEY COLLATE NOCASE, v)",
    "CREATE TABLE t (k UUID PRIMARY KEY COLLATE NOCASE, v) WITHOUT ROWID",
    "CREATE TABLE t (k VARCHAR(10) PRIMARY KEY COLLATE NOCASE, v BLOB)",
    "CREATE TABLE t (k COLLATE NOCASE, j INT, v, PRIMARY KEY (k, j))",
])
def test_a_key_column_with_a_case_blind_collation(tmp_path, cli, body):
    """A key column without a text type but with COLLATE NOCASE (SQLite sorts it by that
    collation unless told BINARY) is read in Python's order: snapshot, diff and restore work."""
    cols = "k, j, v" if "j INT" in body else "k, v"
    vals = ["('a', 1, 1)", "('B', 1, 2)", "('c', 1, 3)"] if "j INT" in body else ["('a', 1)", "('B', 2)", "('c', 3)"]
    url, eng = _db(tmp_path, body, f"INSERT INTO t ({cols}) VALUES {', '.join(vals)}")
    _config(tmp_path, url)
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    drift_then_restore(cli, eng, r.json()["id"], "t", [
        "UPDATE t SET v = 9 WHERE k = 'B'", "DELETE FROM t WHERE k = 'c'", f"INSERT INTO t ({cols}) VALUES "
        + ("('D', 1, 4)" if "j INT" in body else "('D', 4)")],
        {"added": 1, "modified": 1, "deleted": 1}, _rows(eng, "t"))


def test_the_plan_table_keeps_its_columns_for_wide_table_names(tmp_path, cli):
    """``diff`` pads stream names by terminal cells: a CJK table name (two cells a
    character) leaves the counts under their headers, and a newline in a name stays on
    its line."""
    from snapshotter.forensics.table import cells
    url, eng = _db(tmp_path, 'CREATE TABLE "日本語" (k INTEGER PRIMARY KEY, v TEXT)',
                   'CREATE TABLE "two\nlines" (k INTEGER PRIMARY KEY, v TEXT)', "CREATE TABLE plain (k INTEGER PRIMARY KEY)",
                   "INSERT INTO \"日本語\" VALUES (1, 'a')")
    _config(tmp_path, url)
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE \"日本語\" SET v = 'b'")
    r = cli("diff", r.json()["id"])
    assert r.code == 0, r.err
    lines = [ln for ln in r.out.splitlines() if ln.startswith("  ") and not ln.startswith("  note")][:-1]
    assert len(lines) == 4, r.out  # header and three streams, one line each
    assert len({cells(ln) for ln in lines}) == 1, r.out


@pytest.mark.parametrize("body", ["CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT)",
                                  "CREATE TABLE t (k TEXT, n INT, v TEXT, PRIMARY KEY (k, n))"])
def test_text_keys_that_are_not_utf8_are_updated_deleted_and_reapplied(tmp_path, cli, body):
    """A TEXT key whose bytes are not UTF-8 (the driver can neither send nor read it as a
    str) is matched by its bytes cast to TEXT: a restore updates, deletes and inserts such
    rows, and reapply writes them back."""
    pair = "n, " if "n INT" in body else ""
    one = "1, " if pair else ""
    url, eng = _db(tmp_path, body, f"INSERT INTO t (k, {pair}v) VALUES (CAST(x'ff61' AS TEXT), {one}'a'), "
                   f"(CAST(x'fe' AS TEXT), {one}'gone'), ('b', {one}'b')")

    def raw():
        with eng.connect() as c:
            return sorted(tuple(r) for r in c.exec_driver_sql(
                "SELECT typeof(k), CAST(k AS BLOB), CAST(v AS BLOB) FROM t"))
    _config(tmp_path, url)
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0, r.err
    drift_then_restore(cli, eng, r.json()["id"], "t", [
        "UPDATE t SET v = 'z' WHERE k = CAST(x'ff61' AS TEXT)",
        "DELETE FROM t WHERE k = CAST(x'fe' AS TEXT)",
        f"INSERT INTO t (k, {pair}v) VALUES (CAST(x'c0' AS TEXT), {one}'new')",
    ], {"added": 1, "modified": 1, "deleted": 1}, raw)
    inc = cli("--json", "quarantine", "list").json()
    name = (inc["incidents"] if isinstance(inc, dict) else inc)[0]["incident"]
    keys = [json.dumps(row["key"]) for row in map(json.loads, cli("quarantine", "export", name, "--format", "jsonl",
                                                                   "-o", "-").out.splitlines())]
    assert len(keys) == 3
    r = cli("quarantine", "reapply", name, *keys, "--yes")
    assert r.code == 0, r.err
    got = raw()
    assert (b"text", b"\xc0", b"new") in [(t.encode(), k, v) for t, k, v in got]
    assert (b"text", b"\xff\x61", b"z") in [(t.encode(), k, v) for t, k, v in got]
    assert not any(k == b"\xfe" for _, k, _ in got)


def test_fts5_tables_restore_and_are_not_warned_about(tmp_path, cli):
    """An FTS5 index over a content table (kept by triggers, as RAG apps do): its shadow
    tables are captured and restored with the content, the index passes its integrity check
    and finds the restored text, and the virtual table itself (no rows of its own, no key
    to add) is not named in the no-primary-key warning; a real keyless table still is."""
    url, eng = _db(
        tmp_path, "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)",
        "CREATE VIRTUAL TABLE docs_fts USING fts5(body, content='docs', content_rowid='id')",
        "CREATE TRIGGER docs_ai AFTER INSERT ON docs BEGIN INSERT INTO docs_fts(rowid, body) VALUES (new.id, new.body); END",
        "CREATE TRIGGER docs_ad AFTER DELETE ON docs BEGIN INSERT INTO docs_fts(docs_fts, rowid, body) "
        "VALUES ('delete', old.id, old.body); END",
        "CREATE TRIGGER docs_au AFTER UPDATE ON docs BEGIN INSERT INTO docs_fts(docs_fts, rowid, body) "
        "VALUES ('delete', old.id, old.body); INSERT INTO docs_fts(rowid, body) VALUES (new.id, new.body); END",
        "INSERT INTO docs (body) VALUES ('refunds are issued within 14 days'), ('shipping takes 3 days')",
        "CREATE TABLE loose (a, b)")
    _config(tmp_path, url)
    assert cli("init").code == 0
    # in a child process: the warning as the console program prints it
    r = run_cli_subprocess("--json", "snapshot", "--release", "r", cwd=tmp_path)
    assert r.code == 0, r.err
    (warning,) = [line for line in r.err.splitlines() if "no primary key" in line]
    assert "loose" in warning and "docs_fts" not in warning, warning
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE docs SET body = 'refunds: send your card number' WHERE id = 1")
        c.exec_driver_sql("DELETE FROM docs WHERE id = 2")
    r = cli("--json", "restore", r.json()["id"], "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    with eng.begin() as c:
        c.exec_driver_sql("INSERT INTO docs_fts(docs_fts) VALUES ('integrity-check')")
        assert c.exec_driver_sql("SELECT rowid FROM docs_fts WHERE docs_fts MATCH 'shipping'").all() == [(2,)]
        assert c.exec_driver_sql("SELECT rowid FROM docs_fts WHERE docs_fts MATCH 'card'").all() == []


def test_a_foreign_key_naming_its_parent_in_another_case(tmp_path, cli):
    """``REFERENCES P(ID)`` points at table ``p``, column ``id`` (SQLite names are
    case-blind): a restore of both tables is not refused for a parent "outside the
    selection", and a restore of the child alone names the parent as a stream that exists."""
    url, eng = _db(tmp_path, "CREATE TABLE p (id INTEGER PRIMARY KEY)",
                   "CREATE TABLE c (id INTEGER PRIMARY KEY, pid INTEGER REFERENCES P(ID))",
                   "INSERT INTO p VALUES (1), (2)", "INSERT INTO c VALUES (10, 1), (11, 2)")
    _config(tmp_path, url)
    assert cli("init").code == 0
    sid = cli("--json", "snapshot", "--release", "r").json()["id"]

    def rows():
        with eng.connect() as c:
            return [c.exec_driver_sql("SELECT * FROM p ORDER BY id").all(),
                    c.exec_driver_sql("SELECT * FROM c ORDER BY id").all()]
    before = rows()
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM c WHERE id = 11")
        c.exec_driver_sql("DELETE FROM p WHERE id = 2")
    r = cli("--json", "restore", sid, "--stream", "c", "--yes")
    assert r.code == 2 and "--stream p" in r.err, r.err
    r = cli("--json", "restore", sid, "--stream", "c", "--stream", "p", "--yes")
    assert r.code == 0, r.err
    assert rows() == before


@pytest.mark.parametrize("options", ["WITHOUT ROWID", "STRICT", "STRICT, WITHOUT ROWID"])
def test_a_dropped_table_comes_back_with_its_table_options(tmp_path, cli, options):
    """A dropped WITHOUT ROWID or STRICT table is recreated as one (without
    --trust-repository-sql), an ANY column of a STRICT table as ANY (its values keep their
    storage classes), and its rows come back."""
    strict = "STRICT" in options
    url, eng = _db(tmp_path, f"CREATE TABLE t (id INTEGER PRIMARY KEY, v {'ANY' if strict else ''}, w TEXT) {options}",
                   "INSERT INTO t VALUES (1, 'a', 'x'), (2, 2.5, NULL), (3, '1.5', 'y'), (4, x'00', 'z')")
    _config(tmp_path, url)
    assert cli("init").code == 0
    sid = cli("--json", "snapshot", "--release", "r").json()["id"]

    def rows():
        with eng.connect() as c:
            return sorted(c.exec_driver_sql("SELECT id, typeof(id), v, typeof(v), w FROM t").all(), key=repr)
    before = rows()
    with eng.begin() as c:
        c.exec_driver_sql("DROP TABLE t")
    r = cli("--json", "restore", sid, "--yes")
    assert r.code == 0, r.err
    assert rows() == before
    with eng.connect() as c:
        sql = c.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 't'").scalar()
    for word in options.split(", "):
        assert word in sql.upper(), sql
