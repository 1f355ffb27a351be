"""Locks held in the repository itself (``locks/<name>.json``), so that runs on
different machines sharing one bucket see each other.

A lock object *claims* resources, each shared or exclusive:

- ``repository``: every command that reads or writes snapshot data claims it
  shared; ``prune`` claims it exclusive, so no chunk it deletes can be in use.
- ``source-<name>``: a snapshot claims the sources it reads shared, a restore
  claims the sources it writes exclusive.
- ``marks``: ``mark-good``/``unmark-good`` claim it shared, ``forget`` exclusive,
  so a snapshot cannot be marked known-good while forget is deleting it.

All claims of one run live in one object, so a run gets all of them or none and
two runs can never deadlock by taking resources in different orders.

Acquiring (restic's protocol, with a tie-break):

1. create ``locks/<kind>-<random>.json`` create-only, in state ``pending``;
2. list ``locks/`` and read every lock whose claims conflict with ours;
3. none: rewrite ours as ``held`` and go.  A ``held`` lock, a stale one, or a
   ``pending`` one that orders before ours (created time, then name): delete
   ours and fail (exit 4) or, with ``--lock-wait``, retry later.  Only
   ``pending`` locks that order after ours: they will see ours and withdraw,
   so list again after a moment.

A run goes ahead only after a listing that followed its own write showed no
conflict; of two conflicting runs the later lister always sees the other, so
they never both go ahead.  The tie-break makes one of two racing runs win
instead of both withdrawing and retrying in step.

A held lock is rewritten with a later expiry from a background thread.  A lock
is stale when it has expired, or was taken on this host by a process that no
longer exists; a stale lock still blocks (a host with a wrong clock must not
lose its lock silently) until ``snapshotter unlock`` removes it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import IntegrityError, LockedError, StoreError
from .names import iso, parse_iso, printable, utcnow, current_user
from .repository import load_json
from .objectstore import ObjectMissing, ObjectStore

LOCKS_PREFIX = "locks/"
SHARED = "shared"
EXCLUSIVE = "exclusive"

REPOSITORY = "repository"
MARKS = "marks"

#: a lock not refreshed for this long is stale
DEFAULT_TTL = 300.0
#: how often a holder rewrites its lock; well inside the TTL so one failed write is harmless
DEFAULT_REFRESH = 60.0
#: how long a later pending claimant may keep us listing before we treat it as a conflict
PENDING_SETTLE = 10.0


def source_resource(name: str) -> str:
    return f"source-{name}"




def _process_start(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot) where the OS tells it,
    so a recycled pid is not taken for the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


#: no system hands out process ids beyond this (Linux's pid_max is at most 2^22)
MAX_PID = 2 ** 31 - 1


def _process_alive(pid: int, start: int | None) -> bool:
    # a lock is anyone's to write: a pid no process can have (negative, 10^20, not a number)
    # names no living process, and must not reach os.kill (OverflowError)
    if type(pid) is not int or not 0 < pid <= MAX_PID:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except (OverflowError, ValueError):
        return False
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # a killed child its parent has not reaped yet
            return False
        if start is not None and int(fields[19]) != start:
            return False
    except (OSError, ValueError, IndexError):
        pass
    return True


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def claims_conflict(a: dict[str, str], b: dict[str, str]) -> str | None:
    """The first resource both claim where at least one claim is exclusive."""
    for resource in sorted(a.keys() & b.keys()):
        if a[resource] == EXCLUSIVE or b[resource] == EXCLUSIVE:
            return resource
    return None


def describe_resource(resource: str) -> str:
    if resource.startswith("source-"):
        return f"source {resource[len('source-'):]}"
    if resource == MARKS:
        return "the known-good marks"
    if resource == "*":
        return "the repository (unreadable lock)"
    return "the repository" if resource == REPOSITORY else resource


@dataclass
class LockInfo:
    """A lock object as read from the store."""

    name: str
    claims: dict[str, str]
    state: str = "held"
    user: str = "?"
    host: str = "?"
    pid: int = 0
    pid_start: int | None = None
    command: str = "?"
    created: _dt.datetime | None = None
    expires: _dt.datetime | None = None
    readable: bool = True
    mtime: float = 0.0

    @classmethod
    def parse(cls, name: str, raw: bytes, mtime: float) -> "LockInfo":
        try:
            doc = load_json(raw, name)
            claims = {str(k): str(v) for k, v in doc["claims"].items()}
            if any(v not in (SHARED, EXCLUSIVE) for v in claims.values()):
                raise ValueError("unknown claim")
            pid = doc.get("pid", 0)
            if type(pid) is not int:  # "4242", 1e300, null: no process of ours
                pid = int(pid) if isinstance(pid, str) and pid.isdigit() else -1
            return cls(name=name, claims=claims, state=str(doc.get("state", "held")),
                       user=str(doc.get("user", "?")), host=str(doc.get("host", "?")), pid=pid,
                       pid_start=doc["pid_start"] if type(doc.get("pid_start")) is int else None,
                       command=str(doc.get("command", "?")),
                       created=parse_iso(doc["created"]), expires=parse_iso(doc["expires"]), mtime=mtime)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, IntegrityError):
            # an unreadable lock claims everything: nobody can tell what it protects
            return cls(name=name, claims={"*": EXCLUSIVE}, readable=False, mtime=mtime)

    @property
    def exclusive(self) -> bool:
        return EXCLUSIVE in self.claims.values()

    def conflicts(self, claims: dict[str, str]) -> str | None:
        if not self.readable:
            return "*"
        return claims_conflict(self.claims, claims)

    def order_key(self) -> tuple:
        created = self.created.timestamp() if self.created else self.mtime
        return (created, self.name)

    def stale(self, now: _dt.datetime | None = None) -> str | None:
        """Why the lock is stale, or None while its owner may still be alive."""
        now = now or utcnow()
        if not self.readable:
            age = now.timestamp() - self.mtime
            return f"unreadable and unchanged for {format_age(age)}" if age > DEFAULT_TTL else None
        if self.expires is not None and now > self.expires:
            return f"expired {format_age((now - self.expires).total_seconds())} ago"
        if self.host == socket.gethostname() and not _process_alive(self.pid, self.pid_start):
            return f"process {self.pid} on this host is gone"
        return None

    def owner_gone(self) -> bool:
        """Taken on this host by a process that no longer exists (``kill -9``, a crash).

        Unlike expiry, this does not depend on clocks agreeing: such a lock can
        never be released by its owner, so the next run on this host clears it."""
        return self.readable and self.host == socket.gethostname() and not _process_alive(self.pid, self.pid_start)

    def describe(self, now: _dt.datetime | None = None) -> str:
        now = now or utcnow()
        if not self.readable:
            return f"unreadable lock {self.name}"
        kind = EXCLUSIVE if self.exclusive else SHARED
        age = format_age((now - self.created).total_seconds()) if self.created else "?"
        pending = ", still being acquired" if self.state == "pending" else ""
        # the lock's fields are anyone's to write: one line each, whatever they hold
        return (f"{kind} lock by {printable(self.user, 64)}@{printable(self.host, 128)} pid {self.pid} "
                f"({printable(self.command, 64)}), created {age} ago{pending}")

    def to_json(self, now: _dt.datetime | None = None) -> dict:
        now = now or utcnow()
        return {"name": self.name, "claims": self.claims, "state": self.state, "user": self.user,
                "host": self.host, "pid": self.pid, "command": self.command,
                "created": iso(self.created) if self.created else None,
                "expires": iso(self.expires) if self.expires else None,
                "readable": self.readable, "stale": self.stale(now)}


def list_locks(store: ObjectStore) -> list[LockInfo]:
    out = []
    for info in store.list(LOCKS_PREFIX):
        if not info.name.endswith(".json"):
            continue
        try:
            raw = store.get(info.name)
        except ObjectMissing:
            continue  # released while we listed
        out.append(LockInfo.parse(info.name, raw, info.mtime))
    return out


def remove_locks(store: ObjectStore, *, everything: bool = False) -> tuple[list[LockInfo], list[LockInfo]]:
    """Remove stale locks (or every lock): returns (removed, kept)."""
    removed, kept = [], []
    now = utcnow()
    for lock in list_locks(store):
        if everything or lock.stale(now):
            store.delete(lock.name)
            removed.append(lock)
        else:
            kept.append(lock)
    return removed, kept


def locked_message(blocker: LockInfo, resource: str, now: _dt.datetime | None = None) -> str:
    now = now or utcnow()
    stale = blocker.stale(now)
    text = f"{describe_resource(resource)} is locked: {blocker.describe(now)}"
    if stale:
        return (f"{text}; the lock is stale ({stale}): if no snapshotter runs on {blocker.host} any more, "
                f"remove it with `snapshotter unlock`")
    if not blocker.readable:
        # a lock object being written is unreadable for a moment; one that stays so is damaged
        return (f"{text}; if it stays unreadable (a damaged lock object), remove it with `snapshotter unlock --all` "
                f"(`unlock --stale` removes it once it has been unchanged for {format_age(DEFAULT_TTL)})")
    return f"{text}; try again later or wait for it with --lock-wait SECONDS"


@dataclass
class RepositoryLock:
    """One run's lock; a context manager that releases it on exit, however the block ends."""

    store: ObjectStore
    claims: dict[str, str]
    command: str = ""
    ttl: float = DEFAULT_TTL
    refresh: float = DEFAULT_REFRESH
    on_lost: Callable[[str], None] | None = None
    name: str = ""
    created: _dt.datetime | None = None
    lost: str | None = None
    #: seconds acquire() spent waiting for conflicting locks to go (0: none was in the way)
    waited: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # -- the object ------------------------------------------------------------

    def _body(self, state: str) -> bytes:
        now = utcnow()
        doc = {
            "format": 1,
            "claims": self.claims,
            "state": state,
            "user": current_user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "command": self.command,
            "created": iso(self.created or now),
            "refreshed": iso(now),
            "expires": iso(now + _dt.timedelta(seconds=self.ttl)),
        }
        return json.dumps(doc, indent=1).encode() + b"\n"

    def _create_pending(self) -> None:
        kind = EXCLUSIVE if EXCLUSIVE in self.claims.values() else SHARED
        self.created = utcnow()
        for _ in range(5):
            self.name = f"{LOCKS_PREFIX}{kind}-{secrets.token_hex(8)}.json"
            if self.store.put(self.name, self._body("pending")):
                return
        raise StoreError("could not create a lock object with a fresh name")

    def _order_key(self) -> tuple:
        return (self.created.timestamp(), self.name)

    # -- acquiring -------------------------------------------------------------

    def acquire(self, *, wait: float = 0.0, on_wait: Callable[[str], None] | None = None) -> "RepositoryLock":
        started = time.monotonic()
        deadline = started + wait
        delay = 0.2
        told = retried = False
        while True:
            try:
                self._create_pending()
                blocker, resource = self._settle(deadline)
                if blocker is None:
                    self.store.put(self.name, self._body("held"), overwrite=True)
                    if retried:
                        self.waited = time.monotonic() - started
                    break
            except BaseException:
                self._delete_own()
                raise
            self._delete_own()
            message = locked_message(blocker, resource)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockedError(message)
            if on_wait and not told:
                on_wait(f"waiting up to {format_age(remaining)} for the lock: {message.split('; ')[0]}")
                told = True
            retried = True
            # jitter, so runs that withdrew together do not come back together
            time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
            delay = min(delay * 2, 5.0)
        self._thread = threading.Thread(target=self._refresh_loop, name="lock-refresh", daemon=True)
        self._thread.start()
        return self

    def _settle(self, deadline: float) -> tuple[LockInfo | None, str]:
        settle_until = max(deadline, time.monotonic() + PENDING_SETTLE)
        pause = 0.05
        while True:
            now = utcnow()
            blocking: list[tuple[LockInfo, str]] = []
            later_pending: list[tuple[LockInfo, str]] = []
            for other in list_locks(self.store):
                if other.name == self.name:
                    continue
                resource = other.conflicts(self.claims)
                if resource is None:
                    continue
                if other.owner_gone():
                    # a re-run after kill -9 must not need a manual unlock first
                    self.store.delete(other.name)
                    continue
                if other.readable and other.state == "pending" and not other.stale(now) \
                        and other.order_key() > self._order_key():
                    later_pending.append((other, resource))
                else:
                    blocking.append((other, resource))
            if blocking:
                # name the lock a user can do something about: a held one before a pending one
                blocking.sort(key=lambda x: (x[0].state == "pending", x[0].order_key()))
                return blocking[0]
            if not later_pending:
                return None, ""
            if time.monotonic() >= settle_until:
                return later_pending[0]
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    # -- holding ---------------------------------------------------------------

    def _refresh_loop(self) -> None:
        valid_until = time.monotonic() + self.ttl
        while not self._stop.wait(self.refresh):
            try:
                if self.store.stat(self.name) is None:
                    self._lose("its lock object was removed (by `snapshotter unlock --all`?)")
                    return
                self.store.put(self.name, self._body("held"), overwrite=True)
                valid_until = time.monotonic() + self.ttl
            except Exception as exc:  # a flaky store: try again next round, while the lock is still valid
                if time.monotonic() > valid_until:
                    self._lose(f"it could not be refreshed before it expired ({exc})")
                    return

    def _lose(self, why: str) -> None:
        self.lost = why
        if self.on_lost:
            self.on_lost(f"lock {self.name} lost: {why}")

    def check(self) -> None:
        """Raise when the lock can no longer be trusted (call before destructive steps)."""
        if self.lost:
            raise LockedError(f"this run's lock was lost: {self.lost}; stopping before changing anything more")

    def _delete_own(self) -> None:
        if self.name:
            try:
                self.store.delete(self.name)
            except Exception:
                pass  # left behind, it goes stale and `unlock` removes it

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._delete_own()
        self.name = ""

    def __enter__(self) -> "RepositoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(store: ObjectStore, claims: dict[str, str], *, command: str = "", wait: float = 0.0,
            ttl: float = DEFAULT_TTL, refresh: float = DEFAULT_REFRESH,
            on_wait: Callable[[str], None] | None = None,
            on_lost: Callable[[str], None] | None = None) -> RepositoryLock:
    """Take a lock holding ``claims`` ({resource: "shared" | "exclusive"}); use it as
    a context manager.  Raises LockedError (exit 4) when another run holds a
    conflicting lock and ``wait`` seconds passed without it going away."""
    for resource, kind in claims.items():
        if kind not in (SHARED, EXCLUSIVE):
            raise ValueError(f"lock claim {resource}={kind!r}: expected shared or exclusive")
    lock = RepositoryLock(store, dict(claims), command=command, ttl=ttl, refresh=refresh, on_lost=on_lost)
    return lock.acquire(wait=wait, on_wait=on_wait)


def repository_claims(*, exclusive: bool = False, shared_sources: Iterable[str] = (),
                      exclusive_sources: Iterable[str] = ()) -> dict[str, str]:
    """The usual claims: the repository (shared unless ``exclusive``) plus sources."""
    claims = {REPOSITORY: EXCLUSIVE if exclusive else SHARED}
    for name in shared_sources:
        claims[source_resource(name)] = SHARED
    for name in exclusive_sources:
        claims[source_resource(name)] = EXCLUSIVE
    return claims

