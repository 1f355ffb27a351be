"""The Python API: one repository with its configuration, one method per job.

:class:`Repository` does what the commands do, with the same safety: each
method takes the lock its command takes (``snapshotter.locks``: shared to compare
live state with a snapshot or to take one, exclusive on the sources a restore or
a reapply writes, on the marks for forget, on everything for prune) and a method
that changes the repository or a live store appends the audit record its
command appends (``snapshotter.audit``), however it ends.  Two restores, one run
from a notebook and one from a terminal, exclude each other as two terminals'
would, and ``snapshotter audit`` and ``quarantine list`` show the one run from
Python.  The CLI parses options, calls one method, prints what it returns and
turns its errors into exit codes.

Failures are the exceptions of :mod:`snapshotter.errors`, whose ``exit_code`` is
the code the CLI exits with.  Modules that cost start-up time (the backends,
SQLAlchemy, the restore engine) are imported by the methods that use them.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from .errors import AuditNotWritten, IntegrityError, Refused, SnapshotterError, UsageError, from_exception
from .names import check_name

if TYPE_CHECKING:
    from .config import Config
    from .documents import IncidentBundle
    from .locks import LockInfo, RepositoryLock
    from .repository import Repository as Core
    from .restore import RestoreResult
    from .retention import ForgetPlan
    from .streams import StoredRecord

__all__ = ["Repository", "Quarantine"]

Warn = Callable[[str], None]


def _log_warning(text: str) -> None:
    import logging
    logging.getLogger("snapshotter").warning(text)


def _time(value: "str | _dt.datetime | None") -> _dt.datetime | None:
    """A TIME as the CLI takes it (ISO 8601 or relative, ``2h``), or an aware datetime."""
    if value is None or isinstance(value, _dt.datetime):
        if value is not None and value.tzinfo is None:
            raise UsageError(f"time {value.isoformat()} has no time zone")
        return value
    from .names import parse_time
    return parse_time(value)


@dataclass
class _Audit:
    """The audit record of one call, filled in as the call goes."""

    details: dict = field(default_factory=dict)  # ``summary`` and more, added to the record's result
    result: Any = None  # what the call returns (an AuditNotWritten carries it)


class Repository:
    """A snapshotter repository and the configuration its sources come from.

    Open one with :meth:`open` (an existing repository) or :meth:`init`; use it
    as a context manager to close its store when done::

        with snapshotter.Repository.open(config="snapshotter.toml") as repo:
            manifest = repo.snapshot("agent-v42")
            plan = repo.restore(manifest["id"], dry_run=True)

    ``lock_wait``: seconds to wait for a lock another run holds before
    :class:`~snapshotter.errors.LockedError` (exit 4); 0 fails at once.
    ``warn``: called with each warning (default: the ``snapshotter`` logger);
    ``on_lock_wait`` and ``on_lock_lost``: with each lock message (default: ``warn``).
    """

    def __init__(self, config: "Config", core: "Core", *, lock_wait: float = 0.0, warn: Warn | None = None,
                 on_lock_wait: Warn | None = None, on_lock_lost: Warn | None = None):
        self.config = config
        #: the repository format (:class:`snapshotter.repository.Repository`), for the lower-level functions
        self.core = core
        self.lock_wait = lock_wait
        self.warn = warn or _log_warning
        self.on_lock_wait = on_lock_wait or self.warn
        self.on_lock_lost = on_lock_lost or self.warn
        #: whether :meth:`init` created the repository
        self.created = False
        self._lock_waited = 0.0

    # -- opening -----------------------------------------------------------------

    @staticmethod
    def _config(config: "str | os.PathLike | Config | None") -> "Config":
        from .config import Config, load_config
        if isinstance(config, Config):
            return config
        return load_config(os.fspath(config) if config is not None else None)

    @staticmethod
    def _store(cfg: "Config", url: str | None):
        from .objectstore import open_store
        where = url or cfg.repository_url
        if not where:
            raise UsageError("no repository: give --repo URL, set SNAPSHOTTER_REPO, or set [repository] url "
                             "in the config file")
        # a URL given apart from the file is relative to the working directory, the file's to its folder
        return open_store(where, endpoint_url=cfg.endpoint_url, region=cfg.region,
                          base_dir=None if url else cfg.base_dir, timeout=cfg.repository_timeout)

    @classmethod
    def open(cls, config: "str | os.PathLike | Config | None" = None, *, url: str | None = None,
             lock_wait: float = 0.0, warn: Warn | None = None, on_lock_wait: Warn | None = None,
             on_lock_lost: Warn | None = None) -> "Repository":
        """The repository of ``config`` (a config file's path, a :class:`~snapshotter.config.Config`, or
        None: ``$SNAPSHOTTER_CONFIG``, else ``./snapshotter.toml`` if there is one); ``url`` overrides its
        ``[repository] url``.  :class:`~snapshotter.errors.NotFound` when no repository is there."""
        from .repository import Repository as Core
        cfg = cls._config(config)
        core = Core.open(cls._store(cfg, url), compression_level=cfg.compression_level)
        return cls(cfg, core, lock_wait=lock_wait, warn=warn, on_lock_wait=on_lock_wait, on_lock_lost=on_lock_lost)

    @classmethod
    def init(cls, config: "str | os.PathLike | Config | None" = None, *, url: str | None = None,
             hash_name: str | None = None, lock_wait: float = 0.0, warn: Warn | None = None,
             on_lock_wait: Warn | None = None, on_lock_lost: Warn | None = None) -> "Repository":
        """Create the repository (idempotent: an existing one is opened; ``created`` says which).
        ``hash_name``: the content hash of a new repository (default: ``[repository] hash``, else
        blake3); an existing repository of another hash is refused (exit 2)."""
        from .repository import Repository as Core
        cfg = cls._config(config)
        store = cls._store(cfg, url)
        if hasattr(store, "ensure_bucket"):
            store.ensure_bucket()
        wanted = hash_name or cfg.hash
        core, created = Core.init(store, compression_level=cfg.compression_level, hash_name=wanted)
        if not created and (hash_name or cfg.hash_set) and core.hash != wanted:
            raise UsageError(f"repository {store.url} exists and uses hash {core.hash}, not {wanted}; "
                             f"a repository's hash cannot change (init a new one to use {wanted})")
        repo = cls(cfg, core, lock_wait=lock_wait, warn=warn, on_lock_wait=on_lock_wait, on_lock_lost=on_lock_lost)
        repo.created = created
        if created:
            with repo._audited("init", {"repository": store.url}) as audit:
                audit.details["summary"] = f"created repository {store.url}"
                audit.result = repo
        return repo

    @property
    def url(self) -> str:
        return self.core.store.url

    def close(self) -> None:
        self.core.store.close()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<snapshotter.Repository {self.url}>"

    # -- locks and the audit log ---------------------------------------------------

    def _lock(self, claims: dict[str, str] | None = None, *, exclusive: bool = False,
              command: str) -> "RepositoryLock":
        """Take the repository lock (shared unless ``exclusive``) plus ``claims``
        (:mod:`snapshotter.locks`), waiting up to ``lock_wait``; a context manager."""
        from .locks import acquire, repository_claims
        lock = acquire(self.core.store, {**repository_claims(exclusive=exclusive), **(claims or {})},
                       command=command, wait=self.lock_wait, on_wait=self.on_lock_wait, on_lost=self.on_lock_lost)
        # the audit record of the change made under this lock says how long it waited for other runs
        self._lock_waited = lock.waited
        return lock

    @contextlib.contextmanager
    def _audited(self, command: str, arguments: dict) -> Iterator[_Audit]:
        """Append an audit record for the block, however it ends: ``exit_code`` and
        ``summary`` (the error's message when it failed) plus the details filled in.

        When the block succeeded but the record cannot be appended, AuditNotWritten
        (carrying the block's result); when the block failed, its own exception, with
        the append's failure attached as ``audit_failure`` (and a note)."""
        from .audit import append_audit, check_appendable
        check_appendable(self.core)  # before the work: not a committed snapshot, then exit 1 for want of its record
        audit = _Audit()
        if self._lock_waited:
            audit.details["lock_waited_seconds"] = round(self._lock_waited, 3)
            self._lock_waited = 0.0
        try:
            yield audit
        except BaseException as exc:
            err = from_exception(exc)
            details = {k: v for k, v in audit.details.items() if k != "summary"}
            try:
                append_audit(self.core, command, arguments, {"exit_code": err.exit_code, "summary": err.message,
                                                             **details})
            except Exception as append_exc:
                late = _not_written(append_exc, None)
                with contextlib.suppress(Exception):
                    exc.audit_failure = late
                    exc.add_note(late.message)
            raise
        details = dict(audit.details)
        summary = details.pop("summary", None)
        try:
            append_audit(self.core, command, arguments, {"exit_code": 0, "summary": summary or "ok", **details})
        except Exception as exc:
            raise _not_written(exc, audit.result) from exc

    def audit(self, *, limit: int | None = None) -> list[dict]:
        """The audit log's records, newest first."""
        from .audit import read_audit
        return read_audit(self.core, limit=limit)

    def verify_audit(self) -> dict:
        """Check the audit log's hash chain: the report, or IntegrityError (exit 3, with the
        report as ``report``) when a record was edited, removed or reordered."""
        from .audit import verify_audit
        report = verify_audit(self.core)
        if not report["ok"]:
            first = report["problems"][0]
            _fail_with(report, f"audit log: {len(report['problems'])} problem(s); first: "
                               f"{first['object']}: {first['problem']}")
        return report

    def unlock(self, *, everything: bool = False) -> tuple[list["LockInfo"], list["LockInfo"]]:
        """Remove stale locks (``everything``: every lock, also those of running processes):
        returns (removed, kept)."""
        from .locks import remove_locks
        removed, kept = remove_locks(self.core.store, everything=everything)
        if removed:
            with self._audited("unlock", {"all": everything}) as audit:
                audit.details.update(summary=f"removed {len(removed)} lock(s)",
                                     removed=[f"{lock.name}: {lock.describe()}" for lock in removed])
                audit.result = (removed, kept)
        return removed, kept

    # -- snapshots ---------------------------------------------------------------------

    def snapshot(self, release: str, *, sources: Sequence[str] = (), labels: dict[str, str] | None = None,
                 note: str | None = None, progress: Callable[[str, int], None] | None = None) -> dict:
        """Capture every configured source (or ``sources``) as a snapshot of ``release``; returns
        its manifest.  Commits only when every source succeeded."""
        check_name("release", release)
        for s in sources:
            check_name("source", s)
        labels = dict(labels or {})
        for k, v in labels.items():
            check_name("label key", k)
            check_name("label value", v)
        from .locks import SHARED, source_resource
        from .snapshot import summary, take_snapshot
        # shared: snapshots run side by side, but not beside prune or a restore of the same source
        with self._lock({source_resource(n): SHARED for n in (sources or self.config.sources)}, command="snapshot"):
            with self._audited("snapshot", {"release": release, "sources": list(sources), "labels": labels,
                                            "note": note}) as audit:
                manifest = take_snapshot(self.core, self.config, release=release, sources=sources, labels=labels,
                                         note=note, progress=progress)
                s = summary(manifest)
                audit.details.update(snapshot=manifest.id, summary=f"snapshot {s['id']}: {s['records']} records, "
                                     f"{s['bytes_written']} bytes written, {s['bytes_reused']} reused")
                audit.result = manifest.doc
        return manifest.doc

    def snapshots(self, *, release: str | None = None, source: str | None = None,
                  limit: int | None = None) -> list[dict]:
        """Snapshots, newest first, as ``snapshotter list --json`` prints them.  A damaged
        manifest is left out with a warning (``verify`` reports it)."""
        if release:
            check_name("release", release)
        if source:
            check_name("source", source)
        from .snapshot import summary
        good = self.core.good_ids()
        rows = []

        def damaged(ref, exc) -> None:
            self.warn(f"warning: snapshot {ref.id} of release {ref.release} not listed: {exc.message} "
                      "(`verify` reports it)")

        for m in self.core.snapshots(release, damaged=damaged):
            if source and source not in m.sources:
                continue
            s = summary(m, good=m.id in good)
            rows.append({"id": s["id"], "release": s["release"], "taken_at": s["taken_at"], "good": s["good"],
                         "labels": s["labels"], "records": s["records"], "bytes": s["bytes"],
                         "sources": sorted(s["sources"]), "note": s["note"]})
            if limit and len(rows) >= limit:
                break
        return rows

    def manifest(self, snapshot: str) -> dict:
        """A snapshot's manifest as stored (``snapshot``: an id or a unique prefix of one)."""
        m = self.core.manifest(self.core.resolve(snapshot))
        self.core.check_digests(m)
        return m.doc

    def show(self, snapshot: str) -> dict:
        """One snapshot as ``snapshotter show --json`` prints it."""
        from .snapshot import summary
        ref = self.core.resolve(snapshot)
        m = self.core.manifest(ref)
        self.core.check_digests(m)
        return summary(m, good=ref.id in self.core.good_ids(), with_schema=True)

    def verify(self, snapshots: Iterable[str] = (), *, read_data: bool = False,
               progress: Callable[[int], None] | None = None) -> dict:
        """Every object the snapshots (default: all, and then the quarantine bundles too)
        reference is present, and with ``read_data`` intact.  Returns the report, or raises
        IntegrityError (exit 3, with the report as ``report``) when it found problems."""
        from .quarantine import incident_ids
        from .verify import verify
        names = [snapshots] if isinstance(snapshots, str) else list(snapshots)
        everything = not names
        refs = self.core.list_snapshot_refs() if everything else [self.core.resolve(s) for s in names]
        report = verify(self.core, refs, read_data=read_data, progress=progress,
                        incidents=incident_ids(self.core) if everything else ())
        if not report["ok"]:
            _fail_with(report, f"verify found {len(report['problems'])} problem(s)")
        return report

    def mark_good(self, snapshot: str, good: bool = True) -> dict:
        """Flag a snapshot known-good (what ``restore(release=...)`` picks), or with
        ``good=False`` remove the flag.  Returns ``{"snapshot", "release", "good"}``."""
        from .locks import MARKS, SHARED
        command = "mark-good" if good else "unmark-good"
        # the marks lock keeps forget from deleting a snapshot while it is being marked known-good
        with self._lock({MARKS: SHARED}, command=command):
            ref = self.core.resolve(snapshot)
            if good:
                # a snapshot that cannot be restored must not become what `restore --release` picks
                self.core.check_digests(self.core.manifest(ref))
            with self._audited(command, {"snapshot": ref.id, "release": ref.release}) as audit:
                audit.details["summary"] = f"{ref.id} {'marked known-good' if good else 'no longer marked known-good'}"
                self.core.mark_good(ref, good)
                audit.result = {"snapshot": ref.id, "release": ref.release, "good": good}
        return audit.result

    def unmark_good(self, snapshot: str) -> dict:
        return self.mark_good(snapshot, False)

    # -- retention -----------------------------------------------------------------------

    def forget(self, *, keep_last: int = 0, keep_hourly: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
               keep_monthly: int = 0, keep_releases: Sequence[str] = (), dry_run: bool = False) -> "ForgetPlan":
        """Drop snapshot manifests no rule keeps (known-good snapshots, those an incident
        refers to, and incident bundles are always kept); chunks are freed by :meth:`prune`.
        Returns the plan: ``keep`` and ``remove``, each with its reasons."""
        from . import retention
        from .locks import EXCLUSIVE, MARKS
        counts = {"keep_last": keep_last, "keep_hourly": keep_hourly, "keep_daily": keep_daily,
                  "keep_weekly": keep_weekly, "keep_monthly": keep_monthly}
        for name, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise UsageError(f"forget: {name} must be a count (got {n!r})")
        if isinstance(keep_releases, str):
            raise UsageError("forget: keep_releases is a list of releases, not one string")
        for r in keep_releases:
            check_name("release", r)
        policy = retention.RetentionPolicy(last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly,
                                           monthly=keep_monthly, releases=tuple(keep_releases))
        if policy.empty:
            raise UsageError("forget needs at least one --keep-* rule (it will not forget every snapshot)")
        if keep_releases:
            present = {ref.release for ref in self.core.list_snapshot_refs()}
            unknown = [r for r in keep_releases if r not in present]
            if present and len(unknown) == len(keep_releases) and not any(counts.values()):
                # a misspelt release would keep nothing: the same as forgetting with no rule at all
                raise UsageError(f"forget: no snapshot of release(s) {', '.join(map(repr, keep_releases))} in the "
                                 f"repository, so every snapshot not known-good would go; nothing forgotten "
                                 f"(releases: {', '.join(sorted(present))})")
            if present and unknown:
                self.warn(f"warning: --keep-release {', '.join(map(repr, unknown))}: no snapshot of that release")
        if dry_run:
            return retention.plan_forget(self.core, policy, warn=self.warn)
        # exclusive on the marks only: snapshots may go on, a mark-good may not slip in between plan and delete
        with self._lock({MARKS: EXCLUSIVE}, command="forget") as lock:
            plan = retention.plan_forget(self.core, policy, warn=self.warn)
            with self._audited("forget", {"policy": policy.to_json()}) as audit:
                retention.forget(self.core, plan, check=lock.check)
                audit.details.update(summary=f"forgot {len(plan.remove)} snapshot(s), kept {len(plan.keep)}",
                                     forgotten=[d.id for d in plan.remove])
                audit.result = plan
        return plan

    def prune(self, *, grace: "str | _dt.timedelta" = "1h", dry_run: bool = False,
              progress: Callable[[int], None] | None = None) -> dict:
        """Delete chunks no snapshot or incident references that are older than ``grace``
        (``"30m"``, ``"2h"``, ``"0"`` or a timedelta); returns the report.  Takes the exclusive
        lock: LockedError (exit 4) while any snapshot or restore runs."""
        from . import retention
        if isinstance(grace, _dt.timedelta):
            grace_td, grace_text = grace, f"{grace.total_seconds():g}s"
        else:
            from .names import parse_duration
            grace_td, grace_text = parse_duration(grace), grace
        with self._lock(exclusive=True, command="prune") as lock:
            if dry_run:
                return retention.prune(self.core, grace=grace_td, dry_run=True, check=lock.check, progress=progress)
            with self._audited("prune", {"grace": grace_text}) as audit:
                report = retention.prune(self.core, grace=grace_td, check=lock.check, progress=progress)
                audit.details.update(summary=f"deleted {report['deleted_chunks']} chunk(s), "
                                             f"{report['bytes_freed']} bytes",
                                     deleted_chunks=report["deleted_chunks"], bytes_freed=report["bytes_freed"])
                audit.result = report
        return report

    # -- diff and restore ---------------------------------------------------------------

    def _resolve(self, snapshot: str | None, release: str | None, before: _dt.datetime | None, sel) -> dict:
        from .restore import not_configured, resolve_snapshot
        manifest = resolve_snapshot(self.core, snapshot, release, before, warn=self.warn)
        gone = not_configured(manifest, self.config, sel)
        if gone:
            self.warn(f"warning: snapshot {manifest['id']} holds source(s) {', '.join(map(repr, gone))}, which the "
                      f"config file no longer has: not compared or restored")
        return manifest

    def _warn_missing(self, result: "RestoreResult") -> None:
        if result.missing_sources:
            self.warn(f"warning: snapshot {result.snapshot['id']} does not hold source(s) "
                      f"{', '.join(map(repr, result.missing_sources))} of the config file: not compared; a restore "
                      f"of it is refused unless --source leaves them out")

    @staticmethod
    def _selection(sources: Sequence[str], streams: Sequence[str], sessions: Sequence[str]):
        from .restore import Selection
        for name, value in (("sources", sources), ("streams", streams), ("sessions", sessions)):
            if isinstance(value, str):
                raise UsageError(f"{name} is a list of names, not one string")
        for s in sources:
            check_name("source", s)
        return Selection(list(sources), list(streams), list(sessions))

    def diff(self, snapshot: str, *, sources: Sequence[str] = (), streams: Sequence[str] = (),
             sessions: Sequence[str] = (), progress: "Callable[[str, int, int | None], None] | None" = None
             ) -> "RestoreResult":
        """Live state against a snapshot: what a restore would change and quarantine (a
        :class:`~snapshotter.restore.RestoreResult`; ``to_json()`` is ``diff --json``).
        ``progress``: as :meth:`restore` takes it."""
        from .restore import restore
        sel = self._selection(sources, streams, sessions)
        with self._lock(command="diff"):
            manifest = self._resolve(snapshot, None, None, sel)
            result = restore(self.core, self.config, manifest, sel, dry_run=True, progress=progress)
        self._warn_missing(result)
        return result

    def restore(self, snapshot: str | None = None, *, release: str | None = None,
                before: "str | _dt.datetime | None" = None, sources: Sequence[str] = (),
                streams: Sequence[str] = (), sessions: Sequence[str] = (), incident: str | None = None,
                failure_at: "str | _dt.datetime | None" = None, dry_run: bool = False,
                create_missing: bool = False, trust_repository_sql: bool = False,
                confirm: "Callable[[RestoreResult], bool] | None" = None,
                progress: "Callable[[str, int, int | None], None] | None" = None) -> "RestoreResult":
        """Put the live stores back to a snapshot (an id or prefix, or ``release``'s newest
        known-good one, taken ``before`` a time), quarantining every later write first.

        Times are datetimes with a zone or the CLI's TIME text (ISO 8601, ``2h``).  With
        ``dry_run`` only the plan is made.  ``confirm``: called with the plan before anything is
        written (when it changes anything); False refuses (Refused, exit 6, nothing written).
        The plan restored is then the one confirmed: a live store that changed in between is
        refused too.  Without ``confirm`` the restore goes ahead (the CLI's ``--yes``).

        ``progress(step, n, total)``: called as the work goes, ``n`` more records done in ``step``
        (``plan SOURCE/STREAM``, ``plan and quarantine …``, ``write …``, ``delete …``,
        ``verify``); a new step starts from 0, ``total`` its size when known, else None.

        Takes the sources it writes exclusively (LockedError, exit 4, while another run
        holds them) and appends a ``restore`` audit record, also when it fails."""
        from .restore import missing_sources, refuse_missing_sources, restore
        if release:
            check_name("release", release)
        if incident:
            check_name("incident", incident)
        sel = self._selection(sources, streams, sessions)
        before_t, failure_t = _time(before), _time(failure_at)
        cfg = replace(self.config, create_missing=True) if create_missing else self.config
        manifest = self._resolve(snapshot, release, before_t, sel)
        if dry_run:
            with self._lock(command="restore"):
                result = restore(self.core, cfg, manifest, sel, dry_run=True, failure_at=failure_t,
                                 trust_repository_sql=trust_repository_sql, progress=progress)
            self._warn_missing(result)
            return result

        from .locks import EXCLUSIVE, source_resource
        from .names import iso
        refuse_missing_sources(manifest, missing_sources(manifest, cfg, sel))
        written = sel.sources or [s for s in manifest.get("sources", {}) if s in cfg.sources]
        with self._lock({source_resource(s): EXCLUSIVE for s in written}, command="restore"):
            arguments = {"snapshot": manifest["id"], "release": manifest["release"], "sources": list(sel.sources),
                         "streams": list(sel.streams), "sessions": list(sel.sessions), "incident": incident,
                         "failure_at": iso(failure_t) if failure_t else None}
            with self._audited("restore", arguments) as audit:
                same_plan = None
                if confirm is not None:
                    same_plan = self._confirm_restore(cfg, manifest, sel, incident, failure_t, trust_repository_sql,
                                                      confirm, progress)
                result = restore(self.core, cfg, manifest, sel, incident=incident, failure_at=failure_t,
                                 confirm=same_plan, trust_repository_sql=trust_repository_sql, progress=progress)
                audit.details.update(
                    summary=(f"restored {manifest['id']}: {result.quarantined} record(s) quarantined as "
                             f"incident {result.incident}" if result.incident else
                             f"restored {manifest['id']}: live state already equal, nothing quarantined"),
                    snapshot=manifest["id"], incident=result.incident, plan=result.to_json()["plan"],
                    quarantined=result.quarantined, verified=result.verified)
                audit.result = result
        return result

    def _confirm_restore(self, cfg, manifest, sel, incident, failure_t, trust_sql,
                         confirm: Callable, progress: Callable | None = None) -> Callable:
        """Ask ``confirm`` with a plan made before any write transaction is open (so the
        agent's writers are never held while someone reads it); returns the check the
        restore makes, inside its transactions, that its plan is the one confirmed."""
        from .quarantine import bundle_object
        from .restore import restore
        if incident and self.core.store.stat(bundle_object(incident)) is not None:
            raise UsageError(f"incident {incident!r} already exists; choose another --incident")
        preview = restore(self.core, cfg, manifest, sel, dry_run=True, failure_at=failure_t,
                          trust_repository_sql=trust_sql, progress=progress)
        if (preview.changes or preview.settings) and not confirm(preview):
            raise Refused("restore not confirmed; nothing was written")

        def same_plan(result) -> bool:
            if result.fingerprint() != preview.fingerprint():
                then = (f"the plan you confirmed ({preview.changes} record(s))" if preview.changes else
                        "the check a moment ago (it equaled the snapshot)")
                now = (f"{result.changes} record(s) differ now" if result.changes != preview.changes else
                       "a record it changes was written again")
                raise Refused(f"the live state changed since {then}: {now}; nothing "
                              f"was written. Is the agent still writing? Stop it and run the restore again, or pass "
                              f"--yes to restore whatever differs when the restore runs")
            return True
        return same_plan

    # -- quarantine ----------------------------------------------------------------------

    @cached_property
    def quarantine(self) -> "Quarantine":
        """The incidents of past restores: list, show, diff, export, report, reapply."""
        return Quarantine(self)


class Quarantine:
    """The quarantined writes of a repository's incidents (``repo.quarantine``).

    The filters (``source``, ``stream``, ``ops``, ``post_failure``, ``sessions``, ``limit``)
    are those of ``snapshotter quarantine show``."""

    def __init__(self, repo: Repository):
        self.repo = repo
        self._bundles: dict[str, IncidentBundle] = {}  # a bundle is written once: read once

    def incidents(self, *, limit: int | None = None) -> list[dict]:
        """Incidents, newest first, as ``quarantine list --json`` prints them."""
        from .forensics import count_post_failure
        from .quarantine import incident_bundles, incident_status, op_counts, replaced_settings
        core = self.repo.core
        rows = []
        for b in incident_bundles(core):
            status = incident_status(core, b.incident)
            rows.append({
                "incident": b.incident, "snapshot": b.snapshot, "release": b.release,
                "created_at": b.created_at, "records": b.records, "failure_at": b.failure_at,
                "post_failure": count_post_failure(core, b.doc), "counts": op_counts(b), "status": status["status"],
                "verified": status["verified"], "user": b.user, "host": b.host,
                "sources": sorted(b.sources), "settings": replaced_settings(b),
            })
            if limit and len(rows) >= limit:
                break
        return rows

    def bundle(self, incident: str) -> dict:
        """The incident's bundle manifest (what was restored, by whom, per stream the counts)."""
        return self._bundle(incident).doc

    def _bundle(self, incident: str) -> IncidentBundle:
        from .quarantine import open_bundle
        check_name("incident", incident)
        if incident not in self._bundles:
            self._bundles[incident] = open_bundle(self.repo.core, incident)
        return self._bundles[incident]

    @staticmethod
    def _filter(source, stream, ops, post_failure, sessions, limit):
        from .forensics import RecordFilter
        if source:
            check_name("source", source)
        # None is "no filter", as leaving the argument out is
        return RecordFilter(source=source, stream=stream, ops=tuple(ops or ()), post_failure=bool(post_failure),
                            sessions=tuple(sessions or ()), limit=limit)

    def records(self, incident: str, *, source: str | None = None, stream: str | None = None,
                ops: Sequence[str] = (), post_failure: bool = False, sessions: Sequence[str] = (),
                limit: int | None = None) -> Iterator[tuple[str, str, "StoredRecord"]]:
        """(source, stream, record) for each quarantined record the filters keep; a record's
        ``value`` holds ``op``, ``value``, ``snapshot_value``, ``post_failure``, ``written_at``."""
        from .forensics import select_records
        flt = self._filter(source, stream, ops, post_failure, sessions, limit)
        return select_records(self.repo.core, self.bundle(incident), flt)

    def show(self, incident: str, **filters) -> list[dict]:
        """Quarantined records as ``quarantine show --json`` prints them."""
        from .quarantine import record_json
        return [record_json(s, st, rec) for s, st, rec in self.records(incident, **filters)]

    def diff(self, incident: str, key: Any, *, source: str | None = None, stream: str | None = None) -> dict:
        """Field-level diff of one record, snapshot version against quarantined live version
        (``quarantine diff --json``).  ``key``: the key (``44``, ``["sess-2", 3]``), or text read
        as the command line reads KEY (JSON text, else the text itself: ``"kb-3"``, ``"44"``)."""
        from .forensics import locate, record_diff
        if source:
            check_name("source", source)
        bundle = self.bundle(incident)
        (loc,) = locate(self.repo.core, bundle, [_key_text(key)], source=source, stream=stream)
        return record_diff(bundle, loc.source, loc.stream, loc.record)

    def export(self, incident: str, path: str | os.PathLike, *, format: str, csv_raw: bool = False,
               source: str | None = None, stream: str | None = None, ops: Sequence[str] = (),
               post_failure: bool = False, sessions: Sequence[str] = (), limit: int | None = None) -> int:
        """Write the records to ``path`` (replaced atomically) as ``jsonl``, ``parquet`` or ``csv``;
        returns how many.  CSV text cells that a spreadsheet would run as a formula get a
        leading ``'`` unless ``csv_raw``."""
        from .forensics import export_records
        flt = self._filter(source, stream, ops, post_failure, sessions, limit)
        return export_records(self.repo.core, self.bundle(incident), flt, format, os.fspath(path), csv_raw=csv_raw)

    def report(self, incident: str, path: str | os.PathLike, *, max_records: int | None = None) -> dict:
        """Write one self-contained HTML page for reviewers to ``path``; returns its summary."""
        from .report import MAX_RECORDS, write_report
        return write_report(self.repo.core, self._bundle(incident), os.fspath(path),
                            max_records=MAX_RECORDS if max_records is None else max_records)

    def reapply(self, incident: str, keys: Iterable[Any], *, source: str | None = None, stream: str | None = None,
                force: bool = False, confirm: "Callable[[list], bool] | None" = None) -> list[dict]:
        """Write chosen quarantined records back to the live stores (added and modified ones
        get their quarantined value again, deleted ones are deleted again); returns what was
        written.  A record changed in the live store since the restore is refused (Refused,
        exit 6, nothing written) unless ``force``.  ``confirm``: called with the records found
        (:class:`~snapshotter.forensics.Located`) before anything is locked or written; False
        refuses.  Takes the sources it writes exclusively and appends a
        ``quarantine reapply`` audit record."""
        from .forensics import locate
        from .restore import reapply
        from .locks import EXCLUSIVE, source_resource
        if source:
            check_name("source", source)
        if isinstance(keys, (str, bytes)):
            raise UsageError("keys is a list of keys, not one key")
        key_texts = [_key_text(k) for k in keys]
        if not key_texts:
            raise UsageError("reapply: name at least one key")
        bundle = self.bundle(incident)
        found = locate(self.repo.core, bundle, key_texts, source=source, stream=stream)
        if confirm is not None and not confirm(found):
            raise Refused("reapply not confirmed; nothing was written")
        claims = {source_resource(s): EXCLUSIVE for s in sorted({loc.source for loc in found})}
        # "quarantine": the command a lock names is the program's command, as `quarantine reapply` always named it
        with self.repo._lock(claims, command="quarantine"):
            with self.repo._audited("quarantine reapply", {"incident": incident, "keys": key_texts, "source": source,
                                                           "stream": stream, "force": force}) as audit:
                done = reapply(self.repo.config, bundle, found, force=force)
                audit.details.update(summary=f"re-applied {len(done)} record(s) of incident {incident}",
                                     incident=incident, reapplied=done)
                audit.result = done
        return done


def _key_text(key: Any) -> str:
    """A record key as the command line gives it: text as it is, anything else as its JSON."""
    if isinstance(key, str):
        return key
    import json
    return json.dumps(key, ensure_ascii=False)


def _not_written(exc: BaseException, result: Any) -> AuditNotWritten:
    text = exc.message if isinstance(exc, SnapshotterError) else str(exc)
    return AuditNotWritten(f"the audit record could not be written: {text}",
                           exit_code=getattr(exc, "exit_code", 1), result=result)


def _fail_with(report: dict, message: str) -> None:
    err = IntegrityError(message)
    err.report = report  # what was found, for a caller to show
    raise err
