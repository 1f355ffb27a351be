"""TIME options on the command line: a time without a zone is local time (``TZ``), not
UTC; a ``--failure-at`` in the future is accepted with a warning on stderr."""
from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import time

import pytest

UTC = dt.timezone.utc


@pytest.fixture
def local_zone():
    """Sets TZ (a POSIX zone string: no zone database needed) for the test, then puts it back."""
    old = os.environ.get("TZ")

    def set_zone(tz: str) -> None:
        os.environ["TZ"] = tz
        time.tzset()

    yield set_zone
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def setup(tmp_path, cli) -> tuple[str, str]:
    db = tmp_path / "agent.db"
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, updated_at TEXT);"
                      "INSERT INTO notes VALUES (1, 'one', '2026-01-01T01:00:00+00:00'),"
                      " (2, 'two', '2026-01-01T01:00:00+00:00');")
    con.commit()
    (tmp_path / "snapshotter.toml").write_text(
        f'[repository]\nurl = "./repo"\n[sources.db]\nbackend = "sql"\nurl = "sqlite:///{db}"\n'
        f'timestamp_column = "updated_at"\n')
    assert cli("init").code == 0
    snap = cli("--json", "snapshot", "--release", "r1")
    assert snap.code == 0, snap.err
    # the agent writes two rows after the snapshot: at 04:00 and at 06:00 UTC
    con.executescript("UPDATE notes SET body = 'early', updated_at = '2026-01-01T04:00:00+00:00' WHERE id = 1;"
                      "UPDATE notes SET body = 'late', updated_at = '2026-01-01T06:00:00+00:00' WHERE id = 2;")
    con.commit()
    con.close()
    return snap.json()["id"], str(db)


def test_failure_at_without_a_zone_is_local_time(tmp_path, cli, local_zone):
    local_zone("IST-5:30")  # UTC+05:30: 10:00 local is 04:30 UTC
    snap_id, _ = setup(tmp_path, cli)
    r = cli("--json", "restore", snap_id, "--yes", "--failure-at", "2026-01-01T10:00:00")
    assert r.code == 0, r.err
    assert "in the future" not in r.err
    incident = r.json()["incident"]
    listed = {i["incident"]: i for i in cli("--json", "quarantine", "list").json()}
    assert listed[incident]["failure_at"] == "2026-01-01T04:30:00Z"
    shown = {x["key"]: x["post_failure"] for x in cli("--json", "quarantine", "show", incident).json()}
    # written at 04:00 UTC: before the failure; at 06:00 UTC: after it (read as UTC, 10:00 would flag neither)
    assert shown == {1: False, 2: True}
    # a zone given explicitly is taken as given, whatever TZ says
    r = cli("--json", "restore", snap_id, "--dry-run", "--failure-at", "2026-01-01T10:00:00Z")
    assert r.code == 0, r.err


def test_before_without_a_zone_is_local_time(tmp_path, cli, local_zone):
    local_zone("XST+5")  # UTC-05:00
    snap_id, _ = setup(tmp_path, cli)
    # a minute from now on the local clock, without a zone: after the snapshot. Read as UTC it
    # would be five hours earlier, before the snapshot, and no snapshot would be found (exit 5).
    soon = (dt.datetime.now() + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    r = cli("--json", "restore", "--release", "r1", "--before", soon, "--dry-run")
    assert r.code == 0, r.err
    assert r.json()["snapshot"] == snap_id
    # an hour ago on the local clock: before the snapshot
    earlier = (dt.datetime.now() - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    r = cli("restore", "--release", "r1", "--before", earlier, "--dry-run")
    assert r.code == 5, r.err


def test_a_failure_at_in_the_future_warns_on_stderr(tmp_path, cli, local_zone):
    local_zone("XST+5")
    snap_id, _ = setup(tmp_path, cli)
    tomorrow = (dt.datetime.now() + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    r = cli("--json", "restore", snap_id, "--yes", "--failure-at", tomorrow)
    assert r.code == 0, r.err
    doc = json.loads(r.out)  # stdout stays exactly one JSON document
    assert doc["verified"] is True
    warnings = [line for line in r.err.splitlines() if "in the future" in line]
    assert len(warnings) == 1 and "--failure-at" in warnings[0], r.err
    r = cli("restore", snap_id, "--dry-run", "--failure-at", "2h")
    assert r.code == 0 and "in the future" not in r.err, r.err
    # a bad time is still a one-line usage error
    r = cli("restore", snap_id, "--dry-run", "--failure-at", "yesterday-ish")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
