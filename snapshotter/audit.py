"""The audit log: one record per change to the repository or to a live store
(init, snapshot, mark-good, forget, prune, unlock, restore, reapply), kept as
``audit/<sequence>.json`` and chained by hashes.

Each record names who, where, when, what was asked (secrets removed) and how it
ended, plus ``prev`` (sha256 of the previous record's stored bytes) and
``hash`` (sha256 of its own canonical JSON without ``hash``).  Editing,
removing, renaming or reordering a record breaks the chain, which
``audit verify`` reports as an integrity failure.

What the chain cannot show: a writer who rewrites the whole chain, or removes
records from its end.  Keep the head (``audit verify --json`` → ``head``)
somewhere else, or put the ``audit/`` prefix under S3 Object Lock, when that
matters.

Appending is a create-only write of the next sequence number; a concurrent
appender that got there first makes us read its record and try the next one.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import time
from typing import Any

import os

from .errors import ConfigError, IntegrityError, StoreError
from .names import iso, utcnow, current_user
from .objectstore import ObjectMissing, ObjectStore
from .redaction import redact_text
from .repository import load_json

AUDIT_PREFIX = "audit/"
SEQ_DIGITS = 12
_RECORD_NAME = re.compile(r"^audit/(\d{%d})\.json$" % SEQ_DIGITS)

REDACTED = "***"
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "private")


def record_object(seq: int) -> str:
    return f"{AUDIT_PREFIX}{seq:0{SEQ_DIGITS}d}.json"


def _is_secret_name(name: str) -> bool:
    n = name.lower().replace("-", "_")
    if n in ("key", "keys"):
        # record keys (the KEY argument, docs/forensics.md): what an audit of reapply must show
        return False
    return any(w in n for w in _SECRET_WORDS) or n in ("pwd", "auth") or n.endswith("key") or n.endswith("key_id")


def redact(value: Any, name: str | None = None) -> Any:
    """``value`` with secrets removed: values of options named like a secret, passwords
    inside URLs, AWS key ids.  Containers are walked; other values are kept."""
    if name is not None and _is_secret_name(name) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact_text(str(value))


def canonical_hash(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _store(repo_or_store) -> ObjectStore:
    return getattr(repo_or_store, "store", repo_or_store)


def _exists(store: ObjectStore, seq: int) -> bool:
    return store.stat(record_object(seq)) is not None


def last_sequence(store: ObjectStore, hint: int = 0) -> int:
    """The highest sequence number in use, with O(log n) existence checks instead of
    listing the whole log on every append (the log has no gaps unless tampered with)."""
    if hint > 0 and _exists(store, hint):
        lo = hint
    elif _exists(store, 1):
        lo = 1
    else:
        return 0
    step = 1
    hi = lo + step
    while _exists(store, hi):
        lo, step = hi, step * 2
        hi = lo + step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _exists(store, mid):
            lo = mid
        else:
            hi = mid
    return lo


def check_appendable(repo) -> None:
    """Before a command's work: the audit log can be appended to (its last record read,
    and, in a local folder, ``audit/`` a folder this process may write, or creatable).
    ConfigError (exit 2) otherwise, so a snapshot or a restore is not done first and then
    reported failed for want of its record.  Cannot promise the write itself (a full disk,
    an S3 policy denying puts only): the append still reports those."""
    store = _store(repo)
    where = store.url.rstrip("/") + "/" + AUDIT_PREFIX
    try:
        seq = last_sequence(store)
        if seq:
            store.get(record_object(seq))  # the next record chains onto this one's bytes
    except ObjectMissing:
        pass  # removed meanwhile: the append reads the new last record
    except StoreError as exc:  # what cannot be read (a link in its place is corruption, as it was: exit 3)
        raise ConfigError(f"the audit log {where} cannot be read, so this command's audit record could not be "
                          f"written: {exc.message}; nothing was done (fix the folder's type or permissions)") from exc
    root = getattr(store, "root", None)
    if root is None:
        return
    folder = os.path.join(root, AUDIT_PREFIX.rstrip("/"))
    if os.path.lexists(folder):
        ok, what = os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK), "is not a folder this user may write"
    else:
        ok, what = os.access(root, os.W_OK | os.X_OK), "does not exist and the repository folder is not writable"
    if not ok:
        raise ConfigError(f"the audit log {where} {what}, so this command's audit record could not be written; "
                          f"nothing was done")


def append_audit(repo, command: str, arguments: dict, result: dict, *, user: str | None = None,
                 host: str | None = None) -> dict:
    """Append one record; returns it.

    ``repo`` is a Repository (or an ObjectStore); ``arguments`` what was asked
    (redacted here, so pass them as given); ``result`` at least
    ``{"exit_code": int, "summary": str}`` plus any details (snapshot, incident,
    plan counts).
    """
    store = _store(repo)
    if user is None:
        user = current_user()
    body = {
        "time": iso(utcnow()),
        "user": user,
        "host": host or socket.gethostname(),
        "command": command,
        "arguments": redact(arguments or {}),
        "result": redact(result or {}),
    }
    seq = last_sequence(store)
    for _ in range(200):
        if seq:
            try:
                prev = "sha256:" + hashlib.sha256(store.get(record_object(seq))).hexdigest()
            except ObjectMissing:
                seq = last_sequence(store)
                continue
        else:
            prev = None
        record = {"seq": seq + 1, **body, "prev": prev}
        record["hash"] = "sha256:" + canonical_hash(record)
        data = json.dumps(record, indent=1, ensure_ascii=False).encode() + b"\n"
        if store.put(record_object(seq + 1), data):
            return record
        if store.stat(record_object(seq + 1)) is None:
            # taken, yet no record there (a folder in its place): no other writer will free it
            raise StoreError(f"cannot append {record_object(seq + 1)}: something that is not an audit record "
                             f"is in its place")
        # another run appended first: chain onto its record
        seq = last_sequence(store, hint=seq + 1)
        time.sleep(random.uniform(0, 0.05))
    raise StoreError("could not append to the audit log: too many concurrent writers")


def _sequences(store: ObjectStore) -> tuple[list[int], list[str]]:
    seqs, foreign = [], []
    for info in store.list(AUDIT_PREFIX):
        m = _RECORD_NAME.match(info.name)
        if m:
            seqs.append(int(m.group(1)))
        else:
            foreign.append(info.name)
    seqs.sort()
    return seqs, foreign


def read_audit(repo, limit: int | None = None) -> list[dict]:
    """Records, newest first."""
    store = _store(repo)
    seqs, _ = _sequences(store)
    wanted = list(reversed(seqs))[:limit] if limit else list(reversed(seqs))
    out = []
    for seq in wanted:
        try:
            record = load_json(store.get(record_object(seq)), record_object(seq))
            if not isinstance(record, dict):
                raise IntegrityError("not an object")
            out.append(record)
        except (ObjectMissing, IntegrityError):
            out.append({"seq": seq, "error": "record missing or not JSON (run `snapshotter audit verify`)"})
    return out


def verify_audit(repo) -> dict:
    """``{"ok", "records", "head": {"seq", "hash"} | None, "problems": [{"seq", "object", "problem"}]}``."""
    store = _store(repo)
    seqs, foreign = _sequences(store)
    problems: list[dict] = []

    def problem(seq: int | None, obj: str, text: str) -> None:
        problems.append({"seq": seq, "object": obj, "problem": text})

    for name in foreign:
        problem(None, name, "not an audit record name")
    expected = 1
    prev_bytes: bytes | None = None
    prev_seq = 0
    head = None
    for seq in seqs:
        obj = record_object(seq)
        if seq != expected:
            missing = f"{expected}" if seq == expected + 1 else f"{expected} to {seq - 1}"
            problem(seq, obj, f"record(s) {missing} missing before this one")
        try:
            raw = store.get(obj)
        except ObjectMissing:
            problem(seq, obj, "removed while being read")
            expected, prev_bytes = seq + 1, None
            continue
        try:
            record = load_json(raw, obj)
            if not isinstance(record, dict):
                raise IntegrityError("not an object")
        except IntegrityError:
            problem(seq, obj, "not a JSON record (or nested deeper than any record)")
            expected, prev_bytes, prev_seq = seq + 1, raw, seq
            continue
        if record.get("seq") != seq:
            problem(seq, obj, f"holds record {record.get('seq')!r}: records were renamed or reordered")
        if record.get("hash") != "sha256:" + canonical_hash(record):
            problem(seq, obj, "hash does not match the content: the record was edited")
        if seq == 1:
            if record.get("prev") is not None:
                problem(seq, obj, "first record points to a predecessor: earlier records were removed")
        elif prev_bytes is not None and prev_seq == seq - 1:
            if record.get("prev") != "sha256:" + hashlib.sha256(prev_bytes).hexdigest():
                problem(seq, obj, f"prev does not match record {seq - 1}: the chain is broken")
        expected, prev_bytes, prev_seq = seq + 1, raw, seq
        head = {"seq": seq, "hash": record.get("hash")}
    return {"ok": not problems, "records": len(seqs), "head": head, "problems": problems}
