"""A large Chroma collection is read with memory that does not grow by a Python string an
id: the id listing is held as one compact sorted array, built page by page, and the
check after the read compares a digest instead of a second list.  Measured on an
embedded collection of 20,000 ids with tracemalloc (what Python allocates), the listing
paged in tenths of it, so that a property of the whole list shows beside one page."""
from __future__ import annotations

import sys
import tracemalloc

import chromadb
import numpy as np
import pytest

import snapshotter_backends.chroma as chroma
from snapshotter_backends.chroma import ChromaBackend, IdListing, SortedIds

N = 20_000
PAGE = 2_000


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("chroma-big") / "chroma"
    col = chromadb.PersistentClient(path=str(path)).create_collection("big", embedding_function=None)
    ids = [f"doc-{i:08d}" for i in np.random.default_rng(3).permutation(N)]  # added out of order
    for start in range(0, N, 5000):
        col.add(ids=ids[start:start + 5000], embeddings=np.zeros((5000, 2), np.float32))
    return str(path)


def traced(call):
    """``call()``'s result, with the bytes it left allocated and the most it had at once."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = call()
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, now - base, peak - base


def test_the_id_listing_is_compact_and_does_not_hold_a_string_an_id(big, monkeypatch):
    monkeypatch.setattr(chroma, "ID_PAGE", PAGE)
    backend = ChromaBackend("memory", {"path": big})
    reader = backend.reader()
    col = backend.collection("big")
    reader.list_ids(col, "warm-up")  # Chroma's own first-use allocations are not the listing's
    ids, held, peak = traced(lambda: reader.list_ids(col, "listing"))
    assert isinstance(ids, SortedIds) and ids.compact
    assert ids.items.dtype == np.dtype("S12") and ids.nbytes == 12 * N
    assert ids.page(0, 3) == ["doc-00000000", "doc-00000001", "doc-00000002"]
    assert ids.page(N - 1, N + 5) == [f"doc-{N - 1:08d}"]
    # a list of str costs ~69 bytes an id held, ~190 at its peak (a set, then the list)
    assert held / N < 16, f"{held / N:.1f} bytes an id held after the listing"
    assert peak / N < 60, f"{peak / N:.1f} bytes an id at the listing's peak"


def test_a_read_holds_one_compact_listing_and_checks_by_digest(big, monkeypatch):
    monkeypatch.setattr(chroma, "ID_PAGE", PAGE)
    backend = ChromaBackend("memory", {"path": big, "batch_size": 100, "retries": 0})
    with backend.reader() as reader:
        spec = reader.streams()[0]
        seen = {"records": 0, "last": ""}

        def read_all():
            for batch in reader.read(spec):
                assert batch[0][0] > seen["last"]
                seen["records"] += len(batch)
                seen["last"] = batch[-1][0]
        _, _, peak = traced(read_all)
        assert reader.consistency == "checked"
    assert seen == {"records": N, "last": f"doc-{N - 1:08d}"}
    # listing and check held as strings (the list and the second listing) cost ~140 bytes an id
    assert peak / N < 60, f"{peak / N:.1f} bytes an id at the read's peak"


def test_a_change_that_keeps_the_count_is_seen_by_the_digest(tmp_path):
    col = chromadb.PersistentClient(path=str(tmp_path / "chroma")).create_collection("col", embedding_function=None)
    ids = [f"m{i:03d}" for i in range(50)]
    col.add(ids=ids, embeddings=np.ones((len(ids), 4), np.float32))
    backend = ChromaBackend("memory", {"path": str(tmp_path / "chroma"), "batch_size": 10, "retries": 0})
    with backend.reader() as reader:
        spec = reader.streams()[0]
        batches = reader.read(spec)
        next(batches)
        # same count, another id: only the ids themselves tell
        col.delete(ids=["m049"])
        col.add(ids=["m050"], embeddings=np.ones((1, 4), np.float32))
        list(batches)
        assert reader.consistency == "best-effort"


@pytest.mark.parametrize("odd", [
    ["a\x00", "a", "b\x00\x00"],  # fixed-width rows cannot tell a trailing NUL from padding
    ["x" * (chroma.MAX_COMPACT_ID + 1), "y"],  # longer than a compact row
])
def test_ids_that_cannot_be_held_compactly_are_listed_as_strings(tmp_path, odd):
    col = chromadb.PersistentClient(path=str(tmp_path / "chroma")).create_collection("col", embedding_function=None)
    ids = ["épée", "Zebra", "10", "9", "\U0001f600", "ab"] + odd
    col.add(ids=ids, embeddings=np.ones((len(ids), 2), np.float32))
    backend = ChromaBackend("memory", {"path": str(tmp_path / "chroma"), "batch_size": 3, "retries": 0})
    with backend.reader() as reader:
        listed = reader.list_ids(backend.collection("col"), "listing")
        assert not listed.compact and listed.page(0, 100) == sorted(ids)
        spec = reader.streams()[0]
        keys = [k for batch in reader.read(spec) for k, _ in batch]
        assert reader.consistency == "checked"
    assert keys == sorted(ids)


def test_pages_are_merged_in_python_string_order_without_repeats():
    pages = [["b", "épée", "a"], ["a", "\u20ac", "\U0001f600", "B", "ab"], [], ["\x7f", "é"]]
    listing = IdListing()
    for page in pages:
        listing.add(page)
    ids = listing.sorted()
    everything = sorted({k for page in pages for k in page})
    assert ids.compact and ids.page(0, 100) == everything
    # a page that cannot be held compactly turns the whole listing into strings
    listing = IdListing()
    for page in pages + [["z\x00"]]:
        listing.add(page)
    ids = listing.sorted()
    assert not ids.compact and ids.page(0, 100) == sorted(set(everything) | {"z\x00"})
    # digests tell lists apart by content, not only by length
    one, other = IdListing(), IdListing()
    one.add(["a", "b"])
    other.add(["a", "c"])
    assert one.sorted().digest() != other.sorted().digest()
    same, again = IdListing(), IdListing()
    same.add(["a", "b"])
    again.add(["b", "a", "b"])
    assert again.sorted().digest() == same.sorted().digest()


def rss_anon_mb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    pytest.skip("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_freed_heap_memory_goes_back_to_the_system_after_a_listing():
    # freed blocks between live ones stay in the heap until it is trimmed
    blocks = [bytes(1000) + bytes([i % 256]) for i in range(60_000)]
    kept = blocks[::16]
    del blocks
    before = rss_anon_mb()
    chroma.release_freed_memory()
    assert before - rss_anon_mb() > 25
    assert len(kept) == 3750
