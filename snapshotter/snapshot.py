"""Taking a snapshot: read every selected source at one point in time, store
its streams as chunks, and commit by writing the manifest last."""
from __future__ import annotations

import contextlib
import socket
import time
from typing import Callable, Sequence

from . import __version__
from .backend import StreamChanged
from .config import Config
from .errors import IntegrityError, SnapshotterError, SourceError, UsageError
from .names import iso, new_snapshot_id, utcnow, current_user
from .redaction import redact_url
from .repository import MANIFEST_FORMAT, Repository
from .streams import ChunkUploader, StreamWriter


def parent_streams(repo: Repository, release: str) -> tuple[dict, dict[str, int]]:
    """Chunking parameters per (source, stream) and chunks known to exist, from the
    newest snapshot of the release (else the newest of any release)."""
    def skip(ref, exc) -> None:  # a damaged manifest lends nothing; verify reports it
        pass

    parent = next(repo.manifests(release, damaged=skip), None) or next(repo.manifests(damaged=skip), None)
    params: dict = {}
    known: dict[str, int] = {}
    if parent is None:
        return params, known
    try:
        repo.check_digests(parent)
    except IntegrityError:
        # a damaged parent (verify reports it) lends nothing: its chunk list may name
        # chunks this repository does not have, which "known" would skip writing
        return params, known
    for sname, src in parent.get("sources", {}).items():
        for stname, st in src.get("streams", {}).items():
            params[(sname, stname)] = st.get("chunking", {}).get("records_per_boundary")
            for row in st.get("chunks", []):
                known[row[0]] = row[3]
    return params, known


def take_snapshot(repo: Repository, cfg: Config, *, release: str, sources: Sequence[str] = (),
                  labels: dict[str, str] | None = None, note: str | None = None,
                  progress: Callable[[str, int], None] | None = None) -> dict:
    names = list(sources) or sorted(cfg.sources)
    if not names:
        raise UsageError("no sources configured (add [sources.NAME] tables to the config file)")
    for n in names:
        cfg.source(n)  # unknown names fail before any read
    snapshot_id = new_snapshot_id()
    started = time.monotonic()
    params, known = parent_streams(repo, release)
    uploader = ChunkUploader(repo, known=known)
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": snapshot_id,
        "release": release,
        "taken_at": None,
        "labels": dict(labels or {}),
        "note": note,
        "host": socket.gethostname(),
        "user": current_user(),
        "tool_version": __version__,
        "sources": {},
    }
    try:
        for name in names:
            backend = cfg.open_source(name)
            src_entry = {"backend": backend.name, "location": backend.location(), "streams": {}}
            with backend.reader() as reader:
                if manifest["taken_at"] is None:
                    manifest["taken_at"] = iso(utcnow())
                reader.restartable = True
                for spec in reader.streams():
                    tick = (lambda n, _s=f"{name}/{spec.name}": progress(_s, n)) if progress else None
                    while True:
                        encoded = reader.read_encoded(spec)
                        writer = StreamWriter(uploader, records_per_boundary=params.get((name, spec.name)),
                                              on_record=tick, estimated_bytes=spec.estimated_bytes,
                                              encoding=encoded[0] if encoded else None)
                        try:
                            if encoded:
                                # closed before the reader's transaction ends, even on an error:
                                # a COPY left open holds its connection
                                with contextlib.closing(encoded[1]) as batches:
                                    for lines in batches:
                                        writer.add_encoded(lines)
                            else:
                                for batch in reader.read(spec):
                                    for key, value in batch:
                                        writer.add(key, value)
                        except StreamChanged:
                            writer.abandon()
                            continue  # the backend bounds its own retries
                        except SourceError as exc:
                            raise SourceError(f"source {name!r} stream {spec.name!r}: {exc.message}") from exc
                        break
                    entry = writer.finish()
                    entry["schema"] = spec.schema
                    src_entry["streams"][spec.name] = entry
                src_entry["consistency"] = reader.consistency
            manifest["sources"][name] = src_entry
    except SnapshotterError:
        raise
    finally:
        uploader.close()
    manifest["bytes_written"] = uploader.stats.bytes_written
    manifest["bytes_reused"] = uploader.stats.bytes_reused
    manifest["duration_seconds"] = round(time.monotonic() - started, 3)
    repo.write_manifest(manifest)  # the commit point
    return manifest




def summary(manifest: dict, *, good: bool = False, with_schema: bool = False, with_chunks: bool = False) -> dict:
    """The manifest as the JSON of `snapshot`/`show` (the keys docs/commands.md names first)."""
    out = {
        "id": manifest["id"],
        "release": manifest["release"],
        "taken_at": manifest["taken_at"],
        "labels": manifest.get("labels", {}),
        "note": manifest.get("note"),
        "good": good,
        "host": manifest.get("host"),
        "user": manifest.get("user"),
        "tool_version": manifest.get("tool_version"),
        "sources": {},
        "bytes_written": manifest.get("bytes_written", 0),
        "bytes_reused": manifest.get("bytes_reused", 0),
        "records": 0,
        "bytes": 0,
    }
    for sname, src in manifest.get("sources", {}).items():
        location = src.get("location")
        # a manifest written before every secret-bearing part of a URL was redacted, or by someone else
        s = {"backend": src["backend"], "location": redact_url(location) if isinstance(location, str) else location,
             "consistency": src.get("consistency"),
             "streams": {}}
        for stname, st in src.get("streams", {}).items():
            e = {"records": st["records"], "bytes": st["bytes"], "stored_bytes": st.get("stored_bytes"),
                 "digest": st["digest"], "chunks": len(st.get("chunks", []))}
            if with_schema:
                e["schema"] = st.get("schema", {})
            if with_chunks:
                e["chunk_ids"] = [c[0] for c in st.get("chunks", [])]
            s["streams"][stname] = e
            out["records"] += st["records"]
            out["bytes"] += st["bytes"]
        out["sources"][sname] = s
    return out
