"""Backend plugins: a package installed beside snapshotter registers a backend under the
``snapshotter.backends`` entry-point group and is used like a built-in one.  The plugin
here is the reference backend (tests/conformance/reference_backend.py), installed as pip
leaves a distribution; the conformance suite runs every scenario on it the same way.
The built-in names stay the built-in backends whatever a plugin registers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import install_plugin, run_cli_subprocess
from snapshotter.backend import BUILTIN_BACKENDS

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "conformance" / "reference_backend.py"


def test_builtin_table_matches_the_registered_entry_points():
    # the shortcut that skips the metadata scan names exactly what pyproject registers
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["snapshotter.backends"] == BUILTIN_BACKENDS


def test_an_installed_plugin_is_listed_snapshots_and_restores(tmp_path):
    env = install_plugin(
        tmp_path / "site", "jsonfile-plugin",
        {"reference_backend": REFERENCE.read_text(),
         # a module that fails as it is imported, with something other than ImportError
         "broken_plugin": 'raise RuntimeError("needs LEDGER_HOME")\n'},
        {"jsonfile": "reference_backend:JsonFileBackend",
         "sql": "reference_backend:JsonFileBackend",  # claims a built-in name
         "broken": "broken_plugin:Backend"})

    r = run_cli_subprocess("--repo", "repo", "--json", "backends", env=env, cwd=tmp_path)
    assert r.code == 0, r.err
    found = {b["name"]: b for b in json.loads(r.out)}
    assert found["jsonfile"]["module"] == "reference_backend:JsonFileBackend"
    assert found["jsonfile"]["description"] == "streams of JSON records in one file (the reference plugin)"
    assert [o["name"] for o in found["jsonfile"]["options"]] == ["path", "streams", "timeout"]
    # a plugin cannot take over a built-in name
    assert found["sql"]["module"] == "snapshotter_backends.sql:SQLBackend"
    assert {"conversation", "chroma"} <= set(found)
    # a plugin that cannot be imported is listed as such, and hides nothing else
    assert "RuntimeError: needs LEDGER_HOME" in found["broken"]["error"]
    assert "module" not in found["broken"]

    ledger = tmp_path / "ledger.json"
    entries = [[1, {"amount": "10.00"}], [2, {"amount": "-3.50"}]]
    ledger.write_text(json.dumps({"streams": {"entries": {"settings": {}, "records": entries}}}))
    (tmp_path / "snapshotter.toml").write_text(
        '[repository]\nurl = "./repo"\n\n[sources.books]\nbackend = "jsonfile"\npath = "ledger.json"\n')
    assert run_cli_subprocess("init", env=env, cwd=tmp_path).code == 0
    r = run_cli_subprocess("--json", "snapshot", "--release", "v1", env=env, cwd=tmp_path)
    assert r.code == 0, r.err
    snap = json.loads(r.out)
    assert snap["sources"]["books"]["backend"] == "jsonfile"
    assert snap["sources"]["books"]["location"] == str(ledger)
    assert snap["sources"]["books"]["streams"]["entries"]["records"] == 2

    ledger.write_text(json.dumps({"streams": {"entries": {"settings": {}, "records": [[2, {"amount": "0"}]]}}}))
    r = run_cli_subprocess("--json", "restore", snap["id"], "--yes", env=env, cwd=tmp_path)
    assert r.code == 0, r.err
    assert json.loads(r.out)["plan"]["books"]["entries"] == {"added": 0, "modified": 1, "deleted": 1}
    assert sorted(json.loads(ledger.read_text())["streams"]["entries"]["records"]) == entries

    # a source on the broken plugin: one line, exit 2, nothing written
    (tmp_path / "broken.toml").write_text(
        '[repository]\nurl = "./repo"\n\n[sources.x]\nbackend = "broken"\npath = "ledger.json"\n')
    r = run_cli_subprocess("--config", "broken.toml", "snapshot", "--release", "v2", env=env, cwd=tmp_path)
    assert r.code == 2, r.err
    assert "backend 'broken' cannot be loaded: RuntimeError: needs LEDGER_HOME" in r.err
    assert len(r.err.strip().splitlines()) == 1

    # without the plugin installed, the config names an unknown backend: one line, exit 2
    r = run_cli_subprocess("snapshot", "--release", "v1", cwd=tmp_path)
    assert r.code == 2
    assert "unknown backend 'jsonfile'" in r.err and "chroma, conversation, sql" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_the_conformance_suite_runs_on_the_adapter_a_plugin_author_names(tmp_path):
    """docs/conformance.md: ``--backend-adapter MODULE:CLASS`` runs every scenario on that
    adapter only; a name that is not an adapter is a usage error."""
    def collect(*args: str) -> subprocess.CompletedProcess:
        # pytest's installed plugins are not loaded: a second of start-up each, and not needed here
        return subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "conformance"), "--collect-only",
                               "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestConfigWarning", *args],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})

    p = collect("--backend-adapter", "adapters:ReferenceAdapter")
    assert p.returncode == 0, p.stdout + p.stderr
    ids = [line for line in p.stdout.splitlines() if "::" in line]
    assert len(ids) >= 7 and all(line.endswith("[jsonfile]") for line in ids), p.stdout
    p = collect("--backend-adapter", "adapters:BUILTIN")
    assert p.returncode != 0 and "not a subclass of adapters.Adapter" in p.stdout + p.stderr
