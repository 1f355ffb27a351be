"""Many writers, one S3 repository: ``scripts/fleet_s3.py`` at a small size.

Eight agents (SQLite and PostgreSQL schemas, Redis prefixes, embedded Chroma
folders, part of their data the same) snapshot at once as separate processes
into one repository on a moto S3 server, beside ``forget`` and ``prune --grace
0`` loops.  Every snapshot commits, the forget policy leaves exactly
four, prune deletes the chunks only forgotten snapshots used, and ``verify
--read-data`` of the snapshots left finds nothing missing: nothing was pruned
that a snapshot needs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fleet_s3.py"


def test_eight_agents_share_one_s3_repository_beside_forget_and_prune(redis_client, pg_url, tmp_path):
    env = {**os.environ, "SNAPSHOTTER_FLEET_REDIS": REDIS_URL, "SNAPSHOTTER_FLEET_PG": pg_url}
    started = time.monotonic()
    p = subprocess.run([sys.executable, str(SCRIPT), "--agents", "8", "--rounds", "1", "--scale", "0.005",
                        "--keep-last", "4", "--interval", "2", "--json", "--workdir", str(tmp_path / "fleet")],
                       capture_output=True, text=True, env=env, timeout=280)
    elapsed = time.monotonic() - started
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)
    assert r["ok"] and r["failures"] == []
    assert r["sql"] == ["postgresql", "sqlite"]
    assert r["snapshots"] == {"attempted": 8, "committed": 8, "forgotten": 4, "listed": 4}
    # the other agents found the shared table, collection and conversation already stored
    assert r["bytes"]["first_round_reused"] > 0
    assert r["bytes"]["written"] < r["bytes"]["stored"]
    # the forgotten snapshots' own chunks went; those the others share stayed (verify is clean)
    assert r["prune"]["deleted_chunks"] > 0
    assert r["verify"] == {"exit_code": 0, "checked": 4, "problems": 0}
    print(f"fleet of 8 in {elapsed:.0f}s: {r['seconds']}s of snapshots, lock waits {r['lock_waits']}")


def test_an_audit_record_says_how_long_its_change_waited_for_the_lock(s3_bucket, s3_server, tmp_path, cli):
    """The figure the fleet script reports as lock waits: a change made after waiting
    for another run's lock says so in its audit record; one that did not wait, nothing."""
    import sqlite3

    from snapshotter import locks
    from snapshotter.objectstore import open_store

    con = sqlite3.connect(tmp_path / "agent.db")
    con.execute("CREATE TABLE kb (id INTEGER PRIMARY KEY, body TEXT)")
    con.executemany("INSERT INTO kb VALUES (?, ?)", [(i, f"row {i}") for i in range(50)])
    con.commit()
    con.close()
    url = f"s3://{s3_bucket}/agent"
    config = tmp_path / "snapshotter.toml"
    config.write_text(f'[repository]\nurl = "{url}"\nendpoint_url = "{s3_server}"\n\n'
                      f'[sources.db]\nbackend = "sql"\nurl = "sqlite:///{tmp_path / "agent.db"}"\n')
    base = ["--config", str(config), "--no-progress"]
    assert cli(*base, "init").code == 0
    assert cli(*base, "snapshot", "--release", "r1").code == 0

    held = locks.acquire(open_store(url, endpoint_url=s3_server), locks.repository_claims(), command="snapshot")
    releaser = threading.Timer(1.5, held.release)
    releaser.start()
    try:
        r = cli(*base, "--lock-wait", "60", "prune", "--grace", "0")
    finally:
        releaser.join(30)
        held.release()
    assert r.code == 0, r.err
    assert "waiting up to" in r.err

    records = cli(*base, "--json", "audit").json()
    by_command = {rec["command"]: rec["result"] for rec in records}
    assert 1.0 <= by_command["prune"]["lock_waited_seconds"] < 60
    assert "lock_waited_seconds" not in by_command["snapshot"]
