"""Exact, compact encoding of records (msgpack with a few extension types).

A record is ``[key, value]``.  Values are JSON-like Python data plus the types
databases and vector stores hand back; each of those gets an extension type
so it decodes to exactly what went in:

====  ==================  ==========================================
code  Python type         payload
====  ==================  ==========================================
1     datetime            ISO 8601 text (offset kept when aware)
2     date                ISO 8601 text
3     time                ISO 8601 text (offset kept when aware)
4     Decimal             its exact text (``str(d)``)
5     timedelta           msgpack [days, seconds, microseconds]
6     UUID                16 raw bytes
7     float32 vector      little-endian IEEE 754 binary32, raw
8     int beyond 64 bits  decimal text
====  ==================  ==========================================

Dict order is preserved as given; backends that read JSON whose key order is
not meaningful pass it through :func:`canonical` so equal values encode to
equal bytes (digests and plans compare bytes, not objects).
"""
from __future__ import annotations

import datetime as _dt
import decimal
import threading
import uuid
from typing import Any

import sys

import msgpack

EXT_DATETIME, EXT_DATE, EXT_TIME, EXT_DECIMAL, EXT_TIMEDELTA, EXT_UUID, EXT_F32, EXT_BIGINT = range(1, 9)

_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


# msgpack.ExtType(code, data) re-checks its arguments in Python on every call;
# the hot branches below build the same tuple directly (their arguments are
# valid by construction), which matters because this hook runs once for every
# timestamp, decimal and UUID a database hands over.
_ExtType = msgpack.ExtType
_new_tuple = tuple.__new__


def _default(obj: Any):
    t = type(obj)
    if t is _dt.datetime:
        return _new_tuple(_ExtType, (EXT_DATETIME, obj.isoformat().encode()))
    if t is decimal.Decimal:
        return _new_tuple(_ExtType, (EXT_DECIMAL, str(obj).encode()))
    if t is _dt.date:
        return _new_tuple(_ExtType, (EXT_DATE, obj.isoformat().encode()))
    if t is _dt.time:
        return _new_tuple(_ExtType, (EXT_TIME, obj.isoformat().encode()))
    if t is uuid.UUID:
        return _new_tuple(_ExtType, (EXT_UUID, obj.bytes))
    if t is _dt.timedelta:
        return _new_tuple(_ExtType, (EXT_TIMEDELTA, msgpack.packb([obj.days, obj.seconds, obj.microseconds])))
    np = sys.modules.get("numpy")  # not imported for it: an array can only come from a loaded numpy
    if np is not None and isinstance(obj, np.ndarray):
        return msgpack.ExtType(EXT_F32, np.ascontiguousarray(obj, dtype="<f4").tobytes())
    if isinstance(obj, int):  # only reached when out of msgpack's range, or an int subclass (bool is handled natively)
        if _INT64_MIN <= obj <= _UINT64_MAX:
            return int(obj)
        return msgpack.ExtType(EXT_BIGINT, str(int(obj)).encode())
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, memoryview):
        return obj.tobytes()
    if isinstance(obj, bytearray):
        return bytes(obj)
    if isinstance(obj, _dt.datetime):  # subclasses (pendulum and friends)
        return msgpack.ExtType(EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, _dt.date):
        return msgpack.ExtType(EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, str):
        return str(obj)
    raise TypeError(f"cannot encode value of type {t.__name__}")


def _ext_hook(code: int, data: bytes):
    if code == EXT_DATETIME:
        return _dt.datetime.fromisoformat(data.decode())
    if code == EXT_DATE:
        return _dt.date.fromisoformat(data.decode())
    if code == EXT_TIME:
        return _dt.time.fromisoformat(data.decode())
    if code == EXT_DECIMAL:
        return decimal.Decimal(data.decode())
    if code == EXT_TIMEDELTA:
        d, s, us = msgpack.unpackb(data)
        return _dt.timedelta(days=d, seconds=s, microseconds=us)
    if code == EXT_UUID:
        return uuid.UUID(bytes=data)
    if code == EXT_F32:
        import numpy as np
        return np.frombuffer(data, dtype="<f4").copy()
    if code == EXT_BIGINT:
        return int(data.decode())
    return msgpack.ExtType(code, data)


_local = threading.local()

#: how stored text that is not UTF-8 is read (see :func:`_packer`)
UNICODE_ERRORS = "surrogateescape"


def is_text(value: str) -> bool:
    """Whether a str is text that can be written as UTF-8 (not bytes kept by surrogateescape)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown_text(value: str) -> str:
    """A str for output: itself, or when it holds bytes that are not UTF-8 (a Redis session
    key), the base64 of those bytes."""
    import base64
    return value if is_text(value) else base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()


def _packer() -> msgpack.Packer:
    p = getattr(_local, "packer", None)
    if p is None:
        # surrogateescape: text holding bytes that were not UTF-8 (a Redis key, as
        # ``surrogateescape`` decoded it) is stored as those very bytes and read back the same
        p = _local.packer = msgpack.Packer(default=_default, use_bin_type=True, datetime=False,
                                           unicode_errors="surrogateescape")
    return p


def pack(obj: Any) -> bytes:
    return _packer().pack(obj)


def packer() -> msgpack.Packer:
    """This thread's packer, for loops that pack many objects (same bytes as :func:`pack`)."""
    return _packer()


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True,
                           unicode_errors=UNICODE_ERRORS)


def unpacker(data: bytes) -> msgpack.Unpacker:
    """Iterates over the objects packed one after another in ``data``."""
    u = msgpack.Unpacker(None, ext_hook=_ext_hook, raw=False, strict_map_key=False, use_list=True,
                         max_buffer_size=max(len(data), 1024 * 1024), unicode_errors=UNICODE_ERRORS)
    u.feed(data)
    return u


def encode_record(key: Any, value: Any) -> bytes:
    return _packer().pack([key, value])


def canonical(value: Any) -> Any:
    """JSON-like data with every dict's keys in sorted order (recursively)."""
    t = type(value)
    if t is dict:
        return {k: canonical(value[k]) for k in sorted(value, key=str)}
    if t is list or t is tuple:
        return [canonical(v) for v in value]
    return value


def key_text(key: Any) -> str:
    """A key as users type it on the command line: its JSON text."""
    import json
    return json.dumps(key, ensure_ascii=False, default=str)


def to_json(value: Any) -> Any:
    """A decoded value as JSON data (docs/forensics.md: embeddings as lists, bytes as base64, times ISO 8601)."""
    import base64
    t = type(value)
    if t is dict:
        return {shown_text(str(k)): to_json(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [to_json(v) for v in value]
    if t is str:
        return shown_text(value)
    if t in (int, bool) or value is None:
        return value
    if t is float:
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if t is bytes:
        return base64.b64encode(value).decode()
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return [float(x) for x in value.tolist()]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if t is decimal.Decimal:
        return str(value)
    if t is _dt.timedelta:
        return value.total_seconds()
    if t is uuid.UUID:
        return str(value)
    if isinstance(value, msgpack.ExtType):
        return {"ext": value.code, "data": base64.b64encode(value.data).decode()}
    return str(value)
