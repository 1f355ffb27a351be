"""Benchmark of the conversation backend at agent scale (not part of the test suite).

Builds SESSIONS x MESSAGES LangChain-layout messages in a scratch PostgreSQL
database (dropped afterwards) and under a private Redis key prefix (removed
afterwards), then times, as medians of RUNS:

* one full read by the backend alone (its share of a snapshot);
* a full snapshot through the CLI into a new repository (cold) and into the
  same repository again (incremental: every chunk is already stored);
* a one-session restore after that session was deleted: the session-filtered
  live read plus the writer's rewrite (the backend's share of a restore), the
  same with the session's snapshot records read back from the repository, and
  ``restore --session`` through the CLI (quarantine, apply, verify).

Services come from the same variables as the tests: SNAPSHOTTER_TEST_PG
(an admin URL) and SNAPSHOTTER_TEST_REDIS.

    python scripts/bench_conversation.py [--sessions 1000] [--messages 200] [--runs 3]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import sqlalchemy as sa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from snapshotter import codec  # noqa: E402
from snapshotter.backend import StreamSpec, load_backend, validate_options  # noqa: E402
from snapshotter.cli import main  # noqa: E402
from snapshotter.objectstore import open_store  # noqa: E402
from snapshotter.repository import Repository  # noqa: E402
from snapshotter.streams import read_stream  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from langchain_core.messages import AIMessage, HumanMessage, message_to_dict

PG_ADMIN_URL = os.environ.get("SNAPSHOTTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SNAPSHOTTER_TEST_REDIS", "redis://127.0.0.1:6379/0")
TARGET_SECONDS = 5.0


TEMPLATES = [message_to_dict(HumanMessage("")), message_to_dict(AIMessage("", response_metadata={"model_name": "b"}))]


def messages(session: int, count: int) -> list[str]:
    """LangChain's own serialisation of a plausible exchange, each message distinct."""
    out = []
    for i in range(count):
        text = f"session {session} turn {i}: " + "the customer asks about order status and refunds. " * 3
        template = TEMPLATES[i % 2]
        out.append(json.dumps({"type": template["type"], "data": {**template["data"], "content": text}}))
    return out


@contextlib.contextmanager
def scratch_postgres(sessions: int, per_session: int):
    name = "bench_" + secrets.token_hex(4)
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        engine = sa.create_engine(url)
        with engine.begin() as c:
            # the table SQLChatMessageHistory creates on PostgreSQL
            c.exec_driver_sql("CREATE TABLE message_store (id SERIAL PRIMARY KEY, session_id TEXT, message TEXT)")
            raw = c.connection.driver_connection
            # turns interleave across sessions, as they do when agents serve users concurrently
            per = {s: messages(s, per_session) for s in range(sessions)}
            with raw.cursor().copy("COPY message_store (session_id, message) FROM STDIN") as cp:
                for i in range(per_session):
                    for s in range(sessions):
                        cp.write_row((f"s{s:05d}", per[s][i]))
        engine.dispose()
        yield url
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextlib.contextmanager
def scratch_redis(sessions: int, per_session: int):
    import redis
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"bench{secrets.token_hex(4)}:message_store:"
    try:
        for s in range(sessions):
            pipe = client.pipeline(transaction=False)
            pipe.lpush(f"{prefix}s{s:05d}", *messages(s, per_session))  # LangChain LPUSHes, oldest first
            pipe.execute()
        yield client, prefix
    finally:
        for k in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(k)
        client.close()


def cli(*args: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--no-progress", *args])
    if code != 0:
        raise SystemExit(f"snapshotter {' '.join(args)} failed ({code}): {err.getvalue().strip()}")
    return json.loads(out.getvalue()) if "--json" in args else {}


def timed(fn) -> tuple[float, float]:
    """Wall seconds, and this process's CPU seconds (all threads): on a shared machine the
    CPU figure is the steadier one; the database's own work is only in the wall time."""
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - started, time.process_time() - cpu


def bench_read(options: dict, runs: int) -> list[tuple[float, float]]:
    """The backend's share of a snapshot: one full point-in-time read, records discarded."""
    cls = load_backend("conversation")
    backend = cls("history", validate_options(cls, options, "sources.history"))

    def read_all():
        with backend.reader() as reader:
            for spec in reader.streams():
                for _ in reader.read(spec):
                    pass
    return [timed(read_all) for _ in range(runs)]


def bench_snapshots(workdir: str, options: dict, runs: int) -> tuple[list, list, dict]:
    lines = ['[repository]', 'url = "./repo"', '', '[sources.history]', 'backend = "conversation"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    with open(os.path.join(workdir, "snapshotter.toml"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    cold, warm, last = [], [], {}
    for _ in range(runs):
        shutil.rmtree(os.path.join(workdir, "repo"), ignore_errors=True)
        cli("init")
        cold.append(timed(lambda: last.update(cli("--json", "snapshot", "--release", "bench"))))
    for _ in range(runs):
        warm.append(timed(lambda: last.update(cli("--json", "snapshot", "--release", "bench"))))
    return cold, warm, last


def restore_one_session(backend, spec: StreamSpec, session: str, snap_records) -> int:
    """The backend's share of `restore --session`: filtered live read, per-key plan, writer."""
    wanted = {codec.key_text(k): (k, v) for k, v in snap_records()}
    with backend.reader() as reader:
        now = {codec.key_text(k): (k, v) for batch in reader.read(reader.streams()[0], sessions=[session])
               for k, v in batch}
    upserts = [wanted[t] for t in wanted if t not in now or codec.pack(now[t][1]) != codec.pack(wanted[t][1])]
    deletes = [now[t][0] for t in now if t not in wanted]
    with backend.writer(sessions=[session]) as writer:
        writer.prepare(spec)
        writer.upsert(spec, upserts)
        writer.delete(spec, deletes)
    return len(upserts) + len(deletes)


def bench_restore(workdir: str, options: dict, stream: str, session: str, drift, runs: int):
    cls = load_backend("conversation")
    backend = cls("history", validate_options(cls, options, "sources.history"))
    repo = Repository.open(open_store(os.path.join(workdir, "repo")))
    entry = next(repo.manifests())["sources"]["history"]["streams"][stream]
    spec = StreamSpec(stream, entry["schema"])
    cached = [(r.key, r.value) for r in read_stream(repo, entry)
              if backend.session_of(spec, r.key, r.value) == session]

    def from_repository():
        return [(r.key, r.value) for r in read_stream(repo, entry)
                if backend.session_of(spec, r.key, r.value) == session]

    backend_only, with_repo, command = [], [], []
    for _ in range(runs):
        drift()
        backend_only.append(timed(lambda: restore_one_session(backend, spec, session, lambda: cached)))
        drift()
        with_repo.append(timed(lambda: restore_one_session(backend, spec, session, from_repository)))
        drift()
        command.append(timed(lambda: cli("--json", "restore", "--release", "bench", "--session", session, "--yes")))
    return backend_only, with_repo, command


def report(name: str, reads, cold, warm, last, backend_only, with_repo, command) -> None:
    src = last["sources"]["history"]
    records = sum(s["records"] for s in src["streams"].values())
    print(f"{name}: {records} messages, consistency {src['consistency']}")

    def line(what: str, runs: list[tuple[float, float]], target: bool) -> None:
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        verdict = f"  {'OK' if wall < TARGET_SECONDS else 'OVER'} (< {TARGET_SECONDS:.0f} s)" if target else ""
        print(f"  {what:<44} median {wall:6.2f} s wall, {cpu:6.2f} s CPU"
              f"  (runs {', '.join(f'{w:.2f}' for w, _ in runs)}){verdict}")

    line("full read by the backend alone", reads, False)
    line("full snapshot, new repository", cold, True)
    line("full snapshot, incremental", warm, False)
    line("one session: live read + plan + rewrite", backend_only, True)
    line("... with its records read from the repository", with_repo, False)
    line("restore --session through the CLI", command, True)


def run(args) -> None:
    session = f"s{args.sessions // 2:05d}"
    with tempfile.TemporaryDirectory(prefix="bench-conversation-") as tmp:
        os.chdir(tmp)
        print(f"{args.sessions} sessions x {args.messages} messages, medians of {args.runs}")
        with scratch_postgres(args.sessions, args.messages) as url:
            os.makedirs("pg")
            os.chdir("pg")
            options = {"url": url}
            cold, warm, last = bench_snapshots(".", options, args.runs)
            engine = sa.create_engine(url)

            def drift_sql():
                with engine.begin() as c:
                    c.exec_driver_sql("DELETE FROM message_store WHERE session_id = %s", (session,))

            restores = bench_restore(".", options, "message_store", session, drift_sql, args.runs)
            engine.dispose()
            report("PostgreSQL", bench_read(options, args.runs), cold, warm, last, *restores)
            os.chdir(tmp)
        with scratch_redis(args.sessions, args.messages) as (client, prefix):
            os.makedirs("redis")
            os.chdir("redis")
            options = {"url": REDIS_URL, "key_prefix": prefix}
            cold, warm, last = bench_snapshots(".", options, args.runs)
            restores = bench_restore(".", options, "messages", session,
                                     lambda: client.delete(prefix + session), args.runs)
            report("Redis", bench_read(options, args.runs), cold, warm, last, *restores)
            os.chdir(tmp)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    run(parser.parse_args())
