"""The byte-level object store interface every repository backend implements.

Deliberately small (restic's backend interface): create-only put, get, stat,
list, delete.  Names are relative, slash-separated, and validated here once so
no implementation can be tricked into writing outside its root.  Retries,
dry-run and caching are not the concern of an implementation.
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import NotFound, UsageError

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    mtime: float  # seconds since the epoch, as the store reports it


class ObjectMissing(NotFound):
    """An object the repository needs is not in the store."""


def valid_name(name: str) -> bool:
    """Whether a listed name is one of ours: a foreign file with any other name (``..evil``,
    control characters) is left out of listings, as foreign files are, never an error."""
    try:
        check_name(name)
    except UsageError:
        return False
    return True


def check_name(name: str) -> str:
    """Refuse any object name that could escape the store root or is not ours."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise UsageError(f"invalid object name {name!r}")
    parts = name.split("/")
    for part in parts:
        if not _SEGMENT.match(part) or part in (".", ".."):
            raise UsageError(f"invalid object name {name!r}")
    return name


class ObjectStore(ABC):
    """Where the repository's objects live. Implementations only move bytes."""

    #: a human description without secrets, e.g. ``file:///srv/snap`` or ``s3://bucket/prefix``
    url: str
    #: requests worth keeping in flight beyond one per CPU (a remote store's latency is
    #: hidden by overlapping requests; a local disk's is not, and extra writers only
    #: contend for the CPUs compressing)
    extra_requests: int = 0

    @abstractmethod
    def put(self, name: str, data: bytes, *, overwrite: bool = False, durable: bool = True) -> bool:
        """Store ``data`` under ``name``.

        Create-only unless ``overwrite``: returns False (writing nothing) when
        the object already exists, True when this call created it.  A reader
        never sees a partly written object.  ``durable=False`` lets a store
        defer making the object crash-proof until :meth:`flush`.
        """

    @abstractmethod
    def get(self, name: str) -> bytes:
        """The object's bytes; raises ObjectMissing."""

    @abstractmethod
    def stat(self, name: str) -> ObjectInfo | None:
        """Size and time of the object, or None when it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (a folder ends in '/')."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    def flush(self) -> None:
        """Make every object written so far durable (objects put with ``durable=False``)."""

    def get_many(self, names: Iterable[str]) -> Iterator[tuple[str, bytes | Exception]]:
        """``(name, bytes)`` for each name, in order, or ``(name, exception)`` where its
        :meth:`get` raised.  A store with ``extra_requests`` keeps that many gets (plus one per
        CPU) in flight ahead of the one consumed, so reading N small objects (the manifests
        `list` shows) costs about one round trip per window, not N.  The window opens as the
        caller keeps reading (1, 2, 4, …), so one that stops early caused few needless gets."""
        if not self.extra_requests:
            for name in names:
                try:
                    yield name, self.get(name)
                except Exception as exc:  # noqa: BLE001 - handed to the caller, as get would raise it
                    yield name, exc
            return
        from concurrent.futures import ThreadPoolExecutor
        window = (os.cpu_count() or 1) + self.extra_requests

        def fetch(name: str) -> bytes | Exception:
            try:
                return self.get(name)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, as get would raise it
                return exc

        pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="get-many")
        pending: deque = deque()
        ahead = 1  # doubles up to the window: a caller that wants one object (--limit 1) costs one get
        try:
            for name in names:
                pending.append((name, pool.submit(fetch, name)))
                if len(pending) >= ahead:
                    done, future = pending.popleft()
                    ahead = min(window, ahead * 2)
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def close(self) -> None:  # pragma: no cover - trivial default
        pass
