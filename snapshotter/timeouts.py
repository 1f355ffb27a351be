"""Timeouts: how long a command waits on a store that does not answer.

Every source and an S3 repository take ``timeout`` (seconds).  It bounds each
connect and each request or socket read, never a whole scan: a 20 GB table is
read in many reads, each of which must come within the bound.  A store that
does not answer in time ends the command with one line naming the source (or
the repository) and "timed out after N s", exit code 1.

A store whose client library puts no bound on a read (a dump of a big table is one
statement; a sort may send nothing for minutes before its first row) is bounded by its
backend: TCP keepalives find a server or network that went away, and a watchdog of the
backend's own (``snapshotter_backends.sql.pgwatch``, see there) a server, proxy or pooler
that keeps the connection open but sends nothing for ``timeout`` seconds; the command
then ends as above.
"""
from __future__ import annotations

import math
from typing import Any

#: seconds a server (PostgreSQL, MariaDB, Redis, Chroma, S3) gets to accept a
#: connection and to answer each request or read, and SQLite's busy timeout
DEFAULT_TIMEOUT = 30.0

#: seconds the restore's PostgreSQL or MariaDB write transaction may sit idle (while
#: the restore plans, writes and verifies the other sources) before the database ends it
DEFAULT_IDLE_TIMEOUT = 600.0


def check_seconds(value: Any) -> str | None:
    """Why ``value`` is not a usable number of seconds, or None when it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "expected a number of seconds"
    if not math.isfinite(value) or value <= 0:
        return "expected a positive, finite number of seconds"
    return None


def seconds(value: float) -> str:
    """``30``, ``0.5``: how a timeout is written in messages."""
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def timed_out(what: str, timeout: float | None, detail: str = "") -> str:
    """The one-line message of a store that did not answer within ``timeout``."""
    bound = f"timed out after {seconds(timeout)} s" if timeout else "timed out"
    return f"{what}: {bound}" + (f" ({detail})" if detail else "")
