"""Benchmark: snapshotting an embedded Chroma collection against reading it bare.

Builds a collection of ``--records`` random float32 embeddings (``--dim``
wide, fixed seed, a short document and three metadata fields each) in a
PersistentClient folder, plus one of half the size for the memory check, then
runs three times, alternating:

  scan      a bare paged ``collection.get(include=[embeddings, documents,
            metadatas], limit, offset)`` over the whole collection
  snapshot  ``take_snapshot`` of the collection into a fresh local repository
  tar       ``tar -cf - DIR | zstd -3`` of the persist folder

and, to tell the backend's share from the core's, the backend's reader alone
with the records dropped; for memory, a bare client that opens the collection
and reads one record (what Chroma itself holds: the snapshot's peak RSS is
compared with it, target at most 150 MB above).

The snapshot and backend-read children tune the garbage collector as the
``snapshotter`` program does (``snapshotter.cli.GC_THRESHOLDS``); the scan keeps
Python's defaults.  Building, scan and snapshot each run in a child process (the parent stays
small, so a child's peak RSS is its own), timed from opening the client to the
last record (interpreter start and imports excluded), in wall-clock and CPU
seconds; CPU time is the steadier figure on a busy machine (the load average
is printed).  Prints medians, snapshot/scan (target <= 1.25), snapshot peak
RSS at half and full size (target < 600 MB, flat), and repository bytes
against tar|zstd bytes.

    python scripts/bench_chroma.py                     # 100,000 x 384
    python scripts/bench_chroma.py --records 20000 --dir bench-data   # keep and reuse the build
    python scripts/bench_chroma.py --records 1000000 --dir big --skip-half --no-tar  # after build_chroma_big.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COLLECTION = "bench"


def child_build(path: str, records: int, dim: int, seed: int) -> None:
    """The collection at ``path`` (reused when it already holds ``records``)."""
    print(json.dumps({"seconds": build(path, records, dim, seed)}))


def build(path: str, records: int, dim: int, seed: int) -> float:
    import chromadb
    client = chromadb.PersistentClient(path=path)
    names = [c.name for c in client.list_collections()]
    if COLLECTION in names:
        col = client.get_collection(COLLECTION, embedding_function=None)
        if col.count() == records:
            return 0.0
        client.delete_collection(COLLECTION)
    col = client.create_collection(COLLECTION, embedding_function=None)
    started = time.monotonic()
    add_records(client, col, 0, records, dim, seed, progress=True)
    return time.monotonic() - started


def add_records(client, col, start: int, stop: int, dim: int, seed: int, progress: bool = False) -> None:
    """Records ``start`` to ``stop`` (ids ``doc-%08d``) with random embeddings from ``seed``."""
    import numpy as np
    rng = np.random.default_rng(seed)
    step = min(5000, client.get_max_batch_size())
    for first in range(start, stop, step):
        n = min(step, stop - first)
        span = range(first, first + n)
        col.add(ids=[f"doc-{i:08d}" for i in span], embeddings=rng.random((n, dim), dtype=np.float32),
                documents=[f"chunk {i} of the support handbook: refunds, shipping and returns" for i in span],
                metadatas=[{"source": f"handbook-{i % 17}.pdf", "page": i % 400, "score": (i % 1000) / 7}
                           for i in span])
        if progress:
            print(f"  built {first + n}/{stop}", file=sys.stderr, end="\r")
    if progress:
        print(file=sys.stderr)


# -- child processes: each prints one JSON line ------------------------------------

def cpu_seconds() -> float:
    import resource
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_scan(path: str, page: int) -> None:
    import chromadb
    started, cpu = time.monotonic(), cpu_seconds()
    col = chromadb.PersistentClient(path=path).get_collection(COLLECTION, embedding_function=None)
    offset = 0
    while True:
        got = col.get(include=["embeddings", "documents", "metadatas"], limit=page, offset=offset)
        offset += len(got["ids"])
        if len(got["ids"]) < page:
            break
    print(json.dumps({"seconds": time.monotonic() - started, "cpu": cpu_seconds() - cpu, "records": offset,
                      "peak_rss_mb": peak_rss_mb()}))


def child_bare(path: str) -> None:
    """A bare client that opens the collection and reads one record: what Chroma itself
    costs before anything is listed (the baseline of the snapshot's peak RSS)."""
    import chromadb
    col = chromadb.PersistentClient(path=path).get_collection(COLLECTION, embedding_function=None)
    got = col.get(include=["embeddings", "documents", "metadatas"], limit=1)
    assert len(got["ids"]) == 1
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def child_ids(path: str) -> None:
    """A bare ``get(include=[])`` of every id in one request, for reference."""
    import chromadb
    col = chromadb.PersistentClient(path=path).get_collection(COLLECTION, embedding_function=None)
    n = len(col.get(include=[])["ids"])
    print(json.dumps({"records": n, "peak_rss_mb": peak_rss_mb()}))


def as_the_console_program() -> None:
    """The garbage collector tuned as the ``snapshotter`` program tunes it (its young
    generation is collected every 100,000 allocations, not 700): these children call the
    library in-process, and what is measured is what the program's users get.  The bare
    scan keeps Python's defaults, as a user's own script would."""
    import gc
    from snapshotter.cli import GC_THRESHOLDS
    gc.set_threshold(*GC_THRESHOLDS)


def child_snapshot(path: str, repo_dir: str, retries: int) -> None:
    import chromadb  # noqa: F401 - imported before the clock starts, as in the scan
    as_the_console_program()
    from snapshotter.config import parse_config
    from snapshotter.objectstore import open_store
    from snapshotter.repository import Repository
    from snapshotter.snapshot import take_snapshot
    cfg = parse_config({"repository": {"url": repo_dir},
                        "sources": {"memory": {"backend": "chroma", "path": path, "retries": retries}}},
                       os.path.join(repo_dir, "bench.toml"))
    repo, _ = Repository.init(open_store(repo_dir))
    started, cpu = time.monotonic(), cpu_seconds()
    manifest = take_snapshot(repo, cfg, release="bench").doc
    seconds, cpu = time.monotonic() - started, cpu_seconds() - cpu
    src = manifest["sources"]["memory"]
    print(json.dumps({"seconds": seconds, "cpu": cpu, "records": src["streams"][COLLECTION]["records"],
                      "consistency": src["consistency"], "bytes_written": manifest["bytes_written"],
                      "peak_rss_mb": peak_rss_mb()}))


def child_read(path: str, retries: int) -> None:
    """The backend's reader alone, records dropped: what the snapshot costs beyond the core's work."""
    import chromadb  # noqa: F401
    as_the_console_program()
    from snapshotter_backends.chroma import ChromaBackend
    started, cpu = time.monotonic(), cpu_seconds()
    backend = ChromaBackend("memory", {"path": path, "retries": retries})
    n = 0
    with backend.reader() as reader:
        for spec in reader.streams():
            for batch in reader.read(spec):
                n += len(batch)
    print(json.dumps({"seconds": time.monotonic() - started, "cpu": cpu_seconds() - cpu, "records": n,
                      "peak_rss_mb": peak_rss_mb()}))


def run_child(*args: str) -> dict:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"child {args[0]} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def tar_zstd(path: str, out: str) -> dict:
    started = time.monotonic()
    parent, name = os.path.split(os.path.abspath(path))
    with open(out, "wb") as fh:
        tar = subprocess.Popen(["tar", "-cf", "-", "-C", parent, name], stdout=subprocess.PIPE)
        z = subprocess.run(["zstd", "-3", "-q", "-c"], stdin=tar.stdout, stdout=fh, check=True)
        tar.stdout.close()
        if tar.wait() != 0 or z.returncode != 0:
            sys.exit("tar | zstd failed")
    return {"seconds": time.monotonic() - started, "bytes": os.path.getsize(out)}


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scan-page", type=int, default=5000, help="limit of each bare get (<= max batch size)")
    ap.add_argument("--retries", type=int, default=3, help="the chroma source's retries option")
    ap.add_argument("--dir", help="keep the built collections here and reuse them (default: a temp folder)")
    ap.add_argument("--all-ids", action="store_true",
                    help="also the peak RSS of one bare get(include=[]) of every id")
    ap.add_argument("--no-tar", action="store_true", help="no tar | zstd runs (slow on a large folder)")
    ap.add_argument("--skip-half", action="store_true", help="no half-size build (no RSS flatness figure)")
    args = ap.parse_args()

    work = args.dir or tempfile.mkdtemp(prefix="bench-chroma-")
    os.makedirs(work, exist_ok=True)
    full = os.path.join(work, f"chroma-{args.records}x{args.dim}")
    half = os.path.join(work, f"chroma-{args.records // 2}x{args.dim}")
    try:
        print(f"building {args.records} x {args.dim} in {full}", file=sys.stderr)
        built = run_child("build", full, str(args.records), str(args.dim), str(args.seed))["seconds"]
        if not args.skip_half:
            print(f"building {args.records // 2} x {args.dim} in {half}", file=sys.stderr)
            run_child("build", half, str(args.records // 2), str(args.dim), str(args.seed))
        load_before = os.getloadavg()[0]

        scans, reads, snaps, tars, bares = [], [], [], [], []
        repo_bytes = 0
        for run in range(args.runs):
            scans.append(run_child("scan", full, str(args.scan_page)))
            bares.append(run_child("bare", full))
            reads.append(run_child("read", full, str(args.retries)))
            repo_dir = os.path.join(work, f"repo-{run}")
            shutil.rmtree(repo_dir, ignore_errors=True)
            snaps.append(run_child("snapshot", full, repo_dir, str(args.retries)))
            repo_bytes = folder_bytes(repo_dir)
            shutil.rmtree(repo_dir, ignore_errors=True)
            if not args.no_tar:
                tars.append(tar_zstd(full, os.path.join(work, "persist.tar.zst")))
            print(f"  run {run + 1}: scan {scans[-1]['seconds']:.1f}s ({scans[-1]['cpu']:.1f} cpu)  "
                  f"snapshot {snaps[-1]['seconds']:.1f}s ({snaps[-1]['cpu']:.1f} cpu, "
                  f"{snaps[-1]['peak_rss_mb']:.0f} MB)  bare client {bares[-1]['peak_rss_mb']:.0f} MB"
                  + (f"  tar|zstd {tars[-1]['seconds']:.1f}s" if tars else ""), file=sys.stderr)
        half_rss = None
        if not args.skip_half:
            repo_dir = os.path.join(work, "repo-half")
            shutil.rmtree(repo_dir, ignore_errors=True)
            half_rss = run_child("snapshot", half, repo_dir, str(args.retries))["peak_rss_mb"]
            shutil.rmtree(repo_dir, ignore_errors=True)

        scan = statistics.median(s["seconds"] for s in scans)
        snap = statistics.median(s["seconds"] for s in snaps)
        scan_cpu = statistics.median(s["cpu"] for s in scans)
        snap_cpu = statistics.median(s["cpu"] for s in snaps)
        read = statistics.median(s["seconds"] for s in reads)
        read_cpu = statistics.median(s["cpu"] for s in reads)
        rss = max(s["peak_rss_mb"] for s in snaps)
        snap_rss = statistics.median(s["peak_rss_mb"] for s in snaps)
        bare_rss = statistics.median(b["peak_rss_mb"] for b in bares)
        read_rss = statistics.median(r["peak_rss_mb"] for r in reads)
        ids_rss = run_child("ids", full)["peak_rss_mb"] if args.all_ids else None
        print(f"collection      {args.records} x {args.dim} float32 (built in {built:.0f}s; 0 = reused), "
              f"persist folder {folder_bytes(full) / 1e6:.0f} MB")
        print(f"load average    {load_before:.1f} before the runs, {os.getloadavg()[0]:.1f} after "
              f"({os.cpu_count()} CPUs)")
        print(f"scan            {scan:.2f}s, {scan_cpu:.2f} CPU s, median of {args.runs} (page {args.scan_page}; "
              f"peak RSS {max(s['peak_rss_mb'] for s in scans):.0f} MB)")
        print(f"backend read    {read:.2f}s, {read_cpu:.2f} CPU s, median of {args.runs} (records dropped, "
              f"no repository: {read / scan:.2f} x scan wall, {read_cpu / scan_cpu:.2f} x CPU)")
        print(f"snapshot        {snap:.2f}s, {snap_cpu:.2f} CPU s, median of {args.runs} (retries={args.retries}, "
              f"consistency {snaps[0]['consistency']})")
        print(f"snapshot/scan   {snap / scan:.2f} wall, {snap_cpu / scan_cpu:.2f} CPU  (target <= 1.25)")
        print(f"peak RSS        {rss:.0f} MB at {args.records} records"
              + (f", {half_rss:.0f} MB at {args.records // 2}" if half_rss else "") + "  (target < 600 MB, flat)")
        print(f"RSS over bare   snapshot {snap_rss:.0f} MB, backend read {read_rss:.0f} MB, bare client (open, "
              f"read one record) {bare_rss:.0f} MB, medians: snapshot - bare = {snap_rss - bare_rss:.0f} MB "
              f"(target <= 150)" + (f"; one get(include=[]) of every id: {ids_rss:.0f} MB" if ids_rss else ""))
        if tars:
            tar_s = statistics.median(t["seconds"] for t in tars)
            print(f"tar | zstd -3   {tar_s:.2f}s median, {tars[0]['bytes'] / 1e6:.1f} MB")
            print(f"repository      {repo_bytes / 1e6:.1f} MB  ({repo_bytes / tars[0]['bytes']:.2f} x tar|zstd)")
        else:
            print(f"repository      {repo_bytes / 1e6:.1f} MB")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        child_build(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "read":
        child_read(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "bare":
        child_bare(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "ids":
        child_ids(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "scan":
        child_scan(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "snapshot":
        child_snapshot(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
