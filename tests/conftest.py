"""Shared fixtures: real services (PostgreSQL, MariaDB, Redis on this machine; a
Chroma server and an S3 endpoint started here on free loopback ports), a clean
environment for every test, and a CLI runner that goes through ``main``.

A service that is down fails the test with a clear message when ``CI`` is set,
and skips it with that message otherwise.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("SNAPSHOTTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MYSQL_ADMIN_URL = os.environ.get("SNAPSHOTTER_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("SNAPSHOTTER_TEST_REDIS", "redis://127.0.0.1:6379/0")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def service_down(name: str, detail: str):
    msg = f"{name} is not reachable ({detail}); start it or set the SNAPSHOTTER_TEST_* URL"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No SNAPSHOTTER_* or AWS settings leak in from the machine; work in a tmp dir."""
    for k in list(os.environ):
        if k.startswith("SNAPSHOTTER_") and not k.startswith("SNAPSHOTTER_TEST_"):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


# -- CLI -----------------------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


class CLI:
    """Runs ``snapshotter.cli.main`` in-process, capturing stdout and stderr."""

    def __init__(self, cwd):
        self.cwd = cwd

    def __call__(self, *args: str, input: str | None = None) -> Result:
        from snapshotter.cli import main
        out, err = io.StringIO(), io.StringIO()
        old_in = sys.stdin
        sys.stdin = io.StringIO(input or "")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
        finally:
            sys.stdin = old_in
        return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(tmp_path):
    return CLI(tmp_path)


def drift_then_restore(cli, eng, snapshot_id: str, table: str, statements: list[str], plan: dict, rows) -> None:
    """Change the table, check that diff counts ``plan`` and that a restore verifies and gives
    back what ``rows()`` returned before the change (the live table's content, in any order)."""
    before = rows()
    with eng.begin() as c:
        for sql in statements:
            c.exec_driver_sql(sql)
    r = cli("--json", "diff", snapshot_id)
    assert r.code == 0, r.err
    assert r.json()["plan"]["db"][table] == plan
    r = cli("--json", "restore", snapshot_id, "--yes")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    assert rows() == before


def run_cli_subprocess(*args: str, env: dict | None = None, cwd=None, timeout: float = 120) -> Result:
    """The real console entry point in a child process (for signals, kill -9 and tracebacks)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "snapshotter", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=cwd, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def on_terminal(args: list[str], cwd, answer: str | None, *, before_answer=None, env: dict | None = None
                ) -> tuple[int, str]:
    """The console program on a pseudo-terminal: read until it asks, run ``before_answer``,
    then type ``answer``.  Returns the exit code and everything the program printed."""
    import pty
    import select
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "snapshotter", *args], cwd=cwd, stdin=slave, stdout=slave,
                         stderr=slave, close_fds=True, env={**os.environ, **(env or {})})
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    asked = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
        if not asked and b"[y/N]" in out:
            asked = True
            if before_answer:
                before_answer()
            os.write(master, answer.encode() + b"\n")
        if p.poll() is not None and not ready:
            break
    code = p.wait(timeout=30)
    os.close(master)
    return code, out.decode("utf-8", "replace")


def install_plugin(site, dist: str, modules: dict[str, str], entry_points: dict[str, str]) -> dict:
    """A plugin distribution in the folder ``site`` as pip leaves one: its modules (name ->
    source text) and a dist-info registering ``entry_points`` (backend name -> object
    reference) under ``snapshotter.backends``.  Returns the environment a child process
    needs to find it (the folder on PYTHONPATH); in this process, put ``site`` on sys.path."""
    site = Path(site)
    site.mkdir(parents=True, exist_ok=True)
    for name, text in modules.items():
        path = site.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[snapshotter.backends]\n" + "".join(f"{name} = {ref}\n" for name, ref in entry_points.items()))
    return {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}


def pytest_addoption(parser):
    parser.addoption("--backend-adapter", action="append", default=[], metavar="MODULE:CLASS",
                     help="run the source-backend conformance suite (tests/conformance) on this adapter "
                          "instead of the built-in ones (docs/conformance.md); may be repeated")


# -- databases -------------------------------------------------------------------

@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database, dropped afterwards."""
    sa = pytest.importorskip("sqlalchemy")
    name = "snap_" + secrets.token_hex(4)
    try:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # noqa: BLE001 - any failure here means the service is not usable
        service_down("PostgreSQL", str(exc).splitlines()[0])
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def mysql_url():
    """A fresh MariaDB database, dropped afterwards."""
    sa = pytest.importorskip("sqlalchemy")
    name = "snap_" + secrets.token_hex(4)
    try:
        admin = sa.create_engine(MYSQL_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    except Exception as exc:  # noqa: BLE001
        service_down("MariaDB", str(exc).splitlines()[0])
    url = sa.engine.make_url(MYSQL_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url + ("&" if "?" in url else "?") + "charset=utf8mb4"
    with admin.connect() as c:
        c.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'agent.db'}"


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def any_db_url(request):
    """The same test on SQLite, PostgreSQL and MariaDB."""
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url", "mariadb": "mysql_url"}[request.param])


@pytest.fixture
def redis_client():
    """A Redis connection and a key prefix private to this test (keys removed afterwards)."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        service_down("Redis", str(exc).splitlines()[0])
    prefix = f"t{secrets.token_hex(4)}:"
    client.test_prefix = prefix
    yield client
    for k in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(k)
    client.close()


# -- S3 (moto over real HTTP) ------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A new bucket on the moto server; AWS credentials for it come from the environment (the boto3 chain)."""
    import boto3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    name = "snap-" + secrets.token_hex(4)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


# -- Chroma server -------------------------------------------------------------------

@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """`chroma run` on a free loopback port, for the session."""
    exe = shutil.which("chroma")
    if exe is None:
        service_down("chroma server", "the `chroma` command is not installed")
    port = free_port()
    path = tmp_path_factory.mktemp("chroma-server")
    log = open(path / "server.log", "wb")
    proc = subprocess.Popen([exe, "run", "--path", str(path / "data"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    if not wait_port(port, 60, proc):
        proc.kill()
        service_down("chroma server", f"did not start; see {path / 'server.log'}")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
