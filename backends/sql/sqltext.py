"""The ``sqltext`` record encoding: a SQLite row as one line of text SQLite itself writes.

Streams of SQLite tables read by the ``sql`` backend are stored as lines that SQLite
builds in C (``printf``, ``hex``, ``replace``), so rows go from the database into chunks
without becoming Python values, as PostgreSQL's ``pgtext`` lines do.  A line holds the
fields of the stream's ``encoding.columns`` in that order, separated by a tab, and ends
with ``\\n``; each field is its value's storage class written as:

* NULL: ``NULL``;
* INTEGER: its decimal digits (``-`` in front when negative);
* REAL: ``printf('%!.17e')`` (``1.00000000000000006e-01``; 18 significant digits, which
  read back to the same double), ``Inf`` and ``-Inf``; a zero is ``0.0`` or ``-0.0``;
* TEXT: ``'``, its bytes with backslash, newline, carriage return and tab written as
  ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``'`` (a quote inside is not doubled); a text
  holding a NUL byte is ``T'``, its bytes in upper-case hex, ``'``;
* BLOB: ``X'``, its bytes in upper-case hex, ``'``.

A raw 0x0A only ever ends a line, and a raw tab only separates fields.  The decoder gives
the values Python's ``sqlite3`` returns (``int``, ``float``, ``str``, ``bytes``, None);
text that is not UTF-8 decodes with ``surrogateescape``.

The manifest entry::

    "encoding": {"format": "sqltext", "columns": [...], "key": [...], "rowid": true}

``rowid``: the key is the table's rowid (a single ``INTEGER PRIMARY KEY`` of a rowid
table), whose values are integers in SQLite's and Python's order alike; any other key is
decoded and its order checked line by line while writing.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from snapshotter.encoding import LineRecords, crc32_boundary, register

FORMAT = "sqltext"

_UNESCAPE_RE = re.compile(rb"\\(.)", re.S)
_UNESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}


def _unescape(m: re.Match) -> bytes:
    try:
        return _UNESCAPES[m.group(1)]
    except KeyError:
        raise ValueError(f"unknown escape \\{m.group(1).decode('latin-1')} in a sqltext field") from None


def parse_field(f: bytes) -> Any:
    """One field's value, as Python's ``sqlite3`` returns it."""
    c = f[:1]
    if c == b"'":
        if len(f) < 2 or f[-1:] != b"'":
            raise ValueError("unterminated text in a sqltext field")
        body = f[1:-1]
        if b"\\" in body:
            body = _UNESCAPE_RE.sub(_unescape, body)
        return body.decode("utf-8", "surrogateescape")
    if c == b"X" or c == b"T":
        if f[1:2] != b"'" or f[-1:] != b"'" or len(f) < 3:
            raise ValueError("malformed hex in a sqltext field")
        data = bytes.fromhex(f[2:-1].decode("ascii"))
        return data if c == b"X" else data.decode("utf-8", "surrogateescape")
    if f == b"NULL":
        return None
    if b"." in f or b"e" in f or b"I" in f:
        return float(f)
    return int(f)


def split_line(line: bytes) -> list[bytes]:
    if line.endswith(b"\n"):
        line = line[:-1]
    return line.split(b"\t")


def encoding_doc(columns: list[str], key: list[str], rowid: bool) -> dict:
    return {"format": FORMAT, "columns": list(columns), "key": list(key), "rowid": bool(rowid)}


@register
class SqlTextCodec(LineRecords):
    """Keys and values of ``sqltext`` lines for one stream (see the module doc)."""

    format = FORMAT

    def __init__(self, doc: dict):
        super().__init__(doc)
        self.columns: list[str] = list(doc["columns"])
        self.key_columns: list[str] = list(doc["key"])
        if not self.key_columns:
            raise ValueError("no key columns")
        self.key_index = [self.columns.index(k) for k in self.key_columns]
        self._leading = self.key_index == list(range(len(self.key_index)))
        self.single_leading_key = self.key_index == [0]
        self.keys_ordered = bool(doc.get("rowid")) and len(self.key_index) == 1

    # -- bytes, no decoding ------------------------------------------------------

    def key_bytes(self, line: bytes) -> bytes:
        if self._leading:
            end = -1
            for _ in self.key_index:
                end = line.find(b"\t", end + 1)
                if end < 0:
                    return line[:-1] if line.endswith(b"\n") else line
            return line[:end]
        parts = split_line(line)
        return b"\t".join(parts[i] for i in self.key_index)

    def chunk_ends(self, records: list[bytes], D: int) -> list[int]:
        crc = crc32_boundary
        if self.single_leading_key and len(self.columns) > 1:
            return [j for j, line in enumerate(records, 1) if not crc(line[:line.find(b"\t")]) % D]
        key_bytes = self.key_bytes
        return [j for j, line in enumerate(records, 1) if not crc(key_bytes(line)) % D]

    def field_reader(self, name: str) -> Callable[[bytes], bytes | None] | None:
        if name not in self.columns:
            return None
        i = self.columns.index(name)

        def read(line: bytes) -> bytes | None:
            v = parse_field(split_line(line)[i])
            return None if v is None else v.encode("utf-8", "surrogateescape") if isinstance(v, str) else \
                v if isinstance(v, bytes) else str(v).encode()
        return read

    @classmethod
    def same_encoding(cls, a: dict, b: dict) -> bool:
        return a.get("columns") == b.get("columns") and a.get("key") == b.get("key") and \
            bool(a.get("rowid")) == bool(b.get("rowid"))

    # -- values ------------------------------------------------------------------

    def decode(self, line: bytes) -> tuple[Any, dict]:
        fields = split_line(line)
        if len(fields) != len(self.columns):
            raise ValueError(f"record has {len(fields)} fields, the stream {len(self.columns)}")
        values = [parse_field(f) for f in fields]
        key = values[self.key_index[0]] if len(self.key_index) == 1 else [values[i] for i in self.key_index]
        return key, dict(zip(self.columns, values))

    def key(self, line: bytes) -> Any:
        kb = self.key_bytes(line) if self._leading else None
        fields = kb.split(b"\t") if kb is not None else [split_line(line)[i] for i in self.key_index]
        values = [parse_field(f) for f in fields]
        return values[0] if len(values) == 1 else values
