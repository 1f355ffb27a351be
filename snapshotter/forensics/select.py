"""Choosing quarantined records: filters (source, stream, op, post-failure, session,
limit) over a bundle read as streams, and records named by KEY.  Memory is bounded
by a batch, or by the records a command names, never by the size of an incident.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from .. import codec
from ..errors import NotFound, UsageError
from ..quarantine import OPS
from ..repository import Repository
from ..streams import StoredRecord, read_stream


@dataclass
class RecordFilter:
    """Which quarantined records a command covers; empty fields select everything."""

    source: str | None = None
    stream: str | None = None
    ops: tuple[str, ...] = ()
    post_failure: bool = False  # only records written at or after the incident's failure_at
    sessions: tuple[str, ...] = ()
    limit: int | None = None

    def check(self, bundle: dict) -> None:
        """Refuse a filter that cannot match this bundle, naming what it holds."""
        sources = bundle.get("sources", {})
        if self.source and self.source not in sources:
            raise NotFound(f"incident {bundle['incident']} has no source {self.source!r} "
                           f"(it has: {', '.join(sorted(sources)) or 'none'})")
        if self.stream:
            holders = [s for s, src in sources.items() if self.stream in src.get("streams", {})
                       and (not self.source or s == self.source)]
            if not holders:
                known = sorted({f"{s}/{st}" for s, src in sources.items() for st in src.get("streams", {})})
                raise NotFound(f"incident {bundle['incident']} has no stream {self.stream!r}"
                               f"{' in source ' + repr(self.source) if self.source else ''} "
                               f"(it has: {', '.join(known) or 'none'})")
        for op in self.ops:
            if op not in OPS:
                raise UsageError(f"invalid op {op!r}: one of {', '.join(OPS)}")
        if self.post_failure and not bundle.get("failure_at"):
            raise UsageError(f"incident {bundle['incident']} was restored without --failure-at, so no record "
                             f"is classified post-failure")

    def matches(self, q: dict) -> bool:
        if self.ops and q.get("op") not in self.ops:
            return False
        if self.post_failure and q.get("post_failure") is not True:
            return False
        if self.sessions and q.get("session") not in self.sessions:
            return False
        return True

    def streams(self, bundle: dict) -> Iterator[tuple[str, str, dict]]:
        for sname, src in bundle.get("sources", {}).items():
            if self.source and sname != self.source:
                continue
            for stname, entry in src.get("streams", {}).items():
                if self.stream and stname != self.stream:
                    continue
                counts = entry.get("counts")
                # the counts say when a stream holds none of the wanted ops: skip reading it
                if self.ops and counts and not any(counts.get(op) for op in self.ops):
                    continue
                yield sname, stname, entry


def select_records(repo: Repository, bundle: dict, flt: RecordFilter) -> Iterator[tuple[str, str, StoredRecord]]:
    """(source, stream, record) for every quarantined record the filter keeps, in bundle order."""
    flt.check(bundle)
    n = 0
    for sname, stname, entry in flt.streams(bundle):
        for rec in read_stream(repo, entry):
            if not flt.matches(rec.value):
                continue
            yield sname, stname, rec
            n += 1
            if flt.limit and n >= flt.limit:
                return


def count_post_failure(repo: Repository, bundle: dict) -> int | None:
    """Records written at or after failure_at; None when the incident has no failure_at."""
    if not bundle.get("failure_at"):
        return None
    total = 0
    for src in bundle.get("sources", {}).values():
        for entry in src.get("streams", {}).values():
            stored = (entry.get("counts") or {}).get("post_failure")
            if isinstance(stored, int):
                total += stored
                continue
            total += sum(1 for rec in read_stream(repo, entry) if rec.value.get("post_failure") is True)
    return total


# -- keys -------------------------------------------------------------------------

def parse_key(text: str) -> Any:
    """A KEY from the command line: its JSON text, or the text itself when that is not JSON."""
    def no_constants(name):
        raise ValueError(name)  # NaN / Infinity are names people give records, not keys they mean as floats
    try:
        return json.loads(text, parse_constant=no_constants)
    except ValueError:
        return text


def _key_id(key_json: Any) -> str:
    return json.dumps(key_json, sort_keys=True, ensure_ascii=False)


@dataclass
class Located:
    """One quarantined record found by key."""

    source: str
    stream: str
    record: StoredRecord
    key_text: str  # as the user typed it

    @property
    def op(self) -> str:
        return self.record.value["op"]

    def ref(self) -> dict:
        return {"source": self.source, "stream": self.stream, "key": codec.to_json(self.record.key), "op": self.op}


def locate(repo: Repository, bundle: dict, key_texts: Iterable[str], *, source: str | None = None,
           stream: str | None = None) -> list[Located]:
    """The record each KEY names, one per KEY in the order given.

    A KEY found in several streams is refused (exit 2) with the candidates, so a
    command never picks one for the user; a KEY found nowhere is NotFound (exit 5).
    """
    flt = RecordFilter(source=source, stream=stream)
    flt.check(bundle)
    wanted: dict[str, str] = {}
    for text in key_texts:
        wanted.setdefault(_key_id(parse_key(text)), text)
    found: dict[str, list[Located]] = {k: [] for k in wanted}
    for sname, stname, entry in flt.streams(bundle):
        for rec in read_stream(repo, entry):
            kid = _key_id(codec.to_json(rec.key))
            if kid in found:
                found[kid].append(Located(sname, stname, rec, wanted[kid]))
    ambiguous = {kid: hits for kid, hits in found.items() if len(hits) > 1}
    if ambiguous:
        lines = [f"key {wanted[kid]} is in several streams: "
                 + ", ".join(f"--source {h.source} --stream {h.stream}" for h in hits)
                 for kid, hits in ambiguous.items()]
        raise UsageError("; ".join(lines) + "; name one with --source/--stream")
    missing = [wanted[kid] for kid, hits in found.items() if not hits]
    if missing:
        where = f" in {source or '*'}/{stream or '*'}" if source or stream else ""
        raise NotFound(f"incident {bundle['incident']} has no quarantined record with key "
                       f"{', '.join(missing)}{where}")
    return [found[kid][0] for kid in wanted]
