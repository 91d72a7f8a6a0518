"""The FUSE operations: a flat directory, one read-only file per image memory.

A file is named after its image and backed by the store ref
images/<name>/memory. QEMU 7.2 opens its mem-path read-write even for a
private mapping, so write opens are accepted; writes themselves are refused
(MAP_PRIVATE never writes back). A chunk that cannot be fetched or verified
makes the read fail with EIO: never wrong or zero bytes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from vmstream.memfs import memory_ref
from vmstream.memfs.cache import ChunkCache
from vmstream.store import ChunkMap, ChunkRef, ChunkStore, ObjectNotFound, StoreError
from vmstream.store.store import chunk_id

log = logging.getLogger("vmstream.memfs")
READ_AHEAD_AFTER = 4  # consecutive missed chunks that make a read sequential


@dataclass
class ImageFile:
    name: str
    inode: int
    chunk_map: ChunkMap
    fetched_bytes: int = 0  # from the store (uncompressed)
    fetched_chunks: int = 0
    cache_hits: int = 0  # chunk reads served by the host cache
    cache_misses: int = 0
    read_bytes: int = 0  # served to the kernel
    held: bool = False  # served since the host's caches were last dropped: its chunks are on this host
    errors: int = 0
    last_error: str | None = None
    recording: dict[int, float] | None = None  # chunk index -> first touch, while recording
    last_miss: int = -2  # chunk index of the last cache miss, to see sequential reads
    run: int = 0  # consecutive chunks missed in order
    record_start: float = 0.0
    prefetch: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        hits, misses = self.cache_hits, self.cache_misses
        return {
            "size": self.chunk_map.size,
            "chunk_size": self.chunk_map.chunk_size,
            "nonzero_bytes": self.chunk_map.nonzero_bytes,
            "fetched_bytes": self.fetched_bytes,
            "fetched_chunks": self.fetched_chunks,
            "cache_hits": hits,
            "cache_misses": misses,
            "cache_hit_ratio": hits / (hits + misses) if hits + misses else None,
            "read_bytes": self.read_bytes,
            "held": self.held,
            "errors": self.errors,
            "last_error": self.last_error,
            "recording": self.recording is not None,
            "prefetch": self.prefetch,
        }


class MemFs(pyfuse3.Operations):
    def __init__(self, store: ChunkStore, cache: ChunkCache, read_ahead_chunks: int = 8) -> None:
        super().__init__()
        self.store = store
        self.read_ahead_chunks = read_ahead_chunks  # chunks fetched ahead of a sequential reader
        self.cache = cache
        self.files: dict[str, ImageFile] = {}
        self.by_inode: dict[int, ImageFile] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._inflight: dict[str, trio.Event] = {}
        self._fetch_limit = trio.CapacityLimiter(16)
        self.nursery: trio.Nursery | None = None  # for background fetches; set by the daemon
        self._zero = bytes(4 << 20)  # zero chunks are served from here (chunks are at most 4 MiB)

    # ---- images --------------------------------------------------------------------

    async def image(self, name: str) -> ImageFile:
        """The image's file, loading its chunk map from the store on first use."""
        found = self.files.get(name)
        if found is not None:
            return found
        try:
            chunk_map = await trio.to_thread.run_sync(self.store.get_ref, memory_ref(name))
        except ObjectNotFound:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except StoreError as exc:
            log.error("cannot load the chunk map of %s: %s", name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        found = self.files.get(name)  # another task may have loaded it meanwhile
        if found is None:
            found = ImageFile(name, self._next_inode, chunk_map)
            self._next_inode += 1
            self.files[name] = found
            self.by_inode[found.inode] = found
        return found

    def forget_image(self, name: str) -> None:
        f = self.files.pop(name, None)
        if f is not None:
            self.by_inode.pop(f.inode, None)

    def _attr(self, inode: int, size: int, mode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = mode
        a.st_nlink = 1
        a.st_size = size
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_blksize = 4096
        a.st_blocks = (size + 511) // 512
        a.attr_timeout = 3600  # images are immutable
        a.entry_timeout = 3600
        return a

    # ---- FUSE operations -------------------------------------------------------------

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == pyfuse3.ROOT_INODE:
            return self._attr(inode, 0, stat.S_IFDIR | 0o755)
        f = self.by_inode.get(inode)
        if f is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, f.chunk_map.size, stat.S_IFREG | 0o644)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        f = await self.image(os.fsdecode(name))
        return self._attr(f.inode, f.chunk_map.size, stat.S_IFREG | 0o644)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        refs = await trio.to_thread.run_sync(self.store.list_refs)
        names = sorted(r.split("/")[1] for r in refs if r.startswith("images/") and r.endswith("/memory"))
        for i, name in enumerate(names[start_id:], start_id + 1):
            f = await self.image(name)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), await self.getattr(f.inode), i):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode not in self.by_inode:
            raise pyfuse3.FUSEError(errno.ENOENT)
        fi = pyfuse3.FileInfo(fh=inode)
        fi.keep_cache = True  # the page cache copy is shared by every clone of the image
        return fi

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self.by_inode[fh]
        cm = f.chunk_map
        end = min(off + size, cm.size)
        if off >= end:
            return b""
        cs = cm.chunk_size
        parts = []
        for index in range(off // cs, (end - 1) // cs + 1):
            lo = max(off, index * cs) - index * cs
            hi = min(end, (index + 1) * cs) - index * cs
            ref = cm.chunks[index]
            if ref is None:
                parts.append(self._zero[lo:hi])
                continue
            if f.recording is not None and index not in f.recording:
                f.recording[index] = time.monotonic() - f.record_start
            data = await self.chunk(f, ref, on_miss=functools.partial(self._read_ahead, f, index))
            parts.append(data[lo:hi])
        out = b"".join(parts)
        f.read_bytes += len(out)
        f.held = True
        return out

    # ---- chunks ------------------------------------------------------------------------

    def _read_ahead(self, f: ImageFile, index: int) -> None:
        """On misses at consecutive chunks (a sequential read), fetch the next few ahead."""
        f.run = f.run + 1 if f.last_miss == index - 1 else 1
        f.last_miss = index
        if f.run >= READ_AHEAD_AFTER and self.read_ahead_chunks and self.nursery is not None:
            ahead = list(range(index + 1, min(index + 1 + self.read_ahead_chunks, len(f.chunk_map.chunks))))
            self.nursery.start_soon(self.fetch_quietly, f, ahead)

    async def fetch_quietly(self, f: ImageFile, indexes: list[int]) -> None:
        for i in indexes:
            ref = f.chunk_map.chunks[i]
            if ref is not None and ref.id not in self.cache and ref.id not in self._inflight:
                self.nursery.start_soon(self._fetch_ignoring_errors, f, ref)  # type: ignore[union-attr]

    async def _fetch_ignoring_errors(self, f: ImageFile, ref: ChunkRef) -> None:
        with contextlib.suppress(pyfuse3.FUSEError):
            await self.chunk(f, ref, counted=False)

    async def chunk(
        self, f: ImageFile, ref: ChunkRef, counted: bool = True, on_miss: Callable[[], None] | None = None
    ) -> bytes:
        """A verified chunk: from the host cache, else fetched once however many ask."""
        while True:
            data = self.cache.get(ref.id)
            if data is not None:
                if counted:
                    f.cache_hits += 1
                return data
            waiting = self._inflight.get(ref.id)
            if waiting is None:
                break
            await waiting.wait()
            if ref.id not in self.cache:  # the fetch failed: surface the error here too
                raise pyfuse3.FUSEError(errno.EIO)
        if counted:
            f.cache_misses += 1
        if on_miss is not None:
            on_miss()
        done = self._inflight[ref.id] = trio.Event()
        try:
            async with self._fetch_limit:
                data = await trio.to_thread.run_sync(self.store.read_chunk, ref)
            await trio.to_thread.run_sync(self.cache.put, ref.id, data)
            f.fetched_bytes += len(data)
            f.fetched_chunks += 1
            return data
        except StoreError as exc:
            f.errors += 1
            f.last_error = str(exc)
            log.error("image %s: chunk %s: %s", f.name, ref.id[:16], exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        finally:
            del self._inflight[ref.id]
            done.set()

    def warm(self, f: ImageFile, path: Path) -> int:
        """Fill the host cache from a local copy of the image's memory (the file it
        was just captured to), so the first clone on this host starts warm.
        Each chunk is checked against its blake3 name before it is cached."""
        cm = f.chunk_map
        count = 0
        with open(path, "rb") as src:
            for index, ref in enumerate(cm.chunks):
                if ref is None or ref.id in self.cache:
                    continue
                data = os.pread(src.fileno(), cm.chunk_length(index), index * cm.chunk_size)
                if chunk_id(data) == ref.id:
                    self.cache.put(ref.id, data)
                    count += 1
        return count

    async def prefetch(self, f: ImageFile, indexes: list[int]) -> None:
        """Fetch the given chunks into the host cache, in parallel (the REAP idea)."""
        t0 = time.monotonic()
        refs = {}
        for i in indexes:
            if 0 <= i < len(f.chunk_map.chunks) and (r := f.chunk_map.chunks[i]) is not None and r.id not in self.cache:
                refs[r.id] = r
        f.prefetch = {"state": "running", "chunks": len(refs)}

        async def one(r: ChunkRef) -> None:
            try:
                await self.chunk(f, r, counted=False)
            except pyfuse3.FUSEError:
                pass  # recorded in f.last_error; the clone's own read will fail clearly

        async with trio.open_nursery() as nursery:
            for r in refs.values():
                nursery.start_soon(one, r)
        f.prefetch = {"state": "done", "chunks": len(refs), "seconds": round(time.monotonic() - t0, 3)}
