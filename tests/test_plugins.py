"""Backend plugins: a package installed beside snapshotter registers a backend under the
``snapshotter.backends`` entry-point group and is used like a built-in one; the built-in
names stay the built-in backends whatever a plugin registers."""
from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import sqlalchemy as sa

from conftest import run_cli_subprocess
from snapshotter.backend import BUILTIN_BACKENDS

ROOT = Path(__file__).resolve().parent.parent

PLUGIN = '''
from snapshotter_backends.sql import SQLBackend


class LedgerBackend(SQLBackend):
    name = "ledger"
    description = "SQL tables, as a third-party plugin"


class Impostor(SQLBackend):
    name = "sql"
    description = "a plugin that claims a built-in name"
'''


def install_plugin(site: Path) -> None:
    """A plugin distribution as pip leaves one: the package and its dist-info."""
    (site / "ledger_plugin").mkdir(parents=True)
    (site / "ledger_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "ledger_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ledger-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[snapshotter.backends]\nledger = ledger_plugin:LedgerBackend\nsql = ledger_plugin:Impostor\n"
        "broken = ledger_plugin.broken:Backend\n")
    # a module that fails as it is imported, with something other than ImportError
    (site / "ledger_plugin" / "broken.py").write_text('raise RuntimeError("needs LEDGER_HOME")\n')


def test_builtin_table_matches_the_registered_entry_points():
    # the shortcut that skips the metadata scan names exactly what pyproject registers
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["snapshotter.backends"] == BUILTIN_BACKENDS


def test_an_installed_plugin_is_listed_and_snapshots(tmp_path):
    site = tmp_path / "site"
    install_plugin(site)
    env = {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    db = tmp_path / "ledger.db"
    eng = sa.create_engine(f"sqlite:///{db}")
    with eng.begin() as c:
        c.execute(sa.text("CREATE TABLE entries (id INTEGER PRIMARY KEY, amount TEXT)"))
        c.execute(sa.text("INSERT INTO entries VALUES (1, '10.00'), (2, '-3.50')"))
    eng.dispose()

    r = run_cli_subprocess("--repo", "repo", "--json", "backends", env=env, cwd=tmp_path)
    assert r.code == 0, r.err
    found = {b["name"]: b for b in json.loads(r.out)}
    assert found["ledger"]["module"] == "ledger_plugin:LedgerBackend"
    assert found["ledger"]["description"] == "SQL tables, as a third-party plugin"
    # a plugin cannot take over a built-in name
    assert found["sql"]["module"] == "snapshotter_backends.sql:SQLBackend"
    assert {"conversation", "chroma"} <= set(found)
    # a plugin that cannot be imported is listed as such, and hides nothing else
    assert "RuntimeError: needs LEDGER_HOME" in found["broken"]["error"]
    assert "module" not in found["broken"]

    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n\n[sources.books]\nbackend = "ledger"\nurl = "sqlite:///{db}"\n')
    assert run_cli_subprocess("init", env=env, cwd=tmp_path).code == 0
    r = run_cli_subprocess("--json", "snapshot", "--release", "v1", env=env, cwd=tmp_path)
    assert r.code == 0, r.err
    snap = json.loads(r.out)
    assert snap["sources"]["books"]["backend"] == "ledger"
    assert snap["sources"]["books"]["streams"]["entries"]["records"] == 2

    # a source on the broken plugin: one line, exit 2, nothing written
    (tmp_path / "broken.toml").write_text(
        f'[repository]\nurl = "./repo"\n\n[sources.x]\nbackend = "broken"\nurl = "sqlite:///{db}"\n')
    r = run_cli_subprocess("--config", "broken.toml", "snapshot", "--release", "v2", env=env, cwd=tmp_path)
    assert r.code == 2, r.err
    assert "backend 'broken' cannot be loaded: RuntimeError: needs LEDGER_HOME" in r.err
    assert len(r.err.strip().splitlines()) == 1

    # without the plugin installed, the config names an unknown backend: one line, exit 2
    r = run_cli_subprocess("snapshot", "--release", "v1", cwd=tmp_path)
    assert r.code == 2
    assert "unknown backend 'ledger'" in r.err and "chroma, conversation, sql" in r.err
    assert len(r.err.strip().splitlines()) == 1
