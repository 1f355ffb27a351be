"""How the conformance suite reaches each store: one adapter per backend and store.

An adapter plays the agent.  It makes an empty store, writes and removes records with
the store's own client (never through the backend under test), reads every record
back, and gives the ``[sources.NAME]`` lines that point the backend at the store.  The
scenarios in ``test_source_backends.py`` are written once against this interface.

Records are named by short strings (``"r1"``, ``"ünïcödé ✓"``); each adapter maps a
name to the record's key in its store.  A record's *payload* is what the agent wrote
into it: text always, bytes or None where the store holds them (``payloads``).

A plugin author writes one adapter for their store (subclass :class:`Adapter`) and
runs the suite on it: docs/conformance.md.
"""
from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from conftest import REDIS_URL, install_plugin
from snapshotter import codec


class Adapter:
    """One store, as the agent sees it."""

    #: the test id
    id = ""
    #: the backend the source uses
    backend = ""
    #: the stream the records live in
    stream = ""
    #: what a payload may be: "text" always; "bytes" (binary values) and "none" (no value)
    #: where the store holds them
    payloads: frozenset = frozenset({"text"})
    #: what an agent write racing a restore (after its plan, before its writes) meets:
    #: "refused" - the write lands and the restore stops (exit 6) having written nothing;
    #: "held off" - the store makes the write wait for the restore's transaction (it times
    #: out here), and the restore completes
    race = "refused"
    #: the stream can be removed as a whole (a table dropped, a collection deleted)
    droppable = True
    #: another process may use the store while this one has it open
    shared = True

    def __init__(self, request, tmp_path: Path):
        self.request = request
        self.tmp_path = tmp_path

    def start(self) -> None:
        """Make an empty store holding the stream."""
        raise NotImplementedError

    def source(self) -> str:
        """The lines under ``[sources.NAME]`` after ``backend = ...``."""
        raise NotImplementedError

    def env(self) -> dict:
        """What a child process running the program needs in its environment."""
        return {}

    def key(self, name: str) -> Any:
        """The record's key, as the backend gives it (JSON data: ``quarantine show``'s "key")."""
        return name

    def put(self, name: str, payload: Any) -> None:
        """Write the record (insert, or replace in place)."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def records(self) -> dict[str, Any]:
        """Every record in the store: key text -> a value that compares equal exactly when
        the record is the same, read with the store's own client."""
        raise NotImplementedError

    def payload(self, value: dict) -> Any:
        """The payload inside a record's value as ``quarantine show --json`` prints it
        (bytes as base64 text)."""
        raise NotImplementedError

    def empty(self) -> None:
        """Remove every record, keep the stream."""
        for key in list(self.records()):
            self.remove(self.name_of(key))

    def name_of(self, key_text: str) -> str:
        """The name of the record whose key text :meth:`records` gives (here: the key is the name)."""
        return json.loads(key_text)

    def drop(self) -> None:
        """Remove the stream itself (only called when ``droppable``)."""
        raise NotImplementedError

    def race_put(self, name: str, payload: Any) -> bool:
        """:meth:`put` while a restore runs: True when the write landed, False when the
        store held it off (a lock wait that timed out)."""
        self.put(name, payload)
        return True

    def reopen(self) -> None:
        """Called after another process wrote the store."""

    def close(self) -> None:
        pass


# -- sql: one table on SQLite, PostgreSQL, MariaDB ------------------------------------

class SQLAdapter(Adapter):
    """A retrieval table with the column types agents keep (text, bytes, decimal, zoned
    timestamp, JSON, float, boolean); the payload goes to ``body`` (text) or ``data``
    (bytes), the other columns follow from the record's name."""

    backend = "sql"
    stream = "items"
    payloads = frozenset({"text", "bytes", "none"})
    url_fixture = ""

    def start(self) -> None:
        import sqlalchemy as sa
        from sqlalchemy.dialects import mysql
        self.sa = sa
        self.url = self.request.getfixturevalue(self.url_fixture)
        self.engine = sa.create_engine(self.url)
        md = sa.MetaData()
        self.table = sa.Table(
            "items", md,
            sa.Column("k", sa.String(255), primary_key=True),
            sa.Column("body", sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")),
            sa.Column("data", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")),
            sa.Column("price", sa.Numeric(20, 6)),
            sa.Column("created", sa.DateTime(timezone=True)),
            sa.Column("meta", sa.JSON),
            sa.Column("score", sa.Float),
            sa.Column("flag", sa.Boolean))
        md.create_all(self.engine)
        self.racer = None

    def source(self) -> str:
        return f'url = "{self.url}"\ntables = ["items"]\n'

    def row(self, name: str, payload: Any) -> dict:
        n = len(name)
        return {"body": payload if isinstance(payload, str) else None,
                "data": payload if isinstance(payload, bytes) else None,
                "price": decimal.Decimal(f"{n * 1000}.{sum(map(ord, name)) % 10**6:06d}"),
                "created": dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
                + dt.timedelta(seconds=n * 37, microseconds=n),
                "meta": {"tags": ["kb", "ü"], "n": n, "nested": {"x": n / 7}},
                "score": n / 3,
                "flag": n % 2 == 0}

    def _put(self, engine, name: str, payload: Any) -> None:
        t = self.table
        with engine.begin() as c:
            if c.execute(self.sa.select(t.c.k).where(t.c.k == name)).first() is None:
                c.execute(t.insert().values(k=name, **self.row(name, payload)))
            else:
                c.execute(t.update().where(t.c.k == name).values(**self.row(name, payload)))

    def put(self, name: str, payload: Any) -> None:
        self._put(self.engine, name, payload)

    def remove(self, name: str) -> None:
        with self.engine.begin() as c:
            c.execute(self.table.delete().where(self.table.c.k == name))

    def records(self) -> dict[str, Any]:
        with self.engine.connect() as c:
            rows = c.exec_driver_sql("SELECT * FROM items").fetchall()
        return {codec.key_text(r[0]): codec.pack(list(r)) for r in rows}

    def payload(self, value: dict) -> Any:
        return value["body"] if value["body"] is not None else value["data"]

    def empty(self) -> None:
        with self.engine.begin() as c:
            c.exec_driver_sql("DELETE FROM items")

    def drop(self) -> None:
        with self.engine.begin() as c:
            c.exec_driver_sql("DROP TABLE items")

    def race_put(self, name: str, payload: Any) -> bool:
        # a short lock wait: a store that holds the write off makes it fail here
        if self.racer is None:
            dialect = self.engine.dialect.name
            args = {"sqlite": {"timeout": 0.5}}.get(dialect, {})
            self.racer = self.sa.create_engine(self.url, connect_args=args)
            setting = {"mysql": "SET SESSION innodb_lock_wait_timeout = 1",
                       "mariadb": "SET SESSION innodb_lock_wait_timeout = 1",
                       "postgresql": "SET lock_timeout = '1s'"}.get(dialect)
            if setting:
                self.sa.event.listen(self.racer, "connect",
                                     lambda conn, _: conn.cursor().execute(setting))
        try:
            self._put(self.racer, name, payload)
        except self.sa.exc.OperationalError:
            return False
        return True

    def close(self) -> None:
        self.engine.dispose()
        if self.racer is not None:
            self.racer.dispose()


class SQLiteAdapter(SQLAdapter):
    id = "sql-sqlite"
    url_fixture = "sqlite_url"
    race = "held off"  # the restore's write transaction (BEGIN IMMEDIATE) locks other writers out


class PostgreSQLAdapter(SQLAdapter):
    id = "sql-postgresql"
    url_fixture = "pg_url"
    race = "refused"  # the agent's update commits; the restore's own write of that row fails


class MariaDBAdapter(SQLAdapter):
    id = "sql-mariadb"
    url_fixture = "mysql_url"
    race = "held off"  # the plan locks the rows it will overwrite


# -- conversation: LangChain's message table, Redis lists ---------------------------------

class ConversationSQLAdapter(Adapter):
    """LangChain's ``SQLChatMessageHistory`` table on SQLite: one message per record, each
    record its own session (named after the record), keyed by the row id the database
    hands out."""

    id = "conversation-sqlite"
    backend = "conversation"
    stream = "message_store"
    payloads = frozenset({"text", "none"})
    race = "held off"

    def start(self) -> None:
        import sqlalchemy as sa
        self.sa = sa
        self.url = self.request.getfixturevalue("sqlite_url")
        self.engine = sa.create_engine(self.url)
        with self.engine.begin() as c:
            c.exec_driver_sql("CREATE TABLE message_store (id INTEGER PRIMARY KEY, session_id TEXT, message TEXT)")
        self.ids: dict[str, int] = {}
        self.racer = sa.create_engine(self.url, connect_args={"timeout": 0.5})

    def source(self) -> str:
        return f'url = "{self.url}"\n'

    def key(self, name: str) -> Any:
        return self.ids[name]

    def _put(self, engine, name: str, payload: Any) -> None:
        with engine.begin() as c:
            found = c.exec_driver_sql("SELECT id FROM message_store WHERE session_id = ?", (name,)).first()
            if found is None:
                cur = c.exec_driver_sql("INSERT INTO message_store (session_id, message) VALUES (?, ?)",
                                        (name, payload))
                self.ids[name] = cur.lastrowid
            else:
                c.exec_driver_sql("UPDATE message_store SET message = ? WHERE id = ?", (payload, found[0]))

    def put(self, name: str, payload: Any) -> None:
        self._put(self.engine, name, payload)

    def race_put(self, name: str, payload: Any) -> bool:
        try:
            self._put(self.racer, name, payload)
        except self.sa.exc.OperationalError:
            return False
        return True

    def remove(self, name: str) -> None:
        with self.engine.begin() as c:
            c.exec_driver_sql("DELETE FROM message_store WHERE session_id = ?", (name,))

    def records(self) -> dict[str, Any]:
        with self.engine.connect() as c:
            rows = c.exec_driver_sql("SELECT id, session_id, message FROM message_store").fetchall()
        return {codec.key_text(r[0]): codec.pack(list(r)) for r in rows}

    def payload(self, value: dict) -> Any:
        return value["message"]

    def empty(self) -> None:
        with self.engine.begin() as c:
            c.exec_driver_sql("DELETE FROM message_store")

    def drop(self) -> None:
        with self.engine.begin() as c:
            c.exec_driver_sql("DROP TABLE message_store")

    def close(self) -> None:
        self.engine.dispose()
        self.racer.dispose()


class RedisAdapter(Adapter):
    """LangChain's ``RedisChatMessageHistory`` lists: each record a session of one message,
    keyed ``[session, 0]``; a later write to it replaces the message in place (LSET)."""

    id = "conversation-redis"
    backend = "conversation"
    stream = "messages"
    payloads = frozenset({"text", "bytes"})
    droppable = False  # the stream is the key prefix: there is nothing to drop but the lists

    def start(self) -> None:
        self.client = self.request.getfixturevalue("redis_client")
        self.prefix = self.client.test_prefix + "message_store:"

    def source(self) -> str:
        return f'url = "{REDIS_URL}"\nkey_prefix = "{self.prefix}"\n'

    def key(self, name: str) -> Any:
        return [name, 0]

    def put(self, name: str, payload: Any) -> None:
        key = self.prefix + name
        if self.client.exists(key):
            self.client.lset(key, 0, payload)
        else:
            self.client.rpush(key, payload)

    def remove(self, name: str) -> None:
        self.client.delete(self.prefix + name)

    def records(self) -> dict[str, Any]:
        prefix = self.prefix.encode()
        return {codec.key_text([k[len(prefix):].decode(), 0]): self.client.lrange(k, 0, -1)
                for k in self.client.scan_iter(match=self.prefix + "*")}

    def name_of(self, key_text: str) -> str:
        return json.loads(key_text)[0]

    def payload(self, value: dict) -> Any:
        return value["message"]


# -- chroma: an embedded folder and a server ----------------------------------------------

class ChromaAdapter(Adapter):
    """One collection (l2, whose embeddings come back bit for bit); a record's payload is
    its document, its embedding and metadata follow from the payload."""

    backend = "chroma"
    payloads = frozenset({"text", "none"})

    def connect(self):
        raise NotImplementedError

    def start(self) -> None:
        self.client = self.connect()
        self.stream = self.prefix + "agent-memory"
        self.client.create_collection(self.stream, metadata={"owner": "support-agent"}, embedding_function=None)

    def collection(self):
        return self.client.get_collection(self.stream, embedding_function=None)

    def put(self, name: str, payload: Any) -> None:
        seed = hashlib.sha256(f"{name}\0{payload}".encode()).digest()
        embedding = [b / 255 - 0.5 for b in seed[:8]]
        col = self.collection()
        if payload is None:
            col.delete(ids=[name])  # an upsert without a document keeps the one the record has
        col.upsert(ids=[name], embeddings=[embedding], documents=[payload],
                   metadatas=[{"chars": len(payload or ""), "kind": "note"}])

    def remove(self, name: str) -> None:
        self.collection().delete(ids=[name])

    def records(self) -> dict[str, Any]:
        import numpy as np
        got = self.collection().get(include=["embeddings", "documents", "metadatas"])
        return {codec.key_text(k): (np.asarray(e, dtype=np.float32).tobytes(), d, m)
                for k, e, d, m in zip(got["ids"], got["embeddings"], got["documents"], got["metadatas"])}

    def payload(self, value: dict) -> Any:
        return value["document"]

    def drop(self) -> None:
        self.client.delete_collection(self.stream)


class ChromaEmbeddedAdapter(ChromaAdapter):
    id = "chroma-embedded"
    shared = False  # embedded Chroma caches the folder in the process that opened it
    prefix = ""

    def connect(self):
        import chromadb
        return chromadb.PersistentClient(path=str(self.tmp_path / "chroma"))

    def source(self) -> str:
        return f'path = "./chroma"\ncollections = ["{self.stream}"]\n'

    def reopen(self) -> None:
        from chromadb.api.client import SharedSystemClient
        SharedSystemClient.clear_system_cache()
        self.client = self.connect()


class ChromaServerAdapter(ChromaAdapter):
    id = "chroma-server"

    def connect(self):
        import chromadb
        self.url = self.request.getfixturevalue("chroma_server")
        self.prefix = f"t{secrets.token_hex(3)}-"
        return chromadb.HttpClient(host=self.url)

    def source(self) -> str:
        return f'url = "{self.url}"\ncollections = ["{self.stream}"]\n'

    def close(self) -> None:
        for col in self.client.list_collections():
            if col.name.startswith(self.prefix):
                self.client.delete_collection(col.name)


# -- jsonfile: the reference plugin, installed as a plugin is ----------------------------------

REFERENCE = Path(__file__).with_name("reference_backend.py")


def install_reference_plugin(site: Path) -> dict:
    """The reference backend as an installed plugin distribution in ``site`` (its module and a
    dist-info registering ``jsonfile``); returns a child process's environment."""
    return install_plugin(site, "jsonfile-plugin", {"reference_backend": REFERENCE.read_text()},
                          {"jsonfile": "reference_backend:JsonFileBackend"})


class ReferenceAdapter(Adapter):
    """The reference plugin's JSON file, written by the agent with the store's own client."""

    id = "jsonfile"
    backend = "jsonfile"
    stream = "notes"
    payloads = frozenset({"text", "none"})
    site: tuple[Path, dict] | None = None  # installed once per test session

    def start(self) -> None:
        from reference_backend import JsonFileStore
        if ReferenceAdapter.site is None:
            folder = self.request.getfixturevalue("tmp_path_factory").mktemp("plugin-site")
            ReferenceAdapter.site = (folder, install_reference_plugin(folder))
        self.request.getfixturevalue("monkeypatch").syspath_prepend(str(self.site[0]))
        self.store = JsonFileStore(str(self.tmp_path / "agent.json"))
        with self.store.change(create=True) as doc:
            doc["streams"]["notes"] = {"settings": {"owner": "support-agent"}, "records": []}

    def env(self) -> dict:
        return self.site[1]

    def source(self) -> str:
        return 'path = "agent.json"\n'

    def put(self, name: str, payload: Any) -> None:
        with self.store.change() as doc:
            records = doc["streams"]["notes"]["records"]
            records[:] = [r for r in records if r[0] != name] + [[name, {"body": payload}]]

    def remove(self, name: str) -> None:
        with self.store.change() as doc:
            records = doc["streams"]["notes"]["records"]
            records[:] = [r for r in records if r[0] != name]

    def records(self) -> dict[str, Any]:
        stream = self.store.load()["streams"].get("notes", {"records": []})
        return {codec.key_text(k): codec.pack(v) for k, v in stream["records"]}

    def payload(self, value: dict) -> Any:
        return value["body"]

    def drop(self) -> None:
        with self.store.change() as doc:
            del doc["streams"]["notes"]


BUILTIN = [SQLiteAdapter, PostgreSQLAdapter, MariaDBAdapter, ConversationSQLAdapter, RedisAdapter,
           ChromaEmbeddedAdapter, ChromaServerAdapter, ReferenceAdapter]
