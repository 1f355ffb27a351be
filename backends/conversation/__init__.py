"""``conversation``: an agent's chat history, one record per message, selectable by session.

Two layouts, chosen by the ``url``, each a store class:

* **a message table in any SQLAlchemy database** (LangChain's
  ``SQLChatMessageHistory``): :class:`~.table.MessageTable`, one stream named after the
  table, a record per row, keyed by the row's primary key (or ``order_column``);
* **Redis lists** (LangChain's ``RedisChatMessageHistory``): :class:`~.redislists.RedisLists`,
  one stream named ``messages``, a record per message, keyed by ``[session_id, position]``
  with position 0 the oldest message.

A Redis message's value has the same shape as a message table's ``message`` column; a
message's write time is read from its JSON (``timestamp_field``, or common LangChain
places) unless a ``timestamp_column`` holds it.  A restore of some sessions must not
overwrite anything outside them: ``writer(sessions=[...])`` scopes a writer to those
sessions (each layout's module says how it keeps to them).
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Sequence
from urllib.parse import urlsplit

from snapshotter.backend import (Option, SourceBackend, SourceReader, SourceWriter, StreamSpec, idle_timeout_option,
                                 timeout_option)
from snapshotter.errors import ConfigError

from .redislists import NEWEST_FIRST, REDIS_KIND, REDIS_SCHEMES, RedisLists
from .store import MessageStore, as_utc_datetime
from .table import MessageTable

SQL_ONLY = ("table", "session_column", "message_column", "order_column", "timestamp_column", "schema",
            "idle_timeout")
REDIS_ONLY = ("key_prefix", "list_order")

#: where a write time may sit inside a message's JSON, tried in order.  LangChain
#: messages carry none by default; applications commonly add one to
#: ``additional_kwargs``, and some providers (Ollama) report ``created_at``.
MESSAGE_TIME_FIELDS = (
    ("data", "additional_kwargs", "timestamp"),
    ("data", "additional_kwargs", "created_at"),
    ("data", "response_metadata", "timestamp"),
    ("data", "response_metadata", "created_at"),
    ("data", "timestamp"),
    ("timestamp",),
    ("created_at",),
)


def layout_of(spec: StreamSpec) -> type[MessageStore]:
    """The layout a stream was captured in (its schema says, whatever the configured store is)."""
    return RedisLists if spec.schema.get("kind") == REDIS_KIND else MessageTable


class ConversationBackend(SourceBackend):
    name = "conversation"
    #: a PostgreSQL message table is captured as COPY text lines, as a ``sql`` source's tables
    encodings = {"pgtext": "snapshotter_backends.sql.pgtext:PgTextCodec",
                 "mytext": "snapshotter_backends.sql.mytext:MyTextCodec"}
    description = ("Conversation history: a SQL message table (LangChain SQLChatMessageHistory) or "
                   "Redis lists (LangChain RedisChatMessageHistory), one record per message, --session aware")
    options = (
        Option("url", str, required=True, secret=True,
               help="SQLAlchemy database URL, or redis://HOST:PORT/DB; ${VAR} keeps passwords out of the file"),
        Option("table", str, default="message_store", help="SQL: the message table"),
        Option("session_column", str, default="session_id", help="SQL: column holding the session id"),
        Option("message_column", str, default="message", help="SQL: column holding the message JSON"),
        Option("order_column", str,
               help="SQL: unique column that keys and orders messages (default: the primary key)"),
        Option("timestamp_column", str, help="SQL: column holding each message's write time, for --failure-at"),
        Option("schema", str, help="SQL: database schema (PostgreSQL) holding the table"),
        Option("key_prefix", str, default="message_store:", help="Redis: prefix of the session keys"),
        Option("list_order", str, default=NEWEST_FIRST,
               help="Redis: newest-first (LPUSH, as LangChain) or oldest-first (RPUSH)"),
        Option("timestamp_field", str,
               help="dotted path of a write time inside the message JSON, e.g. data.additional_kwargs.timestamp "
                    "(default: common LangChain places)"),
        timeout_option(),
        idle_timeout_option("SQL: seconds the restore's write transaction may wait idle (on the other sources) "
                            "before PostgreSQL or MariaDB ends it"),
    )
    supports_sessions = True

    def __init__(self, source_name: str, options: dict[str, Any]):
        super().__init__(source_name, options)
        self.base_dir: str | None = None
        scheme = urlsplit(str(options.get("url") or "")).scheme.lower()
        redis = scheme in REDIS_SCHEMES
        # a setting of the other layout is a mistake worth stopping for, unless it is just the default
        wrong = SQL_ONLY if redis else REDIS_ONLY
        misplaced = [o for o in wrong if options.get(o, self.defaults[o]) != self.defaults[o]]
        if misplaced:
            other = "SQL" if redis else "Redis"
            raise ConfigError(f"{self.where}: option {', '.join(misplaced)} applies to {other} stores only "
                              f"(url is a {'Redis' if redis else 'SQL database'} URL)")
        self.store: MessageStore = RedisLists(self) if redis else MessageTable(self)

    @property
    def where(self) -> str:
        return f"source {self.source_name!r}"

    @property
    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def opt(self, name: str) -> Any:
        value = self.config.get(name)
        return self.defaults[name] if value is None else value

    # -- the configured store ----------------------------------------------

    def location(self) -> str:
        return self.store.location()

    def reader(self) -> SourceReader:
        return self.store.reader()

    def writer(self, sessions: Sequence[str] | None = None) -> SourceWriter:
        """A writer; ``sessions`` scopes it to a ``--session`` restore (see the module docs)."""
        return self.store.writer(None if sessions is None else frozenset(sessions))

    # -- knowledge of messages -----------------------------------------------

    def session_of(self, spec: StreamSpec, key, value) -> str | None:
        return layout_of(spec).session_of(spec, key, value)

    def session_field(self, spec: StreamSpec) -> str | None:
        return layout_of(spec).session_field(spec)

    def written_at(self, spec: StreamSpec, key, value) -> _dt.datetime | None:
        if not isinstance(value, dict):
            return None
        return layout_of(spec).written_at(spec, value, self._message_time)

    def _message_time(self, message: Any) -> _dt.datetime | None:
        if isinstance(message, (str, bytes)):
            try:
                message = json.loads(message)
            except ValueError:
                return None
        if not isinstance(message, dict):
            return None
        field_path = self.config.get("timestamp_field")
        paths = [tuple(field_path.split("."))] if field_path else MESSAGE_TIME_FIELDS
        for path in paths:
            node: Any = message
            for step in path:
                node = node.get(step) if isinstance(node, dict) else None
            when = as_utc_datetime(node)
            if when is not None:
                return when
        return None

    def recreate_omissions(self, spec: StreamSpec, reader) -> list[str]:
        if "columns" not in spec.schema:
            return []
        from ..sql import recreate_omissions
        return recreate_omissions(self, spec, reader)

    def schema_differences(self, snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        kinds = ["Redis lists" if s.schema.get("kind") == REDIS_KIND else "a SQL table" for s in (snapshot, live)]
        if kinds[0] != kinds[1]:
            return [f"the snapshot holds {kinds[0]}, the live source is {kinds[1]}"]
        return layout_of(live).schema_differences(snapshot, live)
