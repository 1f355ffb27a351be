"""Configuration and CLI behaviour: lookup order, ${VAR}, SNAPSHOTTER_* variables,
one-line errors with the documented exit codes, --json discipline, help and docs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from snapshotter.cli import cli as root

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def write(tmp_path, text, name="snapshotter.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, fragment", [
    ("[repository\nurl=1", "invalid TOML"),
    ("[repo]\nurl='x'", "unknown section [repo]"),
    ("[repository]\nurl='./r'\nbogus=1", "repository.bogus"),
    ("[repository]\nurl='./r'\ncompression_level=99", "compression_level"),
    ("[repository]\nurl='./r'\n[sources.a]\nurl='sqlite://'", "sources.a.backend: missing"),
    ("[repository]\nurl='./r'\n[sources.a]\nbackend='nosuch'", "unknown backend 'nosuch'"),
    ("[repository]\nurl='./r'\n[sources.a]\nbackend='sql'", "sources.a.url: missing"),
    ("[repository]\nurl='./r'\n[sources.a]\nbackend='sql'\nurl='sqlite://'\ncolour='red'", "sources.a.colour"),
    ("[repository]\nurl='./r'\n[sources.a]\nbackend='sql'\nurl='sqlite://'\ntables=3", "sources.a.tables"),
    ("[repository]\nurl='./r'\n[sources.'../x']\nbackend='sql'\nurl='sqlite://'", "invalid source name"),
    ("[repository]\nurl='${NOT_SET_ANYWHERE}'", "NOT_SET_ANYWHERE is not set"),
    ("[repository]\nurl='ftp://x/y'", "unsupported repository URL scheme"),
])
def test_config_mistakes_are_one_line_exit_2(tmp_path, cli, text, fragment):
    write(tmp_path, text)
    r = cli("list")
    assert r.code == 2, r.err
    assert fragment in r.err and "snapshotter" in r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    j = cli("--json", "list")
    assert j.out == "" and json.loads(j.err)["error"]["exit_code"] == 2


def test_lookup_order_and_env(tmp_path, cli, monkeypatch):
    (tmp_path / "a").mkdir()
    write(tmp_path / "a", "[repository]\nurl = './repo-a'\n", "cfg.toml")
    write(tmp_path, "[repository]\nurl = './repo-default'\n")
    assert cli("init").code == 0
    assert (tmp_path / "repo-default" / "config.json").exists()
    monkeypatch.setenv("SNAPSHOTTER_CONFIG", str(tmp_path / "a" / "cfg.toml"))
    assert cli("init").code == 0
    assert (tmp_path / "a" / "repo-a" / "config.json").exists()  # relative to the config file
    assert cli("--config", str(tmp_path / "snapshotter.toml"), "--repo", "./repo-flag", "init").code == 0
    assert (tmp_path / "repo-flag" / "config.json").exists()  # --repo overrides
    monkeypatch.setenv("SNAPSHOTTER_REPO", str(tmp_path / "repo-env"))
    assert cli("init").code == 0
    assert (tmp_path / "repo-env" / "config.json").exists()
    monkeypatch.setenv("REPO_DIR", str(tmp_path / "repo-var"))
    monkeypatch.delenv("SNAPSHOTTER_REPO")
    write(tmp_path, "[repository]\nurl = '${REPO_DIR}'\n", "var.toml")
    assert cli("--config", str(tmp_path / "var.toml"), "init").code == 0
    assert (tmp_path / "repo-var" / "config.json").exists()
    assert cli("--config", str(tmp_path / "missing.toml"), "list").code == 2


def test_init_is_idempotent_and_refuses_foreign_folders(tmp_path, cli):
    assert cli("--repo", "r", "--json", "init").json()["created"] is True
    assert cli("--repo", "r", "--json", "init").json()["created"] is False
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = cli("--repo", "busy", "init")
    assert r.code == 2 and "not empty" in r.err
    r = cli("--repo", "nowhere", "list")
    assert r.code == 5 and "snapshotter init" in r.err


def test_unknown_format_version_is_refused(tmp_path, cli):
    cli("--repo", "r", "init")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg["format"] = 99
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    r = cli("--repo", "r", "list")
    assert r.code == 2 and "format 99" in r.err


def test_unexpected_errors_have_no_traceback_without_v(tmp_path, cli):
    cli("--repo", "r", "init")
    (tmp_path / "r" / "snapshots" / "rel").mkdir(parents=True)
    (tmp_path / "r" / "snapshots" / "rel" / "20260101T000000Z-abcdef.json").write_text("{not json")
    r = cli("--repo", "r", "show", "20260101T000000Z-abcdef")
    assert r.code == 3 and "corrupt" in r.err and "Traceback" not in r.err
    r = cli("--repo", "r", "-v", "show", "20260101T000000Z-abcdef")
    assert r.code == 3 and "corrupt" in r.err


def _commands(group, prefix=""):
    import click
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield prefix + name, cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + name + " ")


def test_each_command_is_found_in_the_module_it_is_loaded_from():
    """Commands are imported on demand from COMMAND_MODULES: a command missing from the
    map would be invisible, one mapped to the wrong module would fail when run."""
    import importlib
    import pkgutil

    import snapshotter.cli as pkg
    from snapshotter.cli import COMMAND_MODULES

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"snapshotter.cli.{mod.name}")
    assert set(root.commands) == set(COMMAND_MODULES)
    for name, cmd in root.commands.items():
        assert cmd.callback.__module__ == f"snapshotter.cli.{COMMAND_MODULES[name]}", name


def test_every_command_has_help_and_is_documented(cli):
    names = [n for n, _ in _commands(root)]
    assert {"init", "snapshot", "list", "show", "verify", "diff", "restore", "mark-good", "unmark-good",
            "backends", "demo"} <= set(names)
    for name, cmd in _commands(root):
        r = cli(*name.split(), "--help")
        assert r.code == 0 and "Usage:" in r.out, name
        assert cmd.help, f"{name} has no help text"
        top = name.split()[0]
        assert re.search(rf"`{re.escape(top)}[ `]", README), f"{top} is not in the README"


def test_json_stdout_is_one_document(tmp_path, cli):
    r = cli("--repo", "r", "--json", "init")
    json.loads(r.out)
    r = cli("--repo", "r", "--json", "list")
    assert json.loads(r.out) == []
    r = cli("--repo", "r", "--json", "backends")
    names = {b["name"] for b in json.loads(r.out)}
    assert {"sql", "conversation", "chroma"} <= names


def test_a_repository_path_that_is_a_file_is_a_usage_error(tmp_path, cli):
    (tmp_path / "afile").write_text("x")
    r = cli("--repo", "afile", "list")
    assert r.code == 2 and "is a file" in r.err


@pytest.mark.parametrize("raised, code", [("SystemExit(3)", 3), ("RuntimeError('boom')", 1), ("SystemExit(0)", 0)])
def test_the_program_keeps_the_exit_code_of_anything_escaping_main(raised, code):
    """The console program skips the interpreter's teardown only after main() returned
    its code: whatever escapes main() (a plugin's SystemExit, a bug) exits as Python
    would exit with it, never as a success it was not."""
    import subprocess
    import sys
    prog = ("import snapshotter.cli as c\n"
            f"def boom():\n    raise {raised}\n"
            "c.main = boom\nc.run()\n")
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert p.returncode == code, p.stderr
    r = subprocess.run([sys.executable, "-m", "snapshotter", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("snapshotter")


def test_commands_that_touch_no_source_do_not_load_database_or_vector_libraries(tmp_path):
    """``list``, ``show`` and ``quarantine`` check the config against each backend's options
    but load neither SQLAlchemy nor numpy (together ~160 ms of every responder's command)."""
    import subprocess
    import sys
    (tmp_path / "snapshotter.toml").write_text(
        '[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "sqlite:///agent.db"\n'
        '[sources.chat]\nbackend = "conversation"\nurl = "sqlite:///agent.db"\n'
        '[sources.memory]\nbackend = "chroma"\npath = "./chroma"\n')
    prog = ("import sys\nfrom snapshotter.cli import main\n"
            "assert main(['init']) == 0 and main(['list']) == 0 and main(['quarantine', 'list']) == 0\n"
            "loaded = [m for m in ('sqlalchemy', 'numpy', 'chromadb') if m in sys.modules\n"
            "          and type(sys.modules[m]).__name__ != '_LazyModule']\n"
            "print('LOADED', loaded)\n")
    p = subprocess.run([sys.executable, "-c", prog], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "LOADED []" in p.stdout, p.stdout


def test_every_command_flag_reads_its_environment_variable(monkeypatch):
    """README: a command's flag also reads SNAPSHOTTER_<COMMAND>_<FLAG> (subcommands
    included), named after the flag even where the code names the value otherwise."""
    import click

    seen = 0
    for top in root.list_commands(click.Context(root)):
        stack = [(root.get_command(click.Context(root), top), [top])]
        while stack:
            cmd, path = stack.pop()
            stack.extend((sub, path + [n]) for n, sub in getattr(cmd, "commands", {}).items())
            for param in cmd.params:
                longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
                if not isinstance(param, click.Option) or not longs or longs[0] == "--help":
                    continue
                var = "_".join(["SNAPSHOTTER", *path, max(longs, key=len)[2:]]).upper().replace("-", "_")
                ctx = click.Context(cmd, auto_envvar_prefix="_".join(["SNAPSHOTTER", *path]).upper())
                # click's own name, from the code's parameter, is not read where it differs
                derived = "_".join(["SNAPSHOTTER", *path, param.name]).upper()
                if derived != var:
                    monkeypatch.setenv(derived, "from-param-name")
                    assert param.resolve_envvar_value(ctx) is None, (path, param.name, derived)
                    monkeypatch.delenv(derived)
                monkeypatch.setenv(var, "from-env")
                assert param.resolve_envvar_value(ctx) == "from-env", (path, param.name, var)
                monkeypatch.delenv(var)
                seen += 1
    assert seen > 30


def test_version_is_not_taken_from_the_environment(tmp_path, cli, monkeypatch):
    # SNAPSHOTTER_VERSION set for some other purpose must not turn every command into --version
    monkeypatch.setenv("SNAPSHOTTER_VERSION", "1")
    r = cli("--repo", "r", "--json", "init")
    assert r.code == 0 and r.json()["created"] is True


def test_global_options_are_accepted_after_the_subcommand(tmp_path, cli):
    """`snapshotter list --json` (a responder's habit) works as `snapshotter --json list`; an option
    value that looks like a global option stays the subcommand's (`--note --json`)."""
    import sqlalchemy as sa
    db = tmp_path / "a.db"
    with sa.create_engine(f"sqlite:///{db}").begin() as c:
        c.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    (tmp_path / "other.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "sqlite:///{db}"\n')
    assert cli("init", "--config", "other.toml").code == 0
    r = cli("snapshot", "--release", "v1", "--note", "--json", "--config", "other.toml", "-q")
    assert r.code == 0, r.err
    assert not r.out.lstrip().startswith("{")  # --json was the note, not the option
    r = cli("list", "--json", "--config=other.toml")
    assert r.code == 0, r.err
    assert r.json()[0]["release"] == "v1"
    r = cli("show", r.json()[0]["id"], "--config", "other.toml", "--json")
    assert r.code == 0 and r.json()["note"] == "--json"
    assert cli("quarantine", "list", "--json", "--config", "other.toml").json() == []
