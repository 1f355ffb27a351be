"""`snapshotter demo`: the README's first command walks the whole job on embedded stores."""
from __future__ import annotations

import json


def test_demo_walks_snapshot_bad_writes_restore_quarantine(tmp_path, cli):
    r = cli("--json", "demo", "--dir", "d")
    assert r.code == 0, r.err
    summary = json.loads(r.out)  # stdout holds one JSON document; the walk-through went to stderr
    assert summary["incident"] == "demo-incident" and "restore" in r.err
    cfg = ["--config", str(tmp_path / "d" / "snapshotter.toml")]
    listed = cli(*cfg, "--json", "list").json()
    assert len(listed) == 1 and listed[0]["good"] is True and listed[0]["release"] == "demo-v1"
    # the restore put every store back: nothing differs from the known-good snapshot
    plan = cli(*cfg, "--json", "diff", summary["snapshot"]).json()["plan"]
    assert set(plan) == {"history", "retrieval", "memory"}
    assert all(c == {"added": 0, "modified": 0, "deleted": 0} for s in plan.values() for c in s.values())
    # and the bad writes are kept as evidence, classified against the failure time
    rows = cli(*cfg, "--json", "quarantine", "show", "demo-incident").json()
    ops = sorted((r["source"], r["op"]) for r in rows)
    assert ops == [("history", "added"), ("history", "added"), ("memory", "added"), ("memory", "deleted"),
                   ("retrieval", "deleted"), ("retrieval", "modified")]
    injected = [r for r in rows if r["source"] == "history"]
    assert all(r["post_failure"] is True for r in injected)
    assert any("Ignore previous instructions" in json.dumps(r["value"]) for r in injected)
    poison = next(r for r in rows if r["key"] == "doc-poison")
    assert len(poison["value"]["embedding"]) == 32
    # running it again starts over cleanly
    assert cli("demo", "--dir", "d").code == 0


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, cli):
    """`demo --dir .` in a project folder must not wipe its repository or Chroma store."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "agent.db").write_bytes(b"precious")
    (tmp_path / "proj" / "repo").mkdir()
    (tmp_path / "proj" / "repo" / "config.json").write_text("{}")
    r = cli("demo", "--dir", "proj")
    assert r.code == 2 and "not made by `snapshotter demo`" in r.err and len(r.err.strip().splitlines()) == 1
    assert (tmp_path / "proj" / "agent.db").read_bytes() == b"precious"
    assert (tmp_path / "proj" / "repo" / "config.json").read_text() == "{}"
    (tmp_path / "file").write_text("x")
    assert cli("demo", "--dir", "file").code == 2
