"""init, list, show, verify, mark-good, unmark-good, backends."""
from __future__ import annotations

import click

from .. import hashing
from ..errors import UsageError
from ..locks import MARKS, SHARED
from ..names import check_name, printable
from ..names import printable as p
from ..repository import Repository
from ..snapshot import summary
from ..verify import verify as run_verify
from . import App, cli, pass_app


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
    store = app.store()
    if hasattr(store, "ensure_bucket"):
        store.ensure_bucket()
    wanted = hash_name or app.config.hash
    repo, created = Repository.init(store, compression_level=app.config.compression_level, hash_name=wanted)
    if not created and (hash_name or app.config.hash_set) and repo.hash != wanted:
        raise UsageError(f"repository {store.url} exists and uses hash {repo.hash}, not {wanted}; "
                         f"a repository's hash cannot change (init a new one to use {wanted})")
    if created:
        app.audited({"repository": store.url})["summary"] = f"created repository {store.url}"
    app.out({"repository": store.url, "created": created, "id": repo.config.get("id"),
             "format": repo.config.get("format"), "hash": repo.hash},
            lambda: app.info(f"{'created' if created else 'already exists:'} repository {store.url}"))


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
    repo = app.repo
    good = repo.good_ids()
    rows = []
    def damaged(ref, exc) -> None:
        app.warn(f"warning: snapshot {ref.id} of release {ref.release} not listed: {exc.message} "
                 "(`verify` reports it)")

    for m in repo.manifests(release, damaged=damaged):
        if source and source not in m.get("sources", {}):
            continue
        s = summary(m, good=m["id"] in good)
        rows.append({"id": s["id"], "release": s["release"], "taken_at": s["taken_at"], "good": s["good"],
                     "labels": s["labels"], "records": s["records"], "bytes": s["bytes"],
                     "sources": sorted(s["sources"]), "note": s["note"]})
        if limit and len(rows) >= limit:
            break

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
    repo = app.repo
    ref = repo.resolve(snapshot)
    m = repo.load_manifest(ref)
    repo.check_digests(m)
    s = summary(m, good=ref.id in repo.good_ids(), with_schema=True)

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
    from ..quarantine import incident_ids

    repo = app.repo
    everything = all_ or not snapshots
    refs = repo.list_snapshot_refs() if everything else [repo.resolve(s) for s in snapshots]
    with app.progress_bar("verifying chunks") as bar:
        report = run_verify(repo, refs, read_data=read_data, progress=bar.advance,
                            incidents=incident_ids(repo) if everything else ())

    def human():
        if report["ok"]:
            bundles = f" and {report['incidents_checked']} incident bundle(s)" if everything else ""
            app.info(f"ok: {report['checked']} snapshot(s){bundles} verified{' with data' if read_data else ''}")
        else:
            for p in report["problems"]:
                owner = p["snapshot"] if p.get("snapshot") else f"incident {p.get('incident')}"
                click.echo(f"{printable(owner)}: {printable(p['object'] or '-')}: {printable(p['problem'], 2000)}",
                           err=True)
    app.out(report, human)
    if not report["ok"]:
        from ..errors import IntegrityError
        raise IntegrityError(f"verify found {len(report['problems'])} problem(s)")


def _mark(app: App, snapshot: str, good: bool) -> None:
    repo = app.repo
    # the marks lock keeps forget from deleting a snapshot while it is being marked known-good
    with app.lock({MARKS: SHARED}):
        ref = repo.resolve(snapshot)
        if good:
            # a snapshot that cannot be restored must not become what `restore --release` picks
            repo.check_digests(repo.load_manifest(ref))
        app.audited({"snapshot": ref.id, "release": ref.release})["summary"] = \
            f"{ref.id} {'marked known-good' if good else 'no longer marked known-good'}"
        repo.mark_good(ref, good)
    app.out({"snapshot": ref.id, "release": ref.release, "good": good},
            lambda: app.info(f"{ref.id} {'marked known-good' if good else 'no longer marked known-good'}"))


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
