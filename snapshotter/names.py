"""Validation of user-chosen names, snapshot ids, and times given on the command line."""
from __future__ import annotations

import datetime as _dt
import re
import secrets

from .errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SNAPSHOT_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def check_name(kind: str, value: str) -> str:
    """Release, incident, source and label values: refused (exit 2) before any I/O."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        shown = quoted(value if isinstance(value, str) else repr(value), limit=80)
        raise UsageError(f"invalid {kind} name {shown}: use 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return value


def parse_label(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise UsageError(f"invalid label {text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    check_name("label key", k)
    check_name("label value", v)
    return k, v


ID_TIME = "%Y%m%dT%H%M%SZ"


def new_snapshot_id(now: _dt.datetime | None = None) -> str:
    now = now or utcnow()
    return now.strftime(ID_TIME) + "-" + secrets.token_hex(3)


def snapshot_id_time(snapshot_id: str) -> _dt.datetime:
    """The UTC time, to the second, a snapshot id starts with (20261129T101500Z-...)."""
    return _dt.datetime.strptime(snapshot_id[:16], ID_TIME).replace(tzinfo=_dt.timezone.utc)


def new_incident_id(now: _dt.datetime | None = None) -> str:
    now = now or utcnow()
    return "inc-" + now.strftime(ID_TIME) + "-" + secrets.token_hex(3)


def current_user() -> str:
    """Who runs this command, for manifests, bundles, locks and audit records."""
    import getpass
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry, no LOGNAME: still record something
        return "unknown"


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def iso(ts: _dt.datetime) -> str:
    return ts.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> _dt.datetime:
    ts = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=_dt.timezone.utc)
    return ts


_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> _dt.timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w``; ``0`` is zero."""
    text = text.strip()
    if text == "0":
        return _dt.timedelta(0)
    m = _REL.match(text)
    if not m:
        raise UsageError(f"invalid duration {text!r}: expected a number and one of s, m, h, d, w (e.g. 2h)")
    return _dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def parse_time(text: str, *, now: _dt.datetime | None = None) -> _dt.datetime:
    """A TIME given on the command line: ISO 8601 (``2026-11-29T10:15:00Z``,
    ``2026-11-29T11:15:00+01:00``) or relative to now (``2h`` = two hours ago).
    An ISO time without a zone is local time (``TZ``), as a person at a terminal means
    it; the result is always aware, in UTC."""
    text = text.strip()
    if _REL.match(text):
        return (now or _dt.datetime.now(_dt.timezone.utc)) - parse_duration(text)
    try:
        ts = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        # a naive time is read as local time; astimezone() raises for years it cannot place
        return ts.astimezone(_dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"invalid time {text!r}: expected ISO 8601 (2026-11-29T10:15:00Z; without a zone: "
                         f"local time) or relative (2h)") from None


def quoted(value, limit: int | None = 200) -> str:
    """A name as shown in a message: in quotes, readable in any script (``'ünï'``), its
    control and format characters escaped as :func:`printable` does.  Not ``repr``,
    whose escapes a message's own escaping would double."""
    return f"'{printable(value, limit)}'"


def printable(value, limit: int | None = 200) -> str:
    """``value`` as text safe to show on one line of a terminal or a log: control and
    format characters (newlines, escapes, NUL, bidirectional overrides) become visible
    escapes (``\\n``, ``\\x1b``, ``\\u202e``), and text longer than ``limit`` is cut,
    saying how much was left out.  For every field shown from a repository object (a
    lock, a manifest, a bundle, an audit record): those are anyone's to write."""
    import unicodedata
    text = value if isinstance(value, str) else str(value)
    if limit is not None and len(text) > limit:
        text = f"{text[:limit]}…(+{len(text) - limit} characters)"
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or (ch == " "):
            out.append(ch)
        elif unicodedata.category(ch) in ("Zs",):
            out.append(" ")
        else:
            esc = ch.encode("unicode_escape").decode("ascii")
            out.append(esc if esc != ch else f"\\u{ord(ch):04x}")
    return "".join(out)
