"""Quarantine bundles: every record a restore is about to overwrite or remove,
kept in the repository before the first live write.

A bundle is ``quarantine/<incident>/manifest.json`` (write-once) whose streams
are chunked exactly like snapshot streams.  Each record is
``[key, {"op", "value", "snapshot_value", "written_at", "post_failure", "session"}]``
in key order.  ``quarantine/<incident>/applied.json`` is written after the
restore applied and verified; a bundle without it belongs to a restore that
was interrupted or failed (its live values are still the evidence).
"""
from __future__ import annotations

import json
from typing import Any, Iterator

from .errors import IntegrityError, NotFound, UsageError
from .names import NAME_RE, check_name
from .objectstore import ObjectMissing
from .repository import Repository, dumps, load_json, manifest_problem
from .streams import StoredRecord, read_stream

OPS = ("added", "modified", "deleted")


def bundle_object(incident: str) -> str:
    return f"quarantine/{incident}/manifest.json"


def applied_object(incident: str) -> str:
    return f"quarantine/{incident}/applied.json"


def incident_ids(repo: Repository) -> list[str]:
    ids = set()
    for info in repo.store.list("quarantine/"):
        parts = info.name.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json" and NAME_RE.match(parts[1]):
            ids.add(parts[1])
    return sorted(ids)


def load_bundle(repo: Repository, incident: str) -> dict:
    check_name("incident", incident)
    try:
        raw = repo.store.get(bundle_object(incident))
    except ObjectMissing:
        raise NotFound(f"no incident {incident!r} in {repo.store.url}") from None
    doc = load_json(raw, bundle_object(incident))
    if not isinstance(doc, dict):
        raise IntegrityError(f"{bundle_object(incident)} is corrupt (not a JSON object)")
    if doc.get("format", 1) != 1:
        raise UsageError(f"{bundle_object(incident)} has format {doc.get('format')!r}, which this snapshotter "
                         f"does not read (it reads format 1)")
    if doc.get("incident") != incident:
        raise IntegrityError(f"{bundle_object(incident)} is corrupt (incident id does not match its name)")
    problem = manifest_problem({"sources": doc.get("sources", {})}, repo.hash_digits)
    if problem is not None:
        raise IntegrityError(f"{bundle_object(incident)} is corrupt ({problem})")
    return doc


def applied_status(repo: Repository, incident: str) -> dict | None:
    try:
        doc = load_json(repo.store.get(applied_object(incident)), applied_object(incident))
    except ObjectMissing:
        return None
    except IntegrityError:
        return {"status": "unknown"}
    return doc if isinstance(doc, dict) else {"status": "unknown"}


def write_bundle(repo: Repository, bundle: dict) -> None:
    repo.store.flush()  # every quarantined chunk durable before the bundle commits
    if not repo.store.put(bundle_object(bundle["incident"]), dumps(bundle)):
        raise UsageError(f"incident {bundle['incident']!r} already exists; choose another --incident")


def mark_applied(repo: Repository, incident: str, doc: dict) -> None:
    repo.store.put(applied_object(incident), dumps(doc), overwrite=True)


def bundles(repo: Repository) -> list[dict]:
    """Every incident bundle, newest first."""
    docs = [load_bundle(repo, i) for i in incident_ids(repo)]
    docs.sort(key=lambda d: (d.get("created_at") or "", d["incident"]), reverse=True)
    return docs


def iter_records(repo: Repository, bundle: dict, *, source: str | None = None,
                 stream: str | None = None) -> Iterator[tuple[str, str, StoredRecord]]:
    """(source, stream, record) for every quarantined record; record.value is the dict above."""
    for sname, src in bundle.get("sources", {}).items():
        if source and sname != source:
            continue
        for stname, st in src.get("streams", {}).items():
            if stream and stname != stream:
                continue
            for rec in read_stream(repo, st):
                yield sname, stname, rec


def record_json(source: str, stream: str, rec: StoredRecord) -> dict[str, Any]:
    """One quarantined record in the JSON shape of `quarantine show` (docs/commands.md)."""
    from .codec import to_json
    v = rec.value
    return {
        "source": source,
        "stream": stream,
        "key": to_json(rec.key),
        "op": v["op"],
        "value": to_json(v.get("value")),
        "snapshot_value": to_json(v.get("snapshot_value")),
        "post_failure": v.get("post_failure"),
        "written_at": to_json(v.get("written_at")),
        "session": to_json(v.get("session")),
    }


def incident_status(repo: Repository, incident: str) -> dict[str, Any]:
    """How the incident's restore ended: ``applied`` (with its verification result),
    ``rolled_back`` (verification failed and the transactional sources were
    rolled back), or ``interrupted`` (no marker: the restore stopped before
    recording an outcome, so the live store may hold a mix)."""
    doc = applied_status(repo, incident)
    if doc is None:
        return {"status": "interrupted", "applied_at": None, "verified": None, "rolled_back": []}
    if doc.get("status") == "unknown":
        return {"status": "unknown", "applied_at": None, "verified": None, "rolled_back": []}
    rolled = list(doc.get("rolled_back") or [])
    status = "rolled_back" if rolled and not doc.get("applied_at") else "applied"
    return {"status": status, "applied_at": doc.get("applied_at"), "verified": doc.get("verified"),
            "rolled_back": rolled}


def op_counts(bundle: dict) -> dict[str, int]:
    """Records per op over the whole bundle, from its plan (no chunk is read)."""
    counts = dict.fromkeys(OPS, 0)
    for streams in bundle.get("plan", {}).values():
        for c in streams.values():
            for op in OPS:
                counts[op] += int(c.get(op, 0))
    return counts


def replaced_settings(bundle: dict) -> list[str]:
    """``source/stream: setting`` for the stream settings the restore put back (not records:
    the live ones are kept in the stream entry's ``schema``, the snapshot's in
    ``snapshot_schema``)."""
    out = []
    for source, streams in bundle.get("plan", {}).items():
        for stream, c in streams.items():
            out.extend(f"{source}/{stream}: {name}" for name in c.get("settings") or [])
    return out


def stream_entry(bundle: dict, source: str, stream: str) -> dict:
    """The bundle's entry for one stream (chunks, schema, counts)."""
    try:
        return bundle["sources"][source]["streams"][stream]
    except KeyError:
        raise NotFound(f"incident {bundle['incident']} has no stream {source}/{stream}") from None
