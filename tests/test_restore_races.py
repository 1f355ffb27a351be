"""A restore of a store without transactions (Redis, Chroma) whose live store another
writer changes between the restore's writes and its verification is refused as a
conflict (exit 6, "the store changed under the restore; run it again", naming the
stream), not reported as corruption; a restored record found back at its pre-restore
value (the restore's write did not take) stays an integrity failure (exit 3).

The other writer is the test, writing just before the restore verifies."""
from __future__ import annotations

import json

import chromadb
import pytest

from conftest import REDIS_URL


def msg(text: str) -> str:
    return json.dumps({"type": "human", "data": {"content": text}})


@pytest.fixture
def before_verification(monkeypatch):
    """Runs a function after the restore's writes, just before it verifies them."""
    from snapshotter.restore import apply as restore_mod

    def install(meanwhile):
        real = restore_mod.verify_streams

        def verify_after(*args, **kwargs):
            meanwhile()
            monkeypatch.setattr(restore_mod, "verify_streams", real)  # once
            return real(*args, **kwargs)

        monkeypatch.setattr(restore_mod, "verify_streams", verify_after)
    return install


@pytest.fixture
def redis_history(redis_client, tmp_path, cli):
    prefix = redis_client.test_prefix + "message_store:"
    key = prefix + "s1"
    redis_client.lpush(key, msg("m0"), msg("m1"))
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.history]\nbackend = "conversation"\nurl = "{REDIS_URL}"\n'
        f'key_prefix = "{prefix}"\n')
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r1")
    assert snap.code == 0, snap.err
    redis_client.lpush(key, msg("POISON"))  # the agent's bad write after the snapshot
    return key, snap.json()["id"]


def test_a_redis_session_written_during_the_restore_is_a_conflict(redis_client, redis_history, cli,
                                                                  before_verification):
    key, snap_id = redis_history
    before_verification(lambda: redis_client.lpush(key, msg("agent, during the restore")))
    r = cli("--json", "restore", snap_id, "--yes")
    assert r.code == 6, r.err
    error = json.loads(r.err.strip().splitlines()[-1])["error"]
    assert error["type"] == "refused"
    assert "the store changed under the restore" in error["message"] and "run it again" in error["message"]
    assert "source 'history' stream 'messages'" in error["message"]
    # run again: the agent's message is quarantined and the session restored
    r = cli("--json", "restore", snap_id, "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert [json.loads(m)["data"]["content"] for m in redis_client.lrange(key, 0, -1)] == ["m1", "m0"]


def test_a_restored_record_back_at_its_pre_restore_value_stays_an_integrity_failure(redis_client, redis_history,
                                                                                     cli, before_verification):
    """What the restore removed is there again, byte for byte: nothing says another writer
    did it, and a restore whose write did not take must not be told to simply run again."""
    key, snap_id = redis_history
    before_verification(lambda: redis_client.lpush(key, msg("POISON")))
    r = cli("restore", snap_id, "--yes")
    assert r.code == 3, r.err
    assert "verification failed" in r.err and "changed under the restore" not in r.err


def test_a_chroma_collection_written_during_the_restore_is_a_conflict(tmp_path, cli, before_verification):
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    col = client.create_collection("mem", embedding_function=None)
    col.add(ids=["d0", "d1", "d2"], embeddings=[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], documents=["a", "b", "c"])
    (tmp_path / "snapshotter.toml").write_text(
        '[repository]\nurl = "./repo"\n[sources.memory]\nbackend = "chroma"\npath = "./chroma"\n'
        'collections = ["mem"]\n')
    assert cli("init").code == 0
    snap_id = cli("--json", "snapshot", "--release", "r").json()["id"]

    # the agent adds a record while the restore runs
    col.update(ids=["d0"], embeddings=[[0.7, 0.7]], documents=["poisoned"])
    before_verification(lambda: col.add(ids=["d9"], embeddings=[[0.9, 0.9]], documents=["new"]))
    r = cli("restore", snap_id, "--yes")
    assert r.code == 6, r.err
    assert "the store changed under the restore" in r.err and "source 'memory' stream 'mem'" in r.err, r.err
    assert 'record "d9"' in r.err

    # the agent rewrites a record the restore just wrote back
    col.update(ids=["d1"], embeddings=[[0.7, 0.7]], documents=["poisoned"])
    before_verification(lambda: col.update(ids=["d1"], embeddings=[[0.8, 0.8]], documents=["agent, during the restore"]))
    r = cli("restore", snap_id, "--yes")
    assert r.code == 6 and 'record "d1" changed again after the restore wrote it' in r.err, r.err

    r = cli("--json", "restore", snap_id, "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    got = col.get()
    assert dict(zip(got["ids"], got["documents"])) == {"d0": "a", "d1": "b", "d2": "c"}
