"""No secret reaches an output, a log or the repository.

A full run (every command, failing ones included, with and without --json and
-v) against PostgreSQL through a role with a password in its URL, and an S3
repository whose credentials come from the environment.  Then every stdout and
stderr, every file the commands wrote, and every object in the bucket
(manifests, chunks decompressed, bundles, audit records, known-good marks, a
lock left by a killed run) is searched for the password and the secret key.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import PG_ADMIN_URL, free_port
from tests.test_foundation import make_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def secret_pg(pg_url):
    """A role with a password that owns the test database; (password, url with the password)."""
    role = "agent_" + secrets.token_hex(3)
    password = f"S3cr3t-{secrets.token_hex(6)}-p@ss"
    db = sa.engine.make_url(pg_url).database
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        c.exec_driver_sql(f'ALTER DATABASE "{db}" OWNER TO {role}')
    url = sa.engine.make_url(pg_url).set(username=role, password=password).render_as_string(hide_password=False)
    yield password, url
    in_db = sa.create_engine(sa.engine.make_url(pg_url), isolation_level="AUTOCOMMIT")
    with in_db.connect() as c:
        c.exec_driver_sql(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        c.exec_driver_sql(f"DROP OWNED BY {role}")
    in_db.dispose()
    with admin.connect() as c:
        c.exec_driver_sql(f'ALTER DATABASE "{db}" OWNER TO CURRENT_USER')
        c.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
    admin.dispose()


def secret_forms(password: str) -> list[str]:
    """The password as typed and as it appears percent-encoded in a URL."""
    from urllib.parse import quote
    return sorted({password, quote(password, safe=""), password.split("-p@ss")[0]})


def test_no_secret_in_outputs_files_or_repository(secret_pg, s3_server, s3_bucket, tmp_path, cli, monkeypatch):
    import boto3
    import zstandard

    password, url = secret_pg
    aws_secret = "AwsS3cr3t" + secrets.token_hex(12)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + secrets.token_hex(8).upper())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("AGENT_DB_URL", url)
    needles = secret_forms(password) + [aws_secret]

    eng = make_table(url, rows=400)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE message_store (id SERIAL PRIMARY KEY, session_id TEXT NOT NULL, message TEXT)")
        c.exec_driver_sql("""INSERT INTO message_store (session_id, message) VALUES
            ('s1', '{"type": "human", "data": {"content": "hi"}}'), ('s1', '{"type": "ai", "data": {"content": "yo"}}')""")
    config = tmp_path / "snapshotter.toml"
    config.write_text(
        f'[repository]\nurl = "s3://{s3_bucket}/agent"\nendpoint_url = "{s3_server}"\nregion = "us-east-1"\n\n'
        f'[sources.retrieval]\nbackend = "sql"\nurl = "${{AGENT_DB_URL}}"\ntables = ["kb_chunks"]\n\n'
        f'[sources.history]\nbackend = "conversation"\nurl = "{url}"\n')

    outputs: list[str] = []

    def run(*args: str, code: int | None = 0):
        r = cli(*args)
        outputs.extend((r.out, r.err))
        if code is not None:
            assert r.code == code, (args, r.code, r.out, r.err)
        return r

    run("init")
    snap = run("--json", "snapshot", "--release", "v1", "--label", "env=prod", "--note", "before rollout").json()["id"]
    for args in (("list",), ("show", snap), ("--json", "show", snap), ("verify", "--read-data"),
                 ("--json", "diff", snap), ("mark-good", snap), ("--json", "backends")):
        run(*args)
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE kb_chunks SET title = 'poisoned' WHERE id < 5")
        c.exec_driver_sql("DELETE FROM kb_chunks WHERE id = 7")
        c.exec_driver_sql("""INSERT INTO message_store (session_id, message) VALUES ('s1', '{"type": "ai"}')""")
    run("diff", snap)
    run("--json", "restore", snap, "--yes", "--incident", "inc-1", "--failure-at", "1h")
    exports = [tmp_path / "q.jsonl", tmp_path / "q.csv", tmp_path / "report.html"]
    for args in (("quarantine", "list"), ("--json", "quarantine", "list"), ("quarantine", "show", "inc-1"),
                 ("--json", "quarantine", "show", "inc-1"),
                 ("quarantine", "diff", "inc-1", "1", "--source", "retrieval", "--stream", "kb_chunks"),
                 ("quarantine", "export", "inc-1", "--format", "jsonl", "-o", str(exports[0])),
                 ("quarantine", "export", "inc-1", "--format", "csv", "-o", str(exports[1])),
                 ("quarantine", "report", "inc-1", "-o", str(exports[2])),
                 ("quarantine", "reapply", "inc-1", "1", "--source", "retrieval", "--stream", "kb_chunks", "--yes"),
                 ("audit",), ("--json", "audit"), ("audit", "verify"), ("forget", "--keep-last", "5", "--dry-run"),
                 ("prune", "--dry-run"), ("unlock",)):
        run(*args)
    metrics = tmp_path / "metrics.prom"
    run("--metrics-file", str(metrics), "snapshot", "--release", "v2")

    # failures, the verbose way included: the password must not ride on an error
    bad_port = sa.engine.make_url(url).set(port=free_port()).render_as_string(hide_password=False)
    bad_db = sa.engine.make_url(url).set(database="no_such_db").render_as_string(hide_password=False)
    for env_url, flags in ((bad_port, ()), (bad_port, ("-v",)), (bad_db, ("--json",)), (bad_db, ("-vv", "--json"))):
        monkeypatch.setenv("AGENT_DB_URL", env_url)
        r = run(*flags, "snapshot", "--release", "v3", "--source", "retrieval", code=1)
        assert "retrieval" in r.err
    monkeypatch.setenv("AGENT_DB_URL", url.replace(str(sa.engine.make_url(url).port), "notaport"))
    run("-v", "snapshot", "--release", "v3", "--source", "retrieval", code=2)
    monkeypatch.setenv("AGENT_DB_URL", url)
    for args, code in ((("restore", "20991231T000000Z-abcdef", "--yes"), 5), (("--json", "show", "nope"), 5),
                       (("snapshot", "--release", "../x"), 2), (("-v", "restore", snap), 6)):
        run(*args, code=code)
    redis_url = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    other = tmp_path / "redis.toml"
    other.write_text(config.read_text().split("[sources.retrieval]")[0]
                     + f'[sources.chat]\nbackend = "conversation"\nurl = "{redis_url}"\n')
    for flags in (("--json",), ("-v",)):
        run("--config", str(other), *flags, "snapshot", "--release", "v3", code=1)

    # a run killed while it holds its lock leaves the lock object behind: read it too
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-m", "snapshotter", "snapshot", "--release", "v4"], cwd=tmp_path,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    deadline = time.time() + 20
    while time.time() < deadline and child.poll() is None:
        if client.list_objects_v2(Bucket=s3_bucket, Prefix="agent/locks/").get("KeyCount"):
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()

    # everything the bucket holds, chunks decompressed
    stored: dict[str, bytes] = {}
    dctx = zstandard.ZstdDecompressor()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket):
        for obj in page.get("Contents", []):
            data = client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
            if "/chunks/" in obj["Key"]:
                data = dctx.decompress(data, max_output_size=1 << 30)
            stored[obj["Key"]] = data
    kinds = {key.split("/")[1] for key in stored}
    assert {"snapshots", "chunks", "quarantine", "audit", "good", "locks", "config.json"} <= kinds, kinds
    files = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "snapshotter.toml"
             and p.name != "redis.toml"}
    assert str(metrics) in files and all(str(p) in files for p in exports)

    for needle in needles:
        for i, text in enumerate(outputs):
            assert needle not in text, f"secret in output #{i}: {text[:500]}"
        for name, data in {**stored, **files}.items():
            assert needle.encode() not in data, f"secret in {name}"
    # the runs did name the sources they failed on, so the outputs above are the real ones
    assert any("no_such_db" in text for text in outputs)
    eng.dispose()
