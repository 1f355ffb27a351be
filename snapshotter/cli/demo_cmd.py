"""demo: walk snapshot → bad writes → restore → quarantine on embedded stores."""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys

import click

from . import App, cli, pass_app


@cli.command()
@click.option("--dir", "directory", default="snapshotter-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where to build the demo (its stores, repository and snapshotter.toml).")
@pass_app
def demo(app: App, directory):
    """Build a small agent state on embedded stores and walk snapshot → bad writes → restore → quarantine."""
    from .. import demo as demo_state
    from . import main

    directory = os.path.abspath(directory)
    paths = demo_state.build(directory)
    repo_dir = os.path.join(directory, "repo")
    if os.path.isdir(repo_dir):
        import shutil
        shutil.rmtree(repo_dir)
    base = ["--config", paths["config"], "--no-progress"]
    say = lambda text: click.secho(f"\n== {text}", bold=True, err=app.json)  # noqa: E731

    def step(*args: str) -> None:
        # with --json the walk-through goes to stderr; stdout carries only the summary
        with contextlib.redirect_stdout(sys.stderr) if app.json else contextlib.nullcontext():
            code = main(base + list(args))
        if code != 0:
            raise click.ClickException(f"demo step `snapshotter {' '.join(args)}` failed with exit code {code}")

    say(f"agent state built in {directory} (SQLite history and retrieval table, embedded Chroma)")
    step("init")
    say("snapshot of the known-good state")
    step("snapshot", "--release", "demo-v1", "--label", "stage=demo", "--note", "known good")
    from ..repository import Repository
    from ..objectstore import open_store
    snap_id = next(Repository.open(open_store(repo_dir)).snapshots()).id
    step("mark-good", snap_id)
    failure_at = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0) - _dt.timedelta(seconds=1)
    say("the agent is prompt-injected: it writes a poisoned message, rewrites a fact, adds a poisoned vector")
    demo_state.bad_writes(directory)
    say("what a restore would change (dry run)")
    step("restore", "--release", "demo-v1", "--dry-run")
    say("restore: quarantine every later write, then put the known-good state back")
    step("restore", "--release", "demo-v1", "--yes", "--incident", "demo-incident",
         "--failure-at", failure_at.isoformat().replace("+00:00", "Z"))
    say("the evidence: quarantined writes, for forensics")
    step("quarantine", "show", "demo-incident")
    app.out({"dir": directory, "config": paths["config"], "snapshot": snap_id, "incident": "demo-incident"})
    if not app.json:
        click.echo(f"\nKeep exploring with the real commands:\n  cd {directory}\n  snapshotter list\n"
                   f"  snapshotter quarantine list\n  snapshotter quarantine report demo-incident -o report.html")
