"""The crash suite, short: kill -9 at random moments of snapshot and restore on each
source kind (scripts/crash_test.py runs the long version and prints the figures)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crash_test.py"


def _load():
    spec = importlib.util.spec_from_file_location("crash_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crash_test", module)
    spec.loader.exec_module(module)
    return module


crash = _load()


def run(kind, tmp_path, trials: int, seed: int):
    lines: list[str] = []
    tally = crash.run_kind(kind, tmp_path / kind.name, trials=trials, size=3000, seed=seed, log=lines.append)
    assert tally.trials == trials
    assert tally.problems == [], "\n".join(lines)
    assert (tally.corrupt_snapshots, tally.non_converging, tally.lost_writes) == (0, 0, 0), "\n".join(lines)
    return tally


def test_crash_sqlite(tmp_path):
    run(crash.SQLKind("sqlite"), tmp_path, trials=3, seed=101)


def test_crash_postgresql(tmp_path, pg_url):
    run(crash.SQLKind("postgresql", url=pg_url), tmp_path, trials=2, seed=202)


def test_crash_redis(tmp_path, redis_client):
    why = crash.RedisKind().unavailable()
    if why:
        pytest.skip(why)
    run(crash.RedisKind(prefix=redis_client.test_prefix), tmp_path, trials=2, seed=303)


def test_crash_chroma(tmp_path):
    kind = crash.ChromaKind()
    why = kind.unavailable()
    if why:
        pytest.skip(why)
    run(kind, tmp_path, trials=2, seed=404)


def test_lost_write_check_sees_a_missing_incident(tmp_path):
    """The checker itself: writes that no incident holds are counted."""
    kind = crash.SQLKind("sqlite")
    h = crash.Harness(kind, tmp_path / "h", size=300, seed=5, log=lambda _: None)
    try:
        h.setup()
        kind.mutate(h.rnd)
        pre = crash.live_records(h.config)
        assert crash.run_cli(h.config, "restore", h.base, "--yes", "--incident", "inc-a").code == 0
        repo = crash.open_repo(h.workdir)
        (incident,) = [b for b in crash.bundles(repo) if b["incident"] == "inc-a"]
        assert crash.lost_writes(repo, h.base_records, pre, [incident]) == []
        changed = sum(1 for k in pre.keys() | h.base_records.keys() if pre.get(k) != h.base_records.get(k))
        assert changed > 0
        assert len(crash.lost_writes(repo, h.base_records, pre, [])) == changed
    finally:
        kind.teardown()
