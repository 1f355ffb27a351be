"""The source backend interface, and the registry that finds backends by entry point.

A backend knows its store (a database, a vector store, Redis) and nothing about
chunks, manifests or object storage.  It hands the core *streams* of
*records*: ``(key, value)`` pairs in ascending key order, where ``key`` is a
scalar or a list (composite keys) and ``value`` is the record as JSON-like
Python data (see :mod:`snapshotter.codec` for the extra types allowed).
The core does everything else once: chunking, digests, plans, quarantine,
verification.

Built-in backends register through the same entry-point group a third-party
plugin uses: ``[project.entry-points."snapshotter.backends"]``.  They are also
named in :data:`BUILTIN_BACKENDS`, so that a command whose sources all use
built-in backends resolves them without reading the metadata of every
installed distribution.
"""
from __future__ import annotations

import datetime as _dt
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
import importlib
from typing import Any, ClassVar, Iterable, Iterator, Sequence

from . import codec
from .errors import ConfigError, SourceError

#: no live record has the key (what :meth:`SourceBackend.same_value` compares with)
ABSENT = object()

Key = Any
Record = tuple  # (key, value)

ENTRY_POINT_GROUP = "snapshotter.backends"

#: The backends this package ships, as its entry points (pyproject.toml) name them.
#: Resolved directly: finding entry points imports importlib.metadata and reads
#: every installed distribution's metadata, ~50 ms that each command would pay
#: before its first byte of work.  A plugin's entry point cannot replace these.
BUILTIN_BACKENDS = {
    "sql": "snapshotter_backends.sql:SQLBackend",
    "conversation": "snapshotter_backends.conversation:ConversationBackend",
    "chroma": "snapshotter_backends.chroma:ChromaBackend",
}


@dataclass(frozen=True)
class Option:
    """One configuration key a backend accepts under ``[sources.NAME]``."""

    name: str
    type: type = str  # str, int, float (any number), bool, list, dict
    required: bool = False
    default: Any = None
    help: str = ""
    secret: bool = False  # never printed, never stored in a manifest
    #: a further check of the value: why it is wrong (one line), or None when it is right
    check: Any = None


def timeout_option(help: str = "") -> Option:
    """The ``timeout`` option every built-in source takes (seconds; see :mod:`snapshotter.timeouts`)."""
    from .timeouts import DEFAULT_TIMEOUT, check_seconds
    return Option("timeout", float, default=DEFAULT_TIMEOUT, check=check_seconds,
                  help=help or "seconds to wait for each connect and each request or read (not a whole scan)")


def idle_timeout_option(help: str = "") -> Option:
    """``idle_timeout``: how long a SQL source's restore transaction may sit idle before the
    database (PostgreSQL, MariaDB) ends it."""
    from .timeouts import DEFAULT_IDLE_TIMEOUT, check_seconds
    return Option("idle_timeout", float, default=DEFAULT_IDLE_TIMEOUT, check=check_seconds,
                  help=help or "seconds the restore's write transaction may wait idle (on the other sources) "
                               "before PostgreSQL or MariaDB ends it")


@dataclass
class StreamSpec:
    """One stream of a source: a table, a collection, a message store.

    ``schema`` is JSON data the backend needs to recreate the stream on restore
    (columns and types, a collection's configuration) and to detect that the
    live stream no longer matches the snapshot.
    """

    name: str
    schema: dict = field(default_factory=dict)
    #: the backend's cheap guess of the stream's encoded size, if it has one; a
    #: stream's first snapshot sizes its chunks from it (big streams, big chunks)
    estimated_bytes: int | None = None


class StreamChanged(SourceError):
    """Raised by :meth:`SourceReader.read` of a ``restartable`` reader when the
    store changed while the stream was read and the read should start over.

    The core then drops what it made of the stream (its chunks become garbage
    for ``prune``) and calls ``read`` again; the backend decides how many times
    before it settles for a "best-effort" read.  Records can thus go straight
    to the core while they are read, with no spool to take them back from.
    """


class SourceReader(ABC):
    """A point-in-time read of one source (used as a context manager)."""

    #: set by the caller when it can take StreamChanged and read the stream again
    restartable: bool = False

    #: set by the caller when it takes a batch of :meth:`read_encoded` as one ``bytes`` of
    #: whole records too (the records as the codec's ``iter_records`` splits them), not
    #: only as a list of records
    encoded_blocks: bool = False

    #: the guarantee the read got, recorded in the manifest. One of
    #: "snapshot-isolation" (one transaction), "checked" (before/after check
    #: found no change) or "best-effort" (the store changed during the read).
    consistency: str = "snapshot-isolation"

    @abstractmethod
    def streams(self) -> list[StreamSpec]:
        """The streams this source has (after the configured selection)."""

    def live_spec(self, name: str) -> StreamSpec | None:
        """The live stream called ``name`` (whether or not it is configured), or None
        when the store has no such stream (a dropped table or collection).
        Restore uses this to plan; backends may answer it more cheaply."""
        return {s.name: s for s in self.streams()}.get(name)

    def key_problem(self, spec: StreamSpec) -> str | None:
        """Why the stream's records cannot be put in ascending key order (a key that is
        NULL, keys of several types), asked once a read found them out of order so the
        user is told the cause; None when the store cannot tell."""
        return None

    @abstractmethod
    def read(self, spec: StreamSpec, sessions: Sequence[str] | None = None) -> Iterator[list[Record]]:
        """Batches of records in strictly ascending key order.

        ``sessions`` (backends with ``supports_sessions``) keeps only those
        sessions' records.  Batches are bounded so memory is too.
        """

    def read_encoded(self, spec: StreamSpec, sessions: Sequence[str] | None = None
                     ) -> tuple[dict, Iterator[list[bytes]]] | None:
        """The stream's records already encoded by the store, or None (the default)
        to have the core encode what :meth:`read` returns.

        Returns the encoding document (its ``format`` one the backend declares in
        :attr:`SourceBackend.encodings`, see :mod:`snapshotter.encoding`) and batches
        of encoded records in key order.  A database's own text of its rows goes
        into chunks as it is, which is what lets a snapshot keep up with a dump.
        """
        return None

    def read_encoded_keys(self, spec: StreamSpec, keys: list) -> tuple[dict, Iterator[list[bytes]]] | None:
        """The live records with these keys (absent ones left out) as :meth:`read_encoded`
        gives them, or None (the default) when the store cannot: the core then compares
        decoded values (:meth:`read_keys`, or the whole stream)."""
        return None

    def plan_context(self, spec: StreamSpec) -> Any:
        """What the last read of this stream saw that a restore's writer checks its writes
        against (Redis lists: each session's length), handed to
        :meth:`SourceWriter.planned`.  Default: None."""
        return None

    def read_keys(self, spec: StreamSpec, keys: list) -> Iterator[list[Record]] | None:
        """The live records with these keys (absent ones left out), in key order, or
        None (the default) when the store cannot fetch records by key.

        With :meth:`list_keys`, this lets a restore verify what it wrote by
        re-reading only those records and the stream's key set, instead of the
        whole stream (a store without transactions: see docs/design.md)."""
        return None

    def list_keys(self, spec: StreamSpec) -> Iterator[list] | None:
        """Batches of every live key of the stream in key order, values left out, or
        None (the default)."""
        return None

    def restore_refusal(self, streams: list["PlannedStream"]) -> str | None:
        """For a dry run: why a restore of this plan would be refused before any write (what
        :meth:`SourceWriter.preflight` refuses that the reader can tell), or None."""
        return None

    def outside_references(self, streams: list[str]) -> dict[str, list[str]]:
        """For each of these streams, the store's other streams outside the list that hold
        references to its records (SQL: tables with a foreign key into it): a restore of the
        list that deletes referenced records is refused.  Default: none."""
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


@dataclass
class PlannedStream:
    """What a restore will write to one stream, as :meth:`SourceWriter.preflight` sees it."""

    spec: StreamSpec
    added: int
    modified: int
    deleted: int
    #: the stream is missing from the live store and will be created
    recreate: bool
    #: a callable giving the planned changes as ``(key, op, live value, snapshot value)``
    records: Any


class SourceWriter(ABC):
    """Writes restored records into the live store (used as a context manager).

    For transactional stores, everything done between enter and a clean exit is
    one transaction; an exception rolls it back.  Other stores must make
    ``upsert`` and ``delete`` idempotent so a re-run after a crash converges.
    """

    transactional: bool = False

    #: set by a transactional writer whose database committed the transaction the plan was
    #: made in (MariaDB/MySQL at a CREATE TABLE): the core reads what the plan saw again
    transaction_restarted: bool = False

    @abstractmethod
    def prepare(self, spec: StreamSpec) -> None:
        """Make the live stream ready for ``spec``: recreate it when missing,
        raise :class:`~snapshotter.errors.SchemaMismatch` listing the
        differences when it exists with another schema."""

    @abstractmethod
    def upsert(self, spec: StreamSpec, records: list[Record]) -> None:
        """Insert or replace these records (one batch)."""

    @abstractmethod
    def delete(self, spec: StreamSpec, keys: list[Key]) -> None:
        """Remove records by key (one batch); missing keys are not an error."""

    def finish(self, spec: StreamSpec) -> None:
        """Called for every prepared stream of the source after all its records are
        written and before the commit: a writer that recreated the stream adds what
        must come after the records (a SQL table's foreign keys and triggers, its
        sequences set past the restored maximum) and checks the recreated definition
        (:class:`~snapshotter.errors.IntegrityError` rolls the restore back).  Default:
        nothing."""

    def upsert_encoded(self, spec: StreamSpec, encoding: dict, records: list[bytes]) -> bool:
        """Insert or replace records given in the stream's own encoding (one batch);
        False (the default) when the writer cannot, and the core then calls
        :meth:`upsert` with decoded records."""
        return False

    def planned(self, spec: StreamSpec, sessions: Sequence[str] | None, context: Any) -> None:
        """Before this writer writes a stream: the restore (or reapply) decided what to write
        from a read of ``sessions``' records only (None: every record), and
        :meth:`SourceReader.plan_context` of that read is ``context``.  A writer that scopes
        its writes to what was read (a ``--session`` restore) or checks them against what
        was seen keeps it.  Default: nothing."""

    def restore_settings(self, spec: StreamSpec, seen: dict) -> None:
        """Put back the stream settings :meth:`SourceBackend.settings_differences` reported;
        ``seen`` is the live schema the plan saw: settings changed since are refused
        (:class:`~snapshotter.errors.Refused`), not overwritten unquarantined."""

    def expect(self, spec: StreamSpec, records: Iterable[tuple[Key, str, Any]]) -> bool:
        """What the restore planned over, before it writes: ``(key, op, live value)`` of
        every record it will change, as an iterable that only a writer which checks reads
        (op ``added``/``modified``: the live value it saw; ``deleted``: the key was absent).  A store without transactions checks, as it
        writes and atomically where it can, that the live records are still these, and
        raises :class:`~snapshotter.errors.Refused` if one changed (a write racing the
        restore would otherwise be overwritten without being quarantined).  False (the
        default): the core re-reads the records by key itself just before writing
        (:meth:`SourceReader.read_keys`).  Not called for transactional writers, which
        plan and write in one transaction."""
        return False

    def preflight(self, streams: list[PlannedStream]) -> None:
        """The whole plan of this source (every selected stream, written or not), before the
        quarantine is committed and anything is written: raise
        :class:`~snapshotter.errors.UsageError` for a restore the store cannot do exactly
        (a SQL trigger that cannot be kept from firing, a write that would cascade into
        rows outside the selection)."""

    def write_order(self, specs: list[StreamSpec]) -> list[StreamSpec]:
        """The streams in the order their records may be inserted (parents before children);
        deletes run in the reverse order.  Default: as given."""
        return list(specs)

    def check_selection(self) -> None:
        """Called once every source's :meth:`preflight` has run (sources sharing a database share
        its transaction): refuse writes that would reach records outside the whole selection."""

    def write_mode(self) -> str:
        """How the core orders a source's writes: "delete-first" (the default: every ``added``
        record deleted, children first, then modified and deleted ones written back, parents
        first); "replace" (modified records are deleted with the added ones and written back
        with the deleted ones: nothing in the store reacts to a delete); "update-in-place"
        (modified records written first, then added ones deleted, then deleted ones inserted:
        a delete of a live row would make the store act on rows that reference it)."""
        return "delete-first"

    def check_writes(self) -> list[str]:
        """Transactional stores, before the commit: what the store changed besides the
        restore's own writes (a trigger, a cascade) or what no longer holds (a foreign key).
        A non-empty list rolls the restore back (exit 3)."""
        return []

    def reader(self) -> SourceReader | None:
        """For transactional stores: a reader inside this writer's transaction.

        Restore then plans, applies and verifies in that one transaction, so a
        write racing the restore cannot slip between plan and apply, and a
        failed verification rolls everything back.  None (the default) makes
        the core plan with a separate point-in-time reader.
        """
        return None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        self.close()

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


class SourceBackend(ABC):
    """A kind of source. One instance per configured ``[sources.NAME]``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[Sequence[Option]] = ()
    #: ``--session`` selection is meaningful (conversation stores)
    supports_sessions: ClassVar[bool] = False
    #: set by ``restore --create-missing``: a store that is gone (a SQLite database file) may
    #: be created by the restore's writer instead of being refused
    create_missing: bool = False

    #: record encodings this backend's readers write (:meth:`SourceReader.read_encoded`):
    #: format -> ``"module:Class"`` of its :class:`~snapshotter.encoding.RecordCodec`, imported
    #: when a repository's stream names the format (a command that only reads the repository too)
    encodings: ClassVar[dict[str, str]] = {}

    #: set by a restore whose operator trusts the repository (``--trust-repository-sql``):
    #: SQL text stored in it may then be executed (docs/design.md, threat model)
    trust_repository_sql: bool = False

    def __init__(self, source_name: str, options: dict[str, Any]):
        self.source_name = source_name
        self.config = options

    @abstractmethod
    def location(self) -> str:
        """Where the source is, for manifests and messages, without secrets."""

    @abstractmethod
    def reader(self) -> SourceReader:
        """A point-in-time reader (a context manager)."""

    @abstractmethod
    def writer(self) -> SourceWriter:
        """A writer for restore and re-apply (a context manager)."""

    # -- optional knowledge of the store; the defaults suit exact stores ---------

    def same_value(self, spec: StreamSpec, live: Any, expected: Any) -> bool:
        """Whether a live record value is the expected one: both :data:`ABSENT`, or equal
        encodings, or equal by this backend's rule (:meth:`values_equal`)."""
        if live is ABSENT or expected is ABSENT:
            return live is expected
        return codec.pack(live) == codec.pack(expected) or self.values_equal(spec, live, expected)

    def values_equal(self, spec: StreamSpec, a: Any, b: Any) -> bool:
        """Whether a live value counts as the snapshot's value.

        Used only when a restored stream's digest differs from the snapshot's;
        a backend whose store perturbs values on a write/read round trip (Chroma
        with cosine space) relaxes this, within a documented bound.
        """
        return False

    def settings_differences(self, snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        """Stream settings (not records, not the schema a restore refuses to change) that
        differ from the snapshot's and that a restore puts back with
        :meth:`SourceWriter.restore_settings`; the incident keeps the live ones (its
        stream's ``schema``).  Default: none."""
        return []

    def schema_differences(self, snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        """Why the live stream cannot take the snapshot's records as they are
        (empty when it can). Restore refuses, exit 2, before any write."""
        return []

    def recreate_omissions(self, spec: StreamSpec, reader: SourceReader) -> list[str]:
        """The stream is missing and a restore will recreate it from ``spec``: what the
        recreated stream will lack (shown in the plan), after checking what the
        repository says where a recreate depends on it (raise
        :class:`~snapshotter.errors.IntegrityError` for what cannot be used).  Default: []."""
        return []

    def written_at(self, spec: StreamSpec, key: Key, value: Any) -> _dt.datetime | None:
        """When the store says this record was written, if it knows."""
        return None

    def session_of(self, spec: StreamSpec, key: Key, value: Any) -> str | None:
        """The conversation session a record belongs to, if any."""
        return None

    def session_field(self, spec: StreamSpec) -> str | None:
        """The field of a record (of a store's own encoding) that holds its session, when
        :meth:`session_of` is that field's text: the core then selects a session's
        encoded records by reading that field alone.  Default: None (records are decoded
        and :meth:`session_of` asked)."""
        return None


# -- registry -------------------------------------------------------------------

def _plugin_entry_points() -> dict[str, Any]:
    from importlib import metadata
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in BUILTIN_BACKENDS}


def available_backends() -> list[str]:
    """Every backend name: the built-in ones and those installed plugins register."""
    return sorted({*BUILTIN_BACKENDS, *_plugin_entry_points()})


def _import_ref(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def load_backend(name: str, *, where: str = "") -> type[SourceBackend]:
    try:
        if name in BUILTIN_BACKENDS:
            cls = _import_ref(BUILTIN_BACKENDS[name])
        else:
            eps = _plugin_entry_points()
            if name not in eps:
                known = ", ".join(sorted({*BUILTIN_BACKENDS, *eps}))
                raise ConfigError(f"{where}unknown backend {name!r} (installed: {known})")
            cls = eps[name].load()
    except ImportError as exc:
        raise ConfigError(f"{where}backend {name!r} cannot be loaded: {exc} "
                          f"(is its optional dependency installed?)") from exc
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's module may fail in any way when imported
        raise ConfigError(f"{where}backend {name!r} cannot be loaded: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from exc
    if not (isinstance(cls, type) and issubclass(cls, SourceBackend)):
        raise ConfigError(f"{where}entry point {name!r} is not a snapshotter source backend")
    return cls


def encoding_codec(fmt: str) -> type | None:
    """The codec class of a record encoding that an installed backend declares
    (:attr:`SourceBackend.encodings`), or None.  Built-in backends are asked first; their
    modules import their stores' client libraries lazily, so this needs none of them."""
    def declared(names) -> type | None:
        for name in names:
            try:
                cls = load_backend(name)
            except ConfigError:  # a plugin that cannot be loaded declares nothing usable
                continue
            ref = getattr(cls, "encodings", {}).get(fmt)
            if ref:
                try:
                    return _import_ref(ref)
                except ImportError as exc:
                    from .errors import IntegrityError
                    raise IntegrityError(f"record encoding {fmt!r} (backend {name!r}) cannot be loaded: {exc}") from exc
        return None
    return declared(BUILTIN_BACKENDS) or declared(sorted(_plugin_entry_points()))


def validate_options(cls: type[SourceBackend], raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a ``[sources.NAME]`` table against the backend's options."""
    known = {o.name: o for o in cls.options}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "backend":
            continue
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown option for backend {cls.name!r} "
                              f"(known: {', '.join(sorted(known))})")
        opt = known[key]
        if opt.type is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key}: expected a list of strings")
        elif opt.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}: expected true or false")
        elif opt.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}.{key}: expected an integer")
        elif opt.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{key}: expected a number")
            value = float(value)
        elif opt.type is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table")
        elif not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: expected a string")
        if opt.check is not None:
            problem = opt.check(value)
            if problem:
                raise ConfigError(f"{where}.{key}: {problem} (got {value!r})")
        out[key] = value
    for opt in cls.options:
        if opt.name not in out:
            if opt.required:
                raise ConfigError(f"{where}.{opt.name}: missing (required by backend {cls.name!r})")
            out[opt.name] = opt.default
    return out


def iter_keys(records: Iterable[Record]) -> Iterator[Key]:
    for key, _ in records:
        yield key


def key_problem(reader: "SourceReader", spec: StreamSpec | None) -> str | None:
    """:meth:`SourceReader.key_problem`, asked on the way to reporting an error: a failure
    to tell is None (the original error is reported then)."""
    if spec is None:
        return None
    try:
        return reader.key_problem(spec)
    except Exception:  # noqa: BLE001 - the error being reported matters more
        return None


def read_ahead(batches: Iterator, depth: int = 2, name: str = "read-ahead") -> Iterator:
    """``batches`` produced by a worker thread up to ``depth`` ahead of the caller (a store
    whose reads release the GIL: Chroma's fetches, SQLite's steps), its errors raised in
    the caller; the worker stops and ``batches`` is closed when the caller stops early."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not hand_over(("batch", batch)):
                    return
            hand_over(("done", None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            hand_over(("error", exc))
        finally:
            batches.close()

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
