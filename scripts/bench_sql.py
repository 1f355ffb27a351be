#!/usr/bin/env python3
"""Snapshot of a PostgreSQL table against `pg_dump -t TABLE | zstd -3`.

A scratch database gets a table of --rows rows (default 500,000, ~340 MB as
text: bigint key, session, timestamptz, numeric, ~550 chars of text drawn
from a small vocabulary so it compresses like prose, jsonb).  Then, in
alternation, --runs times each:

* ``pg_dump -t TABLE DB | zstd -3 > FILE``: wall time and file size;
* ``python -m snapshotter snapshot`` into a fresh local repository (the real
  CLI in a child process): wall time, repository bytes, peak RSS of the child;
* with --generic, the same snapshot with the COPY fast path switched off
  (``SNAPSHOTTER_PG_COPY=0``), for comparison;
* with --floor, the least a Python client can do for the same result: the rows
  through ``COPY`` in key order (libpq directly, as the snapshot reads them),
  joined into 2.8 MB buffers, ``zstd -3`` in one thread per CPU, one file each;
  no chunk boundaries, hashes, manifest, SQLAlchemy or CLI.  What the snapshot
  costs over it is snapshotter's own overhead.

Medians are printed, with the ratios the targets are stated in (snapshot time
no more than pg_dump's, repository no larger than its output, RSS < 300 MB).
The scratch database is dropped at the end unless --keep.

    python scripts/bench_sql.py [--rows 500000] [--runs 3] [--generic] [--floor] [--json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

from benchlib import compile_project

PG = os.environ.get("SNAPSHOTTER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TABLE = "agent_events"
RSS_LIMIT_MB = 300


def db_url(name: str) -> str:
    return PG.rsplit("/", 1)[0] + "/" + name


def pg_env() -> dict:
    """libpq settings for pg_dump, from the admin URL (a password travels in the environment)."""
    u = urlsplit(PG)
    env = dict(os.environ)
    env.update({k: v for k, v in {"PGHOST": u.hostname, "PGPORT": str(u.port or ""), "PGUSER": u.username,
                                  "PGPASSWORD": u.password}.items() if v})
    return env


def create_table(db: str, rows: int, seed: int = 7) -> None:
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


def create_db() -> str:
    import psycopg
    db = "bench_sql_" + secrets.token_hex(3)
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    return db


def drop_db(db: str) -> None:
    import psycopg
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def wait_child(proc: subprocess.Popen) -> tuple[int, object]:
    """Exit code and rusage of exactly this child (wait4 counts what it reaped, e.g. a pipeline's
    processes, and nothing of the other children this script has had)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def run_pg_dump(db: str, work: str) -> dict:
    out = os.path.join(work, "dump.sql.zst")
    t = time.perf_counter()
    proc = subprocess.Popen(f"set -o pipefail; pg_dump -t {TABLE} {db} | zstd -3 -q -f -o {out}", shell=True,
                            env=pg_env(), executable="/bin/bash")
    code, usage = wait_child(proc)
    wall = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"pg_dump | zstd failed ({code})")
    size = os.path.getsize(out)
    os.unlink(out)
    return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "bytes": size}


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


def run_floor(db: str, work: str) -> dict:
    out = os.path.join(work, "floor")
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR, db_url(db), TABLE, out])
    code, usage = wait_child(proc)
    wall = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"the floor client failed ({code})")
    size = tree_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "bytes": size}


def run_snapshot(config: str, work: str, *, generic: bool) -> dict:
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
    stream = doc["sources"]["db"]["streams"][TABLE]
    result = {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime, "bytes": tree_bytes(repo),
              "chunk_bytes": tree_bytes(os.path.join(repo, "chunks")), "rss_mb": usage.ru_maxrss / 1024,
              "records": stream["records"], "digest": stream["digest"]}
    shutil.rmtree(repo, ignore_errors=True)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--generic", action="store_true", help="also time the generic (cursor) path")
    ap.add_argument("--floor", action="store_true",
                    help="also time a minimal COPY + zstd client (what snapshotter's overhead is measured from)")
    ap.add_argument("--db", help="use this existing database (its table is created if missing) and keep it")
    ap.add_argument("--keep", action="store_true", help="keep the scratch database")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    compile_project()
    db = args.db or create_db()
    work = tempfile.mkdtemp(prefix="bench-sql-")
    try:
        import psycopg
        with psycopg.connect(db_url(db)) as c:
            exists = c.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()[0]
        if not exists:
            t = time.perf_counter()
            create_table(db, args.rows)
            print(f"table {TABLE}: {args.rows} rows loaded in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        with psycopg.connect(db_url(db)) as c:
            text_bytes, nrows = c.execute(
                f"SELECT sum(length({TABLE}::text)), count(*) FROM {TABLE}").fetchone()
        config = os.path.join(work, "snapshotter.toml")
        sa_url = db_url(db).replace("postgresql://", "postgresql+psycopg://", 1)
        with open(config, "w", encoding="utf-8") as fh:
            fh.write(f'[repository]\ncompression_level = 3\n\n[sources.db]\nbackend = "sql"\n'
                     f'url = "{sa_url}"\ntables = ["{TABLE}"]\n')

        kinds = ["pg_dump", "snapshot"] + (["generic"] if args.generic else []) + (["floor"] if args.floor else [])
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for i in range(args.runs):
            for kind in kinds:
                if kind == "pg_dump":
                    r = run_pg_dump(db, work)
                elif kind == "floor":
                    r = run_floor(db, work)
                else:
                    r = run_snapshot(config, work, generic=kind == "generic")
                results[kind].append(r)
                print(f"run {i + 1} {kind:8s} " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in r.items() if k != "digest"), file=sys.stderr)
        digests = {r["digest"] for k in kinds if k not in ("pg_dump", "floor") for r in results[k]}
        if len(digests) != 1:
            raise SystemExit(f"paths disagree: stream digests {sorted(digests)}")

        def med(kind: str, key: str) -> float:
            return statistics.median(r[key] for r in results[kind])

        summary = {
            "rows": nrows, "table_text_bytes": int(text_bytes), "runs": args.runs,
            "pg_dump_zstd": {"seconds": med("pg_dump", "seconds"), "cpu": med("pg_dump", "cpu"),
                             "bytes": int(med("pg_dump", "bytes"))},
            "snapshot": {"seconds": med("snapshot", "seconds"), "cpu": med("snapshot", "cpu"),
                         "bytes": int(med("snapshot", "bytes")), "rss_mb": med("snapshot", "rss_mb")},
        }
        if args.generic:
            summary["snapshot_generic"] = {"seconds": med("generic", "seconds"), "cpu": med("generic", "cpu"),
                                           "bytes": int(med("generic", "bytes")), "rss_mb": med("generic", "rss_mb")}
        if args.floor:
            summary["floor"] = {"seconds": med("floor", "seconds"), "cpu": med("floor", "cpu"),
                                "bytes": int(med("floor", "bytes"))}
        summary["time_ratio"] = summary["snapshot"]["seconds"] / summary["pg_dump_zstd"]["seconds"]
        summary["size_ratio"] = summary["snapshot"]["bytes"] / summary["pg_dump_zstd"]["bytes"]
        summary["targets_met"] = {"time": summary["time_ratio"] <= 1.0, "size": summary["size_ratio"] <= 1.0,
                                  "rss": summary["snapshot"]["rss_mb"] < RSS_LIMIT_MB}
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            d, s = summary["pg_dump_zstd"], summary["snapshot"]
            print(f"{nrows} rows, {text_bytes / 1e6:.0f} MB as text; medians of {args.runs} alternating runs")
            print(f"{'':20s} {'wall':>9s} {'cpu':>9s} {'output':>10s}")
            print(f"pg_dump | zstd -3    {d['seconds']:7.2f} s {d['cpu']:7.2f} s {d['bytes'] / 1e6:7.1f} MB")
            print(f"snapshot (COPY)      {s['seconds']:7.2f} s {s['cpu']:7.2f} s {s['bytes'] / 1e6:7.1f} MB"
                  f"  peak RSS {s['rss_mb']:.0f} MB")
            if args.generic:
                g = summary["snapshot_generic"]
                print(f"snapshot (generic)   {g['seconds']:7.2f} s {g['cpu']:7.2f} s {g['bytes'] / 1e6:7.1f} MB"
                      f"  peak RSS {g['rss_mb']:.0f} MB")
            if args.floor:
                f = summary["floor"]
                print(f"floor (COPY + zstd)  {f['seconds']:7.2f} s {f['cpu']:7.2f} s {f['bytes'] / 1e6:7.1f} MB"
                      f"  ({f['seconds'] / d['seconds']:.2f}x pg_dump; snapshot {s['seconds'] / f['seconds']:.2f}x floor)")
            print("(cpu: user+sys of the client processes; the server's share is not counted)")
            print(f"snapshot / pg_dump: time {summary['time_ratio']:.2f}x, size {summary['size_ratio']:.2f}x")
            print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in summary["targets_met"].items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.db and not args.keep:
            drop_db(db)
        elif not args.db:
            print(f"kept database {db}", file=sys.stderr)


if __name__ == "__main__":
    main()
