"""Reapply: write chosen quarantined records back to their live stores (the values the
agent had written), after checking that each record is still what the restore left
there.  Forensics chooses the records (:func:`snapshotter.forensics.locate`); this
writes live stores, so it lives with the restore.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from .. import codec
from ..backend import ABSENT, PlannedStream, StreamSpec
from ..config import Config
from ..encoding import RecordCodec, codec_for, same_encoding
from ..errors import IntegrityError, Refused, UsageError
from ..quarantine import stream_entry
from .verify import unexpected, unexpected_encoded

if TYPE_CHECKING:
    from ..forensics.select import Located


def reapply(cfg: Config, bundle: dict, records: list[Located], *, force: bool = False) -> list[dict]:
    """Write the live values of ``records`` back to their stores: added and
    modified records are upserted, deleted ones deleted again.  One writer (one
    transaction on SQL stores) per source.

    Each record's live state must still be what the restore left (the snapshot's
    value; nothing, for a record the restore removed): a record written since (by the
    agent, or by an operator fixing things) would otherwise be overwritten without a
    trace.  Such records are refused (exit 6, nothing written) unless ``force``."""
    by_source: dict[str, dict[str, list[Located]]] = {}
    for loc in records:
        by_source.setdefault(loc.source, {}).setdefault(loc.stream, []).append(loc)
    # every source is opened and checked before the first write
    backends = {}
    for source in by_source:
        backend = cfg.open_source(source)
        captured = bundle["sources"][source].get("backend")
        if captured != backend.name:
            raise UsageError(f"source {source!r} was quarantined from backend {captured!r} but is configured as "
                             f"{backend.name!r}")
        backends[source] = backend
    done: list[dict] = []
    with contextlib.ExitStack() as stack:
        # every source checked before any is written: a refusal must leave every store as it was
        writers, specs = {}, {}
        for source, streams in by_source.items():
            writers[source] = w = stack.enter_context(backends[source].writer())
            for stream, locs in streams.items():
                entry = stream_entry(bundle, source, stream)
                specs[source, stream] = spec = StreamSpec(stream, entry.get("schema") or entry.get("snapshot_schema")
                                                          or {})
                w.prepare(spec)
                if not force:
                    changed = changed_since_restore(backends[source], w, spec, entry, locs)
                    if changed:
                        shown = ", ".join(f"{loc.source}/{loc.stream} {codec.key_text(loc.record.key)}"
                                          for loc in changed[:3])
                        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
                        raise Refused(f"{len(changed)} record(s) changed in the live store since the restore "
                                      f"({shown}{more}): reapply would overwrite them; take a snapshot to keep "
                                      "them, then pass --force; nothing was written")
        for source, streams in by_source.items():
            # a SQL database's own refusals (a trigger that cannot be kept from firing, a delete
            # cascading into rows outside what is reapplied), before anything is written
            writers[source].preflight([_reapply_plan(specs[source, stream], locs) for stream, locs in streams.items()])
        for w in writers.values():
            w.check_selection()
        for source, streams in by_source.items():
            w = writers[source]
            for stream, locs in streams.items():
                entry = stream_entry(bundle, source, stream)
                spec = specs[source, stream]
                deletes = [loc.record.key for loc in locs if loc.op == "deleted"]
                kept = [loc for loc in locs if loc.op != "deleted"]
                if w.write_mode() == "replace":
                    # as a restore writes where nothing fires: a row written back goes as a delete and an
                    # insert (no UPDATE trigger fires; a MariaDB restore refuses INSERT/DELETE ones up front)
                    deletes += [loc.record.key for loc in kept]
                if deletes:
                    w.delete(spec, deletes)
                if not kept:
                    continue
                # records kept in the store's own encoding go back as they are (exact for every type)
                encoding = entry.get("raw_encoding")
                raws = [loc.record.value.get("raw") for loc in kept] if encoding else []
                if encoding and all(raw is not None for raw in raws) and w.upsert_encoded(spec, encoding, raws):
                    continue
                w.upsert(spec, [(loc.record.key, loc.record.value["value"]) for loc in kept])
            for stream in streams:  # a table prepare recreated gets its keys, triggers, sequences
                w.finish(specs[source, stream])
            done.extend(loc.ref() for locs in streams.values() for loc in locs)
        problems = [p for w in writers.values() for p in w.check_writes()]
        if problems:
            raise IntegrityError(f"reapply would change what it did not name: {'; '.join(problems[:3])}; rolled back, "
                                 f"nothing was written")
    return done


def _reapply_plan(spec: StreamSpec, locs: list[Located]) -> PlannedStream:
    """Reapply's writes in a restore plan's terms: a record the agent had deleted is deleted
    again ("added" to the live store since the restore put it back); the others are written
    over what the restore left (the snapshot's value, or nothing)."""
    ops = {"deleted": "added", "modified": "modified", "added": "deleted"}

    def records():
        for loc in locs:
            q = loc.record.value
            yield loc.record.key, ops[loc.op], q.get("snapshot_value"), q.get("value")
    counts = {op: sum(1 for loc in locs if ops[loc.op] == op) for op in ("added", "modified", "deleted")}
    return PlannedStream(spec, counts["added"], counts["modified"], counts["deleted"], False, records)


def changed_since_restore(backend, writer, spec: StreamSpec, entry: dict, locs: list[Located]) -> list[Located]:
    """The records whose live state is no longer what the restore left: the snapshot's
    value, or no record where the restore removed one (``added`` in the incident).
    Read through the writer's transaction where it has one (SQL: the rows are locked
    until the reapply commits), else by a reader of its own just before the writes."""
    own = writer.reader()
    reader = own if own is not None else backend.reader()
    with contextlib.nullcontext(reader) if own is not None else reader:
        encoding = entry.get("raw_encoding")
        keys = [loc.record.key for loc in locs]
        encoded = reader.read_encoded_keys(spec, keys) if encoding else None
        if encoded is not None:
            doc, batches = encoded
            with contextlib.closing(batches):
                if same_encoding(doc, encoding):
                    changed = _changed_encoded(codec_for(doc), locs, batches)
                    if changed is not None:
                        return changed
        got = reader.read_keys(spec, keys)
        if got is None:
            sessions = sorted({loc.record.value.get("session") for loc in locs} - {None})
            read_sessions = sessions if sessions and all(
                loc.record.value.get("session") is not None for loc in locs) else None
            got = reader.read(spec, read_sessions)
            # the writes are decided from these sessions' records: the writer's scope
            writer.planned(spec, read_sessions, reader.plan_context(spec))
        want = [(loc.record.key, ABSENT if loc.op == "added" else loc.record.value["snapshot_value"]) for loc in locs]
        return [locs[i] for i, _ in unexpected(backend, spec, want, got)]


def _changed_encoded(rc: RecordCodec, locs: list[Located], lines) -> list[Located] | None:
    """:func:`changed_since_restore` over the live records in their own encoding: a record
    differs from the one the restore wrote (or is there where the restore removed it).
    None when the values must be compared instead: a record not kept encoded, or a live
    record equal to an asked key only under the store's collation ('abc' in citext for
    'ABC'), which the comparison by value matches to its key."""
    expected, kbs = {}, []
    for loc in locs:
        q = loc.record.fields("op", "raw", "snapshot_raw")
        line = q.get("snapshot_raw") if q["op"] != "added" else q.get("raw")
        if line is None:
            return None
        kbs.append(rc.key_bytes(line))
        expected[kbs[-1]] = None if q["op"] == "added" else q["snapshot_raw"]
    changed = {kb for kb, _ in unexpected_encoded(rc, expected, lines)}
    if not changed <= expected.keys():
        return None
    return [loc for loc, kb in zip(locs, kbs) if kb in changed]
