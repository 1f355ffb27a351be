"""quarantine list, show, diff, export, report, reapply."""
from __future__ import annotations

import json
import os
import sys

import click

from ..codec import key_text
from ..errors import Refused, UsageError
from ..forensics import EXPORT_FORMATS, changed_fields, table
from ..names import check_name, printable
from ..quarantine import OPS, record_json, replaced_settings
from ..report import MAX_RECORDS
from . import App, ask, cli, pass_app


def filter_options(f):
    f = click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N records.")(f)
    f = click.option("--session", "sessions", multiple=True, metavar="ID",
                     help="Only records of these conversation sessions (repeatable).")(f)
    f = click.option("--post-failure", is_flag=True,
                     help="Only records written at or after the incident's --failure-at.")(f)
    f = click.option("--op", "ops", multiple=True, type=click.Choice(OPS),
                     help="Only records with this op (repeatable).")(f)
    f = click.option("--stream", metavar="NAME", help="Only this stream (table, collection).")(f)
    f = click.option("--source", metavar="NAME", help="Only this source.")(f)
    return f


def _filters(source, stream, ops, post_failure, sessions, limit) -> dict:
    if source:
        check_name("source", source)
    return {"source": source, "stream": stream, "ops": tuple(ops), "post_failure": post_failure,
            "sessions": tuple(sessions), "limit": limit}


#: widths in terminal cells; a key is cut in its middle only past 64 (composite keys differ at their end)
SHOW_COLUMNS = (table.Column("SOURCE/STREAM", 32), table.Column("KEY", 64), table.Column("OP", 8),
                table.Column("POST", 4), table.Column("WRITTEN AT", 32), table.Column("SESSION", 32),
                table.Column("CHANGED", 80))


def _post_label(post) -> str:
    return "yes" if post is True else "no" if post is False else "-"


def _clip(text: str, n: int) -> str:
    """A field of a bundle or a record on one line: control characters escaped (a bundle is
    anyone's to write, a record is what the agent wrote), cut to ``n`` characters."""
    text = printable(text if isinstance(text, str) else str(text), limit=max(n * 4, 64))
    return text if len(text) <= n else text[:n - 1] + "…"


@cli.group()
def quarantine():
    """Inspect, diff, export, report and re-apply quarantined writes."""


@quarantine.command("list")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N incidents.")
@pass_app
def list_cmd(app: App, limit):
    """Incidents, newest first."""
    rows = app.api.quarantine.incidents(limit=limit)

    def human():
        if not rows:
            app.info("no incidents")
            return
        click.echo(f"{'INCIDENT':<30} {'SNAPSHOT':<24} {'RELEASE':<14} {'CREATED':<20} {'RECORDS':>8} "
                   f"{'+ADD':>6} {'~MOD':>6} {'-DEL':>6} {'POST':>6}  {'FAILURE AT':<20} STATUS")
        for r in rows:
            c = r["counts"]
            post = "-" if r["post_failure"] is None else str(r["post_failure"])
            status = r["status"] + (" (unverified)" if r["status"] == "applied" and r["verified"] is False else "")
            click.echo(f"{_clip(r['incident'], 30):<30} {_clip(r['snapshot'] or '-', 24):<24} "
                       f"{_clip(r['release'] or '-', 14):<14} "
                       f"{_clip(r['created_at'] or '-', 40)[:19] + 'Z':<20} {_clip(r['records'], 8):>8} {c['added']:>6} "
                       f"{c['modified']:>6} {c['deleted']:>6} {post:>6}  {_clip(r['failure_at'] or '-', 32):<20} "
                       f"{status}")
    app.out(rows, human)


@quarantine.command()
@click.argument("incident")
@filter_options
@pass_app
def show(app: App, incident, source, stream, ops, post_failure, sessions, limit):
    """Quarantined records of INCIDENT (whole incidents are better read with export)."""
    filters = _filters(source, stream, ops, post_failure, sessions, limit)
    check_name("incident", incident)  # before the repository is opened
    q = app.api.quarantine
    settings = replaced_settings(q.bundle(incident))
    records = []
    fields = []
    for sname, stname, rec in q.records(incident, **filters):
        records.append(record_json(sname, stname, rec))
        fields.append(changed_fields(rec.value))

    def human():
        for line in settings:
            app.info(f"settings put back: {line} (the replaced ones are in the incident's manifest.json, "
                     f"stream schema)")
        if not records:
            app.info(f"no quarantined records in incident {incident} match")
            return
        rows = [(f"{r['source']}/{r['stream']}", key_text(r["key"]), r["op"], _post_label(r["post_failure"]),
                 r["written_at"] or "-", "-" if r["session"] is None else str(r["session"]),
                 ", ".join(changed) if r["op"] == "modified" else "") for r, changed in zip(records, fields)]
        for line in table.render(SHOW_COLUMNS, rows):
            click.echo(line)
        app.info(f"{len(records)} record(s)" + (" (limit reached)" if limit and len(records) >= limit else ""))
    app.out(records, human)


def _print_change(c: dict) -> None:
    path = printable(c["path"], limit=500)
    kind = c.get("kind")
    if kind == "text":
        pre = ("…" if c["more_before"] else "") + c["context_before"]
        post = c["context_after"] + ("…" if c["more_after"] else "")
        click.echo(f"  {path}: text changed at character {c['offset']} "
                   f"({c['snapshot_length']} → {c['live_length']} characters)")
        click.echo("    - " + json.dumps(pre + "[" + c["snapshot_changed"] + "]" + post, ensure_ascii=False))
        click.echo("    + " + json.dumps(pre + "[" + c["live_changed"] + "]" + post, ensure_ascii=False))
    elif kind == "vector":
        if c["snapshot_dims"] != c["live_dims"]:
            click.echo(f"  {path}: vector dimensions {c['snapshot_dims']} → {c['live_dims']}")
        else:
            cos = "n/a" if c["cosine_distance"] is None else f"{c['cosine_distance']:.6g}"
            l2 = "n/a" if c["l2"] is None else f"{c['l2']:.6g}"
            click.echo(f"  {path}: vector, {c['changed_dims']} of {c['snapshot_dims']} dimensions changed, "
                       f"cosine distance {cos}, L2 {l2}")
    elif kind == "bytes":
        click.echo(f"  {path}: {c['snapshot_length']} → {c['live_length']} bytes, first difference at byte "
                   f"{c['offset']}")
    else:
        def show(v):
            return _clip(json.dumps(v, ensure_ascii=False), 200)
        if c["change"] == "added":
            click.echo(f"  {path}: added {show(c['live'])}")
        elif c["change"] == "removed":
            click.echo(f"  {path}: removed (was {show(c['snapshot'])})")
        else:
            note = f"  ({c['note']})" if c.get("note") else ""
            click.echo(f"  {path}: {show(c['snapshot'])} → {show(c['live'])}{note}")


@quarantine.command()
@click.argument("incident")
@click.argument("key")
@click.option("--source", metavar="NAME", help="The source holding KEY (when several do).")
@click.option("--stream", metavar="NAME", help="The stream holding KEY (when several do).")
@pass_app
def diff(app: App, incident, key, source, stream):
    """Field-level diff of KEY: snapshot version vs quarantined live version.

    KEY is the key's JSON text (44, '"kb-3"', '["sess-2", 3]'); text that is not
    JSON is taken as a string, so kb-3 works too.
    """
    if source:
        check_name("source", source)
    check_name("incident", incident)  # before the repository is opened
    d = app.api.quarantine.diff(incident, key, source=source, stream=stream)

    def human():
        post = {True: ", post-failure", False: ", before failure"}.get(d["post_failure"], "")
        when = f", written {d['written_at']}" if d["written_at"] else ""
        session = f", session {d['session']}" if d["session"] is not None else ""
        click.echo(printable(f"{d['source']}/{d['stream']} key {key_text(d['key'])}: {d['op']}{post}{when}{session}",
                             limit=2000))
        if not d["changes"]:
            click.echo("  no field-level difference (the stored encodings differ only in key order)")
        for c in d["changes"]:
            _print_change(c)
    app.out(d, human)


@quarantine.command()
@click.argument("incident")
@click.option("--format", "fmt", required=True, type=click.Choice(EXPORT_FORMATS), help="File format.")
@click.option("-o", "--output", required=True, metavar="PATH",
              help="File to write (replaced atomically); - for standard output.")
@click.option("--csv-raw", is_flag=True,
              help="CSV: write text cells as they are (by default a cell starting with = + - @ tab or CR "
                   "gets a leading ' so a spreadsheet does not run it as a formula).")
@filter_options
@pass_app
def export(app: App, incident, fmt, output, csv_raw, source, stream, ops, post_failure, sessions, limit):
    """Write quarantined records with their provenance to a file for DuckDB, pandas, spreadsheets.

    One row per record: incident, snapshot, release, source, stream, key, op,
    post_failure, written_at, session, value, snapshot_value.  JSONL keeps key
    and values as JSON; CSV and Parquet carry them as JSON text (Parquet's
    written_at is a UTC timestamp).
    """
    filters = _filters(source, stream, ops, post_failure, sessions, limit)
    check_name("incident", incident)  # before the repository is opened
    q = app.api.quarantine
    q.bundle(incident)  # a missing incident is told before anything is written
    if output == "-":
        if app.json:
            raise UsageError("-o - writes the export to standard output, which --json needs for its result")
        n = _export_to_stdout(q, incident, filters, fmt, csv_raw=csv_raw)
        if not app.quiet:
            click.echo(f"exported {n} record(s) of incident {incident} to standard output ({fmt})", err=True)
        return
    n = q.export(incident, output, format=fmt, csv_raw=csv_raw, **filters)
    app.out({"incident": incident, "format": fmt, "path": output, "records": n},
            lambda: app.info(f"exported {n} record(s) of incident {incident} to {output} ({fmt})"))


def _export_to_stdout(q, incident: str, filters: dict, fmt: str, *, csv_raw: bool = False) -> int:
    """The export, written to a private temporary file first (whole, or not at all), then
    copied to standard output."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="snapshotter-export-") as folder:
        path = os.path.join(folder, "export")
        n = q.export(incident, path, format=fmt, csv_raw=csv_raw, **filters)
        out = getattr(sys.stdout, "buffer", None)
        with open(path, "rb") as fh:
            if out is not None:
                sys.stdout.flush()
                shutil.copyfileobj(fh, out)
                out.flush()
            else:  # a text-only stdout (tests, embedding): the text formats
                sys.stdout.write(fh.read().decode("utf-8"))
    return n


@quarantine.command()
@click.argument("incident")
@click.option("-o", "--output", required=True, metavar="PATH", help="HTML file to write (replaced atomically).")
@click.option("--max-records", type=click.IntRange(min=0), default=MAX_RECORDS, show_default=True, metavar="N",
              help="Per-record diffs on the page (post-failure writes first).")
@pass_app
def report(app: App, incident, output, max_records):
    """One self-contained HTML page for reviewers: summary, counts, timeline, sessions, diffs."""
    check_name("incident", incident)  # before the repository is opened
    info = app.api.quarantine.report(incident, output, max_records=max_records)
    left = f", {info['left_out']} left out (see export)" if info["left_out"] else ""
    app.out(info, lambda: app.info(f"wrote {output}: {info['records']} record(s), {info['shown']} with diffs{left}"))


@quarantine.command()
@click.argument("incident")
@click.argument("keys", nargs=-1, required=True)
@click.option("--source", metavar="NAME", help="The source holding the KEYs (when several do).")
@click.option("--stream", metavar="NAME", help="The stream holding the KEYs (when several do).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True,
              help="Write even over records changed in the live store since the restore (their values are not kept).")
@pass_app
def reapply(app: App, incident, keys, source, stream, yes, force):
    """Write chosen quarantined records back to the live store.

    Added and modified records get their quarantined live value again; deleted
    records are deleted again.  A record changed in the live store since the
    restore is refused (exit 6, nothing written) unless --force.  Recorded in the
    audit log.
    """
    if source:
        check_name("source", source)
    check_name("incident", incident)
    interactive = sys.stdin.isatty() and not app.json
    if not yes and not interactive:
        raise Refused("reapply changes live stores: pass --yes (no terminal to confirm on)")

    def confirm(found) -> bool:
        for loc in found:
            click.echo(printable(f"  {loc.op:<9} {loc.source}/{loc.stream} key {key_text(loc.record.key)}",
                                 limit=2000), err=True)
        verb = {"deleted": "delete again"}
        what = ", ".join(sorted({verb.get(loc.op, "write back") for loc in found}))
        return ask(f"{what} {len(found)} record(s) from incident {incident} in the live store?")

    done = app.call(app.api.quarantine.reapply, incident, keys, source=source, stream=stream, force=force,
                    confirm=None if yes else confirm)
    result = {"incident": incident, "reapplied": done, "records": len(done)}
    app.results = {"reapply": result}

    def human():
        for r in done:
            action = "deleted again" if r["op"] == "deleted" else "written back"
            app.info(printable(f"{r['source']}/{r['stream']} key {key_text(r['key'])}: {action} "
                               f"({r['op']} in the incident)", limit=2000))
    app.out(result, human)
