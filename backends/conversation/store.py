"""What a conversation store is to the ``conversation`` backend: one layout of an agent's
message history (:class:`~.table.MessageTable`, :class:`~.redislists.RedisLists`) with its
reader, writer and location, and what a stream stored in that layout says of its records.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from snapshotter.backend import SourceReader, SourceWriter, StreamSpec

    from . import ConversationBackend

#: a message's write time, from its stored content (the backend's ``timestamp_field``)
MessageTime = Callable[[Any], "_dt.datetime | None"]


class MessageStore(ABC):
    """One configured source's messages in one layout; the backend hands it reads and writes."""

    def __init__(self, backend: ConversationBackend):
        self.backend = backend

    @property
    def where(self) -> str:
        return self.backend.where

    @abstractmethod
    def location(self) -> str:
        """Where the messages are, without secrets."""

    @abstractmethod
    def reader(self) -> SourceReader:
        """A read of every session (or of some, :meth:`SourceReader.read`'s ``sessions``)."""

    @abstractmethod
    def writer(self, sessions: frozenset[str] | None) -> SourceWriter:
        """A writer; ``sessions`` scopes it to a ``--session`` restore."""

    # -- a stream stored in this layout (by its schema, whatever the configured store is) ----

    @staticmethod
    @abstractmethod
    def session_of(spec: StreamSpec, key: Any, value: Any) -> str | None:
        """The session a record belongs to."""

    @staticmethod
    def session_field(spec: StreamSpec) -> str | None:
        """The record field that holds the session (:meth:`SourceBackend.session_field`)."""
        return None

    @staticmethod
    @abstractmethod
    def written_at(spec: StreamSpec, value: dict, message_time: MessageTime) -> _dt.datetime | None:
        """When a record was written, if the stream tells."""

    @staticmethod
    @abstractmethod
    def schema_differences(snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        """Why the live stream cannot take the snapshot's records (both of this layout)."""


def as_utc_datetime(v: Any) -> _dt.datetime | None:
    """A stored time as an aware datetime; naive times are taken as UTC, numbers as Unix time."""
    if isinstance(v, _dt.datetime):
        return v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)
    if isinstance(v, str):
        try:
            t = _dt.datetime.fromisoformat(v)
        except ValueError:
            return None
        return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds = v / 1000 if abs(v) > 1e11 else v  # beyond year 5138 in seconds: milliseconds
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
    return None
