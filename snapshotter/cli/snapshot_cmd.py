"""snapshot."""
from __future__ import annotations

import click

from ..errors import UsageError
from ..names import check_name, parse_label
from ..snapshot import summary
from . import App, cli, pass_app
from .repo_cmds import human_bytes


@cli.command()
@click.option("--release", required=True, help="The agent release this state belongs to.")
@click.option("--source", "sources", multiple=True, help="Only this source (repeatable).")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="A label (repeatable).")
@click.option("--note", help="Free text kept in the manifest.")
@pass_app
def snapshot(app: App, release, sources, labels, note):
    """Capture all (or the named) sources; commits only when every source succeeded."""
    check_name("release", release)
    for s in sources:
        check_name("source", s)
    label_map: dict[str, str] = {}
    for text in labels:
        k, v = parse_label(text)
        if k in label_map and label_map[k] != v:
            raise UsageError(f"label {k!r} given twice ({label_map[k]!r} and {v!r})")
        label_map[k] = v
    app.results["release"] = release
    api = app.api
    with app.progress_bar("snapshot") as bar:
        manifest = app.call(api.snapshot, release, sources=sources, labels=label_map, note=note,
                            progress=lambda stream, n: bar.advance(n, description=stream))
    s = summary(manifest)
    app.results["manifest"] = manifest

    def human():
        app.info(f"snapshot {s['id']} of release {s['release']}: {s['records']} records, "
                 f"{human_bytes(s['bytes_written'])} written, {human_bytes(s['bytes_reused'])} reused")
    app.out(s, human)
