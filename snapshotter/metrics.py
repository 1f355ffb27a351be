"""Prometheus textfile-collector metrics for one run (``--metrics-file PATH``).

The file is replaced atomically (prometheus-client writes a temporary file and
renames it), so node_exporter never reads half a file.  A failed run keeps the
previous ``snapshotter_last_success_timestamp_seconds``, read back from the
file it replaces, so "no success for N hours" alerts keep working.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import UsageError

LAST_SUCCESS = "snapshotter_last_success_timestamp_seconds"


def require_client() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise UsageError("--metrics-file needs prometheus-client: pip install 'snapshotter[metrics]'") from None


@dataclass
class RunMetrics:
    command: str
    exit_code: int
    started: float  # seconds since the epoch
    finished: float = field(default_factory=time.time)
    release: str = ""
    bytes_written: int | None = None
    bytes_reused: int | None = None
    records: dict[str, int] = field(default_factory=dict)  # per source


def previous_success(path: str, command: str, release: str) -> float | None:
    """The last success time the existing file holds for ``command`` (same release preferred)."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    best: tuple[bool, float] | None = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name != LAST_SUCCESS or sample.labels.get("command") != command:
                    continue
                candidate = (sample.labels.get("release") == release, float(sample.value))
                if best is None or candidate > best:
                    best = candidate
    except ValueError:
        return None  # a damaged file: start afresh rather than fail the run
    return best[1] if best else None


def write_metrics(path: str, run: RunMetrics) -> None:
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    labels = ["command", "release"]
    values = [run.command, run.release]

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is None:
            return
        Gauge(name, doc, labels, registry=registry).labels(*values).set(value)

    last_success = run.finished if run.exit_code == 0 else previous_success(path, run.command, run.release)
    gauge("snapshotter_last_run_timestamp_seconds", "When the last run ended (seconds since the epoch).",
          run.finished)
    gauge(LAST_SUCCESS, "When the last successful run ended (seconds since the epoch).", last_success)
    gauge("snapshotter_run_duration_seconds", "How long the last run took.", max(0.0, run.finished - run.started))
    gauge("snapshotter_exit_code", "Exit code of the last run (0 = success; see the README's table).",
          run.exit_code)
    gauge("snapshotter_bytes_written", "Compressed bytes the last snapshot stored.", run.bytes_written)
    gauge("snapshotter_bytes_reused", "Compressed bytes the last snapshot found already stored.", run.bytes_reused)
    if run.records:
        g = Gauge("snapshotter_records", "Records the last snapshot captured, per source.",
                  labels + ["source"], registry=registry)
        for source, n in sorted(run.records.items()):
            g.labels(*values, source).set(n)
    write_to_textfile(path, registry)


def run_from_results(command: str, exit_code: int, started: float, results: dict) -> RunMetrics:
    """What a command left in ``App.results``: ``release``, and for a snapshot its ``manifest``."""
    run = RunMetrics(command=command, exit_code=exit_code, started=started, release=results.get("release") or "")
    manifest = results.get("manifest")
    if isinstance(manifest, dict):
        run.release = manifest.get("release") or run.release
        run.bytes_written = manifest.get("bytes_written")
        run.bytes_reused = manifest.get("bytes_reused")
        for name, src in manifest.get("sources", {}).items():
            run.records[name] = sum(st.get("records", 0) for st in src.get("streams", {}).values())
    return run
