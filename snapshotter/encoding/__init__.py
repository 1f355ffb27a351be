"""Record codecs: what the core needs of a stream's record encoding, and the registry
that finds the codec of an encoding document.

A stream's manifest entry without an ``encoding`` member holds msgpack records
(:mod:`snapshotter.codec`, :class:`~.msgpack_records.MsgpackRecords`).  A stream
with one holds records a store wrote itself (a database's own text of a row);
the document's ``format`` names the codec, which a backend provides and declares
(:attr:`snapshotter.backend.SourceBackend.encodings`), so that a command that only
reads the repository (show, diff, export) decodes such streams without a live store.

The core handles records of every encoding as opaque byte strings: it cuts chunks,
counts, merges, compares and verifies through :class:`RecordCodec` and decodes only
where a person looks at records or a store needs values.

This package imports :mod:`snapshotter.codec` and :mod:`snapshotter.errors` only; the
backend registry is asked (lazily) for a format no imported module has registered.
"""
from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable

from ..errors import IntegrityError

__all__ = ["RecordCodec", "register", "codec_for", "codec_class", "same_encoding", "crc32_boundary", "MSGPACK",
           "LineRecords", "split_lines"]


class RecordCodec(ABC):
    """The records of one stream in one encoding (an instance per encoding document).

    Encodings must be canonical: two records are equal exactly when their bytes are
    (plans, dedup and digests compare bytes), and a record is self-delimiting, so
    that bytes equal at a record's start over a run of records are those records."""

    #: the encoding document's ``format``
    format: ClassVar[str] = ""

    #: records in the store's order are in Python's key order (the writer then checks
    #: the order without decoding keys); False: every key is decoded and checked
    keys_ordered: bool = True

    def __init__(self, doc: dict | None):
        self.doc = doc

    @classmethod
    def same_encoding(cls, a: dict, b: dict) -> bool:
        """Whether records of two documents of this format are the same bytes for the same
        record (a live store's records can then be compared with a snapshot's as bytes)."""
        return a == b

    # -- bytes, no decoding --------------------------------------------------------------

    @abstractmethod
    def key_bytes(self, record: bytes) -> bytes:
        """The key's bytes in the record: the chunk boundary hash input, and what identifies
        a record's key among records of this stream without decoding."""

    @abstractmethod
    def boundary_hash(self, key_bytes: bytes) -> int:
        """The hash of a key's bytes whose value ``mod D == 0`` ends a chunk."""

    def chunk_ends(self, records: list[bytes], D: int) -> list[int]:
        """The positions (1-based, ascending) in a batch of records after which a chunk
        ends by the boundary rule; a codec may do this faster than record by record."""
        kb, bh = self.key_bytes, self.boundary_hash
        return [j for j, rec in enumerate(records, 1) if not bh(kb(rec)) % D]

    def block_chunk_ends(self, block: bytes, D: int) -> tuple[int, list[tuple[int, int]]] | None:
        """:meth:`chunk_ends` of a block of whole records without a Python step per record:
        ``(records in the block, [(byte offset just past a record that ends a chunk, records
        up to and including it), ...])``; None (the default) when the codec cannot, and the
        writer splits the block into records."""
        return None

    @abstractmethod
    def iter_records(self, raw: bytes) -> Iterable[bytes]:
        """The records of one chunk, each as its bytes (ValueError: not whole records)."""

    def count_records(self, raw: bytes) -> int:
        """Records in one chunk."""
        return sum(1 for _ in self.iter_records(raw))

    @abstractmethod
    def record_end(self, raw: bytes, start: int) -> int:
        """Where the record that starts at ``start`` of a chunk ends."""

    def whole_records(self, raw: bytes) -> bool:
        """Whether a chunk ends with the end of a record (cheaply; True when it cannot tell)."""
        return True

    def equal(self, a: bytes | None, b: bytes | None) -> bool:
        """Whether two encoded records (None: no record) are the same record."""
        return a == b

    def field_reader(self, name: str) -> Callable[[bytes], bytes | None] | None:
        """A reader of one named field's bytes (None for a null) without decoding the
        record, or None when the encoding cannot read fields one by one."""
        return None

    # -- values --------------------------------------------------------------------------

    @abstractmethod
    def key(self, record: bytes) -> Any:
        """The record's key, as :meth:`decode` gives it."""

    @abstractmethod
    def decode(self, record: bytes) -> tuple[Any, Any]:
        """``(key, value)``."""


def crc32_boundary(key_bytes: bytes) -> int:
    """A boundary hash for codecs whose key bytes are at hand per record (zlib's CRC-32:
    a third of blake2b's cost per record on a path that must keep up with a dump)."""
    return zlib.crc32(key_bytes)


def split_lines(raw: bytes) -> list[bytes]:
    """The lines of a chunk of line records, each with its ``\n`` (a raw ``\n`` only ever
    ends a record; a raw ``\r`` may be inside one, where ``splitlines`` would cut)."""
    if raw and not raw.endswith(b"\n"):
        raise ValueError("chunk does not end with a complete line")
    if b"\r" in raw:
        return [line + b"\n" for line in raw.split(b"\n")[:-1]]
    return raw.splitlines(keepends=True)


class LineRecords(RecordCodec):
    """A codec whose records are lines ended by ``\n`` (a database's text of its rows:
    ``pgtext``, ``mytext``, ``sqltext``), whose chunk boundaries are the CRC-32 of the key's
    bytes: what the three share."""

    boundary_hash = staticmethod(crc32_boundary)

    def iter_records(self, raw: bytes) -> list[bytes]:
        return split_lines(raw)

    def count_records(self, raw: bytes) -> int:
        return raw.count(b"\n")

    def record_end(self, raw: bytes, start: int) -> int:
        return raw.index(b"\n", start) + 1

    def whole_records(self, raw: bytes) -> bool:
        return raw.endswith(b"\n")


_codecs: dict[str, type[RecordCodec]] = {}


def register(cls: type[RecordCodec]) -> type[RecordCodec]:
    """Make a codec class the one of its ``format`` (a decorator)."""
    if not cls.format:
        raise ValueError(f"{cls.__name__} names no format")
    _codecs[cls.format] = cls
    return cls


def codec_class(fmt: Any) -> type[RecordCodec]:
    """The codec class of a format: registered, or declared by an installed backend."""
    cls = _codecs.get(fmt) if isinstance(fmt, str) else None
    if cls is None and isinstance(fmt, str):
        from ..backend import encoding_codec  # the backend registry knows who declares it
        found = encoding_codec(fmt)
        if found is not None:
            cls = register(found) if fmt not in _codecs else _codecs[fmt]
    if cls is None:
        raise IntegrityError(f"unknown record encoding {fmt!r}: no installed backend declares it")
    return cls


def codec_for(doc: dict | None) -> RecordCodec:
    """The codec of an encoding document (a stream entry's ``encoding``; None: msgpack)."""
    if not doc:
        return MSGPACK
    if not isinstance(doc, dict):
        raise IntegrityError("a stream's encoding is malformed (not a document)")
    cls = codec_class(doc.get("format"))
    try:
        return cls(doc)
    except (KeyError, TypeError, ValueError, IndexError):
        raise IntegrityError(f"a stream's {cls.format} encoding document is malformed") from None


def same_encoding(a: dict | None, b: dict | None) -> bool:
    """Whether two encoding documents give the same bytes for the same record (both
    msgpack, or one format and :meth:`RecordCodec.same_encoding`)."""
    if not a or not b:
        return not a and not b
    if not isinstance(a, dict) or not isinstance(b, dict) or a.get("format") != b.get("format"):
        return False
    return codec_class(a.get("format")).same_encoding(a, b)


from .msgpack_records import MSGPACK  # noqa: E402  (the default codec, registered with the others)
