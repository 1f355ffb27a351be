"""Build a large embedded Chroma collection once, for ``bench_chroma.py --dir``.

The collection is ``bench_chroma.py``'s (random float32 embeddings from a fixed
seed, a short document and three metadata fields each, ids ``doc-00000000``
upwards), written into ``DIR/chroma-RECORDSxDIM`` where ``bench_chroma.py
--records RECORDS --dim DIM --dir DIR`` finds and reuses it.  Building is slow
(Chroma indexes every vector as it is added): the script prints the time of
each step and resumes an interrupted build from the records already there.

    python scripts/build_chroma_big.py --dir big                     # 1,000,000 x 384
    python scripts/build_chroma_big.py --dir big --records 300000    # a step on the way
    python scripts/bench_chroma.py --dir big --records 1000000 --skip-half
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_chroma import COLLECTION, add_records, folder_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="folder for the collection (kept; bench_chroma.py --dir reuses it)")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--report-every", type=int, default=50_000, help="records between progress lines")
    ap.add_argument("--copy-at", default="", help="sizes on the way (e.g. 100000,300000) at which a copy of the "
                                                  "folder is kept as DIR/chroma-SIZExDIM, for smaller benchmarks")
    args = ap.parse_args()

    import chromadb
    path = os.path.join(args.dir, f"chroma-{args.records}x{args.dim}")
    os.makedirs(path, exist_ok=True)
    client = chromadb.PersistentClient(path=path)
    col = client.get_or_create_collection(COLLECTION, embedding_function=None)
    have = col.count()
    if have > args.records:
        sys.exit(f"{path} already holds {have} records, more than {args.records}")
    print(f"building {args.records} x {args.dim} in {path} ({have} already there)", flush=True)
    started = last = time.monotonic()
    done = have
    copies = sorted(int(n) for n in args.copy_at.split(",") if n.strip())
    while done < args.records:
        upto = min(args.records, (done // args.report_every + 1) * args.report_every,
                   *(n for n in copies if n > done))
        add_records(client, col, done, upto, args.dim, args.seed + done)
        now = time.monotonic()
        print(f"  {upto:>9} records  {now - last:7.1f} s for the last {upto - done} "
              f"({(upto - done) / (now - last):.0f}/s), {now - started:7.1f} s in all", flush=True)
        done, last = upto, now
        if done in copies:
            copy = os.path.join(args.dir, f"chroma-{done}x{args.dim}")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(path, copy)  # between two adds: nothing is being written
            print(f"  copied to {copy} ({time.monotonic() - now:.0f} s)", flush=True)
            last = time.monotonic()
    print(f"built {args.records} x {args.dim} in {time.monotonic() - started:.0f} s "
          f"(this run), folder {folder_bytes(path) / 1e6:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
