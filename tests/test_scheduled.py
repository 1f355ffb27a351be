"""Scheduled operation: repository locks, forget and prune, the audit log,
metrics for cron, and what SIGTERM / kill -9 leave behind.

Store-dependent tests run against a local folder and against S3 (moto over
HTTP); processes that must run side by side or be killed are real children.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

from conftest import run_cli_subprocess
from snapshotter import locks
from snapshotter.audit import append_audit, record_object, verify_audit
from snapshotter.objectstore import open_store


# -- fixtures ----------------------------------------------------------------------

def make_db(path: Path, rows: int = 3000) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE kb_chunks (id INTEGER PRIMARY KEY, body TEXT, score REAL)")
    con.executemany("INSERT INTO kb_chunks VALUES (?, ?, ?)",
                    [(i, f"chunk {i} " + "lorem ipsum " * 8, i / 7) for i in range(rows)])
    con.commit()
    con.close()


def rewrite_db(path: Path, tag: str) -> None:
    """Change every row, so the next snapshot shares no chunk with the previous one."""
    con = sqlite3.connect(path)
    con.execute("UPDATE kb_chunks SET body = body || ?", (tag,))
    con.commit()
    con.close()


@dataclass
class RepoEnv:
    kind: str
    dir: Path
    config: Path
    url: str
    endpoint: str | None

    def args(self, *args) -> list[str]:
        return ["--config", str(self.config), "--no-progress", *map(str, args)]

    @cached_property
    def _store(self):
        return open_store(self.url, endpoint_url=self.endpoint, base_dir=str(self.dir))

    def store(self):
        return self._store

    def names(self, prefix: str) -> list[str]:
        return sorted(i.name for i in self.store().list(prefix))


def write_config(dir: Path, url: str, endpoint: str | None, sources: dict[str, str]) -> Path:
    lines = ["[repository]", f'url = "{url}"']
    if endpoint:
        lines.append(f'endpoint_url = "{endpoint}"')
    for name, db in sources.items():
        lines += ["", f"[sources.{name}]", 'backend = "sql"', f'url = "sqlite:///{db}"']
    path = dir / "snapshotter.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(params=["local", "s3"])
def repo_env(request, tmp_path, cli) -> RepoEnv:
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_server")
        url = f"s3://{bucket}/agent"
    else:
        endpoint, url = None, "./repo"
    make_db(tmp_path / "agent.db")
    config = write_config(tmp_path, url, endpoint, {"db": "agent.db"})
    env = RepoEnv(request.param, tmp_path, config, url, endpoint)
    assert cli(*env.args("init")).code == 0
    return env


@pytest.fixture
def local_env(tmp_path, cli) -> RepoEnv:
    make_db(tmp_path / "agent.db")
    config = write_config(tmp_path, "./repo", None, {"db": "agent.db"})
    env = RepoEnv("local", tmp_path, config, "./repo", None)
    assert cli(*env.args("init")).code == 0
    return env


def snapshot(cli, env: RepoEnv, release: str = "r1") -> str:
    r = cli(*env.args("--json", "snapshot", "--release", release))
    assert r.code == 0, r.err
    return r.json()["id"]


def listed(cli, env: RepoEnv) -> list[str]:
    r = cli(*env.args("--json", "list"))
    assert r.code == 0, r.err
    return [s["id"] for s in r.json()]


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- locks -------------------------------------------------------------------------

def test_two_snapshots_at_once_both_succeed(repo_env, cli):
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda rel: run_cli_subprocess(*repo_env.args("--json", "snapshot", "--release", rel),
                                                            cwd=repo_env.dir), ["r1", "r2"]))
    for r in runs:
        assert r.code == 0, r.err
    assert len(listed(cli, repo_env)) == 2
    assert cli(*repo_env.args("verify", "--read-data")).code == 0
    assert repo_env.names("locks/") == []
    report = cli(*repo_env.args("--json", "audit", "verify"))
    assert report.code == 0 and report.json()["records"] == 3  # init + two snapshots, appended concurrently


def test_prune_refused_while_a_snapshot_holds_its_lock(repo_env, cli):
    snapshot(cli, repo_env)
    with locks.acquire(repo_env.store(), locks.repository_claims(shared_sources=["db"]), command="snapshot"):
        r = cli(*repo_env.args("prune", "--grace", "0"))
        assert r.code == 4
        assert "locked" in r.err and f"pid {os.getpid()}" in r.err and "(snapshot)" in r.err
        # snapshots share the lock; forget only needs the marks
        assert cli(*repo_env.args("snapshot", "--release", "r1")).code == 0
    assert cli(*repo_env.args("verify", "--read-data")).code == 0
    assert cli(*repo_env.args("prune", "--grace", "0")).code == 0
    assert repo_env.names("locks/") == []


def test_lock_wait_waits_for_the_holder(repo_env, cli):
    snapshot(cli, repo_env)
    store = repo_env.store()
    held = locks.acquire(store, locks.repository_claims(), command="snapshot")

    def release_once_prune_tried():
        # prune starts at once and meets the lock; the holder lets go a moment later
        time.sleep(1.5)
        held.release()

    releaser = threading.Thread(target=release_once_prune_tried)
    releaser.start()
    try:
        started = time.monotonic()
        r = cli(*repo_env.args("--lock-wait", "60", "prune"))
        waited = time.monotonic() - started
    finally:
        releaser.join(70)
        held.release()
    assert r.code == 0, r.err
    assert "waiting up to" in r.err
    assert waited >= 1.0
    assert repo_env.names("locks/") == []


def test_racing_exclusive_lockers_take_turns(local_env):
    """The tie-break: no two holders at once, and none starves while the others retry."""
    inside = []
    overlap = []
    done = []

    def worker(i: int) -> None:
        store = open_store(local_env.url, base_dir=str(local_env.dir))  # one per run, as in separate processes
        for _ in range(3):
            with locks.acquire(store, {"repository": locks.EXCLUSIVE}, command=f"w{i}", wait=60):
                inside.append(i)
                if len(inside) > 1:
                    overlap.append(list(inside))
                time.sleep(0.02)
                inside.remove(i)
        done.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert sorted(done) == [0, 1, 2, 3]
    assert overlap == []
    assert local_env.names("locks/") == []


def test_a_lock_held_by_a_killed_process_is_stale_and_unlock_clears_it(repo_env, cli):
    snapshot(cli, repo_env)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from snapshotter import locks
        from snapshotter.objectstore import open_store
        store = open_store({repo_env.url!r}, endpoint_url={repo_env.endpoint!r}, base_dir={str(repo_env.dir)!r})
        lock = locks.acquire(store, locks.repository_claims(), command="snapshot")
        print("locked", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        # alive: plain unlock keeps it
        r = cli(*repo_env.args("--json", "unlock"))
        assert r.code == 0 and r.json()["removed"] == [] and len(r.json()["kept"]) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
        child.wait(10)
    assert len(repo_env.names("locks/")) == 1

    # unlock names it stale: its process on this host is gone
    listed = [l for l in locks.list_locks(repo_env.store())]
    assert len(listed) == 1 and listed[0].pid == child.pid and "gone" in listed[0].stale()
    # and it cannot block anyone: the next run on this host clears it by itself
    assert cli(*repo_env.args("prune", "--grace", "0")).code == 0
    assert repo_env.names("locks/") == []
    assert cli(*repo_env.args("verify", "--read-data")).code == 0


def test_unlock_all_removes_live_locks_and_an_expired_lock_is_stale(local_env, cli):
    store = local_env.store()
    expired = locks.acquire(store, locks.repository_claims(), command="snapshot", ttl=0.2, refresh=3600)
    live = locks.acquire(store, locks.repository_claims(), command="snapshot")
    try:
        time.sleep(0.5)
        r = cli(*local_env.args("--json", "unlock"))
        assert [l["name"] for l in r.json()["removed"]] == [expired.name]
        assert "expired" in r.json()["removed"][0]["stale"]
        r = cli(*local_env.args("--json", "unlock", "--all"))
        assert [l["name"] for l in r.json()["removed"]] == [live.name]
        assert local_env.names("locks/") == []
    finally:
        expired.release()
        live.release()


def test_a_live_lock_is_refreshed(local_env):
    store = local_env.store()
    with locks.acquire(store, locks.repository_claims(), command="snapshot", ttl=1.0, refresh=0.1) as lock:
        time.sleep(1.5)
        (info,) = locks.list_locks(store)
        assert info.name == lock.name and info.state == "held" and info.stale() is None
        lock.check()


def test_sigterm_during_a_snapshot_exits_130_and_leaves_no_manifest_or_lock(repo_env, cli):
    # a second source whose database the test holds locked: the snapshot stores the
    # first source's chunks, then waits on the second, where SIGTERM reaches it
    make_db(repo_env.dir / "slow.db", rows=10)
    write_config(repo_env.dir, repo_env.url, repo_env.endpoint, {"db": "agent.db", "slow": "slow.db"})
    blocker = sqlite3.connect(repo_env.dir / "slow.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    proc = subprocess.Popen([sys.executable, "-m", "snapshotter", *repo_env.args("snapshot", "--release", "r1")],
                            cwd=repo_env.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: repo_env.names("locks/") and repo_env.names("chunks/"), what="the snapshot to store chunks")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        blocker.execute("ROLLBACK")
        out, err = proc.communicate(timeout=60)
    finally:
        blocker.close()
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert repo_env.names("snapshots/") == []
    assert repo_env.names("locks/") == []
    assert listed(cli, repo_env) == []
    last = cli(*repo_env.args("--json", "audit", "--limit", "1")).json()[0]
    assert last["command"] == "snapshot" and last["result"]["exit_code"] == 130
    # the orphaned chunks are young: kept by the grace period, removed without it
    r = cli(*repo_env.args("--json", "prune"))
    assert r.json()["kept_recent_chunks"] == len(repo_env.names("chunks/")) > 0
    r = cli(*repo_env.args("--json", "prune", "--grace", "0"))
    assert r.code == 0 and r.json()["deleted_chunks"] > 0
    assert repo_env.names("chunks/") == []


# -- forget and prune ----------------------------------------------------------------

def test_forget_keep_last_keeps_the_newest_and_every_known_good(repo_env, cli):
    ids = []
    for i in range(4):
        ids.append(snapshot(cli, repo_env))
    assert cli(*repo_env.args("mark-good", ids[0])).code == 0

    assert cli(*repo_env.args("forget")).code == 2  # no policy: refused
    r = cli(*repo_env.args("--json", "forget", "--keep-last", "1", "--dry-run"))
    assert r.code == 0
    assert sorted(d["id"] for d in r.json()["remove"]) == sorted(ids[1:3])
    assert sorted(listed(cli, repo_env)) == sorted(ids)  # a dry run changes nothing

    r = cli(*repo_env.args("--json", "forget", "--keep-last", "1"))
    assert r.code == 0
    reasons = {d["id"]: d["reasons"] for d in r.json()["keep"]}
    assert reasons == {ids[3]: ["last"], ids[0]: ["known-good"]}
    assert sorted(listed(cli, repo_env)) == sorted([ids[0], ids[3]])
    assert cli(*repo_env.args("verify")).code == 0


def test_forget_keep_release_and_periods(local_env, cli):
    a = snapshot(cli, local_env, "old-release")
    b = snapshot(cli, local_env, "new-release")
    c = snapshot(cli, local_env, "new-release")
    r = cli(*local_env.args("--json", "forget", "--keep-release", "old-release", "--keep-daily", "1"))
    assert r.code == 0
    assert [d["id"] for d in r.json()["remove"]] == [b]  # c is today's newest, a is its release's
    assert sorted(listed(cli, local_env)) == sorted([a, c])


def test_prune_frees_chunks_of_forgotten_snapshots(repo_env, cli):
    first = snapshot(cli, repo_env)
    rewrite_db(repo_env.dir / "agent.db", " v2")
    second = snapshot(cli, repo_env)
    chunks_before = len(repo_env.names("chunks/"))
    assert cli(*repo_env.args("forget", "--keep-last", "1")).code == 0
    assert listed(cli, repo_env) == [second]

    # default grace: every orphan is too young to go
    r = cli(*repo_env.args("--json", "prune"))
    assert r.code == 0
    assert r.json()["deleted_chunks"] == 0 and r.json()["kept_recent_chunks"] > 0

    r = cli(*repo_env.args("--json", "prune", "--grace", "0", "--dry-run"))
    would = r.json()["deleted_chunks"]
    assert would > 0 and len(repo_env.names("chunks/")) == chunks_before

    r = cli(*repo_env.args("--json", "prune", "--grace", "0"))
    assert r.code == 0
    report = r.json()
    assert report["deleted_chunks"] == would and report["bytes_freed"] > 0
    assert len(repo_env.names("chunks/")) == chunks_before - would
    assert cli(*repo_env.args("verify", "--read-data")).code == 0
    last = cli(*repo_env.args("--json", "audit", "--limit", "1")).json()[0]
    assert last["command"] == "prune" and last["result"]["deleted_chunks"] == would
    assert first not in listed(cli, repo_env)


def test_prune_keeps_chunks_a_quarantine_bundle_references(repo_env, cli):
    first = snapshot(cli, repo_env)
    manifest = json.loads(repo_env.store().get(f"snapshots/r1/{first}.json"))
    chunk_ids = [c[0] for src in manifest["sources"].values() for st in src["streams"].values() for c in st["chunks"]]
    bundle = {"incident": "inc-1", "snapshot": first,
              "sources": {"db": {"streams": {"kb_chunks": {"chunks": [[chunk_ids[0], 1, 2, 3]]}}}},
              "chunks": [chunk_ids[1]], "extra": {"blobs": {"chunks": [chunk_ids[2]]}}}
    repo_env.store().put("quarantine/inc-1/manifest.json", json.dumps(bundle).encode())
    rewrite_db(repo_env.dir / "agent.db", " v2")
    snapshot(cli, repo_env)

    r = cli(*repo_env.args("--json", "forget", "--keep-last", "1"))
    assert {d["id"]: d["reasons"] for d in r.json()["keep"]}[first] == ["incident inc-1"]
    repo_env.store().delete(f"snapshots/r1/{first}.json")  # as if forgotten anyway
    assert cli(*repo_env.args("prune", "--grace", "0")).code == 0
    left = {n.rsplit("/", 1)[1] for n in repo_env.names("chunks/")}
    assert set(chunk_ids[:3]) <= left
    assert not set(chunk_ids[3:]) & left


# -- audit ---------------------------------------------------------------------------

@pytest.mark.parametrize("tamper", ["edit", "remove", "reorder", "edit-last", "remove-first"])
def test_a_tampered_audit_log_fails_verify(repo_env, cli, tamper):
    store = repo_env.store()
    for i in range(4):
        append_audit(store, "snapshot", {"release": f"r{i}"}, {"exit_code": 0, "summary": f"run {i}"})
    assert cli(*repo_env.args("audit", "verify")).code == 0
    seqs = [int(n.split("/")[1][:-5]) for n in repo_env.names("audit/")]
    assert seqs == [1, 2, 3, 4, 5]  # init + four

    def edit(seq: int) -> None:
        doc = json.loads(store.get(record_object(seq)))
        doc["result"]["exit_code"] = 1
        store.put(record_object(seq), json.dumps(doc, indent=1).encode(), overwrite=True)

    if tamper == "edit":
        edit(3)
    elif tamper == "edit-last":
        edit(5)
    elif tamper == "remove":
        store.delete(record_object(3))
    elif tamper == "remove-first":
        store.delete(record_object(1))
    elif tamper == "reorder":
        two, three = store.get(record_object(2)), store.get(record_object(3))
        store.put(record_object(2), three, overwrite=True)
        store.put(record_object(3), two, overwrite=True)
    r = cli(*repo_env.args("--json", "audit", "verify"))
    assert r.code == 3
    assert json.loads(r.err)["error"]["type"] == "integrity"
    assert r.json()["ok"] is False and r.json()["problems"]


def test_audit_records_changes_without_secrets(local_env, cli, monkeypatch):
    snap = snapshot(cli, local_env)
    assert cli(*local_env.args("mark-good", snap)).code == 0
    assert cli(*local_env.args("unmark-good", snap)).code == 0
    assert cli(*local_env.args("list")).code == 0  # reads are not recorded
    record = append_audit(local_env.store(), "restore",
                          {"source_url": "postgresql+psycopg://agent:hunter2@db/agent", "db_password": "hunter2",
                           "aws_secret_access_key": "wJalrXUtnFEMI", "note": "key AKIAIOSFODNN7EXAMPLE",
                           "keys": ["kb-3", 44], "incident": "inc-1"},
                          {"exit_code": 0, "summary": "restored"})
    text = json.dumps(record)
    assert "hunter2" not in text and "wJalrXUtnFEMI" not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    assert record["arguments"]["keys"] == ["kb-3", 44]
    assert "agent:***@db" in record["arguments"]["source_url"]

    r = cli(*local_env.args("--json", "audit"))
    assert r.code == 0
    records = r.json()
    assert [x["command"] for x in records] == ["restore", "unmark-good", "mark-good", "snapshot", "init"]
    assert [x["seq"] for x in records] == [5, 4, 3, 2, 1]
    assert records[3]["result"]["snapshot"] == snap and records[3]["user"] and records[3]["host"]
    assert cli(*local_env.args("--json", "audit", "--limit", "2")).json()[1]["command"] == "unmark-good"
    assert verify_audit(local_env.store())["ok"]


# -- metrics -------------------------------------------------------------------------

def read_metrics(path: Path) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_file_after_success_and_after_failure(local_env, cli):
    prom = local_env.dir / "snapshot.prom"
    r = cli(*local_env.args("--metrics-file", prom, "snapshot", "--release", "r1"))
    assert r.code == 0, r.err
    m = read_metrics(prom)
    labels = (("command", "snapshot"), ("release", "r1"))
    success = m[("snapshotter_last_success_timestamp_seconds", labels)]
    assert m[("snapshotter_exit_code", labels)] == 0
    assert m[("snapshotter_last_run_timestamp_seconds", labels)] == success
    assert abs(success - time.time()) < 60
    assert m[("snapshotter_run_duration_seconds", labels)] > 0
    assert m[("snapshotter_bytes_written", labels)] > 0
    assert m[("snapshotter_bytes_reused", labels)] == 0
    assert m[("snapshotter_records", labels + (("source", "db"),))] == 3000

    time.sleep(0.05)
    r = cli(*local_env.args("--metrics-file", prom, "snapshot", "--release", "r1", "--source", "nosuch"))
    assert r.code == 5
    m = read_metrics(prom)
    assert m[("snapshotter_exit_code", labels)] == 5
    assert m[("snapshotter_last_success_timestamp_seconds", labels)] == success  # carried over
    assert m[("snapshotter_last_run_timestamp_seconds", labels)] > success
    assert ("snapshotter_bytes_written", labels) not in m

    forget_prom = local_env.dir / "forget.prom"
    assert cli(*local_env.args("--metrics-file", forget_prom, "forget")).code == 2
    m = read_metrics(forget_prom)
    assert m[("snapshotter_exit_code", (("command", "forget"), ("release", "")))] == 2

    # a metrics path that cannot be written is refused before the work (not after a committed snapshot)
    before = listed(cli, local_env)
    r = cli(*local_env.args("--metrics-file", local_env.dir / "no" / "such" / "m.prom", "snapshot", "--release", "r1"))
    assert r.code == 2 and "its folder does not exist" in r.err
    assert listed(cli, local_env) == before


def test_forget_refuses_keep_release_rules_that_match_no_release(local_env, cli):
    """A misspelt --keep-release as the only rule would keep nothing: like no rule at all."""
    r = cli(*local_env.args("forget", "--keep-release", "prod-v1"))
    assert r.code == 0, r.err  # nothing to forget yet (a cron job on a new repository)
    a = snapshot(cli, local_env, "prod-v1")
    b = snapshot(cli, local_env, "prod-v2")
    r = cli(*local_env.args("forget", "--keep-release", "prod-V1"))
    assert r.code == 2 and "no snapshot of release(s) 'prod-V1'" in r.err and "prod-v1, prod-v2" in r.err
    assert sorted(listed(cli, local_env)) == sorted([a, b])
    # with a rule that keeps something, or a release that exists, forget goes on
    r = cli(*local_env.args("--json", "forget", "--keep-release", "prod-v1", "--keep-release", "gone"))
    assert r.code == 0 and [d["id"] for d in r.json()["remove"]] == [b]
    assert "--keep-release 'gone': no snapshot of that release" in r.err


# -- the cron wrapper ------------------------------------------------------------------

def test_cron_wrapper_is_quiet_on_success_and_says_one_line_on_failure(local_env, cli):
    script = Path(__file__).resolve().parent.parent / "scripts" / "snapshotter-cron.sh"
    metrics = local_env.dir / "textfile"
    metrics.mkdir()
    env = dict(os.environ, SNAPSHOTTER_CONFIG=str(local_env.config), SNAPSHOTTER_CRON_RELEASE="r1",
               SNAPSHOTTER_CRON_METRICS_DIR=str(metrics), SNAPSHOTTER_CRON_KEEP="--keep-last 1",
               SNAPSHOTTER_CRON_BIN=f"{sys.executable} -m snapshotter")
    for _ in range(2):
        p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert len(listed(cli, local_env)) == 1  # forget ran with the policy
    assert sorted(f.name for f in metrics.iterdir()) == ["snapshotter-forget.prom", "snapshotter-snapshot.prom"]

    with locks.acquire(local_env.store(), locks.repository_claims(exclusive=True), command="prune"):
        p = subprocess.run(["bash", str(script)], env=dict(env, SNAPSHOTTER_CRON_LOCK_WAIT="0"),
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 4 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith("snapshotter-cron: snapshot failed (exit 4): the repository is locked")
    assert read_metrics(metrics / "snapshotter-snapshot.prom")[
        ("snapshotter_exit_code", (("command", "snapshot"), ("release", "r1")))] == 4


def test_one_corrupt_manifest_does_not_hide_the_other_snapshots(local_env, cli):
    """At 3 a.m. a damaged manifest must not stop `list`, `restore --release`, `forget` or
    the next snapshot; each says which one it skipped, `verify` still fails on it, and it
    cannot be marked known-good.  But when the damaged one is the snapshot `restore
    --release` would pick, the restore is refused rather than handed to another one."""
    def later_snapshot() -> str:
        time.sleep(1.05)  # ids order by the second: a damaged manifest of the same second might be the newer
        return snapshot(cli, local_env)

    a = snapshot(cli, local_env)
    b = later_snapshot()
    manifest = local_env.dir / "repo" / "snapshots" / "r1" / f"{a}.json"
    manifest.write_text("{broken")
    r = cli(*local_env.args("--json", "list"))
    assert r.code == 0 and [s["id"] for s in r.json()] == [b]
    assert f"snapshot {a} of release r1 not listed" in r.err and "not JSON" in r.err
    r = cli(*local_env.args("--json", "restore", "--release", "r1", "--dry-run"))
    assert r.code == 0 and r.json()["snapshot"] == b, r.err
    assert f"skipped snapshot {a}" in r.err
    r = cli(*local_env.args("mark-good", a))
    assert r.code == 3 and "not JSON" in r.err
    assert not (local_env.dir / "repo" / "good" / a).exists()
    c = later_snapshot()
    r = cli(*local_env.args("--json", "forget", "--keep-last", "1"))
    assert r.code == 0 and [d["id"] for d in r.json()["remove"]] == [b], r.err
    assert f"snapshot {a} left out of forget and left in place" in r.err
    assert manifest.read_text() == "{broken" and listed(cli, local_env) == [c]
    assert cli(*local_env.args("verify")).code == 3

    # the known-good snapshot is the damaged one: no fallback to the newest (maybe poisoned) one
    assert cli(*local_env.args("mark-good", c)).code == 0
    d = later_snapshot()
    (local_env.dir / "repo" / "snapshots" / "r1" / f"{c}.json").write_text("{broken")
    r = cli(*local_env.args("restore", "--release", "r1", "--dry-run"))
    assert r.code == 3 and f"the known-good snapshot of release 'r1', {c}, is damaged" in r.err, r.err
    assert cli(*local_env.args("unmark-good", c)).code == 0
    r = cli(*local_env.args("--json", "restore", "--release", "r1", "--dry-run"))
    assert r.code == 0 and r.json()["snapshot"] == d
    # and when the newest is damaged and none is known-good, not an older one either
    (local_env.dir / "repo" / "snapshots" / "r1" / f"{d}.json").write_text("{broken")
    r = cli(*local_env.args("restore", "--release", "r1", "--dry-run"))
    assert r.code == 3 and f"the newest snapshot of release 'r1', {d}, is damaged" in r.err, r.err
