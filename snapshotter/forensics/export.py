"""Exports of quarantined records for outside tools (JSONL, CSV, Parquet), written
atomically.  Exports are for machines and lossless: every value in its JSON form
(docs/forensics.md).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import re
import tempfile
from typing import Any, Iterator

from ..errors import UsageError
from ..quarantine import record_json
from ..repository import Repository
from ..streams import StoredRecord
from .select import RecordFilter, select_records


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
