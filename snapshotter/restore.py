"""Diff and restore: compare live stores with a snapshot, quarantine what a
restore would overwrite, apply, verify.

The plan is a merge of two key-ordered streams, the snapshot's (from the
repository) and the live store's (from the backend), comparing each record's
encoded bytes; memory is bounded by a batch, not by the store.  The merge
writes the quarantine records as it goes (a stream in the repository, chunked
like any other), so applying reads them back and needs no plan in memory:
``added`` records are deleted, ``modified`` and ``deleted`` ones are written
back with their snapshot values.  Writes are proportional to the drift.

Order (docs/restore.md, "Steps"): resolve, verify objects,
plan, confirm, commit the quarantine bundle, apply (one transaction per SQL
source; idempotent batches elsewhere), verify digests, record the outcome.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import __version__, codec, hashing, pgtext
from .backend import ABSENT, PlannedStream, SourceBackend, StreamSpec
from .config import Config
from .errors import IntegrityError, NotFound, Refused, SchemaMismatch, SnapshotterError, SourceError, UsageError
from .names import iso, new_incident_id, snapshot_id_time, utcnow, current_user
from .quarantine import applied_status, bundle_object, incident_ids, load_bundle, mark_applied, write_bundle
from .repository import Repository, chunk_object
from .streams import BackgroundHash, ChunkUploader, StoredRecord, StreamWriter, iter_chunks, read_stream

APPLY_BATCH = 500
VERIFY_BATCH = 1000


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


# -- planning -------------------------------------------------------------------

@dataclass
class StreamPlan:
    added: int = 0
    modified: int = 0
    deleted: int = 0
    snapshot_records: int = 0
    snapshot_digest: str = ""  # over the selected snapshot records
    live_schema: dict | None = None
    live_missing: bool = False
    quarantine: dict | None = None  # the bundle's stream entry
    #: sha256 of the snapshot's keys (packed, in order), for verifying by key (generic plans)
    snapshot_keys_digest: str = ""
    #: sha256 over the planned changes as (op, key), in order: what a person confirmed
    changes_digest: Any = field(default_factory=hashlib.sha256, repr=False)

    @property
    def changes(self) -> int:
        return self.added + self.modified + self.deleted

    post_failure: int = 0
    #: planned over pgtext lines inside the writer's transaction (see _verify_touched)
    lines: bool = False
    #: stream settings that differ from the snapshot's and are put back (Chroma: collection metadata)
    settings: list[str] = field(default_factory=list)
    #: a missing stream is recreated without these parts of its stored definition
    not_recreated: list[str] = field(default_factory=list)

    def counts(self) -> dict:
        out = {"added": self.added, "modified": self.modified, "deleted": self.deleted}
        if self.settings:
            out["settings"] = list(self.settings)
        if self.not_recreated:
            out["not_recreated"] = list(self.not_recreated)
        return out


def _live_records(reader, spec: StreamSpec | None, sessions) -> Iterator[tuple[Any, bytes, Any]]:
    if spec is None:
        return
    for batch in reader.read(spec, sessions or None):
        for key, value in batch:
            yield key, b"\x92" + codec.pack(key) + codec.pack(value), value


def _live_lines(reader, t: Target, spec: StreamSpec | None, sessions) -> Iterator[list[bytes]] | None:
    """The live stream as lines in the snapshot's own encoding, when the snapshot is a
    ``pgtext`` one and the reader can give them (None otherwise)."""
    enc = t.entry.get("encoding")
    if not enc or spec is None:
        return None
    got = reader.read_encoded(spec, sessions or None)
    if got is None:
        return None
    doc, batches = got
    if not pgtext.same_encoding(doc, enc):
        batches.close()
        return None
    return batches


def _session_filter(t: Target, rc: pgtext.Codec, sessions: set[str] | None):
    """A test of a snapshot line's session, reading one field where the schema names it."""
    if not sessions:
        return None
    column = (t.spec.schema.get("conversation") or {}).get("session_column")
    if column in rc.columns:
        def keep(line: bytes) -> bool:
            f = rc.field(line, column)
            return f is not None and f.decode("utf-8", "replace") in sessions
        return keep

    def keep_decoded(line: bytes) -> bool:
        key, value = rc.decode(line)
        return t.backend.session_of(t.spec, key, value) in sessions
    return keep_decoded


def _plan_lines(repo: Repository, t: Target, live_batches: Iterator[list[bytes]], plan: "StreamPlan",
                sessions: set[str] | None, digest, quarantine) -> None:
    """The merge of :func:`plan_stream` over ``pgtext`` lines: equal lines (almost all of
    them after a small drift) are recognised by their bytes alone; keys are decoded only
    where the two sides differ, values only for what is quarantined."""
    rc = pgtext.Codec(t.entry["encoding"])
    keep = _session_filter(t, rc, sessions)
    if keep is None:
        _merge_lines(iter_chunks(repo, t.entry), live_batches, rc, plan, digest, quarantine)
        return
    live = itertools.chain.from_iterable(live_batches)

    def snapshot_lines() -> Iterator[bytes]:
        for raw in iter_chunks(repo, t.entry):
            lines = [line for line in pgtext.iter_lines(raw) if keep(line)]
            digest.update(b"".join(lines))
            plan.snapshot_records += len(lines)
            yield from lines

    snap = snapshot_lines()
    lv = next(live, None)
    sv = next(snap, None)
    while lv is not None or sv is not None:
        if lv == sv:
            lv = next(live, None)
            sv = next(snap, None)
            continue
        step = _merge_step(rc, lv, sv, plan, quarantine)
        if step & 1:
            lv = next(live, None)
        if step & 2:
            sv = next(snap, None)


def _merge_step(rc: pgtext.Codec, lv: bytes | None, sv: bytes | None, plan: "StreamPlan", quarantine) -> int:
    """One step of the merge where the live line ``lv`` and the snapshot line ``sv``
    differ (None: that side has ended).  Returns which sides it consumed: 1 live, 2
    snapshot, 3 both."""
    lk = rc.key(lv) if lv is not None else None
    sk = rc.key(sv) if sv is not None else None
    if sv is None or (lv is not None and lk < sk):
        plan.added += 1
        k, value = rc.decode(lv)
        quarantine(k, "added", value, None, lv, None)
        return 1
    if lv is None or sk < lk:
        plan.deleted += 1
        k, value = rc.decode(sv)
        quarantine(k, "deleted", None, value, None, sv)
        return 2
    plan.modified += 1
    k, value = rc.decode(lv)
    quarantine(k, "modified", value, rc.decode(sv)[1], lv, sv)
    return 3


#: lines compared at once by :func:`_merge_lines` (it adapts between these)
_BLOCK_MIN, _BLOCK_MAX = 8, 1024


def _merge_lines(chunks: Iterator[bytes], live_batches: Iterator[list[bytes]], rc: pgtext.Codec,
                 plan: "StreamPlan", digest, quarantine) -> None:
    """The whole-stream merge without splitting the snapshot into lines: the live
    lines are matched against the snapshot chunk's bytes at a cursor, a block of
    lines at a time (one join and one ``startswith``, both in C); a block that
    differs is halved until the differing line is found, which alone goes through
    :func:`_merge_step`.  A line ends with its only newline (escaped newlines are
    ``\\n``), so bytes equal at a line start are equal lines."""
    raw, p = b"", 0

    def load() -> bool:
        """Move to the next snapshot chunk (False: there is none)."""
        nonlocal raw, p
        for chunk in chunks:
            if not chunk.endswith(b"\n"):
                raise IntegrityError("a snapshot chunk does not end with a complete line")
            digest.update(chunk)
            raw, p = chunk, 0
            return True
        raw, p = b"", 0
        return False

    more = load()
    join = b"".join
    k = 64
    live_lines = 0
    for batch in live_batches:
        i, n = 0, len(batch)
        live_lines += n
        while i < n:
            m = k if k < n - i else n - i
            if m > 1:
                blk = join(batch[i:i + m])
                if raw.startswith(blk, p):
                    p += len(blk)
                    i += m
                    if k < _BLOCK_MAX:
                        k *= 2
                    continue
                if m > _BLOCK_MIN:
                    k = m // 2
                    continue
            lv = batch[i]
            if raw.startswith(lv, p):
                p += len(lv)
                i += 1
                continue
            if p >= len(raw) and more:
                more = load()
                continue
            sv = raw[p:raw.index(b"\n", p) + 1] if more else None
            step = _merge_step(rc, lv, sv, plan, quarantine)
            if step & 1:
                i += 1
            if step & 2:
                p += len(sv)
    while more:  # what is left of the snapshot is gone from the live store
        while p < len(raw):
            sv = raw[p:raw.index(b"\n", p) + 1]
            _merge_step(rc, None, sv, plan, quarantine)
            p += len(sv)
        more = load()
    # every line is matched, added (live only), deleted (snapshot only) or modified (both)
    plan.snapshot_records += live_lines - plan.added + plan.deleted


def _snapshot_records(repo: Repository, t: Target, sessions) -> Iterator[StoredRecord]:
    for rec in read_stream(repo, t.entry):
        if sessions and t.backend.session_of(t.spec, rec.key, rec.value) not in sessions:
            continue
        yield rec


def plan_stream(repo: Repository, t: Target, reader, sel: Selection, *, writer: StreamWriter | None,
                failure_at: _dt.datetime | None) -> StreamPlan:
    """Merge live and snapshot by key; count, and quarantine into ``writer`` when given."""
    plan = StreamPlan()
    live_spec = reader.live_spec(t.stream)
    if live_spec is None:
        plan.live_missing = True
        plan.not_recreated = list(t.backend.recreate_omissions(t.spec, reader))
    else:
        plan.live_schema = live_spec.schema
        diffs = t.backend.schema_differences(t.spec, live_spec)
        if diffs:
            raise SchemaMismatch(f"source {t.source!r} stream {t.stream!r} changed since the snapshot: " + "; ".join(diffs))
        plan.settings = list(t.backend.settings_differences(t.spec, live_spec))
    sessions = set(sel.sessions) if sel.sessions else None

    def quarantine(key, op, live_value, snap_value, live_raw=None, snap_raw=None):
        plan.changes_digest.update(codec.pack([op, key]))
        if writer is None:
            return
        written = t.backend.written_at(t.spec, key, live_value) if live_value is not None else None
        post = None
        if failure_at is not None and written is not None:
            post = written >= failure_at
            plan.post_failure += post
        session = t.backend.session_of(t.spec, key, live_value if live_value is not None else snap_value)
        rec = {"op": op, "value": live_value, "snapshot_value": snap_value,
               "written_at": written, "post_failure": post, "session": session}
        if live_raw is not None or snap_raw is not None:
            # the records in the snapshot's encoding too: applied and re-applied as they are
            rec["raw"] = live_raw
            rec["snapshot_raw"] = snap_raw
        try:
            writer.add(key, rec)
        except SourceError as exc:  # the quarantine stream's own order check: say whose records
            raise SourceError(f"source {t.source!r} stream {t.stream!r}: {exc.message}") from None

    # the snapshot's records are hashed as its manifest's digest was
    alg = repo.hash  # resolve_snapshot checked that its digests are the repository's hash
    lines = _live_lines(reader, t, live_spec, sel.sessions)
    if lines is None and live_spec is None and pgtext.is_pgtext(t.entry.get("encoding")) \
            and hasattr(reader, "read_encoded"):
        # the table is gone: every stored line goes back as it is (through COPY, after the
        # table is recreated), not as decoded values, which would round off intervals
        lines = (batch for batch in ())
    if lines is not None:
        digest = BackgroundHash(alg)
        try:
            with contextlib.closing(lines):  # a COPY left open would hold its connection
                _plan_lines(repo, t, lines, plan, sessions, digest, quarantine)
        finally:
            hexdigest = digest.hexdigest()
        plan.lines = True
        plan.snapshot_digest = f"{alg}:{hexdigest}"
        if not sel.sessions and plan.snapshot_digest != t.entry.get("digest"):
            raise IntegrityError(f"snapshot stream {t.source}/{t.stream} does not match its manifest digest")
        return plan

    digest = hashing.new(alg)
    keys_digest = hashlib.sha256()
    pack = codec.packer().pack
    live = _live_records(reader, live_spec, sel.sessions)
    snap = _snapshot_records(repo, t, sessions)
    lv = next(live, None)
    sv = next(snap, None)
    last_key = None

    while lv is not None or sv is not None:
        if sv is not None:
            pass
        if sv is None or (lv is not None and lv[0] < sv.key):
            key, _, value = lv
            if last_key is not None and not key > last_key:
                raise IntegrityError(f"source {t.source!r} stream {t.stream!r}: live records out of key order at {codec.key_text(key)}")
            plan.added += 1
            quarantine(key, "added", value, None)
            last_key = key
            lv = next(live, None)
        elif lv is None or sv.key < lv[0]:
            digest.update(sv.raw)
            keys_digest.update(pack(sv.key))
            plan.snapshot_records += 1
            plan.deleted += 1
            quarantine(sv.key, "deleted", None, sv.value)
            last_key = sv.key
            sv = next(snap, None)
        else:
            digest.update(sv.raw)
            keys_digest.update(pack(sv.key))
            plan.snapshot_records += 1
            # a store that perturbs values on a round trip (Chroma cosine) would otherwise show its
            # own restore as drift, and every later restore would rewrite and quarantine it again
            if lv[1] != sv.msgpack_raw() and not t.backend.values_equal(t.spec, codec.unpack(lv[1])[1], sv.value):
                plan.modified += 1
                quarantine(sv.key, "modified", lv[2], sv.value)
            last_key = sv.key
            lv = next(live, None)
            sv = next(snap, None)
    plan.snapshot_digest = hashing.digest_string(alg, digest)
    plan.snapshot_keys_digest = "sha256:" + keys_digest.hexdigest()
    if not sel.sessions and plan.snapshot_digest != t.entry.get("digest"):
        raise IntegrityError(f"snapshot stream {t.source}/{t.stream} does not match its manifest digest")
    return plan


# -- the whole operation ----------------------------------------------------------

@dataclass
class RestoreResult:
    snapshot: dict
    incident: str | None
    dry_run: bool
    plans: dict[str, dict[str, StreamPlan]]
    quarantined: int = 0
    verified: bool = False
    continues: list[str] = field(default_factory=list)
    duration: float = 0.0
    problems: list[str] = field(default_factory=list)
    #: sources of the snapshot that the config file no longer has: not restored
    not_configured: list[str] = field(default_factory=list)
    #: source -> stream with deletes -> streams outside the selection referencing it (dry runs)
    dependencies: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: configured sources the snapshot does not hold (a restore refuses them; a dry run names them)
    missing_sources: list[str] = field(default_factory=list)
    #: source -> why the restore would be refused before any write (dry runs)
    refusals: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "snapshot": self.snapshot["id"],
            "release": self.snapshot["release"],
            "incident": self.incident,
            "dry_run": self.dry_run,
            "plan": {s: {st: p.counts() for st, p in streams.items()} for s, streams in self.plans.items()},
            "quarantined": self.quarantined,
            "verified": self.verified,
            "continues": self.continues,
            "not_configured": self.not_configured,
            "dependencies": self.dependencies,
            "missing_sources": self.missing_sources,
            "refusals": self.refusals,
            "duration_seconds": round(self.duration, 3),
        }

    @property
    def changes(self) -> int:
        return sum(p.changes for streams in self.plans.values() for p in streams.values())

    @property
    def settings(self) -> list[str]:
        """``source/stream: setting`` for every stream setting the restore puts back."""
        return [f"{source}/{stream}: {name}" for source, streams in self.plans.items()
                for stream, p in streams.items() for name in p.settings]

    def fingerprint(self) -> str:
        """Which records the plan changes, and how: equal for two plans exactly when they
        add, modify and delete the same keys of the same streams (the values may differ)."""
        h = hashlib.sha256()
        for source in sorted(self.plans):
            for stream in sorted(self.plans[source]):
                p = self.plans[source][stream]
                h.update(codec.pack([source, stream, p.changes_digest.digest(), p.settings]))
        return h.hexdigest()


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


def restore(repo: Repository, cfg: Config, manifest: dict, sel: Selection, *, dry_run: bool = False,
            incident: str | None = None, failure_at: _dt.datetime | None = None,
            confirm: Callable[[RestoreResult], bool] | None = None, command: str = "restore",
            trust_repository_sql: bool = False) -> RestoreResult:
    """Plan (and unless ``dry_run``: quarantine, apply, verify) a restore of ``manifest``.
    ``trust_repository_sql``: SQL text stored in the repository may be executed (a dropped
    table is recreated with its defaults, checks, index definitions, triggers)."""
    started = time.monotonic()
    targets = select_targets(manifest, cfg, sel)
    for ts in targets.values():
        for t in ts:
            t.backend.trust_repository_sql = trust_repository_sql
    check_objects(repo, targets)
    result = RestoreResult(manifest, None, dry_run, {}, not_configured=not_configured(manifest, cfg, sel),
                           missing_sources=missing_sources(manifest, cfg, sel))
    if not dry_run:
        refuse_missing_sources(manifest, result.missing_sources)
    if dry_run:
        for source, ts in targets.items():
            backend = ts[0].backend
            with backend.reader() as reader:
                result.plans[source] = {t.stream: plan_stream(repo, t, reader, sel, writer=None, failure_at=failure_at)
                                        for t in ts}
                refusal = reader.restore_refusal([_planned(repo, t, result.plans[source][t.stream]) for t in ts])
                if refusal:
                    result.refusals[source] = refusal
                removing = [t.stream for t in ts if result.plans[source][t.stream].added]
                if removing:
                    # tables outside the selection that reference rows the restore deletes: the restore
                    # itself refuses if one of them still holds such a reference
                    # every selected stream, of every source: sources on one database restore together
                    deps = reader.outside_references(sorted({t.stream for tts in targets.values() for t in tts}))
                    deps = {st: deps[st] for st in removing if deps.get(st)}
                    if deps:
                        result.dependencies[source] = deps
        result.duration = time.monotonic() - started
        return result

    incident = incident or new_incident_id()
    if repo.store.stat(bundle_object(incident)) is not None:
        raise UsageError(f"incident {incident!r} already exists; choose another --incident")
    bundle = {
        "format": 1,
        "incident": incident,
        "snapshot": manifest["id"],
        "release": manifest["release"],
        "created_at": None,
        "failure_at": iso(failure_at) if failure_at else None,
        "user": current_user(),
        "host": socket.gethostname(),
        "tool_version": __version__,
        "command": command,
        "selection": sel.to_json(),
        "continues": [],
        "records": 0,
        "plan": {},
        "sources": {},
    }
    with contextlib.ExitStack() as stack:
        # transactional sources are planned, applied and verified inside one
        # write transaction each, committed only after verification passed
        writers: dict[str, Any] = {}
        readers: dict[str, Any] = {}
        for source, ts in targets.items():
            w = ts[0].backend.writer()
            try:
                r = w.reader() if w.transactional else None
            except BaseException:
                w.__exit__(*sys.exc_info())  # the transaction it joined is always ended
                raise
            if r is None:
                # planned with a reader of its own, written later in its own transaction or batches
                w.__exit__(None, None, None)
                continue
            stack.enter_context(w)
            writers[source] = w
            readers[source] = r
        uploader = ChunkUploader(repo)
        try:
            for source, ts in targets.items():
                backend = ts[0].backend
                src = {"backend": backend.name, "location": backend.location(), "streams": {}}
                with contextlib.ExitStack() as rstack:
                    reader = readers.get(source) or rstack.enter_context(backend.reader())
                    if bundle["created_at"] is None:
                        bundle["created_at"] = iso(utcnow())
                    result.plans[source] = {}
                    for t in ts:
                        writer = StreamWriter(uploader)
                        plan = plan_stream(repo, t, reader, sel, writer=writer, failure_at=failure_at)
                        entry = writer.finish()
                        entry["schema"] = plan.live_schema
                        entry["counts"] = dict(plan.counts(), post_failure=plan.post_failure)
                        entry["snapshot_schema"] = t.spec.schema
                        if plan.lines:
                            # what "raw" and "snapshot_raw" are in (reapply writes "raw" back as it is)
                            entry["raw_encoding"] = t.entry["encoding"]
                        plan.quarantine = entry
                        result.plans[source][t.stream] = plan
                        src["streams"][t.stream] = entry
                bundle["sources"][source] = src
        finally:
            uploader.close()
        bundle["plan"] = {s: {st: p.counts() for st, p in streams.items()} for s, streams in result.plans.items()}
        bundle["records"] = result.changes
        result.quarantined = result.changes
        result.incident = incident
        # an earlier restore of this snapshot that never finished: its bundle keeps the original values
        result.continues = _unfinished_incidents(repo, manifest["id"])
        bundle["continues"] = result.continues

        for source, w in writers.items():
            # refusals a database can tell before anything is written (a trigger that cannot be kept
            # from firing, a write cascading outside the selection): before the person is asked
            w.preflight([_planned(repo, t, result.plans[source][t.stream]) for t in targets[source]])
        for w in writers.values():
            w.check_selection()
        if confirm is not None and not confirm(result):
            raise Refused("restore not confirmed; nothing was written")
        if result.changes == 0 and not any(p.live_missing or p.settings for ps in result.plans.values()
                                           for p in ps.values()):
            # nothing differs: nothing is quarantined and no store is touched
            result.incident = None
            result.verified = _verify(repo, targets, result, sel, readers)
            result.duration = time.monotonic() - started
            return result

        write_bundle(repo, bundle)  # the quarantine is committed before the first live write
        outside = False  # whether a store outside the write transactions may have been written
        status = {source: "not_started" for source in targets}
        try:
            for source, ts in targets.items():
                backend = ts[0].backend
                todo = [t for t in ts if _writes(result.plans[source][t.stream])]
                if not todo:
                    status[source] = "restored"
                    continue
                status[source] = "partial"
                with (contextlib.nullcontext(writers[source]) if source in writers else backend.writer()) as w:
                    outside = outside or source not in writers
                    _apply_source(repo, w, todo, result.plans[source])
                status[source] = "restored"  # a SQL source's only once its transaction commits, below
            # before any commit: what the databases changed besides the restore's own writes
            side_effects = [p for w in writers.values() for p in w.check_writes()]
            if side_effects:
                raise IntegrityError(f"the restore would change what it did not plan: {'; '.join(side_effects[:3])}; "
                                     f"rolled back: {', '.join(writers)}; incident {incident} holds the pre-restore "
                                     f"values")
        except Exception as exc:
            problem = exc.message if isinstance(exc, SnapshotterError) else f"{type(exc).__name__}: {exc}"
            for source in writers:
                status[source] = "rolled_back"  # the exception rolls every write transaction back
            for source, st in status.items():
                if st == "partial" and isinstance(exc, Refused):
                    # a store's own check before its first write (the records are not what was planned)
                    status[source] = "not_started"
            outside = any(st in ("restored", "partial") and s not in writers and
                          any(_writes(p) for p in result.plans[s].values()) for s, st in status.items())
            details = {"incident": incident, "sources": {s: {"status": st} for s, st in status.items()}}
            if not outside:
                # only transactional sources were written, and the exception rolls them back:
                # the incident is not left looking half-applied ("interrupted")
                with contextlib.suppress(Exception):
                    mark_applied(repo, incident, {"incident": incident, "applied_at": None, "verified": False,
                                                  "rolled_back": list(writers), "problems": [problem]})
                if isinstance(exc, SnapshotterError):
                    exc.details = {**details, **exc.details}
                raise
            # stores without transactions were written: say exactly which, and how to finish
            shown = ", ".join(f"{s} {st.replace('_', ' ')}" for s, st in status.items())
            raise SnapshotterError(
                f"restore failed after writing: {problem}; sources: {shown}; incident {incident} holds the "
                f"pre-restore values of every record: run `snapshotter restore {manifest['id']} --yes` again to "
                f"finish (it converges on the snapshot and lists {incident} under continues)",
                details=details) from exc
        result.verified = _verify(repo, targets, result, sel, readers)
        if not result.verified:
            rolled = [s for s in writers]
            mark_applied(repo, incident, {"incident": incident, "applied_at": None, "verified": False,
                                          "rolled_back": rolled, "problems": result.problems})
            raced = _changed_under_restore(repo, targets, result, sel, writers)
            if raced:
                raise Refused(f"the store changed under the restore: {raced}; run it again"
                              f"{' (rolled back: ' + ', '.join(rolled) + ')' if rolled else ''}; "
                              f"incident {incident} holds the pre-restore values")
            raise IntegrityError(f"restore verification failed: {'; '.join(result.problems[:3])}"
                                 f"{' (rolled back: ' + ', '.join(rolled) + ')' if rolled else ''}; "
                                 f"incident {incident} holds the pre-restore values")
    # the SQL transactions committed when the stack closed without an error
    mark_applied(repo, incident, {"incident": incident, "applied_at": iso(utcnow()), "verified": True,
                                  "problems": []})
    result.duration = time.monotonic() - started
    return result


def _unfinished_incidents(repo: Repository, snapshot_id: str) -> list[str]:
    """Earlier restores of this snapshot that never finished (their bundles keep the original values).
    An unreadable bundle is skipped here: it must not block a restore; `quarantine list` reports it."""
    out = []
    for incident in incident_ids(repo):
        try:
            b = load_bundle(repo, incident)
        except SnapshotterError:
            continue
        if b.get("snapshot") == snapshot_id and applied_status(repo, incident) is None:
            out.append(incident)
    return out


def _writes(plan: StreamPlan) -> bool:
    return bool(plan.changes or plan.live_missing or plan.settings)


def _planned(repo: Repository, t: Target, plan: StreamPlan) -> PlannedStream:
    def records() -> Iterator[tuple[Any, str, Any, Any]]:
        if plan.quarantine is None:
            return
        for rec in read_stream(repo, plan.quarantine):
            q = rec.value  # decoded whole: values are compared with and sent to the database
            yield rec.key, q["op"], q.get("value"), q.get("snapshot_value")
    return PlannedStream(t.spec, plan.added, plan.modified, plan.deleted, plan.live_missing, records)


def _apply_source(repo: Repository, w, ts: list[Target], plans: dict[str, StreamPlan]) -> None:
    """Write one source's planned streams: created parents first; deletes children first and
    writes parents first, in the order the writer's mode asks (:meth:`SourceWriter.write_mode`),
    so foreign keys hold at each step and a case-insensitive key deleted later cannot take a
    record just written."""
    by_name = {t.spec.name: t for t in ts}
    ordered = [by_name[spec.name] for spec in w.write_order([t.spec for t in ts])]
    for t in ordered:
        w.prepare(t.spec)
    restarted = getattr(w, "transaction_restarted", False)
    for t in ordered:
        plan = plans[t.stream]
        if plan.quarantine is None or not plan.changes:
            continue
        if not getattr(w, "transactional", False):
            _expect_planned(repo, w, t, plan)
        elif restarted:
            # the database committed the plan's transaction (MariaDB/MySQL at a CREATE TABLE), and with
            # it the plan's row locks: what the plan saw is read again, locked, before the first write
            _expect_planned(repo, w, t, plan, reader=w.reader())
    for t in ordered:
        plan = plans[t.stream]
        if plan.settings:
            # after the records' check, so a refused restore has not touched the settings either;
            # the writer checks the live settings are still the ones the plan saw (and quarantined)
            w.restore_settings(t.spec, plan.live_schema or {})
    mode = w.write_mode()
    if mode == "replace":
        steps = [(True, ("added", "modified")), (False, ("modified", "deleted"))]
    elif mode == "update-in-place":
        steps = [(False, ("modified",)), (True, ("added",)), (False, ("deleted",))]
    else:
        steps = [(True, ("added",)), (False, ("modified", "deleted"))]
    for deletes, ops in steps:
        for t in (reversed(ordered) if deletes else ordered):
            _apply_records(repo, w, t, plans[t.stream], deletes=deletes, ops=ops)
    for t in ordered:
        w.finish(t.spec)


def _apply_records(repo: Repository, w, t: Target, plan: StreamPlan, *, deletes: bool, ops: tuple) -> None:
    """The stream's records of these ops deleted, or written back with their snapshot values."""
    if plan.quarantine is None:
        return
    encoding = t.entry.get("encoding")

    def upsert(batch: list) -> None:
        # records kept in the snapshot's own encoding go back as they are, when the writer can
        if encoding and all(raw is not None for _, raw in batch) and \
                w.upsert_encoded(t.spec, encoding, [raw for _, raw in batch]):
            return
        w.upsert(t.spec, [(rec.key, rec.value["snapshot_value"]) for rec, _ in batch])

    write = (lambda b: w.delete(t.spec, b)) if deletes else upsert
    batch: list = []
    for rec in read_stream(repo, plan.quarantine):
        q = rec.fields("op", "snapshot_raw")  # values are decoded only if the writer needs them
        if q["op"] not in ops:
            continue
        batch.append(rec.key if deletes else (rec, q.get("snapshot_raw")))
        if len(batch) >= APPLY_BATCH:
            write(batch)
            batch = []
    if batch:
        write(batch)


def _expect_planned(repo: Repository, w, t: Target, plan: StreamPlan, reader=None) -> None:
    """A store without transactions: the records about to change must still be what the
    plan saw (and quarantined).  The writer checks as it writes where it can
    (:meth:`SourceWriter.expect`); otherwise they are re-read by key here, just before
    the first write (through ``reader`` when given: a transaction's own, which locks
    what it reads).  A record changed since is refused: it was not quarantined."""
    def expected() -> Iterator[tuple[Any, str, Any]]:
        for rec in read_stream(repo, plan.quarantine):
            q = rec.fields("op", "value")
            yield rec.key, q["op"], q.get("value")

    if reader is None and w.expect(t.spec, expected()):
        return
    with contextlib.nullcontext(reader) if reader is not None else t.backend.reader() as reader:
        records = expected()
        while batch := list(itertools.islice(records, APPLY_BATCH)):
            got = reader.read_keys(t.spec, [key for key, _, _ in batch])
            if got is None:
                return  # the store cannot read by key: verification will see a racing write
            live = {codec.pack(key): value for part in got for key, value in part}
            for key, op, value in batch:
                expected = ABSENT if op == "deleted" else value
                if not t.backend.same_value(t.spec, live.get(codec.pack(key), ABSENT), expected):
                    raise Refused(f"source {t.source!r} stream {t.stream!r}: record {codec.key_text(key)} changed "
                                  "after the restore planned it (it was not quarantined); nothing more was "
                                  "written to this stream: run the restore again")


def _verify(repo: Repository, targets: dict[str, list[Target]], result: RestoreResult, sel: Selection,
            readers: dict[str, Any]) -> bool:
    """Re-read the restored streams; their digests must be the snapshot's (or, where
    the store perturbs values, every record equal within the backend's rule)."""
    ok = True
    for source, ts in targets.items():
        backend = ts[0].backend
        with contextlib.nullcontext(readers[source]) if source in readers else backend.reader() as reader:
            for t in ts:
                plan = result.plans[source][t.stream]
                spec = reader.live_spec(t.stream)
                if plan.settings and spec is not None and t.backend.settings_differences(t.spec, spec):
                    ok = False
                    result.problems.append(f"{source}/{t.stream}: {', '.join(plan.settings)} not as in the snapshot")
                if source in readers and plan.lines and plan.quarantine is not None and spec is not None \
                        and hasattr(reader, "read_encoded_keys"):
                    problem = _verify_touched(repo, t, reader, spec, plan)
                    if problem:
                        ok = False
                        result.problems.append(f"{source}/{t.stream}: {problem}")
                    continue
                if not plan.lines and not sel.sessions and plan.quarantine is not None and spec is not None:
                    problem = _verify_by_key(repo, t, reader, spec, plan)
                    if problem is not _UNSUPPORTED:
                        if problem:
                            ok = False
                            result.problems.append(f"{source}/{t.stream}: {problem}")
                        continue
                alg = repo.hash
                h = hashing.new(alg)
                n = 0
                lines = _live_lines(reader, t, spec, sel.sessions)
                if lines is not None:
                    with contextlib.closing(lines):
                        for batch in lines:
                            h.update(b"".join(batch))
                            n += len(batch)
                else:
                    for _, raw, _ in _live_records(reader, spec, sel.sessions):
                        h.update(raw)
                        n += 1
                if hashing.digest_string(alg, h) == plan.snapshot_digest and n == plan.snapshot_records:
                    continue
                problem = _compare_records(repo, t, reader, spec, sel)
                if problem:
                    ok = False
                    result.problems.append(f"{source}/{t.stream}: {problem}")
    return ok


def _verify_touched(repo: Repository, t: Target, reader, spec: StreamSpec, plan: StreamPlan) -> str | None:
    """Verification of a stream planned over lines in the writer's own REPEATABLE READ
    transaction: every row the plan did not touch was compared equal to the snapshot
    in this transaction, and no other transaction's write is visible to it, so the
    stream equals the snapshot (and has its digest) exactly when every touched key
    now holds its snapshot line, or is absent where the snapshot has none.  Reads
    what the restore wrote, not the whole table."""
    rc = pgtext.Codec(t.entry["encoding"])

    def check(batch: list) -> str | None:
        expected = {}
        for key, q in batch:
            line = q.get("snapshot_raw") if q["op"] != "added" else q.get("raw")
            if line is None:
                return f"record {codec.key_text(key)} has no stored line to verify against"
            expected[rc.key_bytes(line)] = (key, q.get("snapshot_raw"))
        got = reader.read_encoded_keys(spec, [k for k, _ in batch])
        if got is None or not pgtext.same_encoding(got[0], t.entry["encoding"]):
            return "the live table can no longer be read in the snapshot's encoding"
        seen = set()
        with contextlib.closing(got[1]) as lines:
            for part in lines:
                for line in part:
                    kb = rc.key_bytes(line)
                    key, want = expected.get(kb, (None, None))
                    if want is None:
                        return f"record {codec.key_text(rc.key(line))} present after restore but not in the snapshot"
                    if line != want:
                        return f"record {codec.key_text(key)} differs from the snapshot after restore"
                    seen.add(kb)
        for kb, (key, want) in expected.items():
            if want is not None and kb not in seen:
                return f"record {codec.key_text(key)} missing after restore"
        return None

    return _check_incident(repo, plan, lambda rec: (rec.key, rec.fields("op", "raw", "snapshot_raw")), check)


def _check_incident(repo: Repository, plan: StreamPlan, item, check) -> str | None:
    """``check`` over the stream's incident records (as ``item`` makes them), a batch at a
    time; the first problem it reports, or None."""
    batch: list = []
    for rec in read_stream(repo, plan.quarantine):
        batch.append(item(rec))
        if len(batch) >= VERIFY_BATCH:
            problem = check(batch)
            if problem:
                return problem
            batch = []
    return check(batch) if batch else None


_UNSUPPORTED = object()  # _verify_by_key: the reader cannot verify by key


def _verify_by_key(repo: Repository, t: Target, reader, spec: StreamSpec, plan: StreamPlan):
    """Verification of a store without transactions (Chroma) that can fetch records by
    key: the records the restore touched are re-read and must hold their snapshot
    values (or be absent, for added ones), and the stream's live key set must be the
    snapshot's (its digest, taken during the plan).  Every other record was compared
    equal to the snapshot by the plan, so the stream equals the snapshot unless another
    writer changed an untouched record in place meanwhile, the one change a Chroma
    snapshot cannot see either (docs/design.md).  Returns a problem, None, or
    ``_UNSUPPORTED`` when the reader cannot do it (the caller re-reads everything)."""
    keys = reader.list_keys(spec)
    if keys is None or reader.read_keys(spec, []) is None:  # both hooks, or none
        return _UNSUPPORTED
    pack = codec.packer().pack
    h = hashlib.sha256()
    n = 0
    for batch in keys:
        for key in batch:
            h.update(pack(key))
        n += len(batch)
    if "sha256:" + h.hexdigest() != plan.snapshot_keys_digest or n != plan.snapshot_records:
        return f"the live keys after restore are not the snapshot's ({n} live, {plan.snapshot_records} in the snapshot)"

    def check(batch: list) -> str | None:
        found = reader.read_keys(spec, [key for key, _ in batch])
        if found is None:
            return "the store can no longer read records by key"
        live = {}
        for part in found:
            for key, value in part:
                live[codec.pack(key)] = value
        for key, rec in batch:
            q = rec.fields("op")
            got = live.get(codec.pack(key), ABSENT)
            if q["op"] == "added":
                if got is not ABSENT:
                    return f"record {codec.key_text(key)} present after restore but not in the snapshot"
                continue
            if got is ABSENT:
                return f"record {codec.key_text(key)} missing after restore"
            if not t.backend.same_value(t.spec, got, rec.value["snapshot_value"]):
                return f"record {codec.key_text(key)} differs from the snapshot after restore"
        return None

    return _check_incident(repo, plan, lambda rec: (rec.key, rec), check)


def _compare_records(repo: Repository, t: Target, reader, spec, sel: Selection) -> str | None:
    live = _live_records(reader, spec, sel.sessions)
    snap = _snapshot_records(repo, t, set(sel.sessions) if sel.sessions else None)
    for sv in snap:
        lv = next(live, None)
        if lv is None:
            return f"record {codec.key_text(sv.key)} missing after restore"
        if lv[0] != sv.key:
            return f"record {codec.key_text(lv[0])} present after restore, expected {codec.key_text(sv.key)}"
        if lv[1] != sv.msgpack_raw() and not t.backend.values_equal(t.spec, codec.unpack(lv[1])[1], sv.value):
            return f"record {codec.key_text(sv.key)} differs from the snapshot after restore"
    extra = next(live, None)
    if extra is not None:
        return f"record {codec.key_text(extra[0])} present after restore but not in the snapshot"
    return None




def _changed_under_restore(repo: Repository, targets: dict[str, list[Target]], result: RestoreResult,
                           sel: Selection, transactional: dict[str, Any]) -> str | None:
    """After a failed verification: which stream another writer changed while the restore
    ran (exit 6, run it again), or None when the failure is the restore's own (exit 3).

    Only a store without transactions can be changed under a restore: a SQL stream is
    planned, written and verified in one transaction that sees no other writer, so its
    failure is always the restore's.  In a stream of another store every record that
    differs from the snapshot is looked at:

    * one the restore did not write (not in the incident): the plan saw it equal to the
      snapshot, or absent from both, so someone else wrote it;
    * one the restore wrote that holds a third value (neither the snapshot's nor the one
      the incident kept), or is absent where the restore wrote it: someone else wrote it;
    * one the restore wrote that still holds its pre-restore value (or is still absent, or
      still present, as before): the restore's own write did not take, an integrity
      failure, whatever else is seen.

    Every failed stream must show another writer's change for the failure to be one."""
    failed = [t for ts in targets.values() for t in ts
              if any(p.startswith(f"{t.source}/{t.stream}: ") for p in result.problems)]
    if not failed or any(t.source in transactional for t in failed):
        return None
    raced = []
    for t in failed:
        plan = result.plans[t.source][t.stream]
        if plan.quarantine is None:
            return None
        why = _other_writer(repo, t, plan, sel)
        if why is None:
            return None
        raced.append(f"source {t.source!r} stream {t.stream!r}: {why}")
    return "; ".join(raced)


def _other_writer(repo: Repository, t: Target, plan: StreamPlan, sel: Selection) -> str | None:
    """:func:`_changed_under_restore` for one stream: the first record another writer
    changed, or None when no record shows it, or one shows the restore's write missing."""
    touched = {}
    for rec in read_stream(repo, plan.quarantine):
        q = rec.fields("op", "value")
        touched[codec.pack(rec.key)] = (q["op"], q.get("value"))
    sessions = set(sel.sessions) if sel.sessions else None
    evidence = None
    with t.backend.reader() as reader:
        spec = reader.live_spec(t.stream)
        if spec is None:
            return "it was removed after the restore wrote it"
        live = _live_records(reader, spec, sel.sessions)
        snap = _snapshot_records(repo, t, sessions)
        lv, sv = next(live, None), next(snap, None)
        while lv is not None or sv is not None:
            if sv is None or (lv is not None and lv[0] < sv.key):
                key, now = lv[0], lv[2]  # live only
                lv = next(live, None)
            elif lv is None or sv.key < lv[0]:
                key, now = sv.key, ABSENT  # snapshot only
                sv = next(snap, None)
            else:
                key, now = sv.key, lv[2]
                same = t.backend.same_value(t.spec, now, sv.value)
                lv, sv = next(live, None), next(snap, None)
                if same:
                    continue
            entry = touched.get(codec.pack(key))
            if entry is None:
                evidence = evidence or f"record {codec.key_text(key)}, which the restore did not write, changed"
                continue
            op, before = entry
            before = ABSENT if op == "deleted" else before
            if t.backend.same_value(t.spec, now, before):
                return None  # as before the restore: its write did not take
            evidence = evidence or f"record {codec.key_text(key)} changed again after the restore wrote it"
    return evidence
