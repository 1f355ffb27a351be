"""forget, prune, unlock, audit: keeping a repository in shape between snapshots."""
from __future__ import annotations

import click

from ..errors import UsageError
from ..names import check_name, parse_duration, printable
from . import App, checked, cli, pass_app
from .repo_cmds import human_bytes


@cli.command()
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N", help="Keep the N newest snapshots.")
@click.option("--keep-hourly", type=click.IntRange(min=1), metavar="N",
              help="Keep the newest snapshot of each of the last N hours that have one (UTC).")
@click.option("--keep-daily", type=click.IntRange(min=1), metavar="N", help="The same per day.")
@click.option("--keep-weekly", type=click.IntRange(min=1), metavar="N", help="The same per ISO week.")
@click.option("--keep-monthly", type=click.IntRange(min=1), metavar="N", help="The same per month.")
@click.option("--keep-release", "keep_release", multiple=True, metavar="R",
              help="Keep every snapshot of release R (repeatable).")
@click.option("--dry-run", is_flag=True, help="Only list what would be forgotten.")
@pass_app
def forget(app: App, keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_release, dry_run):
    """Drop snapshot manifests by policy; known-good snapshots and quarantine bundles are always kept.

    A snapshot stays when any --keep-* rule keeps it.  Chunks are freed later by `prune`.
    """
    for r in keep_release:
        check_name("release", r)
    if not (keep_last or keep_hourly or keep_daily or keep_weekly or keep_monthly or keep_release):
        raise UsageError("forget needs at least one --keep-* rule (it will not forget every snapshot)")
    plan = app.call(app.api.forget, keep_last=keep_last or 0, keep_hourly=keep_hourly or 0,
                    keep_daily=keep_daily or 0, keep_weekly=keep_weekly or 0, keep_monthly=keep_monthly or 0,
                    keep_releases=keep_release, dry_run=dry_run)
    doc = {"dry_run": dry_run, "keep": [d.to_json() for d in plan.keep], "remove": [d.to_json() for d in plan.remove]}

    def human():
        verb = "would forget" if dry_run else "forgot"
        for d in plan.remove:
            app.info(f"{verb} {d.id}  {d.release}  {printable(d.taken_at, 40)}")
        if app.verbose:
            for d in plan.keep:
                app.info(f"keep   {d.id}  {d.release}  {printable(d.taken_at, 40)}  ({', '.join(d.reasons)})")
        app.info(f"{verb} {len(plan.remove)} snapshot(s), kept {len(plan.keep)}")
    app.out(doc, human)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--grace", default="1h", show_default=True, metavar="DURATION",
              help="Keep unreferenced chunks younger than this (e.g. 30m, 2h, 1d; 0 for none).")
@pass_app
def prune(app: App, dry_run, grace):
    """Delete chunks that no snapshot or incident references and that are older than the grace period.

    Takes the exclusive lock: fails (exit 4) while any snapshot or restore runs.
    """
    parse_duration(grace)  # before the repository is opened
    api = app.api
    with app.progress_bar("deleting chunks") as bar:
        report = app.call(api.prune, grace=grace, dry_run=dry_run, progress=bar.advance)

    def human():
        verb = "would delete" if dry_run else "deleted"
        app.info(f"{verb} {report['deleted_chunks']} unreferenced chunk(s), {human_bytes(report['bytes_freed'])} "
                 f"({report['referenced_chunks']} referenced by {report['snapshots']} snapshot(s) and "
                 f"{report['quarantine_objects']} quarantine object(s); {report['kept_recent_chunks']} kept, "
                 f"younger than {grace})")
    app.out(report, human)


@cli.command()
@click.option("--stale", "mode", flag_value="stale", default=True,
              help="Remove only stale locks: expired, or left by a process on this host that is gone (default).")
@click.option("--all", "mode", flag_value="all",
              help="Remove every lock, including those of running processes; only when none runs anywhere.")
@pass_app
def unlock(app: App, mode):
    """Remove locks left by dead processes."""
    removed, kept = app.call(app.api.unlock, everything=mode == "all")
    doc = {"removed": [l.to_json() for l in removed], "kept": [l.to_json() for l in kept]}

    def human():
        for l in removed:
            app.info(f"removed {l.name}: {l.describe()}")
        for l in kept:
            app.info(f"kept    {l.name}: {l.describe()} (not stale)")
        app.info(f"removed {len(removed)} lock(s), {len(kept)} left")
    app.out(doc, human)


@cli.group(invoke_without_command=True)
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N records.")
@click.pass_context
def audit(ctx: click.Context, limit):
    """The operations log, newest first; `audit verify` checks its hash chain."""
    if ctx.invoked_subcommand is not None:
        return
    app = ctx.find_object(App)
    records = app.api.audit(limit=limit)

    def human():
        if not records:
            app.info("the audit log is empty")
            return
        for r in records:
            if "error" in r:
                click.echo(f"{r['seq']:>6}  {r['error']}")
                continue
            # a record's fields are shown one line each, whatever an editor of the log put in them
            res = r.get("result") if isinstance(r.get("result"), dict) else {}
            click.echo(f"{printable(r.get('seq'), 12):>6}  {printable(r.get('time', '?'))[:19]}Z  {printable(r.get('user'), 64)}@"
                       f"{printable(r.get('host'), 128)}  {printable(r.get('command'), 64)}  "
                       f"exit {printable(res.get('exit_code'), 8)}  {printable(res.get('summary', ''), 500)}")
    app.out(records, human)


@audit.command("verify")
@pass_app
def audit_verify(app: App):
    """Check the hash chain: exit 3 when a record was edited, removed or reordered."""
    report, failed = checked(app.api.verify_audit)

    def human():
        if report["ok"]:
            head = report["head"]
            app.info(f"ok: {report['records']} record(s), chain intact"
                     + (f"; head {head['seq']} {printable(head['hash'], 80)}" if head else ""))
        else:
            for p in report["problems"]:
                click.echo(f"{printable(p['object'])}: {printable(p['problem'], 500)}", err=True)
    app.out(report, human)
    if failed is not None:
        raise failed
