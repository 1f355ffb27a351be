"""Checking that snapshots are whole: every referenced object present, and with
``read_data`` every chunk re-hashed, every record counted and every stream's
digest recomputed."""
from __future__ import annotations


from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from . import hashing
from .errors import IntegrityError, NotFound
from .documents import ChunkRow, SourceEntry
from .quarantine import bundle_object, open_bundle
from .repository import Repository, SnapshotRef, chunk_object
from .streams import count_records


def verify(repo: Repository, refs: Iterable[SnapshotRef], *, read_data: bool = False,
           progress: Callable[[int], None] | None = None, incidents: Iterable[str] = ()) -> dict:
    """Every object the snapshots ``refs`` (and the quarantine bundles ``incidents``: the
    evidence of past restores) reference is present with its recorded size, and with
    ``read_data`` intact."""
    problems: list[dict] = []
    checked = 0
    checked_incidents = 0
    stat_cache: dict[str, int | None] = {}
    verified_lists: set[tuple] = set()

    def stat_size(c: ChunkRow) -> "int | None | IntegrityError":
        try:
            info = repo.store.stat(chunk_object(c.id))
        except IntegrityError as exc:
            return exc
        return None if info is None else info.size

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="verify") as pool:
        def check_streams(owner: dict, obj: str, sources: "dict[str, SourceEntry]") -> None:
            def problem(o: str, text: str) -> None:
                problems.append({**owner, "object": o, "problem": text})

            for sname, src in sources.items():
                for stname, st in src.streams.items():
                    where = f"{sname}/{stname}"
                    chunks = st.chunks  # rows were checked when the document was loaded
                    if sum(c.records for c in chunks) != st.records:
                        problem(obj, f"{where}: chunk record counts add up to "
                                f"{sum(c.records for c in chunks)}, manifest says {st.records}")
                    if sum(c.raw_bytes for c in chunks) != st.bytes:
                        problem(obj, f"{where}: chunk sizes add up to "
                                f"{sum(c.raw_bytes for c in chunks)}, manifest says {st.bytes}")
                    todo = [c for c in chunks if c.id not in stat_cache]
                    for c, size in zip(todo, pool.map(stat_size, todo)):
                        stat_cache[c.id] = size
                    for c in chunks:
                        size = stat_cache[c.id]
                        if isinstance(size, IntegrityError):  # a link in place of the chunk or its folder
                            problem(chunk_object(c.id), f"{where}: {size.message}")
                        elif size is None:
                            problem(chunk_object(c.id), f"{where}: missing")
                        elif size != c.stored_bytes:
                            problem(chunk_object(c.id), f"{where}: size {size}, manifest says {c.stored_bytes}")
                    if read_data:
                        sig = (tuple(c.id for c in chunks), st.digest)
                        if sig in verified_lists:
                            continue
                        if _read_stream_data(repo, pool, where, chunks, st, problem, progress):
                            verified_lists.add(sig)

        for ref in refs:
            try:
                manifest = repo.manifest(ref)
                repo.check_digests(manifest)
            except (IntegrityError, NotFound) as exc:
                problems.append({"snapshot": ref.id, "object": ref.object, "problem": exc.message})
                continue
            checked += 1
            check_streams({"snapshot": ref.id}, ref.object, manifest.sources)
        for incident in incidents:
            try:
                bundle = open_bundle(repo, incident)
                repo.check_digests(bundle)
            except (IntegrityError, NotFound) as exc:
                problems.append({"snapshot": None, "incident": incident, "object": bundle_object(incident),
                                 "problem": exc.message})
                continue
            checked_incidents += 1
            check_streams({"snapshot": None, "incident": incident}, bundle_object(incident), bundle.sources)
    return {"ok": not problems, "checked": checked, "incidents_checked": checked_incidents, "problems": problems}


def _read_stream_data(repo, pool, where, chunks, st, problem, progress) -> bool:
    alg = repo.hash  # check_digests made sure the digest is of this hash
    h = hashing.new(alg)
    ok = True
    futures: deque = deque()
    it = iter(chunks)

    def fetch(c: ChunkRow):
        return repo.get_chunk(c.id, c.raw_bytes)

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
            problem(chunk_object(c.id), f"{where}: {exc.message}")
            ok = False
            continue
        h.update(raw)
        n = count_records(raw, st.doc)
        if n != c.records:
            problem(chunk_object(c.id), f"{where}: holds {n} records, manifest says {c.records}")
            ok = False
        if len(raw) != c.raw_bytes:
            problem(chunk_object(c.id), f"{where}: holds {len(raw)} bytes, manifest says {c.raw_bytes}")
            ok = False
        if progress:
            progress(1)
    if ok and hashing.digest_string(alg, h) != st.digest:
        problem("", f"{where}: stream digest does not match the manifest")
        ok = False
    return ok


def require_ok(report: dict) -> None:
    if not report["ok"]:
        first = report["problems"][0]
        raise IntegrityError(f"{len(report['problems'])} problem(s); first: "
                             f"{first['object'] or first['snapshot']}: {first['problem']}")
