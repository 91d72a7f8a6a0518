"""The host chunk cache on real files: bounded, close to LRU, a few files however many
chunks, survives a restart, and never serves bytes a crash tore."""

from __future__ import annotations

import os
from pathlib import Path

import blake3

from vmstream.memfs.cache import ChunkCache

KIB = 1 << 10


def chunk(n: int, size: int = 64 * KIB) -> tuple[str, bytes]:
    data = n.to_bytes(4, "little") * (size // 4)
    return blake3.blake3(data).hexdigest(), data


def test_round_trip_in_a_few_files(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 64 << 20, segment_bytes=1 << 20)
    chunks = [chunk(n) for n in range(100)]
    for cid, data in chunks:
        cache.put(cid, data)
    assert all(cache.get(cid) == data for cid, data in chunks)
    assert chunks[5][0] in cache and chunk(999)[0] not in cache and cache.get(chunk(999)[0]) is None
    assert cache.bytes == 100 * 64 * KIB
    assert len(list(tmp_path.iterdir())) <= 2 * 8, "segments of 1 MiB, not a file per chunk"
    cache.put(*chunks[0])  # a chunk it holds is not written twice
    assert cache.bytes == 100 * 64 * KIB


def test_bounded_and_what_is_used_stays(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 4 << 20, segment_bytes=1 << 20)
    hot = chunk(0)
    cache.put(*hot)
    for n in range(1, 200):
        cache.put(*chunk(n))
        assert cache.bytes <= 4 << 20
        assert cache.get(hot[0]) == hot[1], f"the chunk read all along was evicted after {n} puts"
    assert chunk(1)[0] not in cache, "what nobody read went"
    assert chunk(199)[0] in cache


def test_survives_a_restart_and_checks_what_it_finds(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 64 << 20, segment_bytes=1 << 20)
    chunks = [chunk(n) for n in range(40)]
    for cid, data in chunks:
        cache.put(cid, data)
    cache.close()
    # a crash tore chunk 3's bytes and left half an index record
    seg = tmp_path / "seg-00000001.dat"
    with open(seg, "r+b") as f:
        f.seek(3 * 64 * KIB + 100)
        f.write(b"torn")
    with open(tmp_path / "seg-00000003.idx", "ab") as f:
        f.write(b"\x01" * 10)
    (tmp_path / "seg-00000009.idx").write_bytes(b"\x02" * 44)  # its data file is gone
    again = ChunkCache(tmp_path, 64 << 20, segment_bytes=1 << 20)
    assert not (tmp_path / "seg-00000009.idx").exists()
    assert again.get(chunks[3][0]) is None, "torn bytes are never served"
    assert chunks[3][0] not in again
    assert all(again.get(cid) == data for i, (cid, data) in enumerate(chunks) if i != 3)
    again.put(*chunks[3])
    assert again.get(chunks[3][0]) == chunks[3][1]


def test_clear_and_the_old_layout(tmp_path: Path) -> None:
    old = tmp_path / "ab" / ("ab" + "0" * 62)  # a file per chunk, as an older version kept them
    old.parent.mkdir()
    old.write_bytes(os.urandom(100))
    cache = ChunkCache(tmp_path, 64 << 20)
    assert not old.parent.exists()
    cache.put(*chunk(1))
    cache.clear()
    assert cache.bytes == 0 and chunk(1)[0] not in cache and not list(tmp_path.iterdir())
    cache.put(*chunk(2))
    assert cache.get(chunk(2)[0]) == chunk(2)[1]


def test_a_batch_is_kept_once_and_bounded(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, 1 << 20, segment_bytes=256 * KIB)
    batch = [chunk(n) for n in range(32)] + [chunk(3)]  # 2 MiB into 1 MiB, one chunk twice
    cache.put_many(batch)
    assert cache.bytes <= 1 << 20, "the oldest segments go within the batch's write"
    assert all(cache.get(cid) == data for cid, data in batch[-9:-1]), "the newest stay"
    assert cache.get(batch[0][0]) is None
