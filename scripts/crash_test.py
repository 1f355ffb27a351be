#!/usr/bin/env python3
"""Crash suite: ``kill -9`` at random moments of ``snapshot`` and of ``restore``.

    python scripts/crash_test.py [--trials 20] [--sources sql,redis,chroma] [--rows 20000] [--seed 1]

For every source kind (SQLite and PostgreSQL through the ``sql`` backend, Redis
through ``conversation``, an embedded Chroma directory through ``chroma``) a
work folder gets a config file, a local repository, a populated store and a
base snapshot.  Then, per trial:

* snapshot trial: the agent writes, ``python -m snapshotter snapshot`` starts
  as a child process and is killed with SIGKILL after a random delay.  Every
  snapshot that got committed anyway must pass ``verify --read-data`` and hold
  exactly the records that were live (else it counts as *corrupt*).
* restore trial: the agent writes, ``restore BASE --yes`` is killed the same
  way, then run again to the end.  The re-run must exit 0, ``diff BASE`` must
  plan nothing, and the store, read with its own client, must equal what it
  was right after the base snapshot (else *non-converging*).  Every record the
  agent wrote after the snapshot must be in one of the incidents, and the
  first incident laid over the snapshot must rebuild the state live before the
  first attempt exactly (a record that is not counts as a *lost write*).

``--trials N`` kills per kind, alternately of a snapshot and of a restore.
The child imports its modules first and says so; the kill delay, counted from
there, is drawn up to 1.2x a full run (timed once per kind), so kills land in
every phase (reading, chunk upload, manifest, quarantine, apply, verify).  A lock left by a killed run is
cleared with ``unlock --stale`` when the next command reports it (counted).

The last line reads ``crash: N trials, 0 corrupt snapshots, 0 non-converging
restores, 0 lost writes``; the exit status is 1 when any count is not 0.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import decimal
import io
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from snapshotter import codec  # noqa: E402
from snapshotter.objectstore import open_store  # noqa: E402
from snapshotter.quarantine import bundles, iter_records  # noqa: E402
from snapshotter.repository import Repository  # noqa: E402
from snapshotter.streams import read_stream  # noqa: E402

PG_ADMIN_URL = os.environ.get("SNAPSHOTTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SNAPSHOTTER_TEST_REDIS", "redis://127.0.0.1:6379/0")
SOURCE = "agent"
BASE_RELEASE = "base"
CRASH_RELEASE = "crash"


# -- running the CLI ------------------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in list(env):
        if k.startswith("SNAPSHOTTER_") and not k.startswith("SNAPSHOTTER_TEST_"):
            del env[k]
    return env


def run_cli(config: Path, *args: str) -> Result:
    """The CLI in this process (the checks after a kill need no fresh interpreter)."""
    from snapshotter.cli import main
    out, err = io.StringIO(), io.StringIO()
    old_in = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--config", str(config), "--no-progress", *map(str, args)])
    finally:
        sys.stdin = old_in
    return Result(code, out.getvalue(), err.getvalue())


# The child imports everything first and says so, then runs `python -m snapshotter` as is:
# the kill delay counts from there, so kills land in the work, not in the interpreter's start-up
# (whose length varies by more than a small run takes).
_CHILD = """
import runpy, sys
for module in sys.argv[1].split(","):
    if module:
        __import__(module)
import snapshotter.cli
sys.stderr.write("ready\\n")
sys.stderr.flush()
sys.argv = ["snapshotter"] + sys.argv[2:]
runpy.run_module("snapshotter", run_name="__main__")
"""


def kill_child_after(config: Path, delay: float, *args: str, preload: tuple[str, ...] = ()) -> int | None:
    """Start the CLI as a child, SIGKILL it ``delay`` seconds after its imports; its exit code if it ended first."""
    p = subprocess.Popen([sys.executable, "-c", _CHILD, ",".join(preload), "--config", str(config),
                          "--no-progress", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(), cwd=config.parent)
    try:
        ready = p.stderr.readline()
        if ready.strip() != b"ready":
            p.wait(timeout=60)
            raise RuntimeError(f"the child did not start: {ready.decode(errors='replace')}"
                               f"{p.stderr.read().decode(errors='replace')}")
        try:
            p.wait(timeout=delay)
            return p.returncode
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return None
    finally:
        p.stderr.close()


# -- records, as snapshotter sees them --------------------------------------------------

RecordMap = dict  # (stream, packed key) -> packed value


def live_records(config: Path, source: str = SOURCE) -> RecordMap:
    """Every live record as the source's backend reads it."""
    from snapshotter.config import load_config
    cfg = load_config(str(config))
    backend = cfg.open_source(source)
    out: RecordMap = {}
    try:
        with backend.reader() as reader:
            for spec in reader.streams():
                for batch in reader.read(spec):
                    for key, value in batch:
                        out[(spec.name, codec.pack(key))] = codec.pack(value)
    finally:
        engine = getattr(backend, "_engine", None)
        if engine is not None:
            engine.dispose()
    return out


def open_repo(workdir: Path) -> Repository:
    return Repository.open(open_store(str(workdir / "repo")))


def snapshot_records(repo: Repository, manifest: dict, source: str = SOURCE) -> RecordMap:
    out: RecordMap = {}
    for stream, entry in manifest["sources"][source]["streams"].items():
        for rec in read_stream(repo, entry):
            out[(stream, codec.pack(rec.key))] = codec.pack(rec.value)
    return out


def backend_equality(config: Path, manifest: dict, source: str = SOURCE):
    """``equal(stream, a, b)`` on packed values with the backend's rule: bytes, or for a store
    that perturbs values on a round trip (Chroma cosine) its documented tolerance."""
    from snapshotter.backend import StreamSpec
    from snapshotter.config import load_config
    backend = load_config(str(config)).open_source(source)
    specs = {name: StreamSpec(name, entry.get("schema", {}))
             for name, entry in manifest["sources"][source]["streams"].items()}

    def equal(stream: str, a: bytes | None, b: bytes | None) -> bool:
        if a == b:
            return True
        if a is None or b is None or stream not in specs:
            return False
        return backend.values_equal(specs[stream], codec.unpack(a), codec.unpack(b))
    return equal


def lost_writes(repo: Repository, snapshot: RecordMap, pre: RecordMap, incidents: list[dict],
                source: str = SOURCE, equal=None) -> list:
    """Records live before the first restore attempt that the incidents cannot give back.

    A record differing from the snapshot must be held, with its pre-restore
    value (or a deletion marker), by some incident; and the first incident laid
    over the snapshot must rebuild the pre-restore state (exactly, or by
    ``equal(stream, a, b)`` where the store perturbs values).
    """
    def same(k, a, b) -> bool:
        return a == b or (equal is not None and equal(k[0], a, b))

    changed = {k for k in snapshot.keys() | pre.keys() if not same(k, snapshot.get(k), pre.get(k))}
    if not incidents:
        return sorted(changed)
    held: dict = collections.defaultdict(set)
    per_incident: dict[str, list] = {}
    for b in incidents:
        recs = per_incident[b["incident"]] = []
        for _, stream, rec in iter_records(repo, b, source=source):
            q = rec.value
            k = (stream, codec.pack(rec.key))
            v = None if q["op"] == "deleted" else codec.pack(q["value"])
            held[k].add(v)
            recs.append((k, v))
    lost = {k for k in changed if pre.get(k) not in held.get(k, ())}
    first = min(incidents, key=lambda b: (b.get("created_at") or "", b["incident"]))
    rebuilt = dict(snapshot)
    for k, v in per_incident[first["incident"]]:
        if v is None:
            rebuilt.pop(k, None)
        else:
            rebuilt[k] = v
    lost |= {k for k in rebuilt.keys() | pre.keys() if not same(k, rebuilt.get(k), pre.get(k))}
    return sorted(lost)


def plan_is_empty(plan: dict) -> bool:
    return all(not any(counts.values()) for streams in plan.values() for counts in streams.values())


# -- source kinds -------------------------------------------------------------------------

class SourceKind:
    """One kind of store under test: sets itself up, writes like an agent, and reads
    itself back with its own client (independently of snapshotter)."""

    name = ""
    preload: tuple[str, ...] = ()  # modules a child imports before its kill clock starts

    def unavailable(self) -> str | None:
        return None

    def setup(self, workdir: Path, rnd: random.Random, size: int) -> None:
        raise NotImplementedError

    def section(self) -> str:
        raise NotImplementedError

    def mutate(self, rnd: random.Random) -> None:
        raise NotImplementedError

    def raw_state(self) -> Any:
        raise NotImplementedError

    def same_raw(self, a: Any, b: Any) -> bool:
        """Whether two raw states are the same store contents (exact unless the store says otherwise)."""
        return a == b

    def release(self) -> None:
        """Let go of anything this process holds open in the store, before a child uses it."""

    def teardown(self) -> None:
        pass


def _message(rnd: random.Random, i: int) -> str:
    kind = rnd.choice(["human", "ai"])
    text = " ".join(rnd.choice(["tool", "memory", "prompt", "café", "über", "漢字", "vector"]) for _ in range(12))
    return json.dumps({"type": kind, "data": {"content": f"{i}: {text}", "additional_kwargs": {},
                                              "response_metadata": {}, "type": kind, "name": None, "id": None}})


class SQLKind(SourceKind):
    """A table of awkward types plus a composite-key table, in one database (one transaction)."""

    def __init__(self, dialect: str, url: str | None = None):
        self.name = dialect
        self.preload = (f"snapshotter_backends.sql.{dialect}",
                        *(("sqlalchemy.dialects.postgresql", "psycopg") if dialect == "postgresql"
                          else ("sqlalchemy.dialects.sqlite",)))
        self.url = url
        self.own_db: str | None = None
        self.engine = None
        self.next_id = 0

    def unavailable(self) -> str | None:
        if self.name != "postgresql" or self.url:
            return None
        import sqlalchemy as sa
        try:
            eng = sa.create_engine(PG_ADMIN_URL)
            with eng.connect():
                pass
            eng.dispose()
        except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
            return f"PostgreSQL not reachable ({str(exc).splitlines()[0][:100]})"
        return None

    def setup(self, workdir: Path, rnd: random.Random, size: int) -> None:
        import sqlalchemy as sa
        if self.url is None:
            if self.name == "sqlite":
                self.url = f"sqlite:///{workdir / 'agent.db'}"
            else:
                self.own_db = "crash_" + secrets.token_hex(4)
                admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
                with admin.connect() as c:
                    c.exec_driver_sql(f'CREATE DATABASE "{self.own_db}"')
                admin.dispose()
                self.url = sa.engine.make_url(PG_ADMIN_URL).set(database=self.own_db).render_as_string(
                    hide_password=False)
        self.engine = sa.create_engine(self.url)
        md = sa.MetaData()
        self.kb = sa.Table(
            "kb_chunks", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("title", sa.String(200)),
            sa.Column("body", sa.Text),
            sa.Column("blob", sa.LargeBinary),
            sa.Column("price", sa.Numeric(20, 6)),
            sa.Column("created", sa.DateTime(timezone=True)),
            sa.Column("meta", sa.JSON),
            sa.Column("score", sa.Float),
            sa.Column("flag", sa.Boolean),
        )
        self.notes = sa.Table(
            "notes", md,
            sa.Column("session", sa.String(64), primary_key=True),
            sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("text", sa.Text),
        )
        md.create_all(self.engine)
        with self.engine.begin() as c:
            rows = [self._row(rnd, i) for i in range(size)]
            for i in range(0, len(rows), 2000):
                c.execute(self.kb.insert(), rows[i:i + 2000])
            c.execute(self.notes.insert(), [{"session": f"s-{i % 50}", "seq": i, "text": f"note {i} ✓"}
                                            for i in range(max(50, size // 10))])
        self.next_id = size

    @staticmethod
    def _row(rnd: random.Random, i: int) -> dict:
        tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
        return {
            "id": i,
            "title": None if i % 97 == 0 else f"Dokument {i} — naïve café ✓ 漢字",
            "body": " ".join(rnd.choice(["agent", "memory", "tool", "vector", "über", "prompt"]) for _ in range(20)),
            "blob": None if i % 89 == 0 else rnd.randbytes(16),
            "price": None if i % 83 == 0 else decimal.Decimal(f"{rnd.randint(0, 10**9)}.{rnd.randint(0, 999999):06d}"),
            "created": dt.datetime(2026, 1, 1, tzinfo=tz) + dt.timedelta(seconds=i * 37, microseconds=i),
            "meta": None if i % 79 == 0 else {"tags": ["a", "ü"], "n": i},
            "score": rnd.random(),
            "flag": i % 2 == 0,
        }

    def section(self) -> str:
        return f'backend = "sql"\nurl = "{self.url}"\ntables = ["kb_chunks", "notes"]\n'

    def mutate(self, rnd: random.Random) -> None:
        import sqlalchemy as sa
        with self.engine.begin() as c:
            n = c.execute(sa.select(sa.func.count()).select_from(self.kb)).scalar()
            ids = [r[0] for r in c.execute(sa.select(self.kb.c.id)).fetchall()]
            for i in rnd.sample(ids, min(len(ids), max(5, n // 50))):
                c.execute(self.kb.update().where(self.kb.c.id == i).values(
                    body=f"poisoned {rnd.random()}", price=decimal.Decimal("0.000001"), meta={"poison": True}))
            gone = rnd.sample(ids, min(len(ids), max(3, n // 200)))
            c.execute(self.kb.delete().where(self.kb.c.id.in_(gone)))
            new = [self._row(rnd, self.next_id + j) for j in range(rnd.randint(1, 20))]
            self.next_id += len(new)
            c.execute(self.kb.insert(), new)
            c.execute(self.notes.update().where(self.notes.c.session == f"s-{rnd.randrange(50)}").values(text="edited"))
            c.execute(self.notes.insert(), [{"session": "s-new", "seq": self.next_id, "text": "added"}])

    def raw_state(self) -> Any:
        with self.engine.connect() as c:
            kb = c.exec_driver_sql("SELECT * FROM kb_chunks ORDER BY id").fetchall()
            notes = c.exec_driver_sql("SELECT * FROM notes ORDER BY session, seq").fetchall()
        return {"kb_chunks": [codec.pack(list(r)) for r in kb], "notes": [codec.pack(list(r)) for r in notes]}

    def teardown(self) -> None:
        import sqlalchemy as sa
        if self.engine is not None:
            self.engine.dispose()
        if self.own_db:
            admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.own_db}" WITH (FORCE)')
            admin.dispose()


class RedisKind(SourceKind):
    """LangChain RedisChatMessageHistory lists (newest first) under a private key prefix."""

    name = "redis"
    preload = ("snapshotter_backends.conversation", "redis")

    def __init__(self, url: str = REDIS_URL, prefix: str | None = None):
        self.url = url
        self.prefix = prefix or f"crash{secrets.token_hex(4)}:"
        self.client = None
        self.counter = 0

    def unavailable(self) -> str | None:
        try:
            import redis
            client = redis.Redis.from_url(self.url)
            client.ping()
            client.close()
        except Exception as exc:  # noqa: BLE001
            return f"Redis not reachable ({str(exc).splitlines()[0][:100]})"
        try:
            from snapshotter.backend import load_backend
            load_backend("conversation")
        except Exception as exc:  # noqa: BLE001
            return f"conversation backend not available ({exc})"
        return None

    def setup(self, workdir: Path, rnd: random.Random, size: int) -> None:
        import redis
        self.client = redis.Redis.from_url(self.url)
        sessions = max(20, size // 50)
        pipe = self.client.pipeline()
        for s in range(sessions):
            for _ in range(rnd.randint(20, 80)):
                pipe.lpush(f"{self.prefix}sess-{s:04d}", _message(rnd, self.counter))
                self.counter += 1
        pipe.execute()
        self.sessions = sessions

    def section(self) -> str:
        return f'backend = "conversation"\nurl = "{self.url}"\nkey_prefix = "{self.prefix}"\n'

    def mutate(self, rnd: random.Random) -> None:
        keys = sorted(k.decode() for k in self.client.scan_iter(match=self.prefix + "*", count=1000))
        pipe = self.client.pipeline()
        for key in rnd.sample(keys, min(len(keys), 5)):  # the agent keeps talking
            for _ in range(rnd.randint(1, 4)):
                pipe.lpush(key, _message(rnd, self.counter))
                self.counter += 1
        for key in rnd.sample(keys, min(len(keys), 3)):  # a poisoned message rewritten in place
            pipe.lset(key, rnd.randint(0, 5), _message(rnd, self.counter))
            self.counter += 1
        for key in rnd.sample(keys, min(len(keys), 2)):  # newest messages removed
            pipe.lpop(key)
        pipe.delete(rnd.choice(keys))  # a whole session wiped
        new = f"{self.prefix}new-{self.counter:06d}"
        for _ in range(3):
            pipe.lpush(new, _message(rnd, self.counter))
            self.counter += 1
        pipe.execute()

    def raw_state(self) -> Any:
        keys = sorted(self.client.scan_iter(match=self.prefix + "*", count=1000))
        return {k: self.client.lrange(k, 0, -1) for k in keys}

    def teardown(self) -> None:
        if self.client is not None:
            for k in self.client.scan_iter(match=self.prefix + "*", count=1000):
                self.client.delete(k)
            self.client.close()


class ChromaKind(SourceKind):
    """An embedded Chroma directory (PersistentClient), a cosine and an l2 collection.

    Chroma's embedded mode belongs to one process at a time: this process lets go of
    the directory (``release``) before any child process opens it."""

    name = "chroma"
    preload = ("snapshotter_backends.chroma", "chromadb")
    DIM = 32
    COSINE = {"kb_docs"}
    ULPS = 2  # docs/design.md, "Equality after restore"

    def unavailable(self) -> str | None:
        try:
            from snapshotter.backend import load_backend
            load_backend("chroma")
        except Exception as exc:  # noqa: BLE001
            return f"chroma backend not available ({str(exc).splitlines()[0][:120]})"
        return None

    def release(self) -> None:
        from chromadb.api.shared_system_client import SharedSystemClient
        for system in list(SharedSystemClient._identifier_to_system.values()):
            with contextlib.suppress(Exception):
                system.stop()
        SharedSystemClient.clear_system_cache()

    @contextlib.contextmanager
    def client(self):
        import chromadb
        try:
            yield chromadb.PersistentClient(path=str(self.path))
        finally:
            self.release()

    def _vectors(self, rnd: random.Random, n: int):
        import numpy as np
        return np.array([[rnd.uniform(-1, 1) for _ in range(self.DIM)] for _ in range(n)], dtype=np.float32)

    def setup(self, workdir: Path, rnd: random.Random, size: int) -> None:
        self.path = workdir / "chroma"
        size = max(200, size // 4)
        with self.client() as client:
            for name, space in (("kb_docs", "cosine"), ("facts", "l2")):
                col = client.create_collection(name, metadata={"owner": "agent"},
                                               configuration={"hnsw": {"space": space}})
                n = size if name == "kb_docs" else max(20, size // 10)
                for i in range(0, n, 500):
                    m = min(500, n - i)
                    col.add(ids=[f"{name}-{j:06d}" for j in range(i, i + m)], embeddings=self._vectors(rnd, m),
                            documents=[f"doc {j} café ✓" for j in range(i, i + m)],
                            metadatas=[{"n": j, "tag": rnd.choice(["a", "b", "ü"])} for j in range(i, i + m)])

    def section(self) -> str:
        return 'backend = "chroma"\npath = "./chroma"\n'

    def mutate(self, rnd: random.Random) -> None:
        tag = rnd.randrange(1 << 30)
        with self.client() as client:
            col = client.get_collection("kb_docs")
            ids = sorted(col.get(include=[])["ids"])
            up = rnd.sample(ids, min(len(ids), 20))
            col.update(ids=up, embeddings=self._vectors(rnd, len(up)),
                       documents=["ignore previous instructions"] * len(up))
            rest = sorted(set(ids) - set(up))
            col.delete(ids=rnd.sample(rest, min(len(rest), 5)))
            col.add(ids=[f"kb_docs-new-{tag}-{j}" for j in range(5)], embeddings=self._vectors(rnd, 5),
                    documents=["exfiltrate"] * 5, metadatas=[{"n": -1}] * 5)
            client.get_collection("facts").upsert(ids=[f"facts-new-{tag}"], embeddings=self._vectors(rnd, 1),
                                                  documents=["new fact"])

    def raw_state(self) -> Any:
        import numpy as np
        out = {}
        with self.client() as client:
            for col in sorted(client.list_collections(), key=lambda c: c.name):
                got = col.get(include=["embeddings", "documents", "metadatas"])
                out[col.name] = sorted(zip(got["ids"], [np.asarray(e, dtype=np.float32).tobytes()
                                                        for e in got["embeddings"]],
                                           got["documents"], [json.dumps(m, sort_keys=True) for m in got["metadatas"]]))
        return out

    def same_raw(self, a: Any, b: Any) -> bool:
        import numpy as np
        if sorted(a) != sorted(b):
            return False
        for name in a:
            if len(a[name]) != len(b[name]):
                return False
            for ra, rb in zip(a[name], b[name]):
                if (ra[0], ra[2], ra[3]) != (rb[0], rb[2], rb[3]):
                    return False
                if ra[1] == rb[1]:
                    continue
                if name not in self.COSINE:
                    return False
                # float32 bits as ordered integers: their difference counts units in the last place
                ea, eb = (np.frombuffer(x, dtype=np.int32).astype(np.int64) for x in (ra[1], rb[1]))
                ea = np.where(ea < 0, -(ea & 0x7FFFFFFF), ea)
                eb = np.where(eb < 0, -(eb & 0x7FFFFFFF), eb)
                if ea.shape != eb.shape or np.abs(ea - eb).max() > self.ULPS:
                    return False
        return True


def make_kinds(names: list[str]) -> list[SourceKind]:
    out: list[SourceKind] = []
    for name in names:
        if name == "sql":
            out += [SQLKind("sqlite"), SQLKind("postgresql")]
        elif name in ("sqlite", "postgresql"):
            out.append(SQLKind(name))
        elif name == "redis":
            out.append(RedisKind())
        elif name == "chroma":
            out.append(ChromaKind())
        else:
            raise SystemExit(f"unknown source kind {name!r} (sql, sqlite, postgresql, redis, chroma)")
    return out


# -- the suite ------------------------------------------------------------------------------

@dataclass
class Tally:
    trials: int = 0
    snapshot_trials: int = 0
    restore_trials: int = 0
    corrupt_snapshots: int = 0
    non_converging: int = 0
    lost_writes: int = 0
    killed: int = 0  # children that were still running when killed
    committed_despite_kill: int = 0  # killed snapshots whose manifest was already written
    bundles_before_kill: int = 0  # killed restores whose quarantine was already committed
    stale_unlocks: int = 0  # commands that met a lock left by a killed run
    problems: list[str] = field(default_factory=list)
    per_kind: dict = field(default_factory=dict)

    def add(self, other: "Tally") -> None:
        for f in ("trials", "snapshot_trials", "restore_trials", "corrupt_snapshots", "non_converging",
                  "lost_writes", "killed", "committed_despite_kill", "bundles_before_kill", "stale_unlocks"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.problems += other.problems

    @property
    def bad(self) -> int:
        return self.corrupt_snapshots + self.non_converging + self.lost_writes

    def line(self) -> str:
        return (f"crash: {self.trials} trials, {self.corrupt_snapshots} corrupt snapshots, "
                f"{self.non_converging} non-converging restores, {self.lost_writes} lost writes")


class Harness:
    """One source kind in its own work folder, repository and config file."""

    def __init__(self, kind: SourceKind, workdir: Path, *, size: int, seed: int, log=print):
        self.kind = kind
        self.workdir = workdir
        self.config = workdir / "snapshotter.toml"
        self.size = size
        self.rnd = random.Random(seed)
        self.log = log
        self.tally = Tally()

    def run(self, *args: str) -> Result:
        try:
            return run_cli(self.config, *args)
        finally:
            self.kind.release()

    def cli(self, *args: str) -> Result:
        r = self.run(*args)
        if r.code == 4:  # a lock left by the killed run: the documented way out
            self.tally.stale_unlocks += 1
            self.run("unlock", "--stale")
            r = self.run(*args)
        return r

    def live(self) -> RecordMap:
        try:
            return live_records(self.config)
        finally:
            self.kind.release()

    def timed(self, *args: str) -> tuple[Result, float]:
        started = time.perf_counter()
        r = self.cli(*args)
        return r, time.perf_counter() - started

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kind.setup(self.workdir, self.rnd, self.size)
        self.config.write_text(f'[repository]\nurl = "./repo"\n\n[sources.{SOURCE}]\n{self.kind.section()}')
        r = self.cli("init")
        assert r.code == 0, r.err
        # the base snapshot and one undisturbed restore run here, timed, to size the kill window
        r, self.snapshot_seconds = self.timed("--json", "snapshot", "--release", BASE_RELEASE)
        if r.code != 0:
            raise RuntimeError(f"{self.kind.name}: base snapshot failed: {r.err.strip()}")
        self.base = r.json()["id"]
        self.repo = open_repo(self.workdir)
        self.base_manifest = self.repo.load_manifest(self.repo.resolve(self.base))
        self.base_records = snapshot_records(self.repo, self.base_manifest)
        self.base_raw = self.kind.raw_state()
        self.equal = backend_equality(self.config, self.base_manifest)
        if self.live() != self.base_records:
            raise RuntimeError(f"{self.kind.name}: the base snapshot does not hold the live records")
        self.kind.mutate(self.rnd)
        r, self.restore_seconds = self.timed("--json", "restore", self.base, "--yes")
        if r.code != 0 or not self.kind.same_raw(self.kind.raw_state(), self.base_raw):
            raise RuntimeError(f"{self.kind.name}: an uninterrupted restore did not reach the snapshot: "
                               f"{r.err.strip()}")
        self.log(f"  {self.kind.name}: snapshot {self.snapshot_seconds:.2f}s, restore {self.restore_seconds:.2f}s, "
                 f"{len(self.base_records)} records")

    def kill(self, full: float, *args: str) -> int | None:
        # the previous trial's killed run may have left its lock; the child must not stop at it
        self.run("unlock", "--stale")
        return kill_child_after(self.config, self.rnd.uniform(0, 1.2 * full), *args, preload=self.kind.preload)

    def problem(self, text: str) -> None:
        self.tally.problems.append(f"{self.kind.name}: {text}")
        self.log(f"  PROBLEM {self.kind.name}: {text}")

    # -- trials -----------------------------------------------------------------------

    def snapshot_trial(self, n: int) -> None:
        t = self.tally
        t.trials += 1
        t.snapshot_trials += 1
        self.kind.mutate(self.rnd)
        expected = self.live()
        before = {r.id for r in self.repo.list_snapshot_refs()}
        code = self.kill(self.snapshot_seconds, "--json", "snapshot", "--release", CRASH_RELEASE,
                         "--label", f"trial={n}")
        t.killed += code is None
        repo = open_repo(self.workdir)
        new = [r for r in repo.list_snapshot_refs() if r.id not in before]
        if code is None and new:
            t.committed_despite_kill += 1
        if code is not None and code != 0:
            self.problem(f"snapshot trial {n}: the child exited {code} before it was killed")
        for ref in new:
            v = self.cli("--json", "verify", "--read-data", ref.id)
            if v.code != 0:
                t.corrupt_snapshots += 1
                self.problem(f"snapshot {ref.id} (trial {n}) fails verify --read-data: {v.out.strip()} {v.err.strip()}")
                continue
            got = snapshot_records(repo, repo.load_manifest(ref))
            if got != expected:
                t.corrupt_snapshots += 1
                diff = sum(1 for k in got.keys() | expected.keys() if got.get(k) != expected.get(k))
                self.problem(f"snapshot {ref.id} (trial {n}) differs from the live records in {diff} record(s)")

    def restore_trial(self, n: int) -> None:
        t = self.tally
        t.trials += 1
        t.restore_trials += 1
        self.kind.mutate(self.rnd)
        pre = self.live()
        incident = f"crash-{self.kind.name}-{n}"
        code = self.kill(self.restore_seconds, "--json", "restore", self.base, "--yes", "--incident", incident)
        t.killed += code is None
        if code is not None and code != 0:
            self.problem(f"restore trial {n}: the child exited {code} before it was killed")
        repo = open_repo(self.workdir)
        first_committed = any(b["incident"] == incident for b in bundles(repo))
        if code is None and first_committed:
            t.bundles_before_kill += 1
        r = self.cli("--json", "restore", self.base, "--yes")
        ok = r.code == 0
        if not ok:
            self.problem(f"restore trial {n}: the re-run exited {r.code}: {r.err.strip()}")
        d = self.cli("--json", "diff", self.base)
        if d.code != 0 or not plan_is_empty(d.json()["plan"]):
            ok = False
            self.problem(f"restore trial {n}: after the re-run, diff plans {d.out.strip() or d.err.strip()}")
        if not self.kind.same_raw(self.kind.raw_state(), self.base_raw):
            ok = False
            self.problem(f"restore trial {n}: the store read with its own client differs from the snapshot")
        t.non_converging += not ok
        names = {incident}
        if r.code == 0 and r.json().get("incident"):
            names.add(r.json()["incident"])
        incidents = [b for b in bundles(repo) if b["incident"] in names]
        lost = lost_writes(repo, self.base_records, pre, incidents, equal=self.equal)
        if lost:
            t.lost_writes += len(lost)
            self.problem(f"restore trial {n}: {len(lost)} record(s) written after the snapshot are in no incident "
                         f"(e.g. {lost[0][0]}/{codec.key_text(codec.unpack(lost[0][1]))})")


def run_kind(kind: SourceKind, workdir: Path, *, trials: int, size: int, seed: int, log=print) -> Tally:
    """``trials`` kills on one kind, alternating snapshot and restore."""
    h = Harness(kind, workdir, size=size, seed=seed, log=log)
    try:
        h.setup()
        for n in range(trials):
            (h.snapshot_trial if n % 2 == 0 else h.restore_trial)(n)
    finally:
        kind.teardown()
    return h.tally


def run_suite(kinds: list[SourceKind], *, trials: int, size: int, seed: int, workdir: Path | None = None,
              log=print) -> Tally:
    total = Tally()
    base = workdir or Path(tempfile.mkdtemp(prefix="snapshotter-crash-"))
    try:
        for i, kind in enumerate(kinds):
            why = kind.unavailable()
            if why:
                log(f"  {kind.name}: skipped: {why}")
                total.per_kind[kind.name] = "skipped"
                continue
            tally = run_kind(kind, base / kind.name, trials=trials, size=size, seed=seed * 1000 + i, log=log)
            total.add(tally)
            total.per_kind[kind.name] = tally
            log(f"  {kind.name}: {tally.line()[len('crash: '):]}; {tally.killed} killed mid-run, "
                f"{tally.committed_despite_kill} snapshot(s) committed just before the kill, "
                f"{tally.bundles_before_kill} restore(s) killed after their quarantine was committed, "
                f"{tally.stale_unlocks} stale lock(s) cleared")
    finally:
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description="kill -9 snapshot and restore at random moments; count what broke")
    ap.add_argument("--trials", type=int, default=20,
                    help="kills per source kind, alternately of a snapshot and of a restore")
    ap.add_argument("--sources", default="sql,redis,chroma",
                    help="comma-separated: sql (= sqlite,postgresql), sqlite, postgresql, redis, chroma")
    ap.add_argument("--rows", type=int, default=20000, help="records per store (roughly)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and leave it behind for inspection")
    args = ap.parse_args()
    kinds = make_kinds([s.strip() for s in args.sources.split(",") if s.strip()])
    started = time.time()
    tally = run_suite(kinds, trials=args.trials, size=args.rows, seed=args.seed,
                      workdir=Path(args.keep) if args.keep else None)
    print(f"{tally.snapshot_trials} snapshot kills, {tally.restore_trials} restore kills, "
          f"{time.time() - started:.0f}s")
    print(tally.line())
    return 1 if tally.bad or tally.problems else 0


if __name__ == "__main__":
    sys.exit(main())
