"""One suite, every backend: local directory, S3 (moto on loopback), peer (uvicorn on loopback).

The first half checks the Backend contract (backend.py's docstring); the second
runs the chunk store itself over each backend: round trip, corruption, GC.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.store.conftest import FAST_RETRY
from vmstream.store import Backend, ChunkStore, CorruptChunk, InvalidKey, ObjectNotFound, RetryingBackend, RetryPolicy, collect_garbage

DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable


def test_put_get_round_trip(backend: Backend) -> None:
    backend.put("a/b/object", DATA)
    assert backend.get("a/b/object") == DATA
    backend.put("empty", b"")
    assert backend.get("empty") == b""


def test_put_replaces_whole_object(backend: Backend) -> None:
    backend.put("k", DATA)
    backend.put("k", b"short")
    assert backend.get("k") == b"short"


def test_readers_never_see_a_torn_object(backend: Backend) -> None:
    old, new = b"o" * (1 << 20), b"n" * (1 << 20)
    backend.put("obj", old)
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            backend.put("obj", new)
            backend.put("obj", old)

    # Read through retries, as the store does: moto answers 500 when an object is replaced
    # mid-GET (it closes the old buffer), a transient error. Torn bytes would be a failure.
    reader = RetryingBackend(backend, RetryPolicy(attempts=10, initial_delay=0.01, max_delay=0.05))
    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(30):
            assert reader.get("obj") in (old, new)
    finally:
        stop.set()
        writer.join()


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, None), (7, None), (0, 1), (7, 100), (0, 0), (100, 0), (10239, 5), (10240, None), (10240, 3), (20000, 3), (3, 10**9)],
)
def test_get_range_is_a_slice(backend: Backend, offset: int, size: int | None) -> None:
    backend.put("r", DATA)
    want = DATA[offset:] if size is None else DATA[offset : offset + size]
    assert backend.get("r", offset, size) == want


def test_large_object_ranged_reads(backend: Backend) -> None:
    blob = os.urandom(3 << 20)
    backend.put("big", blob)
    for off, size in [(0, 1 << 20), ((1 << 20) + 5, 777), ((3 << 20) - 10, 100)]:
        assert backend.get("big", off, size) == blob[off : off + size]


def test_missing_object(backend: Backend) -> None:
    assert not backend.exists("nope")
    with pytest.raises(ObjectNotFound, match="nope"):
        backend.get("nope")
    with pytest.raises(ObjectNotFound):
        backend.get("nope", 5, 10)
    with pytest.raises(ObjectNotFound):
        backend.get("nope", 0, 0)


def test_exists_and_delete(backend: Backend) -> None:
    backend.put("x/y", b"1")
    assert backend.exists("x/y")
    backend.delete("x/y")
    assert not backend.exists("x/y")
    with pytest.raises(ObjectNotFound):
        backend.get("x/y")
    backend.delete("x/y")  # idempotent


def test_list_by_prefix(backend: Backend) -> None:
    assert list(backend.list()) == []
    keys = ["packs/bb", "packs/aa", "packsx", "index/aa", "refs/img/memory", "refs/img2"]
    for i, k in enumerate(keys):
        backend.put(k, b"z" * i)
    assert [o.key for o in backend.list()] == sorted(keys)
    assert [o.key for o in backend.list("packs/")] == ["packs/aa", "packs/bb"]
    assert [o.key for o in backend.list("packs")] == ["packs/aa", "packs/bb", "packsx"]
    assert [o.key for o in backend.list("refs/img")] == ["refs/img/memory", "refs/img2"]
    assert [o.key for o in backend.list("nothing/")] == []
    infos = {o.key: o for o in backend.list()}
    assert infos["refs/img2"].size == 5
    assert all(abs(o.mtime - time.time()) < 300 for o in infos.values())


@pytest.mark.parametrize("key", ["", "../etc/passwd", "/abs", "a//b", ".hidden", "a/.tmp-x", "a/../b", "sp ace", "a/"])
def test_invalid_keys_refused(backend: Backend, key: str) -> None:
    with pytest.raises(InvalidKey):
        backend.put(key, b"x")
    with pytest.raises(InvalidKey):
        backend.get(key)


# ---- the chunk store over each backend -------------------------------------------------------


def make_file(path: Path, size: int, regions: list[tuple[int, bytes]]) -> bytes:
    """A sparse file with the given data regions; returns its full content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in regions:
            f.seek(off)
            f.write(data)
    return path.read_bytes()


def small_store(backend: Backend) -> ChunkStore:
    return ChunkStore(backend, chunk_size=16 << 10, pack_size=64 << 10, retry=FAST_RETRY)


def test_store_round_trip(backend: Backend, tmp_path: Path) -> None:
    content = make_file(
        tmp_path / "f",
        (1 << 20) + 1000,  # not a multiple of the chunk size
        [(0, os.urandom(100_000)), (300_000, b"compressible " * 20_000), ((1 << 20) - 50, os.urandom(1000))],
    )
    with small_store(backend) as store:
        cmap = store.store_file(tmp_path / "f", ref="img/memory")
        assert len(cmap.packs) > 1  # several packs, so the index and pack logic is exercised
        assert store.list_refs() == ["img/memory"]
        again = store.get_ref("img/memory")
        assert again == cmap
        assert store.read_range(again, 0, again.size) == content
        for off, size in [(0, 1), (16383, 2), (299_990, 50_000), ((1 << 20) - 60, 5000), (5 << 20, 10)]:
            assert store.read_range(again, off, size) == content[off : off + size]
        store.export_file(again, tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == content


def test_corrupted_pack_detected(backend: Backend, tmp_path: Path) -> None:
    content = make_file(tmp_path / "f", 256 << 10, [(0, os.urandom(64 << 10)), (128 << 10, b"abc" * 30_000)])
    with small_store(backend) as store:
        cmap = store.store_file(tmp_path / "f")
        for ref in cmap.stored():
            key = f"packs/{ref.pack}"
            good = backend.get(key)
            bad = bytearray(good)
            bad[ref.offset + ref.length // 2] ^= 0x01
            backend.put(key, bytes(bad))
            with pytest.raises(CorruptChunk, match=ref.id) as exc:
                store.read_chunk(ref)
            assert key in str(exc.value) and "damaged" in str(exc.value)
            with pytest.raises(CorruptChunk):
                store.read_range(cmap, 0, cmap.size)
            backend.put(key, good)
        assert store.read_range(cmap, 0, cmap.size) == content


def test_gc_keeps_referenced_removes_unreferenced(backend: Backend, tmp_path: Path) -> None:
    shared = os.urandom(64 << 10)
    a = make_file(tmp_path / "a", 512 << 10, [(0, shared), (256 << 10, os.urandom(128 << 10))])
    b = make_file(tmp_path / "b", 512 << 10, [(0, shared), (128 << 10, os.urandom(64 << 10))])
    with small_store(backend) as store:
        map_a = store.store_file(tmp_path / "a", ref="a")
        map_b = store.store_file(tmp_path / "b", ref="b")
        store.delete_ref("a")
        only_a = map_a.packs - map_b.packs
        assert only_a and map_a.packs & map_b.packs  # b reuses a's packs for the shared chunks
        first = collect_garbage(store, grace=0)
        assert first.condemned == len(only_a) and first.deleted == 0
        second = collect_garbage(store, grace=0)
        assert second.deleted == len(only_a)
        left = {o.key.removeprefix("packs/") for o in backend.list("packs/")}
        assert left == map_b.packs
        assert not list(backend.list("gc/"))
        for ref in map_b.stored():
            store.read_chunk(ref)
        assert store.read_range(map_b, 0, map_b.size) == b
        assert a[: 64 << 10] == store.read_range(map_b, 0, 64 << 10)
