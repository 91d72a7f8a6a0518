"""The host chunk cache on a disk that fills up (a real tmpfs): never a wrong byte."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from vmstream.memfs.cache import ChunkCache


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "cache"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "vmstream-test-cache", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "--lazy", str(root)], check=False)


def _chunk(i: int, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    return blake3.blake3(data).hexdigest(), data


def test_a_cache_on_a_full_disk_serves_whole_chunks_or_none(small_disk: Path) -> None:
    """The bound (64 MiB) is far above the disk (3 MiB): writes start to fail part-way. Every chunk
    the cache answers for is whole; the disk becomes the bound (the oldest segment goes) so new
    chunks are still kept; and after a restart the same holds."""
    chunks = dict(_chunk(i, 100_000 + i * 777) for i in range(80))  # ~10 MiB: well over the disk
    cache = ChunkCache(small_disk, 64 << 20, segment_bytes=1 << 20)
    try:
        for cid, data in chunks.items():
            cache.put(cid, data)  # a full disk makes room in the cache itself: no error
        kept = [cid for cid in chunks if cache.get(cid) is not None]
        assert list(chunks)[-1] in kept, "the newest chunk was kept: the oldest segment made room"
        assert len(kept) < len(chunks) and cache.capacity < 64 << 20, "the disk became the bound"
        for cid in chunks:
            got = cache.get(cid)
            assert got is None or got == chunks[cid], "never a wrong byte"
    finally:
        cache.close()
    again = ChunkCache(small_disk, 64 << 20, segment_bytes=1 << 20)
    try:
        for cid in chunks:
            got = again.get(cid)
            assert got is None or got == chunks[cid], "never a wrong byte after a restart"
        assert any(again.get(cid) is not None for cid in chunks)
    finally:
        again.close()


def test_a_chunk_the_disk_took_in_part_is_not_kept(small_disk: Path) -> None:
    """One segment only (nothing to make room with): the write fails, names the cause, and
    neither the chunk nor a stray byte of it stays; later chunks that fit are kept whole."""
    cache = ChunkCache(small_disk, 64 << 20, segment_bytes=8 << 20)  # one segment bigger than the disk
    try:
        big_id, big = _chunk(0, 4 << 20)
        with pytest.raises(OSError, match="only part"):
            cache.put(big_id, big)
        assert cache.get(big_id) is None and cache.bytes == 0
        small_id, small = _chunk(1, 200_000)
        cache.put(small_id, small)
        assert cache.get(small_id) == small
    finally:
        cache.close()
