"""The ``mytext`` record encoding: a MariaDB/MySQL row as one line of the client's batch text.

Streams of MariaDB/MySQL tables are stored as the ``mariadb``/``mysql`` client prints a
result in batch mode (``--batch --skip-column-names``, connection character set
``utf8mb4``): one line per row, the fields of the stream's ``encoding.columns`` in that
order (the key columns first), separated by a tab, each the text the server sent for the
value (text columns in UTF-8, binary columns and BIT as their bytes) with backslash escapes
for backslash (``\\\\``), NUL (``\\0``), tab (``\\t``) and newline (``\\n``) (a carriage
return is not escaped), SQL NULL printed as ``NULL``, and ``\\n`` at the end.

A NULL and the string ``'NULL'`` print alike, so the nullable columns whose values could be
that string (every type but numbers, dates and times: their NULL is ``NULL`` and their
values never are) are listed in ``encoding.masked``, and the line ends with one more field
per 62 of them: a decimal bitmask whose bit ``i`` says the ``i``-th masked column of that
group is NULL (computed by the server: ``(c0 IS NULL) | (c1 IS NULL) << 1 | ...``).

Python values are made only where someone looks at records or a store needs values: each
field becomes what PyMySQL gives for it (the column's type code and whether it is binary are
in the document), so ``show``, ``diff``, quarantine, ``export`` and restores see the values
the msgpack encoding held.  The encoding document::

    "encoding": {"format": "mytext", "columns": [...], "types": [...], "binary": [...],
                 "masked": [...], "key": [...]}

``types`` are the MySQL protocol's field type codes, ``binary`` whether a text-typed field
is binary (character set 63, its bytes kept as bytes), ``masked`` the masked columns in
line order, ``key`` the key columns (the first ``len(key)`` columns).
"""
from __future__ import annotations

import re
import zlib
from typing import Any, Callable, Sequence

from snapshotter.encoding import LineRecords, register, split_lines

FORMAT = "mytext"

#: masked columns per mask field (a BIGINT's bits, with room to spare)
MASK_BITS = 62

# protocol field type codes
_DECIMAL, _TINY, _SHORT, _LONG, _FLOAT, _DOUBLE, _NULL, _TIMESTAMP, _LONGLONG, _INT24 = range(10)
_DATE, _TIME, _DATETIME, _YEAR, _NEWDATE = 10, 11, 12, 13, 14
_BIT, _JSON, _NEWDECIMAL = 16, 245, 246
#: text-typed fields (PyMySQL's TEXT_TYPES): decoded with the connection's character set
#: unless binary
TEXT_TYPES = frozenset({_BIT, 252, 251, 250, 254, 249, 253, 15, 255})
#: types whose text is never the word NULL: their NULL needs no mask
UNMASKED_TYPES = frozenset({_DECIMAL, _TINY, _SHORT, _LONG, _FLOAT, _DOUBLE, _TIMESTAMP, _LONGLONG, _INT24,
                            _DATE, _TIME, _DATETIME, _YEAR, _NEWDATE, _NEWDECIMAL})
#: key types whose order in the database's ORDER BY (see mysql.py's order_key) is Python's
#: order of the values, without decoding: integers, text as UTF-8 bytes, binary strings
ORDER_SAFE_TYPES = frozenset({_TINY, _SHORT, _LONG, _LONGLONG, _INT24, _YEAR, 252, 251, 250, 254, 253, 15})

_ESCAPE_RE = re.compile(rb"[\\\x00\t\n]")
_ESCAPES = {b"\\": b"\\\\", b"\x00": b"\\0", b"\t": b"\\t", b"\n": b"\\n"}
_UNESCAPE_RE = re.compile(rb"\\(.)", re.S)
_UNESCAPES = {b"\\": b"\\", b"0": b"\x00", b"t": b"\t", b"n": b"\n"}


def escape(field: bytes) -> bytes:
    """A field's bytes as the client prints them in batch mode."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], field) if _ESCAPE_RE.search(field) else field


def unescape(field: bytes) -> bytes:
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPES.get(m.group(1), m.group(1)), field) if b"\\" in field else field


def format_row(row: Sequence[bytes | None], masked_index: Sequence[int]) -> bytes:
    """One line from a row's raw field bytes (None: NULL), as the client prints it with the
    server's mask fields."""
    out = [b"NULL" if f is None else escape(f) for f in row]
    for g in range(0, len(masked_index), MASK_BITS):
        mask = 0
        for bit, i in enumerate(masked_index[g:g + MASK_BITS]):
            if row[i] is None:
                mask |= 1 << bit
        out.append(b"%d" % mask)
    return b"\t".join(out) + b"\n"


def mask_expressions(quoted_masked: Sequence[str]) -> list[str]:
    """The SQL of the mask fields over the masked columns (quoted names)."""
    out = []
    for g in range(0, len(quoted_masked), MASK_BITS):
        part = quoted_masked[g:g + MASK_BITS]
        out.append(" | ".join(f"(({c} IS NULL) << {bit})" if bit else f"({c} IS NULL)" for bit, c in enumerate(part)))
    return out


#: the lines of one chunk, each with its newline (a carriage return is not escaped)
iter_lines = split_lines


def encoding_doc(fields: Sequence[tuple[str, int, int, int]], key: Sequence[str]) -> dict:
    """The document of a result's fields ``(name, type code, charset number, flags)``, in line
    order (key columns first)."""
    masked = [name for name, tc, _cs, flags in fields if not flags & 1 and tc not in UNMASKED_TYPES
              and name not in key]
    return {"format": FORMAT, "columns": [f[0] for f in fields], "types": [int(f[1]) for f in fields],
            "binary": [f[2] == 63 for f in fields], "masked": masked, "key": list(key)}


@register
class MyTextCodec(LineRecords):
    """Keys and values of ``mytext`` lines for one stream (see the module doc)."""

    format = FORMAT

    def __init__(self, doc: dict):
        super().__init__(doc)
        self.columns: list[str] = list(doc["columns"])
        self.types: list[int] = [int(t) for t in doc["types"]]
        self.binary: list[bool] = [bool(b) for b in doc["binary"]]
        self.masked: list[str] = list(doc["masked"])
        self.key_columns: list[str] = list(doc["key"])
        if len(self.types) != len(self.columns) or len(self.binary) != len(self.columns) or \
                self.columns[:len(self.key_columns)] != self.key_columns or not self.key_columns:
            raise ValueError("malformed mytext document")
        self.masked_index = [self.columns.index(c) for c in self.masked]
        self.n_fields = len(self.columns) + -(-len(self.masked) // MASK_BITS)
        self.nkey = len(self.key_columns)
        self.single_key = self.nkey == 1
        self.keys_ordered = all(t in ORDER_SAFE_TYPES for t in self.types[:self.nkey])
        self._convert = None

    # -- bytes, no decoding ------------------------------------------------------

    def key_bytes(self, line: bytes) -> bytes:
        end = -1
        for _ in range(self.nkey):
            end = line.find(b"\t", end + 1)
            if end < 0:
                return line[:-1] if line.endswith(b"\n") else line
        return line[:end]

    def split(self, line: bytes) -> list[bytes | None]:
        """The columns' bytes (escapes undone, None for NULL)."""
        parts = (line[:-1] if line.endswith(b"\n") else line).split(b"\t")
        if len(parts) != self.n_fields:
            raise ValueError(f"record has {len(parts)} fields, the stream {self.n_fields}")
        ncol = len(self.columns)
        out: list[bytes | None] = [unescape(p) for p in parts[:ncol]]
        masks = parts[ncol:]
        nulls = set()
        for g, m in enumerate(masks):
            bits = int(m)
            for bit, i in enumerate(self.masked_index[g * MASK_BITS:(g + 1) * MASK_BITS]):
                if bits >> bit & 1:
                    nulls.add(i)
        masked = set(self.masked_index)
        for i, p in enumerate(parts[:ncol]):
            # unmasked: a number, date or time prints NULL only for a NULL; a NOT NULL text is the text
            if i in nulls or (p == b"NULL" and i not in masked and self.types[i] in UNMASKED_TYPES):
                out[i] = None
        return out

    def field_reader(self, name: str) -> Callable[[bytes], bytes | None] | None:
        if name not in self.columns:
            return None
        i = self.columns.index(name)
        return lambda line: self.split(line)[i]

    def chunk_ends(self, records: list[bytes], D: int) -> list[int]:
        # the one per-line step of a snapshot: zlib's CRC-32 (crc32_boundary) without the call
        # around it; a single key column is the text before the first tab
        crc = zlib.crc32
        if self.single_key and len(self.columns) + len(self.masked) > 1:
            return [j for j, line in enumerate(records, 1) if not crc(line[:line.find(b"\t")]) % D]
        key_bytes = self.key_bytes
        return [j for j, line in enumerate(records, 1) if not crc(key_bytes(line)) % D]

    @classmethod
    def same_encoding(cls, a: dict, b: dict) -> bool:
        return all(a.get(k) == b.get(k) for k in ("columns", "types", "binary", "masked", "key"))

    # -- values ------------------------------------------------------------------

    def _converters(self) -> list:
        if self._convert is None:
            try:
                from pymysql import converters
            except ImportError:  # pragma: no cover - PyMySQL is in the mysql extra
                from snapshotter.errors import UsageError
                raise UsageError("reading MariaDB/MySQL records needs PyMySQL: install snapshotter[mysql]") from None
            out = []
            for tc, binary in zip(self.types, self.binary):
                if tc == _JSON or tc in TEXT_TYPES:
                    encoding = None if (binary and tc != _JSON) else "utf-8"
                else:
                    encoding = "ascii"
                conv = converters.decoders.get(tc)
                out.append((encoding, None if conv is converters.through else conv))
            self._convert = out
        return self._convert

    def values(self, line: bytes) -> list:
        """The values PyMySQL gives for the row's columns, in line order."""
        out = []
        for f, (encoding, conv) in zip(self.split(line), self._converters()):
            if f is not None:
                if encoding is not None:
                    f = f.decode(encoding)
                if conv is not None:
                    f = conv(f)
            out.append(f)
        return out

    def decode(self, line: bytes) -> tuple[Any, dict]:
        values = self.values(line)
        key = values[0] if self.single_key else values[:self.nkey]
        return key, dict(zip(self.columns, values))

    def key(self, line: bytes) -> Any:
        values = self.values(line)
        return values[0] if self.single_key else values[:self.nkey]

