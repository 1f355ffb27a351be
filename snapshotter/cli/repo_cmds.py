"""init, list, show, verify, mark-good, unmark-good, backends."""
from __future__ import annotations

import click

from .. import hashing
from ..errors import UsageError
from ..names import check_name, printable
from ..names import printable as p
from . import App, checked, cli, pass_app


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cli.command()
@click.option("--hash", "hash_name", type=click.Choice(hashing.ALGORITHMS),
              help="Content hash of a new repository (default: [repository] hash, else blake3); "
                   "an existing repository keeps its own.")
@pass_app
def init(app: App, hash_name):
    """Create the repository (idempotent)."""
    from ..api import Repository
    repo = app.call(Repository.init, app.config, url=app.repo_url, hash_name=hash_name, **app.api_options())
    app.out({"repository": repo.url, "created": repo.created, "id": repo.core.config.get("id"),
             "format": repo.core.config.get("format"), "hash": repo.core.hash},
            lambda: app.info(f"{'created' if repo.created else 'already exists:'} repository {repo.url}"))


@cli.command("list")
@click.option("--release", help="Only this release.")
@click.option("--source", "source", help="Only snapshots holding this source.")
@click.option("--limit", type=click.IntRange(min=1), help="At most N snapshots.")
@pass_app
def list_cmd(app: App, release, source, limit):
    """Snapshots, newest first."""
    if release:
        check_name("release", release)
    if source:
        check_name("source", source)
    rows = app.api.snapshots(release=release, source=source, limit=limit)

    def human():
        if not rows:
            app.info("no snapshots")
            return
        click.echo(f"{'ID':<24} {'RELEASE':<20} {'TAKEN':<21} {'GOOD':<4} {'RECORDS':>9} {'SIZE':>10}  SOURCES")
        for r in rows:
            click.echo(f"{r['id']:<24} {p(r['release'])[:20]:<20} {p(r['taken_at'])[:19] + 'Z':<21} "
                       f"{'yes' if r['good'] else '':<4} {r['records']:>9} {human_bytes(r['bytes']):>10}  "
                       f"{p(','.join(r['sources']))}")
    app.out(rows, human)


@cli.command()
@click.argument("snapshot")
@pass_app
def show(app: App, snapshot):
    """One manifest: sources, streams, record counts, sizes, digests, consistency."""
    s = app.api.show(snapshot)

    def human():
        # every field is the manifest's: shown on one line each, whatever it holds
        click.echo(f"snapshot   {p(s['id'])}{'  (known good)' if s['good'] else ''}")
        click.echo(f"release    {p(s['release'])}")
        click.echo(f"taken at   {p(s['taken_at'])}  on {p(s['host'])} by {p(s['user'])} "
                   f"(snapshotter {p(s['tool_version'])})")
        if s["labels"]:
            click.echo("labels     " + ", ".join(f"{p(k)}={p(v)}" for k, v in s["labels"].items()))
        if s["note"]:
            click.echo(f"note       {p(s['note'], 2000)}")
        for sname, src in s["sources"].items():
            click.echo(f"\nsource {p(sname)}: {p(src['backend'])} at {p(src['location'], 500)} "
                       f"({p(src['consistency'])})")
            for stname, st in src["streams"].items():
                click.echo(f"  {p(stname):<30} {st['records']:>9} records {human_bytes(st['bytes']):>10} "
                           f"({human_bytes(st['stored_bytes'])} stored, {st['chunks']} chunks)  "
                           f"{p(st['digest'])[:19]}…")
    app.out(s, human)


@cli.command()
@click.argument("snapshots", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every snapshot (the default when none is named).")
@click.option("--read-data", is_flag=True, help="Read and re-hash every chunk and recompute stream digests.")
@pass_app
def verify(app: App, snapshots, all_, read_data):
    """Check that every object the snapshots reference is present (and intact).

    With no SNAPSHOT (or --all), the quarantine bundles of past restores are
    checked too: they are the evidence forensics reads."""
    api = app.api
    everything = all_ or not snapshots
    with app.progress_bar("verifying chunks") as bar:
        report, failed = checked(lambda: api.verify(() if everything else snapshots, read_data=read_data,
                                                    progress=bar.advance))

    def human():
        if report["ok"]:
            bundles = f" and {report['incidents_checked']} incident bundle(s)" if everything else ""
            app.info(f"ok: {report['checked']} snapshot(s){bundles} verified{' with data' if read_data else ''}")
        else:
            for p in report["problems"]:
                owner = p["snapshot"] if p.get("snapshot") else f"incident {p.get('incident')}"
                click.echo(f"{printable(owner)}: {printable(p['object'] or '-')}: {printable(p['problem'], 2000)}")
    app.out(report, human)
    if failed is not None:
        raise failed


def _mark(app: App, snapshot: str, good: bool) -> None:
    doc = app.call(app.api.mark_good, snapshot, good)
    app.out(doc, lambda: app.info(f"{doc['snapshot']} {'marked known-good' if good else 'no longer marked known-good'}"))


@cli.command("mark-good")
@click.argument("snapshot")
@pass_app
def mark_good(app: App, snapshot):
    """Flag a snapshot as known-good (used by `restore --release`)."""
    _mark(app, snapshot, True)


@cli.command("unmark-good")
@click.argument("snapshot")
@pass_app
def unmark_good(app: App, snapshot):
    """Remove the known-good flag."""
    _mark(app, snapshot, False)


@cli.command()
@pass_app
def backends(app: App):
    """Installed backend plugins and their options."""
    from ..backend import available_backends, load_backend
    out = []
    for name in available_backends():
        try:
            cls = load_backend(name)
        except UsageError as exc:
            out.append({"name": name, "error": exc.message})
            continue
        out.append({"name": name, "description": cls.description, "sessions": cls.supports_sessions,
                    "module": f"{cls.__module__}:{cls.__qualname__}",
                    "options": [{"name": o.name, "type": o.type.__name__, "required": o.required,
                                 "default": o.default, "help": o.help} for o in cls.options]})

    def human():
        for b in out:
            if "error" in b:
                click.echo(f"{b['name']}: unavailable: {b['error']}")
                continue
            click.echo(f"{b['name']}  ({b['module']})\n  {b['description']}")
            for o in b["options"]:
                req = "required" if o["required"] else f"default {o['default']!r}"
                click.echo(f"    {o['name']:<18} {o['type']:<5} {req:<22} {o['help']}")
            click.echo()
    app.out(out, human)
