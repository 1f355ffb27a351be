"""Snapshots, restores and verification against S3 through a fault-injecting proxy:
every command completes (botocore's retries and ours), or fails with one JSON error
line and exit 1 leaving nothing half-committed; a corrupted chunk body is caught
by its hash (exit 3) and never restored.  scripts/s3_fault_test.py runs the long,
randomised version and prints the figures."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


faults = _load("s3_fault_test", ROOT / "scripts" / "s3_fault_test.py")
crash = faults.crash
FaultProxy = faults.proxy_mod.FaultProxy


@pytest.fixture
def bench(s3_server, s3_bucket, tmp_path):
    """A fresh bucket and SQLite database; ``faulty`` goes through the proxy, ``direct`` to moto
    (``s3_bucket`` for the credentials it puts in the environment)."""
    faults.quiet_moto()
    proxy = FaultProxy(s3_server, seed=7).start()
    it = faults.Iteration(tmp_path / "it", s3_server, proxy, rows=600, seed=11)
    assert it.cli(it.direct, "init").code == 0
    yield it
    proxy.stop()
    it.db.teardown()


def manifests(it) -> list[str]:
    return [r.id for r in it.repo().list_snapshot_refs()]


def incidents(it) -> list[dict]:
    from snapshotter.quarantine import bundles
    return bundles(it.repo())


def assert_clean_failure(r, code: int = 1) -> str:
    assert r.code == code, (r.code, r.out, r.err)
    assert faults.clean_error(r) is None, faults.clean_error(r)
    assert r.out == ""
    return json.loads(r.err.splitlines()[-1])["error"]["message"]


def assert_whole(it) -> None:
    assert it.whole("check"), it.out.problems


def test_create_only_writes_retried_after_they_took_effect(bench):
    """The store applied the write but the answer was lost: botocore retries, the
    retry meets 412, and that must not read as "someone else wrote it"."""
    it, proxy = bench, bench.proxy
    for pattern, fault in ((r"^repo/snapshots/", "reset-after"), (r"^repo/locks/", "reset-after"),
                           (r"^repo/audit/", "truncate"), (r"^repo/chunks/", "truncate")):
        proxy.add_rule("PUT", pattern, fault)
    r = it.cli(it.faulty, "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    assert manifests(it) == [r.json()["id"]]
    assert [rule.count for rule in proxy.rules] == [0, 0, 0, 0], "every fault was injected"
    snap, snapshot_raw = r.json()["id"], it.db.raw_state()

    it.db.mutate(it.rnd)
    quarantine = [proxy.add_rule("PUT", r"^repo/quarantine/.*/manifest\.json$", "reset-after"),
                  proxy.add_rule("PUT", r"^repo/quarantine/.*/applied\.json$", "truncate")]
    proxy.add_rule("PUT", r"^repo/audit/", "reset-after")
    r = it.cli(it.faulty, "restore", snap, "--yes", "--incident", "inc-1")
    assert r.code == 0, r.err
    assert it.db.raw_state() == snapshot_raw
    assert [b["incident"] for b in incidents(it)] == ["inc-1"]
    assert [rule.count for rule in quarantine] == [0, 0], "both faults were injected"
    assert it.cli(it.direct, "audit", "verify").code == 0
    assert_whole(it)


def test_transient_faults_are_retried(bench):
    """Every transient fault, at every kind of request of snapshot, restore and verify
    (one fault per request: botocore's backoff is not what is under test)."""
    it, proxy = bench, bench.proxy
    kinds = ("500", "503", "slowdown", "reset", "truncate")
    targets = (("PUT", r"^repo/chunks/"), ("PUT", r"^repo/locks/"), ("PUT", r"^repo/snapshots/"),
               ("PUT", r"^repo/audit/"), ("HEAD", r""), ("GET", r"^$"))
    for i, (method, pattern) in enumerate(targets):
        proxy.add_rule(method, pattern, kinds[i % len(kinds)])
    proxy.add_rule("PUT", r"^repo/chunks/", "truncate", 2)
    r = it.cli(it.faulty, "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    snap, snapshot_raw = r.json()["id"], it.db.raw_state()
    it.db.mutate(it.rnd)
    for fault in kinds:
        proxy.add_rule("GET", r"^repo/chunks/", fault)
        proxy.add_rule("PUT", r"^repo/quarantine/", fault)
    r = it.cli(it.faulty, "restore", snap, "--yes")
    assert r.code == 0, r.err
    assert it.db.raw_state() == snapshot_raw
    proxy.clear_rules()
    for fault in kinds:
        proxy.add_rule("GET", r"^repo/chunks/", fault)
    assert it.cli(it.faulty, "verify", "--read-data").code == 0
    assert all(proxy.injected[fault] >= 3 for fault in kinds), proxy.injected


def test_snapshot_denied_fails_cleanly_and_commits_nothing(bench):
    it, proxy = bench, bench.proxy
    for method, pattern in (("PUT", r"^repo/snapshots/"),   # the commit point itself
                            ("PUT", r"^repo/chunks/"),      # one chunk of many
                            ("GET", r"^repo/locks/")):      # while taking the lock
        proxy.add_rule(method, pattern, "403")
        message = assert_clean_failure(it.cli(it.faulty, "snapshot", "--release", "r1"))
        assert "AccessDenied" in message, (method, pattern)
        assert manifests(it) == [], (method, pattern)
        assert_whole(it)
    assert it.cli(it.direct, "snapshot", "--release", "r1").code == 0  # nothing left in the way


def test_restore_denied_fails_cleanly(bench):
    it, proxy = bench, bench.proxy
    snap = it.cli(it.direct, "snapshot", "--release", "r1").json()["id"]
    snapshot_raw = it.db.raw_state()
    it.db.mutate(it.rnd)
    pre_raw, pre = it.db.raw_state(), crash.live_records(it.faulty)
    for method, pattern in (("GET", r"^repo/chunks/"),                        # reading the snapshot to plan
                            ("PUT", r"^repo/chunks/"),                        # writing the quarantine
                            ("PUT", r"^repo/quarantine/.*/manifest\.json$")):  # committing the quarantine
        proxy.add_rule(method, pattern, "403")
        assert_clean_failure(it.cli(it.faulty, "restore", snap, "--yes"))
        assert it.db.raw_state() == pre_raw, (method, pattern)
        assert incidents(it) == [], (method, pattern)  # no bundle, so none without its chunks
    # after the live write committed: exit 1, and the quarantine holds the old rows
    proxy.add_rule("PUT", r"^repo/quarantine/.*/applied\.json$", "403")
    assert_clean_failure(it.cli(it.faulty, "restore", snap, "--yes"))
    assert it.db.raw_state() == snapshot_raw
    repo = it.repo()
    snap_records = crash.snapshot_records(repo, repo.load_manifest(repo.resolve(snap)))
    assert crash.lost_writes(repo, snap_records, pre, incidents(it)) == []
    assert_whole(it)
    r = it.cli(it.faulty, "restore", snap, "--yes")
    assert r.code == 0 and r.json()["quarantined"] == 0, r.err


def test_corrupt_chunk_bodies_are_caught_by_their_hash(bench):
    """A store that sends no checksums: only snapshotter's hashes stand between a
    flipped byte and the live database."""
    it, proxy = bench, bench.proxy
    snap = it.cli(it.direct, "snapshot", "--release", "r1").json()["id"]
    it.db.mutate(it.rnd)
    pre_raw = it.db.raw_state()
    proxy.configure(corrupt=1.0)
    v = it.cli(it.faulty, "verify", "--read-data")
    assert v.code == 3, v.err
    assert v.json()["ok"] is False and all("chunks/" in p["object"] or p["object"] == "" for p in v.json()["problems"])
    for args in (("restore", snap, "--yes"), ("diff", snap)):
        r = it.cli(it.faulty, *args)
        assert "corrupt" in assert_clean_failure(r, 3)
    assert it.db.raw_state() == pre_raw
    assert incidents(it) == []
    proxy.configure(corrupt=0.0)
    assert it.cli(it.direct, "verify", "--read-data").code == 0  # the stored objects were never touched


def test_in_transit_corruption_with_store_checksums(bench):
    """A store that sends checksums: a flipped byte in transit fails botocore's check and
    the read is retried; one that fails on every read is reported corrupt (exit 3)."""
    it, proxy = bench, bench.proxy
    snap = it.cli(it.direct, "snapshot", "--release", "r1").json()["id"]
    snapshot_raw = it.db.raw_state()
    it.db.mutate(it.rnd)
    proxy.configure(corrupt_keeps_checksums=True)
    proxy.add_rule("GET", r"^repo/chunks/", "corrupt", 3)
    r = it.cli(it.faulty, "restore", snap, "--yes")
    assert r.code == 0, r.err
    assert it.db.raw_state() == snapshot_raw
    # one chunk corrupt on every read
    victim = it.repo().load_manifest(it.repo().resolve(snap))["sources"]["agent"]["streams"]["kb_chunks"]["chunks"][0][0]
    proxy.configure(corrupt=1.0, corrupt_pattern=victim)
    v = it.cli(it.faulty, "verify", "--read-data")
    assert v.code == 3 and "checksum" in json.dumps(v.json()["problems"])


def test_random_faults_give_no_bad_outcome(s3_server, s3_bucket, tmp_path):
    faults.quiet_moto()
    with FaultProxy(s3_server, seed=2024) as proxy:
        it = faults.Iteration(tmp_path / "random", s3_server, proxy, rows=600, seed=5)
        out = it.run(rate=0.1, corrupt=0.03, hard=0.01)
    assert sum(out.bad.values()) == 0, out.problems
    assert sum(out.injected.values()) > 0
