"""One conformance suite that every object store passes: a local folder and S3
(moto over real HTTP)."""
from __future__ import annotations

import os
import threading

import pytest

from snapshotter.errors import UsageError
from snapshotter.objectstore import ObjectMissing, open_store
from snapshotter.objectstore import s3 as s3mod


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "repo"))
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/prefix", endpoint_url=server, region="us-east-1")


def test_put_is_create_only(store):
    assert store.put("chunks/ab/abc", b"first") is True
    assert store.put("chunks/ab/abc", b"second") is False
    assert store.get("chunks/ab/abc") == b"first"
    assert store.put("chunks/ab/abc", b"third", overwrite=True) is True
    assert store.get("chunks/ab/abc") == b"third"


def test_get_stat_list_delete(store):
    assert store.stat("nothing") is None
    with pytest.raises(ObjectMissing):
        store.get("nothing/here")
    for name in ("snapshots/r1/a.json", "snapshots/r1/b.json", "snapshots/r2/c.json", "chunks/00/x"):
        store.put(name, name.encode())
    info = store.stat("snapshots/r1/a.json")
    assert info.size == len(b"snapshots/r1/a.json") and info.mtime > 0
    assert sorted(o.name for o in store.list("snapshots/")) == ["snapshots/r1/a.json", "snapshots/r1/b.json",
                                                                  "snapshots/r2/c.json"]
    assert [o.name for o in store.list("snapshots/r2/")] == ["snapshots/r2/c.json"]
    assert len(list(store.list(""))) == 4
    store.delete("snapshots/r1/a.json")
    store.delete("snapshots/r1/a.json")  # deleting a missing object is fine
    assert store.stat("snapshots/r1/a.json") is None


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/abs", "a//b", ".hidden", "a/./b", "", "a/b\x00c",
                                  "dir/", "x" * 300])
def test_names_cannot_escape(store, name):
    with pytest.raises(UsageError):
        store.put(name, b"x")


def test_concurrent_create_only_has_one_winner(store):
    wins = []

    def put(i):
        wins.append(store.put("locks/one.json", str(i).encode()))

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 1


def test_large_object_round_trip(store, monkeypatch):
    # small threshold so the S3 store takes the multipart path
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 6 * 1024 * 1024)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    assert store.put("big/object", data) is True
    assert store.put("big/object", b"again") is False
    assert store.get("big/object") == data


def test_local_writes_leave_no_temporary_files(tmp_path):
    store = open_store(str(tmp_path / "repo"))
    for i in range(20):
        store.put(f"chunks/aa/{i:04d}", b"x" * i)
    leftovers = [p for p in (tmp_path / "repo").rglob(".tmp-*")]
    assert leftovers == []


def test_repository_urls(tmp_path):
    assert open_store("file://" + str(tmp_path / "r")).root == str(tmp_path / "r")
    assert open_store("rel/dir", base_dir=str(tmp_path)).root == str(tmp_path / "rel" / "dir")
    with pytest.raises(UsageError):
        open_store("ftp://host/x")
    with pytest.raises(UsageError):
        open_store("s3:///nobucket")
