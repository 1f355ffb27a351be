"""Prometheus textfile-collector metrics for one run (``--metrics-file PATH``).

The text exposition format is written here, without prometheus-client: it is a
few lines (``# HELP``, ``# TYPE``, one sample per line with escaped label
values), and a scheduled job on a plain install must not fail for want of an
extra.  The file is replaced atomically (a temporary file in the same folder,
renamed over it), so node_exporter never reads half a file.  A failed run keeps
the previous ``snapshotter_last_success_timestamp_seconds``, read back from the
file it replaces, so "no success for N hours" alerts keep working.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

LAST_SUCCESS = "snapshotter_last_success_timestamp_seconds"

#: one sample line: name, optional {labels}, value, optional timestamp
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\": "\\", "n": "\n", '"': '"'}


def escape_label(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(text: str) -> dict[str, str] | None:
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m or m.end() == pos:
            return None if text[pos:].strip() else out
        out[m.group(1)] = re.sub(r"\\(.)", lambda e: _UNESCAPE.get(e.group(1), "\\" + e.group(1)), m.group(2))
        pos = m.end()
    return out


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
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError):
        return None
    best: tuple[bool, float] | None = None
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != LAST_SUCCESS:
            continue
        labels = _labels(m.group(2) or "")
        try:
            value = float(m.group(3))
        except ValueError:
            continue  # a damaged line: the others may still hold the time
        if labels is None or labels.get("command") != command or not math.isfinite(value):
            continue
        candidate = (labels.get("release") == release, value)
        if best is None or candidate > best:
            best = candidate
    return best[1] if best else None


def render(families: list[tuple[str, str, list[tuple[dict[str, str], float]]]]) -> str:
    """The text format of ``(name, help, [(labels, value)])`` gauges."""
    lines = []
    for name, doc, samples in families:
        lines.append(f"# HELP {name} {_escape_help(doc)}")
        lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            inner = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def write_textfile(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a reader sees the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_metrics(path: str, run: RunMetrics) -> None:
    base = {"command": run.command, "release": run.release}
    families = []

    def gauge(name: str, doc: str, value: float | None) -> None:
        if value is not None:
            families.append((name, doc, [(base, value)]))

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
        families.append(("snapshotter_records", "Records the last snapshot captured, per source.",
                         [({**base, "source": source}, n) for source, n in sorted(run.records.items())]))
    write_textfile(path, render(families))


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
