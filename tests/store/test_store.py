"""The chunk store on a local directory: format, zero chunks, dedup, big sparse files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.store.conftest import FAST_RETRY
from tests.store.test_conformance import make_file
from vmstream.store import ChunkMap, ChunkStore, LocalBackend, StoreConflict, StoreError
from vmstream.store.store import RAW, ZSTD

CS = 64 << 10


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(LocalBackend(tmp_path / "store"), chunk_size=CS, pack_size=1 << 20, retry=FAST_RETRY)


def stored_bytes(store: ChunkStore) -> int:
    return sum(o.size for o in store.backend.list("packs/"))


def test_zero_chunks_are_not_stored(store: ChunkStore, tmp_path: Path) -> None:
    make_file(tmp_path / "zeros", 10 * CS, [])
    cmap = store.store_file(tmp_path / "zeros")
    assert cmap.chunks == [None] * 10 and stored_bytes(store) == 0
    # Written zeros (not holes) are found by content, too.
    (tmp_path / "written").write_bytes(bytes(3 * CS) + b"\x01" + bytes(CS))
    cmap = store.store_file(tmp_path / "written")
    assert [c is not None for c in cmap.chunks] == [False, False, False, True, False]
    assert cmap.nonzero_bytes == CS
    assert store.read_range(cmap, 0, cmap.size) == (tmp_path / "written").read_bytes()


def test_empty_file(store: ChunkStore, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    cmap = store.store_file(tmp_path / "empty", ref="empty")
    assert cmap.size == 0 and cmap.chunks == []
    assert store.read_range(store.get_ref("empty"), 0, 100) == b""


def test_dedup_across_files_and_within_one(store: ChunkStore, tmp_path: Path) -> None:
    shared = os.urandom(4 * CS)
    a = make_file(tmp_path / "a", 16 * CS, [(0, shared), (8 * CS, os.urandom(2 * CS))])
    map_a = store.store_file(tmp_path / "a", ref="a")
    after_a = stored_bytes(store)
    # b holds the shared region at another chunk-aligned offset, twice, plus one new chunk.
    b = make_file(tmp_path / "b", 16 * CS, [(4 * CS, shared), (10 * CS, shared), (15 * CS, os.urandom(CS))])
    map_b = store.store_file(tmp_path / "b", ref="b")
    new_bytes = stored_bytes(store) - after_a
    assert CS < new_bytes < CS + 100  # only the one new chunk (raw, plus its marker byte)
    assert map_b.chunks[4:8] == map_a.chunks[0:4] == map_b.chunks[10:14]
    # A third copy of a costs nothing.
    store.store_file(tmp_path / "a", ref="a-again")
    assert stored_bytes(store) - after_a == new_bytes
    assert store.read_range(map_a, 0, map_a.size) == a
    assert store.read_range(map_b, 0, map_b.size) == b


def test_dedup_sees_other_writers(tmp_path: Path) -> None:
    """Two store objects on one backend (two hosts on one NFS path) dedup against each other."""
    content = os.urandom(8 * CS)
    (tmp_path / "f").write_bytes(content)
    one = ChunkStore(LocalBackend(tmp_path / "s"), chunk_size=CS)
    two = ChunkStore(LocalBackend(tmp_path / "s"), chunk_size=CS)
    one.store_file(tmp_path / "f")
    before = stored_bytes(one)
    cmap = two.store_file(tmp_path / "f")
    assert stored_bytes(one) == before
    assert one.read_range(cmap, 0, cmap.size) == content


def test_compression_only_where_it_pays(store: ChunkStore, tmp_path: Path) -> None:
    make_file(tmp_path / "f", 2 * CS, [(0, os.urandom(CS)), (CS, b"text " * (CS // 5))])
    cmap = store.store_file(tmp_path / "f")
    random_ref, text_ref = cmap.chunks
    assert random_ref and text_ref
    pack = store.backend.get(f"packs/{random_ref.pack}")
    assert pack[random_ref.offset : random_ref.offset + 1] == RAW and random_ref.length == CS + 1
    assert pack[text_ref.offset : text_ref.offset + 1] == ZSTD and text_ref.length < CS // 10


def test_index_and_ref_written_after_packs(store: ChunkStore, tmp_path: Path) -> None:
    """Every index names an existing pack and lists exactly the chunks the map points into it."""
    make_file(tmp_path / "f", 64 * CS, [(i * CS, os.urandom(CS)) for i in range(0, 64, 2)])
    cmap = store.store_file(tmp_path / "f", ref="f")
    packs = {o.key.removeprefix("packs/") for o in store.backend.list("packs/")}
    indexes = {o.key.removeprefix("index/") for o in store.backend.list("index/")}
    assert packs == indexes == cmap.packs and len(packs) > 1
    assert store.list_refs() == ["f"]


def test_sparse_64mib_round_trip(tmp_path: Path) -> None:
    """A memory-image-like file: random pages, text, long holes, written zeros; default chunk size."""
    rng = random.Random(7)
    regions = []
    for _ in range(40):
        off = rng.randrange(0, 64 << 20) & ~4095
        kind = rng.choice(["random", "text", "zeros"])
        size = rng.randrange(4096, 1 << 20)
        data = os.urandom(size) if kind == "random" else (b"page %d " % off) * (size // 10) if kind == "text" else bytes(size)
        regions.append((off, data[: max(0, (64 << 20) - off)]))
    content = make_file(tmp_path / "mem", 64 << 20, regions)
    with ChunkStore(LocalBackend(tmp_path / "store"), retry=FAST_RETRY) as store:
        cmap = store.store_file(tmp_path / "mem", ref="mem")
        assert sum(c is None for c in cmap.chunks) > len(cmap.chunks) // 3  # holes stay unstored
        cmap = store.get_ref("mem")
        assert store.read_range(cmap, 0, cmap.size) == content
        for _ in range(200):
            off, size = rng.randrange(0, 64 << 20), rng.randrange(0, 2 << 20)
            assert store.read_range(cmap, off, size) == content[off : off + size]
        store.export_file(cmap, tmp_path / "copy")
        assert (tmp_path / "copy").read_bytes() == content
        assert os.stat(tmp_path / "copy").st_blocks * 512 < (64 << 20) * 3 // 4  # written sparse


def test_ref_names_are_unique(store: ChunkStore, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    cmap = store.store_file(tmp_path / "f", ref="img")
    with pytest.raises(StoreConflict, match="exists already"):
        store.store_file(tmp_path / "f", ref="img")
    with pytest.raises(StoreConflict, match="exists already"):
        store.commit("img", cmap)
    store.commit("img", cmap, replace=True)
    assert store.get_ref("img") == cmap


def test_chunk_map_checks_its_shape() -> None:
    with pytest.raises(ValidationError, match="has 2 chunks, not 1"):
        ChunkMap(size=CS + 1, chunk_size=CS, chunks=[None])
    with pytest.raises(ValidationError):
        ChunkMap.model_validate({"size": 1, "chunk_size": CS, "chunks": [{"id": "nothex", "pack": "p", "offset": 0, "length": 1}]})


def test_chunk_size_must_be_page_multiple(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="multiple of 4096"):
        ChunkStore(LocalBackend(tmp_path), chunk_size=1000)


def test_truncated_or_unknown_stored_chunk_is_corrupt(store: ChunkStore, tmp_path: Path) -> None:
    from vmstream.store import CorruptChunk

    make_file(tmp_path / "f", CS, [(0, os.urandom(CS))])
    ref = store.store_file(tmp_path / "f").chunks[0]
    assert ref
    key = f"packs/{ref.pack}"
    good = store.backend.get(key)
    store.backend.put(key, good[:-10])
    with pytest.raises(CorruptChunk, match="truncated"):
        store.read_chunk(ref)
    store.backend.put(key, b"\x07" + good[1:])
    with pytest.raises(CorruptChunk, match="unknown format marker"):
        store.read_chunk(ref)
    store.backend.put(key, ZSTD + good[1:])
    with pytest.raises(CorruptChunk, match="does not decompress"):
        store.read_chunk(ref)


def test_a_local_store_leaves_no_empty_directories(tmp_path: Path) -> None:
    """An image's meta/images/NAME/ goes with its last file (the store shared by a deployment's agents)."""
    b = LocalBackend(tmp_path / "store")
    b.put("meta/images/web/manifest.json", b"{}")
    b.put("meta/images/web/devstate", b"x")
    b.put("meta/images/other/manifest.json", b"{}")
    b.delete("meta/images/web/manifest.json")
    assert (tmp_path / "store/meta/images/web").is_dir()  # still holds devstate
    b.delete("meta/images/web/devstate")
    assert not (tmp_path / "store/meta/images/web").exists()
    assert (tmp_path / "store/meta/images/other/manifest.json").is_file() and (tmp_path / "store").is_dir()
    b.put("meta/images/web/manifest.json", b"{}")  # the directory comes back with a new object
    assert b.get("meta/images/web/manifest.json") == b"{}"
