#!/usr/bin/env python3
"""S3 fault suite: snapshot, restore and verify through a proxy that injects faults.

A moto S3 server runs on a loopback port with the fault proxy of
``tests/s3_fault_proxy.py`` in front of it; the repository's ``endpoint_url``
points at the proxy.  Each iteration, on a fresh bucket and SQLite database:

1. ``snapshot`` through the faults;
2. the agent writes; ``restore`` of that snapshot through the faults;
3. ``verify --read-data`` through the faults.

Besides the transient faults drawn at each rate (500, 503, SlowDown, resets
before and after the request took effect, truncated bodies), a fraction of
chunk GETs is served corrupted and a smaller fraction of requests is answered
403 AccessDenied, which is not retried and so makes commands fail at random
points.

Every command either **completes** (exit 0, and what it claims is checked: the
snapshot verifies, the live table equals the snapshot), **fails cleanly**
(exit 1, one JSON error line on stderr, empty stdout, and nothing
half-committed: ``verify --read-data`` straight against moto passes, every
quarantine bundle has its chunks, the table is either untouched or restored
with its old rows in an incident, and a re-run without faults converges), or,
when a corrupted chunk body was served, **detects it** (exit 3, nothing
written).  Anything else is a **bad outcome**; there must be none.

    python scripts/s3_fault_test.py [--iterations 10] [--rates 0.05,0.15,0.3] [--corrupt 0.02] [--hard 0.005]
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


crash = _load("crash_test", ROOT / "scripts" / "crash_test.py")
proxy_mod = _load("s3_fault_proxy", ROOT / "tests" / "s3_fault_proxy.py")

OPS = ("snapshot", "restore", "verify")


@dataclass
class Outcomes:
    completed: collections.Counter = field(default_factory=collections.Counter)
    failed_cleanly: collections.Counter = field(default_factory=collections.Counter)
    detected: collections.Counter = field(default_factory=collections.Counter)  # corrupt body caught, exit 3
    bad: collections.Counter = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    messages: collections.Counter = field(default_factory=collections.Counter)  # errors of clean failures
    requests: int = 0
    injected: collections.Counter = field(default_factory=collections.Counter)

    def add(self, other: "Outcomes") -> None:
        for f in ("completed", "failed_cleanly", "detected", "bad", "injected", "messages"):
            getattr(self, f).update(getattr(other, f))
        self.problems += other.problems
        self.requests += other.requests

    def line(self, label: str = "s3 faults") -> str:
        total = sum(self.completed.values()) + sum(self.failed_cleanly.values()) + sum(self.detected.values()) \
            + sum(self.bad.values())
        return (f"{label}: {total} commands, {sum(self.completed.values())} completed, "
                f"{sum(self.failed_cleanly.values())} failed cleanly, {sum(self.detected.values())} corrupt reads "
                f"detected, {sum(self.bad.values())} bad outcomes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_moto() -> None:
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)


def set_test_credentials() -> None:
    # moto accepts any key; these never leave the loopback interface
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)


def clean_error(r) -> str | None:
    """Why a failed --json command's output is not the contract's (None when it is): one
    JSON error line with the exit code on stderr, other stderr lines only ``snapshotter:``
    notices, no traceback; stdout empty, or one JSON document when the work itself was
    done and only its bookkeeping (the audit record) failed."""
    if "Traceback" in r.err:
        return "traceback on stderr"
    if r.out.strip():
        try:
            json.loads(r.out)
        except ValueError:
            return f"stdout is not one JSON document: {r.out.strip()[:200]}"
    errors, others = [], []
    for line in filter(str.strip, r.err.splitlines()):
        try:
            errors.append(json.loads(line)["error"])
        except (ValueError, KeyError, TypeError):
            others.append(line)
    if len(errors) != 1:
        return f"{len(errors)} JSON errors on stderr: {r.err.strip()[:300]}"
    if errors[0].get("exit_code") != r.code or not errors[0].get("message") or "\n" in errors[0]["message"]:
        return f"the JSON error does not match exit code {r.code}: {errors[0]}"
    stray = [line for line in others if not line.startswith("snapshotter: ")]
    if stray:
        return f"unexpected stderr: {stray[0][:200]}"
    return None


class Iteration:
    """One bucket, one SQLite database, two config files: through the proxy and straight to moto."""

    def __init__(self, workdir: Path, upstream: str, proxy, *, rows: int, seed: int):
        import boto3
        self.workdir = workdir
        self.proxy = proxy
        self.rnd = random.Random(seed)
        self.out = Outcomes()
        workdir.mkdir(parents=True, exist_ok=True)
        self.bucket = "faults-" + secrets.token_hex(4)
        boto3.client("s3", endpoint_url=upstream, region_name="us-east-1").create_bucket(Bucket=self.bucket)
        self.db = crash.SQLKind("sqlite")
        self.db.setup(workdir, self.rnd, rows)
        source = f"\n[sources.{crash.SOURCE}]\n{self.db.section()}"
        repo = f'[repository]\nurl = "s3://{self.bucket}/repo"\nregion = "us-east-1"\n'
        self.faulty = workdir / "faulty.toml"
        self.direct = workdir / "direct.toml"
        self.faulty.write_text(repo + f'endpoint_url = "{proxy.url}"\n' + source)
        self.direct.write_text(repo + f'endpoint_url = "{upstream}"\n' + source)

    def cli(self, config: Path, *args: str):
        return crash.run_cli(config, "--json", *args)

    def repo(self):
        from snapshotter.config import load_config
        from snapshotter.repository import open_repository
        cfg = load_config(str(self.direct))
        return open_repository(cfg.repository_url, endpoint_url=cfg.endpoint_url, region=cfg.region)

    def problem(self, op: str, text: str) -> None:
        self.out.bad[op] += 1
        self.out.problems.append(f"{op}: {text}")

    def whole(self, op: str) -> bool:
        """Nothing half-committed: every snapshot verifies with data, every bundle has its chunks."""
        v = self.cli(self.direct, "verify", "--all", "--read-data")
        if v.code != 0:
            self.problem(op, f"verify against the store itself fails: {v.out.strip()[:300]} {v.err.strip()[:300]}")
            return False
        from snapshotter.quarantine import bundles, iter_records
        repo = self.repo()
        for b in bundles(repo):
            try:
                sum(1 for _ in iter_records(repo, b))
            except Exception as exc:  # noqa: BLE001 - any failure to read a committed bundle is the finding
                self.problem(op, f"incident {b['incident']} cannot be read back: {exc}")
                return False
        return True

    def classify(self, op: str, r, corrupt_served: bool) -> str:
        if r.code == 0:
            self.out.completed[op] += 1
            return "completed"
        why = clean_error(r)
        if why:
            self.problem(op, f"exit {r.code}, {why}")
            return "bad"
        message = next(json.loads(line)["error"]["message"] for line in r.err.splitlines()
                       if line.startswith('{"error"'))
        self.out.messages[f"{op} exit {r.code}: " + re.sub(r"[0-9a-f]{12,}|\d{8}T\d{6}Z-[0-9a-f]{6}|faults-[0-9a-f]+",
                                                           "…", message)[:160]] += 1
        if r.code == 3 and corrupt_served:
            self.out.detected[op] += 1
            return "detected"
        if r.code == 1:
            self.out.failed_cleanly[op] += 1
            return "failed"
        self.problem(op, f"exit {r.code}: {r.err.strip()[:300]}")
        return "bad"

    def through_faults(self, op: str, *args: str):
        before = self.proxy.injected["corrupt"]
        r = self.cli(self.faulty, *args)
        return r, self.proxy.injected["corrupt"] > before

    def run(self, rate: float, corrupt: float, hard: float = 0.0) -> Outcomes:
        self.proxy.configure(rate=0.0, corrupt=0.0, hard=0.0)
        assert self.cli(self.direct, "init").code == 0
        requests_before = self.proxy.requests
        injected_before = collections.Counter(self.proxy.injected)
        self.proxy.configure(rate=rate, corrupt=corrupt, hard=hard)
        try:
            self._snapshot_restore_verify()
        finally:
            self.proxy.configure(rate=0.0, corrupt=0.0, hard=0.0)
            self.out.requests += self.proxy.requests - requests_before
            self.out.injected.update(collections.Counter(self.proxy.injected) - injected_before)
            self.db.teardown()
        return self.out

    def _snapshot_restore_verify(self) -> None:
        # 1. snapshot
        r, corrupt_served = self.through_faults("snapshot", "snapshot", "--release", "r1")
        state = self.classify("snapshot", r, corrupt_served)
        if state == "bad" or not self.whole("snapshot"):
            return
        if state == "completed":
            snap_id = r.json()["id"]
        else:
            d = self.cli(self.direct, "snapshot", "--release", "r1")
            if d.code != 0:
                self.problem("snapshot", f"a snapshot without faults after a failed one exits {d.code}: {d.err}")
                return
            snap_id = d.json()["id"]
        snapshot_raw = self.db.raw_state()

        # 2. the agent writes; restore through the faults
        self.db.mutate(self.rnd)
        pre_raw = self.db.raw_state()
        pre = crash.live_records(self.faulty)
        r, corrupt_served = self.through_faults("restore", "restore", snap_id, "--yes", "--incident", "inc-1")
        state = self.classify("restore", r, corrupt_served)
        after = self.db.raw_state()
        if state == "completed" and after != snapshot_raw:
            self.problem("restore", "exit 0 but the table differs from the snapshot")
        elif state in ("failed", "detected"):
            if after not in (pre_raw, snapshot_raw):
                self.problem("restore", f"exit {r.code} left the table neither as it was nor restored")
            elif state == "detected" and after != pre_raw:
                self.problem("restore", "a corrupt read was reported but the table was changed")
        if state == "bad" or not self.whole("restore"):
            return
        if state != "completed":
            again = self.cli(self.direct, "restore", snap_id, "--yes")
            if again.code != 0 or self.db.raw_state() != snapshot_raw:
                self.problem("restore", f"a re-run without faults does not converge (exit {again.code}: "
                                        f"{again.err.strip()[:200]})")
                return
        repo = self.repo()
        from snapshotter.quarantine import bundles
        incidents = bundles(repo)
        snap_records = crash.snapshot_records(repo, repo.load_manifest(repo.resolve(snap_id)))
        lost = crash.lost_writes(repo, snap_records, pre, incidents)
        if lost:
            self.problem("restore", f"{len(lost)} record(s) written after the snapshot are in no incident")

        # 3. verify with data through the faults
        r, corrupt_served = self.through_faults("verify", "verify", "--read-data", "--all")
        state = self.classify("verify", r, corrupt_served)
        if state == "completed" and corrupt_served and not self.proxy.corrupt_keeps_checksums:
            self.problem("verify", "a corrupted chunk body was served and verify passed")
        if state != "bad" and state != "completed":
            self.whole("verify")


class FaultBench:
    """A moto server and the proxy in front of it, for the whole run."""

    def __init__(self, seed: int = 0):
        from moto.server import ThreadedMotoServer
        set_test_credentials()
        quiet_moto()
        port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.upstream = f"http://127.0.0.1:{port}"
        self.proxy = proxy_mod.FaultProxy(self.upstream, seed=seed).start()

    def close(self) -> None:
        self.proxy.stop()
        self.server.stop()


def run_rate(bench, workdir: Path, *, rate: float, corrupt: float, hard: float, iterations: int, rows: int,
             seed: int, log=print) -> Outcomes:
    total = Outcomes()
    for i in range(iterations):
        it = Iteration(workdir / f"rate{rate}-{i}", bench.upstream, bench.proxy, rows=rows, seed=seed * 7919 + i)
        out = it.run(rate, corrupt, hard)
        for p in out.problems:
            log(f"  PROBLEM rate {rate} iteration {i}: {p}")
        total.add(out)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description="snapshot, restore and verify through an S3 fault-injecting proxy")
    ap.add_argument("--iterations", type=int, default=10, help="iterations per fault rate")
    ap.add_argument("--rates", default="0.05,0.15,0.3", help="comma-separated fractions of requests that fail")
    ap.add_argument("--corrupt", type=float, default=0.02, help="fraction of chunk GETs served with a flipped byte")
    ap.add_argument("--hard", type=float, default=0.005,
                    help="fraction of requests answered 403 AccessDenied (not retried: the command must fail cleanly)")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    bench = FaultBench(seed=args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="snapshotter-s3-faults-"))
    grand = Outcomes()
    started = time.time()
    try:
        for rate in rates:
            t = time.time()
            out = run_rate(bench, workdir, rate=rate, corrupt=args.corrupt, hard=args.hard,
                           iterations=args.iterations, rows=args.rows, seed=args.seed)
            grand.add(out)
            faults = ", ".join(f"{k} {v}" for k, v in sorted(out.injected.items()))
            print(f"  rate {rate:.2f}: {out.line('')[2:]} ({out.requests} requests; injected: {faults}; "
                  f"{time.time() - t:.0f}s)", flush=True)
            for op in OPS:
                print(f"    {op:<8} completed {out.completed[op]:>3}  failed cleanly {out.failed_cleanly[op]:>3}  "
                      f"corrupt detected {out.detected[op]:>3}  bad {out.bad[op]:>3}", flush=True)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print("  how clean failures read (most frequent first):")
    for message, n in grand.messages.most_common(8):
        print(f"    {n:>3} x {message}")
    print(f"{grand.requests} requests; corrupt fraction {args.corrupt}, 403 fraction {args.hard}; "
          f"{time.time() - started:.0f}s")
    print(grand.line())
    return 1 if sum(grand.bad.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
