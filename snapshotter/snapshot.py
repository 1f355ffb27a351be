"""Taking a snapshot: read every selected source at one point in time, store
its streams as chunks, and commit by writing the manifest last."""
from __future__ import annotations

import contextlib
import socket
import time
from typing import Callable, Sequence

from . import __version__
from .backend import StreamChanged, key_problem
from .config import Config
from .errors import ConfigError, IntegrityError, KeyOrderError, SnapshotterError, SourceError, UsageError
from .names import iso, new_snapshot_id, utcnow, current_user
from .redaction import redact_url
from .documents import MANIFEST_FORMAT, Manifest, SourceEntry, StreamEntry
from .repository import Repository
from .streams import ChunkUploader, StreamWriter


def parent_streams(repo: Repository, release: str) -> tuple[dict, dict[str, int]]:
    """Chunking parameters per (source, stream) and chunks known to exist, from the
    newest snapshot of the release (else the newest of any release)."""
    def skip(ref, exc) -> None:  # a damaged manifest lends nothing; verify reports it
        pass

    parent = next(repo.snapshots(release, damaged=skip), None) or next(repo.snapshots(damaged=skip), None)
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
    for sname, stname, st in parent.iter_streams():
        params[(sname, stname)] = st.records_per_boundary
        for row in st.chunks:
            known[row.id] = row.stored_bytes
    return params, known


def take_snapshot(repo: Repository, cfg: Config, *, release: str, sources: Sequence[str] = (),
                  labels: dict[str, str] | None = None, note: str | None = None,
                  progress: Callable[[str, int], None] | None = None) -> Manifest:
    names = list(sources) or sorted(cfg.sources)
    if not names:
        raise UsageError("no sources configured (add [sources.NAME] tables to the config file)")
    for n in names:
        cfg.source(n)  # unknown names fail before any read
    snapshot_id = new_snapshot_id()
    started = time.monotonic()
    params, known = parent_streams(repo, release)
    uploader = ChunkUploader(repo, known=known)
    taken_at: str | None = None
    sources: dict[str, SourceEntry] = {}
    try:
        for name in names:
            backend = cfg.open_source(name)
            location = backend.location()
            streams: dict[str, StreamEntry] = {}
            with backend.reader() as reader:
                if taken_at is None:
                    taken_at = iso(utcnow())
                reader.restartable = True
                reader.encoded_blocks = True
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
                                        if isinstance(lines, bytes):  # a block of whole records
                                            writer.add_encoded_block(lines)
                                        else:
                                            writer.add_encoded(lines)
                            else:
                                for batch in reader.read(spec):
                                    for key, value in batch:
                                        writer.add(key, value)
                        except StreamChanged:
                            writer.abandon()
                            continue  # the backend bounds its own retries
                        except KeyOrderError as exc:
                            # the store may know why (NULL keys, keys of several types): a usage error then
                            why = key_problem(reader, spec)
                            err = ConfigError if why else SourceError
                            raise err(f"source {name!r}: {why}" if why else
                                      f"source {name!r} stream {spec.name!r}: {exc.message}") from exc
                        except SourceError as exc:
                            raise SourceError(f"source {name!r} stream {spec.name!r}: {exc.message}") from exc
                        break
                    streams[spec.name] = writer.finish_entry(spec.schema)
                consistency = reader.consistency
            # written even if a reader leaves it None, as every manifest has it
            sources[name] = SourceEntry(backend=backend.name, location=location, streams=streams,
                                        consistency=consistency,
                                        order=("backend", "location", "streams", "consistency"))
    except SnapshotterError:
        raise
    finally:
        uploader.close()
    manifest = Manifest(
        format=MANIFEST_FORMAT, id=snapshot_id, release=release, taken_at=taken_at, labels=dict(labels or {}),
        note=note, host=socket.gethostname(), user=current_user(), tool_version=__version__, sources=sources,
        bytes_written=uploader.stats.bytes_written, bytes_reused=uploader.stats.bytes_reused,
        duration_seconds=round(time.monotonic() - started, 3))
    repo.write_manifest(manifest)  # the commit point
    return manifest




def summary(manifest: Manifest | dict, *, good: bool = False, with_schema: bool = False,
            with_chunks: bool = False) -> dict:
    """The manifest as the JSON of `snapshot`/`show` (the keys docs/commands.md names first)."""
    m = manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)
    out = {
        "id": m.id,
        "release": m.release,
        "taken_at": m.taken_at,
        "labels": m.labels,
        "note": m.note,
        "good": good,
        "host": m.host,
        "user": m.user,
        "tool_version": m.tool_version,
        "sources": {},
        "bytes_written": m.bytes_written,
        "bytes_reused": m.bytes_reused,
        "records": 0,
        "bytes": 0,
    }
    for sname, src in m.sources.items():
        location = src.location
        # a manifest written before every secret-bearing part of a URL was redacted, or by someone else
        s = {"backend": src.backend, "location": redact_url(location) if isinstance(location, str) else location,
             "consistency": src.consistency,
             "streams": {}}
        for stname, st in src.streams.items():
            e = {"records": st.records, "bytes": st.bytes, "stored_bytes": st.stored_bytes,
                 "digest": st.digest, "chunks": len(st.chunks)}
            if with_schema:
                e["schema"] = st.schema if "schema" in st.doc else {}
            if with_chunks:
                e["chunk_ids"] = [c.id for c in st.chunks]
            s["streams"][stname] = e
            out["records"] += st.records
            out["bytes"] += st.bytes
        out["sources"][sname] = s
    return out
