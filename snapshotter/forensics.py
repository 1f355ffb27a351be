"""Forensics over quarantine bundles: choosing records (filters, keys), the
field-level diff of a record's snapshot and quarantined live versions,
exports for outside tools, and writing chosen records back to a live store.

Bundles are read as streams: memory is bounded by a batch (exports) or by
the records a command names (diff, reapply), never by the size of an incident.

Diffs are for reading: values in them are previews (long text trimmed to the
changed region, embeddings summarised as distances).  Exports are for
machines and lossless: every value in its JSON form (docs/forensics.md).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import difflib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from . import codec
from .backend import ABSENT, PlannedStream, StreamSpec
from .config import Config
from .errors import IntegrityError, NotFound, Refused, UsageError
from .quarantine import OPS, record_json, stream_entry
from .repository import Repository
from .streams import StoredRecord, read_stream

# -- choosing records -------------------------------------------------------------


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


# -- field-level diff ---------------------------------------------------------------

TEXT_INLINE = 160  # longer strings are shown as their changed region
TEXT_CONTEXT = 40
TEXT_CHANGED_MAX = 600
PREVIEW_CHARS = 200
PREVIEW_ITEMS = 50
VECTOR_MIN_DIMS = 8
BYTES_INLINE = 48
LIST_ALIGN_MAX = 2000  # longer lists are compared index by index

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _field_path(path: str, name: Any) -> str:
    name = str(name)
    if _IDENT.match(name):
        return f"{path}.{name}" if path else name
    return f"{path}[{json.dumps(name, ensure_ascii=False)}]"


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return codec.pack(a) == codec.pack(b)
    except (TypeError, ValueError, OverflowError):
        return bool(a == b)


def _is_vector(v: Any) -> bool:
    np = sys.modules.get("numpy")  # an array can only come from a loaded numpy
    if np is not None and isinstance(v, np.ndarray):
        return v.ndim == 1
    return (isinstance(v, list) and len(v) >= VECTOR_MIN_DIMS and all(type(x) in (float, int) for x in v)
            and any(type(x) is float for x in v))


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…[{len(text) - 2 * half} chars]…{text[-half:]}"


def preview(value: Any) -> Any:
    """A value as JSON for reading: long text trimmed, vectors and large bytes summarised."""
    if isinstance(value, str):
        if len(value) > PREVIEW_CHARS:
            return value[:PREVIEW_CHARS] + f"…[+{len(value) - PREVIEW_CHARS} chars]"
        return value
    if _is_vector(value) and len(value) > 16:
        return f"<vector of {len(value)} dims>"
    if isinstance(value, bytes) and len(value) > BYTES_INLINE:
        return f"<{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()[:16]}>"
    if isinstance(value, dict):
        return {str(k): preview(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [preview(v) for v in value[:PREVIEW_ITEMS]]
        if len(value) > PREVIEW_ITEMS:
            items.append(f"…[+{len(value) - PREVIEW_ITEMS} items]")
        return items
    return codec.to_json(value)


def _json_container(text: str) -> Any:
    """Nested JSON kept as text (SQLite JSON columns, metadata strings), else None."""
    s = text.lstrip()
    if not s or s[0] not in "[{":
        return None
    try:
        v = json.loads(text)
    except ValueError:
        return None
    return v if isinstance(v, (dict, list)) else None


def _text_change(path: str, a: str, b: str) -> dict:
    p = len(os.path.commonprefix([a, b]))
    s = min(len(os.path.commonprefix([a[::-1], b[::-1]])), min(len(a), len(b)) - p)
    before = a[max(0, p - TEXT_CONTEXT):p]
    after = a[len(a) - s:len(a) - s + TEXT_CONTEXT]
    ca, cb = a[p:len(a) - s], b[p:len(b) - s]
    return {"path": path, "change": "changed", "kind": "text", "offset": p,
            "snapshot_length": len(a), "live_length": len(b),
            "context_before": before, "context_after": after,
            "more_before": p > len(before), "more_after": s > len(after),
            "snapshot_changed": _clip(ca, TEXT_CHANGED_MAX), "live_changed": _clip(cb, TEXT_CHANGED_MAX),
            "snapshot_changed_length": len(ca), "live_changed_length": len(cb)}


def _vector_change(path: str, a: Any, b: Any) -> dict:
    import numpy as np  # loaded on first use: commands that never compare vectors start faster
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    out: dict[str, Any] = {"path": path, "change": "changed", "kind": "vector",
                           "snapshot_dims": int(x.size), "live_dims": int(y.size)}
    if x.shape != y.shape:
        return out
    delta = y - x
    changed = x != y
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    cos = None if nx == 0 or ny == 0 else _finite(1.0 - float(np.dot(x, y)) / (nx * ny))
    absd = np.abs(delta)
    order = [int(i) for i in np.argsort(-np.nan_to_num(absd, nan=np.inf))[:5] if changed[i]]
    out.update({
        "changed_dims": int(np.count_nonzero(changed)),
        "l2": _finite(np.linalg.norm(delta)),
        "cosine_distance": cos,
        "max_abs_delta": _finite(absd.max()) if absd.size else 0.0,
        "largest_changes": [{"dim": i, "snapshot": _finite(x[i]), "live": _finite(y[i])} for i in order],
    })
    return out


def _bytes_change(path: str, a: bytes, b: bytes) -> dict:
    first = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
    return {"path": path, "change": "changed", "kind": "bytes", "offset": first,
            "snapshot_length": len(a), "live_length": len(b),
            "snapshot_sha256": hashlib.sha256(a).hexdigest(), "live_sha256": hashlib.sha256(b).hexdigest()}


def _added(path: str, v: Any) -> dict:
    return {"path": path, "change": "added", "kind": "value", "live": preview(v)}


def _removed(path: str, v: Any) -> dict:
    return {"path": path, "change": "removed", "kind": "value", "snapshot": preview(v)}


def _diff_lists(path: str, a: list, b: list, out: list) -> None:
    if len(a) > LIST_ALIGN_MAX or len(b) > LIST_ALIGN_MAX:
        ops = [("replace", 0, len(a), 0, len(b))]
    else:
        # align by content so one inserted item is one change, not a shifted tail
        ka, kb = [_item_key(v) for v in a], [_item_key(v) for v in b]
        ops = difflib.SequenceMatcher(None, ka, kb, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            continue
        paired = min(i2 - i1, j2 - j1)
        for k in range(paired):
            _diff(f"{path}[{j1 + k}]", a[i1 + k], b[j1 + k], out)
        for i in range(i1 + paired, i2):
            out.append(_removed(f"{path}[{i}]", a[i]))
        for j in range(j1 + paired, j2):
            out.append(_added(f"{path}[{j}]", b[j]))


def _item_key(v: Any) -> bytes:
    try:
        return codec.pack(v)
    except (TypeError, ValueError, OverflowError):
        return repr(v).encode()


def _diff(path: str, a: Any, b: Any, out: list) -> None:
    if _same(a, b):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k, v in a.items():
            if k not in b:
                out.append(_removed(_field_path(path, k), v))
            else:
                _diff(_field_path(path, k), v, b[k], out)
        for k, v in b.items():
            if k not in a:
                out.append(_added(_field_path(path, k), v))
        return
    if _is_vector(a) and _is_vector(b):
        out.append(_vector_change(path, a, b))
        return
    if isinstance(a, list) and isinstance(b, list):
        _diff_lists(path, a, b, out)
        return
    if isinstance(a, str) and isinstance(b, str):
        ja, jb = _json_container(a), _json_container(b)
        if ja is not None and jb is not None:
            before = len(out)
            _diff(path, ja, jb, out)
            if len(out) == before:
                out.append({"path": path, "change": "changed", "kind": "value", "note": "same JSON, different text",
                            "snapshot": preview(a), "live": preview(b)})
            return
        if max(len(a), len(b)) > TEXT_INLINE:
            out.append(_text_change(path, a, b))
            return
    if isinstance(a, bytes) and isinstance(b, bytes) and max(len(a), len(b)) > BYTES_INLINE:
        out.append(_bytes_change(path, a, b))
        return
    out.append({"path": path, "change": "changed", "kind": "value", "snapshot": preview(a), "live": preview(b)})


def diff_values(snapshot: Any, live: Any) -> list[dict]:
    """Field-level changes from ``snapshot`` to ``live``, nested values by path (``meta.tags[1]``).

    A missing side of a record (added: no snapshot value; deleted: no live value)
    counts as an empty record, so every field shows as added or removed.
    """
    if snapshot is None and isinstance(live, dict):
        snapshot = {}
    if live is None and isinstance(snapshot, dict):
        live = {}
    out: list[dict] = []
    _diff("", snapshot, live, out)
    for c in out:
        c["path"] = c["path"] or "(value)"
    return out


def record_diff(bundle: dict, source: str, stream: str, rec: StoredRecord) -> dict:
    """One quarantined record with its provenance and field-level changes."""
    q = rec.value
    return {
        "incident": bundle["incident"],
        "source": source,
        "stream": stream,
        "key": codec.to_json(rec.key),
        "op": q["op"],
        "post_failure": q.get("post_failure"),
        "written_at": codec.to_json(q.get("written_at")),
        "session": codec.to_json(q.get("session")),
        "changes": diff_values(q.get("snapshot_value"), q.get("value")),
    }


def changed_fields(q: dict) -> list[str]:
    """Top-level fields a modified record changed (for one-line summaries)."""
    a, b = q.get("snapshot_value"), q.get("value")
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return []
    return [str(k) for k in dict.fromkeys([*a, *b]) if k not in a or k not in b or not _same(a[k], b[k])]


# -- export -----------------------------------------------------------------------------

EXPORT_FORMATS = ("jsonl", "parquet", "csv")
EXPORT_COLUMNS = ("incident", "snapshot", "release", "source", "stream", "key", "op", "post_failure",
                  "written_at", "session", "value", "snapshot_value")
EXPORT_BATCH = 1000  # records per Parquet row group and per write


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """A temporary file next to ``path`` that replaces it only when the body succeeds,
    so a reader never sees half an export.  The file is private to its owner
    (quarantined records are evidence and may hold personal data)."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise UsageError(f"{path} is a directory; give a file name with -o")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export_row(bundle: dict, source: str, stream: str, rec: StoredRecord) -> dict:
    """One record with its provenance; values in their JSON form (docs/forensics.md)."""
    j = record_json(source, stream, rec)
    return {"incident": bundle["incident"], "snapshot": bundle.get("snapshot"), "release": bundle.get("release"),
            "source": source, "stream": stream, "key": j["key"], "op": j["op"], "post_failure": j["post_failure"],
            "written_at": j["written_at"], "session": j["session"], "value": j["value"],
            "snapshot_value": j["snapshot_value"]}


def _json_text(v: Any) -> str | None:
    return None if v is None else json.dumps(v, ensure_ascii=False)


def _flat(row: dict) -> dict:
    """Tabular form: key and values as JSON text (lossless, any shape fits one column)."""
    out = dict(row)
    out["key"] = json.dumps(row["key"], ensure_ascii=False)
    out["value"] = _json_text(row["value"])
    out["snapshot_value"] = _json_text(row["snapshot_value"])
    return out


class _JSONLWriter:
    def __init__(self, path: str, bundle: dict):
        self.f = open(path, "w", encoding="utf-8", newline="\n")

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            self.f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.f.close()


#: a spreadsheet takes a cell starting with one of these for a formula (OWASP, "CSV injection")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def csv_cell(value: Any, *, raw: bool = False) -> str:
    """A CSV cell: text starting like a formula gets a leading ``'`` (a spreadsheet then
    shows it as text and runs nothing), unless it is a number (``-0.5`` stays) or ``raw``."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if not raw and text.startswith(FORMULA_STARTS) and not _NUMBER.match(text):
        return "'" + text
    return text


class _CSVWriter:
    def __init__(self, path: str, bundle: dict, *, raw: bool = False):
        self.f = open(path, "w", encoding="utf-8", newline="")
        self.w = csv.writer(self.f)
        self.raw = raw
        self.w.writerow(EXPORT_COLUMNS)

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            flat = _flat(r)
            pf = flat["post_failure"]
            flat["post_failure"] = "" if pf is None else ("true" if pf else "false")
            self.w.writerow([csv_cell(flat[c], raw=self.raw) for c in EXPORT_COLUMNS])

    def close(self) -> None:
        self.f.close()


class _ParquetWriter:
    def __init__(self, path: str, bundle: dict):
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.pa = pa
        fields = [pa.field(c, pa.string()) for c in EXPORT_COLUMNS]
        fields[EXPORT_COLUMNS.index("post_failure")] = pa.field("post_failure", pa.bool_())
        fields[EXPORT_COLUMNS.index("written_at")] = pa.field("written_at", pa.timestamp("us", tz="UTC"))
        meta = {k: bundle.get(k)
                for k in ("incident", "snapshot", "release", "created_at", "failure_at", "user", "host")}
        self.schema = pa.schema(fields, metadata={"snapshotter.incident": json.dumps(meta)})
        self.w = pq.ParquetWriter(path, self.schema, compression="zstd")

    def write(self, rows: list[dict]) -> None:
        cols: dict[str, list] = {c: [] for c in EXPORT_COLUMNS}
        for r in rows:
            flat = _flat(r)
            flat["written_at"] = _utc(r["written_at"])
            for c in EXPORT_COLUMNS:
                cols[c].append(flat[c])
        self.w.write_table(self.pa.Table.from_pydict(cols, schema=self.schema), row_group_size=len(rows))

    def close(self) -> None:
        self.w.close()


def _utc(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    t = _dt.datetime.fromisoformat(text)
    return (t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)).astimezone(_dt.timezone.utc)


_WRITERS = {"jsonl": _JSONLWriter, "csv": _CSVWriter, "parquet": _ParquetWriter}


def export_records(repo: Repository, bundle: dict, flt: RecordFilter, fmt: str, path: str, *,
                   csv_raw: bool = False) -> int:
    """Write the selected records to ``path`` (atomically); returns how many.

    JSONL lines are the export row with values as JSON; CSV and Parquet carry
    ``key``, ``value`` and ``snapshot_value`` as JSON text, and Parquet has
    ``written_at`` as a UTC timestamp and the incident in its file metadata.
    """
    if fmt not in _WRITERS:
        raise UsageError(f"invalid format {fmt!r}: one of {', '.join(EXPORT_FORMATS)}")
    flt.check(bundle)
    n = 0
    with atomic_output(path) as tmp:
        writer = _CSVWriter(tmp, bundle, raw=csv_raw) if fmt == "csv" else _WRITERS[fmt](tmp, bundle)
        try:
            batch: list[dict] = []
            for source, stream, rec in select_records(repo, bundle, flt):
                batch.append(export_row(bundle, source, stream, rec))
                if len(batch) >= EXPORT_BATCH:
                    writer.write(batch)
                    n += len(batch)
                    batch = []
            if batch or (n == 0 and fmt == "parquet"):
                writer.write(batch)
                n += len(batch)
        finally:
            writer.close()
    return n


# -- re-apply ---------------------------------------------------------------------------

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
                # records kept as the store's own lines go back as they are (exact for every type)
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
    from . import pgtext

    own = writer.reader()
    reader = own if own is not None else backend.reader()
    with contextlib.nullcontext(reader) if own is not None else reader:
        encoding = entry.get("raw_encoding")
        keys = [loc.record.key for loc in locs]
        if pgtext.is_pgtext(encoding) and hasattr(reader, "read_encoded_keys"):
            doc, batches = reader.read_encoded_keys(spec, keys)
            with contextlib.closing(batches):
                if pgtext.same_encoding(doc, encoding):
                    rc = pgtext.Codec(doc)
                    live = {rc.key_bytes(line): line for batch in batches for line in batch}
                    asked = set()
                    out = []
                    for loc in locs:
                        q = loc.record.fields("op", "raw", "snapshot_raw")
                        line = q.get("snapshot_raw") if q["op"] != "added" else q.get("raw")
                        if line is None:
                            break  # not kept as lines: compare values below
                        expected = None if q["op"] == "added" else q["snapshot_raw"]
                        asked.add(rc.key_bytes(line))
                        if live.get(rc.key_bytes(line)) != expected:
                            out.append(loc)
                    else:
                        if set(live) <= asked:
                            return out
                        # a live row equal to an asked key only under the column's collation ('abc'
                        # in citext for 'ABC'): compared by value below, where it is matched to its key
        got = reader.read_keys(spec, keys)
        if got is None:
            sessions = sorted({loc.record.value.get("session") for loc in locs} - {None})
            got = reader.read(spec, sessions if sessions and all(
                loc.record.value.get("session") is not None for loc in locs) else None)
        wanted = {codec.pack(k) for k in keys}
        live_values = {}
        for batch in got:
            for key, value in batch:
                packed = codec.pack(key)
                if packed in wanted:
                    live_values[packed] = value
        return [loc for loc in locs
                if not backend.same_value(spec, live_values.get(codec.pack(loc.record.key), ABSENT),
                                          ABSENT if loc.op == "added" else loc.record.value["snapshot_value"])]
