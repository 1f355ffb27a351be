"""Text tables for a terminal, for what quarantine commands list.

Every cell is one line (control and format characters escaped: a record is what
the agent wrote), widths are measured in terminal cells (an East Asian wide
character or an emoji takes two, a combining mark none), and a cell too wide
for its column loses its middle, not its end: composite keys that share a
prefix (LangGraph's ``["thread-1", "", "1ef…"]``) differ at the end, and a cut
end made them all look the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from rich.cells import cell_len, get_character_cell_size

from ..names import printable

ELLIPSIS = "…"


@dataclass(frozen=True)
class Column:
    header: str
    #: the column is as wide as its widest cell, at most this many terminal cells (None: no
    #: limit, for the last column)
    max_width: int | None = None
    align: str = "<"  # "<" or ">"


def cells(text: str) -> int:
    """Terminal cells ``text`` takes."""
    return cell_len(text)


def _take(chars: Iterable[str], width: int) -> str:
    out, used = [], 0
    for ch in chars:
        w = get_character_cell_size(ch)
        if used + w > width:
            break
        out.append(ch)
        used += w
    return "".join(out)


def fit(text: str, width: int) -> str:
    """``text`` within ``width`` terminal cells: whole when it fits, else its start and its
    end with ``…`` between them (the end gets the larger half: where keys differ)."""
    if cells(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    room = width - 1
    head = _take(text, room // 2)
    tail = _take(reversed(text), room - cells(head))[::-1]
    return head + ELLIPSIS + tail


def pad(text: str, width: int, align: str = "<") -> str:
    gap = " " * max(0, width - cells(text))
    return gap + text if align == ">" else text + gap


def one_line(value) -> str:
    """A value as one line of terminal text: control characters escaped, no length limit
    (the column cuts it)."""
    return printable("" if value is None else value, limit=None)


def render(columns: Sequence[Column], rows: Iterable[Sequence], *, sep: str = "  ") -> Iterator[str]:
    """The header line, then one line per row; cells are made printable and fitted.
    ``rows`` is read twice (widths first), so it is a list."""
    rows = [[one_line(v) for v in row] for row in rows]
    widths = []
    for i, col in enumerate(columns):
        widest = max([cells(col.header)] + [cells(r[i]) for r in rows])
        widths.append(widest if col.max_width is None else max(min(widest, col.max_width), cells(col.header)))
    last = len(columns) - 1

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, (col, v) in enumerate(zip(columns, values)):
            v = fit(v, widths[i])
            parts.append(v if i == last and col.align == "<" else pad(v, widths[i], col.align))
        return sep.join(parts).rstrip()

    yield line([c.header for c in columns])
    for r in rows:
        yield line(r)
