"""diff and restore."""
from __future__ import annotations

import sys

import click

from ..errors import Refused, UsageError
from ..names import check_name, iso, parse_time, utcnow
from ..quarantine import bundle_object
from ..restore import (RestoreResult, Selection, missing_sources, not_configured, refuse_missing_sources,
                       resolve_snapshot, restore as run_restore)
from . import App, cli, pass_app


def selection_options(f):
    f = click.option("--session", "sessions", multiple=True, metavar="ID",
                     help="Only these conversation sessions (repeatable).")(f)
    f = click.option("--stream", "streams", multiple=True, metavar="NAME",
                     help="Only these streams: tables, collections (repeatable).")(f)
    f = click.option("--source", "sources", multiple=True, metavar="NAME", help="Only these sources (repeatable).")(f)
    return f


def _selection(sources, streams, sessions) -> Selection:
    for s in sources:
        check_name("source", s)
    return Selection(list(sources), list(streams), list(sessions))


def print_plan(result: RestoreResult, *, title: str) -> None:
    m = result.snapshot
    click.echo(f"{title} snapshot {m['id']} (release {m['release']}, taken {m['taken_at']})")
    click.echo(f"  {'SOURCE/STREAM':<40} {'ADDED':>8} {'MODIFIED':>9} {'DELETED':>8}")
    for source, streams in result.plans.items():
        for stream, p in streams.items():
            mark = "  (missing: will be recreated)" if p.live_missing else \
                f"  ({', '.join(p.settings)} differs)" if p.settings else ""
            click.echo(f"  {source + '/' + stream:<40} {p.added:>8} {p.modified:>9} {p.deleted:>8}{mark}")
            if p.not_recreated:
                click.echo(f"    not recreated (stored as SQL text; --trust-repository-sql replays it): "
                           f"{', '.join(p.not_recreated)}")
    for source, why in result.refusals.items():
        click.echo(f"  note: a restore of this plan would be refused: {why}")
    for source, deps in result.dependencies.items():
        for stream, others in deps.items():
            click.echo(f"  note: {source}/{stream} is referenced by {', '.join(others)} (not selected): a restore "
                       f"deleting rows they still reference is refused; add --stream {' --stream '.join(others)}")
    total = result.changes
    settings = result.settings
    if settings:
        click.echo(f"  {total} record(s) differ; settings differ: {'; '.join(settings)}")
    else:
        click.echo(f"  {total} record(s) differ" + ("" if total else ": live state equals the snapshot"))


@cli.command()
@click.argument("snapshot")
@selection_options
@pass_app
def diff(app: App, snapshot, sources, streams, sessions):
    """Live state vs snapshot: what a restore would change and quarantine."""
    sel = _selection(sources, streams, sessions)
    repo = app.repo
    with app.lock():
        manifest = resolve_snapshot(repo, snapshot, None, None)
        _warn_not_configured(app, manifest, sel)
        result = run_restore(repo, app.config, manifest, sel, dry_run=True)
    _warn_missing(app, result)
    app.out(result.to_json(), lambda: print_plan(result, title="live state against"))


def _warn_missing(app: App, result: RestoreResult) -> None:
    if result.missing_sources:
        app.warn(f"warning: snapshot {result.snapshot['id']} does not hold source(s) "
                 f"{', '.join(map(repr, result.missing_sources))} of the config file: not compared; a restore of it "
                 f"is refused unless --source leaves them out")


def _warn_not_configured(app: App, manifest: dict, sel) -> None:
    gone = not_configured(manifest, app.config, sel)
    if gone:
        app.warn(f"warning: snapshot {manifest['id']} holds source(s) {', '.join(map(repr, gone))}, which the config "
                 f"file no longer has: not compared or restored")


@cli.command()
@click.argument("snapshot", required=False)
@click.option("--release", help="Restore this release's newest known-good snapshot (else its newest).")
@click.option("--before", metavar="TIME",
              help="With --release: only snapshots taken before TIME (ISO 8601, local time without a zone; or 2h).")
@selection_options
@click.option("--incident", metavar="ID", help="Name the incident (default: generated).")
@click.option("--failure-at", metavar="TIME",
              help="When the agent went wrong (ISO 8601, local time without a zone; or 2h): later writes are "
                   "flagged post_failure.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--create-missing", is_flag=True,
              help="Recreate a SQLite database file that is gone (and its tables); without it a SQLite url "
                   "naming a missing file is refused.")
@click.option("--trust-repository-sql", "trust_sql", is_flag=True,
              help="A dropped table is recreated with the SQL text the repository stores (defaults, checks, "
                   "index definitions, triggers): only for a repository nobody else can write.")
@pass_app
def restore(app: App, snapshot, release, before, sources, streams, sessions, incident, failure_at, dry_run, yes,
            create_missing, trust_sql):
    """Put the live stores back to a snapshot, quarantining every later write first.

    A SQLite database file that no longer exists is refused (exit 2), unless
    --create-missing is given: the restore then creates it and recreates its tables."""
    if release:
        check_name("release", release)
    if incident:
        check_name("incident", incident)
    sel = _selection(sources, streams, sessions)
    before_t = parse_time(before) if before else None
    failure_t = parse_time(failure_at) if failure_at else None
    if before and not release:
        raise click.UsageError("--before goes with --release")
    if failure_t is not None and failure_t > utcnow():
        app.warn(f"warning: --failure-at {failure_at} ({iso(failure_t)}) is in the future (now {iso(utcnow())}), so "
                 f"no write is flagged post_failure; a time without a zone is local time")
    interactive = sys.stdin.isatty() and not app.json
    if not dry_run and not yes and not interactive:
        raise Refused("restore changes live stores: pass --yes (no terminal to confirm on)")
    if create_missing:
        app.config.create_missing = True
    repo = app.repo
    manifest = resolve_snapshot(repo, snapshot, release, before_t, warn=app.warn)
    _warn_not_configured(app, manifest, sel)

    preview: list[RestoreResult] = []

    def confirm(result: RestoreResult) -> bool:
        """Called inside the write transactions, with the plan made there: it must be the
        plan the person confirmed (asked before any transaction was open, so the agent's
        writers were never held while someone read)."""
        if yes or (not preview and result.changes == 0 and not result.settings):
            return True
        if result.fingerprint() != preview[0].fingerprint():
            then = (f"the plan you confirmed ({preview[0].changes} record(s))" if preview[0].changes else
                    "the check a moment ago (it equaled the snapshot)")
            raise Refused(f"the live state changed since {then}: {result.changes} record(s) differ now; nothing "
                          f"was written. Is the agent still writing? Stop it and run the restore again, or pass "
                          f"--yes to restore whatever differs when the restore runs")
        return True

    if dry_run:
        with app.lock():
            result = run_restore(repo, app.config, manifest, sel, dry_run=True, failure_at=failure_t,
                                 trust_repository_sql=trust_sql)
        _warn_missing(app, result)
    else:
        refuse_missing_sources(manifest, missing_sources(manifest, app.config, sel))
        from ..locks import EXCLUSIVE, source_resource
        written = sel.sources or [s for s in manifest.get("sources", {}) if s in app.config.sources]
        with app.lock({source_resource(s): EXCLUSIVE for s in written}, command="restore"):
            audit = app.audited({"snapshot": manifest["id"], "release": manifest["release"], "sources": list(sel.sources),
                                 "streams": list(sel.streams), "sessions": list(sel.sessions), "incident": incident,
                                 "failure_at": iso(failure_t) if failure_t else None}, command="restore")
            if not yes:
                if incident and repo.store.stat(bundle_object(incident)) is not None:
                    raise UsageError(f"incident {incident!r} already exists; choose another --incident")
                preview.append(run_restore(repo, app.config, manifest, sel, dry_run=True, failure_at=failure_t,
                                 trust_repository_sql=trust_sql))
                if preview[0].changes or preview[0].settings:
                    print_plan(preview[0], title="restore to")
                    also = " (and put back the settings above)" if preview[0].settings else ""
                    if not click.confirm(f"quarantine {preview[0].changes} record(s) as an incident and restore{also}?",
                                         default=False, err=True):
                        raise Refused("restore not confirmed; nothing was written")
            result = run_restore(repo, app.config, manifest, sel, incident=incident, failure_at=failure_t,
                                 confirm=confirm, trust_repository_sql=trust_sql)
            audit.update(summary=(f"restored {manifest['id']}: {result.quarantined} record(s) quarantined as "
                                  f"incident {result.incident}" if result.incident else
                                  f"restored {manifest['id']}: live state already equal, nothing quarantined"),
                         snapshot=manifest["id"], incident=result.incident, plan=result.to_json()["plan"],
                         quarantined=result.quarantined, verified=result.verified)
    app.results["restore"] = result.to_json()
    app.results["release"] = manifest["release"]

    def human():
        if dry_run:
            print_plan(result, title="dry run: restore to")
            return
        if result.incident is None:
            app.info(f"live state already equals snapshot {manifest['id']}: nothing changed, nothing quarantined")
            return
        app.info(f"restored snapshot {manifest['id']}: {result.quarantined} record(s) quarantined as incident "
                 f"{result.incident}; verified")
        if result.continues:
            app.info(f"earlier unfinished restore(s) of this snapshot: {', '.join(result.continues)} "
                     f"(their bundles keep the original values)")
    app.out(result.to_json(), human)
