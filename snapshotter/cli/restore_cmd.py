"""diff and restore."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from ..errors import Refused
from ..forensics.table import one_line, pad
from ..names import check_name, iso, parse_time, utcnow
from . import App, ask, cli, pass_app

if TYPE_CHECKING:
    from ..restore import RestoreResult


def selection_options(f):
    f = click.option("--session", "sessions", multiple=True, metavar="ID",
                     help="Only these conversation sessions (repeatable).")(f)
    f = click.option("--stream", "streams", multiple=True, metavar="NAME",
                     help="Only these streams: tables, collections (repeatable).")(f)
    f = click.option("--source", "sources", multiple=True, metavar="NAME", help="Only these sources (repeatable).")(f)
    return f


def _check_sources(sources) -> None:
    for s in sources:
        check_name("source", s)


def print_plan(result: RestoreResult, *, title: str) -> None:
    m = result.snapshot
    click.echo(f"{title} snapshot {m['id']} (release {m['release']}, taken {m['taken_at']})")
    click.echo(f"  {'SOURCE/STREAM':<40} {'ADDED':>8} {'MODIFIED':>9} {'DELETED':>8}")
    for source, streams in result.plans.items():
        for stream, p in streams.items():
            mark = "  (missing: will be recreated)" if p.live_missing else \
                f"  ({', '.join(p.settings)} differs)" if p.settings else ""
            name = pad(one_line(f"{source}/{stream}"), 40)  # terminal cells: a wide name keeps the columns
            click.echo(f"  {name} {p.added:>8} {p.modified:>9} {p.deleted:>8}{mark}")
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
    _check_sources(sources)
    with app.progress_bar("diff") as bar:
        result = app.api.diff(snapshot, sources=sources, streams=streams, sessions=sessions,
                              progress=bar.step if bar.enabled else None)
    app.out(result.to_json(), lambda: print_plan(result, title="live state against"))


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
    _check_sources(sources)
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

    def confirm(plan: RestoreResult) -> bool:
        """Asked before any write transaction is open, so the agent's writers are never held
        while someone reads; the restore then refuses a plan other than this one."""
        bar.pause()  # off the terminal while the plan is read and the question asked
        print_plan(plan, title="restore to")
        also = " (and put back the settings above)" if plan.settings else ""
        return ask(f"quarantine {plan.changes} record(s) as an incident and restore{also}?")

    # per stream: plan (and quarantine), write, verify; stderr, on a terminal only
    with app.progress_bar("restore") as bar:
        result = app.call(app.api.restore, snapshot, release=release, before=before_t, sources=sources,
                          streams=streams, sessions=sessions, incident=incident, failure_at=failure_t,
                          dry_run=dry_run, create_missing=create_missing, trust_repository_sql=trust_sql,
                          confirm=None if yes else confirm, progress=bar.step if bar.enabled else None)
    manifest = result.snapshot
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

