"""The Python API (``snapshotter.Repository``): it takes the locks the commands take and
writes the audit records they write, so a run from Python and a run from the command
line exclude each other and leave the same trace; its errors are the library's types
with the exit codes the command line gives.

Each test runs the API and the CLI (``main`` in-process) against one repository and
one SQLite agent database, and compares what each sees of the other."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import snapshotter
from snapshotter import locks
from snapshotter.errors import (AuditNotWritten, IntegrityError, LockedError, NotFound, Refused, SnapshotterError,
                                UsageError)
from snapshotter.objectstore import open_store


class Agent:
    """An agent database (``kb_chunks``) behind the source ``db`` and a repository, local or S3."""

    def __init__(self, dir: Path, cli, url: str, endpoint: str | None):
        self.dir, self.cli, self.url, self.endpoint = dir, cli, url, endpoint
        self.db = dir / "agent.db"
        con = sqlite3.connect(self.db)
        con.execute("CREATE TABLE kb_chunks (id INTEGER PRIMARY KEY, body TEXT, score REAL)")
        con.executemany("INSERT INTO kb_chunks VALUES (?, ?, ?)", [(i, f"chunk {i}", i / 7) for i in range(200)])
        con.commit()
        con.close()
        lines = ["[repository]", f'url = "{url}"'] + ([f'endpoint_url = "{endpoint}"'] if endpoint else [])
        lines += ["[sources.db]", 'backend = "sql"', 'url = "sqlite:///agent.db"']
        self.config = dir / "snapshotter.toml"
        self.config.write_text("\n".join(lines) + "\n")

    def run(self, *args, code: int | None = 0):
        r = self.cli("--config", self.config, "--no-progress", *args)
        if code is not None:
            assert r.code == code, (args, r.code, r.err)
        return r

    def open(self, **options) -> snapshotter.Repository:
        return snapshotter.Repository.open(config=self.config, **options)

    def rows(self) -> dict:
        con = sqlite3.connect(self.db)
        try:
            return {r[0]: r[1:] for r in con.execute("SELECT * FROM kb_chunks ORDER BY id")}
        finally:
            con.close()

    def bad_writes(self, tag: str = "poisoned") -> None:
        con = sqlite3.connect(self.db)
        con.execute("UPDATE kb_chunks SET body = ? WHERE id < 3", (tag,))
        con.execute("DELETE FROM kb_chunks WHERE id = 50")
        con.execute("INSERT OR REPLACE INTO kb_chunks VALUES (1000, ?, 0)", (tag,))
        con.commit()
        con.close()

    def audit(self, n: int = 1) -> list[dict]:
        return self.run("--json", "audit", "--limit", n).json()

    def locks(self) -> list[dict]:
        store = open_store(self.url, endpoint_url=self.endpoint, base_dir=str(self.dir))
        return [json.loads(store.get(i.name)) for i in store.list("locks/")]


@pytest.fixture(params=["local", "s3"])
def agent(request, tmp_path, cli) -> Agent:
    if request.param == "s3":
        url, endpoint = f"s3://{request.getfixturevalue('s3_bucket')}/agent", request.getfixturevalue("s3_server")
    else:
        url, endpoint = "./repo", None
    a = Agent(tmp_path, cli, url, endpoint)
    a.run("init")
    return a


@pytest.fixture
def local(tmp_path, cli) -> Agent:
    a = Agent(tmp_path, cli, "./repo", None)
    a.run("init")
    return a


def shape(record: dict) -> tuple:
    """What an audit record says, without when, by whom and its place in the chain."""
    return record["command"], sorted(record["arguments"]), sorted(record["result"])


# -- locks ----------------------------------------------------------------------------

def test_a_restore_through_the_api_holds_the_lock_a_cli_restore_prune_or_snapshot_needs(agent):
    snap = agent.run("--json", "snapshot", "--release", "r1").json()["id"]
    agent.bad_writes()
    blocked = {}

    def meanwhile(plan) -> bool:
        # asked with the plan, inside the restore's lock: the command line meets it as another run's
        blocked["locks"] = agent.locks()
        blocked["restore"] = agent.run("restore", snap, "--yes", code=4)
        blocked["prune"] = agent.run("prune", "--grace", "0", code=4)
        blocked["snapshot"] = agent.run("snapshot", "--release", "r1", code=4)
        blocked["list"] = agent.run("--json", "list")  # reading the repository takes no lock
        return True

    with agent.open() as repo:
        result = repo.restore(snap, confirm=meanwhile)
    assert result.verified and result.quarantined == 5 and result.incident

    # one lock, as a CLI restore takes it: the repository shared, the source it writes exclusive
    (lock,) = blocked["locks"]
    assert lock["claims"] == {"repository": "shared", "source-db": "exclusive"}
    assert lock["command"] == "restore" and lock["pid"] == os.getpid() and lock["state"] == "held"
    for name in ("restore", "snapshot"):
        assert "source db is locked: exclusive lock by" in blocked[name].err
    assert "the repository is locked" in blocked["prune"].err
    for name in ("restore", "prune", "snapshot"):
        err = blocked[name].err
        assert f"pid {os.getpid()} (restore)" in err and "--lock-wait" in err and len(err.splitlines()) == 1, err
    assert [s["id"] for s in blocked["list"].json()] == [snap]
    # released when the call returned; the blocked commands now go ahead
    assert agent.locks() == []
    assert agent.run("--json", "prune", "--grace", "0").json()["dry_run"] is False
    assert agent.run("--json", "restore", snap, "--yes").json()["incident"] is None  # already equal


def test_the_api_meets_a_cli_lock_as_a_cli_does_and_waits_with_lock_wait(local):
    snap = local.run("--json", "snapshot", "--release", "r1").json()["id"]
    local.bad_writes()
    store = open_store(local.url, base_dir=str(local.dir))
    # the lock a snapshot of the source takes, as another program's
    held = locks.acquire(store, locks.repository_claims(shared_sources=["db"]), command="snapshot")
    try:
        cli_err = local.run("restore", snap, "--yes", code=4).err
        with local.open() as repo, pytest.raises(LockedError) as caught:
            repo.restore(snap)
        assert caught.value.exit_code == 4
        # the same message, but for the lock's age
        age = re.compile(r"created \S+ ago")
        assert age.sub("", f"snapshotter: {caught.value.message}\n") == age.sub("", cli_err)
        assert local.rows()[0] == ("poisoned", 0.0)  # nothing written

        heard = []
        threading.Timer(1.0, held.release).start()
        with local.open(lock_wait=60, on_lock_wait=heard.append) as repo:
            started = time.monotonic()
            result = repo.restore(snap)
        assert result.verified and time.monotonic() - started >= 0.9
        assert len(heard) == 1 and heard[0].startswith("waiting up to") and "source db is locked" in heard[0]
    finally:
        held.release()
    assert local.rows()[0] == ("chunk 0", 0.0)
    assert local.locks() == []


# -- audit records --------------------------------------------------------------------

def test_a_restore_through_the_api_leaves_the_audit_record_and_incident_a_cli_restore_leaves(agent):
    snap = agent.run("--json", "snapshot", "--release", "r1").json()["id"]
    agent.bad_writes("cli-run")
    agent.run("restore", snap, "--yes", "--incident", "from-cli", "--failure-at", "1h")
    agent.bad_writes("api-run")
    drifted = agent.rows()
    with agent.open() as repo:
        dry = repo.restore(snap, dry_run=True)
        assert agent.rows() == drifted and agent.audit()[0]["command"] == "restore"  # a dry run is not recorded
        assert agent.audit()[0]["arguments"]["incident"] == "from-cli"
        result = repo.restore(snap, incident="from-api", failure_at="1h")
    assert result.fingerprint() == dry.fingerprint() and result.incident == "from-api"

    api_rec, cli_rec = agent.audit(2)
    assert shape(api_rec) == shape(cli_rec)
    assert api_rec["arguments"]["snapshot"] == snap and api_rec["arguments"]["incident"] == "from-api"
    assert api_rec["result"] == {
        "exit_code": 0, "summary": f"restored {snap}: 5 record(s) quarantined as incident from-api",
        "snapshot": snap, "incident": "from-api", "plan": {"db": {"kb_chunks": result.to_json()["plan"]["db"]["kb_chunks"]}},
        "quarantined": 5, "verified": True}
    assert api_rec["result"]["plan"] == cli_rec["result"]["plan"]
    assert api_rec["user"] == cli_rec["user"] and api_rec["host"] == cli_rec["host"]
    agent.run("audit", "verify")

    # the incident, for forensics, as the CLI's own
    incidents = {i["incident"]: i for i in agent.run("--json", "quarantine", "list").json()}
    assert set(incidents) == {"from-cli", "from-api"}
    assert incidents["from-api"]["snapshot"] == snap and incidents["from-api"]["status"] == "applied"
    assert incidents["from-api"]["counts"] == incidents["from-cli"]["counts"] == {"added": 1, "modified": 3,
                                                                                   "deleted": 1}
    shown = agent.run("--json", "quarantine", "show", "from-api").json()
    assert sorted(r["value"]["body"] for r in shown if r["value"]) == ["api-run"] * 4
    with agent.open() as repo:
        assert repo.quarantine.show("from-api") == shown
        # None is no filter, as in the signature's defaults (it raised TypeError)
        assert repo.quarantine.show("from-api", source=None, stream=None, ops=None, post_failure=None,
                                    sessions=None, limit=None) == shown
        assert repo.quarantine.incidents() == agent.run("--json", "quarantine", "list").json()


def test_an_api_restore_that_fails_or_is_refused_is_recorded_with_the_exit_code_the_cli_gives(local):
    snap = local.run("--json", "snapshot", "--release", "r1").json()["id"]
    local.bad_writes()
    drifted = local.rows()
    with local.open() as repo:
        with pytest.raises(Refused) as refused:
            repo.restore(snap, confirm=lambda plan: False)
        assert refused.value.exit_code == 6
        rec = local.audit()[0]
        assert rec["command"] == "restore" and rec["result"] == {
            "exit_code": 6, "summary": "restore not confirmed; nothing was written"}

        def interrupted(plan):
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            repo.restore(snap, confirm=interrupted)
        assert local.audit()[0]["result"] == {"exit_code": 130,
                                              "summary": "interrupted: nothing half-committed was left behind"}

        # the agent writes between the plan confirmed and the write: refused, nothing written
        def agent_writes_meanwhile(plan) -> bool:
            con = sqlite3.connect(local.db)
            con.execute("DELETE FROM kb_chunks WHERE id = 7")
            con.commit()
            con.close()
            return True
        with pytest.raises(Refused, match="changed since the plan you confirmed"):
            repo.restore(snap, confirm=agent_writes_meanwhile)
        assert local.audit()[0]["result"]["exit_code"] == 6
    assert local.rows() == {k: v for k, v in drifted.items() if k != 7}
    assert local.run("--json", "quarantine", "list").json() == [] and local.locks() == []


@pytest.mark.parametrize("job", ["mark-good", "unmark-good", "forget", "prune", "reapply"])
def test_other_changes_through_the_api_are_recorded_as_the_cli_records_them(local, job):
    snaps = [local.run("--json", "snapshot", "--release", r).json()["id"] for r in ("r1", "r2", "r1")]
    repo = local.open()
    if job == "mark-good":
        local.run("mark-good", snaps[0])
        assert repo.mark_good(snaps[1]) == {"snapshot": snaps[1], "release": "r2", "good": True}
    elif job == "unmark-good":
        local.run("mark-good", snaps[0])
        local.run("mark-good", snaps[1])
        local.run("unmark-good", snaps[0])
        repo.unmark_good(snaps[1])
    elif job == "forget":
        local.run("forget", "--keep-last", "2")
        plan = repo.forget(keep_last=1)
        assert [d.id for d in plan.remove] == [snaps[1]]
    elif job == "prune":
        local.run("prune")
        assert repo.prune(grace="1h")["deleted_chunks"] == 0
    else:
        local.bad_writes()
        local.run("restore", snaps[2], "--yes", "--incident", "inc")
        local.run("quarantine", "reapply", "inc", "0", "--yes")
        assert repo.quarantine.reapply("inc", [1]) == [{"source": "db", "stream": "kb_chunks", "key": 1,
                                                         "op": "modified"}]
        assert local.rows()[1] == ("poisoned", 1 / 7)
    api_rec, cli_rec = local.audit(2)
    assert shape(api_rec) == shape(cli_rec)
    assert api_rec["result"]["exit_code"] == 0
    if job in ("mark-good", "unmark-good"):
        assert api_rec["arguments"] == {"snapshot": snaps[1], "release": "r2"}
        assert local.run("--json", "list").json()[1]["good"] is (job == "mark-good")
    if job == "prune":
        assert api_rec["arguments"] == cli_rec["arguments"] == {"grace": "1h"}
    local.run("audit", "verify")


def test_a_snapshot_through_the_api_equals_the_cli_snapshot(agent):
    with agent.open() as repo:
        manifest = repo.snapshot("r1", labels={"stage": "prod"}, note="from python")
        shown = repo.show(manifest["id"][:18])
        listed = repo.snapshots()
    by_cli = agent.run("--json", "snapshot", "--release", "r1", "--label", "stage=prod", "--note", "from python").json()

    assert agent.run("--json", "show", manifest["id"]).json() == shown
    assert agent.run("--json", "list").json()[1:] == listed
    other = agent.run("--json", "show", by_cli["id"]).json()
    for key in ("release", "labels", "note", "good", "records", "bytes", "host", "user", "tool_version"):
        assert shown[key] == other[key], key
    # the same records stored the same way, under the same stream digests and schema
    assert shown["sources"] == other["sources"]
    assert by_cli["bytes_written"] == 0 and by_cli["bytes_reused"] > 0  # the API's chunks were reused
    api_rec, cli_rec = agent.audit(2)
    assert api_rec == {**api_rec, "command": "snapshot", "arguments": {
        "release": "r1", "sources": [], "labels": {"stage": "prod"}, "note": "from python"}}
    assert shape(api_rec) == shape(cli_rec) and api_rec["result"]["snapshot"] == by_cli["id"]
    assert cli_rec["result"]["snapshot"] == manifest["id"]


# -- errors ---------------------------------------------------------------------------

def test_api_errors_are_the_library_types_with_the_exit_codes_of_the_cli(local, tmp_path):
    snap = local.run("--json", "snapshot", "--release", "r1").json()["id"]
    repo = local.open()
    cases = [
        (lambda: repo.restore("20990101T000000Z-000000"), ("restore", "20990101T000000Z-000000", "--yes"), NotFound),
        (lambda: repo.snapshot("no spaces"), ("snapshot", "--release", "no spaces"), UsageError),
        (lambda: repo.snapshot("r1", sources=["nope"]), ("snapshot", "--release", "r1", "--source", "nope"), NotFound),
        (lambda: repo.quarantine.show("inc-404"), ("quarantine", "show", "inc-404"), NotFound),
        (lambda: repo.forget(keep_releases=["r9"]), ("forget", "--keep-release", "r9"), UsageError),
        (lambda: snapshotter.Repository.open(url=str(tmp_path / "nothing")),
         ("--repo", str(tmp_path / "nothing"), "list"), NotFound),
    ]
    for call, args, kind in cases:
        with pytest.raises(kind) as caught:
            call()
        r = local.run("--json", *args, code=caught.value.exit_code)
        error = json.loads(r.err)["error"]
        assert (error["type"], error["message"]) == (caught.value.kind, caught.value.message), args

    # verify: an integrity failure carrying the report the CLI prints
    manifest = repo.manifest(snap)
    chunk = manifest["sources"]["db"]["streams"]["kb_chunks"]["chunks"][0][0]
    (local.dir / "repo" / "chunks" / chunk[:2] / chunk).unlink()
    with pytest.raises(IntegrityError) as caught:
        repo.verify()
    r = local.run("--json", "verify", code=3)
    assert caught.value.exit_code == 3 and caught.value.report == r.json() and not r.json()["ok"]
    assert json.loads(r.err)["error"]["message"] == caught.value.message == "verify found 1 problem(s)"
    with pytest.raises(IntegrityError):  # refused before any write
        repo.restore(snap)
    assert snapshotter.NotFound is NotFound and issubclass(snapshotter.LockedError, SnapshotterError)


def test_a_change_whose_audit_record_cannot_be_written_says_so_with_the_result(local):
    snap = local.run("--json", "snapshot", "--release", "r1").json()["id"]
    local.bad_writes()
    local.run("restore", snap, "--yes", "--incident", "inc")
    local.bad_writes()
    # the log reads fine (a command checks that before its work) but the next record's name is taken
    # by a folder: the append fails only after the work
    from snapshotter.audit import last_sequence, record_object
    with local.open() as repo:
        slot = local.dir / "repo" / record_object(last_sequence(repo.core.store) + 1)
    slot.mkdir()
    try:
        with local.open() as repo:
            with pytest.raises(AuditNotWritten) as caught:
                repo.mark_good(snap)
            # the work is done, and returned all the same
            assert caught.value.result == {"snapshot": snap, "release": "r1", "good": True}
            assert caught.value.exit_code == 1 and "audit record could not be written" in caught.value.message
            assert local.run("--json", "list").json()[0]["good"] is True
            # a call that failed raises its own error, the audit's failure attached
            with pytest.raises(UsageError, match="incident 'inc' already exists") as failed:
                repo.restore(snap, incident="inc")
            assert failed.value.audit_failure.message == caught.value.message
            assert caught.value.message in failed.value.__notes__

        # the CLI: its result, then the audit's failure (exit 1)
        r = local.run("--json", "unmark-good", snap, code=1)
        assert r.json() == {"snapshot": snap, "release": "r1", "good": False}
        assert json.loads(r.err)["error"]["message"] == caught.value.message
        # a failed command: its own error and exit code, then the audit's failure
        r = local.run("restore", snap, "--yes", "--incident", "inc", code=2)
        assert r.err.splitlines() == ["snapshotter: incident 'inc' already exists; choose another --incident",
                                      f"snapshotter: {caught.value.message}"]
    finally:
        slot.rmdir()


def test_import_snapshotter_stays_cheap_and_exports_the_api():
    prog = ("import sys, snapshotter\n"
            "heavy = [m for m in ('snapshotter.api', 'snapshotter.cli', 'snapshotter.repository', 'click', "
            "'zstandard', 'sqlalchemy') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n"
            "from snapshotter import Repository, LockedError\n"
            "import snapshotter.api, snapshotter.errors\n"
            "assert Repository is snapshotter.api.Repository and LockedError is snapshotter.errors.LockedError\n"
            "assert 'Repository' in dir(snapshotter)\n")
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "HEAVY []" in p.stdout, p.stdout
