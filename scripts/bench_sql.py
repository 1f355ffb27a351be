#!/usr/bin/env python3
"""SQL snapshots against each database's own dump tool, by dialect and table shape.

    python scripts/bench_sql.py [--dialect postgresql|mariadb|sqlite|all]
                                [--shape events|narrow|wide|incompressible|embeddings|all]
                                [--rows N | --scale F] [--runs 3] [--startup]
                                [--generic] [--floor] [--db NAME] [--keep] [--json]

For each (dialect, shape) a scratch database (a temporary file for SQLite) gets
one table, built on the server side (generate_series, MariaDB's sequence
tables, a recursive CTE; the embeddings of MariaDB and SQLite in batches of
executemany).  The shapes, with their default row counts (--scale multiplies
them, --rows replaces them):

* events (PostgreSQL only; the default, and the table this script measured
  before it knew shapes): bigint key, session, timestamptz, numeric, ~550 chars
  of prose-like text, jsonb; 500,000 rows;
* narrow: bigint key, int, short text, real; 2,000,000 rows;
* wide: ~600 B of repetitive text and a json/jsonb document; 500,000 rows;
* incompressible: ~300 random bytes (bytea / BLOB); 300,000 rows;
* embeddings: 384 floats (real[] on PostgreSQL, JSON text on MariaDB, a BLOB
  of float32 on SQLite); 100,000 rows.

Then, in alternation, --runs times each of:

* the snapshot: ``python -m snapshotter snapshot`` into a fresh local
  repository (the real CLI in a child process, a config written for the
  table): wall and CPU time, repository bytes, peak RSS of the child;
* the native tool: PostgreSQL ``pg_dump -t T DB | zstd -3`` and the server's
  ordered read ``psql -c "COPY (SELECT * FROM T ORDER BY key) TO STDOUT" >
  /dev/null``; MariaDB ``mysqldump --single-transaction DB T | zstd -3``;
  SQLite ``sqlite3 DB ".dump T" | zstd -3``;
* PostgreSQL only: with --generic, the snapshot with the COPY fast path off
  (``SNAPSHOTTER_PG_COPY=0``); with --floor, the least a Python client can do
  for the same output (rows through ``COPY`` in key order, joined into 2.8 MB
  buffers, ``zstd -3`` in one thread per CPU, one file each).

Medians are printed with the ratios the targets are stated in: PostgreSQL
snapshot / ordered read <= 1.4 on each shape, and <= 1.0x ``pg_dump | zstd``
on wide (and on events, its old target); MariaDB <= 1.5x ``mysqldump | zstd``;
SQLite <= 1.0x ``sqlite3 .dump | zstd``; peak RSS < 300 MB.  With --startup,
the whole snapshot process of a 5,000-row narrow table is timed too (target
<= 0.3 s).  Scratch databases are dropped at the end unless --keep.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import secrets
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

from benchlib import compile_project

PG = os.environ.get("SNAPSHOTTER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
MY = os.environ.get("SNAPSHOTTER_BENCH_MARIADB", "mysql://root@127.0.0.1:3306/mysql")
TABLE = "agent_events"
RSS_LIMIT_MB = 300
STARTUP_ROWS = 5000
STARTUP_LIMIT_S = 0.3

DIALECTS = ("postgresql", "mariadb", "sqlite")
SHAPES = ("narrow", "wide", "incompressible", "embeddings")
DEFAULT_ROWS = {"events": 500_000, "narrow": 2_000_000, "wide": 500_000, "incompressible": 300_000,
                "embeddings": 100_000}
DIMS = 384
#: time targets: (dialect, shape or None for every shape) -> [(native kind, max ratio)]
NATIVE = {"postgresql": "pg_dump", "mariadb": "mysqldump", "sqlite": "sqlite_dump"}
LABEL = {"pg_dump": "pg_dump -t | zstd -3", "ordered_read": "psql COPY ordered read",
         "mysqldump": "mysqldump | zstd -3", "sqlite_dump": "sqlite3 .dump | zstd -3",
         "snapshot": "snapshot", "generic": "snapshot (generic)", "floor": "floor (COPY + zstd)"}


def time_targets(dialect: str, shape: str) -> list[tuple[str, float]]:
    if dialect == "postgresql":
        out = [("ordered_read", 1.4)] if shape != "events" else []
        if shape in ("wide", "events"):
            out.append(("pg_dump", 1.0))
        return out
    if dialect == "mariadb":
        return [("mysqldump", 1.5)]
    return [("sqlite_dump", 1.0)]


# -- connections -----------------------------------------------------------------------

def db_url(name: str) -> str:
    return PG.rsplit("/", 1)[0] + "/" + name


def pg_env() -> dict:
    """libpq settings for pg_dump and psql, from the admin URL (a password travels in the environment)."""
    u = urlsplit(PG)
    env = dict(os.environ)
    env.update({k: v for k, v in {"PGHOST": u.hostname, "PGPORT": str(u.port or ""), "PGUSER": u.username,
                                  "PGPASSWORD": u.password}.items() if v})
    return env


def my_parts() -> dict:
    u = urlsplit(MY)
    return {"host": u.hostname or "127.0.0.1", "port": u.port or 3306, "user": u.username or "root",
            "password": u.password or ""}


def my_connect(db: str | None = None):
    import pymysql
    return pymysql.connect(**my_parts(), database=db, autocommit=True)


def my_cli_args() -> list[str]:
    p = my_parts()
    args = ["-h", p["host"], "-P", str(p["port"]), "-u", p["user"]]
    return args + ([f"-p{p['password']}"] if p["password"] else [])


def my_dump_tool() -> str:
    return shutil.which("mariadb-dump") or shutil.which("mysqldump") or "mysqldump"


class Scratch:
    """One scratch database (or SQLite file) of a dialect."""

    def __init__(self, dialect: str, work: str, name: str | None = None):
        self.dialect, self.work = dialect, work
        self.given = name is not None
        self.name = name or "bench_sql_" + secrets.token_hex(3)
        if self.given:
            return
        if dialect == "postgresql":
            import psycopg
            with psycopg.connect(PG, autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{self.name}"')
        elif dialect == "mariadb":
            with my_connect() as c, c.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{self.name}`")
        else:
            self.name = os.path.join(work, self.name + ".sqlite")

    def drop(self) -> None:
        if self.given:
            return
        if self.dialect == "postgresql":
            import psycopg
            with psycopg.connect(PG, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        elif self.dialect == "mariadb":
            with my_connect() as c, c.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        else:
            for suffix in ("", "-wal", "-shm", "-journal"):
                if os.path.exists(self.name + suffix):
                    os.unlink(self.name + suffix)

    def sa_url(self) -> str:
        if self.dialect == "postgresql":
            return db_url(self.name).replace("postgresql://", "postgresql+psycopg://", 1)
        if self.dialect == "mariadb":
            p = my_parts()
            auth = p["user"] + (":" + p["password"] if p["password"] else "")
            return f"mysql+pymysql://{auth}@{p['host']}:{p['port']}/{self.name}"
        return "sqlite:///" + os.path.abspath(self.name)


# -- building the tables --------------------------------------------------------------

def create_events(db: str, rows: int, seed: int = 7) -> None:
    import psycopg
    rng = random.Random(seed)
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))) for _ in range(1000)]
    with psycopg.connect(db_url(db), autocommit=True) as c:
        c.execute(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, session text NOT NULL, "
                  f"created_at timestamptz NOT NULL, score numeric(12,4), payload text, meta jsonb)")
        with c.cursor() as cur, cur.copy(f"COPY {TABLE} FROM STDIN") as cp:
            lines = []
            for i in range(1, rows + 1):
                payload = " ".join(rng.choices(vocab, k=85))
                meta = (f'{{"tags": ["t{i % 17}", "t{i % 5}"], "source": "doc-{i % 1000}", '
                        f'"rank": {i % 100}, "weight": {rng.random():.3f}}}')
                at = (start + datetime.timedelta(seconds=i * 1.37)).isoformat()
                lines.append(f"{i}\tsess-{i // 50}\t{at}\t{rng.random() * 1000:.4f}\t"
                             f"{payload}\t{meta}\n")
                if len(lines) >= 5000:
                    cp.write("".join(lines))
                    lines = []
            if lines:
                cp.write("".join(lines))
        c.execute(f"ANALYZE {TABLE}")



def _pg_random_bytea(n: int) -> str:
    return "decode(" + " || ".join(["md5(random()::text)"] * ((n + 15) // 16)) + ", 'hex')"


def build(scratch: Scratch, table: str, shape: str, rows: int, seed: int = 7) -> None:
    d = scratch.dialect
    if d == "postgresql":
        import psycopg
        if shape == "events":
            return create_events(scratch.name, rows, seed)
        ddl = {"narrow": "id bigint PRIMARY KEY, n int, label text, score real",
               "wide": "id bigint PRIMARY KEY, body text, meta jsonb",
               "incompressible": "id bigint PRIMARY KEY, payload bytea",
               "embeddings": "id bigint PRIMARY KEY, embedding real[]"}[shape]
        select = {
            "narrow": "g, (g::bigint * 7919) % 100000, 'item-' || (g % 1000), ((g % 9973) / 7.0)::real",
            "wide": "g, repeat('lorem ipsum dolor sit amet ' || (g % 100) || ' ', 20), "
                    "jsonb_build_object('tags', jsonb_build_array('t' || (g % 17), 't' || (g % 5)), "
                    "'source', 'doc-' || (g % 1000), 'rank', g % 100, 'note', repeat('x', 40))",
            "incompressible": f"g, {_pg_random_bytea(300)}",
            "embeddings": f"g, ARRAY(SELECT random()::real + g * 0 FROM generate_series(1, {DIMS}))",
        }[shape]
        with psycopg.connect(db_url(scratch.name), autocommit=True) as c:
            c.execute(f"CREATE TABLE {table} ({ddl})")
            c.execute(f"INSERT INTO {table} SELECT {select} FROM generate_series(1, {rows}) g")
            c.execute(f"VACUUM ANALYZE {table}")
    elif d == "mariadb":
        ddl = {"narrow": "id BIGINT PRIMARY KEY, n INT, label VARCHAR(32), score FLOAT",
               "wide": "id BIGINT PRIMARY KEY, body TEXT, meta JSON",
               "incompressible": "id BIGINT PRIMARY KEY, payload VARBINARY(300)",
               "embeddings": "id BIGINT PRIMARY KEY, embedding LONGTEXT"}[shape]
        select = {
            "narrow": "seq, (seq * 7919) % 100000, CONCAT('item-', seq % 1000), (seq % 9973) / 7.0",
            "wide": "seq, REPEAT(CONCAT('lorem ipsum dolor sit amet ', seq % 100, ' '), 20), "
                    "JSON_OBJECT('tags', JSON_ARRAY(CONCAT('t', seq % 17), CONCAT('t', seq % 5)), "
                    "'source', CONCAT('doc-', seq % 1000), 'rank', seq % 100, 'note', REPEAT('x', 40))",
            "incompressible": "seq, RANDOM_BYTES(300)",
        }.get(shape)
        with my_connect(scratch.name) as c, c.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} ({ddl}) ENGINE=InnoDB")
            if select:
                cur.execute(f"INSERT INTO {table} SELECT {select} FROM seq_1_to_{rows}")
            else:
                rng = random.Random(seed)
                for lo in range(1, rows + 1, 1000):
                    batch = [(i, json.dumps([round(rng.random(), 7) for _ in range(DIMS)]))
                             for i in range(lo, min(lo + 1000, rows + 1))]
                    cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", batch)
            cur.execute(f"ANALYZE TABLE {table}")
    else:
        import sqlite3
        ddl = {"narrow": "id INTEGER PRIMARY KEY, n INTEGER, label TEXT, score REAL",
               "wide": "id INTEGER PRIMARY KEY, body TEXT, meta TEXT",
               "incompressible": "id INTEGER PRIMARY KEY, payload BLOB",
               "embeddings": "id INTEGER PRIMARY KEY, embedding BLOB"}[shape]
        select = {
            "narrow": "x, (x * 7919) % 100000, 'item-' || (x % 1000), (x % 9973) / 7.0",
            "wide": "x, replace(hex(zeroblob(20)), '00', 'lorem ipsum dolor sit amet ' || (x % 100) || ' '), "
                    "json_object('tags', json_array('t' || (x % 17), 't' || (x % 5)), "
                    "'source', 'doc-' || (x % 1000), 'rank', x % 100, 'note', replace(hex(zeroblob(20)), '00', 'xx'))",
            "incompressible": "x, randomblob(300)",
        }.get(shape)
        c = sqlite3.connect(scratch.name)
        try:
            c.execute(f"CREATE TABLE {table} ({ddl})")
            if select:
                c.execute(f"WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < {rows}) "
                          f"INSERT INTO {table} SELECT {select} FROM s")
            else:
                rng = random.Random(seed)
                pack = struct.Struct(f"<{DIMS}f").pack
                for lo in range(1, rows + 1, 1000):
                    c.executemany(f"INSERT INTO {table} VALUES (?, ?)",
                                  [(i, pack(*[rng.random() for _ in range(DIMS)]))
                                   for i in range(lo, min(lo + 1000, rows + 1))])
            c.commit()
        finally:
            c.close()


def table_exists(scratch: Scratch, table: str) -> bool:
    if scratch.dialect == "postgresql":
        import psycopg
        with psycopg.connect(db_url(scratch.name)) as c:
            return c.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]
    if scratch.dialect == "mariadb":
        with my_connect(scratch.name) as c, c.cursor() as cur:
            cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = %s",
                        (scratch.name, table))
            return cur.fetchone()[0] > 0
    import sqlite3
    c = sqlite3.connect(scratch.name)
    try:
        return c.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0] > 0
    finally:
        c.close()


def count_rows(scratch: Scratch, table: str) -> int:
    if scratch.dialect == "postgresql":
        import psycopg
        with psycopg.connect(db_url(scratch.name)) as c:
            return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    if scratch.dialect == "mariadb":
        with my_connect(scratch.name) as c, c.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            return cur.fetchone()[0]
    import sqlite3
    c = sqlite3.connect(scratch.name)
    try:
        return c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        c.close()


# -- the runs --------------------------------------------------------------------------

def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def wait_child(proc: subprocess.Popen) -> tuple[int, object]:
    """Exit code and rusage of exactly this child (wait4 counts what it reaped, e.g. a pipeline's
    processes, and nothing of the other children this script has had)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def run_shell(name: str, command: str, out: str | None, env: dict | None = None) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen("set -o pipefail; " + command, shell=True, env=env, executable="/bin/bash")
    code, usage = wait_child(proc)
    wall = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"{name} failed ({code}): {command}")
    size = 0
    if out:
        size = os.path.getsize(out)
        os.unlink(out)
    return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "bytes": size}


def run_native(kind: str, scratch: Scratch, table: str, work: str) -> dict:
    out = os.path.join(work, "dump.sql.zst")
    q = shlex.quote
    if kind == "pg_dump":
        return run_shell(kind, f"pg_dump -t {table} {q(scratch.name)} | zstd -3 -q -f -o {q(out)}", out, pg_env())
    if kind == "ordered_read":
        copy = f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT"
        return run_shell(kind, f"psql -X -q -d {q(scratch.name)} -c {q(copy)} > /dev/null", None, pg_env())
    if kind == "mysqldump":
        cli = " ".join(q(a) for a in my_cli_args())
        return run_shell(kind, f"{q(my_dump_tool())} {cli} --single-transaction {q(scratch.name)} {table} "
                               f"| zstd -3 -q -f -o {q(out)}", out)
    if kind == "sqlite_dump":
        return run_shell(kind, f"sqlite3 {q(scratch.name)} {q('.dump ' + table)} | zstd -3 -q -f -o {q(out)}", out)
    raise ValueError(kind)


FLOOR = r"""
import concurrent.futures, os, sys, threading
import psycopg, zstandard
url, table, out_dir = sys.argv[1:4]
local = threading.local()

def put(buf, i):
    z = getattr(local, "z", None)
    if z is None:
        z = local.z = zstandard.ZstdCompressor(level=3, write_content_size=True)
    with open(os.path.join(out_dir, str(i)), "wb") as fh:
        fh.write(z.compress(buf))

os.makedirs(out_dir, exist_ok=True)
pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2)
futures, out, size, i = [], [], 0, 0
with psycopg.connect(url) as pg:
    pg.isolation_level, pg.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
    key = pg.execute("SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY array_position(i.indkey, a.attnum)) "
                     "FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                     "WHERE i.indrelid = %s::regclass AND i.indisprimary", (table,)).fetchone()[0]
    pgconn = pg.pgconn
    with pg.cursor().copy(f"COPY (SELECT * FROM {table} ORDER BY {key}) TO STDOUT") as copy:
        get, consume = pgconn.get_copy_data, pgconn.consume_input
        while True:
            n, data = get(1)
            if n == 0:
                consume()
                n, data = get(1)
                if n == 0:
                    data = copy.read()
                    if not data:
                        break
                    n = len(data)
            if n < 0:
                if n != -1:
                    sys.exit(pgconn.error_message.decode(errors="replace"))
                results = []
                while (res := pgconn.get_result()) is not None:
                    results.append(res)
                copy._finished = True
                if any(r.status != psycopg.pq.ExecStatus.COMMAND_OK for r in results):
                    sys.exit("COPY failed: " + pgconn.error_message.decode(errors="replace"))
                break
            out.append(bytes(data))
            size += n
            if size >= 2_800_000:
                futures.append(pool.submit(put, b"".join(out), i))
                i, out, size = i + 1, [], 0
                while len(futures) > 2 * (os.cpu_count() or 2):
                    futures.pop(0).result()
        if out:
            futures.append(pool.submit(put, b"".join(out), i))
for f in futures:
    f.result()
"""


def run_floor(db: str, table: str, work: str) -> dict:
    out = os.path.join(work, "floor")
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR, db_url(db), table, out])
    code, usage = wait_child(proc)
    wall = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"the floor client failed ({code})")
    size = tree_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "bytes": size}



def write_config(scratch: Scratch, table: str, work: str) -> str:
    config = os.path.join(work, f"snapshotter-{table}.toml")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(f'[repository]\ncompression_level = 3\n\n[sources.db]\nbackend = "sql"\n'
                 f'url = "{scratch.sa_url()}"\ntables = ["{table}"]\ntimeout = 300\n')
    return config


def run_snapshot(config: str, table: str, work: str, *, generic: bool = False) -> dict:
    repo = os.path.join(work, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    base = [sys.executable, "-m", "snapshotter", "--config", config, "--repo", repo, "--no-progress"]
    subprocess.run([*base, "init"], check=True, capture_output=True)
    env = dict(os.environ)
    env["SNAPSHOTTER_PG_COPY"] = "0" if generic else "1"
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen([*base, "--json", "snapshot", "--release", "bench"], env=env, stdout=out, stderr=err)
        code, usage = wait_child(proc)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise SystemExit(f"snapshot failed ({code}): {err.read().decode().strip()}")
        doc = json.loads(out.read())
    stream = doc["sources"]["db"]["streams"][table]
    result = {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "bytes": tree_bytes(repo),
              "chunk_bytes": tree_bytes(os.path.join(repo, "chunks")), "rss_mb": usage.ru_maxrss / 1024,
              "records": stream["records"], "digest": stream["digest"]}
    shutil.rmtree(repo, ignore_errors=True)
    return result


def measure(scratch: Scratch, table: str, work: str, runs: int, extra: list[str]) -> dict:
    """Alternating runs of the snapshot and the native tools; medians."""
    d = scratch.dialect
    natives = ["pg_dump", "ordered_read"] if d == "postgresql" else [NATIVE[d]]
    kinds = natives + ["snapshot"] + extra
    config = write_config(scratch, table, work)
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(runs):
        for kind in kinds:
            if kind == "floor":
                r = run_floor(scratch.name, table, work)
            elif kind in ("snapshot", "generic"):
                r = run_snapshot(config, table, work, generic=kind == "generic")
            else:
                r = run_native(kind, scratch, table, work)
            results[kind].append(r)
            print(f"  run {i + 1} {kind:12s} " + " ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k != "digest"),
                file=sys.stderr)
    digests = {r["digest"] for k in ("snapshot", "generic") if k in results for r in results[k]}
    if len(digests) != 1:
        raise SystemExit(f"paths disagree: stream digests {sorted(digests)}")
    out = {}
    for kind, rs in results.items():
        m = {key: statistics.median(r[key] for r in rs) for key in ("seconds", "cpu", "bytes")}
        m["bytes"] = int(m["bytes"])
        if "rss_mb" in rs[0]:
            m["rss_mb"] = statistics.median(r["rss_mb"] for r in rs)
            m["records"] = rs[0]["records"]
        out[kind] = m
    return out


def bench_one(dialect: str, shape: str, rows: int, args, work: str) -> dict:
    table = TABLE if shape == "events" else f"bench_{shape}"
    scratch = Scratch(dialect, work, args.db)
    try:
        if not table_exists(scratch, table):
            t = time.perf_counter()
            build(scratch, table, shape, rows)
            print(f"{dialect}/{shape}: {rows} rows built in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        nrows = count_rows(scratch, table)
        extra = []
        if dialect == "postgresql":
            extra = (["generic"] if args.generic else []) + (["floor"] if args.floor else [])
        res = measure(scratch, table, work, args.runs, extra)
        if res["snapshot"]["records"] != nrows:
            raise SystemExit(f"{dialect}/{shape}: snapshot holds {res['snapshot']['records']} of {nrows} rows")
        snap = res["snapshot"]
        targets = []
        for kind, limit in time_targets(dialect, shape):
            ratio = snap["seconds"] / res[kind]["seconds"]
            targets.append({"name": f"time / {LABEL[kind]}", "ratio": ratio, "limit": limit,
                            "met": ratio <= limit})
        targets.append({"name": "peak RSS MB", "ratio": snap["rss_mb"], "limit": RSS_LIMIT_MB,
                        "met": snap["rss_mb"] < RSS_LIMIT_MB})
        dump = res["pg_dump" if dialect == "postgresql" else NATIVE[dialect]]
        return {"dialect": dialect, "shape": shape, "rows": nrows, "runs": args.runs, "results": res,
                "size_ratio": snap["bytes"] / dump["bytes"], "targets": targets,
                "all_met": all(t["met"] for t in targets)}
    finally:
        if args.keep and not scratch.given:
            print(f"kept {dialect} database {scratch.name}", file=sys.stderr)
        else:
            scratch.drop()


def bench_startup(dialect: str, args, work: str) -> dict:
    scratch = Scratch(dialect, work)
    table = "bench_startup"
    try:
        build(scratch, table, "narrow", STARTUP_ROWS)
        res = measure(scratch, table, work, args.runs, [])
        s = res["snapshot"]
        return {"dialect": dialect, "rows": STARTUP_ROWS, "results": res,
                "target": {"name": "snapshot seconds", "value": s["seconds"], "limit": STARTUP_LIMIT_S,
                           "met": s["seconds"] <= STARTUP_LIMIT_S}}
    finally:
        scratch.drop()


def print_report(summary: dict) -> None:
    for b in summary["benchmarks"]:
        print(f"\n{b['dialect']} / {b['shape']}: {b['rows']:,} rows; medians of {b['runs']} alternating runs")
        print(f"  {'':26s} {'wall':>9s} {'cpu':>9s} {'output':>10s}")
        for kind, m in b["results"].items():
            line = f"  {LABEL[kind]:26s} {m['seconds']:7.2f} s {m['cpu']:7.2f} s "
            line += f"{m['bytes'] / 1e6:7.1f} MB" if m["bytes"] else f"{'-':>10s}"
            if "rss_mb" in m:
                line += f"  peak RSS {m['rss_mb']:.0f} MB"
            print(line)
        print(f"  size: snapshot / dump = {b['size_ratio']:.2f}x")
        for t in b["targets"]:
            fmt = f"{t['ratio']:.0f}" if t["name"].startswith("peak") else f"{t['ratio']:.2f}x"
            lim = f"< {t['limit']}" if t["name"].startswith("peak") else f"<= {t['limit']}x"
            print(f"  {t['name']:34s} {fmt:>7s} (target {lim}) {'MET' if t['met'] else 'MISSED'}")
    for s in summary.get("startup", []):
        r = s["results"]
        natives = ", ".join(f"{LABEL[k]} {m['seconds']:.2f} s" for k, m in r.items() if k != "snapshot")
        t = s["target"]
        print(f"\nstart-up, {s['dialect']}: snapshot of {s['rows']:,} rows {t['value']:.2f} s "
              f"(target <= {t['limit']} s) {'MET' if t['met'] else 'MISSED'}; {natives}")
    print("\n(cpu: user+sys of the client processes; the server's share is not counted)")
    rows = summary["benchmarks"]
    if rows:
        def md(text: str) -> str:
            return text.replace("|", "\\|")

        print("\n| dialect | shape | rows | snapshot wall / cpu | peak RSS | snapshot size | native tool(s) wall / size "
              "| time ratio(s) | size ratio | targets |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for b in rows:
            r, s = b["results"], b["results"]["snapshot"]
            nat = "; ".join(f"{md(LABEL[k])} {m['seconds']:.2f} s" + (f", {m['bytes'] / 1e6:.1f} MB" if m["bytes"] else "")
                            for k, m in r.items() if k not in ("snapshot", "generic", "floor"))
            ratios = "; ".join(f"{t['ratio']:.2f}× {md(t['name'][7:])}" for t in b["targets"] if not t["name"].startswith("peak"))
            met = ", ".join(("met" if t["met"] else "MISSED") + " " + ("RSS" if t["name"].startswith("peak")
                            else f"≤ {t['limit']}×") for t in b["targets"])
            print(f"| {b['dialect']} | {b['shape']} | {b['rows']:,} | {s['seconds']:.2f} s / {s['cpu']:.2f} s "
                  f"| {s['rss_mb']:.0f} MB | {s['bytes'] / 1e6:.1f} MB | {nat} | {ratios} | {b['size_ratio']:.2f}× | {met} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dialect", choices=[*DIALECTS, "all"], default="postgresql")
    ap.add_argument("--shape", choices=["events", *SHAPES, "all"], default="events",
                    help="table shape (default events, PostgreSQL only); all: narrow, wide, incompressible, embeddings")
    ap.add_argument("--rows", type=int, help="rows of every table (default: per shape, times --scale)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every shape's default row count")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--startup", action="store_true",
                    help=f"also time the snapshot of a {STARTUP_ROWS:,}-row table, whole process, per dialect")
    ap.add_argument("--generic", action="store_true", help="PostgreSQL: also time the generic (cursor) path")
    ap.add_argument("--floor", action="store_true",
                    help="PostgreSQL: also time a minimal COPY + zstd client (what snapshotter's overhead is measured from)")
    ap.add_argument("--db", help="use this existing database (SQLite: file) of the one dialect; "
                                 "its table is created if missing, and it is kept")
    ap.add_argument("--keep", action="store_true", help="keep the scratch databases")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    dialects = list(DIALECTS) if args.dialect == "all" else [args.dialect]
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    if args.db and len(dialects) > 1:
        ap.error("--db names a database of one dialect")
    compile_project()
    work = tempfile.mkdtemp(prefix="bench-sql-")
    summary: dict = {"scale": args.scale, "runs": args.runs, "benchmarks": []}
    try:
        for dialect in dialects:
            for shape in shapes:
                if shape == "events" and dialect != "postgresql":
                    print(f"{dialect}: the events shape is PostgreSQL's only; skipped", file=sys.stderr)
                    continue
                rows = args.rows or max(1, round(DEFAULT_ROWS[shape] * args.scale))
                summary["benchmarks"].append(bench_one(dialect, shape, rows, args, work))
        if args.startup:
            summary["startup"] = [bench_startup(d, args, work) for d in dialects]
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            print_report(summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
