"""Restores of Redis conversation histories (RedisChatMessageHistory layout): a session's
time to live is kept by the snapshot and set again on the sessions a restore rewrites;
a restore either rewrites all its sessions or none, and says which."""
from __future__ import annotations

import glob
import json

from conftest import REDIS_URL


def msg(text: str) -> str:
    return json.dumps({"type": "human", "data": {"content": text}})


def contents(client, key: str) -> list[str]:
    return [json.loads(m)["data"]["content"] for m in client.lrange(key, 0, -1)]


def configure(tmp_path, cli, prefix: str) -> None:
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.history]\nbackend = "conversation"\nurl = "{REDIS_URL}"\n'
        f'key_prefix = "{prefix}"\n')
    assert cli("init").code == 0


def test_restored_sessions_get_their_time_to_live_back(redis_client, tmp_path, cli):
    prefix = redis_client.test_prefix + "message_store:"
    for s in ("expiring", "rewritten", "forever", "untouched"):
        redis_client.lpush(prefix + s, msg(f"{s} 0"), msg(f"{s} 1"))
    redis_client.expire(prefix + "expiring", 3600)
    redis_client.expire(prefix + "rewritten", 7200)
    redis_client.expire(prefix + "untouched", 600)
    configure(tmp_path, cli, prefix)
    snap = cli("--json", "snapshot", "--release", "r1")
    assert snap.code == 0, snap.err
    snap_id = snap.json()["id"]
    schema = cli("--json", "show", snap_id).json()["sources"]["history"]["streams"]["messages"]["schema"]
    ttls = schema["ttl_ms"]
    assert set(ttls) == {"expiring", "rewritten", "untouched"}
    assert 3500_000 < ttls["expiring"] <= 3600_000 and 7100_000 < ttls["rewritten"] <= 7200_000

    # the key expires (gone, as an expired key is); the agent rewrites another without a TTL
    # (DEL + RPUSH); one without a TTL gets a poisoned message; the untouched one gets a longer TTL
    redis_client.delete(prefix + "expiring")
    redis_client.delete(prefix + "rewritten")
    redis_client.lpush(prefix + "rewritten", msg("rewritten 0"), msg("POISON"))
    redis_client.lset(prefix + "forever", 0, msg("POISON"))
    redis_client.expire(prefix + "untouched", 9000)
    r = cli("--json", "restore", snap_id, "--yes")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    assert contents(redis_client, prefix + "expiring") == ["expiring 1", "expiring 0"]
    assert contents(redis_client, prefix + "rewritten") == ["rewritten 1", "rewritten 0"]
    # the remaining TTL as the snapshot captured it (less the seconds the test took)
    assert ttls["expiring"] - 60_000 < redis_client.pttl(prefix + "expiring") <= ttls["expiring"]
    assert ttls["rewritten"] - 60_000 < redis_client.pttl(prefix + "rewritten") <= ttls["rewritten"]
    assert redis_client.ttl(prefix + "forever") == -1  # had none at the snapshot: has none
    assert redis_client.ttl(prefix + "untouched") > 8000  # not restored: keeps its own
    # the incident keeps the live TTLs the restore saw (its stream's schema is the live one)
    bundle = json.loads((tmp_path / "repo" / "quarantine" / r.json()["incident"] / "manifest.json").read_text())
    live_ttls = bundle["sources"]["history"]["streams"]["messages"]["schema"]["ttl_ms"]
    assert set(live_ttls) == {"untouched"} and live_ttls["untouched"] > 8000_000


def test_a_snapshot_without_ttls_still_restores_and_leaves_ttls_alone(redis_client, tmp_path, cli):
    """Snapshots taken before TTLs were kept have no ``ttl_ms``: their records and digests
    are the same, they restore, and each list keeps whatever TTL it has."""
    prefix = redis_client.test_prefix + "message_store:"
    redis_client.lpush(prefix + "s", msg("m0"), msg("m1"))
    redis_client.expire(prefix + "s", 3600)
    configure(tmp_path, cli, prefix)
    snap_id = cli("--json", "snapshot", "--release", "r1").json()["id"]
    [path] = glob.glob(str(tmp_path / "repo" / "snapshots" / "r1" / "*.json"))
    doc = json.loads(open(path).read())
    del doc["sources"]["history"]["streams"]["messages"]["schema"]["ttl_ms"]
    with open(path, "w") as fh:
        json.dump(doc, fh)
    redis_client.lset(prefix + "s", 0, msg("POISON"))
    redis_client.expire(prefix + "s", 100)
    r = cli("--json", "restore", snap_id, "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert contents(redis_client, prefix + "s") == ["m1", "m0"]
    assert 0 < redis_client.ttl(prefix + "s") <= 100


def test_a_refused_redis_restore_writes_no_session_and_says_so(redis_client, tmp_path, cli, monkeypatch):
    """Two sessions to restore; the agent writes to the second after the plan. Before, the
    first was rewritten and the restore exited 6 saying nothing was written; now every
    session is checked before any is written: none is, and the message says so."""
    from snapshotter.restore import apply as restore_mod

    prefix = redis_client.test_prefix + "message_store:"
    for s in ("a", "b"):
        redis_client.lpush(prefix + s, msg(f"{s}0"), msg(f"{s}1"))
    configure(tmp_path, cli, prefix)
    snap_id = cli("--json", "snapshot", "--release", "r1").json()["id"]
    for s in ("a", "b"):
        redis_client.lset(prefix + s, 0, msg(f"{s} POISON"))
    drifted = {s: contents(redis_client, prefix + s) for s in ("a", "b")}

    real = restore_mod.write_bundle

    def bundle_then_agent_writes(repo, bundle):
        real(repo, bundle)
        redis_client.lpush(prefix + "b", msg("CONCURRENT"))

    monkeypatch.setattr(restore_mod, "write_bundle", bundle_then_agent_writes)
    r = cli("restore", snap_id, "--yes")
    assert r.code == 6, r.err
    assert "session 'b' changed after the restore planned it" in r.err
    assert "nothing was written to any session" in r.err, r.err
    assert contents(redis_client, prefix + "a") == drifted["a"]  # not rewritten
    assert contents(redis_client, prefix + "b") == ["CONCURRENT"] + drifted["b"]
    monkeypatch.setattr(restore_mod, "write_bundle", real)
    r = cli("--json", "restore", snap_id, "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert contents(redis_client, prefix + "a") == ["a1", "a0"]
    assert contents(redis_client, prefix + "b") == ["b1", "b0"]


def test_reapply_puts_back_the_pre_restore_ttl(redis_client, tmp_path, cli):
    prefix = redis_client.test_prefix + "message_store:"
    key = prefix + "s"
    redis_client.lpush(key, msg("m0"), msg("m1"))
    redis_client.expire(key, 3600)
    configure(tmp_path, cli, prefix)
    snap_id = cli("--json", "snapshot", "--release", "r1").json()["id"]
    redis_client.lpush(key, msg("later"))
    redis_client.expire(key, 300)
    r = cli("--json", "restore", snap_id, "--yes")
    assert r.code == 0, r.err
    assert redis_client.ttl(key) > 3000
    r = cli("quarantine", "reapply", r.json()["incident"], '["s", 2]', "--yes")
    assert r.code == 0, r.err
    assert contents(redis_client, key) == ["later", "m1", "m0"]
    assert 0 < redis_client.ttl(key) <= 300


def test_a_redis_error_does_not_echo_message_content(tmp_path, cli):
    """A restore whose writes Redis refuses (out of memory inside the MULTI: redis-py names
    the failing command with its arguments, a message among them) fails with a one-line
    error that names the command, not the message."""
    import shutil
    import subprocess

    import redis

    from conftest import free_port, service_down, wait_port
    exe = shutil.which("redis-server")
    if exe is None:
        service_down("redis-server", "the `redis-server` command is not installed")  # fails in CI
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_port(port, 20, proc)
        client = redis.Redis(port=port)
        secret = "my card number is 4111 1111 1111 1111"
        client.rpush("message_store:alice", msg("hello"), msg(secret))
        (tmp_path / "snapshotter.toml").write_text(
            f'[repository]\nurl = "./repo"\n[sources.history]\nbackend = "conversation"\n'
            f'url = "redis://127.0.0.1:{port}/0"\nlist_order = "oldest-first"\n')
        assert cli("init").code == 0
        snap = cli("--json", "snapshot", "--release", "r1")
        assert snap.code == 0, snap.err
        client.lset("message_store:alice", 1, msg("POISON"))
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", max(1, int(client.info("memory")["used_memory"]) - 1024))
        r = cli("restore", snap.json()["id"], "--yes")
        assert r.code == 1, r.err
        assert "4111" not in r.err and "card number" not in r.err and "POISON" not in r.err
        assert "command 1 (LSET) of the pipeline failed" in r.err
        assert "Traceback" not in r.err
    finally:
        proc.terminate()
        proc.wait(10)
