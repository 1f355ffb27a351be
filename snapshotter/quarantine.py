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

from .errors import IntegrityError, NotFound, SnapshotterError, UsageError
from .names import NAME_RE, check_name
from .objectstore import ObjectMissing
from .documents import DocumentError, IncidentBundle, QuarantinedWrite, UnreadableFormat
from .repository import Repository, dumps, load_json
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


def open_bundle(repo: Repository, incident: str) -> IncidentBundle:
    """The incident's bundle, checked (:meth:`IncidentBundle.from_json`)."""
    check_name("incident", incident)
    name = bundle_object(incident)
    try:
        raw = repo.store.get(name)
    except ObjectMissing:
        raise NotFound(f"no incident {incident!r} in {repo.store.url}") from None
    try:
        return IncidentBundle.from_json(load_json(raw, name), repo.hash_digits, incident=incident)
    except UnreadableFormat as exc:
        raise UsageError(f"{name} {exc}") from None
    except DocumentError as exc:
        raise IntegrityError(f"{name} is corrupt ({exc})") from None


def load_bundle(repo: Repository, incident: str) -> dict:
    """:func:`open_bundle` as its plain JSON object, for code that reads bundles as dicts."""
    return open_bundle(repo, incident).doc


def applied_status(repo: Repository, incident: str) -> dict | None:
    try:
        doc = load_json(repo.store.get(applied_object(incident)), applied_object(incident))
    except ObjectMissing:
        return None
    except IntegrityError:
        return {"status": "unknown"}
    return doc if isinstance(doc, dict) else {"status": "unknown"}


def write_bundle(repo: Repository, bundle: IncidentBundle | dict) -> None:
    """Commit the bundle (``bundle`` typed, or its JSON object): before any live write."""
    if isinstance(bundle, dict):
        bundle = IncidentBundle.from_json(bundle, repo.hash_digits)
    repo.store.flush()  # every quarantined chunk durable before the bundle commits
    if not repo.store.put(bundle_object(bundle.incident), dumps(bundle.to_json())):
        raise UsageError(f"incident {bundle.incident!r} already exists; choose another --incident")


def mark_applied(repo: Repository, incident: str, doc: dict) -> None:
    repo.store.put(applied_object(incident), dumps(doc), overwrite=True)


def incident_bundles(repo: Repository) -> list[IncidentBundle]:
    """Every incident bundle, newest first."""
    found = [open_bundle(repo, i) for i in incident_ids(repo)]
    found.sort(key=lambda b: (b.created_at or "", b.incident), reverse=True)
    return found


def bundles(repo: Repository) -> list[dict]:
    """:func:`incident_bundles` as plain JSON objects, for code that reads bundles as dicts."""
    return [b.doc for b in incident_bundles(repo)]


def _typed(bundle: IncidentBundle | dict) -> IncidentBundle:
    # a bundle some caller still holds as its JSON object (it was checked when loaded)
    return bundle if isinstance(bundle, IncidentBundle) else IncidentBundle.from_json(bundle)


def iter_records(repo: Repository, bundle: IncidentBundle | dict, *, source: str | None = None,
                 stream: str | None = None) -> Iterator[tuple[str, str, StoredRecord]]:
    """(source, stream, record) for every quarantined record; record.value is the dict above."""
    for sname, stname, st in _typed(bundle).iter_streams():
        if (source and sname != source) or (stream and stname != stream):
            continue
        for rec in read_stream(repo, st.doc):
            yield sname, stname, rec


def unfinished_incidents(repo: Repository, snapshot_id: str) -> list[str]:
    """Earlier restores of this snapshot that never finished (no ``applied.json``: their
    bundles keep the values from before the first attempt), which a restore lists under
    ``continues``.  One that a later restore finished is not listed again: a later
    incident, applied and verified, whose plan covers every stream of the unfinished one
    (of any snapshot: the live state has been put to a known point since).  The old
    incident stays in the repository and in `quarantine list`, as evidence.  An unreadable
    bundle is skipped here: it must not block a restore; `quarantine list` reports it."""
    found = []
    for incident in incident_ids(repo):
        try:
            found.append(open_bundle(repo, incident))
        except SnapshotterError:
            continue
    status: dict[str, dict | None] = {}

    def finished(b: IncidentBundle) -> bool:
        if b.incident not in status:
            status[b.incident] = applied_status(repo, b.incident)
        doc = status[b.incident]
        return bool(doc and doc.get("applied_at") and doc.get("verified") is True)

    out = []
    for b in found:
        if b.snapshot != snapshot_id or applied_status(repo, b.incident) is not None:
            continue
        streams = {(s, st) for s, sts in b.plan.items() for st in sts}
        if any((later.created_at or "") > (b.created_at or "") and finished(later)
               and streams <= {(s, st) for s, sts in later.plan.items() for st in sts} for later in found):
            continue
        out.append(b.incident)
    return out


def record_json(source: str, stream: str, rec: StoredRecord) -> dict[str, Any]:
    """One quarantined record in the JSON shape of `quarantine show` (docs/commands.md)."""
    from .codec import to_json
    q = QuarantinedWrite.from_value(rec.value)
    return {
        "source": source,
        "stream": stream,
        "key": to_json(rec.key),
        "op": q.op,
        "value": to_json(q.value),
        "snapshot_value": to_json(q.snapshot_value),
        "post_failure": q.post_failure,
        "written_at": to_json(q.written_at),
        "session": to_json(q.session),
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


def op_counts(bundle: IncidentBundle | dict) -> dict[str, int]:
    """Records per op over the whole bundle, from its plan (no chunk is read)."""
    counts = dict.fromkeys(OPS, 0)
    for streams in _typed(bundle).plan.values():
        for c in streams.values():
            for op in OPS:
                counts[op] += int(c.get(op, 0))
    return counts


def replaced_settings(bundle: IncidentBundle | dict) -> list[str]:
    """``source/stream: setting`` for the stream settings the restore put back (not records:
    the live ones are kept in the stream entry's ``schema``, the snapshot's in
    ``snapshot_schema``)."""
    out = []
    for source, streams in _typed(bundle).plan.items():
        for stream, c in streams.items():
            out.extend(f"{source}/{stream}: {name}" for name in c.get("settings") or [])
    return out


def stream_entry(bundle: IncidentBundle | dict, source: str, stream: str) -> dict:
    """The bundle's entry for one stream (chunks, schema, counts), as its JSON object."""
    b = _typed(bundle)
    try:
        return b.stream(source, stream).doc
    except KeyError:
        raise NotFound(f"incident {b.incident} has no stream {source}/{stream}") from None
