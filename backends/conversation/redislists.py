"""The ``conversation`` backend's Redis layout: LangChain's ``RedisChatMessageHistory``
lists.  The key ``key_prefix + session_id`` holds one session's messages, each a JSON string.
One stream named ``messages``; a record's key is ``[session_id, position]``.
*Position 0 is the oldest message* and positions count forward in time,
whichever end of the list the application pushes to (``list_order``:
LangChain LPUSHes, so its lists are ``newest-first``).  Counting from the
oldest message keeps every message's key stable while the agent keeps
talking; counting list indexes would renumber a whole session on every new
message and turn a one-message drift into a whole-session one.

A message's value is ``{"message": TEXT}``: the stored string verbatim
(``bytes`` when it is not UTF-8), the same shape as the ``message`` column of
a SQL message table.  Verbatim is exact by construction - a restore writes
back the very bytes that were read, whatever JSON spelling wrote them.  A
parsed JSON object would read better in quarantine, but it is exact only when
re-serialising it gives the same text, and checking that costs several times
more per message than the whole rest of the read; the text is parsed only
where a message's content is needed (``written_at``).

Consistency: Redis has no multi-key snapshot.  Each session's list is
read with one ``LRANGE`` (atomic per list); sessions are found with ``SCAN``
(never ``KEYS``) and read in key order, many per round trip.  After the read,
the session keys are scanned again and every list's length and both end
elements compared with what was read: unchanged, the manifest records
``checked``; otherwise ``best-effort`` (each session is still internally
consistent, but sessions were captured at slightly different moments).  What
agents do to their history - push, trim to a window (``LTRIM``), clear, start a
session - is always detected; an in-place ``LSET`` in the middle of a list is
not.  Each session's remaining TTL (``PTTL``, read with its ``LRANGE``) goes into the
stream's schema as ``ttl_ms`` (session -> milliseconds; sessions without a TTL are left
out), not into the records: a TTL counts down, so in a record it would make every
session look modified to the next plan, and it would change the records' digests.

Restoring: the writer collects the core's upserts and deletes per session and, on
commit, applies them in one ``WATCH``/``MULTI``/``EXEC`` transaction over every session it
changes: all lists are checked against the plan before anything is written, so
the sessions are restored all or none, and a re-run converges.  Because a list is
positional, the changes for one session must describe a list whose positions
are contiguous from 0 (they do when they are the difference between a live
read and a snapshot):

* deleted positions must be the newest messages (a tail): the list is trimmed
  to the lowest deleted position;
* upserted positions below the live length replace those messages in place;
* upserted positions at or beyond the live length are appended, oldest first,
  and must leave no gap.

Anything else (deleting a message from the middle, a position past the end)
is refused before any session is touched.  A rewritten session gets the TTL the
snapshot's ``ttl_ms`` gives it (``PEXPIRE``), or none (``PERSIST``) when the snapshot
has the map but not the session; a snapshot without the map (taken before TTLs were
kept) leaves each list's TTL as it is.

A restore of some sessions must not overwrite anything outside them: only their
records were planned and quarantined, so a writer made for some sessions refuses any
record outside them.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from snapshotter.backend import SourceReader, SourceWriter, StreamSpec
from snapshotter.codec import key_text
from snapshotter.errors import ConfigError, Refused, SchemaMismatch, SourceError, UsageError
from snapshotter.redaction import redact_text, redact_url
from snapshotter.timeouts import timed_out

from .store import MessageStore, MessageTime

REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_STREAM = "messages"
REDIS_KIND = "redis-list"
NEWEST_FIRST, OLDEST_FIRST = "newest-first", "oldest-first"

#: Redis lists fetched per round trip; a batch holds at most this many sessions.
SESSIONS_PER_ROUND_TRIP = 64
ESTIMATE_SAMPLE = 32  # lists whose memory use estimates a Redis history's size


class RedisLists(MessageStore):
    """The messages as Redis lists, one per session."""

    def __init__(self, backend):
        super().__init__(backend)
        self.key_prefix: str = backend.opt("key_prefix")
        self.list_order: str = backend.opt("list_order")
        if self.list_order not in (NEWEST_FIRST, OLDEST_FIRST):
            raise ConfigError(f"{self.where}: list_order must be {NEWEST_FIRST} or {OLDEST_FIRST}, "
                              f"not {self.list_order!r}")

    @property
    def timeout(self) -> float:
        from snapshotter.timeouts import DEFAULT_TIMEOUT
        return float(self.backend.config.get("timeout") or DEFAULT_TIMEOUT)

    def client(self):
        """A Redis client bounded by the source's timeout."""
        try:
            import redis
        except ImportError:
            raise ConfigError(f"{self.where}: the redis package is not installed; "
                              f"install the extra snapshotter[redis]") from None
        from redis.backoff import ExponentialWithJitterBackoff
        from redis.retry import Retry
        timeout = self.timeout
        # a dropped connection is made again (redis-py's retries); a request that timed out is
        # not sent again: it may have taken effect, and a hung server would be waited on again
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1), retries=3,
                      supported_errors=(redis.exceptions.ConnectionError,))
        try:
            return redis.Redis.from_url(self.backend.config["url"], socket_connect_timeout=timeout,
                                        socket_timeout=timeout, retry=retry)
        except ValueError as exc:
            raise ConfigError(redact_text(f"{self.where}: invalid Redis URL: {exc}")) from None

    def location(self) -> str:
        return redact_url(self.backend.config["url"])

    def reader(self) -> RedisListReader:
        return RedisListReader(self)

    def writer(self, sessions: frozenset[str] | None) -> RedisListWriter:
        return RedisListWriter(self, sessions)

    @staticmethod
    def session_of(spec: StreamSpec, key: Any, value: Any) -> str | None:
        return key[0] if isinstance(key, list) and key else None

    @staticmethod
    def written_at(spec: StreamSpec, value: dict, message_time: MessageTime) -> _dt.datetime | None:
        return message_time(value.get("message"))

    @staticmethod
    def schema_differences(snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        return []  # positions count from the oldest message in either list order


@contextlib.contextmanager
def translate_redis_errors(what: str, timeout: float | None = None) -> Iterator[None]:
    """redis-py errors become one-line SourceErrors (a timeout says its bound)."""
    import redis
    try:
        yield
    except redis.exceptions.TimeoutError as exc:
        raise SourceError(timed_out(what, timeout)) from exc
    except redis.exceptions.RedisError as exc:
        raise SourceError(redact_text(f"{what}: {redis_error_text(exc)}")) from exc


# redis-py names the failing command of a pipeline with its arguments (a message's text
# among them): "Command # 3 (LSET key 0 {...}) of pipeline caused error: OOM ..."
_PIPELINE_ERROR = re.compile(r"Command # (\d+) \((.*)\) of pipeline caused error: ", re.S)
# Redis itself echoes the arguments of a command it does not know
_ARGS_ECHO = re.compile(r",? with args beginning with: .*$", re.S)


def redis_error_text(exc: BaseException) -> str:
    """The error's first line without the arguments of the command that failed: they can
    hold a message's content, which must not reach an error message or a log."""
    text = str(exc).strip()
    found = None
    for found in _PIPELINE_ERROR.finditer(text):
        pass
    if found is not None:
        command = found.group(2).split(" ", 1)[0].upper()
        text = f"command {found.group(1)} ({command}) of the pipeline failed: {text[found.end():]}"
    text = _ARGS_ECHO.sub("", text)
    return text.splitlines()[0] if text else type(exc).__name__


def glob_escape(text: bytes) -> bytes:
    for ch in (b"\\", b"*", b"?", b"[", b"]"):
        text = text.replace(ch, b"\\" + ch)
    return text


def session_text(raw: bytes) -> str:
    """A Redis list's session id (its key after the prefix) as text.  Keys are bytes and
    need not be UTF-8: a byte that is not part of UTF-8 text becomes U+DC80-U+DCFF
    (Python's ``surrogateescape``), which the record encoding keeps and
    :func:`session_bytes` turns back into the same byte, so such a session is captured
    and restored exactly (shown as base64 where text is needed)."""
    return raw.decode("utf-8", "surrogateescape")


def session_bytes(session: str) -> bytes:
    return session.encode("utf-8", "surrogateescape")


def message_value(raw: bytes) -> dict:
    """A stored message as a record value that writes back to the same bytes (module docs)."""
    try:
        return {"message": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"message": raw}


def message_bytes(value: Any, key: Any) -> bytes:
    message = value.get("message") if type(value) is dict else None
    if type(message) is str:
        return message.encode("utf-8")
    if type(message) is bytes:
        return message
    raise SourceError(f"message {key_text(key)}: a Redis message record is {{\"message\": text or bytes}}, "
                      f"not {key_text(value)[:80]}")


@dataclass
class SessionChanges:
    """The core's upserts and deletes for one session's list, by position."""

    put: dict[int, bytes] = field(default_factory=dict)
    drop: set[int] = field(default_factory=set)
    #: what the restore planned over (:meth:`RedisListWriter.expect`): position -> message, or None: absent
    expected: dict[int, bytes | None] = field(default_factory=dict)
    #: the live list's length when planned, where the plan tells it
    planned_len: int | None = None

    def changed(self, items: list[bytes]) -> str | None:
        """Why the live list (oldest first) is not the one planned over, or None."""
        if self.planned_len is not None and len(items) != self.planned_len:
            return f"it has {len(items)} messages, the restore planned over {self.planned_len}"
        for pos in sorted(self.expected):
            live = items[pos] if pos < len(items) else None
            if live != self.expected[pos]:
                return f"message {pos} changed"
        return None

    def edits(self, live_len: int, session: str) -> tuple[int, dict[int, bytes], list[bytes]]:
        """(final length, in-place replacements, messages to append oldest first) for a live list.

        Refuses changes that do not describe a list with contiguous positions
        (the rules in the module docs) rather than guess: a usage error (exit 2), since a
        restore's plan always describes such a list and only a choice of keys (a reapply of
        position 10 without 9) does not.  Nothing is written: this runs before the write.
        """
        end = max(live_len, max(self.put) + 1) if self.put else live_len
        final = min(end, min(self.drop)) if self.drop else end
        kept_drop = [p for p in range(final, live_len) if p not in self.drop]
        if kept_drop:
            raise UsageError(f"session {session!r}: cannot delete position {final} while keeping position "
                             f"{kept_drop[0]}: a list can only lose its newest messages; nothing was written "
                             f"(name {key_text([session, kept_drop[0]])} too)")
        beyond = [p for p in self.put if p >= final]
        if beyond:
            raise UsageError(f"session {session!r}: position {min(beyond)} is both written and deleted; "
                             f"nothing was written")
        gap = [p for p in range(live_len, final) if p not in self.put]
        if gap:
            raise UsageError(f"session {session!r}: cannot write position {final - 1} without position {gap[0]} "
                             f"(the live list has {live_len} messages, and a list has no gaps); nothing was "
                             f"written (name {', '.join(key_text([session, p]) for p in gap[:3])}"
                             f"{', ...' if len(gap) > 3 else ''} too)")
        in_place = {p: v for p, v in self.put.items() if p < min(live_len, final)}
        appended = [self.put[p] for p in range(live_len, final)]
        return final, in_place, appended


class RedisListReader(SourceReader):
    consistency = "checked"

    def __init__(self, store: RedisLists):
        self.store = store
        self.client = store.client()
        self.prefix = store.key_prefix.encode("utf-8")
        self._listed: set[bytes] | None = None
        #: each session's length as the last read saw it (:meth:`plan_context`)
        self._lengths: dict[str, int] = {}
        with translate_redis_errors(f"{store.where}: cannot reach Redis at {store.location()}", store.timeout):
            self.client.ping()

    def streams(self) -> list[StreamSpec]:
        with translate_redis_errors(f"{self.store.where}: cannot list the sessions at {self.store.location()}",
                                    self.store.timeout):
            self._listed = self._scan()
            estimate = self._estimate(self._listed)
        return [StreamSpec(REDIS_STREAM, redis_schema(self.store), estimated_bytes=estimate)]

    def live_spec(self, name: str) -> StreamSpec | None:
        # what restore, diff and verify ask: no listing and no size estimate (a read lists)
        return StreamSpec(REDIS_STREAM, redis_schema(self.store)) if name == REDIS_STREAM else None

    def _estimate(self, keys: set[bytes]) -> int | None:
        """The lists' size from the memory of a sample of them (chunks are sized by it:
        without it a large history would be cut into tens of kilobytes per object)."""
        sample = sorted(keys)[::max(1, len(keys) // ESTIMATE_SAMPLE)][:ESTIMATE_SAMPLE]
        if not sample:
            return None
        pipe = self.client.pipeline(transaction=False)
        for k in sample:
            pipe.memory_usage(k)  # Redis samples a few nodes of each list: cheap, near enough
        # a server where MEMORY is disabled or renamed answers with errors: no estimate
        sizes = [n for n in pipe.execute(raise_on_error=False) if isinstance(n, int)]
        return int(sum(sizes) / len(sizes) * len(keys)) if sizes else None

    def plan_context(self, spec: StreamSpec) -> dict[str, int]:
        """Each session's length as the last read saw it (:meth:`RedisListWriter.expect`)."""
        return dict(self._lengths)

    def read(self, spec: StreamSpec, sessions: Sequence[str] | None = None):
        with translate_redis_errors(f"{self.store.where}: cannot read {self.store.location()}", self.store.timeout):
            yield from self._read(spec, sessions)

    def _scan(self) -> set[bytes]:
        return set(self.client.scan_iter(match=glob_escape(self.prefix) + b"*", count=1000, _type="list"))

    def _read(self, spec: StreamSpec, sessions: Sequence[str] | None):
        if sessions is None:
            # the listing streams() made just before, once (a retry lists again)
            listed, self._listed = self._listed, None
            keys = sorted(listed if listed is not None else self._scan(), key=self._session)
        else:
            keys = sorted({self.prefix + session_bytes(s) for s in sessions}, key=self._session)
        # in the order of their sessions (key order); for UTF-8 keys that is their byte order
        newest_first = self.store.list_order == NEWEST_FIRST
        seen: dict[bytes, tuple] = {}
        # each session's length as read, for a restore's writer (RedisListWriter.expect): the
        # plan made from this read is the one the writer checks against
        lengths: dict[str, int] = {}
        self._lengths = lengths
        # each session's remaining time to live, in the stream's schema (the manifest keeps it;
        # a restore sets it again on the sessions it rewrites); sessions without one are left out
        ttls: dict[str, int] = {}
        spec.schema[TTL_FIELD] = ttls
        for i in range(0, len(keys), SESSIONS_PER_ROUND_TRIP):
            group = keys[i:i + SESSIONS_PER_ROUND_TRIP]
            pipe = self.client.pipeline(transaction=False)
            for k in group:
                pipe.lrange(k, 0, -1).pttl(k)
            replies = pipe.execute(raise_on_error=False)
            batch = []
            for j, k in enumerate(group):
                items, ttl = replies[2 * j], replies[2 * j + 1]
                if isinstance(items, Exception):
                    raise SourceError(f"{self.store.where}: key {k.decode('utf-8', 'replace')!r}: {items}")
                session = self._session(k)
                seen[k] = list_state(items)
                lengths[session] = len(items)
                if items and isinstance(ttl, int) and ttl > 0:
                    ttls[session] = ttl
                if newest_first:
                    items.reverse()
                batch.extend(([session, pos], message_value(raw)) for pos, raw in enumerate(items))
            if batch:
                yield batch
        if not self._unchanged(seen, rescan=sessions is None):
            self.consistency = "best-effort"

    def _session(self, key: bytes) -> str:
        return session_text(key[len(self.prefix):])

    def _unchanged(self, seen: dict[bytes, tuple], rescan: bool) -> bool:
        """Whether every list still has the length and end elements it was read with
        (and no session appeared)."""
        keys = sorted(set(seen) | (self._scan() if rescan else set()))
        for i in range(0, len(keys), 1000):
            group = keys[i:i + 1000]
            pipe = self.client.pipeline(transaction=False)
            for k in group:
                pipe.llen(k).lindex(k, 0).lindex(k, -1)
            now = pipe.execute()
            for j, k in enumerate(group):
                n, first, last = now[3 * j:3 * j + 3]
                if (n, hash(first), hash(last)) != seen.get(k, EMPTY_LIST):
                    return False
        return True

    def close(self) -> None:
        self.client.close()


EMPTY_LIST = (0, hash(None), hash(None))

#: the stream schema's map of session -> remaining time to live in milliseconds, as read
#: (sessions without a TTL are absent; a snapshot made before TTLs were kept has no map)
TTL_FIELD = "ttl_ms"


def list_state(items: list[bytes]) -> tuple:
    """What the after-read check compares: length and (hashes of) both end elements."""
    if not items:
        return EMPTY_LIST
    return len(items), hash(items[0]), hash(items[-1])


def redis_schema(store: RedisLists) -> dict:
    return {"kind": REDIS_KIND, "key_prefix": store.key_prefix, "list_order": store.list_order,
            "key": ["session", "position"], "position": "0 is the oldest message"}


class RedisListWriter(SourceWriter):
    transactional = False

    def __init__(self, store: RedisLists, sessions: frozenset[str] | None):
        self.store = store
        self.sessions = sessions
        self.client = store.client()
        self.prefix = store.key_prefix.encode("utf-8")
        self.pending: dict[str, SessionChanges] = {}
        #: each session's length as the restore's plan read it (:meth:`planned`)
        self.planned_lengths: dict[str, int] = {}
        #: session -> remaining TTL in ms at the snapshot (prepare); None: the snapshot did not keep TTLs
        self.ttls: dict[str, int] | None = None
        with translate_redis_errors(f"{store.where}: cannot reach Redis at {store.location()}", store.timeout):
            self.client.ping()

    def prepare(self, spec: StreamSpec) -> None:
        if spec.schema.get("kind") != REDIS_KIND:
            raise SchemaMismatch(f"{self.store.where}: stream {spec.name} was captured from a SQL table; "
                                 f"this source is Redis lists")
        ttls = spec.schema.get(TTL_FIELD)
        # a snapshot taken before TTLs were kept says nothing about them: each list keeps its own
        self.ttls = ttls if isinstance(ttls, dict) else None

    def _changes(self, key: Any) -> tuple[SessionChanges, int]:
        if not (isinstance(key, list) and len(key) == 2 and isinstance(key[0], str)
                and type(key[1]) is int and key[1] >= 0):
            raise SourceError(f"{self.store.where}: {key_text(key)} is not a [session, position] key")
        session, pos = key
        if self.sessions is not None and session not in self.sessions:
            raise SourceError(f"{self.store.where}: message {key_text(key)} is outside the sessions being restored")
        return self.pending.setdefault(session, SessionChanges()), pos

    def upsert(self, spec: StreamSpec, records: list) -> None:
        for key, value in records:
            changes, pos = self._changes(key)
            changes.put[pos] = message_bytes(value, key)

    def delete(self, spec: StreamSpec, keys: list) -> None:
        for key in keys:
            changes, pos = self._changes(key)
            changes.drop.add(pos)

    def planned(self, spec: StreamSpec, sessions, context) -> None:
        self.planned_lengths = dict(context or {})

    def expect(self, spec: StreamSpec, records: Iterable) -> bool:
        added: dict[str, list[int]] = {}  # positions the snapshot lacks, per session
        absent: dict[str, list[int]] = {}  # positions the live list lacked
        for key, op, value in records:
            changes, pos = self._changes(key)
            changes.expected[pos] = None if op == "deleted" else message_bytes(value, key)
            if op in ("added", "deleted"):
                (added if op == "added" else absent).setdefault(key[0], []).append(pos)
        # the planned length: one past the highest message the snapshot lacks, else the
        # first position the live list lacked
        # a session whose plan only modified messages: the length its reader saw
        lengths = self.planned_lengths
        for session, changes in self.pending.items():
            if session in added:
                changes.planned_len = max(added[session]) + 1
            elif session in absent:
                changes.planned_len = min(absent[session])
            else:
                changes.planned_len = lengths.get(session)
        return True

    def commit(self) -> None:
        """Every session of the restore in one ``WATCH``/``MULTI``/``EXEC`` transaction: each
        list is checked against what was planned (and quarantined) before anything is
        written, so a session the agent changed meanwhile stops the restore of this source
        with nothing written to any of its sessions, and otherwise all are rewritten at once."""
        if not self.pending:
            return
        sessions = sorted(self.pending)
        keys = [self.prefix + session_bytes(s) for s in sessions]
        with translate_redis_errors(f"{self.store.where}: cannot restore sessions "
                                    f"{', '.join(map(repr, sessions[:5]))}{', ...' if len(sessions) > 5 else ''}",
                                    self.store.timeout):
            # WATCH makes the checks and the edits one atomic step; redis-py retries on a race
            self.client.transaction(lambda pipe: self._rewrite(pipe, sessions, keys), *keys)
        self.pending.clear()

    def _rewrite(self, pipe, sessions: list[str], keys: list[bytes]) -> None:
        newest_first = self.store.list_order == NEWEST_FIRST
        edits = []
        # the lists are read on another connection, many per round trip: a write after the
        # WATCH (on ``pipe``'s connection) fails the EXEC and the whole check runs again
        for i in range(0, len(keys), SESSIONS_PER_ROUND_TRIP):
            group = list(zip(sessions[i:i + SESSIONS_PER_ROUND_TRIP], keys[i:i + SESSIONS_PER_ROUND_TRIP]))
            reader = self.client.pipeline(transaction=False)
            for _, key in group:
                reader.lrange(key, 0, -1)
            for (session, key), items in zip(group, reader.execute()):
                changes = self.pending[session]
                if changes.expected or changes.planned_len is not None:
                    if newest_first:
                        items.reverse()
                    why = changes.changed(items)
                    if why is not None:
                        raise Refused(f"{self.store.where}: session {session!r} changed after the restore planned it "
                                      f"({why}); nothing was written to any session of this source: run the "
                                      f"restore again")
                edits.append((session, key, len(items), *changes.edits(len(items), session)))
        pipe.multi()
        for session, key, live_len, final, in_place, appended in edits:
            if final == 0:
                pipe.delete(key)
                continue
            if final < live_len:
                if newest_first:  # the newest messages are at the head
                    pipe.ltrim(key, live_len - final, -1)
                else:
                    pipe.ltrim(key, 0, final - 1)
            kept = min(live_len, final)
            for pos, raw in sorted(in_place.items()):
                pipe.lset(key, kept - 1 - pos if newest_first else pos, raw)
            if appended:
                # LPUSH a b c leaves c at the head: the last pushed is the newest, as it should be
                (pipe.lpush if newest_first else pipe.rpush)(key, *appended)
            if self.ttls is not None:
                # the time to live the session had when the snapshot was taken (none: none)
                ttl = self.ttls.get(session)
                if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > 0:
                    pipe.pexpire(key, ttl)
                else:
                    pipe.persist(key)

    def rollback(self) -> None:
        self.pending.clear()

    def close(self) -> None:
        self.client.close()
