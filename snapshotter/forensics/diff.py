"""The field-level diff of a quarantined record's snapshot and live versions.

Diffs are for reading: values in them are previews (long text trimmed to the
changed region, embeddings summarised as distances).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import sys
from typing import Any

from .. import codec
from ..streams import StoredRecord


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
