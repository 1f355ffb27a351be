"""The plan of a restore: how a live stream differs from the snapshot's, found by
the restore's one merge of key-ordered streams (:func:`merge`; its fast path for
whole streams of records in a store's own encoding is :func:`merge_chunked`), counted, and written
to the quarantine as it goes.  Memory is bounded by a batch, not by the store.

Applying reads the quarantine records back, so it needs no plan in memory: ``added``
records are deleted, ``modified`` and ``deleted`` ones written back with their
snapshot values; writes are proportional to the drift.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, Callable, Iterator

from .. import codec, hashing
from ..backend import PlannedStream, StreamSpec, key_problem
from ..encoding import RecordCodec, codec_for, same_encoding
from ..errors import ConfigError, IntegrityError, KeyOrderError, SchemaMismatch, SourceError
from ..repository import Repository
from ..streams import BackgroundHash, StoredRecord, StreamWriter, iter_chunks, read_stream
from .resolve import Selection, Target

# -- the merge --------------------------------------------------------------------

#: where a key the merge reports is: only live, only in the snapshot, or in both
LIVE, SNAPSHOT, BOTH = 1, 2, 3


def _order(lv, sv, live_key: Callable, snap_key: Callable) -> int:
    """Which of the two heads comes first by key (None: that side has ended)."""
    if sv is None:
        return LIVE
    if lv is None:
        return SNAPSHOT
    lk, sk = live_key(lv), snap_key(sv)
    return LIVE if lk < sk else SNAPSHOT if sk < lk else BOTH


def merge(live: Iterator, snap: Iterator, live_key: Callable, snap_key: Callable,
          same: Callable | None = None, *, same_bytes: bool = False) -> Iterator[tuple[int, Any, Any]]:
    """The restore's merge: two streams in ascending key order joined by key, yielding
    ``(side, lv, sv)`` for every key whose records differ: LIVE (the key is only live:
    ``lv``), SNAPSHOT (only in the snapshot: ``sv``) or BOTH (in both, and not
    ``same(lv, sv)``; without ``same``, two records of a key differ).  ``lv`` and ``sv``
    are the two heads then (the other side's is its next record, or None at its end).
    With ``same_bytes``, equal items (encoded records) pass without their keys being
    looked at.  Whole streams of encoded records take the fast path, :func:`merge_chunked`."""
    lv, sv = next(live, None), next(snap, None)
    while lv is not None or sv is not None:
        if same_bytes and lv == sv:
            lv, sv = next(live, None), next(snap, None)
            continue
        side = _order(lv, sv, live_key, snap_key)
        if side != BOTH or same is None or not same(lv, sv):
            yield side, lv, sv
        if side & LIVE:
            lv = next(live, None)
        if side & SNAPSHOT:
            sv = next(snap, None)


def merge_records(live: Iterator[tuple[Any, bytes, Any]], snap: Iterator[StoredRecord],
                  same: Callable[[Any, Any], bool]) -> Iterator[tuple[int, Any, Any]]:
    """:func:`merge` of :func:`live_records` and a snapshot's stored records."""
    return merge(live, snap, itemgetter(0), attrgetter("key"), same)


#: lines compared at once by :func:`merge_chunked` (it adapts between these)
_BLOCK_MIN, _BLOCK_MAX = 8, 1024


def merge_chunked(live_batches: Iterator[list[bytes]], chunks: Iterator[bytes], rc: RecordCodec,
                  on_chunk: Callable[[bytes], Any]) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """:func:`merge` of two whole streams of encoded records (``same_bytes``, no ``same``)
    without splitting the snapshot into records: the live records are matched against
    the snapshot chunk's bytes at a cursor, a block of records at a time (one join and
    one ``startswith``, both in C); a block that differs is halved until the differing
    record is found, whose key alone is looked at.  Encoded records are canonical and
    self-delimiting (:class:`~snapshotter.encoding.RecordCodec`), so bytes equal at a
    record's start are equal records.  ``on_chunk`` is given each snapshot chunk, in order."""
    key, record_end = rc.key, rc.record_end
    raw, p = b"", 0

    def load() -> bool:
        """Move to the next snapshot chunk (False: there is none)."""
        nonlocal raw, p
        for chunk in chunks:
            if not rc.whole_records(chunk):
                raise IntegrityError("a snapshot chunk does not end with a complete record")
            on_chunk(chunk)
            raw, p = chunk, 0
            return True
        raw, p = b"", 0
        return False

    more = load()
    join = b"".join
    k = 64
    for batch in live_batches:
        i, n = 0, len(batch)
        while i < n:
            m = k if k < n - i else n - i
            if m > 1:
                blk = join(batch[i:i + m])
                if raw.startswith(blk, p):
                    p += len(blk)
                    i += m
                    if k < _BLOCK_MAX:
                        k *= 2
                    continue
                if m > _BLOCK_MIN:
                    k = m // 2
                    continue
            lv = batch[i]
            if raw.startswith(lv, p):
                p += len(lv)
                i += 1
                continue
            if p >= len(raw) and more:
                more = load()
                continue
            sv = raw[p:record_end(raw, p)] if more else None
            side = _order(lv, sv, key, key)
            yield side, lv, sv
            if side & LIVE:
                i += 1
            if side & SNAPSHOT:
                p += len(sv)
    while more:  # what is left of the snapshot is gone from the live store
        while p < len(raw):
            sv = raw[p:record_end(raw, p)]
            yield SNAPSHOT, None, sv
            p += len(sv)
        more = load()


# -- the streams it merges ----------------------------------------------------------

def live_records(reader, spec: StreamSpec | None, sessions) -> Iterator[tuple[Any, bytes, Any]]:
    """The live stream as ``(key, msgpack record, value)``, in key order."""
    if spec is None:
        return
    for batch in reader.read(spec, sessions or None):
        for key, value in batch:
            yield key, b"\x92" + codec.pack(key) + codec.pack(value), value


def snapshot_records(repo: Repository, t: Target, sessions) -> Iterator[StoredRecord]:
    for rec in read_stream(repo, t.entry):
        if sessions and t.backend.session_of(t.spec, rec.key, rec.value) not in sessions:
            continue
        yield rec


def same_record(t: Target) -> Callable[[tuple, StoredRecord], bool]:
    """Whether a live record is the snapshot's record of its key: the same bytes, or
    equal by the backend's rule.  A store that perturbs values on a round trip (Chroma
    cosine) would otherwise show its own restore as drift, and every later restore
    would rewrite and quarantine it again."""
    def same(lv: tuple, sv: StoredRecord) -> bool:
        return lv[1] == sv.msgpack_raw() or t.backend.values_equal(t.spec, codec.unpack(lv[1])[1], sv.value)
    return same


# a stream kept in a store's own encoding is planned over its encoded records (snapshot
# and live in the same encoding), decoding keys and values only where the two sides differ

def live_lines(reader, t: Target, spec: StreamSpec | None, sessions) -> Iterator[list[bytes]] | None:
    """The live stream as records in the snapshot's own encoding, when the snapshot has
    one and the reader can give them (None otherwise)."""
    enc = t.entry.get("encoding")
    if not enc or spec is None:
        return None
    got = reader.read_encoded(spec, sessions or None)
    if got is None:
        return None
    doc, batches = got
    if not same_encoding(doc, enc):
        batches.close()
        return None
    return batches


def _line_session(t: Target, rc: RecordCodec) -> Callable[[bytes], str | None]:
    """A record's session (of a store's own encoding), reading one field where the backend names it."""
    name = t.backend.session_field(t.spec)
    read = rc.field_reader(name) if name else None
    if read is not None:
        def session(line: bytes) -> str | None:
            f = read(line)
            return None if f is None else f.decode("utf-8", "replace")
        return session

    def session_decoded(line: bytes) -> str | None:
        key, value = rc.decode(line)
        return t.backend.session_of(t.spec, key, value)
    return session_decoded


def _plan_lines(repo: Repository, t: Target, live_batches: Iterator[list[bytes]], plan: "StreamPlan",
                sessions: set[str] | None, digest, quarantine) -> None:
    """The plan of :func:`plan_stream` over encoded records: equal ones (almost all of
    them after a small drift) are recognised by their bytes alone."""
    rc = codec_for(t.entry["encoding"])
    if not sessions:
        _merge_lines(iter_chunks(repo, t.entry), live_batches, rc, plan, digest, quarantine)
        return
    session_of = _line_session(t, rc)
    seen = plan.sessions_seen

    def live_lines() -> Iterator[bytes]:
        for line in itertools.chain.from_iterable(live_batches):
            if len(seen) < len(sessions):
                seen.add(session_of(line))
            yield line
    live = live_lines()

    def snapshot_lines() -> Iterator[bytes]:
        for raw in iter_chunks(repo, t.entry):
            lines = []
            for line in rc.iter_records(raw):
                session = session_of(line)
                if session in sessions:
                    seen.add(session)
                    lines.append(line)
            digest.update(b"".join(lines))
            plan.snapshot_records += len(lines)
            yield from lines

    for side, lv, sv in merge(live, snapshot_lines(), rc.key, rc.key, same_bytes=True):
        _quarantine_line(rc, side, lv, sv, plan, quarantine)


def _merge_lines(chunks: Iterator[bytes], live_batches: Iterator[list[bytes]], rc: RecordCodec,
                 plan: "StreamPlan", digest, quarantine) -> None:
    """The plan of a whole stream of lines, through :func:`merge_chunked`."""
    live_lines = 0

    def counted() -> Iterator[list[bytes]]:
        nonlocal live_lines
        for batch in live_batches:
            live_lines += len(batch)
            yield batch

    for side, lv, sv in merge_chunked(counted(), chunks, rc, digest.update):
        _quarantine_line(rc, side, lv, sv, plan, quarantine)
    # every line is matched, added (live only), deleted (snapshot only) or modified (both)
    plan.snapshot_records += live_lines - plan.added + plan.deleted


def _quarantine_line(rc: RecordCodec, side: int, lv: bytes | None, sv: bytes | None, plan: "StreamPlan",
                     quarantine) -> None:
    """A key where the lines differ, counted and quarantined: values are decoded only here."""
    if side == LIVE:
        plan.added += 1
        k, value = rc.decode(lv)
        quarantine(k, "added", value, None, lv, None)
    elif side == SNAPSHOT:
        plan.deleted += 1
        k, value = rc.decode(sv)
        quarantine(k, "deleted", None, value, None, sv)
    else:
        plan.modified += 1
        k, value = rc.decode(lv)
        quarantine(k, "modified", value, rc.decode(sv)[1], lv, sv)


# -- planning ---------------------------------------------------------------------

@dataclass
class StreamPlan:
    added: int = 0
    modified: int = 0
    deleted: int = 0
    snapshot_records: int = 0
    snapshot_digest: str = ""  # over the selected snapshot records
    live_schema: dict | None = None
    live_missing: bool = False
    quarantine: dict | None = None  # the bundle's stream entry
    #: sha256 of the snapshot's keys (packed, in order), for verifying by key (generic plans)
    snapshot_keys_digest: str = ""
    #: sha256 over the planned changes as (op, key), in order: what a person confirmed
    changes_digest: Any = field(default_factory=hashlib.sha256, repr=False)

    @property
    def changes(self) -> int:
        return self.added + self.modified + self.deleted

    post_failure: int = 0
    #: planned over records in the snapshot's own encoding (see verify._verify_touched)
    lines: bool = False
    #: stream settings that differ from the snapshot's and are put back (Chroma: collection metadata)
    settings: list[str] = field(default_factory=list)
    #: a missing stream is recreated without these parts of its stored definition
    not_recreated: list[str] = field(default_factory=list)
    #: with ``--session``: the sessions named that the snapshot or the live stream holds
    sessions_seen: set = field(default_factory=set, repr=False)
    #: the live read the plan was made from, ``(sessions or None, the reader's plan_context)``,
    #: for :meth:`SourceWriter.planned` (None: the stream was missing, nothing was read)
    read: tuple | None = field(default=None, repr=False)

    def counts(self) -> dict:
        out = {"added": self.added, "modified": self.modified, "deleted": self.deleted}
        if self.settings:
            out["settings"] = list(self.settings)
        if self.not_recreated:
            out["not_recreated"] = list(self.not_recreated)
        return out


def _name_key_problem(reader, live_spec: StreamSpec | None, t: Target, exc: BaseException) -> None:
    """Keys that cannot be compared (NULL, or several types in a SQLite column): the store
    names the cause, a usage error, rather than "out of key order" or a TypeError."""
    why = key_problem(reader, live_spec)
    if why:
        raise ConfigError(f"source {t.source!r}: {why}") from exc


def plan_stream(repo: Repository, t: Target, reader, sel: Selection, *, writer: StreamWriter | None,
                failure_at: _dt.datetime | None, tick: Callable[[int], None] | None = None) -> StreamPlan:
    """Merge live and snapshot by key; count, and quarantine into ``writer`` when given.
    ``tick(n)``: ``n`` more live records read (progress)."""
    plan = StreamPlan()
    live_spec = reader.live_spec(t.stream)
    if live_spec is None:
        plan.live_missing = True
        plan.not_recreated = list(t.backend.recreate_omissions(t.spec, reader))
    else:
        plan.live_schema = live_spec.schema
        diffs = t.backend.schema_differences(t.spec, live_spec)
        if diffs:
            raise SchemaMismatch(f"source {t.source!r} stream {t.stream!r} changed since the snapshot: " + "; ".join(diffs))
        plan.settings = list(t.backend.settings_differences(t.spec, live_spec))
    sessions = set(sel.sessions) if sel.sessions else None

    def quarantine(key, op, live_value, snap_value, live_raw=None, snap_raw=None):
        # the live value too: a confirmed record the agent rewrote while the prompt waited is refused
        plan.changes_digest.update(codec.pack([op, key, live_raw if live_raw is not None else live_value]))
        if writer is None:
            return
        written = t.backend.written_at(t.spec, key, live_value) if live_value is not None else None
        post = None
        if failure_at is not None and written is not None:
            post = written >= failure_at
            plan.post_failure += post
        session = t.backend.session_of(t.spec, key, live_value if live_value is not None else snap_value)
        rec = {"op": op, "value": live_value, "snapshot_value": snap_value,
               "written_at": written, "post_failure": post, "session": session}
        if live_raw is not None or snap_raw is not None:
            # the records in the snapshot's encoding too: applied and re-applied as they are
            rec["raw"] = live_raw
            rec["snapshot_raw"] = snap_raw
        try:
            writer.add(key, rec)
        except SourceError as exc:  # the quarantine stream's own order check: say whose records
            raise type(exc)(f"source {t.source!r} stream {t.stream!r}: {exc.message}") from None

    # the snapshot's records are hashed as its manifest's digest was
    alg = repo.hash  # resolve_snapshot checked that its digests are the repository's hash
    lines = live_lines(reader, t, live_spec, sel.sessions)
    if lines is None and live_spec is None and t.entry.get("encoding"):
        # the stream is gone: every stored record goes back as it is (a table through COPY,
        # after it is recreated), not as decoded values, which would round off intervals
        lines = (batch for batch in ())
    if lines is not None:
        digest = BackgroundHash(alg)
        try:
            with contextlib.closing(lines):  # a COPY left open would hold its connection
                _plan_lines(repo, t, _ticking(lines, tick), plan, sessions, digest, quarantine)
        except (TypeError, KeyOrderError) as exc:
            _name_key_problem(reader, live_spec, t, exc)
            raise
        finally:
            hexdigest = digest.hexdigest()
        plan.lines = True
        if live_spec is not None:
            plan.read = (sel.sessions or None, reader.plan_context(live_spec))
        plan.snapshot_digest = f"{alg}:{hexdigest}"
        if not sel.sessions and plan.snapshot_digest != t.entry.get("digest"):
            raise IntegrityError(f"snapshot stream {t.source}/{t.stream} does not match its manifest digest")
        return plan

    digest = hashing.new(alg)
    keys_digest = hashlib.sha256()
    pack = codec.packer().pack

    seen = plan.sessions_seen

    def snapshot() -> Iterator[StoredRecord]:
        for rec in snapshot_records(repo, t, sessions):
            digest.update(rec.raw)
            keys_digest.update(pack(rec.key))
            plan.snapshot_records += 1
            if sessions and len(seen) < len(sessions):
                seen.add(t.backend.session_of(t.spec, rec.key, rec.value))
            yield rec

    def live() -> Iterator[tuple[Any, bytes, Any]]:
        last_key = None
        # closed with this generator: a COPY left open would hold its connection
        with contextlib.closing(live_records(reader, live_spec, sel.sessions)) as records:
            for rec in records:
                if sessions and len(seen) < len(sessions):
                    seen.add(t.backend.session_of(t.spec, rec[0], rec[2]))
                if tick:
                    tick(1)
                if last_key is not None and not rec[0] > last_key:
                    raise IntegrityError(f"source {t.source!r} stream {t.stream!r}: live records out of key "
                                         f"order at {codec.key_text(rec[0])}")
                last_key = rec[0]
                yield rec

    live_side = live()
    try:
        for side, lv, sv in merge_records(live_side, snapshot(), same_record(t)):
            if side == LIVE:
                plan.added += 1
                quarantine(lv[0], "added", lv[2], None)
            elif side == SNAPSHOT:
                plan.deleted += 1
                quarantine(sv.key, "deleted", None, sv.value)
            else:
                plan.modified += 1
                quarantine(sv.key, "modified", lv[2], sv.value)
    except (TypeError, IntegrityError, KeyOrderError) as exc:
        # the live read ends first: the store is asked on the connection it holds
        live_side.close()
        _name_key_problem(reader, live_spec, t, exc)
        raise
    finally:
        live_side.close()
    if live_spec is not None:
        plan.read = (sel.sessions or None, reader.plan_context(live_spec))
    plan.snapshot_digest = hashing.digest_string(alg, digest)
    plan.snapshot_keys_digest = "sha256:" + keys_digest.hexdigest()
    if not sel.sessions and plan.snapshot_digest != t.entry.get("digest"):
        raise IntegrityError(f"snapshot stream {t.source}/{t.stream} does not match its manifest digest")
    return plan


def _ticking(batches: Iterator[list[bytes]], tick: Callable[[int], None] | None) -> Iterator[list[bytes]]:
    """The batches, each counted by ``tick`` as it is taken (closing them is the caller's)."""
    if tick is None:
        yield from batches
        return
    for batch in batches:
        tick(len(batch))
        yield batch


def planned_stream(repo: Repository, t: Target, plan: StreamPlan) -> PlannedStream:
    """A stream's plan as its backend sees it (preflight, dry-run refusals)."""
    def records() -> Iterator[tuple[Any, str, Any, Any]]:
        if plan.quarantine is None:
            return
        for rec in read_stream(repo, plan.quarantine):
            q = rec.value  # decoded whole: values are compared with and sent to the database
            yield rec.key, q["op"], q.get("value"), q.get("snapshot_value")
    return PlannedStream(t.spec, plan.added, plan.modified, plan.deleted, plan.live_missing, records)
