"""ChunkStore: files in, chunk maps out; chunks back, verified.

Layout in the backend (docs/store.md has the details):

    packs/<pack-id>          many stored chunks back to back
    index/<pack-id>          JSON: which chunk lies where in that pack
    refs/<name>              JSON ChunkMap: the commit object, written last
    gc/condemned/<pack-id>   a pack GC found unreferenced (deleted one grace period later)

Write order is packs, then their indexes, then the ref, so a crash leaves at most
unreferenced packs, which GC removes; it never leaves a ref to missing data.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import zstandard

from vmstream.store.backend import Backend, check_key
from vmstream.store.chunkmap import ChunkMap, ChunkRef
from vmstream.store.errors import CorruptChunk, ObjectNotFound, StoreConflict, StoreError
from vmstream.store.retry import RetryingBackend, RetryPolicy

DEFAULT_CHUNK_SIZE = 256 << 10
"""256 KiB. Guest memory is page-aligned and does not shift, so fixed chunks find
the same content at the same offsets without content-defined chunking. 256 KiB
keeps an on-demand fault cheap (a few ms to fetch and decompress), keeps the
chunk map small (4096 entries per GiB), and is large enough for zstd to work
well and for per-request overhead on S3 or a peer to stay small."""

MAX_SPAN = 4 << 20
"""The largest ranged read of adjacent chunks (read_chunks): bulk transfers of a few
MiB amortise a request's round trip without holding a fault behind a long one."""

DEFAULT_PACK_SIZE = 16 << 20
"""Packs close at about 16 MiB stored: few objects per image (cheap listing and
GC on S3), small enough that a crash loses little work."""

RAW, ZSTD = b"\x00", b"\x01"  # the first byte of every stored chunk
_MIN_SAVING = 1 / 16  # compress only when it saves at least this share

PACKS, INDEX, REFS, CONDEMNED = "packs/", "index/", "refs/", "gc/condemned/"


def chunk_id(data: bytes) -> str:
    return blake3.blake3(data, max_threads=1).hexdigest()


_local = threading.local()


def encode_chunk(data: bytes, level: int = 3) -> bytes:
    """The stored form: a marker byte, then zstd if that pays, else the raw bytes."""
    cctx = getattr(_local, "cctx", None)
    if cctx is None or _local.level != level:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=level)
        _local.level = level
    packed = cctx.compress(data)
    if len(packed) <= len(data) * (1 - _MIN_SAVING):
        return ZSTD + packed
    return RAW + data


def decode_chunk(blob: bytes, ref: ChunkRef, where: str) -> bytes:
    """Undo encode_chunk and check the blake3 name; never return unverified bytes."""

    def corrupt(why: str) -> CorruptChunk:
        return CorruptChunk(
            f"chunk {ref.id} in {where} (packs/{ref.pack} at offset {ref.offset}, {ref.length} bytes) {why}: "
            "the stored copy is damaged; restore the pack from another copy or create the live image again"
        )

    if len(blob) != ref.length:
        raise corrupt(f"is truncated ({len(blob)} bytes read)")
    marker, payload = blob[:1], blob[1:]
    if marker == RAW:
        data = payload
    elif marker == ZSTD:
        try:
            dctx = getattr(_local, "dctx", None)
            if dctx is None:
                dctx = _local.dctx = zstandard.ZstdDecompressor()
            data = dctx.decompress(payload)
        except zstandard.ZstdError as exc:
            raise corrupt(f"does not decompress ({exc})") from exc
    else:
        raise corrupt(f"has an unknown format marker {marker.hex()}")
    if chunk_id(data) != ref.id:
        raise corrupt("does not match its blake3 name")
    return data


class _PacksGone(StoreConflict):
    """A map to commit uses a pack GC condemned or removed."""


@dataclass
class _Pack:
    """A pack being filled; chunk refs exist only once it is written."""

    id: str = field(default_factory=lambda: secrets.token_hex(16))
    parts: list[bytes] = field(default_factory=list)
    entries: list[tuple[str, int, int]] = field(default_factory=list)  # chunk id, offset, length
    size: int = 0

    def add(self, cid: str, blob: bytes) -> None:
        self.entries.append((cid, self.size, len(blob)))
        self.parts.append(blob)
        self.size += len(blob)


def _chunks_with_data(fd: int, size: int, chunk_size: int) -> list[int]:
    """Indices of the chunks that touch a data region: chunks wholly in holes are zero unread."""
    found: list[int] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # nothing but a hole after pos
            return list(range(-(-size // chunk_size)))  # no SEEK_DATA on this filesystem: read all
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first = max(start // chunk_size, found[-1] + 1 if found else 0)
        found.extend(range(first, (end - 1) // chunk_size + 1))
        pos = end
    return found


class ChunkStore:
    """Content-addressed chunks over one backend. Reads are thread-safe; writes are serialised."""

    def __init__(
        self,
        backend: Backend,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pack_size: int = DEFAULT_PACK_SIZE,
        retry: RetryPolicy | None = None,
        compression_level: int = 3,
        workers: int = 4,
    ) -> None:
        if chunk_size <= 0 or chunk_size % 4096:
            raise StoreError(f"chunk size {chunk_size} must be a positive multiple of 4096 (the page size)")
        self.backend: Backend = RetryingBackend(backend, retry or RetryPolicy())
        self.chunk_size = chunk_size
        self.pack_size = pack_size
        self.compression_level = compression_level
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunkstore")
        self._zero = bytes(chunk_size)
        self._write_lock = threading.Lock()
        self._indexes: dict[str, list[tuple[str, int, int]]] = {}  # pack id -> its index (immutable, so cached)
        self._known: dict[str, ChunkRef] = {}  # chunk id -> where it is stored, for dedup

    def close(self) -> None:
        self._pool.shutdown()
        self.backend.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------

    def store_file(self, path: str | os.PathLike[str], *, ref: str | None = None) -> ChunkMap:
        """Chunk a file into the store: zero chunks skipped, known chunks reused.

        With ref, also commit the map as refs/<ref>. If a garbage collection
        condemned a reused pack meanwhile, the file is stored once more without it.
        """
        if ref is not None and self.backend.exists(REFS + check_key(ref)):
            raise StoreConflict(f"{self.backend}: ref '{ref}' exists already: delete it first or choose another name")
        with self._write_lock:
            for attempt in (1, 2):
                self._refresh_index()
                chunk_map = self._write_chunks(Path(path))
                if ref is None:
                    return chunk_map
                try:
                    self.commit(ref, chunk_map)
                    return chunk_map
                except _PacksGone:
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _refresh_index(self) -> None:
        """Learn the chunks other writers stored; forget packs GC condemned or removed."""
        listed = {o.key[len(INDEX) :] for o in self.backend.list(INDEX)}
        condemned = {o.key[len(CONDEMNED) :] for o in self.backend.list(CONDEMNED)}
        for pack in listed - self._indexes.keys():
            try:
                self._indexes[pack] = [tuple(e) for e in json.loads(self.backend.get(INDEX + pack))["chunks"]]  # type: ignore[misc]
            except ObjectNotFound:
                continue  # removed by GC since the listing
            except (ValueError, KeyError, TypeError):
                continue  # unreadable index: its chunks are stored anew rather than trusted
        for pack in self._indexes.keys() - listed:
            del self._indexes[pack]
        self._known = {
            cid: ChunkRef(id=cid, pack=pack, offset=off, length=length)
            for pack, entries in self._indexes.items()
            if pack not in condemned
            for cid, off, length in entries
        }

    def _prepare(self, fd: int, index: int, length: int) -> tuple[str, bytes | None] | None:
        """Read, hash and (if new) encode one chunk; None for all zeros. Runs in the pool."""
        data = os.pread(fd, length, index * self.chunk_size)
        if len(data) != length:
            raise StoreError(f"file shrank while being stored (chunk {index})")
        if data == (self._zero if length == self.chunk_size else bytes(length)):  # a memcmp that stops at the first non-zero
            return None
        cid = chunk_id(data)
        if cid in self._known:
            return cid, None
        return cid, encode_chunk(data, self.compression_level)

    def _write_chunks(self, path: Path) -> ChunkMap:
        refs: list[ChunkRef | None]
        with open(path, "rb") as f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            count = -(-size // self.chunk_size)
            refs = [None] * count
            todo = _chunks_with_data(fd, size, self.chunk_size)
            pack = _Pack()
            waiting: dict[str, list[int]] = {}  # chunk id -> file chunks to point at it once its pack is written
            batch = 4 * self._workers
            for b in range(0, len(todo), batch):
                indices = todo[b : b + batch]
                lengths = [min(self.chunk_size, size - i * self.chunk_size) for i in indices]
                for i, result in zip(indices, self._pool.map(self._prepare, [fd] * len(indices), indices, lengths), strict=True):
                    if result is None:
                        continue
                    cid, blob = result
                    if cid in self._known:
                        refs[i] = self._known[cid]
                    elif cid in waiting:
                        waiting[cid].append(i)
                    else:
                        assert blob is not None  # encoded unless already known, and _known only grows here
                        waiting[cid] = [i]
                        pack.add(cid, blob)
                        if pack.size >= self.pack_size:
                            self._write_pack(pack, waiting, refs)
                            pack = _Pack()
            if pack.entries:
                self._write_pack(pack, waiting, refs)
        return ChunkMap(size=size, chunk_size=self.chunk_size, chunks=refs)

    def _write_pack(self, pack: _Pack, waiting: dict[str, list[int]], refs: list[ChunkRef | None]) -> None:
        """Pack first, then its index: an index never names a pack that is not there."""
        self.backend.put(PACKS + pack.id, b"".join(pack.parts))
        self.backend.put(INDEX + pack.id, json.dumps({"format": 1, "pack": pack.id, "chunks": pack.entries}).encode())
        self._indexes[pack.id] = pack.entries
        for cid, off, length in pack.entries:
            ref = self._known[cid] = ChunkRef(id=cid, pack=pack.id, offset=off, length=length)
            for i in waiting.pop(cid):
                refs[i] = ref

    def commit(self, name: str, chunk_map: ChunkMap, *, replace: bool = False) -> None:
        """Write refs/<name>, the commit point, after checking every pack it needs is there to stay.

        Raises StoreConflict if the ref exists (unless replace), or if GC condemned or
        removed a pack the map uses (then store the file again).
        """
        key = REFS + check_key(name)
        if not replace and self.backend.exists(key):
            raise StoreConflict(f"{self.backend}: ref '{name}' exists already: delete it first or choose another name")
        needed = chunk_map.packs
        condemned = needed & {o.key[len(CONDEMNED) :] for o in self.backend.list(CONDEMNED)}
        missing = needed - {o.key[len(PACKS) :] for o in self.backend.list(PACKS)}
        if condemned or missing:
            bad = sorted(condemned | missing)
            raise _PacksGone(
                f"{self.backend}: cannot commit '{name}': garbage collection condemned or removed "
                f"{len(bad)} pack(s) it uses ({', '.join(bad[:3])}); store the file again"
            )
        self.backend.put(key, chunk_map.model_dump_json().encode())

    # ---- refs ----------------------------------------------------------------------------

    def get_ref(self, name: str) -> ChunkMap:
        raw = self.backend.get(REFS + check_key(name))
        try:
            return ChunkMap.model_validate_json(raw)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise StoreError(f"{self.backend}: ref '{name}' is not a valid chunk map ({exc.__class__.__name__}): {str(exc)[:200]}") from exc

    def list_refs(self) -> list[str]:
        return [o.key[len(REFS) :] for o in self.backend.list(REFS)]

    def delete_ref(self, name: str) -> None:
        """Drop a ref; its chunks go at the next garbage collections unless others use them."""
        self.backend.delete(REFS + check_key(name))

    # ---- reading -------------------------------------------------------------------------

    def read_chunk(self, ref: ChunkRef) -> bytes:
        """One chunk's content, verified against its blake3 name (CorruptChunk if not)."""
        blob = self.backend.get(PACKS + ref.pack, ref.offset, ref.length)
        return decode_chunk(blob, ref, str(self.backend))

    def read_chunks(self, refs: list[ChunkRef], max_span: int = MAX_SPAN) -> list[bytes | StoreError]:
        """The verified contents of refs, in their order, with one ranged read per run of
        chunks that lie back to back in a pack (up to max_span bytes), runs in parallel.
        A chunk that cannot be had is its error in the list (a CorruptChunk names it):
        one bad chunk fails only itself, never its neighbours in the range."""
        out = self._read_stored(refs, max_span)
        for i, (r, blob) in enumerate(zip(refs, out, strict=True)):
            if not isinstance(blob, StoreError):
                try:
                    out[i] = decode_chunk(blob, r, str(self.backend))
                except StoreError as exc:
                    out[i] = exc
        return out

    def stored_forms(self, refs: list[ChunkRef]) -> tuple[bytes, list[tuple[int, int]]]:
        """The stored form of each ref back to back (a working-set pack, to be read in one
        request), and (offset, length) of each in it. Raises the first read's error."""
        blobs = self._read_stored(refs, MAX_SPAN)
        where, offset = [], 0
        for blob in blobs:
            if isinstance(blob, StoreError):
                raise blob
            where.append((offset, len(blob)))
            offset += len(blob)
        return b"".join(blobs), where  # type: ignore[arg-type]  # no errors left

    def stream_chunks(self, key: str, refs: list[ChunkRef], piece: int = 1 << 20) -> Iterator[tuple[int, bytes | StoreError]]:
        """Chunks stored back to back in the object key (refs give their offsets there, in
        order), verified, each yielded (its position in refs) as soon as its bytes are in:
        one streamed request however many chunks. A backend failure mid-way raises
        (BackendUnavailable); the caller fetches what is left another way."""
        buf, base, i = bytearray(), 0, 0
        for data in self.backend.stream(key, piece):
            buf += data
            while i < len(refs) and refs[i].offset + refs[i].length <= base + len(buf):
                r = refs[i]
                blob = bytes(buf[r.offset - base : r.offset - base + r.length])
                try:
                    yield i, decode_chunk(blob, r, f"{self.backend} object {key}")
                except StoreError as exc:
                    yield i, exc
                i += 1
            cut = (refs[i].offset if i < len(refs) else base + len(buf)) - base
            if cut > 0:
                del buf[:cut]
                base += cut
            if i == len(refs):
                return
        if i < len(refs):
            raise StoreError(f"{self.backend}: object {key} ended before chunk {refs[i].id} (at offset {refs[i].offset})")

    def _read_stored(self, refs: list[ChunkRef], max_span: int) -> list[bytes | StoreError]:
        """The stored (encoded) form of each ref, one ranged read per run of adjacent ones."""
        out: list[bytes | StoreError] = [b""] * len(refs)  # every index is set by its run's fetch
        runs: list[list[int]] = []
        for i in sorted(range(len(refs)), key=lambda i: (refs[i].pack, refs[i].offset)):
            r = refs[i]
            if runs:
                first, last = refs[runs[-1][0]], refs[runs[-1][-1]]
                same = last.pack == r.pack and last.offset == r.offset and last.length == r.length  # a chunk twice
                adjacent = last.pack == r.pack and last.offset + last.length == r.offset
                if same or (adjacent and r.offset + r.length - first.offset <= max_span):
                    runs[-1].append(i)
                    continue
            runs.append([i])

        def fetch(run: list[int]) -> None:
            first = refs[run[0]]
            span = max(refs[i].offset + refs[i].length for i in run) - first.offset
            try:
                blob = memoryview(self.backend.get(PACKS + first.pack, first.offset, span))
            except StoreError as exc:
                for i in run:
                    out[i] = exc
                return
            for i in run:
                at = refs[i].offset - first.offset
                out[i] = bytes(blob[at : at + refs[i].length])

        if len(runs) == 1:
            fetch(runs[0])  # no hop through the pool for a single fault
        else:
            list(self._pool.map(fetch, runs))
        return out

    def read_range(self, chunk_map: ChunkMap, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the file, clipped at its end, like a read(2)."""
        if offset < 0 or size < 0:
            raise StoreError(f"invalid range: offset {offset}, size {size}")
        end = min(offset + size, chunk_map.size)
        if offset >= end:
            return b""
        cs = chunk_map.chunk_size
        first, last = offset // cs, (end - 1) // cs
        at: dict[str, list[int]] = {}  # chunk id -> the chunk indices in range that hold it
        for i in range(first, last + 1):
            c = chunk_map.chunks[i]
            if c is not None:
                at.setdefault(c.id, []).append(i)
        refs = [chunk_map.chunks[where[0]] for where in at.values()]
        fetched = dict(zip(at, self._pool.map(self.read_chunk, refs), strict=True))
        zero = memoryview(bytes(cs))
        parts = [
            fetched[c.id] if c is not None else zero[: chunk_map.chunk_length(i)]
            for i, c in enumerate(chunk_map.chunks[first : last + 1], first)
        ]
        parts[0] = parts[0][offset - first * cs :]
        parts[-1] = parts[-1][: end - last * cs - (offset - first * cs if first == last else 0)]
        return b"".join(parts)  # one allocation and one copy

    def iter_chunks(self, chunk_map: ChunkMap) -> Iterator[tuple[int, bytes | None]]:
        """(offset, content or None for zeros) for every chunk, fetched a few at a time in parallel."""
        n, step = len(chunk_map.chunks), 4 * self._pool._max_workers
        for b in range(0, n, step):
            block = chunk_map.chunks[b : b + step]
            stored = [c for c in block if c is not None]
            datas = iter(self._pool.map(self.read_chunk, stored))
            for i, c in enumerate(block, start=b):
                yield i * chunk_map.chunk_size, next(datas) if c is not None else None

    def export_file(self, chunk_map: ChunkMap, dest: str | os.PathLike[str]) -> None:
        """Write the whole file to dest, sparse: zero chunks stay holes."""
        tmp = Path(f"{dest}.part")
        with open(tmp, "wb") as f:
            f.truncate(chunk_map.size)
            for offset, data in self.iter_chunks(chunk_map):
                if data is not None:
                    os.pwrite(f.fileno(), data, offset)
        os.replace(tmp, dest)
