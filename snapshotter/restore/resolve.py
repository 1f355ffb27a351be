"""Which snapshot a restore puts back and what of it: the snapshot (an id, or a
release's newest known-good one), the sources and streams the selection covers
(sessions included), and whether every chunk they need is in the repository.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Callable

from ..backend import SourceBackend, StreamSpec
from ..config import Config
from ..errors import IntegrityError, NotFound, UsageError
from ..names import iso, snapshot_id_time
from ..repository import Repository, chunk_object


# -- resolving ------------------------------------------------------------------

def resolve_snapshot(repo: Repository, snapshot: str | None, release: str | None,
                     before: _dt.datetime | None, *, warn: Callable[[str], None] | None = None) -> dict:
    """An id (or unique prefix), or the newest known-good snapshot of a release
    (the newest of the release when none is marked), taken before ``before``.
    A corrupt manifest of the release is skipped (told to ``warn``), unless it is the
    one that would be picked: then the restore is refused (IntegrityError)."""
    if snapshot:
        if release or before:
            raise UsageError("give either SNAPSHOT or --release [--before], not both")
        manifest = repo.load_manifest(repo.resolve(snapshot))
        repo.check_digests(manifest)
        return manifest
    if not release:
        raise UsageError("name a SNAPSHOT, or --release R to restore that release's newest known-good snapshot")
    good = repo.good_ids()
    skipped: list = []

    def damaged(ref, exc) -> None:
        skipped.append((ref, exc))
        if warn is not None:
            warn(f"warning: skipped snapshot {ref.id}: {exc.message} (`verify` reports it)")

    def picked(m: dict, is_good: bool) -> dict:
        # a damaged snapshot that would have been the pick must not hand the restore to another one
        # (an older known-good one, or a newer one taken after the agent went wrong)
        for ref, exc in skipped:
            if before is not None and snapshot_id_time(ref.id) >= before:
                continue
            # ids order by time to the second; one of the same second may be the newer (taken_at is unread)
            newer = ref.id[:16] >= m["id"][:16]
            if (ref.id in good and not is_good) or (newer and (ref.id in good or not is_good)):
                raise _damaged_pick(release, ref, exc, "known-good" if ref.id in good else "newest")
        repo.check_digests(m)
        return m

    candidates = []
    for m in repo.manifests(release, damaged=damaged):
        if before is not None and codec_time(m["taken_at"]) >= before:
            continue
        candidates.append(m)
        if m["id"] in good:
            return picked(m, True)
    if candidates:
        return picked(candidates[0], False)
    when = f" taken before {iso(before)}" if before else ""
    relevant = [(ref, exc) for ref, exc in skipped if before is None or snapshot_id_time(ref.id) < before]
    if relevant:
        ref, exc = next(((r, e) for r, e in relevant if r.id in good), relevant[0])
        raise _damaged_pick(release, ref, exc, "known-good" if ref.id in good else "newest")
    raise NotFound(f"no snapshot of release {release!r}{when}")


def _damaged_pick(release: str, ref, exc, what: str) -> IntegrityError:
    hint = "restore a snapshot by id, or unmark-good it" if what == "known-good" else "restore a snapshot by id"
    return IntegrityError(f"the {what} snapshot of release {release!r}, {ref.id}, is damaged ({exc.message}); "
                          f"nothing was written: {hint}")


def codec_time(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- selection ------------------------------------------------------------------

@dataclass
class Selection:
    sources: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"sources": self.sources, "streams": self.streams, "sessions": self.sessions}


@dataclass
class Target:
    """One (source, stream) the restore covers."""

    source: str
    backend: SourceBackend
    stream: str
    entry: dict  # the snapshot manifest's stream entry
    spec: StreamSpec  # the snapshot's spec (schema as captured)


def not_configured(manifest: dict, cfg: Config, sel: Selection) -> list[str]:
    """Sources of the snapshot that the config file no longer has (unless sources are named:
    then a missing one is an error, see :func:`select_targets`)."""
    return [] if sel.sources else sorted(s for s in manifest.get("sources", {}) if s not in cfg.sources)


def missing_sources(manifest: dict, cfg: Config, sel: Selection) -> list[str]:
    """Configured sources a restore of ``manifest`` would cover that the snapshot does not hold
    (taken with ``--source``, or before the source was configured): restoring the others alone
    would leave these as they are, poisoned or not.  Named sources are checked by
    :func:`select_targets`."""
    if sel.sources or sel.streams:
        return []  # named sources are checked by select_targets; named streams narrow the restore already
    held = manifest.get("sources", {})
    out = []
    for name in sorted(cfg.sources):
        if name in held:
            continue
        if sel.sessions and not cfg.open_source(name).supports_sessions:
            continue  # --session restores only sources with sessions
        out.append(name)
    return out


def refuse_missing_sources(manifest: dict, names: list[str]) -> None:
    """A restore refuses (exit 2) a snapshot that lacks configured sources it would cover."""
    if names:
        held = sorted(manifest.get("sources", {}))
        raise UsageError(f"snapshot {manifest['id']} does not hold source(s) {', '.join(map(repr, names))} of the "
                         f"config file: restoring it would leave them as they are. Nothing was written: restore the "
                         f"sources it holds by name ({' '.join('--source ' + n for n in held)}), or a snapshot that "
                         f"holds every source", details={"missing_sources": names})


def select_targets(manifest: dict, cfg: Config, sel: Selection) -> dict[str, list[Target]]:
    snap_sources = manifest.get("sources", {})
    names = sel.sources or sorted(snap_sources)
    gone = [n for n in sel.sources if n not in snap_sources]
    if gone:
        raise UsageError(f"snapshot {manifest['id']} has no source {', '.join(map(repr, gone))} (it has: "
                         f"{', '.join(sorted(snap_sources))}); nothing was written", details={"missing_sources": gone})
    out: dict[str, list[Target]] = {}
    seen_streams: set[str] = set()
    for name in names:
        if name not in cfg.sources:
            if sel.sources:
                raise NotFound(f"source {name!r} is in the snapshot but not in the config file")
            continue  # a source no longer configured is not restored unless asked for
        backend = cfg.open_source(name)
        if sel.sessions and not backend.supports_sessions:
            if sel.sources:
                raise UsageError(f"source {name!r} ({backend.name}) has no sessions; --session applies to conversation sources")
            continue
        src = snap_sources[name]
        if src.get("backend") != backend.name:
            raise UsageError(f"source {name!r} was captured with backend {src.get('backend')!r} but is configured "
                             f"as {backend.name!r}")
        targets = []
        for stname, entry in src.get("streams", {}).items():
            if sel.streams and stname not in sel.streams:
                continue
            seen_streams.add(stname)
            targets.append(Target(name, backend, stname, entry, StreamSpec(stname, entry.get("schema", {}))))
        if targets:
            out[name] = targets
    missing = [s for s in sel.streams if s not in seen_streams]
    if missing:
        raise NotFound(f"snapshot {manifest['id']} has no stream {', '.join(missing)} in the selected sources")
    if not out:
        raise NotFound("nothing to restore: the selection matches no configured source of the snapshot")
    return out


def check_objects(repo: Repository, targets: dict[str, list[Target]]) -> None:
    """Every chunk the selection needs is present (corruption is caught while reading),
    and each stream's chunk list adds up to the record count its manifest states (what
    `show`, `list` and the plan's counts rely on)."""
    from concurrent.futures import ThreadPoolExecutor
    for ts in targets.values():
        for t in ts:
            rows = t.entry.get("chunks", [])
            if not all(isinstance(r, list) and len(r) >= 2 and type(r[1]) is int for r in rows) \
                    or sum(r[1] for r in rows) != t.entry.get("records"):
                raise IntegrityError(f"snapshot stream {t.source}/{t.stream}: its chunk list does not add up to the "
                                     f"{t.entry.get('records')} records its manifest states; nothing was written "
                                     f"(run `snapshotter verify`)")
    ids = sorted({row[0] for ts in targets.values() for t in ts for row in t.entry.get("chunks", [])})
    with ThreadPoolExecutor(max_workers=8) as pool:
        for cid, info in zip(ids, pool.map(lambda c: repo.store.stat(chunk_object(c)), ids)):
            if info is None:
                raise IntegrityError(f"snapshot object {chunk_object(cid)} is missing; nothing was written "
                                     f"(run `snapshotter verify` for the full list)")
