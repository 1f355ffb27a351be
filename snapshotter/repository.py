"""The repository: its format on top of an object store.

Owns ``config.json``, chunk naming, compression and hashing, manifests and
the known-good marks.  ``docs/design.md`` is the normative description of
what this module reads and writes; keep the two in step.
"""
from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import zstandard

from . import __version__, hashing
from .documents import READABLE_FORMATS, DocumentError, GoodMark, IncidentBundle, Manifest, \
    UnreadableFormat, chunk_id_ok
from .errors import IntegrityError, NotFound, UsageError
from .names import SNAPSHOT_ID_RE, iso, utcnow
from .objectstore import ObjectMissing, ObjectStore, open_store

#: the format a new repository gets: 2 (format 1 with a ``hash`` an older reader
#: does not know, blake3); a SHA-256 repository is created as format 1, which
#: every snapshotter reads
FORMAT_VERSION = 2


def format_for(hash_name: str) -> int:
    return 1 if hash_name == "sha256" else FORMAT_VERSION
CHUNK_TARGET_BYTES = 32 * 1024
CHUNK_MAX_BYTES = 8 * 1024 * 1024


def chunk_object(chunk_id: str) -> str:
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def manifest_object(release: str, snapshot_id: str) -> str:
    return f"snapshots/{release}/{snapshot_id}.json"


#: how deep a repository's JSON object may nest (a manifest nests about 8 deep); deeper is
#: damage or an attack on every reader's recursion, and counts as corrupt
MAX_JSON_DEPTH = 64


def load_json(raw: bytes, name: str) -> Any:
    """A JSON object of the repository, parsed: IntegrityError (exit 3, naming it) when it
    is not JSON, not UTF-8, or nested deeper than any object snapshotter writes."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise IntegrityError(f"{name} is corrupt (nested deeper than any object snapshotter writes)") from None
    except ValueError:  # UnicodeDecodeError included
        raise IntegrityError(f"{name} is corrupt (not JSON)") from None
    # iteratively, so the check itself cannot exhaust the stack
    stack = [(doc, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise IntegrityError(f"{name} is corrupt (nested deeper than any object snapshotter writes)")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return doc


def dumps(doc: Any) -> bytes:
    text = json.dumps(doc, indent=1, sort_keys=False, ensure_ascii=False)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        # text holding bytes that were not UTF-8 (a Redis session key in a stream schema's
        # TTL map): as \udcXX escapes, which JSON reads back to the same text
        return json.dumps(doc, indent=1, sort_keys=False, ensure_ascii=True).encode() + b"\n"


@dataclass(frozen=True)
class SnapshotRef:
    """Where a manifest is, known from a listing without reading it."""

    id: str
    release: str

    @property
    def object(self) -> str:
        return manifest_object(self.release, self.id)


#: bytes of a chunk compressed at level 1 and at the repository's level to choose the chunk's level
LEVEL_SAMPLE = 64 * 1024

#: how much larger than at the repository's level a sample may come out of level 1 for the
#: chunk to be compressed at level 1
LEVEL_SLACK = 0.01


class Repository:
    def __init__(self, store: ObjectStore, config: dict, *, compression_level: int = 3):
        self.store = store
        self.config = config
        self.compression_level = compression_level
        chunker = config.get("chunker", {})
        self.chunk_target_bytes = int(chunker.get("target_bytes", CHUNK_TARGET_BYTES))
        self.chunk_max_bytes = int(chunker.get("max_bytes", CHUNK_MAX_BYTES))
        #: the content hash: chunk ids and the digests of new streams (hashing.py)
        self.hash = config.get("hash", "sha256")
        self.format = config.get("format", 1)
        self._hash_new = hashing.constructor(self.hash)
        #: hex digits of a chunk id
        self.hash_digits = 64
        self._local = threading.local()
        self._manifest_cache: dict[str, Manifest] = {}

    # -- opening -------------------------------------------------------------

    @classmethod
    def init(cls, store: ObjectStore, *, compression_level: int = 3,
             hash_name: str = hashing.DEFAULT) -> tuple["Repository", bool]:
        """Create the repository; returns (repo, created). Idempotent (an existing
        repository keeps its hash: ``hash_name`` applies to a new one only)."""
        if hash_name not in hashing.ALGORITHMS:
            raise UsageError(f"unknown hash {hash_name!r} (known: {', '.join(hashing.ALGORITHMS)})")
        try:
            existing = store.get("config.json")
        except ObjectMissing:
            existing = None
        if existing is None:
            # a folder that holds other things is not silently adopted
            foreign = next(iter(store.list("")), None)
            if foreign is not None:
                raise UsageError(f"{store.url} is not empty and holds no snapshotter repository "
                                 f"(found {foreign.name}); choose an empty location")
            config = {
                "format": format_for(hash_name),
                "id": secrets.token_hex(16),
                "created_at": iso(utcnow()),
                "created_by": f"snapshotter {__version__}",
                "compression": "zstd",
                "hash": hash_name,
                "chunker": {"boundary_hash": "blake2b-64", "target_bytes": CHUNK_TARGET_BYTES,
                            "max_bytes": CHUNK_MAX_BYTES},
            }
            if store.put("config.json", dumps(config)):
                return cls(store, config, compression_level=compression_level), True
        return cls.open(store, compression_level=compression_level), False

    @classmethod
    def open(cls, store: ObjectStore, *, compression_level: int = 3) -> "Repository":
        try:
            raw = store.get("config.json")
        except ObjectMissing:
            raise NotFound(f"no repository at {store.url} (run `snapshotter init`)") from None
        try:
            config = load_json(raw, f"{store.url}/config.json")
            version = config["format"]
        except (IntegrityError, KeyError, TypeError):
            raise IntegrityError(f"{store.url}/config.json is not a snapshotter repository config") from None
        if version not in READABLE_FORMATS:
            raise UsageError(f"repository format {version!r} at {store.url} is not supported by this "
                             f"snapshotter (it reads formats {', '.join(map(str, READABLE_FORMATS))})")
        hash_name = config.get("hash", "sha256")
        if hash_name not in hashing.ALGORITHMS:
            raise UsageError(f"repository at {store.url} names its chunks by hash {config.get('hash')!r}, "
                             f"which this snapshotter does not know (it knows {', '.join(hashing.ALGORITHMS)})")
        if version != format_for(hash_name):
            # a format-1 reader would take a blake3 repository for a SHA-256 one
            raise IntegrityError(f"{store.url}/config.json is inconsistent: format {version} with hash "
                                 f"{hash_name!r} (a {hash_name} repository is format {format_for(hash_name)})")
        return cls(store, config, compression_level=compression_level)

    # -- chunks --------------------------------------------------------------

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.compression_level, write_content_size=True)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def _cctx_fast(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx_fast", None)
        if c is None:
            c = self._local.cctx_fast = zstandard.ZstdCompressor(level=1, write_content_size=True)
        return c

    def compress(self, raw: bytes) -> bytes:
        """The chunk compressed at the repository's level, or at level 1 when a sample of it
        (its first :data:`LEVEL_SAMPLE` bytes) comes out of level 1 no more than
        :data:`LEVEL_SLACK` larger: data with few repeats (random bytes as hex, floats,
        numbers) compresses as small at level 1 and several times faster; text keeps its
        level.  Which level wrote a chunk does not matter to anything that reads it."""
        if self.compression_level > 1 and len(raw) >= 4 * LEVEL_SAMPLE:
            sample = raw[:LEVEL_SAMPLE]
            fast = self._cctx_fast()
            if len(fast.compress(sample)) <= len(self._cctx().compress(sample)) * (1 + LEVEL_SLACK):
                return fast.compress(raw)
        return self._cctx().compress(raw)

    #: a chunk read without its manifest row (none today) may hold at most this much plaintext
    UNSIZED_LIMIT = 1 << 28

    def decompress(self, data: bytes, name: str, size: int | None = None) -> bytes:
        """The plaintext of a chunk object whose manifest row says it holds ``size`` bytes.

        The frame must declare exactly that size (every chunk is written with its size in
        the header), and nothing beyond it is ever inflated: a small object declaring or
        expanding to gigabytes (a decompression bomb) is a corrupt chunk, found before
        any memory is spent on it."""
        limit = self.UNSIZED_LIMIT if size is None else size
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"object {name} is corrupt: {exc}") from None
        if declared >= 0 and (declared != size if size is not None else declared > limit):
            raise IntegrityError(f"object {name} is corrupt: its frame declares {declared} bytes, "
                                 f"{'its manifest row says ' + str(size) if size is not None else 'more than allowed'}")
        try:
            if declared >= 0:
                raw = self._dctx().decompress(data)
            else:
                # no size in the header: inflate in steps, stopping one byte past the bound
                reader = self._dctx().stream_reader(data, read_across_frames=False)
                raw = reader.read(limit + 1)
                while len(raw) <= limit:
                    more = reader.read(limit + 1 - len(raw))
                    if not more:
                        break
                    raw += more
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"object {name} is corrupt: {exc}") from None
        if len(raw) > limit or (size is not None and len(raw) != size):
            raise IntegrityError(f"object {name} is corrupt: it inflates to "
                                 f"{'more than ' + str(limit) if len(raw) > limit else len(raw)} bytes, "
                                 f"its manifest row says {size if size is not None else limit}")
        return raw

    def chunk_id(self, raw: bytes) -> str:
        return self._hash_new(raw).hexdigest()

    def new_hash(self) -> Any:
        """A hash object of the repository's hash, for a new stream's digest."""
        return self._hash_new()

    def put_chunk(self, raw: bytes, chunk_id: str | None = None) -> tuple[str, int, bool]:
        """Store one chunk: returns (id, stored bytes, newly written)."""
        chunk_id = chunk_id or self.chunk_id(raw)
        data = self.compress(raw)
        name = chunk_object(chunk_id)
        created = self.store.put(name, data, durable=False)
        if not created:
            # same name, same content - unless a crash cut an earlier write short
            # (possible before flush); a wrong size is replaced, content-addressed
            info = self.store.stat(name)
            if info is not None and info.size != len(data):
                self.store.put(name, data, overwrite=True, durable=False)
        return chunk_id, len(data), created

    def get_chunk(self, chunk_id: str, size: int | None = None) -> bytes:
        """A chunk's plaintext, checked against its name; ``size``: the plaintext bytes its
        manifest row records (the bound on what is inflated)."""
        if not chunk_id_ok(chunk_id, self.hash_digits):
            raise IntegrityError(f"chunk reference {str(chunk_id)[:80]!r} is not a chunk id")
        name = chunk_object(chunk_id)
        try:
            data = self.store.get(name)
        except ObjectMissing:
            # a chunk is only ever read because a manifest references it: missing is an integrity failure
            raise IntegrityError(f"object {name} is missing from {self.store.url}") from None
        raw = self.decompress(data, name, size)
        if self._hash_new(raw).hexdigest() != chunk_id:
            raise IntegrityError(f"object {name} is corrupt: its content does not match its name")
        return raw

    def put_blob(self, raw: bytes) -> tuple[str, int, bool]:
        """Any other content-addressed data (quarantine bundles) shares the chunk space."""
        return self.put_chunk(raw)

    # -- manifests -----------------------------------------------------------

    def list_snapshot_refs(self) -> list[SnapshotRef]:
        refs = []
        for info in self.store.list("snapshots/"):
            parts = info.name.split("/")
            if len(parts) != 3 or not parts[2].endswith(".json"):
                continue
            sid = parts[2][:-5]
            if SNAPSHOT_ID_RE.match(sid):
                refs.append(SnapshotRef(sid, parts[1]))
        refs.sort(key=lambda r: r.id, reverse=True)
        return refs

    def manifest(self, ref: SnapshotRef, raw: bytes | Exception | None = None) -> Manifest:
        """The manifest ``ref`` names, checked (:meth:`Manifest.from_json`): one that is
        damaged, or names itself other than its object does, is corrupt (exit 3); one of a
        newer format is refused (exit 2).  ``raw``: its object as already fetched (or the
        error fetching it raised)."""
        cached = self._manifest_cache.get(ref.id)
        if cached is not None:
            return cached
        if isinstance(raw, Exception):
            raise raw
        if raw is None:
            raw = self.store.get(ref.object)
        doc = load_json(raw, f"manifest {ref.object}")
        try:
            manifest = Manifest.from_json(doc, self.hash_digits, id=ref.id, release=ref.release)
        except UnreadableFormat as exc:
            raise UsageError(f"manifest {ref.object} {exc}") from None
        except DocumentError as exc:
            raise IntegrityError(f"manifest {ref.object} is corrupt ({exc})") from None
        self._manifest_cache[ref.id] = manifest
        return manifest

    def load_manifest(self, ref: SnapshotRef) -> dict:
        """:meth:`manifest` as its plain JSON object, for code that reads manifests as dicts."""
        return self.manifest(ref).doc

    def check_digests(self, doc: Manifest | IncidentBundle | dict) -> None:
        """Every stream digest must be of the repository's hash: a manifest copied from a
        repository of another hash, or edited, would otherwise fail later as corrupt chunks.
        Checked where a manifest's chunks or digests are used (show, diff, restore, verify,
        a new snapshot's parent), not by listing, forget or prune, which a damaged
        manifest must not stop.  ``doc``: a manifest or bundle, typed or as its JSON
        object as loaded."""
        if isinstance(doc, dict):
            cached = self._manifest_cache.get(doc.get("id"))  # type: ignore[arg-type]
            if cached is not None and cached.doc is doc:
                doc = cached
            else:
                try:
                    doc = (IncidentBundle if "incident" in doc else Manifest).from_json(doc, self.hash_digits)
                except DocumentError as exc:
                    raise IntegrityError(f"manifest {doc.get('id')} is corrupt ({exc})") from None
        for sname, stname, st in doc.iter_streams():
            digest = st.digest
            if not isinstance(digest, str) or digest.partition(":")[0] != self.hash:
                raise IntegrityError(f"manifest {getattr(doc, 'id', None)}: stream {sname}/{stname} has digest "
                                     f"{str(digest)[:24]!r}, not a {self.hash} digest as this repository's "
                                     f"chunks and digests are")

    def snapshots(self, release: str | None = None,
                  damaged: Callable[[SnapshotRef, IntegrityError], None] | None = None) -> Iterator[Manifest]:
        """Every manifest, newest first (lazily: only as many are read as are consumed, and
        a remote store's window ahead, :meth:`ObjectStore.get_many`).

        Ids sort by time to the second; snapshots taken within the same second
        are ordered by their manifests' full-precision ``taken_at``.  With
        ``damaged``, a corrupt manifest is reported to it and skipped (one damaged
        snapshot must not hide the others from ``list`` or ``restore --release``);
        without, it raises.
        """
        refs = [r for r in self.list_snapshot_refs() if release is None or r.release == release]
        # fetched ahead, a window at a time: on S3 one round trip per manifest was most of `list`
        todo = [r for r in refs if r.id not in self._manifest_cache]
        need = {r.id for r in todo}
        fetched = self.store.get_many(r.object for r in todo)
        try:
            i = 0
            while i < len(refs):
                j = i
                while j < len(refs) and refs[j].id[:16] == refs[i].id[:16]:
                    j += 1
                group = []
                for r in refs[i:j]:
                    try:
                        group.append(self.manifest(r, next(fetched)[1] if r.id in need else None))
                    except IntegrityError as exc:
                        if damaged is None:
                            raise
                        damaged(r, exc)
                group.sort(key=lambda m: (m.taken_at or "", m.id), reverse=True)
                yield from group
                i = j
        finally:
            fetched.close()  # a caller that stopped early (--limit): the reads ahead end here

    def manifests(self, release: str | None = None,
                  damaged: Callable[[SnapshotRef, IntegrityError], None] | None = None) -> Iterator[dict]:
        """:meth:`snapshots` as plain JSON objects, for code that reads manifests as dicts."""
        for m in self.snapshots(release, damaged):
            yield m.doc

    def resolve(self, text: str) -> SnapshotRef:
        """A snapshot id or any unique prefix of one."""
        text = text.strip()
        if not text or not all(c.isalnum() or c in "-TZ" for c in text):
            raise UsageError(f"invalid snapshot id {text!r}")
        matches = [r for r in self.list_snapshot_refs() if r.id.startswith(text)]
        if not matches:
            raise NotFound(f"no snapshot {text!r} in {self.store.url}")
        if len(matches) > 1:
            shown = ", ".join(r.id for r in matches[:5])
            raise UsageError(f"snapshot prefix {text!r} is ambiguous: {shown}{' …' if len(matches) > 5 else ''}")
        return matches[0]

    def write_manifest(self, manifest: Manifest) -> None:
        ref = SnapshotRef(manifest.id, manifest.release)
        self.store.flush()  # every chunk durable before the commit point
        if not self.store.put(ref.object, dumps(manifest.to_json())):
            raise IntegrityError(f"manifest {ref.object} already exists")
        self._manifest_cache[ref.id] = manifest

    # -- known-good marks ----------------------------------------------------

    def good_ids(self) -> set[str]:
        return {info.name.split("/", 1)[1] for info in self.store.list("good/")}

    def mark_good(self, ref: SnapshotRef, good: bool) -> None:
        name = f"good/{ref.id}"
        if good:
            self.store.put(name, dumps(GoodMark(ref.id, ref.release, iso(utcnow())).to_json()))
        else:
            self.store.delete(name)


def open_repository(url: str | None, *, endpoint_url: str | None = None, region: str | None = None,
                    base_dir: str | None = None, compression_level: int = 3,
                    timeout: float | None = None) -> Repository:
    store = open_store(url or "", endpoint_url=endpoint_url, region=region, base_dir=base_dir, timeout=timeout)
    return Repository.open(store, compression_level=compression_level)
