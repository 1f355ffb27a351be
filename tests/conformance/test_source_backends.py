"""The source-backend conformance suite: what every backend must do for a user, written
once and run on every built-in backend and store (sql on SQLite, PostgreSQL and MariaDB;
conversation on a SQL table and on Redis lists; chroma embedded and on a server) and on
the reference plugin (reference_backend.py), through the CLI and the Python API.

Each scenario drives the store through an adapter (adapters.py) that writes, removes and
reads records with the store's own client, as the agent does.  A plugin author runs the
suite on their own adapter: ``--backend-adapter MODULE:CLASS`` (docs/conformance.md).
"""
from __future__ import annotations

import base64
import importlib
import json

import pytest

from adapters import BUILTIN, Adapter
from conftest import on_terminal
from snapshotter import codec
from snapshotter.config import load_config
from snapshotter.errors import Refused
from snapshotter.objectstore import open_store
from snapshotter.repository import Repository

SOURCE = "agent"

#: what the agent holds at the snapshot
BASE = {f"r{i}": f"note {i}: refunds need a receipt" for i in range(5)}
#: and what it writes after: one record added, one modified, one deleted; the modified one
#: comes between the others in key order, so whichever order a writer works in, a check of it
#: that comes too late finds the others already written
ADDED, MODIFIED, DELETED = "r5", "r3", "r1"


def _adapter_class(ref: str) -> type[Adapter]:
    module, _, name = ref.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise pytest.UsageError(f"--backend-adapter {ref}: not a subclass of adapters.Adapter")
    return cls


def pytest_generate_tests(metafunc):
    if "adapter_class" in metafunc.fixturenames:
        chosen = [_adapter_class(ref) for ref in metafunc.config.getoption("backend_adapter")] or BUILTIN
        metafunc.parametrize("adapter_class", chosen, ids=[cls.id or cls.__name__ for cls in chosen])


@pytest.fixture
def store(adapter_class, request, tmp_path, cli):
    """The adapter's store, empty, configured as source "agent" of a new repository."""
    adapter = adapter_class(request, tmp_path)
    adapter.start()
    try:
        (tmp_path / "snapshotter.toml").write_text(
            f'[repository]\nurl = "./repo"\n\n[sources.{SOURCE}]\nbackend = "{adapter.backend}"\n{adapter.source()}')
        assert cli("init").code == 0
        yield adapter
    finally:
        adapter.close()


def as_json(payload):
    """A payload as ``quarantine show --json`` prints it."""
    return base64.b64encode(payload).decode() if isinstance(payload, bytes) else payload


def snapshot(cli) -> str:
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    return r.json()["id"]


def with_base(store: Adapter, cli) -> tuple[str, dict]:
    """The agent's records at the snapshot; the snapshot's id and the store's records."""
    for name, text in BASE.items():
        store.put(name, text)
    return snapshot(cli), store.records()


def later_writes(store: Adapter) -> dict:
    """The agent's writes after the snapshot; the store's records afterwards."""
    store.put(ADDED, "added later")
    store.put(MODIFIED, "modified later")
    store.remove(DELETED)
    return store.records()


def shown(cli, incident: str, store: Adapter) -> dict:
    """The incident's records: key text -> (op, payload of the live value, of the snapshot's)."""
    r = cli("--json", "quarantine", "show", incident)
    assert r.code == 0, r.err
    out = {}
    for q in r.json():
        assert (q["source"], q["stream"]) == (SOURCE, store.stream)
        out[codec.key_text(q["key"])] = (q["op"], None if q["value"] is None else store.payload(q["value"]),
                                         None if q["snapshot_value"] is None else store.payload(q["snapshot_value"]))
    return out


def plan_of(result: dict, store: Adapter) -> dict:
    return result["plan"][SOURCE][store.stream]


def _as_new(document):
    """The document as if built in code (members in the order a new one is written)."""
    from dataclasses import replace
    from snapshotter.documents import IncidentBundle, Manifest, SourceEntry
    if isinstance(document, (Manifest, IncidentBundle)):
        return replace(document, order=None, sources={k: _as_new(v) for k, v in document.sources.items()})
    if isinstance(document, SourceEntry):
        return replace(document, order=None, streams={k: _as_new(v) for k, v in document.streams.items()})
    return replace(document, order=None)


def assert_documents_round_trip(repo_dir) -> int:
    """Every manifest and incident bundle in the repository reads into snapshotter.documents
    and writes back as the very bytes stored, also when built anew; returns how many."""
    from snapshotter.documents import IncidentBundle, Manifest
    from snapshotter.repository import dumps, load_json
    n = 0
    for path in sorted(repo_dir.glob("snapshots/*/*.json")) + sorted(repo_dir.glob("quarantine/*/manifest.json")):
        raw = path.read_bytes()
        kind = Manifest if path.parts[-3] == "snapshots" else IncidentBundle
        document = kind.from_json(load_json(raw, path.name))
        assert dumps(document.to_json()) == raw, path
        assert dumps(_as_new(document).to_json()) == raw, path
        n += 1
    return n


def test_restore_puts_the_snapshot_back_and_quarantines_exactly_the_later_writes(store, cli, tmp_path):
    snap, at_snapshot = with_base(store, cli)
    keys = {name: codec.key_text(store.key(name)) for name in BASE}
    drifted = later_writes(store)
    keys[ADDED] = codec.key_text(store.key(ADDED))
    assert drifted != at_snapshot

    diff = cli("--json", "diff", snap)
    assert diff.code == 0, diff.err
    assert plan_of(diff.json(), store) == {"added": 1, "modified": 1, "deleted": 1}
    assert diff.json()["dry_run"] is True and diff.json()["incident"] is None
    listing = sorted((tmp_path / "repo").rglob("*"))
    dry = cli("--json", "restore", snap, "--dry-run")
    assert dry.code == 0 and plan_of(dry.json(), store) == plan_of(diff.json(), store), dry.err
    refused = cli("restore", snap)  # no --yes, and no terminal to ask on
    assert refused.code == 6 and "--yes" in refused.err
    assert store.records() == drifted
    assert sorted((tmp_path / "repo").rglob("*")) == listing

    r = cli("--json", "restore", snap, "--yes", "--incident", "inc-1")
    assert r.code == 0, r.err
    out = r.json()
    assert out["incident"] == "inc-1" and out["verified"] is True and out["quarantined"] == 3
    assert plan_of(out, store) == {"added": 1, "modified": 1, "deleted": 1}
    assert store.records() == at_snapshot
    # the incident holds exactly what the agent wrote after the snapshot: with the snapshot,
    # nothing it wrote is lost
    assert shown(cli, "inc-1", store) == {
        keys[ADDED]: ("added", "added later", None),
        keys[MODIFIED]: ("modified", "modified later", BASE[MODIFIED]),
        keys[DELETED]: ("deleted", None, BASE[DELETED]),
    }

    # the store equals the snapshot: a restore changes and quarantines nothing
    again = cli("--json", "restore", snap, "--yes")
    assert again.code == 0, again.err
    assert (again.json()["quarantined"], again.json()["incident"], again.json()["verified"]) == (0, None, True)
    assert plan_of(again.json(), store) == {"added": 0, "modified": 0, "deleted": 0}
    assert [q["incident"] for q in cli("--json", "quarantine", "list").json()] == ["inc-1"]
    assert assert_documents_round_trip(tmp_path / "repo") == 2  # the snapshot and the incident


def test_an_unchanged_store_snapshots_again_without_new_data_and_verifies(store, cli):
    first, _ = with_base(store, cli)
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    second = r.json()
    assert second["bytes_written"] == 0 and second["bytes_reused"] > 0
    [one] = cli("--json", "show", first).json()["sources"][SOURCE]["streams"].values()
    stream = second["sources"][SOURCE]["streams"][store.stream]
    assert stream["digest"] == one["digest"] and stream["records"] == one["records"] == len(BASE)

    later_writes(store)
    third = cli("--json", "snapshot", "--release", "r2")
    assert third.code == 0, third.err
    assert third.json()["sources"][SOURCE]["streams"][store.stream]["digest"] != stream["digest"]
    v = cli("--json", "verify", "--all", "--read-data")
    assert v.code == 0, v.err
    assert v.json()["ok"] is True and v.json()["problems"] == [] and v.json()["checked"] >= 3


def test_a_write_racing_the_restore_is_never_overwritten_unquarantined(store, cli, tmp_path):
    """The agent writes a record the restore is about to change, after the plan and before
    the first write (the Python API's ``confirm`` runs there).  Either the store holds the
    write off until the restore committed, or the write lands and the restore stops (exit
    6) without writing anything; the next restore then quarantines the agent's write."""
    from snapshotter.restore import Selection, restore
    snap, at_snapshot = with_base(store, cli)
    drifted = later_writes(store)
    cfg = load_config(str(tmp_path / "snapshotter.toml"))
    repo = Repository.open(open_store(str(tmp_path / "repo")))
    manifest = repo.load_manifest(repo.resolve(snap))
    landed = []

    def agent_writes_meanwhile(result) -> bool:
        assert result.changes == 3
        landed.append(store.race_put(MODIFIED, "agent, during the restore"))
        return True

    if store.race == "held off":
        result = restore(repo, cfg, manifest, Selection(), confirm=agent_writes_meanwhile)
        assert landed == [False]
        assert result.verified and result.quarantined == 3
        assert store.records() == at_snapshot
        return

    with pytest.raises(Refused, match="again"):
        restore(repo, cfg, manifest, Selection(), confirm=agent_writes_meanwhile)
    assert landed == [True]
    after = store.records()
    raced = codec.key_text(store.key(MODIFIED))
    assert after[raced] != drifted[raced]
    assert {k: v for k, v in after.items() if k != raced} == {k: v for k, v in drifted.items() if k != raced}

    r = cli("--json", "restore", snap, "--yes", "--incident", "inc-2")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert store.records() == at_snapshot
    assert shown(cli, "inc-2", store)[raced] == ("modified", "agent, during the restore", BASE[MODIFIED])


def test_on_a_terminal_the_restore_shows_its_plan_and_asks(store, cli, tmp_path):
    """Without --yes on a terminal, the restore prints its plan and asks.  No lock or
    transaction is held while the person reads: the agent can still write, and a plan that
    changed since it was shown is refused (exit 6) with nothing written; 'y' to an
    unchanged plan restores.  A store only one process may use (embedded Chroma) is not
    written meanwhile: the answer is 'n' instead, which writes nothing."""
    snap, at_snapshot = with_base(store, cli)
    later_writes(store)
    drifted = store.records()
    planned = f"{SOURCE}/{store.stream}"

    if store.shared:
        def agent_adds_meanwhile():
            store.put("r9", "agent, while the person reads")

        code, out = on_terminal(["restore", snap], tmp_path, "y", before_answer=agent_adds_meanwhile,
                                env=store.env())
        assert code == 6 and "changed since the plan you confirmed" in out, out
        later = {"added": 2, "modified": 1, "deleted": 1}
        agents = codec.key_text(store.key("r9"))
    else:
        code, out = on_terminal(["restore", snap], tmp_path, "n", env=store.env())
        assert code == 6 and "not confirmed" in out, out
        later = {"added": 1, "modified": 1, "deleted": 1}
        store.reopen()
        agents = None
    assert planned in out and "[y/N]" in out
    # nothing was written: the store holds the agent's writes, and only those
    assert {k: v for k, v in store.records().items() if k != agents} == drifted

    code, out = on_terminal(["restore", snap, "--incident", "inc-t"], tmp_path, "y", env=store.env())
    assert code == 0 and "verified" in out, out
    store.reopen()
    assert store.records() == at_snapshot
    ops = [op for op, _, _ in shown(cli, "inc-t", store).values()]
    assert {op: ops.count(op) for op in later} == later


def awkward(store: Adapter) -> dict:
    """Record names and payloads that break careless code: non-ASCII and long names, empty,
    non-ASCII and large values, bytes that are not UTF-8, no value at all."""
    large = "".join(f"{i:06d} ünïcödé ✓ 漢字 🚀\n" for i in range(5000))  # 150 kB: beyond a chunk
    records = {
        "plain": "plain text",
        "ünïcödé ✓": "Merci ✓ — naïve café, 漢字, emoji 🚀",
        "漢字": "",
        "emoji 🚀": "tab\tnewline\nquote' \"double\" \\backslash",
        "with space": large,
        "quote ' \" \\ ;": "'; DROP TABLE items; --",
        "L" * 200: "a long name",
    }
    if "bytes" in store.payloads:
        records["binary"] = bytes(range(256)) * 4  # not UTF-8
    if "none" in store.payloads:
        records["nothing"] = None
    return records


def test_awkward_keys_and_values_round_trip(store, cli):
    records = awkward(store)
    for name, payload in records.items():
        store.put(name, payload)
    snap = snapshot(cli)
    at_snapshot = store.records()
    assert len(at_snapshot) == len(records)

    # the agent swaps the values around: each one goes into the incident exactly
    names = list(records)
    swapped = {name: records[names[(i + 1) % len(names)]] for i, name in enumerate(names)}
    for name, payload in swapped.items():
        store.put(name, payload)
    r = cli("--json", "restore", snap, "--yes", "--incident", "inc-a")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert store.records() == at_snapshot
    assert shown(cli, "inc-a", store) == {
        codec.key_text(store.key(name)): ("modified", as_json(swapped[name]), as_json(records[name]))
        for name in names}

    # and every record comes back from the repository alone
    store.empty()
    r = cli("--json", "restore", snap, "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert plan_of(r.json(), store) == {"added": 0, "modified": 0, "deleted": len(records)}
    assert store.records() == at_snapshot


def test_an_emptied_store_is_restored(store, cli):
    snap, at_snapshot = with_base(store, cli)
    store.empty()
    assert store.records() == {}
    r = cli("--json", "restore", snap, "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert plan_of(r.json(), store) == {"added": 0, "modified": 0, "deleted": len(BASE)}
    assert store.records() == at_snapshot
    if not store.droppable:
        return
    store.drop()  # the stream itself is gone: the restore recreates it from the snapshot
    r = cli("--json", "restore", snap, "--yes")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert store.records() == at_snapshot
    assert cli("--json", "diff", snap).json()["plan"][SOURCE][store.stream] == {"added": 0, "modified": 0, "deleted": 0}


def test_a_quarantined_write_is_reapplied_and_one_changed_since_is_refused(store, cli):
    snap, at_snapshot = with_base(store, cli)
    drifted = later_writes(store)
    key = {name: codec.key_text(store.key(name)) for name in (ADDED, MODIFIED, DELETED)}
    r = cli("--json", "restore", snap, "--yes", "--incident", "inc-r")
    assert r.code == 0, r.err
    assert store.records() == at_snapshot

    r = cli("--json", "quarantine", "reapply", "inc-r", key[ADDED], key[DELETED], "--yes")
    assert r.code == 0, r.err
    assert sorted(x["op"] for x in r.json()["reapplied"]) == ["added", "deleted"]
    now = store.records()
    assert now[key[ADDED]] == drifted[key[ADDED]] and key[DELETED] not in now
    assert {k: v for k, v in now.items() if k not in (key[ADDED], key[DELETED])} == \
        {k: v for k, v in at_snapshot.items() if k not in (key[ADDED], key[DELETED])}

    # written again since the restore (by the agent, or an operator fixing it): not overwritten
    store.put(MODIFIED, "fixed by the operator")
    fixed = store.records()
    r = cli("--json", "quarantine", "reapply", "inc-r", key[MODIFIED], "--yes")
    assert r.code == 6 and "changed in the live store since the restore" in json.loads(r.err)["error"]["message"]
    assert store.records() == fixed
    r = cli("--json", "quarantine", "reapply", "inc-r", key[MODIFIED], "--yes", "--force")
    assert r.code == 0, r.err
    assert store.records() == drifted
