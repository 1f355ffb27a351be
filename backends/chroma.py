"""``chroma``: Chroma vector collections, one stream per collection, keyed by record id.

The store is an embedded ``PersistentClient`` directory (``path``) or a Chroma
server (``url``, with ``tenant`` and ``database``).  A record is
``(id, {"embedding", "document", "metadata", "uri"})``: the embedding as a
float32 vector (Chroma stores float32 and hands back float64 copies of those
values, so the narrowing is exact), the document and uri as text or None, the
metadata with its keys sorted (Chroma returns them in no stable order) or None.
Records come in ascending id order (Python string order).

A stream's schema is what restore needs to recreate a dropped collection as
it was: the collection configuration (distance space, HNSW or SPANN
parameters, embedding-function reference), its metadata (legacy ``hnsw:*``
keys included), its index schema and its embedding dimension.

Consistency.  Chroma has no snapshot isolation.  A collection is read as: list
every id (ids only, in pages), sort, fetch the records by id in bounded batches,
list the ids again.  Same ids before and after (compared by count and digest:
see :class:`SortedIds`): the read is ``checked``.  Otherwise
it is read again (``retries`` times), each attempt starting from the ids the
previous one ended with; a stream that never came out unchanged is kept from
its last attempt and the source is marked ``best-effort``.  Attempts that may
be retried are held in a temporary file (the system temp folder, about the
collection's raw size) until their check passes, because records handed to
the core cannot be taken back; memory holds one compact id list (about the ids'
length in bytes each) and a few batches.
The check sees records added or deleted during the read; an in-place update
of an existing record is not visible to it (Chroma exposes no per-record
version).  A ``PersistentClient`` directory must not be written by another
process while a snapshot reads it: Chroma supports one process per directory,
so the reading process may miss the other's writes entirely (and the check
with them) or read one half applied.  Snapshot a directory the agent writes
either while the agent is stopped, or through a Chroma server (``url``).

Fidelity.  Collections in ``l2`` and ``ip`` space give every embedding back
bit for bit.  In ``cosine`` space a write/read round trip through Chroma 1.5
moves some components by up to 2 float32 ulp (the vector's norm is kept, the
components are rounded through a normalised form);
:meth:`ChromaBackend.values_equal` accepts exactly that for cosine streams,
which is what post-restore verification relies on.

Restore.  Chroma's ``upsert`` merges into an existing record: metadata keys
absent from the new value survive, and a None document or uri keeps the old
one.  A restored record must be exactly the snapshot's, so the writer upserts
each batch with its full values (a record is never absent: it holds its old
value until one request replaces it), then reads the batch back and removes
the metadata keys the snapshot's record lacks (those Chroma 1.5 attached on
its own included: it leaves the list-valued metadata of deleted records
behind and hands it to new records that reuse their internal row ids).  Only
a record whose snapshot has no document or uri where the live one has one is
deleted and added back (Chroma cannot clear those fields); if the add fails,
the record is put back as it was.  Every request that fails transiently
(connection refused or dropped, timeout, HTTP 5xx or 429) is tried again a
bounded number of times with a growing pause.  There is no transaction: a
restore that stops part-way leaves each record with its old or its restored
value (or, if the server goes away between the delete and the add of such a
record, without it), and running the restore again converges.
"""
from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import os
import time
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from snapshotter import codec
from snapshotter.backend import Option, SourceBackend, SourceReader, SourceWriter, StreamChanged, StreamSpec, read_ahead, \
    timeout_option
from snapshotter.errors import ConfigError, NotFound, Refused, SchemaMismatch, SnapshotterError, SourceError
from snapshotter.redaction import redact_text, redact_url
from snapshotter.timeouts import DEFAULT_TIMEOUT, timed_out

log = logging.getLogger(__name__)

DEFAULT_BATCH = 1000
DEFAULT_RETRIES = 3
ID_PAGE = 20_000  # ids per listing request: Chroma materialises a whole page at once
COSINE_ULPS = 2  # the most a cosine-space write/read round trip moved a component on Chroma 1.5
INCLUDE = ["embeddings", "documents", "metadatas", "uris"]

#: pauses before each new try of a request that failed transiently (so 4 tries in all, ~3.5 s)
WRITE_BACKOFF = (0.5, 1.0, 2.0)

# HNSW/SPANN parameters Chroma lets a live collection change (``modify``) or that
# only steer queries; a difference in them does not stop a restore
_TUNABLE = {"ef_search", "search_nprobe", "num_threads", "batch_size", "sync_threshold", "resize_factor"}


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """chromadb, HTTP and OS errors become one-line SourceErrors."""
    import httpx
    from chromadb.errors import ChromaError
    try:
        yield
    except SnapshotterError:
        raise
    except (ChromaError, httpx.HTTPError, OSError, ValueError, TypeError) as exc:
        timeout = _timeout_in(exc)
        if timeout is not None:
            raise SourceError(redact_text(timed_out(what, _request_timeout(timeout)))) from exc
        raise SourceError(redact_text(f"{what}: {_one_line(exc)}")) from exc


def _timeout_in(exc: BaseException):
    """The httpx timeout behind ``exc`` (chromadb turns some into a ValueError), or None."""
    import httpx
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, httpx.TimeoutException):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _request_timeout(exc) -> float | None:
    """The bound a timed-out httpx request had (httpx keeps it in the request)."""
    try:
        bounds = exc.request.extensions.get("timeout") or {}
    except RuntimeError:  # no request attached
        return None
    values = [v for v in bounds.values() if v is not None]
    return max(values) if values else None


#: the httpx timeout for the Chroma HTTP clients this thread is creating (see _http_timeout)
_CREATING_TIMEOUT: contextvars.ContextVar = contextvars.ContextVar("snapshotter_chroma_timeout", default=None)


def _http_timeout(timeout: float):
    """A context in which a ``chromadb.HttpClient`` is created with connect and read timeouts.

    chromadb 1.x builds its HTTP session with ``timeout=None`` (no bound on any request) and
    no setting changes that, and the client's constructor already sends requests (the
    server's identity, the tenant and database).  Its ``FastAPI.__init__`` is therefore
    wrapped, once, to give the new session the timeout of the context that creates it;
    outside such a context chromadb behaves as it always does."""
    import httpx
    from chromadb.api import fastapi
    cls = fastapi.FastAPI
    if not getattr(cls.__init__, "_snapshotter_timeout", False):
        original = cls.__init__

        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            bound = _CREATING_TIMEOUT.get()
            session = getattr(self, "_session", None)
            if bound is not None and session is not None:
                session.timeout = bound

        __init__._snapshotter_timeout = True  # type: ignore[attr-defined]
        cls.__init__ = __init__

    @contextlib.contextmanager
    def context():
        token = _CREATING_TIMEOUT.set(httpx.Timeout(timeout))
        try:
            yield
        finally:
            _CREATING_TIMEOUT.reset(token)
    return context()


def transient(exc: BaseException | None) -> bool:
    """Whether a failed request may succeed when sent again: the connection was refused,
    dropped or timed out, or the server answered 5xx or 429."""
    import httpx
    from chromadb.errors import ChromaError
    if isinstance(exc, (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.ProxyError)):
        return False
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    if isinstance(exc, ChromaError):
        try:
            code = int(exc.code())
        except Exception:  # noqa: BLE001 - an error class without a usable code is not transient
            return False
        return code >= 500 or code == 429
    return isinstance(exc, (ConnectionError, TimeoutError))


def _http_errors_as_status(response) -> None:
    """An httpx response hook: an HTTP error whose body is not one of Chroma's JSON errors
    (a proxy's 502, an HTML page) raises :class:`httpx.HTTPStatusError`, which carries its
    status, instead of the bare ``Exception(body)`` chromadb would raise for it."""
    import httpx
    if response.status_code < 400:
        return
    response.read()
    try:
        body = response.json()
        if isinstance(body, dict) and "error" in body:
            return  # chromadb turns it into its own error class, with the server's message
    except ValueError:
        pass
    raise httpx.HTTPStatusError(f"HTTP {response.status_code} {response.reason_phrase}".strip(),
                                request=response.request, response=response)


def _hook_http_errors(client) -> None:
    import httpx
    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        hooks = session.event_hooks
        hooks.setdefault("response", []).append(_http_errors_as_status)
        session.event_hooks = hooks


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


class ChromaBackend(SourceBackend):
    name = "chroma"
    description = "Chroma vector collections (embedded folder or server), one stream per collection, keyed by id"
    options = (
        Option("path", str, help="PersistentClient folder (relative to the config file); give this or url"),
        Option("url", str, help="Chroma server, e.g. http://127.0.0.1:8000 (https:// for TLS); give this or path"),
        Option("tenant", str, default="default_tenant", help="Chroma tenant"),
        Option("database", str, default="default_database", help="Chroma database"),
        Option("headers", dict, default={}, secret=True,
               help='HTTP headers for the server, e.g. { Authorization = "Bearer ${CHROMA_TOKEN}" }'),
        Option("collections", list, help="collections to capture (default: every collection)"),
        Option("exclude", list, default=[], help="collections to leave out"),
        Option("batch_size", int, default=DEFAULT_BATCH,
               help="records per request (capped by the store's max batch size)"),
        Option("retries", int, default=DEFAULT_RETRIES,
               help="re-reads of a collection that changed while it was read; a read that may be "
                    "retried is held in a temporary file (about the collection's size) until its check "
                    "passes; 0 streams without one"),
        timeout_option("server (url): seconds to wait for each connect and each HTTP request"),
    )

    def __init__(self, source_name: str, options: dict[str, Any]):
        super().__init__(source_name, options)
        self.base_dir: str | None = None
        self._client = None
        self._max_batch: int | None = None
        self._settings_checked = False

    # -- configuration -------------------------------------------------------

    @property
    def where(self) -> str:
        return f"source {self.source_name!r}"

    def _check_settings(self) -> None:
        if self._settings_checked:
            return
        path, url = self.config.get("path"), self.config.get("url")
        if bool(path) == bool(url):
            raise ConfigError(f"{self.where}: give exactly one of path (an embedded Chroma folder) "
                              f"or url (a Chroma server)")
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{self.where}: url must look like http://HOST:PORT or https://HOST "
                                  f"(got {self.location()})")
        batch = self.config.get("batch_size")
        if batch is not None and batch < 1:
            raise ConfigError(f"{self.where}: batch_size must be at least 1")
        if self.retries < 0:
            raise ConfigError(f"{self.where}: retries must be 0 or more")
        self._settings_checked = True

    @property
    def path(self) -> str | None:
        path = self.config.get("path")
        if not path:
            return None
        path = os.path.expanduser(path)
        if not os.path.isabs(path):
            path = os.path.join(self.base_dir or os.getcwd(), path)
        return os.path.normpath(path)

    def location(self) -> str:
        if self.config.get("path"):
            return self.path or ""
        parts = urlsplit(self.config.get("url") or "")
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        tail = ""
        if self.config.get("tenant") not in (None, "default_tenant") or \
                self.config.get("database") not in (None, "default_database"):
            tail = f" (tenant {self.config.get('tenant')}, database {self.config.get('database')})"
        return redact_url(urlunsplit((parts.scheme, netloc, parts.path, "", ""))) + tail

    @property
    def timeout(self) -> float:
        return float(self.config.get("timeout") or DEFAULT_TIMEOUT)

    @property
    def retries(self) -> int:
        retries = self.config.get("retries")
        return DEFAULT_RETRIES if retries is None else int(retries)

    def database_exists(self) -> bool:
        """Whether there is a store to read (a server is assumed to be one)."""
        self._check_settings()
        path = self.path
        return path is None or os.path.isfile(os.path.join(path, "chroma.sqlite3"))

    def client(self):
        if self._client is None:
            self._check_settings()
            with translate_errors(f"{self.where}: cannot open Chroma at {self.location()}"):
                import chromadb
                tenant = self.config.get("tenant") or "default_tenant"
                database = self.config.get("database") or "default_database"
                if self.path is not None:
                    if os.path.exists(self.path) and not os.path.isdir(self.path):
                        raise SourceError(f"{self.where}: {self.path} is a file, not a Chroma folder")
                    self._client = chromadb.PersistentClient(path=self.path, tenant=tenant, database=database)
                else:
                    parts = urlsplit(self.config["url"])
                    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
                    # a full URL as host makes chromadb use its scheme, port and path as given
                    host = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
                    headers = dict(self.config.get("headers") or {})
                    if parts.username:
                        import base64
                        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
                        headers.setdefault("Authorization", f"Basic {token}")
                    with _http_timeout(self.timeout):
                        self._client = chromadb.HttpClient(host=host, ssl=parts.scheme == "https",
                                                           headers=headers or None, tenant=tenant,
                                                           database=database)
                    _hook_http_errors(self._client)
        return self._client

    def max_batch(self) -> int:
        if self._max_batch is None:
            with translate_errors(f"{self.where}: cannot reach Chroma at {self.location()}"):
                store_max = int(self.client().get_max_batch_size())
            self._max_batch = max(1, min(int(self.config.get("batch_size") or DEFAULT_BATCH), store_max))
        return self._max_batch

    def collection(self, name: str):
        """The live collection, or None when there is none by that name."""
        from chromadb.errors import NotFoundError
        if not self.database_exists():
            return None
        with translate_errors(f"{self.where}: cannot open collection {name}"):
            try:
                # no embedding function: records carry their embeddings, nothing is embedded here
                return self.client().get_collection(name, embedding_function=None)
            except NotFoundError:
                return None

    def collect_responses(self) -> None:
        """Free the HTTP responses of the requests just made.

        httpx keeps each response in a reference cycle (with its stream), so the body
        and its decoded text, a batch's embeddings as JSON (tens of MB), wait for the
        garbage collector.  A program that collects seldom (the ``snapshotter`` program
        collects its young generation every 100,000 allocations) would hold dozens of
        them: peak RSS would grow with the collection.  Collecting the two young
        generations after each request costs well under a millisecond.
        """
        if self._client is not None and self.path is None:
            gc.collect(1)

    def reader(self) -> "ChromaReader":
        self._check_settings()
        return ChromaReader(self)

    def writer(self) -> "ChromaWriter":
        self._check_settings()
        return ChromaWriter(self)

    # -- what restore needs to know ------------------------------------------

    def schema_differences(self, snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        return index_differences(snapshot.schema, live.schema)

    def settings_differences(self, snapshot: StreamSpec, live: StreamSpec) -> list[str]:
        target = plain_metadata(snapshot.schema.get("metadata"))
        if not target or target == plain_metadata(live.schema.get("metadata")):
            # no metadata in the snapshot cannot be put back: Chroma's modify refuses an empty one
            return []
        return ["collection metadata"]

    def values_equal(self, spec: StreamSpec, a: Any, b: Any) -> bool:
        if spec.schema.get("space") != "cosine":
            return False
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            return False
        for field, x in a.items():
            y = b[field]
            if field == "embedding" and x is not None and y is not None:
                if not embeddings_close(x, y, COSINE_ULPS):
                    return False
            elif codec.pack(x) != codec.pack(y):
                return False
        return True


# -- stream schema -------------------------------------------------------------------

def collection_space(configuration: dict | None, metadata: dict | None) -> str:
    for kind in ("hnsw", "spann"):
        params = (configuration or {}).get(kind) or {}
        if params.get("space"):
            return str(params["space"])
    return str((metadata or {}).get("hnsw:space") or "l2")


def _estimate(col, schema: dict) -> int | None:
    # float32 vectors dominate a record; the rest is a guess
    try:
        return col.count() * (4 * int(schema.get("dimension") or 0) + 128)
    except Exception:  # noqa: BLE001 - an estimate is optional
        return None


def stream_schema(col) -> dict:
    """The collection as restore needs it, in a stable key order."""
    configuration = col.configuration_json or {}
    metadata = col.metadata or None
    try:
        index_schema = col.schema.serialize_to_json() if col.schema is not None else None
    except (AttributeError, NotImplementedError):
        index_schema = None
    return {
        "collection": col.name,
        "space": collection_space(configuration, metadata),
        "dimension": col.get_model().dimension,
        "configuration": codec.canonical(configuration),
        "metadata": codec.canonical(metadata) if metadata else None,
        "schema": codec.canonical(index_schema) if index_schema else None,
    }


def index_parameters(schema: dict) -> dict[str, Any]:
    """The parameters a collection is built with and cannot change afterwards."""
    out: dict[str, Any] = {"distance space": schema.get("space") or "l2"}
    configuration = schema.get("configuration") or {}
    for kind in ("hnsw", "spann"):
        params = configuration.get(kind)
        if params:
            out["index"] = kind
            for key, value in params.items():
                if key != "space" and key not in _TUNABLE:
                    out[f"{kind} {key}"] = value
    return out


def plain_metadata(metadata: dict | None) -> dict:
    """A collection's metadata without the legacy ``hnsw:*`` keys, which configure its index
    (captured and compared as its configuration) and which ``modify`` refuses to set."""
    return codec.canonical({k: v for k, v in (metadata or {}).items() if not str(k).startswith("hnsw:")})


def index_differences(snapshot: dict, live: dict) -> list[str]:
    if not snapshot:
        return []  # nothing was captured to compare with
    a, b = index_parameters(snapshot), index_parameters(live)
    keys = a.keys() | b.keys() if snapshot.get("configuration") else a.keys()
    diffs = [f"{k}: {a.get(k)} in the snapshot, {b.get(k)} live"
             for k in sorted(keys, key=lambda k: (k != "distance space", k)) if a.get(k) != b.get(k)]
    da, db = snapshot.get("dimension"), live.get("dimension")
    if da is not None and db is not None and da != db:
        diffs.append(f"embedding dimension: {da} in the snapshot, {db} live")
    return diffs


# -- values ------------------------------------------------------------------------

def _metadata(m: dict | None) -> dict | None:
    # Chroma cannot hold an empty metadata dict (add rejects it) but returns {} for a
    # record that has a uri and no metadata: both mean "no metadata"
    if not m:
        return None
    # values are scalars or lists of scalars, so sorted keys are all codec.canonical
    # would add, at a fraction of its cost per record
    return dict(sorted(m.items()))


def _ordered_keys(bits: np.ndarray) -> np.ndarray:
    """float32 bit patterns mapped onto a line where adjacent floats differ by 1 (-0 and +0 meet)."""
    import numpy as np
    i = bits.view(np.int32).astype(np.int64)
    return np.where(i < 0, np.int64(-(2**31)) - i, i)


def embeddings_close(a: Any, b: Any, ulps: int) -> bool:
    """Same shape and every component within ``ulps`` float32 steps (NaN matches NaN)."""
    import numpy as np
    x = np.ascontiguousarray(a, dtype=np.float32)
    y = np.ascontiguousarray(b, dtype=np.float32)
    if x.shape != y.shape:
        return False
    if np.array_equal(x, y):
        return True
    close = np.abs(_ordered_keys(x) - _ordered_keys(y)) <= ulps
    return bool(np.all(close | (np.isnan(x) & np.isnan(y))))


def _embedding_rows(embeddings: Any, order: list[int]) -> list | np.ndarray:
    """The batch's embeddings as float32 rows in ``order``: one conversion for the batch."""
    import numpy as np
    if embeddings is None:
        return [None] * len(order)
    if isinstance(embeddings, np.ndarray) and embeddings.ndim == 2:
        return embeddings[order].astype(np.float32)
    # ragged (mixed dimensions) or missing embeddings: row by row
    rows = list(embeddings)
    return [None if rows[i] is None else np.asarray(rows[i], dtype=np.float32) for i in order]


def _records(batch: tuple) -> list[tuple[str, dict]]:
    ids, embeddings, documents, metadatas, uris = batch
    return [(k, {"embedding": embeddings[j], "document": documents[j], "metadata": metadatas[j], "uri": uris[j]})
            for j, k in enumerate(ids)]


# -- id lists ----------------------------------------------------------------------

_TRIM: list = []


def release_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; nothing
    elsewhere).  Chroma's pages of ids are freed as they are gathered, but the heap keeps
    the space, held in place by the compact pages kept between them: listing 300,000 ids
    20,000 at a time peaked at 52 MB over the client without it, 27 MB with it after each
    page (Chroma's own page alone: 15 MB), and the batches read next are not stacked on
    the freed space.  A few milliseconds a call."""
    if not _TRIM:
        import ctypes
        try:
            _TRIM.append(ctypes.CDLL(None).malloc_trim)
        except (OSError, AttributeError):  # not glibc
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)



#: the longest id (UTF-8 bytes) held in the compact form; a collection with a longer one
#: is listed as Python strings, which cost less than fixed-width rows that wide
MAX_COMPACT_ID = 128


class SortedIds:
    """A collection's ids, sorted (Python string order) and without repeats.

    Held compactly as one NumPy array of fixed-width UTF-8 byte strings (UTF-8 byte order
    is code point order, so NumPy sorts them as Python sorts the strings): about 12 bytes
    an id for ``doc-00000001``, against some 60 as a Python string in a list, and no
    per-id objects.  A collection whose ids cannot be held so (an id of more than
    :data:`MAX_COMPACT_ID` bytes, one that ends in a NUL character, which fixed-width
    rows cannot tell from their padding, or one that is not valid Unicode) is held as a
    sorted list of strings instead."""

    def __init__(self, items: "np.ndarray | list[str]"):
        self.items = items

    @property
    def compact(self) -> bool:
        return not isinstance(self.items, list)

    def __len__(self) -> int:
        return len(self.items)

    def page(self, start: int, stop: int) -> list[str]:
        """Ids ``start`` to ``stop`` as strings."""
        if not self.compact:
            return self.items[start:stop]
        return [k.decode() for k in self.items[start:stop].tolist()]

    def digest(self) -> bytes:
        """A digest of the ids in order: equal digests mean equal id lists (the after-read
        check compares digests, so a read never holds two listings at once)."""
        import hashlib
        h = hashlib.blake2b(digest_size=32)
        h.update(f"{'compact' if self.compact else 'strings'} {len(self.items)} ".encode())
        if self.compact:
            h.update(f"{self.items.dtype.itemsize} ".encode())
            h.update(memoryview(self.items).cast("B"))
        else:
            for k in self.items:
                raw = k.encode("utf-8", "surrogatepass")
                h.update(len(raw).to_bytes(8, "little"))
                h.update(raw)
        return h.digest()

    @property
    def nbytes(self) -> int:
        """What the id list holds in memory (strings: their objects and the list's slots)."""
        if self.compact:
            return int(self.items.nbytes)
        import sys
        return sys.getsizeof(self.items) + sum(sys.getsizeof(k) for k in self.items)


class IdListing:
    """The pages of an id listing gathered into :class:`SortedIds`: each page is encoded,
    sorted and freed of repeats as it arrives (paging by offset may hand an id twice when
    the collection changes meanwhile), so what grows with the collection is one compact
    row an id."""

    def __init__(self) -> None:
        self._pages: list | None = []  # sorted NumPy pages; None once held as strings
        self._strings: set[str] = set()

    def add(self, page: list[str]) -> None:
        if self._pages is not None:
            rows = _compact_rows(page)
            if rows is not None:
                self._pages.append(rows)
                return
            for rows in self._pages:
                self._strings.update(k.decode() for k in rows.tolist())
            self._pages = None
        self._strings.update(page)

    def sorted(self) -> SortedIds:
        if self._pages is None:
            ids = sorted(self._strings)
            self._strings = set()
            return SortedIds(ids)
        import numpy as np
        pages, self._pages = self._pages, []
        rows = np.concatenate(pages) if pages else np.empty(0, dtype="S1")
        del pages
        return SortedIds(_unique_sorted(rows))


def _compact_rows(page: list[str]) -> "np.ndarray | None":
    """``page`` as sorted fixed-width UTF-8 rows without repeats, or None when one of its
    ids cannot be held so (see :class:`SortedIds`)."""
    import numpy as np
    try:
        encoded = [k.encode() for k in page]
    except UnicodeEncodeError:  # a lone surrogate
        return None
    width = max(map(len, encoded), default=1)
    if width > MAX_COMPACT_ID or (b"\0" in b"".join(encoded) and any(k.endswith(b"\0") for k in encoded)):
        return None
    return _unique_sorted(np.array(encoded, dtype=f"S{max(width, 1)}"))


def _unique_sorted(rows: "np.ndarray") -> "np.ndarray":
    import numpy as np
    rows.sort()
    if len(rows) > 1:
        keep = np.empty(len(rows), dtype=bool)
        keep[0] = True
        np.not_equal(rows[1:], rows[:-1], out=keep[1:])
        if not keep.all():
            rows = rows[keep]
    return rows


# -- reading -----------------------------------------------------------------------

class ChromaReader(SourceReader):
    def __init__(self, backend: ChromaBackend):
        self.b = backend
        self.consistency = "checked"  # becomes best-effort when a collection kept changing
        self._attempts: dict[str, int] = {}
        self._next_ids: dict[str, SortedIds] = {}

    def streams(self) -> list[StreamSpec]:
        b = self.b
        if not b.database_exists():
            what = "the folder does not exist" if not os.path.isdir(b.path) else "no chroma.sqlite3 in it"
            raise SourceError(f"{b.where}: no Chroma database at {b.path} ({what})")
        with translate_errors(f"{b.where}: cannot list collections at {b.location()}"):
            cols = {c.name: c for c in b.client().list_collections()}
        wanted = b.config.get("collections")
        exclude = set(b.config.get("exclude") or [])
        if wanted:
            missing = [n for n in wanted if n not in cols]
            if missing:
                raise NotFound(f"{b.where}: no collection {', '.join(missing)} at {b.location()}")
            names = list(dict.fromkeys(wanted))
        else:
            names = sorted(n for n in cols if n not in exclude)
        with translate_errors(f"{b.where}: cannot read collection settings at {b.location()}"):
            return [StreamSpec(n, schema, estimated_bytes=_estimate(cols[n], schema))
                    for n, schema in ((n, stream_schema(cols[n])) for n in names)]

    def live_spec(self, name: str) -> StreamSpec | None:
        col = self.b.collection(name)
        if col is None:
            return None
        with translate_errors(f"{self.b.where}: cannot read the settings of collection {name}"):
            return StreamSpec(name, stream_schema(col))

    def read(self, spec: StreamSpec, sessions: Sequence[str] | None = None) -> Iterator[list]:
        col = self.b.collection(spec.name)
        if col is None:
            return
        what = f"{self.b.where}: cannot read collection {spec.name}"
        size = self.b.max_batch()
        attempt = self._attempts.get(spec.name, 0)
        self._attempts[spec.name] = attempt + 1
        ids = self._next_ids.pop(spec.name, None) or self.list_ids(col, what)
        try:
            for batch in read_ahead(self.fetch(col, ids, size, what), name="chroma-prefetch"):
                yield _records(batch)
        except SourceError as exc:
            # embedded Chroma fails a get by ids that a concurrent delete removed mid-request
            # ("Error finding id"): the collection changed while it was read
            if "Error finding id" not in exc.message or not self.restartable or attempt >= self.b.retries:
                raise
            log.info("%s: collection %s changed while it was read (%s); reading it again",
                     self.b.where, spec.name, exc.message)
            raise StreamChanged(f"collection {spec.name} changed while it was read") from exc
        # the listing is compared by digest: it is freed before the ids are listed again
        before, count = ids.digest(), len(ids)
        del ids
        after = self.list_ids(col, what)
        if after.digest() == before:
            return
        if self.restartable and attempt < self.b.retries:
            log.info("%s: collection %s changed while it was read (%d ids before, %d after); reading it again",
                     self.b.where, spec.name, count, len(after))
            self._next_ids[spec.name] = after
            raise StreamChanged(f"collection {spec.name} changed while it was read")
        self.consistency = "best-effort"
        log.warning("%s: collection %s changed during %s; the snapshot holds the last read (best-effort)",
                    self.b.where, spec.name, f"every one of {attempt + 1} reads" if attempt else "the read")

    def read_keys(self, spec: StreamSpec, keys: list) -> Iterator[list]:
        col = self.b.collection(spec.name)
        if col is None:
            return
        what = f"{self.b.where}: cannot read collection {spec.name}"
        for batch in self.fetch(col, sorted(keys), self.b.max_batch(), what):
            yield _records(batch)

    def list_keys(self, spec: StreamSpec) -> Iterator[list]:
        col = self.b.collection(spec.name)
        if col is None:
            return
        ids = self.list_ids(col, f"{self.b.where}: cannot list the ids of collection {spec.name}")
        for start in range(0, len(ids), ID_PAGE):
            yield ids.page(start, start + ID_PAGE)

    def list_ids(self, col, what: str) -> "SortedIds":
        """Every id of the collection, sorted and without repeats (ids only: no embeddings
        cross the wire), paged so that Chroma materialises one page at a time."""
        listing = IdListing()
        offset = 0
        with translate_errors(what):
            while True:
                page = col.get(include=[], limit=ID_PAGE, offset=offset)["ids"]
                self.b.collect_responses()
                listing.add(page)
                offset += len(page)
                if len(page) < ID_PAGE:
                    break
                del page
                release_freed_memory()
        ids = listing.sorted()
        del listing
        release_freed_memory()
        return ids

    def fetch(self, col, ids: "SortedIds | list[str]", size: int, what: str) -> Iterator[tuple]:
        """Columnar batches ``(ids, embeddings, documents, metadatas, uris)`` in id order;
        ids deleted since the listing are left out (the after-check notices)."""
        for start in range(0, len(ids), size):
            wanted = ids.page(start, start + size) if isinstance(ids, SortedIds) else ids[start:start + size]
            with translate_errors(what):
                got = col.get(ids=wanted, include=INCLUDE)
            self.b.collect_responses()
            at = {k: i for i, k in enumerate(got["ids"])}
            order = [at[k] for k in wanted if k in at]
            keys = wanted if len(order) == len(wanted) else [k for k in wanted if k in at]
            documents = got.get("documents") or [None] * len(at)
            metadatas = got.get("metadatas") or [None] * len(at)
            uris = got.get("uris") or [None] * len(at)
            try:
                embeddings = _embedding_rows(got.get("embeddings"), order)
            except (ValueError, TypeError) as exc:
                raise SourceError(f"{what}: unreadable embeddings near id {wanted[0]!r}: {_one_line(exc)}") from exc
            yield (keys, embeddings, [documents[i] for i in order], [_metadata(metadatas[i]) for i in order],
                   [uris[i] for i in order])


# -- writing -----------------------------------------------------------------------

class ChromaWriter(SourceWriter):
    transactional = False

    def __init__(self, backend: ChromaBackend):
        self.b = backend
        self._cols: dict[str, Any] = {}
        self._dims: dict[str, int | None] = {}

    def prepare(self, spec: StreamSpec) -> None:
        b = self.b
        col = b.collection(spec.name) if b.database_exists() else None
        if col is None:
            col = self._create(spec)
        else:
            with translate_errors(f"{b.where}: cannot read the settings of collection {spec.name}"):
                live = stream_schema(col)
            diffs = index_differences(spec.schema, live)
            if diffs:
                raise SchemaMismatch(f"{b.where}: collection {spec.name} changed since the snapshot: "
                                     + "; ".join(diffs))
            self._dims[spec.name] = live.get("dimension")
        self._cols[spec.name] = col
        self._dims.setdefault(spec.name, spec.schema.get("dimension"))

    def restore_settings(self, spec: StreamSpec, seen: dict) -> None:
        """The snapshot's collection metadata, without ``hnsw:*`` keys (``modify`` replaces
        the metadata whole and refuses those; the index keeps its configuration)."""
        target = plain_metadata(spec.schema.get("metadata"))
        if not target:
            return
        what = f"{self.b.where}: cannot restore the metadata of collection {spec.name}"
        with translate_errors(what):
            col = self.b.collection(spec.name)
            now = plain_metadata(col.metadata if col is not None else None)
        if now != plain_metadata(seen.get("metadata")):
            raise Refused(f"{self.b.where}: the metadata of collection {spec.name} changed after the restore "
                          f"planned it (the incident holds the one it saw); not overwritten: run the restore again")
        with translate_errors(what):
            col.modify(metadata=target)

    def _create(self, spec: StreamSpec):
        b = self.b
        captured = spec.schema
        metadata = captured.get("metadata") or None
        what = f"{b.where}: cannot recreate collection {spec.name}"
        with translate_errors(what):
            client = b.client()
            if metadata and any(str(k).startswith("hnsw:") for k in metadata):
                # legacy hnsw:* metadata configures the index itself, and Chroma refuses it
                # next to a configuration or schema; it alone recreates such a collection
                ef = _embedding_function(captured.get("configuration", {}).get("embedding_function"), spec.name)
                col = client.create_collection(spec.name, metadata=metadata, embedding_function=ef)
            elif captured.get("schema"):
                from chromadb.api.types import Schema
                index_schema = _without_unbuildable_functions(captured["schema"], spec.name)
                col = client.create_collection(spec.name, schema=Schema.deserialize_from_json(index_schema),
                                               metadata=metadata, embedding_function=None)
            else:
                from chromadb.api.collection_configuration import load_create_collection_configuration_from_json
                configuration = dict(captured.get("configuration") or {})
                ef = configuration.pop("embedding_function", None)
                create = load_create_collection_configuration_from_json(configuration)
                built = _embedding_function(ef, spec.name)
                if built is not None:
                    create["embedding_function"] = built
                col = client.create_collection(spec.name, configuration=create, metadata=metadata,
                                               embedding_function=None)
            col = client.get_collection(spec.name, embedding_function=None)
            live = stream_schema(col)
        diffs = index_differences({**captured, "dimension": None}, live)
        if diffs:
            raise SourceError(f"{what}: Chroma created it with other settings ({'; '.join(diffs)})")
        if (captured.get("configuration") or {}).get("embedding_function") != \
                (live.get("configuration") or {}).get("embedding_function"):
            log.warning("%s: collection %s was recreated with embedding function %s (the snapshot had %s)",
                        b.where, spec.name, live["configuration"].get("embedding_function"),
                        captured["configuration"].get("embedding_function"))
        return col

    def _collection(self, spec: StreamSpec):
        if spec.name not in self._cols:
            col = self.b.collection(spec.name)
            if col is None:
                raise SourceError(f"{self.b.where}: collection {spec.name} does not exist")
            self._cols[spec.name] = col
        return self._cols[spec.name]

    def _request(self, what: str, call, **kwargs):
        """``call(**kwargs)``, sent again after a pause when it fails transiently
        (:data:`WRITE_BACKOFF`); every request of the writer is idempotent."""
        for pause in (*WRITE_BACKOFF, None):
            try:
                with translate_errors(what):
                    try:
                        return call(**kwargs)
                    finally:
                        self.b.collect_responses()
            except SourceError as exc:
                if pause is None or not transient(exc.__cause__):
                    raise
                log.warning("%s (trying again in %.1f s)", exc.message, pause)
                time.sleep(pause)

    def upsert(self, spec: StreamSpec, records: list) -> None:
        col = self._collection(spec)
        what = f"{self.b.where}: cannot write collection {spec.name}"
        size = self.b.max_batch()
        for start in range(0, len(records), size):
            batch = records[start:start + size]
            ids = [k for k, _ in batch]
            values = [v for _, v in batch]
            embeddings = self._embeddings(spec, ids, values)
            documents = [v.get("document") for v in values]
            metadatas = [v.get("metadata") or None for v in values]
            uris = [v.get("uri") for v in values]
            # a document or uri the snapshot's record lacks cannot be taken out of a live
            # record by upsert or update: those few records are deleted and added back
            got = self._request(what, col.get, ids=ids, include=["documents", "uris"])
            n = len(got["ids"])
            live = dict(zip(got["ids"], zip(got.get("documents") or [None] * n, got.get("uris") or [None] * n)))
            stale = [i for i, k in enumerate(ids) if k in live and
                     ((documents[i] is None and live[k][0] is not None) or (uris[i] is None and live[k][1] is not None))]
            if stale:
                self._replace(col, what, [ids[i] for i in stale], embeddings[stale], [documents[i] for i in stale],
                              [metadatas[i] for i in stale], [uris[i] for i in stale])
                replaced = set(stale)
                kept = [i for i in range(len(ids)) if i not in replaced]
                if kept:
                    # upsert, not delete + add: each record keeps its live value until this
                    # one request replaces it, so a failure part-way never leaves one missing
                    self._write(col, what, [ids[i] for i in kept], embeddings[kept], [documents[i] for i in kept],
                                [metadatas[i] for i in kept], [uris[i] for i in kept])
            else:
                self._write(col, what, ids, embeddings, documents, metadatas, uris)
            self._repair_metadata(col, what, ids, metadatas)

    def _write(self, col, what: str, ids, embeddings, documents, metadatas, uris) -> None:
        self._request(what, col.upsert, ids=ids, embeddings=embeddings,
                      documents=documents if any(d is not None for d in documents) else None,
                      metadatas=metadatas if any(m is not None for m in metadatas) else None,
                      uris=uris if any(u is not None for u in uris) else None)

    def _replace(self, col, what: str, ids: list[str], embeddings, documents, metadatas, uris) -> None:
        """Delete these records and add them with exactly the snapshot's values; if the add
        fails, put them back as they were."""
        got = self._request(what, col.get, ids=ids, include=INCLUDE)
        n = len(got["ids"])
        old = _records((got["ids"], _embedding_rows(got.get("embeddings"), list(range(n))),
                        got.get("documents") or [None] * n,
                        [_metadata(m) for m in got.get("metadatas") or [None] * n], got.get("uris") or [None] * n))
        self._request(what, col.delete, ids=ids)
        try:
            self._write(col, what, ids, embeddings, documents, metadatas, uris)
        except SourceError as exc:
            import numpy as np
            try:
                if old:
                    self._write(col, what, [k for k, _ in old],
                                np.stack([np.asarray(v["embedding"], dtype=np.float32) for _, v in old]),
                                [v["document"] for _, v in old], [v["metadata"] for _, v in old],
                                [v["uri"] for _, v in old])
            except SourceError:
                shown = ", ".join(map(repr, ids[:3])) + (", ..." if len(ids) > 3 else "")
                raise SourceError(f"{exc.message}; {len(ids)} record(s) deleted to be rewritten could not be "
                                  f"added back ({shown}): run the restore again") from exc
            raise SourceError(f"{exc.message}; the {len(old)} record(s) it deleted to rewrite were put back "
                              f"as they were") from exc

    def _repair_metadata(self, col, what: str, ids: list[str], intended: list[dict | None]) -> None:
        """Make the written records' metadata exactly ``intended``.

        ``upsert`` keeps the metadata keys the new value lacks, and Chroma 1.5 leaves the
        list-valued metadata of deleted records (and of dropped collections) behind and
        attaches it to new records that reuse their internal row ids, so a written record
        can come back with keys it was never given.  An update setting those keys to None
        removes them.
        """
        for _ in range(3):
            got = self._request(what, col.get, ids=ids, include=["metadatas"])
            have = dict(zip(got["ids"], got["metadatas"] or [None] * len(got["ids"])))
            fix_ids, fixes = [], []
            for key, want in zip(ids, intended):
                if key not in have:
                    raise SourceError(f"{what}: record {key!r} is missing right after it was written")
                now = _metadata(have[key]) or {}
                want = want or {}
                if codec.pack(now) == codec.pack(want):
                    continue
                fix = {k: None for k in now if k not in want}
                fix.update({k: v for k, v in want.items() if codec.pack(now.get(k)) != codec.pack(v)})
                fix_ids.append(key)
                fixes.append(fix)
            if not fix_ids:
                return
            self._request(what, col.update, ids=fix_ids, metadatas=fixes)
        raise SourceError(f"{what}: the metadata of record {fix_ids[0]!r} does not stay as written")

    def _embeddings(self, spec: StreamSpec, ids: list[str], values: list[dict]):
        """The batch's embeddings, checked before anything is deleted: Chroma refuses a
        record without one or with another dimension than the collection's."""
        import numpy as np
        rows = []
        for k, v in zip(ids, values):
            e = v.get("embedding")
            if e is None:
                raise SourceError(f"{self.b.where}: record {k!r} of collection {spec.name} has no embedding, "
                                  f"which Chroma requires")
            rows.append(np.asarray(e, dtype=np.float32))
        dims = sorted({r.shape[0] if r.ndim == 1 else -1 for r in rows})
        known = self._dims.get(spec.name)
        if len(dims) > 1 or dims[0] < 0 or (known is not None and dims[0] != known):
            held = f"; the collection holds dimension {known}" if known is not None else ""
            raise SourceError(f"{self.b.where}: collection {spec.name}: records to write have embedding "
                              f"dimension {', '.join(map(str, dims))}{held}; nothing in this batch was written")
        self._dims[spec.name] = dims[0]
        return np.stack(rows)

    def delete(self, spec: StreamSpec, keys: list) -> None:
        col = self._collection(spec)
        size = self.b.max_batch()
        what = f"{self.b.where}: cannot delete from collection {spec.name}"
        for start in range(0, len(keys), size):
            self._request(what, col.delete, ids=[str(k) for k in keys[start:start + size]])


# -- embedding functions -------------------------------------------------------------

def _embedding_function(config: dict | None, collection: str):
    """The embedding function a collection's configuration names, or None when it names
    none or it cannot be built here (its package or API key is missing)."""
    if not config or config.get("type") != "known":
        return None
    from chromadb.utils.embedding_functions import config_to_embedding_function
    try:
        return config_to_embedding_function(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build means "recreate without it"
        log.warning("collection %s: embedding function %r cannot be built here (%s); recreated without it",
                    collection, config.get("name"), _one_line(exc))
        return None


def _without_unbuildable_functions(index_schema: dict, collection: str) -> dict:
    """The index schema with embedding-function references that cannot be built here
    replaced by Chroma's "none recorded" form: Chroma would otherwise record its default
    function, which an agent passing its own function then conflicts with."""
    buildable: dict[str, bool] = {}

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "embedding_function" and isinstance(v, dict) and v.get("type") == "known":
                    seen = codec.key_text(v)
                    if seen not in buildable:
                        buildable[seen] = _embedding_function(v, collection) is not None
                    out[k] = v if buildable[seen] else {"type": "legacy"}
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(index_schema)
