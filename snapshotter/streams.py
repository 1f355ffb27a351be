"""Streams of records to and from chunks.

Writing: records arrive in key order, are encoded (:mod:`codec`), and cut into
chunks at content-defined boundaries chosen from the keys alone: a record ends
a chunk when ``blake2b-64(encoded key) mod D == 0``.  ``D`` (records per
boundary, a power of two) is fixed for a stream by its first snapshot and
inherited by the next ones, so an unchanged run of records between two
boundary keys encodes to the same chunk and is stored once, whatever was
inserted or deleted elsewhere.  A chunk is also cut when it reaches the
repository's ``max_bytes``.  Streams their store hands over already encoded
(a database's own text of its rows) go in through :meth:`StreamWriter.add_encoded`,
with their codec's boundary rule (:mod:`snapshotter.encoding`).

Reading: chunks are fetched ahead in a small thread pool and decoded in order.
"""
from __future__ import annotations

import hashlib
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import codec, hashing
from .documents import ChunkRow, StreamEntry
from .encoding import MSGPACK, RecordCodec, codec_for
from .encoding.msgpack_records import fix_key as _fix_key
from .errors import IntegrityError, KeyOrderError, SourceError
from .repository import Repository

_ESTIMATE_RECORDS = 512


_blake2b = hashlib.blake2b


def boundary_hash(key_bytes: bytes) -> int:
    return int.from_bytes(_blake2b(key_bytes, digest_size=8).digest(), "little")


#: a stream's first snapshot aims at about this many chunks when its size is known
CHUNKS_PER_STREAM = 128


def chunk_target(min_target: int, max_bytes: int, estimated_bytes: int | None) -> int:
    """Bigger streams get bigger chunks (fewer objects), up to half of max_bytes."""
    if not estimated_bytes:
        return min_target
    return int(min(max(min_target, estimated_bytes / CHUNKS_PER_STREAM), max_bytes // 2))


def pick_records_per_boundary(avg_record_bytes: float, target_bytes: int) -> int:
    if avg_record_bytes <= 0:
        return 1
    ideal = max(1.0, target_bytes / avg_record_bytes)
    return int(min(1 << 20, 2 ** round(math.log2(ideal))))


@dataclass
class ChunkRef:
    id: str
    records: int
    raw_bytes: int
    stored_bytes: int

    def to_json(self) -> list:
        return [self.id, self.records, self.raw_bytes, self.stored_bytes]

    @classmethod
    def from_json(cls, row: list) -> "ChunkRef":
        return cls(str(row[0]), int(row[1]), int(row[2]), int(row[3]))


@dataclass
class WriteStats:
    bytes_written: int = 0
    bytes_reused: int = 0
    chunks_written: int = 0
    chunks_reused: int = 0


#: chunk compressors at the most, whatever the host (each holds up to two chunks in flight)
MAX_COMPRESSORS = 8


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, narrowed by a cgroup v2 CPU quota
    (``cpu.max``, what a container's CPU limit sets)."""
    import os
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            n = min(n, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


class ChunkUploader:
    """Compresses and stores chunks in worker threads, a bounded number in flight.

    ``known`` holds chunk ids the repository is known to have (from the parent
    snapshot), which skips even the create-only write for them.
    """

    def __init__(self, repo: Repository, *, workers: int | None = None, known: dict[str, int] | None = None):
        self.repo = repo
        if workers is None:
            # one compressor per CPU: more only thrash the caches (measured: 4 workers on 2
            # CPUs cost a large snapshot 0.25 s more CPU than 2), plus the store's overlap
            workers = min(usable_cpus(), MAX_COMPRESSORS) + repo.store.extra_requests
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk-put")
        self.max_in_flight = workers * 2
        self.known = dict(known or {})
        self.stats = WriteStats()

    def submit(self, raw: bytes, records: int) -> Future:
        # the chunk is hashed by the worker, not here: hashing releases the GIL,
        # and the producing thread then queues behind the workers to take it back,
        # once per chunk (a quarter of a table read's time, measured)
        return self.pool.submit(self._put, raw, records)

    def _put(self, raw: bytes, records: int) -> ChunkRef:
        chunk_id = self.repo.chunk_id(raw)
        # stats are updated from worker threads; += on ints under the GIL is not atomic,
        # so they are tallied by the caller from the returned ref instead (negative
        # stored bytes: the chunk existed already)
        known = self.known.get(chunk_id)
        if known is not None:
            return ChunkRef(chunk_id, records, len(raw), -known)
        _, stored, created = self.repo.put_chunk(raw, chunk_id)
        return ChunkRef(chunk_id, records, len(raw), stored if created else -stored)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class StreamWriter:
    """Encodes one stream's records into chunks; ``finish`` returns its manifest entry."""

    def __init__(self, uploader: ChunkUploader, *, records_per_boundary: int | None = None,
                 on_record: Callable[[int], None] | None = None, estimated_bytes: int | None = None,
                 encoding: dict | None = None):
        self.up = uploader
        #: None: records are msgpack ``[key, value]`` (``add``); an encoding document:
        #: records a store encoded (``add_encoded``), see :mod:`snapshotter.encoding`
        self.encoding = encoding
        self._codec: RecordCodec | None = codec_for(encoding) if encoding else None
        repo = uploader.repo
        self.max_bytes = repo.chunk_max_bytes
        self.target = chunk_target(repo.chunk_target_bytes, self.max_bytes, estimated_bytes)
        self.D = records_per_boundary
        self.digest = repo.new_hash()
        self.records = 0
        self.bytes = 0
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._buf_extra = 0  # records beyond one per item of _buf (blocks of lines: add_encoded_block)
        self._pending_keys: list[bytes] = []  # key bytes of buffered records (only until D is known)
        self._futures: deque[Future] = deque()
        self._chunks: list[ChunkRef] = []
        self._last_key: Any = None
        self._has_last = False
        self.on_record = on_record

    def add(self, key: Any, value: Any) -> None:
        # runs once per record of every stream: lookups are hoisted and the
        # boundary hash inlined (same rule as boundary_hash)
        self._advance_key(key)
        pack = codec.packer().pack
        try:
            kb = pack(key)
            rec = b"\x92" + kb + pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SourceError(f"record {codec.key_text(key)} cannot be encoded: {exc}") from None
        n = len(rec)
        self.records += 1
        self.bytes += n
        # hashed record by record, not chunk by chunk: below hashlib's 2 KiB
        # threshold the main thread keeps the GIL instead of queueing for it
        # behind the chunk workers
        self.digest.update(rec)
        self._buf.append(rec)
        self._buf_bytes += n
        D = self.D
        if D is None:
            self._pending_keys.append(kb)
            if len(self._pending_keys) >= _ESTIMATE_RECORDS or self._buf_bytes >= self.target * 4:
                self._settle_boundary()
            return
        if self._buf_bytes >= self.max_bytes or \
                int.from_bytes(_blake2b(kb, digest_size=8).digest(), "little") % D == 0:
            self._cut()

    def add_encoded(self, lines: list[bytes]) -> None:
        """Add records already in the stream's encoding (a batch), in key order.

        A record ends a chunk by its codec's boundary rule
        (:meth:`~snapshotter.encoding.RecordCodec.chunk_ends`, over the whole batch);
        the work per record is kept to that test, the rest is done per batch."""
        if not lines:
            return
        rc = self._codec
        if not rc.keys_ordered:
            # keys of a type whose database order may differ from Python's are decoded and checked
            for line in lines:
                self._advance_key(rc.key(line))
        self.records += len(lines)
        i = 0
        if self.D is None:
            # until D is chosen, lines are buffered one by one with their key bytes
            for i, line in enumerate(lines, 1):
                self._buf.append(line)
                self._buf_bytes += len(line)
                self.bytes += len(line)
                self._pending_keys.append(rc.key_bytes(line))
                if len(self._pending_keys) >= _ESTIMATE_RECORDS or self._buf_bytes >= self.target * 4:
                    self._settle_boundary()
                    break
            if self.D is None:
                return
        D = self.D
        rest = lines[i:] if i else lines
        # (end of a run of lines, whether that run ends a chunk); lines after the
        # last boundary stay buffered for the next batch
        runs = [(j, True) for j in rc.chunk_ends(rest, D)]
        if not runs or runs[-1][0] != len(rest):
            runs.append((len(rest), False))
        start = 0
        for end, cut in runs:
            part = rest[start:end]
            size = sum(map(len, part))
            self.bytes += size
            if self._buf_bytes + size >= self.max_bytes:
                for line in part:  # rare: records big enough to reach max_bytes first
                    self._buf.append(line)
                    self._buf_bytes += len(line)
                    if self._buf_bytes >= self.max_bytes:
                        self._cut()
            else:
                self._buf.extend(part)
                self._buf_bytes += size
            if cut:
                self._cut()
            start = end

    def add_encoded_block(self, block: bytes) -> None:
        """:meth:`add_encoded` of a block of whole records (bytes), cut where the records
        listed one by one would be: the codec finds the boundaries in the whole block
        (``block_chunk_ends``), so that nothing is done per record in Python.  Blocks it
        cannot do so for, the first records (until D is chosen) and keys whose order must
        be checked one by one go through :meth:`add_encoded`."""
        rc = self._codec
        found = None
        if self.D is not None and rc.keys_ordered:
            found = rc.block_chunk_ends(block, self.D)
        if found is None:
            self.add_encoded(rc.iter_records(block))
            return
        count, cuts = found
        self.records += count
        self.bytes += len(block)
        view = memoryview(block)  # pieces are copied once, into their chunk (_cut's join)
        start = done = 0
        for end, upto, cut in [*((e, u, True) for e, u in cuts), (len(block), count, False)]:
            if end > start:
                if self._buf_bytes + end - start >= self.max_bytes:
                    for line in rc.iter_records(block[start:end]):  # rare: as add_encoded does
                        self._buf.append(line)
                        self._buf_bytes += len(line)
                        if self._buf_bytes >= self.max_bytes:
                            self._cut()
                else:
                    self._buf.append(view[start:end])
                    self._buf_bytes += end - start
                    self._buf_extra += upto - done - 1
            if cut:
                self._cut()
            start, done = end, upto

    def _advance_key(self, key: Any) -> None:
        """Records must come in strictly ascending key order (Python's), which plans rely on."""
        if self._has_last:
            try:
                ordered = key > self._last_key
            except TypeError:
                ordered = False
            if not ordered:
                raise KeyOrderError(f"records out of key order: {codec.key_text(key)} after "
                                  f"{codec.key_text(self._last_key)}")
        self._last_key = key
        self._has_last = True

    def _settle_boundary(self) -> None:
        """Choose D from the records seen so far, then cut the buffer as if D had been known."""
        self.D = pick_records_per_boundary(self._buf_bytes / max(1, len(self._buf)), self.target)
        recs, keys = self._buf, self._pending_keys
        self._buf, self._buf_bytes, self._pending_keys = [], 0, []
        boundary = boundary_hash if self._codec is None else self._codec.boundary_hash
        for rec, kb in zip(recs, keys):
            self._buf.append(rec)
            self._buf_bytes += len(rec)
            if self._buf_bytes >= self.max_bytes or boundary(kb) % self.D == 0:
                self._cut()

    def _cut(self) -> None:
        if not self._buf:
            return
        raw = b"".join(self._buf)
        if self._codec is not None:
            # lines are hashed a chunk at a time (the digest covers the same bytes either way)
            self.digest.update(raw)
        n = len(self._buf) + self._buf_extra
        self._buf, self._buf_bytes, self._buf_extra = [], 0, 0
        self._futures.append(self.up.submit(raw, n))
        while len(self._futures) > self.up.max_in_flight:
            self._collect(self._futures.popleft())
        if self.on_record:
            self.on_record(n)

    def _collect(self, fut: Future) -> None:
        ref: ChunkRef = fut.result()
        if ref.stored_bytes < 0:  # existed already
            ref.stored_bytes = -ref.stored_bytes
            self.up.stats.bytes_reused += ref.stored_bytes
            self.up.stats.chunks_reused += 1
        elif ref.id not in self.up.known:
            self.up.stats.bytes_written += ref.stored_bytes
            self.up.stats.chunks_written += 1
        self.up.known[ref.id] = ref.stored_bytes
        self._chunks.append(ref)

    def abandon(self) -> None:
        """Wait for chunks in flight and forget the stream (they stay unreferenced)."""
        while self._futures:
            self._collect(self._futures.popleft())
        self._chunks = []

    def finish_entry(self, schema: Any = None) -> StreamEntry:
        """The stream's manifest entry, once its last chunk is stored; ``schema``: the backend's."""
        if self.D is None:
            self._settle_boundary()
        self._cut()
        while self._futures:
            self._collect(self._futures.popleft())
        return StreamEntry(
            records=self.records,
            bytes=self.bytes,
            stored_bytes=sum(c.stored_bytes for c in self._chunks),
            digest=hashing.digest_string(self.up.repo.hash, self.digest),
            chunking={"records_per_boundary": self.D},
            chunks=tuple(ChunkRow(*c.to_json()) for c in self._chunks),
            encoding=self.encoding or None,
            schema=schema,
        )

    def finish(self) -> dict:
        """:meth:`finish_entry` as its JSON object, for code that builds entries as dicts."""
        return self.finish_entry().to_json()


def stream_digest_of(records: Iterator[tuple[Any, Any]], hash_name: str) -> tuple[str, int]:
    """Digest and count of records as a live store returns them (same rule as the writer)."""
    h = hashing.new(hash_name)
    n = 0
    for key, value in records:
        h.update(b"\x92" + codec.pack(key) + codec.pack(value))
        n += 1
    return hashing.digest_string(hash_name, h), n


@dataclass
class StoredRecord:
    key: Any
    raw: bytes  # the encoded record, as stored
    _value: Any = field(default=None, repr=False)
    _decoded: bool = False
    _codec: Any = field(default=None, repr=False)  # the stream's RecordCodec, when not msgpack

    @property
    def value(self) -> Any:
        if not self._decoded:
            self._value = codec.unpack(self.raw)[1] if self._codec is None else self._codec.decode(self.raw)[1]
            self._decoded = True
        return self._value

    def fields(self, *names: str) -> dict:
        """Only the named entries of a msgpack record whose value is a map (the others
        are skipped undecoded: a quarantine record's op and lines without its values)."""
        import msgpack
        u = msgpack.Unpacker(None, raw=False, strict_map_key=False, unicode_errors=codec.UNICODE_ERRORS, use_list=True,
                             max_buffer_size=max(len(self.raw), 1 << 20))
        u.feed(self.raw)
        u.read_array_header()
        u.skip()  # the key
        out = {}
        for _ in range(u.read_map_header()):
            name = u.unpack()
            if name in names:
                out[name] = u.unpack()
            else:
                u.skip()
        return out

    def msgpack_raw(self) -> bytes:
        """The record in the msgpack encoding, whatever its stream's encoding (to compare
        with records the core encodes from a live store)."""
        return self.raw if self._codec is None else b"\x92" + codec.pack(self.key) + codec.pack(self.value)


def record_codec(entry: dict) -> RecordCodec | None:
    """The codec of a stream whose records are not msgpack (None: msgpack)."""
    enc = entry.get("encoding")
    return codec_for(enc) if enc else None


def count_records(raw: bytes, entry: dict) -> int:
    """Records in one chunk of this stream."""
    return (record_codec(entry) or MSGPACK).count_records(raw)


def iter_chunk_records(raw: bytes) -> Iterator[StoredRecord]:
    """Records of one msgpack chunk, each with its exact encoded bytes (values decoded lazily)."""
    import msgpack
    u = msgpack.Unpacker(None, raw=False, strict_map_key=False, unicode_errors=codec.UNICODE_ERRORS, use_list=True,
                         max_buffer_size=max(len(raw), 1 << 20))
    u.feed(raw)
    start = 0
    while True:
        try:
            n = u.read_array_header()
        except msgpack.OutOfData:
            return
        if n != 2:
            raise ValueError("record is not a [key, value] pair")
        key = u.unpack()
        u.skip()
        end = u.tell()
        yield StoredRecord(_fix_key(key), raw[start:end])
        start = end


def read_stream(repo: Repository, entry: dict, *, prefetch: int = 4) -> Iterator[StoredRecord]:
    """Every record of a stream as stored, in key order; verifies every chunk's hash."""
    rc = record_codec(entry)
    if rc is None:
        for raw in iter_chunks(repo, entry, prefetch=prefetch):
            yield from iter_chunk_records(raw)
        return
    key, records = rc.key, rc.iter_records
    for raw in iter_chunks(repo, entry, prefetch=prefetch):
        for rec in records(raw):
            yield StoredRecord(key(rec), rec, _codec=rc)


class BackgroundHash:
    """A hash of data given in order, computed in a thread of its own: hashing big
    buffers releases the GIL, so the caller's thread goes on (a restore's merge)."""

    def __init__(self, hash_name: str):
        import queue
        import threading
        self.h = hashing.new(hash_name)
        self._q: "queue.SimpleQueue[bytes | None]" = queue.SimpleQueue()
        self._t = threading.Thread(target=self._run, name="stream-digest", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while (data := self._q.get()) is not None:
            self.h.update(data)

    def update(self, data: bytes) -> None:
        self._q.put(data)

    def hexdigest(self) -> str:
        self._q.put(None)
        self._t.join()
        return self.h.hexdigest()


def iter_chunks(repo: Repository, entry: dict, *, prefetch: int = 4) -> Iterator[bytes]:
    """A stream's chunks, uncompressed and hash-checked, fetched ahead in a small pool."""
    try:
        chunks = [ChunkRef.from_json(c) for c in entry.get("chunks", [])]
    except (TypeError, ValueError, IndexError, OverflowError):
        raise IntegrityError("a stream's chunk list is malformed (not [id, records, bytes, stored bytes] rows)") from None
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="chunk-get") as pool:
        futures: deque[tuple[ChunkRef, Future]] = deque()
        it = iter(chunks)
        for ref in it:
            futures.append((ref, pool.submit(repo.get_chunk, ref.id, ref.raw_bytes)))
            if len(futures) >= prefetch:
                break
        while futures:
            ref, fut = futures.popleft()
            nxt = next(it, None)
            if nxt is not None:
                futures.append((nxt, pool.submit(repo.get_chunk, nxt.id, nxt.raw_bytes)))
            yield fut.result()
