"""What the repository keeps: ``forget`` drops snapshot manifests by policy,
``prune`` deletes the chunks nothing references any more.

Forget follows restic's rules: snapshots are walked newest first, each
``--keep-<period> N`` keeps the newest snapshot of each of the N most recent
periods (UTC, by ``taken_at``) that have one, and a snapshot is kept when any
rule keeps it.  Known-good snapshots, and snapshots an incident was restored
from, are always kept; quarantine bundles are never touched.

Prune runs under an exclusive lock, so no snapshot or restore is writing.  A
chunk is referenced when any snapshot manifest or any JSON object of a
quarantine bundle names it; a chunk that nothing references is deleted only
once it is older than the grace period, which covers a writer this run cannot
see (a clock or lock gone wrong) and keeps a just-interrupted run's chunks for
a retry to reuse.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import IntegrityError, SnapshotterError
from .names import parse_iso, snapshot_id_time
from .objectstore import ObjectMissing
from .repository import Repository, load_json, manifest_object

QUARANTINE_PREFIX = "quarantine/"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- forget ------------------------------------------------------------------------

@dataclass(frozen=True)
class RetentionPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    releases: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly or self.releases)

    def to_json(self) -> dict:
        return {"keep_last": self.last, "keep_hourly": self.hourly, "keep_daily": self.daily,
                "keep_weekly": self.weekly, "keep_monthly": self.monthly, "keep_release": list(self.releases)}


_BUCKETS: list[tuple[str, Callable[[_dt.datetime], Any]]] = [
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
]


@dataclass
class Decision:
    id: str
    release: str
    taken_at: str
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "release": self.release, "taken_at": self.taken_at, "reasons": self.reasons}


@dataclass
class ForgetPlan:
    keep: list[Decision]
    remove: list[Decision]


def apply_policy(snapshots: list[dict], policy: RetentionPolicy, *, protected: dict[str, str] | None = None
                 ) -> ForgetPlan:
    """Split ``snapshots`` (dicts with id, release, taken_at) into keep and remove.

    ``protected`` maps snapshot ids that must stay to the reason (known-good, incident).
    """
    protected = protected or {}

    def when(s: dict) -> _dt.datetime:
        return parse_iso(s["taken_at"]).astimezone(_dt.timezone.utc)

    ordered = sorted(snapshots, key=lambda s: (when(s), s["id"]), reverse=True)
    counts = {"last": policy.last, **{name: getattr(policy, name) for name, _ in _BUCKETS}}
    last_bucket: dict[str, Any] = {}
    keep, remove = [], []
    for s in ordered:
        t = when(s)
        d = Decision(s["id"], s["release"], s["taken_at"])
        if counts["last"] > 0:
            counts["last"] -= 1
            d.reasons.append("last")
        for name, bucket_of in _BUCKETS:
            if counts[name] <= 0:
                continue
            bucket = bucket_of(t)
            if last_bucket.get(name) != bucket:
                last_bucket[name] = bucket
                counts[name] -= 1
                d.reasons.append(name)
        if s["release"] in policy.releases:
            d.reasons.append(f"release {s['release']}")
        if s["id"] in protected:
            d.reasons.append(protected[s["id"]])
        (keep if d.reasons else remove).append(d)
    return ForgetPlan(keep, remove)


def incident_documents(repo: Repository) -> Iterator[tuple[str, Any]]:
    """Every JSON object of every quarantine bundle, parsed.  An unreadable one
    stops the caller: deciding what to delete without it is not safe."""
    for info in repo.store.list(QUARANTINE_PREFIX):
        if not info.name.endswith(".json"):
            continue
        try:
            raw = repo.store.get(info.name)
        except ObjectMissing:
            continue
        try:
            doc = load_json(raw, f"quarantine object {info.name}")
        except IntegrityError as exc:
            raise IntegrityError(f"{exc.message}; nothing was deleted (repair or remove it first)") from None
        yield info.name, doc


def incident_snapshots(repo: Repository) -> dict[str, str]:
    """Snapshot ids that incidents were restored from: {id: reason}."""
    out: dict[str, str] = {}
    for name, doc in incident_documents(repo):
        parts = name.split("/")
        if len(parts) != 3 or parts[2] != "manifest.json" or not isinstance(doc, dict):
            continue
        snap = doc.get("snapshot")
        if isinstance(snap, dict):
            snap = snap.get("id")
        if isinstance(snap, str):
            out[snap] = f"incident {parts[1]}"
    return out


def plan_forget(repo: Repository, policy: RetentionPolicy,
                warn: Callable[[str], None] | None = None) -> ForgetPlan:
    """Which snapshots the policy keeps and removes.  A corrupt manifest is left out of
    the policy and left in place (told to ``warn``): it is neither counted as a kept
    snapshot nor deleted, and ``verify`` reports it."""
    protected = dict(incident_snapshots(repo))
    for sid in repo.good_ids():
        protected[sid] = "known-good"
    snapshots = []
    for ref in repo.list_snapshot_refs():
        try:
            m = repo.manifest(ref)
        except IntegrityError as exc:
            if warn is not None:
                warn(f"warning: snapshot {ref.id} left out of forget and left in place: {exc.message}")
            continue
        snapshots.append({"id": ref.id, "release": ref.release, "taken_at": m.taken_at or _id_time(ref.id)})
    return apply_policy(snapshots, policy, protected=protected)


def _id_time(snapshot_id: str) -> str:
    # ids start with their UTC time (20261129T101500Z-...), a fallback for a manifest without taken_at
    return snapshot_id_time(snapshot_id).isoformat().replace("+00:00", "Z")


def forget(repo: Repository, plan: ForgetPlan, *, check: Callable[[], None] | None = None) -> None:
    """Delete the manifests ``plan`` removes (their chunks stay until prune)."""
    for d in plan.remove:
        if check:
            check()
        repo.store.delete(manifest_object(d.release, d.id))


# -- prune -------------------------------------------------------------------------

def chunk_ids_in(doc: Any, out: set[str]) -> None:
    """Every 64-hex string anywhere in ``doc``.

    Deliberately lenient: a manifest names chunks in ``chunks`` lists
    (``[id, records, raw_bytes, stored_bytes]``), a quarantine bundle may name
    them anywhere; keeping a chunk by mistake costs bytes, deleting one by
    mistake loses evidence.
    """
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) == 64 and _HEX64.match(item):
                out.add(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def referenced_chunks(repo: Repository) -> tuple[set[str], int, int]:
    """(chunk ids, snapshots read, quarantine objects read)."""
    refs: set[str] = set()
    snapshots = 0
    for ref in repo.list_snapshot_refs():
        try:
            manifest = repo.manifest(ref)
        except SnapshotterError as exc:
            raise IntegrityError(f"prune stopped before deleting anything: {exc.message}") from None
        # the whole document, not only its chunk rows: keeping a chunk by mistake costs bytes
        chunk_ids_in(manifest.doc, refs)
        snapshots += 1
    bundles = 0
    for _, doc in incident_documents(repo):
        chunk_ids_in(doc, refs)
        bundles += 1
    return refs, snapshots, bundles


def prune(repo: Repository, *, grace: _dt.timedelta, dry_run: bool = False,
          check: Callable[[], None] | None = None, progress: Callable[[int], None] | None = None,
          now: float | None = None) -> dict:
    """Delete unreferenced chunks older than ``grace``; returns the report."""
    refs, snapshots, bundles = referenced_chunks(repo)
    cutoff = (now if now is not None else time.time()) - grace.total_seconds()
    report = {"dry_run": dry_run, "grace_seconds": grace.total_seconds(), "snapshots": snapshots,
              "quarantine_objects": bundles, "chunks": 0, "referenced_chunks": 0, "unreferenced_chunks": 0,
              "kept_recent_chunks": 0, "kept_recent_bytes": 0, "deleted_chunks": 0, "bytes_freed": 0}
    doomed: list[str] = []
    for info in repo.store.list("chunks/"):
        chunk_id = info.name.rsplit("/", 1)[-1]
        if not _HEX64.match(chunk_id):
            continue  # not ours: leave it
        report["chunks"] += 1
        if chunk_id in refs:
            report["referenced_chunks"] += 1
            continue
        report["unreferenced_chunks"] += 1
        if grace.total_seconds() > 0 and info.mtime > cutoff:
            report["kept_recent_chunks"] += 1
            report["kept_recent_bytes"] += info.size
            continue
        doomed.append(info.name)
        report["deleted_chunks"] += 1
        report["bytes_freed"] += info.size
    if dry_run or not doomed:
        return report
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="prune") as pool:
        # in batches, so a lost lock stops the deletions within one batch
        for start in range(0, len(doomed), 256):
            if check:
                check()
            for _ in pool.map(repo.store.delete, doomed[start:start + 256]):
                if progress:
                    progress(1)
    return report
