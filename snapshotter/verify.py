"""Checking that snapshots are whole: every referenced object present, and with
``read_data`` every chunk re-hashed, every record counted and every stream's
digest recomputed."""
from __future__ import annotations


from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from . import hashing
from .errors import IntegrityError, NotFound
from .repository import Repository, SnapshotRef, chunk_object
from .streams import ChunkRef, count_records


def verify(repo: Repository, refs: Iterable[SnapshotRef], *, read_data: bool = False,
           progress: Callable[[int], None] | None = None) -> dict:
    problems: list[dict] = []
    checked = 0
    stat_cache: dict[str, int | None] = {}
    verified_lists: set[tuple] = set()

    def problem(snapshot: str, obj: str, text: str) -> None:
        problems.append({"snapshot": snapshot, "object": obj, "problem": text})

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="verify") as pool:
        for ref in refs:
            try:
                manifest = repo.load_manifest(ref)
                repo.check_digests(manifest)
            except (IntegrityError, NotFound) as exc:
                problem(ref.id, ref.object, exc.message)
                continue
            checked += 1
            for sname, src in manifest.get("sources", {}).items():
                for stname, st in src.get("streams", {}).items():
                    where = f"{sname}/{stname}"
                    try:
                        chunks = [ChunkRef.from_json(c) for c in st.get("chunks", [])]
                    except (TypeError, ValueError, IndexError):
                        problem(ref.id, ref.object, f"{where}: malformed chunk list")
                        continue
                    if sum(c.records for c in chunks) != st.get("records"):
                        problem(ref.id, ref.object, f"{where}: chunk record counts add up to "
                                f"{sum(c.records for c in chunks)}, manifest says {st.get('records')}")
                    if sum(c.raw_bytes for c in chunks) != st.get("bytes"):
                        problem(ref.id, ref.object, f"{where}: chunk sizes add up to "
                                f"{sum(c.raw_bytes for c in chunks)}, manifest says {st.get('bytes')}")
                    todo = [c for c in chunks if c.id not in stat_cache]
                    for c, info in zip(todo, pool.map(lambda c: repo.store.stat(chunk_object(c.id)), todo)):
                        stat_cache[c.id] = None if info is None else info.size
                    for c in chunks:
                        size = stat_cache[c.id]
                        if size is None:
                            problem(ref.id, chunk_object(c.id), f"{where}: missing")
                        elif size != c.stored_bytes:
                            problem(ref.id, chunk_object(c.id), f"{where}: size {size}, manifest says {c.stored_bytes}")
                    if read_data:
                        sig = (tuple(c.id for c in chunks), st.get("digest"))
                        if sig in verified_lists:
                            continue
                        if _read_stream_data(repo, pool, ref.id, where, chunks, st, problem, progress):
                            verified_lists.add(sig)
    return {"ok": not problems, "checked": checked, "problems": problems}


def _read_stream_data(repo, pool, snapshot_id, where, chunks, st, problem, progress) -> bool:
    alg = repo.hash  # check_digests made sure the digest is of this hash
    h = hashing.new(alg)
    ok = True
    futures: deque = deque()
    it = iter(chunks)

    def fetch(c: ChunkRef):
        return repo.get_chunk(c.id)

    for c in it:
        futures.append((c, pool.submit(fetch, c)))
        if len(futures) >= 6:
            break
    while futures:
        c, fut = futures.popleft()
        nxt = next(it, None)
        if nxt is not None:
            futures.append((nxt, pool.submit(fetch, nxt)))
        try:
            raw = fut.result()
        except (IntegrityError, NotFound) as exc:
            # a store that fails to answer is not a finding about the data: that error ends verify (exit 1)
            problem(snapshot_id, chunk_object(c.id), f"{where}: {exc.message}")
            ok = False
            continue
        h.update(raw)
        n = count_records(raw, st)
        if n != c.records:
            problem(snapshot_id, chunk_object(c.id), f"{where}: holds {n} records, manifest says {c.records}")
            ok = False
        if len(raw) != c.raw_bytes:
            problem(snapshot_id, chunk_object(c.id), f"{where}: holds {len(raw)} bytes, manifest says {c.raw_bytes}")
            ok = False
        if progress:
            progress(1)
    if ok and hashing.digest_string(alg, h) != st.get("digest"):
        problem(snapshot_id, "", f"{where}: stream digest does not match the manifest")
        ok = False
    return ok


def require_ok(report: dict) -> None:
    if not report["ok"]:
        first = report["problems"][0]
        raise IntegrityError(f"{len(report['problems'])} problem(s); first: {first['object'] or first['snapshot']}: {first['problem']}")
