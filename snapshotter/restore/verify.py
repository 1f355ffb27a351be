"""Whether the live store holds what a restore expects:

* :func:`unexpected` (for records in a store's own encoding: :func:`unexpected_encoded`),
  the one check of live records against expected ones, a value or absence; the
  restore asks it before it writes, its verification and reapply ask it too;
* :func:`verify_streams`, the verification of what a restore wrote;
* :func:`changed_under_restore`, when that fails: did another writer change the store?
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .. import codec, hashing
from ..backend import ABSENT, StreamSpec
from ..encoding import RecordCodec, codec_for, same_encoding
from ..repository import Repository
from ..streams import read_stream
from .plan import BOTH, LIVE, SNAPSHOT, StreamPlan, live_lines, live_records, merge_records, same_record, \
    snapshot_records
from .resolve import Selection, Target

if TYPE_CHECKING:
    from .apply import RestoreResult

VERIFY_BATCH = 1000


# -- live against expected ------------------------------------------------------------

def unexpected(backend, spec: StreamSpec, expected: list[tuple[Any, Any]],
               found: Iterable[list[tuple[Any, Any]]]) -> list[tuple[int, Any]]:
    """Which of the ``expected`` records, ``(key, value)`` with :data:`ABSENT` for "no
    record", the live store does not hold: ``(index, live value or ABSENT)``, in the
    order expected.  ``found`` is what the store gave for those keys (read by key, or a
    whole stream: records of other keys are passed over); values are compared by the
    backend's rule (:meth:`SourceBackend.same_value`)."""
    wanted = {codec.pack(key) for key, _ in expected}
    live = {}
    for part in found:
        for key, value in part:
            packed = codec.pack(key)
            if packed in wanted:
                live[packed] = value
    out = []
    for i, (key, want) in enumerate(expected):
        now = live.get(codec.pack(key), ABSENT)
        if not backend.same_value(spec, now, want):
            out.append((i, now))
    return out


def unexpected_encoded(rc: RecordCodec, expected: dict[bytes, bytes | None],
                       lines: Iterable[list[bytes]]) -> Iterator[tuple[bytes, bytes | None]]:
    """:func:`unexpected` for a stream read in its own encoding: ``expected`` maps each key
    (as its record's key bytes) to its record, or None where no record is expected.
    Yields ``(key bytes, live record)`` for every live record that is not the expected
    one (a key not in ``expected`` included), in the order read, then ``(key bytes, None)``
    for every expected record that is missing."""
    seen = set()
    equal = rc.equal
    for part in lines:
        for line in part:
            kb = rc.key_bytes(line)
            if not equal(expected.get(kb), line):
                yield kb, line
            seen.add(kb)
    for kb, want in expected.items():
        if want is not None and kb not in seen:
            yield kb, None


# -- verification -----------------------------------------------------------------

def verify_streams(repo: Repository, targets: dict[str, list[Target]], result: RestoreResult, sel: Selection,
                   readers: dict[str, Any]) -> bool:
    """Re-read the restored streams; their digests must be the snapshot's (or, where
    the store perturbs values, every record equal within the backend's rule).  Problems
    go to ``result.problems``."""
    ok = True
    for source, ts in targets.items():
        backend = ts[0].backend
        with contextlib.nullcontext(readers[source]) if source in readers else backend.reader() as reader:
            for t in ts:
                plan = result.plans[source][t.stream]
                spec = reader.live_spec(t.stream)
                if plan.settings and spec is not None and t.backend.settings_differences(t.spec, spec):
                    ok = False
                    result.problems.append(f"{source}/{t.stream}: {', '.join(plan.settings)} not as in the snapshot")
                # the written records alone: encoded lines inside the writer's transaction, else by key
                check = None
                if plan.quarantine is not None and spec is not None:
                    if plan.lines:
                        check = _verify_touched if source in readers else None
                    elif not sel.sessions:
                        check = _verify_by_key
                problem = check(repo, t, reader, spec, plan) if check else _UNSUPPORTED
                if problem is not _UNSUPPORTED:
                    if problem:
                        ok = False
                        result.problems.append(f"{source}/{t.stream}: {problem}")
                    continue
                alg = repo.hash
                h = hashing.new(alg)
                n = 0
                lines = live_lines(reader, t, spec, sel.sessions)  # hashed as encoded records, as taken
                if lines is not None:
                    with contextlib.closing(lines):
                        for batch in lines:
                            h.update(b"".join(batch))
                            n += len(batch)
                else:
                    for _, raw, _ in live_records(reader, spec, sel.sessions):
                        h.update(raw)
                        n += 1
                if hashing.digest_string(alg, h) == plan.snapshot_digest and n == plan.snapshot_records:
                    continue
                problem = _compare_records(repo, t, reader, spec, sel)
                if problem:
                    ok = False
                    result.problems.append(f"{source}/{t.stream}: {problem}")
    return ok


def _verify_touched(repo: Repository, t: Target, reader, spec: StreamSpec, plan: StreamPlan) -> Any:
    """Verification of a stream planned over lines in the writer's own REPEATABLE READ
    transaction: every row the plan did not touch was compared equal to the snapshot
    in this transaction, and no other transaction's write is visible to it, so the
    stream equals the snapshot (and has its digest) exactly when every touched key
    now holds its snapshot line, or is absent where the snapshot has none.  Reads
    what the restore wrote, not the whole table.  :data:`_UNSUPPORTED` when the reader
    cannot read records by key in their encoding (:meth:`SourceReader.read_encoded_keys`)."""
    rc = codec_for(t.entry["encoding"])
    unsupported = False

    def check(batch: list) -> str | None:
        expected, keys = {}, {}
        for key, q in batch:
            line = q.get("snapshot_raw") if q["op"] != "added" else q.get("raw")
            if line is None:
                return f"record {codec.key_text(key)} has no stored line to verify against"
            kb = rc.key_bytes(line)
            expected[kb], keys[kb] = q.get("snapshot_raw"), key
        nonlocal unsupported
        got = reader.read_encoded_keys(spec, [k for k, _ in batch])
        if got is None:
            unsupported = True
            return "unsupported"
        if not same_encoding(got[0], t.entry["encoding"]):
            return "the live table can no longer be read in the snapshot's encoding"
        with contextlib.closing(got[1]) as lines:
            for kb, line in unexpected_encoded(rc, expected, lines):
                if line is None:
                    return f"record {codec.key_text(keys[kb])} missing after restore"
                if expected.get(kb) is None:
                    return f"record {codec.key_text(rc.key(line))} present after restore but not in the snapshot"
                return f"record {codec.key_text(keys[kb])} differs from the snapshot after restore"
        return None

    problem = _check_incident(repo, plan, lambda rec: (rec.key, rec.fields("op", "raw", "snapshot_raw")), check)
    return _UNSUPPORTED if unsupported else problem


def _check_incident(repo: Repository, plan: StreamPlan, item, check) -> str | None:
    """``check`` over the stream's incident records (as ``item`` makes them), a batch at a
    time; the first problem it reports, or None."""
    batch: list = []
    for rec in read_stream(repo, plan.quarantine):
        batch.append(item(rec))
        if len(batch) >= VERIFY_BATCH:
            problem = check(batch)
            if problem:
                return problem
            batch = []
    return check(batch) if batch else None


_UNSUPPORTED = object()  # _verify_by_key: the reader cannot verify by key


def _verify_by_key(repo: Repository, t: Target, reader, spec: StreamSpec, plan: StreamPlan):
    """Verification of a store without transactions (Chroma) that can fetch records by
    key: the records the restore touched are re-read and must hold their snapshot
    values (or be absent, for added ones), and the stream's live key set must be the
    snapshot's (its digest, taken during the plan).  Every other record was compared
    equal to the snapshot by the plan, so the stream equals the snapshot unless another
    writer changed an untouched record in place meanwhile, the one change a Chroma
    snapshot cannot see either (docs/design.md).  Returns a problem, None, or
    ``_UNSUPPORTED`` when the reader cannot do it (the caller re-reads everything)."""
    keys = reader.list_keys(spec)
    if keys is None or reader.read_keys(spec, []) is None:  # both hooks, or none
        return _UNSUPPORTED
    pack = codec.packer().pack
    h = hashlib.sha256()
    n = 0
    for batch in keys:
        for key in batch:
            h.update(pack(key))
        n += len(batch)
    if "sha256:" + h.hexdigest() != plan.snapshot_keys_digest or n != plan.snapshot_records:
        return f"the live keys after restore are not the snapshot's ({n} live, {plan.snapshot_records} in the snapshot)"

    def check(batch: list) -> str | None:
        found = reader.read_keys(spec, [key for key, _ in batch])
        if found is None:
            return "the store can no longer read records by key"
        expected = [(key, ABSENT if rec.fields("op")["op"] == "added" else rec.value["snapshot_value"])
                    for key, rec in batch]
        for i, now in unexpected(t.backend, t.spec, expected, found):
            key, want = expected[i]
            if want is ABSENT:
                return f"record {codec.key_text(key)} present after restore but not in the snapshot"
            if now is ABSENT:
                return f"record {codec.key_text(key)} missing after restore"
            return f"record {codec.key_text(key)} differs from the snapshot after restore"
        return None

    return _check_incident(repo, plan, lambda rec: (rec.key, rec), check)


def _compare_records(repo: Repository, t: Target, reader, spec, sel: Selection) -> str | None:
    """The first record of the stream that is not the snapshot's, read whole."""
    live = live_records(reader, spec, sel.sessions)
    snap = snapshot_records(repo, t, set(sel.sessions) if sel.sessions else None)
    for side, lv, sv in merge_records(live, snap, same_record(t)):
        if side == BOTH:
            return f"record {codec.key_text(sv.key)} differs from the snapshot after restore"
        if lv is None:
            return f"record {codec.key_text(sv.key)} missing after restore"
        if sv is None:
            return f"record {codec.key_text(lv[0])} present after restore but not in the snapshot"
        return f"record {codec.key_text(lv[0])} present after restore, expected {codec.key_text(sv.key)}"
    return None


# -- after a failed verification ------------------------------------------------------

def changed_under_restore(repo: Repository, targets: dict[str, list[Target]], result: RestoreResult,
                          sel: Selection, transactional: dict[str, Any]) -> str | None:
    """After a failed verification: which stream another writer changed while the restore
    ran (exit 6, run it again), or None when the failure is the restore's own (exit 3).

    Only a store without transactions can be changed under a restore: a SQL stream is
    planned, written and verified in one transaction that sees no other writer, so its
    failure is always the restore's.  In a stream of another store every record that
    differs from the snapshot is looked at:

    * one the restore did not write (not in the incident): the plan saw it equal to the
      snapshot, or absent from both, so someone else wrote it;
    * one the restore wrote that holds a third value (neither the snapshot's nor the one
      the incident kept), or is absent where the restore wrote it: someone else wrote it;
    * one the restore wrote that still holds its pre-restore value (or is still absent, or
      still present, as before): the restore's own write did not take, an integrity
      failure, whatever else is seen.

    Every failed stream must show another writer's change for the failure to be one."""
    failed = [t for ts in targets.values() for t in ts
              if any(p.startswith(f"{t.source}/{t.stream}: ") for p in result.problems)]
    if not failed or any(t.source in transactional for t in failed):
        return None
    raced = []
    for t in failed:
        plan = result.plans[t.source][t.stream]
        if plan.quarantine is None:
            return None
        why = _other_writer(repo, t, plan, sel)
        if why is None:
            return None
        raced.append(f"source {t.source!r} stream {t.stream!r}: {why}")
    return "; ".join(raced)


def _other_writer(repo: Repository, t: Target, plan: StreamPlan, sel: Selection) -> str | None:
    """:func:`changed_under_restore` for one stream: the first record another writer
    changed, or None when no record shows it, or one shows the restore's write missing."""
    touched = {}
    for rec in read_stream(repo, plan.quarantine):
        q = rec.fields("op", "value")
        touched[codec.pack(rec.key)] = (q["op"], q.get("value"))
    sessions = set(sel.sessions) if sel.sessions else None
    evidence = None
    with t.backend.reader() as reader:
        spec = reader.live_spec(t.stream)
        if spec is None:
            return "it was removed after the restore wrote it"
        live = live_records(reader, spec, sel.sessions)
        snap = snapshot_records(repo, t, sessions)
        for side, lv, sv in merge_records(live, snap, lambda lv, sv: t.backend.same_value(t.spec, lv[2], sv.value)):
            if side == LIVE:
                key, now = lv[0], lv[2]
            elif side == SNAPSHOT:
                key, now = sv.key, ABSENT
            else:
                key, now = sv.key, lv[2]
            entry = touched.get(codec.pack(key))
            if entry is None:
                evidence = evidence or f"record {codec.key_text(key)}, which the restore did not write, changed"
                continue
            op, before = entry
            before = ABSENT if op == "deleted" else before
            if t.backend.same_value(t.spec, now, before):
                return None  # as before the restore: its write did not take
            evidence = evidence or f"record {codec.key_text(key)} changed again after the restore wrote it"
    return evidence
