"""The repository's content hash: BLAKE3 for repositories created now, SHA-256
for older ones and on request.  Either names every chunk by its plaintext and
digests every stream over its records; snapshots verify and restore the same
way; a repository's hash is chosen once, at init."""
from __future__ import annotations

import hashlib
import json

import pytest
import sqlalchemy as sa
import zstandard
from blake3 import blake3

from test_foundation import make_table

HASHES = {"blake3": lambda b: blake3(b).hexdigest(), "sha256": lambda b: hashlib.sha256(b).hexdigest()}


def chunk_plaintexts(repo_dir, stream: dict) -> list[tuple[str, bytes]]:
    d = zstandard.ZstdDecompressor()
    out = []
    for cid, *_ in stream["chunks"]:
        out.append((cid, d.decompress((repo_dir / "chunks" / cid[:2] / cid).read_bytes())))
    return out


def table_rows(url: str) -> list:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        rows = c.execute(sa.text("SELECT id, title, body, price, score FROM kb_chunks ORDER BY id")).all()
    eng.dispose()
    return rows


@pytest.mark.parametrize("how", ["default", "flag-sha256", "config-sha256"])
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_chunks_named_and_streams_digested_by_the_repository_hash(request, tmp_path, cli, db, how):
    url = request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url"}[db])
    eng = make_table(url, rows=3000)
    eng.dispose()
    want = "blake3" if how == "default" else "sha256"
    extra = 'hash = "sha256"\n' if how == "config-sha256" else ""
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n{extra}\n[sources.db]\nbackend = "sql"\nurl = "{url}"\ntables = ["kb_chunks"]\n')
    r = cli("--json", "init", *(["--hash", "sha256"] if how == "flag-sha256" else []))
    assert r.code == 0, r.err
    assert r.json()["hash"] == want
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    # a SHA-256 repository stays format 1, which older snapshotters read; a BLAKE3 one
    # is format 2, which they refuse instead of calling every chunk corrupt
    assert (config["hash"], config["format"]) == (want, 2 if want == "blake3" else 1)

    snap = cli("--json", "snapshot", "--release", "v1")
    assert snap.code == 0, snap.err
    sid = snap.json()["id"]
    manifest = json.loads(next((tmp_path / "repo" / "snapshots" / "v1").glob("*.json")).read_text())
    assert manifest["format"] == 4  # the manifest format (docs/design.md, "Format versions")
    stream = manifest["sources"]["db"]["streams"]["kb_chunks"]
    chunks = chunk_plaintexts(tmp_path / "repo", stream)
    assert len(chunks) >= 1
    other = "sha256" if want == "blake3" else "blake3"
    for cid, raw in chunks:
        assert cid == HASHES[want](raw) != HASHES[other](raw)
    assert stream["digest"] == f"{want}:" + HASHES[want](b"".join(raw for _, raw in chunks))

    assert cli("verify", "--read-data").code == 0
    before = table_rows(url)
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.execute(sa.text("UPDATE kb_chunks SET body = 'drifted' WHERE id % 100 = 0"))
        c.execute(sa.text("DELETE FROM kb_chunks WHERE id % 250 = 1"))
    eng.dispose()
    r = cli("--json", "restore", sid, "--yes")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    assert table_rows(url) == before

    # a chunk whose content no longer matches its name is found, whichever the hash
    cid, raw = chunks[0]
    path = tmp_path / "repo" / "chunks" / cid[:2] / cid
    path.chmod(0o644)
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.replace(b"a", b"b", 1)))
    r = cli("--json", "verify", "--read-data")
    assert r.code == 3
    assert "does not match its name" in r.out


def test_hash_is_chosen_once(tmp_path, cli):
    assert cli("--repo", "./repo", "init", "--hash", "sha256").code == 0
    assert cli("--repo", "./repo", "init").code == 0  # idempotent: the repository keeps its hash
    r = cli("--repo", "./repo", "init", "--hash", "blake3")
    assert r.code == 2
    assert "uses hash sha256" in r.err and len(r.err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "repo" / "config.json").read_text())["hash"] == "sha256"


def test_unknown_hashes_are_refused(tmp_path, cli):
    (tmp_path / "snapshotter.toml").write_text('[repository]\nurl = "./repo"\nhash = "md5"\n')
    r = cli("init")
    assert r.code == 2 and "repository.hash" in r.err
    assert not (tmp_path / "repo").exists()

    (tmp_path / "snapshotter.toml").write_text('[repository]\nurl = "./repo"\n')
    assert cli("init").code == 0
    cfg = tmp_path / "repo" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["hash"] = "sha3-512"
    cfg.chmod(0o644)
    cfg.write_text(json.dumps(doc))
    r = cli("list")
    assert r.code == 2
    assert "sha3-512" in r.err and "does not know" in r.err and len(r.err.strip().splitlines()) == 1


def test_hash_flag_reads_its_environment_variable(tmp_path, cli, monkeypatch):
    # every flag reads SNAPSHOTTER_<COMMAND>_<FLAG>, also where the code names it otherwise
    monkeypatch.setenv("SNAPSHOTTER_INIT_HASH", "sha256")
    r = cli("--repo", "./repo", "--json", "init")
    assert r.code == 0, r.err
    assert r.json()["hash"] == "sha256"
    # the name click would derive from the code's parameter is not read
    monkeypatch.delenv("SNAPSHOTTER_INIT_HASH")
    monkeypatch.setenv("SNAPSHOTTER_INIT_HASH_NAME", "sha256")
    r = cli("--repo", "./third", "--json", "init")
    assert r.code == 0 and r.json()["hash"] == "blake3"
    monkeypatch.setenv("SNAPSHOTTER_INIT_HASH", "md5")
    r = cli("--repo", "./other", "init")
    assert r.code == 2 and "md5" in r.err
    assert not (tmp_path / "other").exists()


def test_inconsistent_config_json_is_refused(tmp_path, cli):
    # format 1 is read as SHA-256 by older snapshotters: a blake3 repository that says
    # format 1 would be taken for a corrupt one, so it is refused before anything is read
    assert cli("--repo", "./repo", "init").code == 0
    cfg = tmp_path / "repo" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["format"] = 1
    cfg.chmod(0o644)
    cfg.write_text(json.dumps(doc))
    r = cli("--repo", "./repo", "list")
    assert r.code == 3
    assert "inconsistent" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("prefix", ["md5", "sha256"])
def test_manifest_digest_of_another_hash_is_refused(tmp_path, cli, sqlite_url, prefix):
    # a manifest copied from a repository of another hash (or edited) is reported as such,
    # before any chunk is read and before anything is written to the live store
    eng = make_table(sqlite_url, rows=500)
    eng.dispose()
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{sqlite_url}"\n'
        f'tables = ["kb_chunks"]\n')
    assert cli("init").code == 0
    sid = cli("--json", "snapshot", "--release", "v1").json()["id"]
    path = next((tmp_path / "repo" / "snapshots" / "v1").glob("*.json"))
    doc = json.loads(path.read_text())
    stream = doc["sources"]["db"]["streams"]["kb_chunks"]
    stream["digest"] = prefix + ":" + stream["digest"].partition(":")[2]
    path.chmod(0o644)
    path.write_text(json.dumps(doc))
    before = table_rows(sqlite_url)
    eng = sa.create_engine(sqlite_url)
    with eng.begin() as c:
        c.execute(sa.text("UPDATE kb_chunks SET body = 'drifted' WHERE id % 10 = 0"))
    eng.dispose()
    drifted = table_rows(sqlite_url)
    assert drifted != before
    for args in (("show", sid), ("diff", sid), ("restore", sid, "--yes"), ("restore", "--release", "v1", "--yes")):
        r = cli(*args)
        assert r.code == 3, (args, r.err)
        assert "not a blake3 digest" in r.err and len(r.err.strip().splitlines()) == 1
    assert table_rows(sqlite_url) == drifted
    r = cli("--json", "verify")
    assert r.code == 3 and "not a blake3 digest" in r.out
    # the damaged manifest stops none of the commands that do not use its chunks: it is
    # listed, can be forgotten, and the next snapshot (whose parent it would be) is whole
    r = cli("--json", "list")
    assert r.code == 0 and [s["id"] for s in r.json()] == [sid]
    r = cli("--json", "snapshot", "--release", "v1")
    assert r.code == 0, r.err
    new = r.json()["id"]
    assert cli("verify", new, "--read-data").code == 0
    r = cli("--json", "forget", "--keep-last", "1")
    assert r.code == 0, r.err
    assert [s["id"] for s in cli("--json", "list").json()] == [new]
    assert cli("verify").code == 0
