"""A reference source backend, ``jsonfile``: the smallest complete plugin, to copy.

The store is one JSON file holding named *streams* of records::

    {"streams": {"notes": {"settings": {"owner": "agent"},
                           "records": [["kb-1", {"body": "refunds need a receipt"}], ...]}}}

:class:`JsonFileStore` is the store and its client (what the agent writes with);
:class:`JsonFileBackend` is the plugin.  It passes the source-backend conformance
suite (``tests/conformance``, see docs/conformance.md), which is the contract;
what follows says what each part must guarantee and how this store meets it.

Registering: a plugin package names its backend class under the entry-point group
the built-in backends use, and ``snapshotter backends`` lists it::

    [project.entry-points."snapshotter.backends"]
    jsonfile = "my_package.backend:JsonFileBackend"

**Records.**  A stream hands the core ``(key, value)`` pairs.  ``key`` is a scalar
or a list of scalars (a composite key), unique in the stream; ``value`` is the
record as JSON-like data (dicts, lists, str, int, float, bool, None; also bytes,
datetimes, decimals, UUIDs and float32 numpy vectors: :mod:`snapshotter.codec`).
A value must come back from the store as it went in: the core compares encoded
bytes, so a value read back with another dict order or type would look modified
to every later restore.  JSON keeps both here.

**Reader** (:class:`JsonFileReader`): a point-in-time read of the whole source.

* ``streams()`` lists the configured streams; one configured but missing is
  :class:`~snapshotter.errors.NotFound` (a typo must not snapshot nothing).
* ``read(spec)`` yields batches of records in *strictly ascending key order*
  (Python's ordering: code points for text), bounded in size.  The core merges
  live and snapshot records by key without sorting them itself.
* ``consistency`` says what the read got: ``snapshot-isolation`` (one point in
  time, as here: the file is replaced atomically and loaded once per reader),
  ``checked`` (the store cannot freeze a read, but a check after it found no
  change) or ``best-effort`` (it changed during the read).  A reader that can tell
  a stream changed while it read it may raise
  :class:`~snapshotter.backend.StreamChanged` when ``restartable`` is set, and the
  core reads that stream again.
* ``read_keys`` and ``list_keys`` (optional, both or neither) read records by key
  and list every key in order.  With them a restore checks, just before it
  writes, that what it planned over is unchanged, and verifies by re-reading only
  what it wrote plus the key set, instead of the whole stream.

**Writer** (:class:`JsonFileWriter`): restores and re-applies quarantined records.

* ``prepare(spec)`` makes the stream ready: recreates it from ``spec.schema``
  when it is missing, raises :class:`~snapshotter.errors.SchemaMismatch` when it
  exists with other settings.
* ``upsert`` / ``delete`` write batches; a missing key is not an error for
  ``delete``.  Both must be idempotent: a restore that stopped half-way (a crash,
  a kill) is run again and must converge on the snapshot.
* A store without transactions (``transactional = False``) must never overwrite
  a record that changed after the restore planned: that change was not
  quarantined.  ``expect`` hands the writer what the plan saw for every record it
  will change; the writer refuses (:class:`~snapshotter.errors.Refused`, exit 6)
  when a record no longer holds it.  This store checks and writes in one step
  under its file lock at ``commit``, so a refused restore writes nothing.  A store
  that cannot do that returns False from ``expect`` (the default) and the core
  re-reads the records by key (``read_keys``) just before the first write.
* A transactional store (SQL) sets ``transactional = True`` and returns a reader
  inside its transaction from ``reader()``: the restore then plans, writes and
  verifies in that one transaction, and ``expect`` is not called.

**Backend** (:class:`JsonFileBackend`): ``options`` declares the configuration
keys (checked before any I/O, a bad one is exit 2), ``location()`` names the
store without secrets (it goes into manifests), ``timeout`` bounds every wait.
Optional knowledge of the store: ``values_equal`` (a store that perturbs values
on a round trip), ``written_at`` (when a record was written: ``--failure-at``),
``session_of`` with ``supports_sessions`` (``--session``).  Translate the store's
own exceptions to :mod:`snapshotter.errors` at this boundary: an error is one
line on the user's terminal.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time
from typing import Any, Iterable, Iterator, Sequence

from snapshotter import codec
from snapshotter.backend import (ABSENT, Option, SourceBackend, SourceReader, SourceWriter, StreamSpec,
                                 timeout_option)
from snapshotter.errors import NotFound, Refused, SchemaMismatch, SourceError
from snapshotter.timeouts import timed_out

BATCH = 500


# -- the store ------------------------------------------------------------------------

class JsonFileStore:
    """A JSON file of streams; every change is a read-modify-write under an exclusive
    lock, published by an atomic rename, so a reader loads one whole version."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def load(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            raise SourceError(f"no store at {self.path}") from None
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read the store at {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def change(self, create: bool = False) -> Iterator[dict]:
        """The document, locked against other writers; written back when the block ends
        without an error.  ``create``: a missing file starts as an empty store."""
        try:
            lock = open(self.path + ".lock", "a")
        except OSError as exc:
            raise SourceError(f"cannot lock the store at {self.path}: {exc}") from exc
        with lock:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        raise SourceError(timed_out(f"cannot lock the store at {self.path}", self.timeout)) from exc
                    time.sleep(0.01)
            doc = {"streams": {}} if create and not self.exists() else self.load()
            yield doc
            folder = os.path.dirname(os.path.abspath(self.path))
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".store-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(doc, fh, ensure_ascii=False)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


# -- the plugin -----------------------------------------------------------------------

class JsonFileBackend(SourceBackend):
    name = "jsonfile"
    description = "streams of JSON records in one file (the reference plugin)"
    options = (
        Option("path", str, required=True, help="the store's file (relative to the config file)"),
        Option("streams", list, help="streams to capture (default: every stream)"),
        timeout_option("seconds to wait for the store's lock"),
    )

    def store(self) -> JsonFileStore:
        path = os.path.join(getattr(self, "base_dir", None) or os.getcwd(), self.config["path"])
        return JsonFileStore(os.path.normpath(path), self.config["timeout"])

    def location(self) -> str:
        return self.store().path

    def reader(self) -> "JsonFileReader":
        return JsonFileReader(self)

    def writer(self) -> "JsonFileWriter":
        return JsonFileWriter(self)

    def schema_differences(self, snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        # checked by the plan, so a restore onto a changed stream is refused before any write
        return settings_differences(snapshot.schema, live.schema)


def settings_differences(snapshot: dict, live: dict) -> list[str]:
    if snapshot.get("settings") == live.get("settings"):
        return []
    return [f"stream settings: {snapshot.get('settings')!r} in the snapshot, {live.get('settings')!r} live"]


class JsonFileReader(SourceReader):
    consistency = "snapshot-isolation"

    def __init__(self, backend: JsonFileBackend):
        self.b = backend
        self.doc = backend.store().load()["streams"]  # every stream read from this one version

    def streams(self) -> list[StreamSpec]:
        wanted = self.b.config.get("streams")
        missing = [name for name in wanted or () if name not in self.doc]
        if missing:
            raise NotFound(f"source {self.b.source_name!r}: no stream {', '.join(missing)} in {self.b.location()}")
        return [StreamSpec(name, {"settings": self.doc[name].get("settings", {})})
                for name in (wanted or sorted(self.doc))]

    def live_spec(self, name: str) -> StreamSpec | None:
        stream = self.doc.get(name)
        return None if stream is None else StreamSpec(name, {"settings": stream.get("settings", {})})

    def _sorted(self, name: str) -> list[list]:
        records = self.doc.get(name, {}).get("records", [])
        try:
            return sorted(records, key=lambda record: record[0])
        except TypeError:
            # keys Python cannot order (a number and a text in one stream): no key order to hand over
            raise SourceError(f"stream {name!r}: keys of different types cannot be put in order") from None

    def read(self, spec: StreamSpec, sessions: Sequence[str] | None = None) -> Iterator[list]:
        records = self._sorted(spec.name)
        for start in range(0, len(records), BATCH):
            yield [(key, value) for key, value in records[start:start + BATCH]]

    def read_keys(self, spec: StreamSpec, keys: list) -> Iterator[list]:
        wanted = {codec.pack(k) for k in keys}
        found = [(key, value) for key, value in self._sorted(spec.name) if codec.pack(key) in wanted]
        for start in range(0, len(found), BATCH):
            yield found[start:start + BATCH]

    def list_keys(self, spec: StreamSpec) -> Iterator[list]:
        keys = [key for key, _ in self._sorted(spec.name)]
        for start in range(0, len(keys), BATCH):
            yield keys[start:start + BATCH]


class JsonFileWriter(SourceWriter):
    """Collects the restore's writes and applies them in one locked step at ``commit``,
    after checking every record the plan expects; ``rollback`` drops them."""

    transactional = False

    def __init__(self, backend: JsonFileBackend):
        self.b = backend
        self.create: dict[str, dict] = {}  # streams to recreate: name -> schema
        self.writes: list[tuple[str, Any, Any]] = []  # (stream, key, value or ABSENT), in call order
        self.expected: list[tuple[StreamSpec, Any, Any]] = []  # (stream, key, value the plan saw or ABSENT)

    def prepare(self, spec: StreamSpec) -> None:
        store = self.b.store()
        if not store.exists() and self.b.create_missing:
            self.create[spec.name] = spec.schema  # restore --create-missing: the file comes back
            return
        live = store.load()["streams"].get(spec.name)
        if live is None:
            self.create[spec.name] = spec.schema
            return
        diffs = settings_differences(spec.schema, {"settings": live.get("settings", {})})
        if diffs:
            raise SchemaMismatch(f"source {self.b.source_name!r}: stream {spec.name} changed since the snapshot: "
                                 + "; ".join(diffs))

    def expect(self, spec: StreamSpec, records: Iterable[tuple[Any, str, Any]]) -> bool:
        self.expected.extend((spec, key, ABSENT if op == "deleted" else value) for key, op, value in records)
        return True  # checked at commit, in the same locked step as the writes

    def upsert(self, spec: StreamSpec, records: list) -> None:
        self.writes.extend((spec.name, key, value) for key, value in records)

    def delete(self, spec: StreamSpec, keys: list) -> None:
        self.writes.extend((spec.name, key, ABSENT) for key in keys)

    def commit(self) -> None:
        if not (self.create or self.writes):
            return
        with self.b.store().change(create=self.b.create_missing) as doc:
            streams = doc["streams"]
            # every stream as packed key -> [key, value]: keys compare by their encoding
            live = {name: {codec.pack(k): [k, v] for k, v in s["records"]} for name, s in streams.items()}
            for spec, key, value in self.expected:
                now = live.get(spec.name, {}).get(codec.pack(key), (key, ABSENT))[1]
                if not self.b.same_value(spec, now, value):
                    raise Refused(f"source {self.b.source_name!r} stream {spec.name!r}: record "
                                  f"{codec.key_text(key)} changed after the restore planned it (it was not "
                                  f"quarantined); nothing was written: run the restore again")
            for name, schema in self.create.items():
                if name not in streams:
                    streams[name] = {"settings": schema.get("settings", {}), "records": []}
                    live[name] = {}
            gone = sorted({name for name, _, _ in self.writes} - set(streams))
            if gone:
                raise Refused(f"source {self.b.source_name!r}: stream {', '.join(gone)} was removed after the "
                              f"restore prepared it; nothing was written: run the restore again")
            for name, key, value in self.writes:
                if value is ABSENT:
                    live[name].pop(codec.pack(key), None)
                else:
                    live[name][codec.pack(key)] = [key, value]
            for name in {name for name, _, _ in self.writes}:
                streams[name]["records"] = list(live[name].values())
        self.rollback()

    def rollback(self) -> None:
        self.create.clear()
        self.writes.clear()
        self.expected.clear()
