"""Foundation acceptance: a table of awkward types snapshots, lists, shows and
verifies on SQLite, PostgreSQL and MariaDB, with the repository in a local
folder and on S3 over HTTP; dedup keeps repeated snapshots cheap; corruption
and bad input get the documented exit codes."""
from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import random

import pytest
import sqlalchemy as sa

from snapshotter.objectstore import open_store
from snapshotter.repository import Repository
from snapshotter.streams import read_stream

ROWS = 20_000


def make_table(url: str, rows: int = ROWS) -> sa.Engine:
    eng = sa.create_engine(url)
    md = sa.MetaData()
    sa.Table(
        "kb_chunks", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("title", sa.String(200)),
        sa.Column("body", sa.Text),
        sa.Column("blob", sa.LargeBinary),
        sa.Column("price", sa.Numeric(20, 6)),
        sa.Column("created", sa.DateTime(timezone=True)),
        sa.Column("meta", sa.JSON),
        sa.Column("score", sa.Float),
        sa.Column("flag", sa.Boolean),
    )
    sa.Table("no_pk", md, sa.Column("x", sa.Integer))
    md.create_all(eng)
    rnd = random.Random(7)
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    with eng.begin() as c:
        batch = []
        for i in range(rows):
            batch.append({
                "id": i,
                "title": None if i % 97 == 0 else f"Dokument {i} — naïve café ✓ 漢字",
                "body": " ".join(rnd.choice(["agent", "memory", "tool", "vector", "über", "prompt"]) for _ in range(20)),
                "blob": None if i % 89 == 0 else bytes(rnd.getrandbits(8) for _ in range(16)),
                "price": None if i % 83 == 0 else decimal.Decimal(f"{rnd.randint(0, 10**9)}.{rnd.randint(0, 999999):06d}"),
                "created": dt.datetime(2026, 1, 1, tzinfo=tz) + dt.timedelta(seconds=i * 37, microseconds=i),
                "meta": None if i % 79 == 0 else {"tags": ["a", "ü"], "n": i, "nested": {"x": i / 7}},
                "score": rnd.random(),
                "flag": i % 2 == 0,
            })
            if len(batch) == 2000 or i == rows - 1:
                c.execute(md.tables["kb_chunks"].insert(), batch)
                batch = []
    return eng


def repo_bytes(store) -> int:
    return sum(o.size for o in store.list("chunks/"))


@pytest.fixture(params=["local", "s3"])
def repo_config(request, tmp_path):
    """Writes snapshotter.toml for a repository in a folder or on S3; returns the object store."""
    def write(db_url: str):
        if request.param == "local":
            repo = '[repository]\nurl = "./repo"\n'
            store = open_store(str(tmp_path / "repo"))
        else:
            server = request.getfixturevalue("s3_server")
            bucket = request.getfixturevalue("s3_bucket")
            repo = f'[repository]\nurl = "s3://{bucket}/snaps"\nendpoint_url = "{server}"\nregion = "us-east-1"\n'
            store = open_store(f"s3://{bucket}/snaps", endpoint_url=server, region="us-east-1")
        (tmp_path / "snapshotter.toml").write_text(
            repo + f'\n[sources.retrieval]\nbackend = "sql"\nurl = "{db_url}"\ntables = ["kb_chunks"]\n')
        return store
    return write


def test_snapshot_list_show_verify_dedup(any_db_url, repo_config, cli):
    eng = make_table(any_db_url)
    store = repo_config(any_db_url)
    assert cli("init").code == 0
    first = cli("--json", "snapshot", "--release", "v1", "--label", "env=prod", "--note", "baseline")
    assert first.code == 0, first.err
    snap = first.json()
    st = snap["sources"]["retrieval"]["streams"]["kb_chunks"]
    assert st["records"] == ROWS and st["digest"].startswith("blake3:")
    assert snap["sources"]["retrieval"]["consistency"] == "snapshot-isolation"
    assert snap["labels"] == {"env": "prod"} and snap["bytes_reused"] == 0
    size1 = repo_bytes(store)
    assert size1 > 0 and snap["bytes_written"] == size1

    # unchanged data: the second snapshot stores (almost) nothing new
    second = cli("--json", "snapshot", "--release", "v1").json()
    size2 = repo_bytes(store)
    assert second["sources"]["retrieval"]["streams"]["kb_chunks"]["digest"] == st["digest"]
    manifests = sum(o.size for o in store.list("snapshots/"))
    assert (size2 + manifests) - size1 < 0.05 * size1, (size1, size2, manifests)

    # 1% of rows change (an agent's burst of writes over a run of records)
    with eng.begin() as c:
        c.execute(sa.text("UPDATE kb_chunks SET body = 'poisoned ' || CAST(id AS CHAR(10)) WHERE id >= 5000 AND id < 5200")
                  if eng.dialect.name != "mysql" else
                  sa.text("UPDATE kb_chunks SET body = CONCAT('poisoned ', id) WHERE id >= 5000 AND id < 5200"))
    third = cli("--json", "snapshot", "--release", "v2").json()
    added = repo_bytes(store) - size2
    assert third["bytes_written"] == added
    assert added <= 0.03 * size1, (added, size1)
    assert third["sources"]["retrieval"]["streams"]["kb_chunks"]["digest"] != st["digest"]

    listed = cli("--json", "list").json()
    assert [r["id"] for r in listed] == [third["id"], second["id"], snap["id"]]
    assert listed[0]["records"] == ROWS and listed[0]["release"] == "v2"
    assert [r["id"] for r in cli("--json", "list", "--release", "v1").json()] == [second["id"], snap["id"]]

    shown = cli("--json", "show", snap["id"][:-1]).json()  # a unique prefix
    schema = shown["sources"]["retrieval"]["streams"]["kb_chunks"]["schema"]
    assert schema["primary_key"] == ["id"] and [c["name"] for c in schema["columns"]][:3] == ["id", "title", "body"]
    assert shown["note"] == "baseline"

    v = cli("--json", "verify", "--read-data")
    assert v.code == 0, v.out + v.err
    assert v.json() == {"ok": True, "checked": 3, "incidents_checked": 0, "problems": []}

    # what the repository holds is exactly what the database holds
    repo = Repository.open(store)
    entry = repo.load_manifest(repo.resolve(third["id"]))["sources"]["retrieval"]["streams"]["kb_chunks"]
    with eng.connect() as c:
        raw = c.exec_driver_sql("SELECT * FROM kb_chunks ORDER BY id").fetchall()
    stored = list(read_stream(repo, entry))
    assert len(stored) == ROWS
    for rec, row in zip(stored[::397], raw[::397]):
        assert rec.key == row[0]
        assert list(rec.value.values()) == list(row)


def test_flipped_byte_in_any_chunk_fails_verify(tmp_path, sqlite_url, cli):
    make_table(sqlite_url, rows=3000)
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{sqlite_url}"\n')
    cli("init")
    assert cli("snapshot", "--release", "r").code == 0
    chunks = sorted((tmp_path / "repo" / "chunks").rglob("*"))
    chunks = [p for p in chunks if p.is_file()]
    assert len(chunks) >= 3
    for path in chunks[:: max(1, len(chunks) // 4)]:
        data = bytearray(path.read_bytes())
        pos = len(data) // 2
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        r = cli("--json", "verify", "--read-data")
        assert r.code == 3, (path, r.out)
        assert any(path.name in p["object"] for p in r.json()["problems"])
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        assert cli("verify", "--read-data").code == 0
    # a missing chunk is found without reading data
    chunks[0].unlink()
    r = cli("--json", "verify")
    assert r.code == 3 and r.json()["problems"][0]["problem"].endswith("missing")


def test_names_and_ids_are_checked(tmp_path, sqlite_url, cli):
    # no repository exists: a bad name must be refused before any I/O
    r = cli("--repo", str(tmp_path / "nowhere"), "snapshot", "--release", "../x")
    assert r.code == 2 and "invalid release name" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "nowhere").exists()
    for bad in ("a/b", ".hidden", "x" * 129, "tab\there", "ünï"):
        assert cli("--repo", "./repo", "snapshot", "--release", bad).code == 2
    assert cli("--repo", "./repo", "snapshot", "--release", "ok", "--label", "k=../v").code == 2
    cli("--repo", "./repo", "init")
    r = cli("--repo", "./repo", "--json", "show", "20991231T000000Z-abcdef")
    assert r.code == 5 and json.loads(r.err)["error"]["exit_code"] == 5 and r.out == ""
    assert cli("--repo", "./repo", "mark-good", "2099").code == 5


def test_table_without_primary_key_is_refused_by_name(tmp_path, sqlite_url, cli):
    make_table(sqlite_url, rows=10)
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{sqlite_url}"\ntables = ["kb_chunks", "no_pk"]\n')
    cli("init")
    r = cli("snapshot", "--release", "r")
    assert r.code == 2 and "no_pk" in r.err and "primary key" in r.err
    assert not (tmp_path / "repo" / "snapshots").exists()
    # by default such tables are left out, not refused
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{sqlite_url}"\n')
    r = cli("--json", "snapshot", "--release", "r")
    assert r.code == 0 and list(r.json()["sources"]["db"]["streams"]) == ["kb_chunks"]


def test_inserts_and_deletes_elsewhere_keep_unchanged_runs(tmp_path, sqlite_url, cli):
    eng = make_table(sqlite_url, rows=ROWS)
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{sqlite_url}"\n')
    cli("init")
    first = cli("--json", "snapshot", "--release", "r").json()
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM kb_chunks WHERE id BETWEEN 100 AND 140")
        c.exec_driver_sql("INSERT INTO kb_chunks (id, title) VALUES (20001, 'new'), (20002, 'newer')")
        c.exec_driver_sql("UPDATE kb_chunks SET id = id + 100000 WHERE id BETWEEN 9000 AND 9010")
    second = cli("--json", "snapshot", "--release", "r").json()
    assert second["bytes_written"] < 0.06 * first["bytes_written"], (second["bytes_written"], first["bytes_written"])
    assert second["bytes_reused"] > 0.9 * first["bytes_written"]


@pytest.mark.parametrize("any_db_url", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_every_database_estimates_a_table_size_for_chunking(any_db_url):
    """Chunk sizes follow the table's estimated size (bigger tables, fewer objects):
    each database gives one from its statistics, without reading the table."""
    from snapshotter_backends.sql import base as sqlbase

    eng = make_table(any_db_url)
    with eng.connect() as c:
        if eng.dialect.name == "postgresql":
            c.exec_driver_sql("ANALYZE kb_chunks")
        elif eng.dialect.name in ("mysql", "mariadb"):
            c.exec_driver_sql("ANALYZE TABLE kb_chunks").fetchall()
        doc = sqlbase.table_schema(c, "kb_chunks", None)
        text = sum(len(str(v)) for row in c.exec_driver_sql("SELECT * FROM kb_chunks") for v in row)
        estimate = sqlbase.estimated_bytes(c, doc)
    eng.dispose()
    assert estimate is not None and text / 4 < estimate < text * 20, (estimate, text)
