"""The record-codec layer (:mod:`snapshotter.encoding`): the core finds a stream's codec by
its encoding document's format, without naming any database, and treats the default msgpack
records through the same protocol it uses for a store's own encoding."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from snapshotter import codec
from snapshotter.encoding import MSGPACK, codec_for, same_encoding
from snapshotter.errors import IntegrityError
from snapshotter.restore.plan import BOTH, LIVE, SNAPSHOT, merge, merge_chunked
from snapshotter.streams import boundary_hash, count_records


def _rec(key, value) -> bytes:
    return b"\x92" + codec.pack(key) + codec.pack(value)


def test_an_encoding_declared_by_a_backend_is_found_without_importing_its_client_library():
    # a command that only reads the repository (show, diff, export) decodes such streams
    code = ("import sys\n"
            "from snapshotter.encoding import codec_for\n"
            "rc = codec_for({'format': 'pgtext', 'columns': ['id', 'body'], 'oids': [20, 25], 'key': ['id']})\n"
            "assert rc.key_bytes(b'7\\tx\\n') == b'7'\n"
            "print(type(rc).__module__, 'psycopg' in sys.modules, 'sqlalchemy.engine' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         check=True).stdout.split()
    assert out == ["snapshotter_backends.sql.pgtext", "False", "False"]


def test_an_unknown_encoding_is_a_one_line_integrity_error():
    with pytest.raises(IntegrityError) as exc:
        codec_for({"format": "no-such-encoding"})
    assert exc.value.exit_code == 3 and "no-such-encoding" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(IntegrityError):
        codec_for({"format": "pgtext", "columns": ["id"]})  # a document missing what decoding needs
    with pytest.raises(IntegrityError):
        count_records(b"", {"encoding": {"format": "no-such-encoding"}})


def test_same_encoding():
    doc = {"format": "pgtext", "columns": ["id"], "oids": [20], "key": ["id"]}
    assert same_encoding(doc, dict(doc)) and same_encoding(None, None)
    assert not same_encoding(doc, None) and not same_encoding(doc, {**doc, "oids": [23]})
    assert not same_encoding(doc, {**doc, "format": "other"})


def test_msgpack_records_through_the_codec_protocol():
    recs = [_rec(k, {"v": k * 3, "t": "x" * k}) for k in range(1, 40)]
    raw = b"".join(recs)
    assert list(MSGPACK.iter_records(raw)) == recs and MSGPACK.count_records(raw) == len(recs)
    assert count_records(raw, {}) == len(recs)
    assert MSGPACK.record_end(raw, len(recs[0])) == len(recs[0]) + len(recs[1])
    assert MSGPACK.key(recs[4]) == 5 and MSGPACK.decode(recs[4]) == (5, {"v": 15, "t": "xxxxx"})
    # the boundary rule is the one the writer applies to msgpack records
    assert MSGPACK.key_bytes(recs[4]) == codec.pack(5)
    assert MSGPACK.boundary_hash(codec.pack(5)) == boundary_hash(codec.pack(5))
    assert MSGPACK.chunk_ends(recs, 4) == [j for j, r in enumerate(recs, 1) if not boundary_hash(
        MSGPACK.key_bytes(r)) % 4]
    with pytest.raises(ValueError):
        list(MSGPACK.iter_records(raw[:-1]))


def test_the_block_merge_is_the_generic_merge_for_any_codec():
    snap = {k: {"v": k} for k in range(0, 300)}
    live = dict(snap)
    for k in (0, 5, 77, 150, 299):
        del live[k]
    for k in (3, 100, 200):
        live[k] = {"v": -k}
    live.update({1000: {"v": 1}, 1001: {"v": 2}})
    snap_recs = [_rec(k, snap[k]) for k in sorted(snap)]
    live_recs = [_rec(k, live[k]) for k in sorted(live)]
    chunks = [b"".join(snap_recs[i:i + 37]) for i in range(0, len(snap_recs), 37)]
    batches = [live_recs[i:i + 50] for i in range(0, len(live_recs), 50)]
    seen: list[bytes] = []
    fast = list(merge_chunked(iter(batches), iter(chunks), MSGPACK, seen.append))
    slow = list(merge(iter(live_recs), iter(snap_recs), MSGPACK.key, MSGPACK.key, same_bytes=True))
    assert fast == slow and seen == chunks
    assert sorted((side, MSGPACK.key(lv if side != SNAPSHOT else sv)) for side, lv, sv in fast) == sorted(
        [(SNAPSHOT, k) for k in (0, 5, 77, 150, 299)] + [(BOTH, k) for k in (3, 100, 200)]
        + [(LIVE, 1000), (LIVE, 1001)])
