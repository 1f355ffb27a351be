"""`snapshotter list` on an S3 repository: whole-process time and HTTP requests.

Starts an S3 endpoint (moto's ThreadedMotoServer, over HTTP on loopback) behind a
request-counting proxy, takes SNAPSHOTS small snapshots of a SQLite source into a
bucket there, then runs `snapshotter list` (a new process each time, as a person or
a script would) RUNS times and prints the median wall time, the requests one run
sends, the CPU time it took (on a loaded machine the wall time is mostly waiting for
a CPU), and the heavy imports it loaded (chromadb, sqlalchemy, numpy must
not be among them).

    python3 scripts/bench_list.py [--snapshots 20] [--runs 5]
"""
from __future__ import annotations

import argparse
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import compile_project  # noqa: E402
from s3_fault_test import proxy_mod, quiet_moto, set_test_credentials  # noqa: E402

from moto.server import ThreadedMotoServer  # noqa: E402

HEAVY = ("chromadb", "sqlalchemy", "numpy")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(work: Path, endpoint: str, snapshots: int) -> Path:
    """A bucket holding ``snapshots`` snapshots; returns the config file listing it."""
    import boto3
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    db = work / "agent.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE kb (id INTEGER PRIMARY KEY, body TEXT)")
    con.executemany("INSERT INTO kb VALUES (?, ?)", [(i, f"fact {i}") for i in range(200)])
    con.commit()
    cfg = work / "snapshotter.toml"
    cfg.write_text(f'[repository]\nurl = "s3://bench/repo"\nendpoint_url = "{endpoint}"\n\n'
                   f'[sources.kb]\nbackend = "sql"\nurl = "sqlite:///{db}"\n', encoding="utf-8")
    cli(cfg, "init")
    for i in range(snapshots):
        con.execute("UPDATE kb SET body = ? WHERE id = ?", (f"fact changed {i}", i))
        con.commit()
        cli(cfg, "snapshot", "--release", f"agent-v{i % 3}")
    con.close()
    return cfg


def cli(cfg: Path, *args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *extra, "-m", "snapshotter", "--config", str(cfg), "--no-progress",
                           *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_list: snapshotter {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshots", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    compile_project()
    set_test_credentials()
    quiet_moto()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    proxy = proxy_mod.FaultProxy(endpoint).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = build(Path(tmp), endpoint, args.snapshots)
            text = cfg.read_text(encoding="utf-8").replace(endpoint, proxy.url)
            cfg.write_text(text, encoding="utf-8")
            times, cpu, requests = [], [], []
            for _ in range(args.runs):
                before = proxy.requests
                used = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                out = cli(cfg, "list", "--json")
                times.append(time.perf_counter() - t0)
                now = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu.append(now.ru_utime - used.ru_utime + now.ru_stime - used.ru_stime)
                requests.append(proxy.requests - before)
            rows = __import__("json").loads(out.stdout)
            imp = cli(cfg, "list", extra=("-X", "importtime"))
            loaded = {line.split("|")[-1].strip().split(".")[0] for line in imp.stderr.splitlines()
                      if line.startswith("import time:") and "|" in line}
            heavy = sorted(set(HEAVY) & loaded)
            print(f"list on S3: {len(rows)} snapshots, median {statistics.median(times):.3f} s of {args.runs} runs "
                  f"(min {min(times):.3f}, max {max(times):.3f}), CPU {statistics.median(cpu):.3f} s, "
                  f"{statistics.median(requests):.0f} HTTP requests "
                  f"per run; heavy imports: {', '.join(heavy) or 'none'}")
    finally:
        proxy.stop()
        server.stop()


if __name__ == "__main__":
    main()
