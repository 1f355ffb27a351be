#!/usr/bin/env python3
"""Restore cost against drift, measured against what a user would do otherwise.

PostgreSQL: a table of --rows rows (default 500,000, ~300 MB as text) is
snapshotted; then, alternating, (a) 1% of rows drift and `snapshotter restore`
puts them back, (b) the table is dropped and reloaded by `psql` from `pg_dump`
output, then (untimed) vacuumed and analyzed, as autovacuum would soon do, so
that every restore starts from a live table in its steady state.  Chroma (--chroma): a --vectors x 384 embedded collection; 1% drift,
restore time against a snapshot of the same collection.  Medians of --runs.

    python scripts/bench_restore.py [--rows 500000] [--runs 3] [--chroma --vectors 100000]
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import compile_project

PG = os.environ.get("SNAPSHOTTER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def sh(cmd: str, **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, **kw)
    return time.perf_counter() - t


def cli(workdir: str, *args: str) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "snapshotter", "--no-progress", *args], cwd=workdir,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"snapshotter {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return time.perf_counter() - t


def bench_postgres(rows: int, runs: int) -> None:
    import psycopg
    db = "bench_" + secrets.token_hex(3)
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    url = PG.rsplit("/", 1)[0] + "/" + db
    work = tempfile.mkdtemp(prefix="bench-restore-")
    try:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE TABLE kb_chunks (id bigint PRIMARY KEY, session text, created_at timestamptz, "
                      "score numeric(12,4), payload text, meta jsonb)")
            c.execute(f"""INSERT INTO kb_chunks SELECT g, 'sess-' || (g % 1000), now() - g * interval '1 second',
                          (g % 10000) / 7.0, repeat(md5(g::text), 16), jsonb_build_object('n', g, 'tag', 'kb')
                          FROM generate_series(1, {rows}) g""")
            c.execute("ANALYZE kb_chunks")
        with open(os.path.join(work, "snapshotter.toml"), "w") as fh:
            fh.write(f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\n'
                     f'url = "{url.replace("postgresql://", "postgresql+psycopg://")}"\n')
        cli(work, "init")
        t_snap = cli(work, "--json", "snapshot", "--release", "bench")
        import json
        snap = json.loads(subprocess.run([sys.executable, "-m", "snapshotter", "--json", "list"], cwd=work,
                                         capture_output=True, text=True, check=True).stdout)[0]["id"]
        dump = os.path.join(work, "dump.sql")
        sh(f"pg_dump -t kb_chunks '{url}' > {dump}")
        rnd = random.Random(1)
        restore_t, reload_t = [], []
        for _ in range(runs):
            ids = rnd.sample(range(1, rows + 1), rows // 100)
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("UPDATE kb_chunks SET payload = 'drifted' WHERE id = ANY(%s)", (ids,))
            restore_t.append(cli(work, "restore", snap, "--yes"))
            reload_t.append(sh(f"psql -q '{url}' -c 'DROP TABLE kb_chunks' && psql -q -o /dev/null '{url}' -f {dump}",
                               stdout=subprocess.DEVNULL))
            # untimed: bring the reloaded table to the steady state of a live table, as autovacuum
            # soon would (statistics, visibility hints); otherwise the next restore's first read of
            # it pays for setting the hint bits of every row the reload wrote
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("VACUUM ANALYZE kb_chunks")
        r, p = statistics.median(restore_t), statistics.median(reload_t)
        print(f"postgres {rows} rows: snapshot {t_snap:.2f} s; 1% drift restore median {r:.2f} s "
              f"vs psql reload of pg_dump median {p:.2f} s: ratio {r / p:.2f} (target <= 1.0)")
        print(f"  runs restore {[round(x, 2) for x in restore_t]} reload {[round(x, 2) for x in reload_t]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _chroma_build(path: str, vectors: int) -> None:
    import chromadb
    import numpy as np
    client = chromadb.PersistentClient(path=path)
    col = client.create_collection("kb_docs", embedding_function=None, metadata={"hnsw:space": "l2"})
    rng = np.random.default_rng(3)
    batch = min(5000, client.get_max_batch_size())
    for start in range(0, vectors, batch):
        n = min(batch, vectors - start)
        col.add(ids=[f"doc-{i:07d}" for i in range(start, start + n)],
                embeddings=rng.standard_normal((n, 384), dtype=np.float32),
                documents=[f"document {i}" for i in range(start, start + n)],
                metadatas=[{"n": i} for i in range(start, start + n)])


def _chroma_drift(path: str, vectors: int, seed: int) -> None:
    import chromadb
    import numpy as np
    rng = np.random.default_rng(seed)
    col = chromadb.PersistentClient(path=path).get_collection("kb_docs", embedding_function=None)
    ids = [f"doc-{j:07d}" for j in rng.choice(vectors, vectors // 100, replace=False)]
    col.update(ids=ids, embeddings=rng.standard_normal((len(ids), 384), dtype=np.float32))


def _in_child(fn, *args) -> None:
    """Chroma's PersistentClient is one process's: a client left open in this one (Chroma
    keeps it cached, with its background work) must not share the folder with the CLI's,
    so every write happens in a child process that has ended before the CLI starts."""
    import multiprocessing
    p = multiprocessing.get_context("spawn").Process(target=fn, args=args)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"{fn.__name__} failed ({p.exitcode})")


def bench_chroma(vectors: int, runs: int) -> None:
    work = tempfile.mkdtemp(prefix="bench-restore-chroma-")
    try:
        path = os.path.join(work, "chroma")
        _in_child(_chroma_build, path, vectors)
        with open(os.path.join(work, "snapshotter.toml"), "w") as fh:
            fh.write('[repository]\nurl = "./repo"\n[sources.memory]\nbackend = "chroma"\npath = "./chroma"\n')
        cli(work, "init")
        snap_t, restore_t = [], []
        import json
        for i in range(runs):
            snap_t.append(cli(work, "snapshot", "--release", "bench"))
            snap = json.loads(subprocess.run([sys.executable, "-m", "snapshotter", "--json", "list"], cwd=work,
                                             capture_output=True, text=True, check=True).stdout)[0]["id"]
            _in_child(_chroma_drift, path, vectors, 100 + i)
            restore_t.append(cli(work, "restore", snap, "--yes"))
        s, r = statistics.median(snap_t), statistics.median(restore_t)
        print(f"chroma {vectors} x 384: snapshot median {s:.2f} s; 1% drift restore median {r:.2f} s: "
              f"ratio {r / s:.2f} (target <= 2.0)")
        print(f"  runs snapshot {[round(x, 2) for x in snap_t]} restore {[round(x, 2) for x in restore_t]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chroma", action="store_true", help="also (only, with --no-postgres) the Chroma figure")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--vectors", type=int, default=100_000)
    a = ap.parse_args()
    compile_project()
    if not a.no_postgres:
        bench_postgres(a.rows, a.runs)
    if a.chroma:
        bench_chroma(a.vectors, a.runs)


if __name__ == "__main__":
    main()
