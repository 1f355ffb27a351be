"""The ``pgtext`` record encoding: a PostgreSQL row as one line of COPY text.

Streams of PostgreSQL tables are stored as the server itself writes them with
``COPY ... TO STDOUT`` (text format): one line per row, the columns of the
stream's ``encoding.columns`` in that order, separated by a tab, ``\\N`` for
NULL, backslash escapes for backslash, tab, newline, carriage return,
backspace, form feed and vertical tab, and ``\\n`` at the end.  The text of
each value is the type's own output function under fixed session settings
(:data:`SESSION_SETTINGS`), so it does not depend on the reading client's
time zone or date style, and it reads back into the same value with
PostgreSQL's input function: the round trip is exact for every type,
including the ones no client library knows.

This is what lets a snapshot keep up with ``pg_dump``: the lines go from the
server into chunks without being turned into Python values, and a restore
can compare and write them back the same way.  Python values are made only
when someone looks at records (``diff``, quarantine, ``export``): the loaders
of psycopg turn each field into the value a cursor would return (types it does
not know stay text).

A stream's manifest entry names the encoding and what decoding needs::

    "encoding": {"format": "pgtext", "columns": [...], "oids": [...], "key": [...]}

``oids`` are the type OIDs the server reports for the columns (a domain
reports its base type); ``key`` names the key columns.
"""
from __future__ import annotations

import datetime as _dt
import decimal
import re
import uuid
from typing import Any, Callable, Sequence

from snapshotter.encoding import LineRecords, crc32_boundary, register, split_lines

FORMAT = "pgtext"

#: settings under which lines are written and read (``SET LOCAL`` in the
#: reading and writing transactions): the text of a timestamptz, a float or a
#: bytea value is then the same whoever runs the snapshot
SESSION_SETTINGS = (
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
)

#: key types whose ORDER BY (text with COLLATE "C") orders loaded values as
#: Python does; other key types are checked record by record while reading
ORDER_SAFE_TYPES = frozenset({
    20, 21, 23,  # int8, int2, int4
    25, 1043,  # text, varchar
    2950,  # uuid
    1082, 1114, 1184,  # date, timestamp, timestamptz
})

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f", "\v": "\\v"}
_ESCAPE_RE = re.compile(r"[\\\n\r\t\b\f\v]")
_UNESCAPE_RE = re.compile(rb"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|.)", re.S)
_UNESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def escape(text: str) -> str:
    """A value's text as COPY writes it (the caller handles NULL)."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], text) if _ESCAPE_RE.search(text) else text


def format_line(fields: Sequence[str | None]) -> bytes:
    """One line from the columns' text forms (None for NULL), as COPY would write it."""
    return ("\t".join("\\N" if f is None else escape(f) for f in fields) + "\n").encode("utf-8")


def _unescape_one(m: re.Match) -> bytes:
    s = m.group(1)
    if s[:1] == b"x" and len(s) > 1:
        return bytes([int(s[1:], 16)])
    if s[:1].isdigit():
        return bytes([int(s, 8) & 0xFF])
    return _UNESCAPES.get(s, s)


def split_line(line: bytes) -> list[bytes | None]:
    """The fields of one line (escapes undone, None for NULL)."""
    if line.endswith(b"\n"):
        line = line[:-1]
    out: list[bytes | None] = []
    for f in line.split(b"\t"):
        if f == b"\\N":
            out.append(None)
        elif b"\\" in f:
            out.append(_UNESCAPE_RE.sub(_unescape_one, f))
        else:
            out.append(f)
    return out


def iter_lines(raw: bytes) -> list[bytes]:
    """The lines of one chunk, each with its newline (escaped newlines never end a line)."""
    return split_lines(raw)


def count_lines(raw: bytes) -> int:
    return raw.count(b"\n")


def encoding_doc(columns: Sequence[str], oids: Sequence[int], key: Sequence[str]) -> dict:
    return {"format": FORMAT, "columns": list(columns), "oids": [int(o) for o in oids], "key": list(key)}


@register
class PgTextCodec(LineRecords):
    """Keys and values of ``pgtext`` lines for one stream (see the module doc); registered
    as the codec of the format, and declared by the backends that write it."""

    format = FORMAT

    def __init__(self, doc: dict):
        super().__init__(doc)
        self.columns: list[str] = list(doc["columns"])
        self.oids: list[int] = list(doc["oids"])
        self.key_columns: list[str] = list(doc["key"])
        self.key_index = [self.columns.index(k) for k in self.key_columns]
        #: key columns lead the line: the key's bytes are a prefix, found without splitting
        self._leading = self.key_index == list(range(len(self.key_index)))
        self.single_leading_key = self.key_index == [0]
        self.keys_ordered = all(self.oids[i] in ORDER_SAFE_TYPES for i in self.key_index)
        self._tx = None
        self._key_tx = None

    # -- bytes, no decoding ------------------------------------------------------

    def key_bytes(self, line: bytes) -> bytes:
        """The key's fields as they appear in the line (the chunk boundary hash input)."""
        if self._leading:
            n = len(self.key_index)
            end = -1
            for _ in range(n):
                end = line.find(b"\t", end + 1)
                if end < 0:
                    return line[:-1] if line.endswith(b"\n") else line
            return line[:end]
        parts = line.rstrip(b"\n").split(b"\t")
        return b"\t".join(parts[i] for i in self.key_index)

    def field(self, line: bytes, column: str) -> bytes | None:
        """One column's text (escapes undone), without loading it."""
        return split_line(line)[self.columns.index(column)]

    def field_reader(self, name: str) -> Callable[[bytes], bytes | None] | None:
        if name not in self.columns:
            return None
        i = self.columns.index(name)
        return lambda line: split_line(line)[i]

    # -- chunks --------------------------------------------------------------------

    def chunk_ends(self, records: list[bytes], D: int) -> list[int]:
        # the one per-line step of a snapshot that keeps up with pg_dump: a single leading
        # key column is the text before the first tab
        crc = crc32_boundary
        if self.single_leading_key:
            return [j for j, line in enumerate(records, 1) if not crc(line[:line.find(b"\t")]) % D]
        key_bytes = self.key_bytes
        return [j for j, line in enumerate(records, 1) if not crc(key_bytes(line)) % D]

    def block_chunk_ends(self, block: bytes, D: int) -> tuple[int, list[tuple[int, int]]] | None:
        """The block's chunk ends (:meth:`RecordCodec.block_chunk_ends`): the CRC-32 of every
        line's key is computed by numpy, one key byte position at a time over all lines (the
        key columns must lead the line and their text be short); None when they do not."""
        if not self._leading or not block:
            return None
        return _block_chunk_ends(block, D, len(self.key_index))

    @classmethod
    def same_encoding(cls, a: dict, b: dict) -> bool:
        return a.get("columns") == b.get("columns") and a.get("oids") == b.get("oids") and a.get("key") == b.get("key")

    # -- values ------------------------------------------------------------------

    def _transformer(self, oids: Sequence[int]):
        try:
            from psycopg.adapt import Transformer
            from psycopg.pq import Format
        except ImportError:  # pragma: no cover - psycopg is in the postgres extra
            from snapshotter.errors import UsageError
            raise UsageError("reading PostgreSQL records needs psycopg: install snapshotter[postgres]") from None
        tx = Transformer()
        tx.set_loader_types(list(oids), Format.TEXT)
        return tx

    def decode(self, line: bytes) -> tuple[Any, dict]:
        """``(key, {column: value})``, with the values a psycopg cursor would return."""
        if self._tx is None:
            self._tx = self._transformer(self.oids)
        fields = split_line(line)
        if len(fields) != len(self.columns):
            raise ValueError(f"record has {len(fields)} fields, the stream {len(self.columns)}")
        values = [v if _plain(v) else (None if f is None else f.decode("utf-8", "replace"))
                  for v, f in zip(_load(self._tx, self.oids, fields), fields)]
        key = values[self.key_index[0]] if len(self.key_index) == 1 else [values[i] for i in self.key_index]
        return key, dict(zip(self.columns, values))

    def key(self, line: bytes) -> Any:
        if self._key_tx is None:
            self._key_tx = self._transformer([self.oids[i] for i in self.key_index])
        kb = self.key_bytes(line) if self._leading else None
        if kb is not None and b"\\" not in kb:
            fields: list = [None if f == b"\\N" else f for f in kb.split(b"\t")]
        else:
            all_fields = split_line(line)
            fields = [all_fields[i] for i in self.key_index]
        values = [v if _plain(v) else (None if f is None else f.decode("utf-8", "replace"))
                  for v, f in zip(_load(self._key_tx, [self.oids[i] for i in self.key_index], fields), fields)]
        return values[0] if len(values) == 1 else values


def _load(tx, oids: Sequence[int], fields: list) -> list:
    """The fields loaded as a cursor loads them; a field whose value Python cannot hold
    (``infinity`` and ``-infinity`` timestamps and dates, BC dates, years past 9999) is
    kept as its PostgreSQL text, as types psycopg does not know are."""
    try:
        return tx.load_sequence(fields)
    except Exception:
        from psycopg.pq import Format

        out: list = []
        for oid, f in zip(oids, fields):
            if f is None:
                out.append(None)
                continue
            try:
                out.append(tx.get_loader(oid, Format.TEXT).load(f))
            except Exception:
                out.append(f.decode("utf-8", "replace"))
        return out


_PLAIN = (str, int, float, bool, bytes, type(None), _dt.datetime, _dt.date, _dt.time, _dt.timedelta,
          decimal.Decimal, uuid.UUID)


def _plain(v: Any) -> bool:
    """Whether a loaded value is one records can hold (see :mod:`snapshotter.codec`); others
    (network addresses, ranges, geometric types) are kept as their PostgreSQL text."""
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


# -- chunk boundaries of a block of lines, by numpy ---------------------------------------

#: longest key text (bytes) whose CRC is computed by numpy (one pass over the lines per byte)
BLOCK_KEY_BYTES = 48

_CRC_TABLE = None


def _crc_table():
    """zlib's CRC-32 table (reflected, polynomial 0xEDB88320), as numpy uint32."""
    global _CRC_TABLE
    if _CRC_TABLE is None:
        import numpy as np

        table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            table.append(c)
        _CRC_TABLE = np.array(table, dtype=np.uint32)
    return _CRC_TABLE


def _block_chunk_ends(block: bytes, D: int, key_fields: int) -> tuple[int, list[tuple[int, int]]] | None:
    import numpy as np

    if not block.endswith(b"\n"):
        raise ValueError("block does not end with a complete line")
    a = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(a == 10) + 1  # offset just past each line
    n = len(ends)
    pos = np.empty(n, dtype=ends.dtype)  # each line's next key byte; lines whose key is done leave
    pos[0] = 0
    pos[1:] = ends[:-1]
    table = _crc_table()
    out = np.empty(n, dtype=np.uint32)
    crc = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
    line = np.arange(n)
    seen = np.zeros(n, dtype=np.int16) if key_fields > 1 else None  # key columns passed
    for _ in range(BLOCK_KEY_BYTES + 1):
        b = a[pos]
        tab = b == 9
        # the key ends at its last column's tab, or at the newline (a line of key columns only)
        stop = (b == 10) | (tab if seen is None else tab & (seen == key_fields - 1))
        if stop.any():
            out[line[stop]] = crc[stop]
            keep = ~stop
            line, pos, crc, b = line[keep], pos[keep], crc[keep], b[keep]
            if seen is not None:
                seen, tab = seen[keep], tab[keep]
            if not len(line):
                break
        if seen is not None:
            seen += tab
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        pos += 1
    else:
        return None  # a key longer than BLOCK_KEY_BYTES
    out ^= np.uint32(0xFFFFFFFF)
    at = np.flatnonzero(out % np.uint32(D) == 0)
    return n, list(zip(ends[at].tolist(), (at + 1).tolist()))
