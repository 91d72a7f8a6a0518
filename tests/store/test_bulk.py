"""Bulk reads: adjacent chunks in one ranged read, a working-set pack in one stream,
every chunk still verified on its own."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.store.conftest import FAST_RETRY, PEER_TOKEN, peer_app, serve
from vmstream.store import ChunkRef, ChunkStore, CorruptChunk, LocalBackend, PeerBackend, StoreError
from vmstream.store.backend import Backend

CS = 64 << 10


class CountingBackend(LocalBackend):
    """A local backend that counts its ranged reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[tuple[str, int, int | None]] = []
        self.lock = threading.Lock()

    def get(self, key: str, offset: int = 0, size: int | None = None) -> bytes:
        with self.lock:
            self.gets.append((key, offset, size))
        return super().get(key, offset, size)


def _image(tmp_path: Path, backend: Backend, chunks: int = 40) -> tuple[ChunkStore, list[ChunkRef], bytes]:
    store = ChunkStore(backend, chunk_size=CS, pack_size=1 << 30, retry=FAST_RETRY)
    content = os.urandom(chunks * CS)
    (tmp_path / "mem").write_bytes(content)
    refs = [r for r in store.store_file(tmp_path / "mem").chunks if r is not None]
    return store, refs, content


def _damage(backend: LocalBackend, ref: ChunkRef) -> None:
    key = f"packs/{ref.pack}"
    blob = bytearray(backend.get(key))
    blob[ref.offset + ref.length // 2] ^= 0xFF
    backend.put(key, bytes(blob))


def test_adjacent_chunks_come_in_one_ranged_read(tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path / "store")
    store, refs, content = _image(tmp_path, backend)
    backend.gets.clear()
    got = store.read_chunks(refs[4:12])
    assert b"".join(got) == content[4 * CS : 12 * CS]  # type: ignore[arg-type]
    assert len([g for g in backend.gets if g[0].startswith("packs/")]) == 1, backend.gets
    backend.gets.clear()
    scattered = [refs[30], refs[2], refs[3], refs[17]]  # any order: each answer in its place
    got = store.read_chunks(scattered)
    assert got == [content[i * CS : (i + 1) * CS] for i in (30, 2, 3, 17)]
    assert len(backend.gets) == 3, "2 and 3 lie together; 17 and 30 apart"


def test_a_corrupt_chunk_in_a_bulk_range_fails_only_itself(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "store")
    store, refs, content = _image(tmp_path, backend)
    _damage(backend, refs[6])
    got = store.read_chunks(refs[4:10])
    assert isinstance(got[2], CorruptChunk) and refs[6].id in str(got[2]), "the error names the chunk"
    assert [g for i, g in enumerate(got) if i != 2] == [content[i * CS : (i + 1) * CS] for i in (4, 5, 7, 8, 9)]


def test_working_set_pack_streams_from_a_peer_and_is_verified(tmp_path: Path) -> None:
    a = LocalBackend(tmp_path / "host-a")
    store, refs, content = _image(tmp_path, a)
    order = [9, 2, 30, 31, 5]  # first-touch order
    blob, where = store.stored_forms([refs[i] for i in order])
    a.put("meta/images/img/workingset.pack", blob)
    in_pack = [ChunkRef(id=refs[i].id, pack="ws", offset=off, length=n) for i, (off, n) in zip(order, where, strict=True)]
    with serve(peer_app(ChunkStore(a), writable=False)) as url:
        b = ChunkStore(PeerBackend(url + "/v1/store", PEER_TOKEN), chunk_size=CS, retry=FAST_RETRY)
        got = list(b.stream_chunks("meta/images/img/workingset.pack", in_pack, piece=4096))
        assert [pos for pos, _ in got] == list(range(len(order))), "yielded in pack order"
        assert [data for _, data in got] == [content[i * CS : (i + 1) * CS] for i in order]
        # a damaged chunk in the pack is an error for it alone
        damaged = bytearray(blob)
        damaged[where[1][0] + where[1][1] // 2] ^= 0xFF
        a.put("meta/images/img/workingset.pack", bytes(damaged))
        got = list(b.stream_chunks("meta/images/img/workingset.pack", in_pack))
        assert isinstance(got[1][1], CorruptChunk) and refs[2].id in str(got[1][1])
        assert all(isinstance(d, bytes) for i, (_, d) in enumerate(got) if i != 1)
        # a pack cut short: what came is yielded, then a clear error
        a.put("meta/images/img/workingset.pack", blob[: where[3][0]])
        seen = []
        with pytest.raises(StoreError, match="ended before chunk"):
            for pos, _ in b.stream_chunks("meta/images/img/workingset.pack", in_pack):
                seen.append(pos)
        assert seen == [0, 1, 2]
        b.close()
