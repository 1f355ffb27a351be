"""The default record codec: ``[key, value]`` msgpack arrays (:mod:`snapshotter.codec`),
the records of every stream whose manifest entry has no ``encoding``.  It has no
document and is not in the registry by format: the absence of ``encoding`` names it."""
from __future__ import annotations

import hashlib
from typing import Any, Iterator

import msgpack

from .. import codec
from . import RecordCodec

_blake2b = hashlib.blake2b


def _unpacker(raw: bytes, start: int = 0) -> msgpack.Unpacker:
    u = msgpack.Unpacker(None, raw=False, strict_map_key=False, unicode_errors=codec.UNICODE_ERRORS, use_list=True,
                         max_buffer_size=max(len(raw), 1 << 20))
    u.feed(raw[start:] if start else raw)
    return u


def fix_key(key: Any) -> Any:
    """A key decoded without the ext hook (for speed), decoded properly where it is typed."""
    if isinstance(key, msgpack.ExtType) or (isinstance(key, list) and any(isinstance(k, msgpack.ExtType) for k in key)):
        return codec.unpack(codec.pack(key))
    return key


class MsgpackRecords(RecordCodec):
    """``b"\\x92" + pack(key) + pack(value)``; a chunk ends after a record whose packed key
    hashes (blake2b, 8 bytes, little-endian) to 0 mod D."""

    format = "msgpack"

    def key_bytes(self, record: bytes) -> bytes:
        u = _unpacker(record)
        u.read_array_header()
        u.skip()
        return record[1:u.tell()]

    def boundary_hash(self, key_bytes: bytes) -> int:
        return int.from_bytes(_blake2b(key_bytes, digest_size=8).digest(), "little")

    def iter_records(self, raw: bytes) -> Iterator[bytes]:
        u = _unpacker(raw)
        start = 0
        while True:
            try:
                u.skip()
            except msgpack.OutOfData:
                if start != len(raw):
                    raise ValueError("chunk does not end with a complete record") from None
                return
            end = u.tell()
            yield raw[start:end]
            start = end

    def count_records(self, raw: bytes) -> int:
        u = _unpacker(raw)
        n = 0
        try:
            while True:
                u.skip()
                n += 1
        except msgpack.OutOfData:
            return n

    def record_end(self, raw: bytes, start: int) -> int:
        u = _unpacker(raw, start)
        u.skip()
        return start + u.tell()

    def key(self, record: bytes) -> Any:
        u = _unpacker(record)
        u.read_array_header()
        return fix_key(u.unpack())

    def decode(self, record: bytes) -> tuple[Any, Any]:
        key, value = codec.unpack(record)
        return key, value


MSGPACK = MsgpackRecords(None)
