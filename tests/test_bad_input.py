"""Bad input corpus: malformed and mistaken configuration, unreachable stores, hostile
names, a tampered or foreign-filled repository, and awkward data.

Every case is run twice, plain and with --json, and asserts the documented exit
code, one error line on stderr (with --json: the JSON error object, and nothing
on stdout but the command's own report), no traceback, and no partial state: a
case refused before any I/O leaves the repository byte for byte as it was;
every other failing case adds no snapshot manifest, quarantine bundle or
known-good mark, leaves no lock behind and leaves the live table as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import sqlalchemy as sa

from tests.test_foundation import make_table

ROWS = 120


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    """A SQLite database, a config file, a repository with one snapshot of release r1."""

    def __init__(self, tmp: Path, cli):
        self.tmp = tmp
        self.cli = cli
        self.url = f"sqlite:///{tmp / 'agent.db'}"
        self.eng = make_table(self.url, rows=ROWS)
        self.repo = tmp / "repo"
        self.write_config()
        assert cli("init").code == 0
        r = cli("--json", "snapshot", "--release", "r1")
        assert r.code == 0, r.err
        self.snap = r.json()["id"]

    # -- the pieces a case changes -----------------------------------------------

    def write_config(self, sources: str | None = None, repository: str = 'url = "./repo"\n') -> None:
        if sources is None:
            sources = f'[sources.db]\nbackend = "sql"\nurl = "{self.url}"\ntables = ["kb_chunks"]\n'
        (self.tmp / "snapshotter.toml").write_text(f"[repository]\n{repository}\n{sources}")

    def source(self, body: str) -> None:
        self.write_config(f"[sources.db]\n{body}")

    @property
    def manifest(self) -> Path:
        return self.repo / "snapshots" / "r1" / f"{self.snap}.json"

    def edit_manifest(self, change: Callable[[dict], None]) -> None:
        doc = json.loads(self.manifest.read_text())
        change(doc)
        self.manifest.write_text(json.dumps(doc))

    def stream(self, doc: dict) -> dict:
        return doc["sources"]["db"]["streams"]["kb_chunks"]

    def chunk(self, n: int = 0) -> Path:
        cid = self.stream(json.loads(self.manifest.read_text()))["chunks"][n][0]
        return self.repo / "chunks" / cid[:2] / cid

    def drift(self) -> None:
        """Writes after the snapshot, so a restore has something to do."""
        with self.eng.begin() as c:
            c.exec_driver_sql("UPDATE kb_chunks SET title = 'poisoned' WHERE id < 10")
            c.exec_driver_sql("DELETE FROM kb_chunks WHERE id BETWEEN 50 AND 55")

    def incident(self) -> str:
        self.drift()
        r = self.cli("--json", "restore", self.snap, "--yes", "--incident", "inc-1")
        assert r.code == 0, r.err
        self.drift()
        return "inc-1"

    # -- what "no partial state" looks at ------------------------------------------

    def listing(self, root: Path | None = None) -> dict[str, str]:
        root = root or self.repo
        if not root.exists():
            return {}
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    def committed(self) -> set[str]:
        return {k for k in self.listing() if k.split(os.sep)[0] in ("snapshots", "quarantine", "good")}

    def locks(self) -> list[str]:
        return [k for k in self.listing() if k.startswith("locks")]

    def rows(self) -> list:
        with self.eng.connect() as c:
            return [tuple(r) for r in c.exec_driver_sql("SELECT * FROM kb_chunks ORDER BY id").fetchall()]


@pytest.fixture
def world(tmp_path, cli):
    w = World(tmp_path, cli)
    yield w
    w.eng.dispose()


def assert_one_line_error(r, code: int, as_json: bool, report: bool = False) -> dict | None:
    assert r.code == code, (r.code, r.out, r.err)
    assert "Traceback" not in r.err and "Traceback" not in r.out
    if as_json:
        lines = r.err.splitlines()
        assert len(lines) == 1, r.err
        err = json.loads(lines[0])["error"]
        assert err["exit_code"] == code and err["type"] and err["message"] and "\n" not in err["message"], err
        if report:
            json.loads(r.out)  # a command whose output is the finding (verify) still prints one document
        else:
            assert r.out == "", r.out
        return err
    lines = r.err.splitlines()
    if report:
        lines = lines[-1:]  # the lines before are the report itself
    assert len(lines) == 1 and lines[0].startswith("snapshotter: "), r.err
    return None


# -- the corpus -------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    args: tuple | Callable[[World], tuple]
    code: int
    prepare: Callable[[World], None] | None = None
    #: "nothing": refused before any I/O, the repository is byte for byte unchanged;
    #: "state": no new manifest, bundle or mark, no lock left, live table unchanged
    scope: str = "state"
    message: str | None = None  # in the error message (case-insensitive)
    report: bool = False  # the command prints its findings (verify) before failing

    def __str__(self) -> str:
        return self.id


SNAP = ("snapshot", "--release", "r2")


def config_text(text: str | bytes) -> Callable[[World], None]:
    def prepare(w: World) -> None:
        path = w.tmp / "snapshotter.toml"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return prepare


def source(body: str) -> Callable[[World], None]:
    return lambda w: w.source(body)


def manifest_edit(change: Callable[[dict], None]) -> Callable[[World], None]:
    return lambda w: w.edit_manifest(change)


def then_drift(prepare: Callable[[World], None]) -> Callable[[World], None]:
    def both(w: World) -> None:
        prepare(w)
        w.drift()
    return both


def truncate_chunk(w: World) -> None:
    path = w.chunk()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty_chunk(w: World) -> None:
    w.chunk().write_bytes(b"")


def flip_chunk(w: World) -> None:
    data = bytearray(w.chunk().read_bytes())
    data[len(data) // 2] ^= 0x10
    w.chunk().write_bytes(bytes(data))


def remove_chunk_ref(doc: dict) -> None:
    doc["sources"]["db"]["streams"]["kb_chunks"]["chunks"].pop()


def edit_chunk_id(doc: dict) -> None:
    row = doc["sources"]["db"]["streams"]["kb_chunks"]["chunks"][0]
    row[0] = "0" * 64


def edit_count(doc: dict) -> None:
    doc["sources"]["db"]["streams"]["kb_chunks"]["records"] += 1


def edit_digest(doc: dict) -> None:
    doc["sources"]["db"]["streams"]["kb_chunks"]["digest"] = "sha256:" + "ab" * 32


def not_json(w: World) -> None:
    w.manifest.write_text('{"id": "truncated manifest"')


def wrong_id(doc: dict) -> None:
    doc["id"] = "20000101T000000Z-000000"


def format_99(doc: dict) -> None:
    doc["format"] = 99


def repo_config(change: Callable[[dict], None] | None = None, raw: str | None = None) -> Callable[[World], None]:
    def prepare(w: World) -> None:
        path = w.repo / "config.json"
        if raw is not None:
            path.write_text(raw)
            return
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    return prepare


def bundle_not_json(w: World) -> None:
    (w.repo / "quarantine" / w.incident() / "manifest.json").write_text("[not json")


def bundle_chunk_missing(w: World) -> None:
    incident = w.incident()
    doc = json.loads((w.repo / "quarantine" / incident / "manifest.json").read_text())
    cid = doc["sources"]["db"]["streams"]["kb_chunks"]["chunks"][0][0]
    (w.repo / "chunks" / cid[:2] / cid).unlink()


def second_snapshot(w: World) -> None:
    with w.eng.begin() as c:
        c.exec_driver_sql("UPDATE kb_chunks SET title = 'later' WHERE id = 1")
    assert w.cli("snapshot", "--release", "r1").code == 0


def pg_closed(w: World) -> None:
    w.source(f'backend = "sql"\nurl = "postgresql+psycopg://agent:pw@127.0.0.1:{closed_port()}/agent"\n')


def mariadb_closed(w: World) -> None:
    w.source(f'backend = "sql"\nurl = "mysql+pymysql://agent:pw@127.0.0.1:{closed_port()}/agent"\n')


def redis_closed(w: World) -> None:
    w.source(f'backend = "conversation"\nurl = "redis://127.0.0.1:{closed_port()}/0"\n')


def chroma_closed(w: World) -> None:
    w.source(f'backend = "chroma"\nurl = "http://127.0.0.1:{closed_port()}"\n')


CASES = [
    # malformed and mistaken configuration: one line naming the file and key, before any I/O
    Case("toml-unclosed-table", SNAP, 2, config_text("[repository\nurl = 1\n"), "nothing", "invalid TOML"),
    Case("toml-duplicate-key", SNAP, 2, config_text('[repository]\nurl = "./repo"\nurl = "./x"\n'), "nothing"),
    Case("toml-not-utf8", SNAP, 2, config_text(b"[repository]\nurl = '\xff\xfe'\n"), "nothing", "UTF-8"),
    Case("toml-unknown-section", SNAP, 2, config_text('[repo]\nurl = "./repo"\n'), "nothing", "unknown section"),
    Case("unknown-repository-key", SNAP, 2, config_text('[repository]\nurl = "./repo"\npasswd = "x"\n'), "nothing",
         "repository.passwd"),
    Case("unknown-source-option", SNAP, 2, source('backend = "sql"\nurl = "sqlite:///x.db"\ntabels = ["a"]\n'),
         "nothing", "tabels"),
    Case("unknown-backend", SNAP, 2, source('backend = "mongodb"\nurl = "mongodb://x"\n'), "nothing",
         "unknown backend"),
    Case("backend-missing", SNAP, 2, source('url = "sqlite:///x.db"\n'), "nothing", "backend"),
    Case("backend-not-a-string", SNAP, 2, source('backend = 5\n'), "nothing", "backend"),
    Case("url-missing", SNAP, 2, source('backend = "sql"\n'), "nothing", "url"),
    Case("compression-level-not-int", SNAP, 2,
         config_text('[repository]\nurl = "./repo"\ncompression_level = "high"\n'), "nothing", "compression_level"),
    Case("compression-level-out-of-range", SNAP, 2,
         config_text('[repository]\nurl = "./repo"\ncompression_level = 0\n'), "nothing", "compression_level"),
    Case("tables-not-a-list", SNAP, 2, source('backend = "sql"\nurl = "sqlite:///x.db"\ntables = 5\n'), "nothing",
         "tables"),
    Case("source-name-invalid", SNAP, 2,
         config_text('[repository]\nurl = "./repo"\n[sources."bad name"]\nbackend = "sql"\nurl = "sqlite:///x"\n'),
         "nothing", "source name"),
    Case("env-var-unset", SNAP, 2, source('backend = "sql"\nurl = "${NO_SUCH_VARIABLE_FOR_THIS_TEST}"\n'), "nothing",
         "NO_SUCH_VARIABLE_FOR_THIS_TEST"),
    Case("repository-not-a-table", SNAP, 2, config_text('repository = 5\n'), "nothing", "repository"),
    Case("sources-not-a-table", SNAP, 2, config_text('[repository]\nurl = "./repo"\nsources = "x"\n'), "nothing",
         "sources"),
    Case("config-file-missing", ("--config", "nowhere.toml", "list"), 2, None, "nothing", "not found"),
    Case("config-path-is-a-folder", lambda w: ("--config", str(w.tmp / "repo"), "list"), 2, None, "nothing"),
    Case("repository-url-empty", ("list",), 2, config_text('[repository]\nurl = ""\n'), "nothing", "repository"),
    # bad URLs
    Case("sqlalchemy-url-unparseable", SNAP, 2, source('backend = "sql"\nurl = "not a url"\n'), "state",
         "invalid database URL"),
    Case("sqlalchemy-unknown-dialect", SNAP, 2, source('backend = "sql"\nurl = "foodb://x/y"\n'), "state", "foodb"),
    Case("sqlalchemy-driver-missing", SNAP, 2, source('backend = "sql"\nurl = "oracle+cx_oracle://u@h/db"\n'),
         "state", "driver"),
    Case("repository-unknown-scheme", ("--repo", "ftp://host/x", "list"), 2, None, "nothing", "scheme"),
    Case("repository-s3-without-bucket", ("--repo", "s3:///prefix", "list"), 2, None, "nothing", "bucket"),
    Case("repository-s3-invalid-bucket", ("--repo", "s3://Bad_Bucket!/x", "list"), 2, None, "nothing", "bucket"),
    Case("repository-not-initialised", ("--repo", "./empty", "list"), 5, lambda w: (w.tmp / "empty").mkdir(),
         "nothing", "init"),
    # unreachable stores: exit 1, one line, password not echoed
    Case("postgresql-closed-port", SNAP, 1, pg_closed, "state", "cannot connect"),
    Case("mariadb-closed-port", SNAP, 1, mariadb_closed, "state", "cannot connect"),
    Case("redis-closed-port", SNAP, 1, redis_closed, "state", "redis"),
    Case("chroma-url-nothing-listening", SNAP, 1, chroma_closed, "state", "chroma"),
    # names: refused before any I/O
    Case("release-dotdot", ("snapshot", "--release", "../x"), 2, None, "nothing", "invalid release name"),
    Case("release-slash", ("snapshot", "--release", "a/b"), 2, None, "nothing", "invalid release name"),
    Case("release-tab", ("snapshot", "--release", "tab\there"), 2, None, "nothing", "invalid release name"),
    Case("release-newline", ("snapshot", "--release", "a\nb"), 2, None, "nothing", "invalid release name"),
    Case("release-escape", ("snapshot", "--release", "a\x1b[2Jb"), 2, None, "nothing", "invalid release name"),
    Case("release-non-ascii", ("snapshot", "--release", "ünïcode"), 2, None, "nothing", "invalid release name"),
    Case("release-empty", ("snapshot", "--release", ""), 2, None, "nothing", "invalid release name"),
    Case("release-too-long", ("snapshot", "--release", "x" * 129), 2, None, "nothing", "invalid release name"),
    Case("release-leading-dot", ("snapshot", "--release", ".hidden"), 2, None, "nothing", "invalid release name"),
    Case("incident-dotdot", lambda w: ("restore", w.snap, "--yes", "--incident", "../../x"), 2, None, "nothing",
         "invalid incident name"),
    Case("incident-control", lambda w: ("restore", w.snap, "--yes", "--incident", "a\x07b"), 2, None, "nothing",
         "invalid incident name"),
    Case("incident-non-ascii", lambda w: ("restore", w.snap, "--yes", "--incident", "incidént"), 2, None, "nothing",
         "invalid incident name"),
    Case("source-slash", ("snapshot", "--release", "r2", "--source", "db/x"), 2, None, "nothing",
         "invalid source name"),
    Case("source-dotdot-restore", lambda w: ("restore", w.snap, "--yes", "--source", ".."), 2, None, "nothing",
         "invalid source name"),
    Case("label-value-dotdot", ("snapshot", "--release", "r2", "--label", "k=../v"), 2, None, "nothing", "label"),
    Case("label-key-non-ascii", ("snapshot", "--release", "r2", "--label", "ключ=v"), 2, None, "nothing", "label"),
    Case("label-without-value", ("snapshot", "--release", "r2", "--label", "novalue"), 2, None, "nothing", "label"),
    Case("label-control", ("snapshot", "--release", "r2", "--label", "k=a\x1bb"), 2, None, "nothing", "label"),
    Case("label-given-twice", ("snapshot", "--release", "r2", "--label", "k=a", "--label", "k=b"), 2, None, "nothing",
         "given twice"),
    Case("list-release-space", ("list", "--release", "a b"), 2, None, "nothing", "invalid release name"),
    Case("restore-release-slash", ("restore", "--release", "a/b", "--dry-run"), 2, None, "nothing",
         "invalid release name"),
    Case("forget-keep-release-dotdot", ("forget", "--keep-release", "../x", "--dry-run"), 2, None, "nothing",
         "invalid release name"),
    Case("snapshot-id-path", ("show", "../../config"), 2, None, "nothing", "invalid snapshot id"),
    Case("quarantine-incident-dotdot", ("quarantine", "show", "../x"), 2, None, "nothing", "invalid incident name"),
    # a tampered repository: integrity failures (exit 3), and never a restore from it
    Case("manifest-count-edited", ("verify",), 3, manifest_edit(edit_count), report=True),
    Case("manifest-chunk-reference-removed", ("verify",), 3, manifest_edit(remove_chunk_ref), report=True),
    Case("restore-chunk-reference-removed", lambda w: ("restore", w.snap, "--yes"), 3,
         then_drift(manifest_edit(remove_chunk_ref)), message="does not add up"),
    Case("restore-count-edited", lambda w: ("restore", w.snap, "--yes"), 3,
         then_drift(manifest_edit(edit_count)), message="does not add up"),
    Case("manifest-digest-edited", ("verify", "--read-data"), 3, manifest_edit(edit_digest), report=True),
    Case("restore-digest-edited", lambda w: ("restore", w.snap, "--yes"), 3, then_drift(manifest_edit(edit_digest)),
         message="digest"),
    Case("manifest-chunk-id-edited", ("verify",), 3, manifest_edit(edit_chunk_id), report=True),
    Case("restore-chunk-id-edited", lambda w: ("restore", w.snap, "--yes"), 3,
         then_drift(manifest_edit(edit_chunk_id)), message="missing"),
    Case("manifest-not-json-diff", lambda w: ("diff", w.snap), 3, not_json, message="not JSON"),
    Case("manifest-not-json-show", lambda w: ("show", w.snap), 3, not_json, message="not JSON"),
    Case("manifest-not-json-verify", ("verify",), 3, not_json, report=True),
    Case("manifest-wrong-id", lambda w: ("show", w.snap), 3, manifest_edit(wrong_id), message="does not match"),
    Case("manifest-not-an-object", lambda w: ("show", w.snap), 3, lambda w: w.manifest.write_text("[1, 2]"),
         message="corrupt"),
    Case("manifest-unknown-format", ("list",), 2, manifest_edit(format_99), message="format 99"),
    Case("chunk-truncated", ("verify",), 3, truncate_chunk, report=True),
    Case("chunk-truncated-read-data", ("verify", "--read-data"), 3, truncate_chunk, report=True),
    Case("restore-chunk-truncated", lambda w: ("restore", w.snap, "--yes"), 3, then_drift(truncate_chunk),
         message="corrupt"),
    Case("chunk-emptied", ("verify", "--read-data"), 3, empty_chunk, report=True),
    Case("restore-chunk-byte-flipped", lambda w: ("restore", w.snap, "--yes"), 3, then_drift(flip_chunk),
         message="corrupt"),
    Case("diff-chunk-byte-flipped", lambda w: ("diff", w.snap), 3, flip_chunk, message="corrupt"),
    Case("repository-unknown-format", ("list",), 2, repo_config(lambda d: d.update(format=99)), message="format"),
    Case("repository-config-not-json", ("list",), 3, repo_config(raw="{nope"), message="config"),
    Case("quarantine-bundle-not-json", ("quarantine", "list"), 3, bundle_not_json, message="not JSON"),
    Case("quarantine-bundle-chunk-missing", ("quarantine", "show", "inc-1"), 3, bundle_chunk_missing,
         message="missing"),
    # the command line itself
    Case("snapshot-and-release-both", lambda w: ("restore", w.snap, "--release", "r1", "--dry-run"), 2),
    Case("before-without-release", lambda w: ("restore", w.snap, "--before", "2h", "--dry-run"), 2),
    Case("failure-at-unparseable", lambda w: ("restore", w.snap, "--yes", "--failure-at", "yesterday"), 2,
         then_drift(lambda w: None), "state", "invalid time"),
    Case("before-unparseable", ("restore", "--release", "r1", "--before", "soon", "--dry-run"), 2, None, "state",
         "invalid time"),
    Case("snapshot-unknown", ("show", "20991231T000000Z-abcdef"), 5),
    Case("snapshot-prefix-ambiguous", ("show", "20"), 2, second_snapshot, message="ambiguous"),
    Case("option-unknown", ("snapshot", "--relase", "r2"), 2, None, "nothing", "--relase"),
    Case("command-unknown", ("snapshoot",), 2, None, "nothing"),
    Case("limit-zero", ("list", "--limit", "0"), 2, None, "nothing", "--limit"),
    Case("lock-wait-negative", ("--lock-wait", "-1", "list"), 2, None, "nothing", "--lock-wait"),
    Case("source-unknown", ("snapshot", "--release", "r2", "--source", "nosuch"), 5, None, "state", "nosuch"),
    Case("stream-unknown", lambda w: ("diff", w.snap, "--stream", "nosuch"), 5, None, "state", "nosuch"),
    Case("restore-without-yes-or-terminal", lambda w: ("restore", w.snap), 6, then_drift(lambda w: None),
         "state", "--yes"),
    Case("mark-good-unknown", ("mark-good", "20991231T000000Z-abcdef"), 5),
    Case("table-without-primary-key", SNAP, 2,
         source('backend = "sql"\nurl = "sqlite:///agent.db"\ntables = ["kb_chunks", "no_pk"]\n'), "state",
         "primary key"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case: Case, world: World):
    if case.prepare:
        case.prepare(world)
    args = case.args(world) if callable(case.args) else case.args
    for as_json in (False, True):
        listing, committed, rows = world.listing(), world.committed(), world.rows()
        r = world.cli(*(("--json",) if as_json else ()), *args)
        err = assert_one_line_error(r, case.code, as_json, case.report)
        if case.message:
            text = err["message"] if err else r.err
            assert case.message.lower() in text.lower(), (case.message, text)
        if case.scope == "nothing":
            assert world.listing() == listing
        assert world.committed() == committed
        assert world.locks() == []
        assert world.rows() == rows


def test_case_count():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


# -- foreign files and init ------------------------------------------------------------------

def test_foreign_files_are_ignored(world: World):
    foreign = {
        "README.txt": b"notes about this bucket",
        ".DS_Store": b"\x00\x01",
        "snapshots/notes.txt": b"x",
        "snapshots/r1/draft.json": b"{}",
        f"snapshots/r1/{world.snap}.json.bak": b"{}",
        "snapshots/r1/nested/deeper.json": b"{}",
        "chunks/zz/not-a-chunk": b"junk",
        "chunks/README": b"junk",
        "quarantine/notes.txt": b"x",
        "quarantine/inc-x/readme.md": b"x",
        "good/README": b"x",
    }
    for name, data in foreign.items():
        path = world.repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for as_json in (False, True):
        flag = ("--json",) if as_json else ()
        r = world.cli(*flag, "list")
        assert r.code == 0 and "Traceback" not in r.err, r.err
        if as_json:
            assert [s["id"] for s in r.json()] == [world.snap]
        r = world.cli(*flag, "verify", "--all", "--read-data")
        assert r.code == 0, r.out + r.err
        if as_json:
            assert r.json()["checked"] == 1
        for args in (("quarantine", "list"), ("audit", "verify"), ("show", world.snap), ("diff", world.snap)):
            r = world.cli(*flag, *args)
            assert r.code == 0 and "Traceback" not in r.err, (args, r.err)
    world.drift()
    assert world.cli("restore", world.snap, "--yes").code == 0
    assert all((world.repo / name).read_bytes() == data for name, data in foreign.items())


def test_init_refuses_a_non_empty_folder_that_is_not_a_repository(world: World):
    other = world.tmp / "other"
    other.mkdir()
    (other / "precious.txt").write_text("do not touch")
    before = world.listing(other)
    for flag in ((), ("--json",)):
        r = world.cli(*flag, "--repo", str(other), "init")
        assert_one_line_error(r, 2, bool(flag))
        assert "not empty" in r.err
        assert world.listing(other) == before
    # an existing repository: init is idempotent and changes nothing
    before = world.listing()
    r = world.cli("--json", "init")
    assert r.code == 0 and r.json()["created"] is False
    assert world.listing() == before


# -- data that is awkward on purpose -----------------------------------------------------------

def test_50_mb_value_round_trips(tmp_path, cli):
    """A record bigger than a chunk's max_bytes becomes a chunk of its own: a 50 MB
    blob snapshots, verifies and restores bit for bit."""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    eng = sa.create_engine(url)
    big = os.urandom(50 * 1024 * 1024)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE docs (id INTEGER PRIMARY KEY, body BLOB)")
        c.exec_driver_sql("INSERT INTO docs VALUES (1, x'00'), (2, ?), (3, 'after')", (big,))
    (tmp_path / "snapshotter.toml").write_text(f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\n'
                                               f'url = "{url}"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "big")
    assert r.code == 0, r.err
    snap = r.json()
    assert snap["sources"]["db"]["streams"]["docs"]["records"] == 3 and snap["sources"]["db"]["streams"]["docs"]["chunks"] >= 2
    assert cli("verify", "--read-data").code == 0
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE docs SET body = ? WHERE id = 2", (os.urandom(1000),))
    r = cli("--json", "restore", snap["id"], "--yes")
    assert r.code == 0, r.err
    assert r.json()["plan"]["db"]["docs"] == {"added": 0, "modified": 1, "deleted": 0}
    with eng.connect() as c:
        assert c.exec_driver_sql("SELECT body FROM docs WHERE id = 2").scalar() == big
    eng.dispose()


def _pk_tables(eng: sa.Engine) -> None:
    md = sa.MetaData()
    text = sa.String(64)
    sa.Table("composite", md, sa.Column("session", text, primary_key=True),
             sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False), sa.Column("msg", sa.Text))
    sa.Table("bytes_key", md, sa.Column("k", sa.LargeBinary(32) if eng.dialect.name != "mysql" else sa.VARBINARY(32),
                                        primary_key=True), sa.Column("v", sa.Text))
    sa.Table("text_key", md, sa.Column("k", text, primary_key=True), sa.Column("v", sa.Integer))
    md.create_all(eng)
    names = ["a", "B", "Z", "z", "é", "ü", "ß", "Ω", "漢字", "😀", "a b", "a-b", "a_b", "é́", "ÿ", "İ", "ﬀ", "Ａ"]
    with eng.begin() as c:
        c.execute(md.tables["composite"].insert(),
                  [{"session": s, "seq": i, "msg": f"{s}:{i}"} for s in names for i in (2, 10, 1)])
        c.execute(md.tables["bytes_key"].insert(),
                  [{"k": k, "v": repr(k)} for k in (b"\x00", b"\x00\x00", b"\x01", b"\x7f", b"\x80", b"\xff",
                                                    b"\xff\x00", b"A", b"a", bytes(range(32)))])
        c.execute(md.tables["text_key"].insert(), [{"k": s, "v": i} for i, s in enumerate(names)])


def test_composite_bytes_and_non_ascii_keys_round_trip(any_db_url, tmp_path, cli):
    eng = sa.create_engine(any_db_url)
    _pk_tables_for(eng)
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "{any_db_url}"\n'
        f'tables = ["composite", "bytes_key", "text_key"]\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "keys")
    assert r.code == 0, r.err
    snap = r.json()["id"]

    def state():
        with eng.connect() as c:
            return {t: sorted(tuple(row) for row in c.exec_driver_sql(f"SELECT * FROM {t}").fetchall())
                    for t in ("composite", "bytes_key", "text_key")}
    original = state()
    with eng.begin() as c:
        c.exec_driver_sql("DELETE FROM composite WHERE seq = 2")
        c.exec_driver_sql("UPDATE text_key SET v = -1")
        c.exec_driver_sql("DELETE FROM bytes_key")
    r = cli("--json", "restore", snap, "--yes")
    assert r.code == 0, r.err
    assert state() == original
    r = cli("--json", "diff", snap)
    assert all(not any(c.values()) for c in r.json()["plan"]["db"].values())
    assert cli("verify", "--read-data").code == 0
    eng.dispose()


def _pk_tables_for(eng: sa.Engine) -> None:
    if eng.dialect.name == "mysql":
        # MariaDB's default collations fold case and accents, so keys that differ only so would
        # collide; a binary collation keeps them distinct, compared by code point as elsewhere
        with eng.begin() as c:
            c.exec_driver_sql("ALTER DATABASE CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    _pk_tables(eng)


def test_table_without_primary_key_is_left_out_by_default(world: World):
    world.source(f'backend = "sql"\nurl = "{world.url}"\n')
    r = world.cli("--json", "snapshot", "--release", "r2")
    assert r.code == 0, r.err
    assert list(r.json()["sources"]["db"]["streams"]) == ["kb_chunks"]


def test_chroma_collection_recreated_with_another_dimension_is_refused(tmp_path, cli):
    pytest.importorskip("snapshotter_backends.chroma")
    import chromadb
    from chromadb.api.shared_system_client import SharedSystemClient
    path = tmp_path / "chroma"

    def release():
        for system in list(SharedSystemClient._identifier_to_system.values()):
            system.stop()
        SharedSystemClient.clear_system_cache()

    client = chromadb.PersistentClient(path=str(path))
    client.create_collection("kb_docs").add(ids=["a", "b"], embeddings=[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]],
                                            documents=["a", "b"])
    release()
    (tmp_path / "snapshotter.toml").write_text('[repository]\nurl = "./repo"\n[sources.mem]\nbackend = "chroma"\n'
                                               'path = "./chroma"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "v1")
    release()
    assert r.code == 0, r.err
    snap = r.json()["id"]
    # the agent recreated the collection with 4-dimensional embeddings
    client = chromadb.PersistentClient(path=str(path))
    client.delete_collection("kb_docs")
    client.create_collection("kb_docs").add(ids=["a", "c"], embeddings=[[1.0, 2.0, 3.0, 4.0]] * 2,
                                            documents=["a4", "c4"])
    release()
    for flag in ((), ("--json",)):
        r = cli(*flag, "restore", snap, "--yes")
        release()
        err = assert_one_line_error(r, 2, bool(flag))
        assert "dimension" in (err["message"] if err else r.err)
    assert not (tmp_path / "repo" / "quarantine").exists()
    client = chromadb.PersistentClient(path=str(path))
    got = client.get_collection("kb_docs").get(include=["documents"])
    assert sorted(got["documents"]) == ["a4", "c4"]
    release()


# -- S3 repositories that cannot be used -------------------------------------------------------

def test_s3_without_credentials_fails_cleanly(world: World, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(world.tmp / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(world.tmp / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    world.write_config(repository=f'url = "s3://bkt/x"\nendpoint_url = "http://127.0.0.1:{closed_port()}"\n'
                                  f'region = "us-east-1"\n')
    for flag in ((), ("--json",)):
        r = world.cli(*flag, "init")
        err = assert_one_line_error(r, 1, bool(flag))
        assert "credentials" in (err["message"] if err else r.err)


def test_s3_endpoint_unreachable_fails_cleanly_within_seconds(world: World, monkeypatch):
    """A wrong endpoint is said in seconds (first contact is tried 3 times, not botocore's
    8 backed-off attempts, which took the better part of a minute)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    world.write_config(repository=f'url = "s3://bkt/x"\nendpoint_url = "http://127.0.0.1:{closed_port()}"\n'
                                  f'region = "us-east-1"\n')
    for args in (("--json", "list"), ("--json", "init")):
        started = time.monotonic()
        err = assert_one_line_error(world.cli(*args), 1, True)
        assert time.monotonic() - started < 15
        assert "Could not connect to the endpoint" in err["message"]
