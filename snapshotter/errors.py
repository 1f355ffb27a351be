"""The error hierarchy: every failure a user can see is one of these.

Each class carries its exit code (the table in the README); the CLI turns a
`SnapshotterError` into one line on stderr and that code, and anything else
into exit 1 with a short report (a traceback only with ``-v``).  Errors from
libraries (botocore, SQLAlchemy, chromadb, redis) are translated to these at
the boundary where they are raised, never deeper in the core.
"""
from __future__ import annotations


class SnapshotterError(Exception):
    """Unexpected failure."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str | None = None, *, details: dict | None = None):
        super().__init__(message or (self.__doc__ or self.kind).strip())
        #: more for scripts: added to the ``{"error": {...}}`` object that ``--json`` prints
        self.details = dict(details or {})

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.kind


class UsageError(SnapshotterError):
    """Usage error."""

    exit_code = 2
    kind = "usage"


class ConfigError(UsageError):
    """Configuration error."""

    kind = "config"


class SchemaMismatch(UsageError):
    """The live schema differs from the snapshot's."""

    kind = "schema_mismatch"


class IntegrityError(SnapshotterError):
    """Integrity failure: an object is missing or corrupt."""

    exit_code = 3
    kind = "integrity"


class LockedError(SnapshotterError):
    """Another run holds the lock this command needs."""

    exit_code = 4
    kind = "locked"


class NotFound(SnapshotterError):
    """Not found."""

    exit_code = 5
    kind = "not_found"


class Refused(SnapshotterError):
    """Refused: a destructive command needs --yes when there is no terminal."""

    exit_code = 6
    kind = "refused"


class Interrupted(SnapshotterError):
    """Interrupted."""

    exit_code = 130
    kind = "interrupted"


class StoreError(SnapshotterError):
    """The object store failed after retries."""

    kind = "store"


class ObjectExists(SnapshotterError):
    """A create-only write found the object already there (not an error for chunks)."""

    kind = "exists"


class AuditNotWritten(SnapshotterError):
    """The work is done, but its audit record could not be appended."""

    kind = "audit"

    def __init__(self, message: str, *, exit_code: int = 1, result=None):
        super().__init__(message)
        #: the code of what stopped the append (a store failing: 1)
        self.exit_code = exit_code
        #: what the call returned, for the caller to use all the same
        self.result = result


class SourceError(SnapshotterError):
    """A source (database, vector store) failed or could not be reached."""

    kind = "source"


class KeyOrderError(SourceError):
    """A source gave records out of key order (the reader asks its store why:
    :meth:`~snapshotter.backend.SourceReader.key_problem`)."""

    kind = "key_order"


#: what an interrupted run says (and its audit record's summary)
INTERRUPTED = "interrupted: nothing half-committed was left behind"


def from_exception(exc: BaseException) -> SnapshotterError:
    """What a user is told of any exception: ours as it is, Ctrl-C / SIGTERM as
    Interrupted, anything else (a bug, a library error not translated at its boundary)
    as an unexpected failure naming its type and the first line of its message."""
    if isinstance(exc, SnapshotterError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(INTERRUPTED)
    text = str(exc)
    return SnapshotterError(f"unexpected {type(exc).__name__}: {text.splitlines()[0] if text else ''}")
