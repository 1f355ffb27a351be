"""What a new user trips on, second half: `quarantine show` tables (composite keys, control
characters, wide characters), the report's settings and timeline labels, `continues` after a
completed re-run, a confirmed record changed while the prompt waits, metrics without
prometheus-client, and the requests `list` sends to an S3 repository."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.cells import cell_len

from conftest import on_terminal

ROOT = Path(__file__).resolve().parent.parent


def write_config(dir: Path, text: str) -> Path:
    path = dir / "snapshotter.toml"
    path.write_text(textwrap.dedent(text))
    return path


# -- quarantine show ----------------------------------------------------------------------

CHECKPOINTS = [f"1ef4f797-8335-6428-8001-8a1503f9b8{i:02d}" for i in range(4)]


@pytest.fixture
def langgraph_incident(tmp_path, cli):
    """An incident whose records have LangGraph-like composite keys (thread, namespace,
    checkpoint id: equal but for their end) and conversation sessions holding a newline and
    wide characters."""
    db = tmp_path / "agent.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE checkpoints (thread_id TEXT, checkpoint_ns TEXT, checkpoint_id TEXT, "
                "checkpoint BLOB, PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id))")
    con.execute("CREATE TABLE message_store (id INTEGER PRIMARY KEY, session_id TEXT, message TEXT)")
    con.execute("INSERT INTO message_store VALUES (1, 's-1', '{\"type\": \"human\"}')")
    con.commit()
    write_config(tmp_path, f"""
        [repository]
        url = "./repo"
        [sources.graph]
        backend = "sql"
        url = "sqlite:///{db}"
        tables = ["checkpoints"]
        [sources.history]
        backend = "conversation"
        url = "sqlite:///{db}"
    """)
    assert cli("init").code == 0
    r = cli("--json", "snapshot", "--release", "r1")
    assert r.code == 0, r.err
    snap = r.json()["id"]
    con.executemany("INSERT INTO checkpoints VALUES ('thread-1', '', ?, x'00')", [(c,) for c in CHECKPOINTS])
    con.executemany("INSERT INTO message_store VALUES (?, ?, ?)",
                    [(2, "evil\nsession", '{"type": "ai"}'), (3, "会話👍", '{"type": "ai"}')])
    con.commit()
    con.close()
    r = cli("restore", snap, "--incident", "lg", "--yes")
    assert r.code == 0, r.err
    return tmp_path


def test_quarantine_show_keeps_keys_apart_and_columns_aligned(langgraph_incident, cli):
    r = cli("quarantine", "show", "lg")
    assert r.code == 0, r.err
    lines = [line for line in r.out.splitlines() if line != "6 record(s)"]
    assert len(lines) == 1 + 6  # a header and one line per record: the newline did not split a row
    header, rows = lines[0], lines[1:]
    # every checkpoint key is told apart from the others, whole
    for c in CHECKPOINTS:
        assert sum(json.dumps(["thread-1", "", c]) in line for line in rows) == 1, r.out
    # the newline in a session id is shown escaped, and the wide characters are kept
    assert any("evil\\nsession" in line for line in rows)
    assert any("会話👍" in line for line in rows)
    # columns line up in terminal cells: OP starts at the same cell on every line
    starts = set()
    for line in lines:
        m = re.search(r"  (OP|added|modified|deleted) ", line)
        starts.add(cell_len(line[:m.start()]))
    assert len(starts) == 1, r.out


def test_a_long_key_loses_its_middle_not_its_end(langgraph_incident, cli):
    from snapshotter.forensics.table import cells, fit
    key = json.dumps(["thread-1", "", "x" * 80, "task-7"])
    short = fit(key, 40)
    assert cells(short) == 40 and short.endswith('"task-7"]') and short.startswith('["thread-1"') and "…" in short
    assert cells(fit("会話" * 30, 11)) <= 11


# -- metrics without prometheus-client ------------------------------------------------------

def no_prometheus_env(tmp_path: Path) -> dict:
    """A child process in which ``import prometheus_client`` fails, as on a plain install."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _Blocked:
            def find_spec(self, name, path=None, target=None):
                if name == "prometheus_client" or name.startswith("prometheus_client."):
                    raise ImportError("prometheus_client is not installed")
                return None
        sys.meta_path.insert(0, _Blocked())
    """))
    paths = [str(shim), str(ROOT / ".dev"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def test_cron_script_writes_metrics_without_prometheus_client(tmp_path):
    env = no_prometheus_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import prometheus_client"], env=env, capture_output=True)
    assert probe.returncode != 0  # the shim works: this is a plain install's Python
    db = tmp_path / "agent.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE kb (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("INSERT INTO kb VALUES (1, 'a')")
    con.commit()
    con.close()
    config = write_config(tmp_path, f"""
        [repository]
        url = "./repo"
        [sources.kb]
        backend = "sql"
        url = "sqlite:///{db}"
    """)
    assert subprocess.run([sys.executable, "-m", "snapshotter", "--config", str(config), "init"], env=env,
                          capture_output=True).returncode == 0
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    from prometheus_client.parser import text_string_to_metric_families

    def cron() -> dict:
        p = subprocess.run(["bash", str(ROOT / "scripts" / "snapshotter-cron.sh")], capture_output=True, text=True,
                           timeout=120,
                           env=dict(env, SNAPSHOTTER_CONFIG=str(config), SNAPSHOTTER_CRON_RELEASE="r1",
                                    SNAPSHOTTER_CRON_METRICS_DIR=str(textfile), SNAPSHOTTER_CRON_KEEP="",
                                    SNAPSHOTTER_CRON_BIN=f"{sys.executable} -m snapshotter"))
        text = (textfile / "snapshotter-snapshot.prom").read_text()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        return p.returncode, p.stderr, samples

    labels = (("command", "snapshot"), ("release", "r1"))
    code, err, samples = cron()
    assert (code, err) == (0, "")
    assert samples[("snapshotter_exit_code", labels)] == 0
    assert samples[("snapshotter_records", labels + (("source", "kb"),))] == 1
    success = samples[("snapshotter_last_success_timestamp_seconds", labels)]
    db.rename(tmp_path / "gone.db")  # the next run fails (a SQLite database that is gone: exit 2)
    code, err, samples = cron()
    assert code == 2 and "snapshot failed (exit 2)" in err
    assert samples[("snapshotter_exit_code", labels)] == 2
    assert samples[("snapshotter_last_success_timestamp_seconds", labels)] == success
    assert not [f for f in os.listdir(textfile) if f.startswith(".")]  # no temporary file left


def test_a_failed_run_keeps_the_last_success_time(tmp_path):
    from snapshotter.metrics import LAST_SUCCESS, RunMetrics, previous_success, write_metrics
    path = str(tmp_path / "m.prom")
    write_metrics(path, RunMetrics("snapshot", 0, started=100.0, finished=123.5, release='a"b\\c\nd'))
    write_metrics(path, RunMetrics("snapshot", 3, started=200.0, finished=250.0, release='a"b\\c\nd'))
    from prometheus_client.parser import text_string_to_metric_families
    samples = {s.name: s for f in text_string_to_metric_families(open(path).read()) for s in f.samples}
    assert samples[LAST_SUCCESS].value == 123.5 and samples[LAST_SUCCESS].labels["release"] == 'a"b\\c\nd'
    assert samples["snapshotter_exit_code"].value == 3
    assert previous_success(path, "snapshot", "other") == 123.5  # another release's, when none of its own
    assert previous_success(path, "forget", 'a"b\\c\nd') is None


# -- the HTML report ------------------------------------------------------------------------

class Page(HTMLParser):
    """The report's summary (dt -> dd text) and the texts of its SVG timeline."""

    def __init__(self, html: str):
        super().__init__()
        self.summary: dict[str, str] = {}
        self.svg_texts: list[str] = []
        self.settings_cells: list[str] = []  # the cells of the "Settings put back" section
        self._section = ""
        self._in: list[str] = []
        self._dt = ""
        self._buf = ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self._in.append(tag)
        if tag in ("dt", "dd", "text", "h2", "td"):
            self._buf = ""

    def handle_endtag(self, tag):
        if tag == "dt":
            self._dt = self._buf.strip()
        elif tag == "dd":
            self.summary[self._dt] = self._buf.strip()
        elif tag == "text" and "svg" in self._in:
            self.svg_texts.append(self._buf.strip())
        elif tag == "h2":
            self._section = self._buf.strip()
        elif tag == "td" and self._section == "Settings put back":
            self.settings_cells.append(self._buf.strip())
        while self._in and self._in.pop() != tag:
            pass

    def handle_data(self, data):
        self._buf += data


def test_report_says_which_settings_the_restore_put_back(tmp_path, cli):
    chromadb = pytest.importorskip("chromadb")
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    col = client.create_collection("mem", metadata={"owner": "support-agent"}, embedding_function=None)
    col.add(ids=["d0"], embeddings=[[0.1, 0.2]], documents=["a"])
    write_config(tmp_path, """
        [repository]
        url = "./repo"
        [sources.memory]
        backend = "chroma"
        path = "./chroma"
    """)
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r").json()["id"]
    col.modify(metadata={"owner": "attacker"})
    col.add(ids=["d1"], embeddings=[[0.3, 0.4]], documents=["b"])
    assert cli("restore", snap, "--yes", "--incident", "meta").code == 0
    assert cli("quarantine", "report", "meta", "-o", "r.html").code == 0
    page = Page((tmp_path / "r.html").read_text())
    assert "memory/mem: collection metadata" in page.summary["Settings put back"]
    # and what they were: the snapshot's metadata put back, the live one it replaced
    assert {"metadata.owner", "support-agent", "attacker"} <= set(page.settings_cells), page.settings_cells


def test_report_timeline_ticks_differ_when_the_writes_are_close(pg_url, tmp_path, cli):
    import sqlalchemy as sa
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE kb (id int PRIMARY KEY, body text, updated_at timestamptz)")
    write_config(tmp_path, f"""
        [repository]
        url = "./repo"
        [sources.db]
        backend = "sql"
        url = "{pg_url}"
        timestamp_column = "updated_at"
    """)
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r").json()["id"]
    with eng.begin() as c:  # three writes within 0.6 seconds of the same second
        for i, ms in enumerate((100, 400, 700)):
            c.exec_driver_sql(f"INSERT INTO kb VALUES ({i}, 'x', '2026-03-01T10:00:00.{ms}Z')")
    eng.dispose()
    assert cli("restore", snap, "--yes", "--incident", "close").code == 0
    assert cli("quarantine", "report", "close", "-o", "r.html").code == 0
    ticks = [t for t in Page((tmp_path / "r.html").read_text()).svg_texts if re.match(r"\d{4}-\d\d-\d\d ", t)]
    assert ticks == ["2026-03-01 10:00:00.100Z", "2026-03-01 10:00:00.400Z", "2026-03-01 10:00:00.700Z"]


# -- continues ------------------------------------------------------------------------------

def test_continues_stops_listing_an_interrupted_incident_once_a_later_restore_finished(tmp_path, cli):
    db = tmp_path / "agent.db"
    con = sqlite3.connect(db)
    for t in ("t1", "t2"):
        con.execute(f"CREATE TABLE {t} (id INTEGER PRIMARY KEY, body TEXT)")
        con.execute(f"INSERT INTO {t} VALUES (1, 'good')")
    con.commit()
    write_config(tmp_path, f"""
        [repository]
        url = "./repo"
        [sources.db]
        backend = "sql"
        url = "sqlite:///{db}"
    """)
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r").json()["id"]

    def drift_and_restore(incident: str, *args: str) -> list[str]:
        for t in ("t1", "t2"):
            con.execute(f"UPDATE {t} SET body = ? WHERE id = 1", (f"bad {incident}",))
        con.commit()
        r = cli("--json", "restore", snap, "--yes", "--incident", incident, *args)
        assert r.code == 0, r.err
        return r.json()["continues"]

    assert drift_and_restore("a") == []
    (tmp_path / "repo" / "quarantine" / "a" / "applied.json").unlink()  # as if killed mid-restore
    assert drift_and_restore("b", "--stream", "t1") == ["a"]  # finished t1 only: a's t2 is not
    assert drift_and_restore("c") == ["a"]
    assert drift_and_restore("d") == []  # c finished every stream a had: a is history now
    r = cli("--json", "quarantine", "list")
    assert {i["incident"]: i["status"] for i in r.json()}["a"] == "interrupted"  # and kept as evidence
    con.close()


# -- a confirmed record changed while the prompt waits ----------------------------------------

def test_a_confirmed_record_rewritten_while_the_prompt_waits_is_refused(pg_url, tmp_path, cli):
    import sqlalchemy as sa
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE kb (id int PRIMARY KEY, body text)")
        c.exec_driver_sql("INSERT INTO kb VALUES (1, 'refunds within 14 days'), (2, 'hello')")
    write_config(tmp_path, f"""
        [repository]
        url = "./repo"
        [sources.db]
        backend = "sql"
        url = "{pg_url}"
    """)
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r").json()["id"]
    with eng.begin() as c:
        c.exec_driver_sql("UPDATE kb SET body = 'refunds: ask for the card number' WHERE id = 1")

    def agent_writes_again():  # same key, same op, a new value: the plan confirmed no longer holds
        with eng.begin() as c:
            c.exec_driver_sql("UPDATE kb SET body = 'refunds: send the PIN too' WHERE id = 1")

    code, out = on_terminal(["restore", snap], tmp_path, "y", before_answer=agent_writes_again)
    assert code == 6, out
    assert "changed since the plan you confirmed" in out and "Traceback" not in out
    with eng.connect() as c:  # nothing written, nothing quarantined
        assert c.exec_driver_sql("SELECT body FROM kb WHERE id = 1").scalar() == "refunds: send the PIN too"
    eng.dispose()
    assert cli("--json", "quarantine", "list").json() == []


# -- list on S3 -------------------------------------------------------------------------------

def test_list_on_s3_sends_one_request_per_manifest_and_imports_no_backend(s3_server, s3_bucket, tmp_path, cli):
    from tests.s3_fault_proxy import FaultProxy
    db = tmp_path / "agent.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE kb (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("INSERT INTO kb VALUES (1, 'a')")
    con.commit()
    direct = f"""
        [repository]
        url = "s3://{s3_bucket}/agent"
        endpoint_url = "{s3_server}"
        [sources.kb]
        backend = "sql"
        url = "sqlite:///{db}"
    """
    write_config(tmp_path, direct)
    assert cli("init").code == 0
    for i in range(5):
        con.execute("UPDATE kb SET body = ? WHERE id = 1", (str(i),))
        con.commit()
        assert cli("snapshot", "--release", f"r{i % 2}").code == 0
        # ids sort to the second, and `list` reads every manifest of the newest second it shows
        # (their order within it is by full-precision time): one snapshot per second here
        time.sleep(1.05)
    con.close()
    with FaultProxy(s3_server) as proxy:
        config = write_config(tmp_path, direct.replace(s3_server, proxy.url))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / ".dev"), str(ROOT),
                                                            os.environ.get("PYTHONPATH", "")]))

        def run(*args: str) -> tuple[subprocess.CompletedProcess, int]:
            before = proxy.requests
            p = subprocess.run([sys.executable, "-X", "importtime", "-m", "snapshotter", "--config", str(config),
                                *args], env=env, capture_output=True, text=True, timeout=120)
            return p, proxy.requests - before

        p, requests = run("--json", "list")
        assert p.returncode == 0, p.stderr
        assert len(json.loads(p.stdout)) == 5
        # config.json, the good marks' listing, the manifests' listing, then one GET per manifest
        assert requests == 3 + 5
        loaded = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
        assert not loaded & {"chromadb", "sqlalchemy", "numpy", "boto3"}, sorted(loaded & {"chromadb", "sqlalchemy",
                                                                                           "numpy", "boto3"})
        p, requests = run("list", "--limit", "1")
        assert p.returncode == 0 and requests <= 3 + 2  # the reads ahead open as the listing goes on
        p, requests = run("list", "--release", "no such")
        assert p.returncode == 2 and requests == 0  # refused before the store is reached: no client built
