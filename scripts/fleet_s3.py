#!/usr/bin/env python3
"""Many writers, one S3 repository: a fleet of agents snapshotted at once.

Each of N agents (default 8) has stores of its own: a SQL database (a SQLite
file, or a PostgreSQL schema of its own with ``--sql postgresql``; ``mixed``
alternates the two), conversation history in Redis lists under a key prefix of
its own, and an embedded Chroma folder.  Part of every agent's data is the same
in all of them (a knowledge-base table, a Chroma collection of shared documents,
an onboarding conversation), so chunks written by one agent are found already
stored by the others.

Every agent runs ``snapshot`` as a separate ``snapshotter`` process, ROUNDS
times, all agents at once, into ONE repository on an S3 endpoint (a moto
server over HTTP on a free loopback port, started here, or ``--endpoint``);
between two rounds it changes some of its records.  Beside them, ``forget
--keep-last K`` and ``prune --grace G`` run in loops, every command with
``--lock-wait``.  At the end: a last forget and prune, ``verify --read-data``
of every snapshot left, and the figures:

- snapshots committed (every snapshot must commit);
- dedup: logical bytes of all snapshots (their streams' encoded records) against
  the compressed bytes written, and what each agent's first snapshot found
  already stored by other agents;
- lock waits: how many commands waited for another run's lock and how long (the
  ``lock_waited_seconds`` of their audit records, and the "waiting up to" lines
  the CLI printed);
- verify: problems found (must be 0), and that the snapshots listed are exactly
  those committed and not forgotten.

Exit 0 when every check holds, 1 otherwise.

    python3 scripts/fleet_s3.py [--agents 8] [--rounds 3] [--scale 1] [--sql mixed]
        [--endpoint URL --bucket NAME] [--grace 0] [--keep-last K] [--json]

The snapshotter commands run as ``python3 -m snapshotter`` in this environment
(``--snapshotter CMD`` to run another).  AWS credentials: with ``--endpoint``,
the normal boto3 chain; with the moto server, dummy ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import secrets
import shlex
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_URL = os.environ.get("SNAPSHOTTER_FLEET_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SNAPSHOTTER_FLEET_REDIS", "redis://127.0.0.1:6379/0")
DIM = 384

#: sizes at --scale 1
KB_ROWS = 20_000        # shared table, every agent
FACT_ROWS = 5_000       # each agent's own table
KB_VECTORS = 2_000      # shared Chroma collection
MEMORY_VECTORS = 500    # each agent's own Chroma collection
ONBOARDING_MESSAGES = 200  # shared conversation
ROUND_MESSAGES = 100    # each agent, each round


def scaled(n: int, scale: float) -> int:
    return max(2, int(n * scale))


# -- the agents' stores ------------------------------------------------------------

@dataclass
class Agent:
    index: int
    dir: Path
    sql_kind: str  # sqlite | postgresql
    sql_url: str
    schema: str | None
    redis_prefix: str
    release: str
    snapshots: list[dict] = field(default_factory=list)  # one per round: the command's outcome

    @property
    def config(self) -> Path:
        return self.dir / "snapshotter.toml"


def kb_rows(scale: float) -> list[tuple]:
    rng = random.Random(7)
    words = ["refund", "invoice", "policy", "account", "shipping", "warranty", "support", "order", "return", "card"]
    return [(i, f"article {i}", " ".join(rng.choice(words) for _ in range(40))) for i in range(scaled(KB_ROWS, scale))]


def fact_rows(agent: int, scale: float, round_: int) -> list[tuple]:
    return [(i, f"agent {agent} fact {i}: " + secrets.token_hex(24), round_) for i in range(scaled(FACT_ROWS, scale))]


def sql_build(agent: Agent, scale: float) -> None:
    kb, facts = kb_rows(scale), fact_rows(agent.index, scale, 0)
    if agent.sql_kind == "sqlite":
        con = sqlite3.connect(agent.dir / "agent.db")
        con.execute("CREATE TABLE kb_shared (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT NULL)")
        con.execute("CREATE TABLE facts (id INTEGER PRIMARY KEY, fact TEXT NOT NULL, round INTEGER NOT NULL)")
        con.executemany("INSERT INTO kb_shared VALUES (?, ?, ?)", kb)
        con.executemany("INSERT INTO facts VALUES (?, ?, ?)", facts)
        con.commit()
        con.close()
        return
    import psycopg
    with psycopg.connect(_libpq(agent.sql_url), autocommit=True) as con:
        s = agent.schema
        con.execute(f'CREATE SCHEMA "{s}"')
        con.execute(f'CREATE TABLE "{s}".kb_shared (id integer PRIMARY KEY, title text NOT NULL, body text NOT NULL)')
        con.execute(f'CREATE TABLE "{s}".facts (id integer PRIMARY KEY, fact text NOT NULL, round integer NOT NULL)')
        with con.cursor() as cur:
            with cur.copy(f'COPY "{s}".kb_shared FROM STDIN') as copy:
                for row in kb:
                    copy.write_row(row)
            with cur.copy(f'COPY "{s}".facts FROM STDIN') as copy:
                for row in facts:
                    copy.write_row(row)


def sql_change(agent: Agent, scale: float, round_: int) -> None:
    """A tenth of the agent's facts rewritten, and as many new ones."""
    n = scaled(FACT_ROWS, scale)
    changed = [(f"agent {agent.index} fact {i} (round {round_}): " + secrets.token_hex(24), round_, i)
               for i in range(0, n, 10)]
    added = [(n * (round_ + 1) + i, f"agent {agent.index} new fact {i}", round_) for i in range(len(changed))]
    if agent.sql_kind == "sqlite":
        con = sqlite3.connect(agent.dir / "agent.db")
        con.executemany("UPDATE facts SET fact = ?, round = ? WHERE id = ?", changed)
        con.executemany("INSERT INTO facts VALUES (?, ?, ?)", added)
        con.commit()
        con.close()
        return
    import psycopg
    with psycopg.connect(_libpq(agent.sql_url)) as con, con.cursor() as cur:
        cur.executemany(f'UPDATE "{agent.schema}".facts SET fact = %s, round = %s WHERE id = %s', changed)
        cur.executemany(f'INSERT INTO "{agent.schema}".facts VALUES (%s, %s, %s)', added)


def _pg_errors() -> tuple:
    try:
        import psycopg
    except ImportError:
        return ()
    return (psycopg.Error,)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def message(kind: str, text: str) -> str:
    return json.dumps({"type": kind, "data": {"content": text, "additional_kwargs": {}, "type": kind}})


def redis_build(client, agent: Agent, scale: float) -> None:
    onboarding = [message("human" if i % 2 == 0 else "ai", f"onboarding step {i}: " + "read the policy " * 6)
                  for i in range(scaled(ONBOARDING_MESSAGES, scale))]
    # LPUSH, newest first, as LangChain's RedisChatMessageHistory
    client.lpush(agent.redis_prefix + "onboarding", *onboarding)
    redis_change(client, agent, scale, 0)


def redis_change(client, agent: Agent, scale: float, round_: int) -> None:
    """A new session this round."""
    messages = [message("human" if i % 2 == 0 else "ai",
                        f"agent {agent.index} round {round_} message {i}: {secrets.token_hex(16)}")
                for i in range(scaled(ROUND_MESSAGES, scale))]
    client.lpush(f"{agent.redis_prefix}session-{round_}", *messages)


def chroma_build(folders: list[str], agents: list[int], scale: float) -> None:
    """Every agent's Chroma folder, in a child process that exits before any snapshot
    reads them (so all of it is on disk)."""
    import chromadb
    import numpy as np

    def vectors(seed: int, n: int):
        return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)

    n_kb, n_mem = scaled(KB_VECTORS, scale), scaled(MEMORY_VECTORS, scale)
    kb_vec = vectors(1, n_kb)
    for folder, agent in zip(folders, agents):
        client = chromadb.PersistentClient(path=folder)
        kb = client.create_collection("handbook", metadata={"hnsw:space": "cosine"})
        memory = client.create_collection("memory")
        for start in range(0, n_kb, 1000):
            end = min(n_kb, start + 1000)
            kb.add(ids=[f"doc-{i:06d}" for i in range(start, end)], embeddings=kb_vec[start:end],
                   documents=[f"shared document {i}" for i in range(start, end)],
                   metadatas=[{"source": "handbook", "page": i} for i in range(start, end)])
        mem_vec = vectors(1000 + agent, n_mem)
        for start in range(0, n_mem, 1000):
            end = min(n_mem, start + 1000)
            memory.add(ids=[f"mem-{i:06d}" for i in range(start, end)], embeddings=mem_vec[start:end],
                       documents=[f"agent {agent} remembers {i}" for i in range(start, end)])


def write_config(agent: Agent, url: str, endpoint: str, region: str) -> None:
    sql = [f'url = "{agent.sql_url}"'] + ([f'schema = "{agent.schema}"'] if agent.schema else [])
    agent.config.write_text("\n".join([
        "[repository]", f'url = "{url}"', f'endpoint_url = "{endpoint}"', f'region = "{region}"', "",
        "[sources.retrieval]", 'backend = "sql"', *sql, "",
        "[sources.history]", 'backend = "conversation"', f'url = "{REDIS_URL}"',
        f'key_prefix = "{agent.redis_prefix}"', "",
        "[sources.memory]", 'backend = "chroma"', 'path = "./chroma"', "",
    ]))


# -- running snapshotter ---------------------------------------------------------------

@dataclass
class Run:
    command: str
    code: int
    out: str
    err: str
    seconds: float

    def json(self):
        return json.loads(self.out)

    @property
    def waited(self) -> bool:
        return "waiting up to" in self.err


class Fleet:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.base = shlex.split(args.snapshotter) if args.snapshotter else [sys.executable, "-m", "snapshotter"]
        self.runs: list[Run] = []
        self.runs_lock = threading.Lock()

    def run(self, config: Path, *args: str) -> Run:
        cmd = [*self.base, "--config", str(config), "--json", "--no-progress",
               "--lock-wait", str(self.args.lock_wait), *args]
        started = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=config.parent, timeout=self.args.lock_wait + 600)
        run = Run(args[0], p.returncode, p.stdout, p.stderr, time.monotonic() - started)
        with self.runs_lock:
            self.runs.append(run)
        return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=8, help="agents, each snapshotted by its own processes (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="snapshots per agent (default 3)")
    ap.add_argument("--scale", type=float, default=1.0, help="size of every store, 1 = the sizes above (default 1)")
    ap.add_argument("--sql", choices=["sqlite", "postgresql", "mixed"], default="mixed",
                    help="each agent's SQL store: a SQLite file, a PostgreSQL schema, or alternately (default)")
    ap.add_argument("--endpoint", help="an S3 endpoint to use instead of starting a moto server")
    ap.add_argument("--bucket", help="bucket on --endpoint (created when missing; default: a new one)")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--grace", default="0", help="prune --grace (default 0: chunks of any age)")
    ap.add_argument("--keep-last", type=int, help="forget --keep-last (default: the number of agents)")
    ap.add_argument("--interval", type=float, default=2.0,
                    help="seconds between two forget runs, and between two prune runs (default 2)")
    ap.add_argument("--lock-wait", type=float, default=600, help="--lock-wait of every command (default 600)")
    ap.add_argument("--snapshotter", help="the snapshotter command (default: python3 -m snapshotter)")
    ap.add_argument("--workdir", help="folder for the agents' stores (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    args = ap.parse_args(argv)
    if args.agents < 1 or args.rounds < 1:
        ap.error("--agents and --rounds must be at least 1")
    if args.keep_last is None:
        args.keep_last = args.agents

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return fleet(args, Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        return fleet(args, Path(tmp))


def fleet(args, workdir: Path) -> int:
    import boto3
    import redis

    log = (lambda text: print(text, file=sys.stderr)) if args.json else print
    server = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        import logging
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
            os.environ[k] = v
        os.environ.pop("AWS_PROFILE", None)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_DEFAULT_REGION"] = args.region
    tag = secrets.token_hex(3)
    bucket = args.bucket or f"fleet-{tag}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=args.region)
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - absent (or not ours to see): create it, which says which
        s3.create_bucket(Bucket=bucket)
    repo_url = f"s3://{bucket}/fleet-{tag}"

    client = redis.Redis.from_url(REDIS_URL)
    agents: list[Agent] = []
    for i in range(args.agents):
        kind = args.sql if args.sql != "mixed" else ("sqlite", "postgresql")[i % 2]
        d = workdir / f"agent-{i}"
        d.mkdir()
        agents.append(Agent(index=i, dir=d, sql_kind=kind,
                            sql_url=f"sqlite:///{d / 'agent.db'}" if kind == "sqlite" else PG_URL,
                            schema=f"fleet_{tag}_agent_{i}" if kind == "postgresql" else None,
                            redis_prefix=f"fleet-{tag}:agent-{i}:", release=f"agent-{i}"))
    try:
        t0 = time.monotonic()
        for a in agents:
            try:
                sql_build(a, args.scale)
                redis_build(client, a, args.scale)
            except (OSError, redis.RedisError) + _pg_errors() as exc:
                raise SystemExit(f"fleet: cannot build agent {a.index}'s stores: {str(exc).splitlines()[0]} "
                                 f"(PostgreSQL: SNAPSHOTTER_FLEET_PG, or --sql sqlite; Redis: "
                                 f"SNAPSHOTTER_FLEET_REDIS)") from None
            write_config(a, repo_url, endpoint, args.region)
        child = multiprocessing.get_context("spawn").Process(
            target=chroma_build, args=([str(a.dir / "chroma") for a in agents], [a.index for a in agents], args.scale))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"fleet: building the Chroma folders failed (exit {child.exitcode})")
        log(f"built {len(agents)} agents' stores in {time.monotonic() - t0:.1f}s "
            f"(SQL: {', '.join(sorted({a.sql_kind for a in agents}))}); repository {repo_url} on {endpoint}")
        return exercise(args, workdir, agents, client, repo_url, log)
    finally:
        for k in client.scan_iter(match=f"fleet-{tag}:*", count=1000):
            client.delete(k)
        client.close()
        if any(a.schema for a in agents):
            import psycopg
            with contextlib.suppress(psycopg.OperationalError), \
                    psycopg.connect(_libpq(PG_URL), autocommit=True) as con:
                for a in agents:
                    if a.schema:
                        con.execute(f'DROP SCHEMA IF EXISTS "{a.schema}" CASCADE')
        if server is not None:
            server.stop()


def exercise(args, workdir: Path, agents: list[Agent], client, repo_url: str, log) -> int:
    fl = Fleet(args, workdir)
    admin = agents[0].config
    r = fl.run(admin, "init")
    if r.code != 0:
        raise SystemExit(f"fleet: init failed (exit {r.code}): {last_line(r.err)}")

    done = threading.Event()
    forgotten: set[str] = set()
    maintenance: dict[str, list[Run]] = {"forget": [], "prune": []}

    def agent_loop(a: Agent) -> None:
        for round_ in range(args.rounds):
            if round_:
                sql_change(a, args.scale, round_)
                redis_change(client, a, args.scale, round_)
            a.snapshots.append(fl.run(a.config, "snapshot", "--release", a.release, "--label", f"round={round_}"))

    def maintenance_loop(command: str, *extra: str) -> None:
        while not done.wait(args.interval):
            r = fl.run(admin, command, *extra)
            maintenance[command].append(r)
            if command == "forget" and r.code == 0:
                forgotten.update(s["id"] for s in r.json()["remove"])

    forget_args = ("--keep-last", str(args.keep_last))
    prune_args = ("--grace", args.grace)
    t0 = time.monotonic()
    threads = [threading.Thread(target=agent_loop, args=(a,)) for a in agents]
    loops = [threading.Thread(target=maintenance_loop, args=("forget", *forget_args)),
             threading.Thread(target=maintenance_loop, args=("prune", *prune_args))]
    for t in threads + loops:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in loops:
        t.join()
    fleet_seconds = time.monotonic() - t0

    # a last forget and prune, once every snapshot is in, then the checks
    for command, extra in (("forget", forget_args), ("prune", prune_args)):
        r = fl.run(admin, command, *extra)
        maintenance[command].append(r)
        if command == "forget" and r.code == 0:
            forgotten.update(s["id"] for s in r.json()["remove"])
    verify = fl.run(admin, "verify", "--read-data")
    listing = fl.run(admin, "list")
    audit = fl.run(admin, "audit")

    return report(args, agents, fl, maintenance, forgotten, verify, listing, audit, fleet_seconds, log)


def report(args, agents, fl: Fleet, maintenance, forgotten, verify: Run, listing: Run, audit: Run,
           fleet_seconds: float, log) -> int:
    failures: list[str] = []
    snaps = [(a, i, r) for a in agents for i, r in enumerate(a.snapshots)]
    committed = [(a, i, r.json()) for a, i, r in snaps if r.code == 0]
    for a, i, r in snaps:
        if r.code != 0:
            failures.append(f"agent {a.index} round {i}: snapshot exit {r.code}: {last_line(r.err)}")
    for command, runs in maintenance.items():
        for r in runs:
            if r.code != 0:
                failures.append(f"{command} exit {r.code}: {last_line(r.err)}")

    def stream_sum(manifest: dict, key: str) -> int:
        return sum(s[key] for src in manifest["sources"].values() for s in src["streams"].values())

    logical = sum(stream_sum(m, "bytes") for _, _, m in committed)
    stored = sum(stream_sum(m, "stored_bytes") for _, _, m in committed)
    written = sum(m["bytes_written"] for _, _, m in committed)
    first = [m for _, i, m in committed if i == 0]
    first_stored = sum(stream_sum(m, "stored_bytes") for m in first)
    first_reused = sum(m["bytes_reused"] for m in first)

    ids = {m["id"] for _, _, m in committed}
    listed = {s["id"] for s in listing.json()} if listing.code == 0 else set()
    if listing.code != 0:
        failures.append(f"list exit {listing.code}: {last_line(listing.err)}")
    elif listed != ids - forgotten:
        failures.append(f"list shows {len(listed)} snapshots; committed and not forgotten: {len(ids - forgotten)} "
                        f"(missing {sorted(ids - forgotten - listed)[:3]}, unexpected {sorted(listed - ids)[:3]})")
    problems = verify.json().get("problems", []) if verify.out.strip() else None
    if verify.code != 0 or problems:
        failures.append(f"verify --read-data exit {verify.code}: "
                        f"{len(problems) if problems is not None else '?'} problem(s); {last_line(verify.err)}")
    pruned = [r.json() for r in maintenance["prune"] if r.code == 0]
    deleted = sum(p["deleted_chunks"] for p in pruned)
    freed = sum(p["bytes_freed"] for p in pruned)

    # lock waits: what the audit records say (the wait for the lock each change was made under),
    # and the commands that printed they were waiting
    waits: dict[str, list[float]] = {}
    for rec in audit.json() if audit.code == 0 else []:
        w = (rec.get("result") or {}).get("lock_waited_seconds")
        if w:
            waits.setdefault(rec["command"], []).append(float(w))
    told: dict[str, int] = {}
    for r in fl.runs:
        if r.waited:
            told[r.command] = told.get(r.command, 0) + 1
    snap_seconds = [r.seconds for _, _, r in snaps]

    result = {
        "agents": len(agents), "rounds": args.rounds, "scale": args.scale,
        "sql": sorted({a.sql_kind for a in agents}),
        "seconds": round(fleet_seconds, 1),
        "snapshot_seconds": {"median": round(statistics.median(snap_seconds), 2), "max": round(max(snap_seconds), 2)},
        "snapshots": {"attempted": len(snaps), "committed": len(committed), "forgotten": len(forgotten & ids),
                      "listed": len(listed)},
        "bytes": {"logical": logical, "stored": stored, "written": written,
                  "first_round_stored": first_stored, "first_round_reused": first_reused},
        "forget_runs": len(maintenance["forget"]),
        "prune": {"runs": len(maintenance["prune"]), "deleted_chunks": deleted, "bytes_freed": freed},
        "lock_waits": {cmd: {"count": len(v), "seconds_total": round(sum(v), 2), "seconds_max": round(max(v), 2)}
                       for cmd, v in sorted(waits.items())},
        "lock_wait_messages": told,
        "verify": {"exit_code": verify.code, "checked": verify.json().get("checked") if verify.out.strip() else None,
                   "problems": len(problems) if problems is not None else None},
        "ok": not failures, "failures": failures,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0 if not failures else 1


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def print_report(r: dict) -> None:
    s, b, p = r["snapshots"], r["bytes"], r["prune"]
    print(f"{r['agents']} agents x {r['rounds']} rounds (scale {r['scale']}, SQL {'+'.join(r['sql'])}) "
          f"in {r['seconds']}s; one snapshot: median {r['snapshot_seconds']['median']}s, "
          f"max {r['snapshot_seconds']['max']}s")
    print(f"snapshots committed: {s['committed']} of {s['attempted']}; forgotten {s['forgotten']}; "
          f"listed at the end {s['listed']}")
    print(f"dedup: logical {mib(b['logical'])}, compressed {mib(b['stored'])}, written {mib(b['written'])} "
          f"({b['logical'] / max(1, b['written']):.1f}x logical/written)")
    print(f"across agents: first snapshots referenced {mib(b['first_round_stored'])}, of which "
          f"{mib(b['first_round_reused'])} was already stored by another agent")
    print(f"forget: {r['forget_runs']} runs; prune: {p['runs']} runs, {p['deleted_chunks']} chunks "
          f"({mib(p['bytes_freed'])}) deleted")
    if r["lock_waits"]:
        for cmd, w in r["lock_waits"].items():
            print(f"lock waits ({cmd}): {w['count']}, {w['seconds_total']}s in all, longest {w['seconds_max']}s")
    else:
        print("lock waits: none")
    v = r["verify"]
    print(f"verify --read-data: exit {v['exit_code']}, {v['checked']} checked, {v['problems']} problem(s)")
    for f in r["failures"]:
        print(f"FAILED: {f}")
    print("OK" if r["ok"] else "NOT OK")


if __name__ == "__main__":
    sys.exit(main())
