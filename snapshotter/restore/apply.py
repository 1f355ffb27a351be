"""A restore as one operation, in its order (docs/restore.md, "Steps"): resolve,
verify objects, plan each selected stream into the quarantine, confirm, commit the
quarantine bundle, apply (one transaction per SQL source, idempotent batches
elsewhere, in the order foreign keys and the writer's mode ask), verify, and record
the outcome with each source's status.
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

from .. import __version__, codec
from ..backend import ABSENT
from ..config import Config
from ..errors import IntegrityError, NotFound, Refused, SnapshotterError, UsageError
from ..names import current_user, iso, new_incident_id, quoted, utcnow
from ..quarantine import bundle_object, mark_applied, unfinished_incidents, write_bundle
from ..repository import Repository
from ..streams import ChunkUploader, StreamWriter, read_stream
from .plan import StreamPlan, plan_stream, planned_stream
from .resolve import Selection, Target, check_objects, missing_sources, not_configured, refuse_missing_sources, \
    select_targets
from .verify import changed_under_restore, unexpected, verify_streams

APPLY_BATCH = 500

#: ``progress(step, n, total)``: see :func:`restore`
Progress = Callable[[str, int, "int | None"], None]


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
        """Which records the plan changes, how, and from which live values: equal for two
        plans exactly when they add, modify and delete the same keys of the same streams,
        whose live records hold the same values."""
        h = hashlib.sha256()
        for source in sorted(self.plans):
            for stream in sorted(self.plans[source]):
                p = self.plans[source][stream]
                h.update(codec.pack([source, stream, p.changes_digest.digest(), p.settings]))
        return h.hexdigest()


def restore(repo: Repository, cfg: Config, manifest: dict, sel: Selection, *, dry_run: bool = False,
            incident: str | None = None, failure_at: _dt.datetime | None = None,
            confirm: Callable[[RestoreResult], bool] | None = None, command: str = "restore",
            trust_repository_sql: bool = False, progress: Progress | None = None) -> RestoreResult:
    """Plan (and unless ``dry_run``: quarantine, apply, verify) a restore of ``manifest``.
    ``trust_repository_sql``: SQL text stored in the repository may be executed (a dropped
    table is recreated with its defaults, checks, index definitions, triggers).
    ``progress(step, n, total)``: ``n`` more records done in ``step`` (``plan SOURCE/STREAM``,
    ``write …``, ``delete …``, ``verify``); a new step starts at 0, ``total`` its size or None."""
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
                result.plans[source] = {t.stream: plan_stream(repo, t, reader, sel, writer=None, failure_at=failure_at,
                                                              tick=_step(progress, "plan", t, sel))
                                        for t in ts}
                refusal = reader.restore_refusal([planned_stream(repo, t, result.plans[source][t.stream]) for t in ts])
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
        refuse_unknown_sessions(repo, targets, result, sel)
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
                        plan = plan_stream(repo, t, reader, sel, writer=writer, failure_at=failure_at,
                                           tick=_step(progress, "plan and quarantine", t, sel))
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
        refuse_unknown_sessions(repo, targets, result, sel)
        bundle["plan"] = {s: {st: p.counts() for st, p in streams.items()} for s, streams in result.plans.items()}
        bundle["records"] = result.changes
        result.quarantined = result.changes
        result.incident = incident
        # an earlier restore of this snapshot that never finished: its bundle keeps the original values
        result.continues = unfinished_incidents(repo, manifest["id"])
        bundle["continues"] = result.continues

        for source, w in writers.items():
            # refusals a database can tell before anything is written (a trigger that cannot be kept
            # from firing, a write cascading outside the selection): before the person is asked
            w.preflight([planned_stream(repo, t, result.plans[source][t.stream]) for t in targets[source]])
        for w in writers.values():
            w.check_selection()
        if confirm is not None and not confirm(result):
            raise Refused("restore not confirmed; nothing was written")
        if result.changes == 0 and not any(p.live_missing or p.settings for ps in result.plans.values()
                                           for p in ps.values()):
            # nothing differs: nothing is quarantined and no store is touched
            result.incident = None
            result.verified = verify_streams(repo, targets, result, sel, readers)
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
                    _apply_source(repo, w, todo, result.plans[source], progress)
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
        if progress:
            progress("verify", 0, None)
        result.verified = verify_streams(repo, targets, result, sel, readers)
        if not result.verified:
            rolled = [s for s in writers]
            mark_applied(repo, incident, {"incident": incident, "applied_at": None, "verified": False,
                                          "rolled_back": rolled, "problems": result.problems})
            raced = changed_under_restore(repo, targets, result, sel, writers)
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


#: distinct sessions of a snapshot read for suggestions when a --session names none of them
SUGGEST_FROM = 100_000


def refuse_unknown_sessions(repo: Repository, targets: dict[str, list[Target]], result: RestoreResult,
                            sel: Selection) -> None:
    """``--session`` naming a session that neither the snapshot nor a live store holds
    (a typo under pressure): NotFound (exit 5), naming it and the snapshot's sessions
    that look alike, before anything is written; a restore of nothing must not look like
    success.  A session only the collation makes equal (``Alice`` for ``alice``) counts
    as there: the restore's own check of such names says more."""
    if not sel.sessions:
        return
    seen = {str(s) for ps in result.plans.values() for p in ps.values() for s in p.sessions_seen if s is not None}
    folded = {s.casefold() for s in seen}
    unknown = [s for s in dict.fromkeys(sel.sessions) if s not in seen and s.casefold() not in folded]
    if not unknown:
        return
    import difflib
    known: set[str] = set()
    for ts in targets.values():
        for t in ts:
            for rec in read_stream(repo, t.entry):
                s = t.backend.session_of(t.spec, rec.key, rec.value)
                if s is not None:
                    known.add(str(s))
                if len(known) >= SUGGEST_FROM:
                    break
    alike = sorted({m for s in unknown for m in difflib.get_close_matches(s, known, n=3, cutoff=0.6)})
    names = ", ".join(quoted(s, 80) for s in unknown)
    hint = (f"; sessions in the snapshot that look alike: {', '.join(quoted(s, 80) for s in alike)}" if alike else
            f"; the snapshot holds {len(known)}{'+' if len(known) >= SUGGEST_FROM else ''} session(s)"
            f"{': ' + ', '.join(quoted(s, 80) for s in sorted(known)[:5]) if known else ''}"
            f"{', ...' if len(known) > 5 else ''}")
    raise NotFound(f"session(s) {names} exist neither in snapshot {result.snapshot['id']} nor in the live "
                   f"store(s) of {', '.join(targets)}: nothing compared or written{hint}",
                   details={"unknown_sessions": unknown, "suggestions": alike})


#: records a plan's progress is reported after (a call per record would cost more than it shows)
TICK = 1000


def _step(progress: Progress | None, what: str, t: Target, sel: Selection) -> Callable[[int], None] | None:
    """The tick of one stream's plan: starts its step; reports every :data:`TICK` records."""
    if progress is None:
        return None
    step = f"{what} {t.source}/{t.stream}"
    total = None if sel.sessions else t.entry.get("records")
    progress(step, 0, total)
    pending = 0

    def tick(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= TICK:
            progress(step, pending, total)
            pending = 0
    return tick


def _writes(plan: StreamPlan) -> bool:
    return bool(plan.changes or plan.live_missing or plan.settings)


def _apply_source(repo: Repository, w, ts: list[Target], plans: dict[str, StreamPlan],
                  progress: Progress | None = None) -> None:
    """Write one source's planned streams: created parents first; deletes children first and
    writes parents first, in the order the writer's mode asks (:meth:`SourceWriter.write_mode`),
    so foreign keys hold at each step and a case-insensitive key deleted later cannot take a
    record just written."""
    by_name = {t.spec.name: t for t in ts}
    ordered = [by_name[spec.name] for spec in w.write_order([t.spec for t in ts])]
    for t in ordered:
        # what the plan read, and where it saw it: the writer's scope and checks
        if plans[t.stream].read is not None:
            w.planned(t.spec, *plans[t.stream].read)
    for t in ordered:
        w.prepare(t.spec)
    restarted = w.transaction_restarted
    for t in ordered:
        plan = plans[t.stream]
        if plan.quarantine is None or not plan.changes:
            continue
        if not w.transactional:
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
            _apply_records(repo, w, t, plans[t.stream], deletes=deletes, ops=ops, progress=progress)
    for t in ordered:
        w.finish(t.spec)


def _apply_records(repo: Repository, w, t: Target, plan: StreamPlan, *, deletes: bool, ops: tuple,
                   progress: Progress | None = None) -> None:
    """The stream's records of these ops deleted, or written back with their snapshot values."""
    if plan.quarantine is None:
        return
    size = sum(getattr(plan, op) for op in ops)
    if progress and size:
        step = f"{'delete' if deletes else 'write'} {t.source}/{t.stream}"
        progress(step, 0, size)
    encoding = t.entry.get("encoding")

    def upsert(batch: list) -> None:
        # records kept in the snapshot's own encoding go back as they are, when the writer can
        if encoding and all(raw is not None for _, raw in batch) and \
                w.upsert_encoded(t.spec, encoding, [raw for _, raw in batch]):
            return
        w.upsert(t.spec, [(rec.key, rec.value["snapshot_value"]) for rec, _ in batch])

    write = (lambda b: w.delete(t.spec, b)) if deletes else upsert
    if progress and size:
        bare = write

        def write(b: list) -> None:
            bare(b)
            progress(step, len(b), size)
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
            want = [(key, ABSENT if op == "deleted" else value) for key, op, value in batch]
            for i, _ in unexpected(t.backend, t.spec, want, got):
                raise Refused(f"source {t.source!r} stream {t.stream!r}: record {codec.key_text(batch[i][0])} "
                              "changed after the restore planned it (it was not quarantined); nothing more was "
                              "written to this stream: run the restore again")
