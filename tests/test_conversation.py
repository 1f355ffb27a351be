"""The conversation backend on SQL message tables (SQLite, PostgreSQL, MariaDB) and
Redis lists, with histories written by LangChain's own classes and by plain
commands: snapshots through the CLI, one-session restores through the writer
and through the restore command, and the exact round trip of every message
LangChain reads back."""
from __future__ import annotations

import datetime as dt
import json
import warnings

import pytest
import sqlalchemy as sa

from conftest import REDIS_URL, free_port
from snapshotter import codec
from snapshotter.backend import StreamSpec, load_backend, validate_options
from snapshotter.errors import SchemaMismatch, SourceError, UsageError
from snapshotter.objectstore import open_store
from snapshotter.repository import Repository
from snapshotter.streams import CHUNKS_PER_STREAM, read_stream

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # langchain-community announces its sunset on import
    from langchain_community.chat_message_histories import RedisChatMessageHistory, SQLChatMessageHistory
    from langchain_core.messages import AIMessage, HumanMessage, message_to_dict

UTC = dt.timezone.utc


# -- helpers: the config file, the repository, and the core's per-key plan ----------

def write_config(tmp_path, **options) -> None:
    lines = ['[repository]', 'url = "./repo"', '', '[sources.history]', 'backend = "conversation"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    (tmp_path / "snapshotter.toml").write_text("\n".join(lines) + "\n")


def snapshot(cli, stream: str) -> tuple[dict, StreamSpec, list]:
    """Take a snapshot through the CLI; return its JSON, the stream's spec and its stored records."""
    assert cli("init").code == 0
    res = cli("--json", "snapshot", "--release", "r1")
    assert res.code == 0, res.err
    repo = Repository.open(open_store("repo"))
    entry = next(repo.manifests())["sources"]["history"]["streams"][stream]
    return res.json(), StreamSpec(stream, entry["schema"]), [(r.key, r.value) for r in read_stream(repo, entry)]


def open_backend(**options):
    cls = load_backend("conversation")
    return cls("history", validate_options(cls, options, "sources.history"))


def live(backend, sessions=None, stream: str | None = None) -> list:
    """The live records, as a restore plans with them (none when the stream is gone)."""
    with backend.reader() as reader:
        spec = reader.live_spec(stream) if stream else reader.streams()[0]
        if spec is None:
            return []
        return [rec for batch in reader.read(spec, sessions=sessions) for rec in batch]


def restore_sessions(backend, spec: StreamSpec, snap: list, sessions: list[str]) -> dict:
    """Apply what a ``restore --session`` would: the per-key difference between the
    snapshot's records of those sessions and a session-filtered live read."""
    wanted = {codec.key_text(k): (k, v) for k, v in snap if backend.session_of(spec, k, v) in sessions}
    now = {codec.key_text(k): (k, v) for k, v in live(backend, sessions, spec.name)}
    added = [now[t][0] for t in now if t not in wanted]
    deleted = [wanted[t] for t in wanted if t not in now]
    modified = [wanted[t] for t in wanted if t in now and codec.pack(wanted[t][1]) != codec.pack(now[t][1])]
    with backend.writer(sessions=sessions) as writer:
        writer.prepare(spec)
        writer.upsert(spec, modified + deleted)
        writer.delete(spec, added)
    return {"added": len(added), "modified": len(modified), "deleted": len(deleted)}


def of_session(backend, spec, records, session) -> list:
    return [(k, v) for k, v in records if backend.session_of(spec, k, v) == session]


def packed(records) -> list[bytes]:
    return [codec.encode_record(k, v) for k, v in records]


CHAT = {
    "alice": [HumanMessage("What is our refund policy?"),
              AIMessage("30 days, receipt required.", response_metadata={"created_at": "2026-11-29T10:15:00Z"}),
              HumanMessage("Merci ✓ — naïve 🚀")],
    "bob": [HumanMessage("reset my password"), AIMessage("Done.")],
    "carol": [HumanMessage("hi", additional_kwargs={"timestamp": 1764411300})],
}


# -- SQL message tables ------------------------------------------------------------------

def sql_history(url: str, session: str) -> SQLChatMessageHistory:
    return SQLChatMessageHistory(session_id=session, connection=url)


def test_sql_history_round_trips_and_restores_one_session(any_db_url, cli, tmp_path):
    histories = {s: sql_history(any_db_url, s) for s in CHAT}
    for s, msgs in CHAT.items():
        histories[s].add_messages(msgs)
    engine = sa.create_engine(any_db_url)
    plain = '{"type":"human","data":{"content":"written by hand"}}'
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO message_store (session_id, message) VALUES (:s, :m)"),
                  [{"s": "dave", "m": plain}, {"s": "dave", "m": "not json at all"}])

    write_config(tmp_path, url=any_db_url)
    out, spec, snap = snapshot(cli, "message_store")
    src = out["sources"]["history"]
    assert src["backend"] == "conversation" and src["consistency"] == "snapshot-isolation"
    assert src["streams"]["message_store"]["records"] == 8
    b = open_backend(url=any_db_url)
    assert [k for k, _ in snap] == list(range(1, 9))  # keyed by the primary key
    assert snap[6][1] == {"id": 7, "session_id": "dave", "message": plain}
    assert [b.session_of(spec, k, v) for k, v in snap][:6] == ["alice"] * 3 + ["bob"] * 2 + ["carol"]
    assert b.written_at(spec, *snap[1]) == dt.datetime(2026, 11, 29, 10, 15, tzinfo=UTC)
    assert b.written_at(spec, *snap[5]) == dt.datetime.fromtimestamp(1764411300, UTC)
    assert b.written_at(spec, *snap[0]) is None
    assert packed(live(b)) == packed(snap)

    # the agent goes on: alice gets two replies and one of her messages is rewritten,
    # bob's session is cleared, carol gets a new message
    histories["alice"].add_messages([AIMessage("injected"), HumanMessage("more")])
    alice_first = snap[0][0]
    with engine.begin() as c:
        c.execute(sa.text("UPDATE message_store SET message = :m WHERE id = :i"),
                  {"m": json.dumps(message_to_dict(HumanMessage("tampered"))), "i": alice_first})
    histories["bob"].clear()
    histories["carol"].add_message(AIMessage("after the snapshot"))
    others_before = {s: histories[s].messages for s in ("bob", "carol")}
    dave_before = live(b, ["dave"])

    plan = restore_sessions(b, spec, snap, ["alice"])
    assert plan == {"added": 2, "modified": 1, "deleted": 0}
    assert packed(live(b, ["alice"])) == packed(of_session(b, spec, snap, "alice"))
    assert histories["alice"].messages == CHAT["alice"]
    assert {s: histories[s].messages for s in ("bob", "carol")} == others_before
    assert packed(live(b, ["dave"])) == packed(dave_before)

    plan = restore_sessions(b, spec, snap, ["bob"])
    assert plan == {"added": 0, "modified": 0, "deleted": 2}
    assert histories["bob"].messages == CHAT["bob"]
    assert histories["carol"].messages == CHAT["carol"] + [AIMessage("after the snapshot")]
    for h in histories.values():
        h.engine.dispose()
    engine.dispose()


def timestamp_type(url: str) -> str:
    name = sa.engine.make_url(url).get_backend_name()
    return {"postgresql": "TIMESTAMP WITH TIME ZONE", "mysql": "DATETIME(6)"}.get(name, "TEXT")


def test_sql_custom_layout_with_text_keys_and_timestamp_column(any_db_url, tmp_path, cli):
    engine = sa.create_engine(any_db_url)
    when = dt.datetime(2026, 11, 29, 10, 15, 30, 123456, tzinfo=UTC)
    ts_type = timestamp_type(any_db_url)
    # as each driver takes it: ISO text for SQLite, naive UTC for MariaDB's DATETIME
    stamp = {"TEXT": when.isoformat(), "DATETIME(6)": when.replace(tzinfo=None)}.get(ts_type, when)
    with engine.begin() as c:
        c.execute(sa.text(f"CREATE TABLE chat_log (msg_id VARCHAR(40) PRIMARY KEY, conversation VARCHAR(40) NOT NULL, "
                          f"body TEXT, created_at {ts_type})"))
        # keys whose byte order differs from common collations ("B" < "a" < "é" by code point)
        c.execute(sa.text("INSERT INTO chat_log VALUES (:k, :s, :m, :t)"), [
            {"k": "a-1", "s": "c1", "m": "{}", "t": stamp},
            {"k": "B-2", "s": "c2", "m": "{}", "t": stamp},
            {"k": "é-3", "s": "c1", "m": None, "t": None},
        ])
    options = dict(url=any_db_url, table="chat_log", session_column="conversation", message_column="body",
                   timestamp_column="created_at")
    write_config(tmp_path, **options)
    out, spec, snap = snapshot(cli, "chat_log")
    assert out["sources"]["history"]["streams"]["chat_log"]["records"] == 3
    assert [k for k, _ in snap] == ["B-2", "a-1", "é-3"]
    b = open_backend(**options)
    assert b.written_at(spec, *snap[0]) == when
    assert b.written_at(spec, *snap[2]) is None
    assert [k for k, _ in live(b, ["c1"])] == ["a-1", "é-3"]

    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM chat_log WHERE conversation = 'c1'"))
        c.execute(sa.text("UPDATE chat_log SET body = 'changed' WHERE msg_id = 'B-2'"))
    assert restore_sessions(b, spec, snap, ["c1"]) == {"added": 0, "modified": 0, "deleted": 2}
    assert packed(live(b, ["c1"])) == packed(of_session(b, spec, snap, "c1"))
    assert live(b, ["c2"])[0][1]["body"] == "changed"
    engine.dispose()


def test_sql_numeric_session_ids_and_schema_changes(any_db_url):
    engine = sa.create_engine(any_db_url)
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE turns (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, message TEXT)")
        c.exec_driver_sql("INSERT INTO turns VALUES (1, 42, '{}'), (2, 7, '{}'), (3, 42, '{}')")
    b = open_backend(url=any_db_url, table="turns", session_column="user_id")
    with b.reader() as reader:
        spec = reader.streams()[0]
        assert [k for batch in reader.read(spec, sessions=["42"]) for k, _ in batch] == [1, 3]
    assert b.session_of(spec, 2, {"id": 2, "user_id": 7, "message": "{}"}) == "7"

    with engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE turns ADD COLUMN note TEXT")
    with b.reader() as reader:
        changed = reader.live_spec("turns")
        assert reader.live_spec("gone") is None
    assert b.schema_differences(spec, changed) == ["column note is not in the snapshot"]
    assert b.schema_differences(StreamSpec("messages", {"kind": "redis-list"}), changed) == \
        ["the snapshot holds Redis lists, the live source is a SQL table"]
    with pytest.raises(SchemaMismatch, match="note"), b.writer() as w:
        w.prepare(spec)
    engine.dispose()


def test_sql_missing_table_and_bad_columns_are_one_line_errors(sqlite_url, tmp_path, cli):
    write_config(tmp_path, url=sqlite_url)
    assert cli("init").code == 0
    sa.create_engine(sqlite_url).connect().close()  # an empty database (a missing file is refused: exit 2)
    res = cli("--json", "snapshot", "--release", "r1")
    assert res.code == 5
    assert "no table message_store" in json.loads(res.err)["error"]["message"]

    sql_history(sqlite_url, "s").add_message(HumanMessage("x"))
    write_config(tmp_path, url=sqlite_url, session_column="conversation_id")
    res = cli("--json", "snapshot", "--release", "r1")
    assert res.code == 2 and "conversation_id" in json.loads(res.err)["error"]["message"]

    write_config(tmp_path, url=sqlite_url, key_prefix="x:")
    res = cli("--json", "snapshot", "--release", "r1")
    assert res.code == 2 and "key_prefix" in json.loads(res.err)["error"]["message"]


def test_sql_order_column_must_be_unique(sqlite_url, tmp_path, cli):
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE log (session_id TEXT, message TEXT, uid TEXT NOT NULL, seq INTEGER NOT NULL)")
        c.exec_driver_sql("CREATE UNIQUE INDEX log_uid ON log (uid)")
        c.exec_driver_sql("INSERT INTO log VALUES ('s', '{}', 'm2', 1), ('s', '{}', 'm1', 1)")
    write_config(tmp_path, url=sqlite_url, table="log", order_column="seq")
    assert cli("init").code == 0
    res = cli("--json", "snapshot", "--release", "r1")
    assert res.code == 2 and "order_column" in json.loads(res.err)["error"]["message"]

    write_config(tmp_path, url=sqlite_url, table="log", order_column="uid")
    _, spec, snap = snapshot(cli, "log")
    assert [k for k, _ in snap] == ["m1", "m2"]
    b = open_backend(url=sqlite_url, table="log", order_column="uid")
    with engine.begin() as c:
        c.exec_driver_sql("DROP TABLE log")
    assert restore_sessions(b, spec, snap, ["s"]) == {"added": 0, "modified": 0, "deleted": 2}
    assert packed(live(b)) == packed(snap)
    engine.dispose()


def test_sql_session_restore_refuses_to_overwrite_another_sessions_reused_row(sqlite_url, tmp_path, cli):
    for s, text in (("keep", "a"), ("lost", "b"), ("lost", "c")):
        sql_history(sqlite_url, s).add_message(HumanMessage(text))
    write_config(tmp_path, url=sqlite_url)
    _, spec, snap = snapshot(cli, "message_store")
    sql_history(sqlite_url, "lost").clear()
    sql_history(sqlite_url, "keep").add_message(HumanMessage("reuses a freed row id"))  # SQLite hands out id 2 again
    b = open_backend(url=sqlite_url)
    before = live(b)
    with pytest.raises(SourceError, match="now belongs to session 'keep'"):
        restore_sessions(b, spec, snap, ["lost"])
    assert packed(live(b)) == packed(before)  # the refused restore wrote nothing
    restore_sessions(b, spec, snap, ["keep", "lost"])
    assert packed(live(b)) == packed(snap)


# -- Redis lists ----------------------------------------------------------------------------

def redis_history(prefix: str, session: str) -> RedisChatMessageHistory:
    return RedisChatMessageHistory(session_id=session, url=REDIS_URL, key_prefix=prefix)


def lists(client, prefix: str) -> dict[str, list[bytes]]:
    keys = client.scan_iter(match=prefix + "*", _type="list")
    return {k.decode()[len(prefix):]: client.lrange(k, 0, -1) for k in keys}


def test_redis_history_round_trips_and_restores_one_session(redis_client, cli, tmp_path):
    prefix = redis_client.test_prefix + "message_store:"
    histories = {s: redis_history(prefix, s) for s in CHAT}
    for s, msgs in CHAT.items():
        histories[s].add_messages(msgs)
    # written by hand: another JSON spelling, plain text and bytes that are not UTF-8, oldest first
    compact = '{"type":"human","data":{"content":"compact"}}'
    redis_client.lpush(prefix + "dave", compact, "plain text", b"\xff\xfe raw")
    redis_client.set(prefix + "not-a-list", "ignored")

    write_config(tmp_path, url=REDIS_URL, key_prefix=prefix)
    out, spec, snap = snapshot(cli, "messages")
    assert out["sources"]["history"]["consistency"] == "checked"
    assert out["sources"]["history"]["streams"]["messages"]["records"] == 9
    assert [k for k, _ in snap][:4] == [["alice", 0], ["alice", 1], ["alice", 2], ["bob", 0]]
    assert snap[0][1] == {"message": json.dumps(message_to_dict(CHAT["alice"][0]))}
    assert [v["message"] for _, v in snap[-3:]] == [compact, "plain text", b"\xff\xfe raw"]
    b = open_backend(url=REDIS_URL, key_prefix=prefix)
    assert b.session_of(spec, *snap[3]) == "bob"
    assert b.written_at(spec, *snap[1]) == dt.datetime(2026, 11, 29, 10, 15, tzinfo=UTC)
    assert b.written_at(spec, *snap[5]) == dt.datetime.fromtimestamp(1764411300, UTC)
    assert b.written_at(spec, *snap[0]) is None
    at_snapshot = lists(redis_client, prefix)

    # alice: two more messages and her oldest one rewritten; bob cleared; carol goes on;
    # dave loses his newest message
    histories["alice"].add_messages([AIMessage("injected"), HumanMessage("more")])
    redis_client.lset(prefix + "alice", -1, json.dumps(message_to_dict(HumanMessage("tampered"))))
    histories["bob"].clear()
    histories["carol"].add_message(AIMessage("after the snapshot"))
    redis_client.ltrim(prefix + "dave", 1, -1)
    drifted = lists(redis_client, prefix)

    assert restore_sessions(b, spec, snap, ["alice"]) == {"added": 2, "modified": 1, "deleted": 0}
    assert redis_client.lrange(prefix + "alice", 0, -1) == at_snapshot["alice"]
    assert histories["alice"].messages == CHAT["alice"]
    assert {s: v for s, v in lists(redis_client, prefix).items() if s != "alice"} == \
        {s: v for s, v in drifted.items() if s != "alice"}

    assert restore_sessions(b, spec, snap, ["bob", "dave"]) == {"added": 0, "modified": 0, "deleted": 3}
    assert histories["bob"].messages == CHAT["bob"]
    now = lists(redis_client, prefix)
    assert now["dave"] == at_snapshot["dave"]
    assert now["carol"] == drifted["carol"]
    # a second application of the same restore changes nothing
    assert restore_sessions(b, spec, snap, ["alice", "bob", "dave"]) == {"added": 0, "modified": 0, "deleted": 0}


def test_redis_oldest_first_lists(redis_client, tmp_path, cli):
    prefix = redis_client.test_prefix + "chat:"
    redis_client.rpush(prefix + "s", "m0", "m1", "m2")
    options = dict(url=REDIS_URL, key_prefix=prefix, list_order="oldest-first")
    write_config(tmp_path, **options)
    _, spec, snap = snapshot(cli, "messages")
    assert snap == [(["s", pos], {"message": f"m{pos}"}) for pos in range(3)]
    redis_client.rpush(prefix + "s", "m3")
    redis_client.lset(prefix + "s", 1, "edited")
    b = open_backend(**options)
    assert restore_sessions(b, spec, snap, ["s"]) == {"added": 1, "modified": 1, "deleted": 0}
    assert redis_client.lrange(prefix + "s", 0, -1) == [b"m0", b"m1", b"m2"]


def test_redis_writer_refuses_a_plan_that_is_not_a_list(redis_client):
    prefix = redis_client.test_prefix + "chat:"
    redis_client.lpush(prefix + "s", "m0", "m1", "m2")
    b = open_backend(url=REDIS_URL, key_prefix=prefix)
    spec = StreamSpec("messages", {"kind": "redis-list"})
    # a choice of keys that is not a list (a reapply of position 4 without 3): a usage error, exit 2
    with pytest.raises(UsageError, match="only lose its newest"):
        with b.writer() as w:
            w.delete(spec, [["s", 1]])
    with pytest.raises(UsageError, match="without position 3"):
        with b.writer() as w:
            w.upsert(spec, [(["s", 4], {"message": "m4"})])
    with pytest.raises(SourceError, match="outside the sessions"):
        with b.writer(sessions=["t"]) as w:
            w.upsert(spec, [(["s", 0], {"message": "x"})])
    assert redis_client.lrange(prefix + "s", 0, -1) == [b"m2", b"m1", b"m0"]


@pytest.mark.parametrize("write", ["push", "windowed push", "new session"])
def test_redis_read_reports_writes_made_during_it(redis_client, write):
    prefix = redis_client.test_prefix + "chat:"
    redis_client.lpush(prefix + "s", "m0", "m1")
    b = open_backend(url=REDIS_URL, key_prefix=prefix)
    with b.reader() as reader:
        spec = reader.streams()[0]
        assert [r for batch in reader.read(spec) for r in batch] == \
            [(["s", 0], {"message": "m0"}), (["s", 1], {"message": "m1"})]
        assert reader.consistency == "checked"
        batches = reader.read(spec)
        next(batches)
        if write == "push":
            redis_client.lpush(prefix + "s", "m2")
        elif write == "windowed push":  # a memory that keeps the last two messages: same length
            redis_client.lpush(prefix + "s", "m2")
            redis_client.ltrim(prefix + "s", 0, 1)
        else:
            redis_client.lpush(prefix + "t", "m0")
        list(batches)
        assert reader.consistency == "best-effort"


def test_redis_unreachable_is_a_one_line_source_error(tmp_path, cli):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    write_config(tmp_path, url=url)
    assert cli("init").code == 0
    res = cli("--json", "snapshot", "--release", "r1")
    err = json.loads(res.err)["error"]
    assert res.code == 1 and err["type"] == "source"
    assert "cannot reach Redis" in err["message"] and "s3cret" not in err["message"]
    assert "\n" not in err["message"]


# -- through the restore command ------------------------------------------------------------

def test_restore_command_puts_back_one_session_in_sql_and_redis(sqlite_url, redis_client, tmp_path, cli):
    prefix = redis_client.test_prefix + "message_store:"
    for s in ("a", "b"):
        redis_history(prefix, s).add_messages([HumanMessage(f"hi {s}"), AIMessage("hello")])
        sql_history(sqlite_url, s).add_messages([HumanMessage(f"hi {s}"), AIMessage("hello")])
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n\n[sources.chat_redis]\nbackend = "conversation"\nurl = "{REDIS_URL}"\n'
        f'key_prefix = "{prefix}"\n\n[sources.chat_sql]\nbackend = "conversation"\nurl = "{sqlite_url}"\n')
    assert cli("init").code == 0
    assert cli("--json", "snapshot", "--release", "r1").code == 0
    for s in ("a", "b"):
        redis_history(prefix, s).add_message(AIMessage("injected"))
        sql_history(sqlite_url, s).add_message(AIMessage("injected"))

    res = cli("--json", "restore", "--release", "r1", "--session", "a", "--yes")
    assert res.code == 0, res.err
    out = res.json()
    assert out["plan"] == {"chat_redis": {"messages": {"added": 1, "modified": 0, "deleted": 0}},
                           "chat_sql": {"message_store": {"added": 1, "modified": 0, "deleted": 0}}}
    assert out["verified"] is True and out["quarantined"] == 2
    for history in (redis_history(prefix, "a"), sql_history(sqlite_url, "a")):
        assert history.messages == [HumanMessage("hi a"), AIMessage("hello")]
    for history in (redis_history(prefix, "b"), sql_history(sqlite_url, "b")):
        assert history.messages == [HumanMessage("hi b"), AIMessage("hello"), AIMessage("injected")]


def test_restore_command_refuses_to_overwrite_a_row_another_session_now_holds(sqlite_url, tmp_path, cli):
    for s, text in (("keep", "a"), ("lost", "b"), ("lost", "c")):
        sql_history(sqlite_url, s).add_message(HumanMessage(text))
    write_config(tmp_path, url=sqlite_url)
    assert cli("init").code == 0
    assert cli("--json", "snapshot", "--release", "r1").code == 0
    sql_history(sqlite_url, "lost").clear()
    sql_history(sqlite_url, "keep").add_message(HumanMessage("reuses a freed row id"))

    res = cli("--json", "restore", "--release", "r1", "--session", "lost", "--yes")
    assert res.code != 0 and "now belongs to session 'keep'" in json.loads(res.err)["error"]["message"]
    assert sql_history(sqlite_url, "keep").messages == [HumanMessage("a"), HumanMessage("reuses a freed row id")]
    assert sql_history(sqlite_url, "lost").messages == []
    # the SQL transaction rolled back: the incident says so, and is not "interrupted" (half-applied)
    [listed] = cli("--json", "quarantine", "list").json()
    assert listed["status"] == "rolled_back", listed


def test_a_large_history_is_stored_in_large_chunks(redis_client, pg_url, tmp_path, cli):
    """Chunks are sized from the stream's estimated size: a history of some megabytes
    must not become thousands of tiny objects (each one a request on S3). Redis
    estimates from the memory of a sample of lists, a SQL table from its statistics."""
    prefix = redis_client.test_prefix + "chat:"
    text = "the customer asks about the refund of order {0} and is answered at length; " * 3
    pipe = redis_client.pipeline(transaction=False)
    for s in range(400):
        pipe.rpush(f"{prefix}s{s:04d}", *[text.format(s * 1000 + i) for i in range(200)])
    pipe.execute()
    total = sum(len(m) for k in redis_client.scan_iter(match=prefix + "*") for m in redis_client.lrange(k, 0, -1))
    options = dict(url=REDIS_URL, key_prefix=prefix, list_order="oldest-first")
    with open_backend(**options).reader() as reader:
        estimate = reader.streams()[0].estimated_bytes
    assert total / 2 < estimate < total * 3, (estimate, total)
    write_config(tmp_path, **options)
    res, _, records = snapshot(cli, "messages")
    assert len(records) == 400 * 200
    chunks = res["sources"]["history"]["streams"]["messages"]["chunks"]
    assert chunks <= 2 * CHUNKS_PER_STREAM, chunks  # at the 32 KiB floor: about 600

    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE message_store (id serial PRIMARY KEY, session_id text, message text)")
        c.exec_driver_sql("INSERT INTO message_store (session_id, message) SELECT 's' || mod(g, 400), "
                          "repeat('a long answer ', 20) || g FROM generate_series(1, 24000) g")
        c.exec_driver_sql("ANALYZE message_store")
    eng.dispose()
    with open_backend(url=pg_url).reader() as reader:
        assert reader.streams()[0].estimated_bytes > 24000 * 280


def test_postgres_session_restore_writes_rows_back_exactly_and_only_its_sessions(pg_url, tmp_path, cli):
    """On PostgreSQL a conversation restore writes the snapshot's rows back as COPY lines:
    a column a client would round off (an interval's months) comes back exactly, other
    sessions stay as they are, and a row that moved to another session is refused."""
    eng = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql("CREATE TABLE turns (id serial PRIMARY KEY, session_id text, message jsonb, "
                          "budget interval)")
        c.exec_driver_sql("""INSERT INTO turns (session_id, message, budget)
                             SELECT 's' || mod(g, 3), jsonb_build_object('type', 'human', 'data',
                                    jsonb_build_object('content', 'turn ' || g)), make_interval(months => g, days => 1)
                             FROM generate_series(1, 30) g""")
    write_config(tmp_path, url=pg_url, table="turns", message_column="message")
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r1")
    assert snap.code == 0, snap.err

    def rows(session):
        with eng.connect() as c:
            return c.exec_driver_sql("SELECT t::text FROM turns t WHERE session_id = %s ORDER BY id",
                                     (session,)).scalars().all()
    before = {s: rows(s) for s in ("s0", "s1")}
    with eng.connect() as c:
        c.exec_driver_sql("UPDATE turns SET budget = '2 days', message = '{\"poison\": 1}' WHERE id IN (3, 4, 6)")
        c.exec_driver_sql("INSERT INTO turns (session_id, message) VALUES ('s0', '{\"x\": 1}')")
    drifted_s1 = rows("s1")
    r = cli("--json", "restore", snap.json()["id"], "--session", "s0", "--yes")
    assert r.code == 0 and r.json()["verified"], r.err
    assert r.json()["plan"]["history"]["turns"] == {"added": 1, "modified": 2, "deleted": 0}
    assert rows("s0") == before["s0"]
    assert rows("s1") == drifted_s1 != before["s1"]

    with eng.connect() as c:  # a row of s1 in the snapshot now belongs to s0
        c.exec_driver_sql("UPDATE turns SET session_id = 's0' WHERE id = 4")
    r = cli("--json", "restore", snap.json()["id"], "--session", "s1", "--yes")
    assert r.code == 1 and "now belongs to session 's0'" in r.err, r.err
    eng.dispose()


def test_a_push_while_restoring_a_session_with_only_modified_messages_is_refused(redis_client, tmp_path, cli,
                                                                                  monkeypatch):
    """When the plan only modifies messages, the list's length comes from what the plan's
    reader saw: a message pushed before the write is refused (exit 6), not left to fail
    verification after the write."""
    from snapshotter.restore import apply as restore_mod

    prefix = redis_client.test_prefix + "message_store:"
    key = prefix + "s1"
    for text in ("m0", "m1"):
        redis_client.lpush(key, json.dumps({"type": "human", "data": {"content": text}}))
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.history]\nbackend = "conversation"\nurl = "{REDIS_URL}"\n'
        f'key_prefix = "{prefix}"\n')
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r").json()["id"]
    redis_client.lset(key, -1, json.dumps({"type": "human", "data": {"content": "poisoned"}}))  # the oldest
    real = restore_mod.write_bundle

    def bundle_then_agent_writes(repo, bundle):
        real(repo, bundle)
        redis_client.lpush(key, json.dumps({"type": "ai", "data": {"content": "CONCURRENT"}}))

    monkeypatch.setattr(restore_mod, "write_bundle", bundle_then_agent_writes)
    r = cli("restore", snap, "--yes")
    assert r.code == 6 and "it has 3 messages, the restore planned over 2" in r.err, r.err
    assert len(redis_client.lrange(key, 0, -1)) == 3
    assert json.loads(redis_client.lindex(key, -1))["data"]["content"] == "poisoned"  # nothing written
