"""The repository's JSON documents as types: snapshot manifests, their source and
stream entries and chunk rows, incident bundles and known-good marks.

This module mirrors ``docs/design.md`` ("Snapshot manifest", "Incident bundle",
the layout's ``good/``): one frozen class per stored document or part of one.
``from_json`` is the one place a document read from a repository, which anyone
with write access may have edited, is checked; ``to_json`` gives back the JSON
object these documents are written as, member for member and in the same order
(so the bytes a repository holds do not depend on whether a document went
through these classes).  Members a class does not name (a newer writer's, or
someone else's) are kept in ``extra`` and written back where they were.

Classes here know nothing of object stores or names of objects: a loader
(:mod:`snapshotter.repository`, :mod:`snapshotter.quarantine`) reads the bytes,
parses them with ``load_json`` and turns a :class:`DocumentError` into its
error naming the object.

``doc`` is the plain JSON object of a document (the one it was read from, or
``to_json()``): the bridge for code that still reads documents as dicts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, NamedTuple

#: the format of a new snapshot manifest: 4 (MariaDB/MySQL and SQLite streams may be stored in
#: the ``mytext`` and ``sqltext`` record encodings, which an older reader does not know; 3: a SQL
#: stream's schema may hold the table's stored definition, ``ddl``)
MANIFEST_FORMAT = 4
#: the manifest formats this snapshotter reads
READABLE_FORMATS = (1, 2, 3, 4)
#: the format of an incident bundle (its own numbering, docs/design.md "Format versions")
BUNDLE_FORMAT = 1


_LOWER_HEX = re.compile(r"[0-9a-f]*").fullmatch


class DocumentError(ValueError):
    """A document no command can use; the text says why, the reader adds which object."""


class UnreadableFormat(DocumentError):
    """A document of a format this snapshotter does not read (a usage error, not damage)."""


def chunk_id_ok(chunk_id: Any, hex_digits: int = 64) -> bool:
    """A chunk id is the lowercase hex of the repository's hash, nothing else (so no
    reference can name an object outside ``chunks/``)."""
    return isinstance(chunk_id, str) and len(chunk_id) == hex_digits and _LOWER_HEX(chunk_id) is not None


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


class ChunkRow(NamedTuple):
    """One row of a stream's ``chunks``: ``[id, records, plaintext bytes, stored bytes]``."""

    id: str
    records: int
    raw_bytes: int
    stored_bytes: int

    def to_json(self) -> list:
        return list(self)

    @classmethod
    def from_json(cls, row: Any, hash_digits: int = 64, *, where: str = "stream", index: int = 0) -> "ChunkRow":
        if not (isinstance(row, list) and len(row) == 4 and all(_count(v) for v in row[1:])):
            raise DocumentError(f"{where}: chunk row {index} is not [id, records, bytes, stored bytes]")
        if not chunk_id_ok(row[0], hash_digits):
            raise DocumentError(f"{where}: chunk row {index} names {str(row[0])[:80]!r}, not a chunk id")
        return tuple.__new__(cls, row)


class _Document:
    """What every document class shares: members written in a fixed order (or the order
    they were read in), unknown members kept, the plain-JSON bridge."""

    #: the members this class names, in the order a new document is written
    MEMBERS: ClassVar[tuple[str, ...]] = ()
    #: members a new document leaves out while they are None (the others are written as null)
    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()

    extra: Mapping[str, Any]
    order: tuple[str, ...] | None

    def _member_json(self, name: str, value: Any) -> Any:
        return value

    def to_json(self) -> dict[str, Any]:
        """The document as the JSON object it is (and was) written as."""
        out: dict[str, Any] = {}
        if self.order is None:
            for name in self.MEMBERS:
                value = getattr(self, name)
                if value is None and name in self.OMITTED_WHEN_NONE:
                    continue
                out[name] = self._member_json(name, value)
            out.update(self.extra)
            return out
        for name in self.order:
            if name in self.extra:
                out[name] = self.extra[name]
            else:
                out[name] = self._member_json(name, getattr(self, name))
        return out

    @property
    def doc(self) -> dict[str, Any]:
        """The plain JSON object (the very one read, for a document read from a repository)."""
        doc = self.__dict__.get("_doc")
        if doc is None:
            doc = self.to_json()
            object.__setattr__(self, "_doc", doc)
        return doc

    @classmethod
    def _split(cls, doc: dict) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
        """(named members, extra members, member order) of a JSON object."""
        known = {k: v for k, v in doc.items() if k in cls.MEMBERS}
        extra = {k: v for k, v in doc.items() if k not in cls.MEMBERS}
        return known, extra, tuple(doc)

    def _keep(self, doc: dict) -> "_Document":
        object.__setattr__(self, "_doc", doc)
        return self


@dataclass(frozen=True, eq=False)
class StreamEntry(_Document):
    """A stream of a snapshot: its chunks in order, the sums of their rows, the digest of
    its records, the backend's schema, and (streams kept in a backend's own record codec) its ``encoding``.

    An incident bundle's stream is the same entry with ``counts`` (records per op),
    ``snapshot_schema`` (the live ``schema`` is the one the restore replaced) and, for
    records kept in a backend's codec, ``raw_encoding``."""

    MEMBERS: ClassVar = ("records", "bytes", "stored_bytes", "digest", "chunking", "chunks", "encoding",
                         "schema", "counts", "snapshot_schema", "raw_encoding")
    OMITTED_WHEN_NONE: ClassVar = frozenset({"encoding", "counts", "snapshot_schema", "raw_encoding"})

    records: int | None = None  # None: the member is missing (a damaged entry)
    bytes: int | None = None
    stored_bytes: int | None = None
    digest: Any = None  # "<hash>:<hex>"; checked against the repository's hash where it is used
    chunking: Mapping[str, Any] | None = None
    chunks: tuple[ChunkRow, ...] = ()
    encoding: Mapping[str, Any] | None = None
    schema: Any = None
    counts: Mapping[str, Any] | None = None
    snapshot_schema: Any = None
    raw_encoding: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def records_per_boundary(self) -> int | None:
        return self.chunking.get("records_per_boundary") if isinstance(self.chunking, Mapping) else None

    def _member_json(self, name: str, value: Any) -> Any:
        return [list(row) for row in value] if name == "chunks" else value

    @classmethod
    def from_json(cls, doc: Any, hash_digits: int = 64, *, where: str = "stream") -> "StreamEntry":
        if not isinstance(doc, dict):
            raise DocumentError(f"{where} is not an object")
        for name in ("records", "bytes"):
            if name in doc and not _count(doc[name]):
                raise DocumentError(f"{where}: {name} is not a count")
        rows = doc.get("chunks", [])
        if not isinstance(rows, list):
            raise DocumentError(f"{where}: chunks is not a list")
        chunks = tuple(ChunkRow.from_json(row, hash_digits, where=where, index=i) for i, row in enumerate(rows))
        known, extra, order = cls._split(doc)
        known["chunks"] = chunks
        return cls(**known, extra=extra, order=order)._keep(doc)


@dataclass(frozen=True, eq=False)
class SourceEntry(_Document):
    """A source of a snapshot (or of an incident bundle): its backend, its redacted
    location, the consistency its read got (snapshots only), its streams by name."""

    MEMBERS: ClassVar = ("backend", "location", "streams", "consistency")
    OMITTED_WHEN_NONE: ClassVar = frozenset({"consistency"})

    backend: Any = None
    location: Any = None
    streams: Mapping[str, StreamEntry] = field(default_factory=dict)
    consistency: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def _member_json(self, name: str, value: Any) -> Any:
        return {k: st.to_json() for k, st in value.items()} if name == "streams" else value

    @classmethod
    def from_json(cls, doc: Any, hash_digits: int = 64, *, name: str = "") -> "SourceEntry":
        if not isinstance(doc, dict) or not isinstance(doc.get("streams", {}), dict):
            raise DocumentError(f"source {name} is not an object with streams")
        streams = {stname: StreamEntry.from_json(st, hash_digits, where=f"stream {name}/{stname}")
                   for stname, st in doc.get("streams", {}).items()}
        known, extra, order = cls._split(doc)
        known["streams"] = streams
        return cls(**known, extra=extra, order=order)._keep(doc)


def _sources_from_json(doc: dict, hash_digits: int) -> dict[str, SourceEntry]:
    sources = doc.get("sources", {})
    if not isinstance(sources, dict):
        raise DocumentError("sources is not an object")
    return {sname: SourceEntry.from_json(src, hash_digits, name=sname) for sname, src in sources.items()}


class _HasStreams:
    sources: Mapping[str, SourceEntry]

    def iter_streams(self) -> Iterator[tuple[str, str, StreamEntry]]:
        """(source, stream, entry) of every stream, in document order."""
        for sname, src in self.sources.items():
            for stname, st in src.streams.items():
                yield sname, stname, st

    def stream(self, source: str, stream: str) -> StreamEntry:
        """One stream's entry (KeyError when the document has none)."""
        return self.sources[source].streams[stream]


@dataclass(frozen=True, eq=False)
class Manifest(_HasStreams, _Document):
    """A snapshot manifest, ``snapshots/<release>/<id>.json``; committed by being written."""

    MEMBERS: ClassVar = ("format", "id", "release", "taken_at", "labels", "note", "host", "user",
                         "tool_version", "sources", "bytes_written", "bytes_reused", "duration_seconds")

    format: Any = MANIFEST_FORMAT
    id: str = ""
    release: str = ""
    taken_at: str | None = None  # ISO 8601 text as stored (snapshotter.names.parse_iso reads it)
    labels: Mapping[str, Any] | None = field(default_factory=dict)
    note: str | None = None
    host: str | None = None
    user: str | None = None
    tool_version: str | None = None
    sources: Mapping[str, SourceEntry] = field(default_factory=dict)
    bytes_written: int = 0
    bytes_reused: int = 0
    duration_seconds: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def _member_json(self, name: str, value: Any) -> Any:
        return {k: src.to_json() for k, src in value.items()} if name == "sources" else value

    @classmethod
    def from_json(cls, doc: Any, hash_digits: int = 64, *, id: str | None = None,
                  release: str | None = None) -> "Manifest":
        """The manifest in ``doc``, checked (docs/design.md, threat model): a manifest with
        a field no command can use counts as corrupt everywhere.  ``id`` and ``release``:
        what its object's name says they are."""
        from .names import parse_iso
        if id is not None or release is not None:
            if not isinstance(doc, dict) or doc.get("id") != id or doc.get("release") != release:
                raise DocumentError("id or release does not match its name")
        if isinstance(doc, dict) and doc.get("format") not in READABLE_FORMATS:
            # a newer format may mean something this reader would get wrong (docs/design.md)
            raise UnreadableFormat(f"has format {repr(doc.get('format'))[:40]}; this snapshotter "
                                   f"reads formats {', '.join(map(str, READABLE_FORMATS))}")
        if not isinstance(doc, dict):
            raise DocumentError("not a JSON object")
        for name in ("id", "release"):
            if name in doc and not isinstance(doc[name], str):
                raise DocumentError(f"{name} is not text")
        if "taken_at" in doc:
            try:
                parse_iso(doc["taken_at"])
            except (ValueError, TypeError, AttributeError, OverflowError):
                raise DocumentError(f"taken_at {str(doc['taken_at'])[:40]!r} is not a time") from None
        if not isinstance(doc.get("labels", {}), dict) and doc.get("labels") is not None:
            raise DocumentError("labels is not an object")
        sources = _sources_from_json(doc, hash_digits)
        known, extra, order = cls._split(doc)
        known["sources"] = sources
        return cls(**known, extra=extra, order=order)._keep(doc)


@dataclass(frozen=True, eq=False)
class IncidentBundle(_HasStreams, _Document):
    """An incident (quarantine) bundle, ``quarantine/<incident>/manifest.json``: every live
    record a restore overwrote or removed, in streams chunked like a snapshot's, with
    who, when and why.  Each stream's records are ``[key, q]`` (docs/design.md)."""

    MEMBERS: ClassVar = ("format", "incident", "snapshot", "release", "created_at", "failure_at", "user",
                         "host", "tool_version", "command", "selection", "continues", "records", "plan",
                         "sources")

    format: Any = BUNDLE_FORMAT
    incident: str = ""
    snapshot: Any = None
    release: Any = None
    created_at: str | None = None
    failure_at: str | None = None
    user: str | None = None
    host: str | None = None
    tool_version: str | None = None
    command: str | None = None
    selection: Mapping[str, Any] | None = field(default_factory=dict)
    continues: Any = field(default_factory=list)
    records: int = 0
    #: source -> stream -> {"added": n, "modified": n, "deleted": n, ...}
    plan: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    sources: Mapping[str, SourceEntry] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    def _member_json(self, name: str, value: Any) -> Any:
        return {k: src.to_json() for k, src in value.items()} if name == "sources" else value

    @classmethod
    def from_json(cls, doc: Any, hash_digits: int = 64, *, incident: str | None = None) -> "IncidentBundle":
        """The bundle in ``doc``, checked; ``incident``: what its object's name says it is."""
        if not isinstance(doc, dict):
            raise DocumentError("not a JSON object")
        if doc.get("format", BUNDLE_FORMAT) != BUNDLE_FORMAT:
            raise UnreadableFormat(f"has format {doc.get('format')!r}, which this snapshotter does not read "
                                   f"(it reads format {BUNDLE_FORMAT})")
        if incident is not None and doc.get("incident") != incident:
            raise DocumentError("incident id does not match its name")
        sources = _sources_from_json(doc, hash_digits)
        known, extra, order = cls._split(doc)
        known["sources"] = sources
        return cls(**known, extra=extra, order=order)._keep(doc)


@dataclass(frozen=True)
class QuarantinedWrite:
    """The value ``q`` of a bundle's record ``[key, q]``: what the restore found live
    (``op`` against the snapshot, the live and the snapshot value, when the store says it
    was written, whether after ``--failure-at``, its conversation session) and, in a
    stream kept in a backend's codec, both as encoded records (``raw``, ``snapshot_raw``).  Stored in the record
    encoding, not as JSON."""

    op: str
    value: Any = None
    snapshot_value: Any = None
    written_at: Any = None
    post_failure: bool | None = None
    session: Any = None
    raw: bytes | None = None
    snapshot_raw: bytes | None = None

    @classmethod
    def from_value(cls, q: Mapping[str, Any]) -> "QuarantinedWrite":
        return cls(q["op"], q.get("value"), q.get("snapshot_value"), q.get("written_at"), q.get("post_failure"),
                   q.get("session"), q.get("raw"), q.get("snapshot_raw"))


@dataclass(frozen=True, eq=False)
class GoodMark(_Document):
    """``good/<snapshot-id>``: the snapshot is known good (present = marked)."""

    MEMBERS: ClassVar = ("snapshot", "release", "marked_at")

    snapshot: str = ""
    release: str = ""
    marked_at: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] | None = field(default=None, compare=False, repr=False)
