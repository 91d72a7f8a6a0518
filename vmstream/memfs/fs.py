"""The FUSE operations: a flat directory, one read-only file per image memory.

A file is named after its image and backed by the store ref
images/<name>/memory. QEMU 7.2 opens its mem-path read-write even for a
private mapping, so write opens are accepted; writes themselves are refused
(MAP_PRIVATE never writes back). A chunk that cannot be fetched or verified
makes the read fail with EIO: never wrong or zero bytes.

The kernel asks for one 4 KiB page per request (read-ahead is off on the
mount, so a clone's fault pulls only what it touches). Whatever chunk a
request needs is pushed whole into the file's page cache (FUSE notify_store)
once it is here, so the chunk's other pages never cross FUSE again, for this
clone or any other on the host; a sequential reader gets the chunks ahead of
it pushed too, and prefetch pushes an image's working set in the order its
first clone touched it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vmstream.memfs import memory_ref
from vmstream.memfs.cache import ChunkCache
from vmstream.memfs.fuse import ROOT_INODE, Attr, FsStats, FuseError, Session
from vmstream.store import BackendUnavailable, ChunkMap, ChunkRef, ChunkStore, ObjectNotFound, StoreError
from vmstream.store.store import chunk_id

log = logging.getLogger("vmstream.memfs")
READ_AHEAD_AFTER = 4  # requests at consecutive chunks that make a reader sequential
PREFETCH_LANES = 4  # concurrent prefetch fetches: demand fetches have their own limit
PREFETCH_BATCH = 8  # chunks per prefetch fetch (adjacent ones come in one ranged read)
MAX_AHEAD_CHUNKS = 512  # the largest window pushed ahead of a sequential reader
AHEAD_PIECE = 32  # chunks per fetch of a window: pushes start while the rest is on its way
CACHE_BATCH = 64  # chunks the host-cache writer takes per thread hop
PUSH_BATCH = 32  # chunks a pusher takes per thread hop
PUSHERS = 2  # threads pushing into the page cache at once (a 2-core host: both)
PUSH_THREADS = 8  # threads for pushes in all: the pushers and sequential readers' pushes (_push_after)
REST_WAIT_S = 0.02  # the longest a sequential reader's answer waits for what follows it to be pushed
PUSH_AFTER_BYTES = 1 << 20  # pushed after a sequential reader's page before it is answered
_ZERO = bytes(4 << 20)  # zero chunks are served and pushed from here (chunks are at most 4 MiB)
_ZEROS = memoryview(_ZERO)  # slices of it are views, not copies
# fetch latency buckets (s): a 64 KiB chunk from a local store or a loopback peer takes ~1 ms, a ranged MiB ~5
FETCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Latencies:
    """A histogram of fetch times, kept here and turned into the agent's Prometheus one
    (vmstream.host.observe): counts per bucket (the last one: over the largest), not cumulative."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(FETCH_BUCKETS) + 1))
    total_s: float = 0.0

    def observe(self, seconds: float) -> None:
        i = next((i for i, le in enumerate(FETCH_BUCKETS) if seconds <= le), len(FETCH_BUCKETS))
        self.counts[i] += 1
        self.total_s += seconds

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": list(FETCH_BUCKETS), "counts": list(self.counts), "sum": self.total_s}


async def _batch(recv: trio.MemoryReceiveChannel[Any], most: int) -> list[Any]:
    """The next item of a queue, and up to most - 1 more that are waiting already:
    one thread hop for them all."""
    batch = [await recv.receive()]
    while len(batch) < most:
        try:
            batch.append(recv.receive_nowait())
        except trio.WouldBlock:
            break
    return batch


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
    last_index: int = -2  # chunk index of the last request, to see sequential readers
    run: int = 0  # requests at consecutive chunks
    ahead_to: int = -1  # the last chunk pushed ahead of a sequential reader
    window: int = 0  # chunks pushed ahead of it (see MemFs._follow)
    pushed_chunks: int = 0  # chunks pushed into the page cache
    pushing: set[int] = field(default_factory=set)  # chunk indexes queued for the page cache
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
            "pushed_chunks": self.pushed_chunks,
            "held": self.held,
            "errors": self.errors,
            "last_error": self.last_error,
            "recording": self.recording is not None,
            "prefetch": self.prefetch,
        }


class MemFs:
    """The filesystem's operations (vmstream.memfs.fuse.Operations) and its chunk traffic.

    Inode numbers outlive the daemon: the kernel keeps those it was given for as long as
    the mount lives, so each is written to the inodes file before it is first answered,
    and a daemon that takes over the mount reads them back."""

    def __init__(self, store: ChunkStore, cache: ChunkCache, read_ahead_chunks: int = 16,
                 inodes: Path | None = None) -> None:
        self.store = store
        self.read_ahead_chunks = read_ahead_chunks  # chunks fetched ahead of a sequential reader
        self.cache = cache
        self.files: dict[str, ImageFile] = {}
        self.by_inode: dict[int, ImageFile] = {}
        self.session: Session | None = None  # set by the daemon: notifications go through it
        self._inodes_file = inodes
        self._known: dict[str, int] = _read_inodes(inodes) if inodes is not None else {}
        self._next_inode = max(self._known.values(), default=ROOT_INODE) + 1
        self._inflight: dict[str, trio.Event] = {}
        self._fetch_limit = trio.CapacityLimiter(16)  # demand: a clone's faults
        self.fetch_seconds = Latencies()  # each ranged read from the store (one or more adjacent chunks)
        self._prefetch_limit = trio.CapacityLimiter(PREFETCH_LANES)  # prefetch and read-ahead
        # Threads pushing into the page cache wait for the lock of any page a read is filling, and
        # an abandoned push (see _push_after) keeps its thread until then: with threads of their
        # own they can never take every thread from the fetches those reads wait for.
        self._push_threads = trio.CapacityLimiter(PUSH_THREADS)
        self._push_send, self._push_recv = trio.open_memory_channel[tuple[ImageFile, int, bytes | memoryview]](1024)
        self._cache_send, self._cache_recv = trio.open_memory_channel[tuple[int, str, bytes]](1024)
        self._cache_lock = trio.Lock()  # a drop waits for the write under way
        self._generation = 0  # bumped by a drop: writes queued before it are not made
        self._pending: dict[str, bytes] = {}  # fetched chunks on their way into the host cache
        self.nursery: trio.Nursery | None = None  # for background fetches; set by the daemon

    # ---- images --------------------------------------------------------------------

    async def image(self, name: str) -> ImageFile:
        """The image's file, loading its chunk map from the store on first use."""
        found = self.files.get(name)
        if found is not None:
            return found
        try:
            chunk_map = await trio.to_thread.run_sync(self.store.get_ref, memory_ref(name))
        except ObjectNotFound:
            raise FuseError(errno.ENOENT) from None
        except StoreError as exc:
            log.error("cannot load the chunk map of %s: %s", name, exc)
            raise FuseError(errno.EIO) from exc
        found = self.files.get(name)  # another task may have loaded it meanwhile
        if found is None:
            found = ImageFile(name, self._inode_of(name), chunk_map)
            self.files[name] = found
            self.by_inode[found.inode] = found
        return found

    def _inode_of(self, name: str) -> int:
        """The image's inode number: the one a previous daemon gave it, or a new one, written
        down before the kernel hears of it."""
        inode = self._known.get(name)
        if inode is None:
            inode, self._next_inode = self._next_inode, self._next_inode + 1
            self._known[name] = inode
            if self._inodes_file is not None:
                with open(self._inodes_file, "a") as out:
                    out.write(f"{inode} {name}\n")
        return inode

    async def file(self, inode: int) -> ImageFile:
        """The file of an inode the kernel holds, loaded again if a previous daemon gave it out."""
        found = self.by_inode.get(inode)
        if found is not None:
            return found
        name = next((n for n, i in self._known.items() if i == inode), None)
        if name is None:
            raise FuseError(errno.ENOENT)
        return await self.image(name)

    def forget_image(self, name: str) -> None:
        f = self.files.pop(name, None)
        if f is not None:
            self.by_inode.pop(f.inode, None)

    # ---- FUSE operations -------------------------------------------------------------

    async def getattr(self, inode: int) -> Attr:
        if inode == ROOT_INODE:
            return Attr(inode, stat.S_IFDIR | 0o755, 0)
        f = await self.file(inode)
        return Attr(inode, stat.S_IFREG | 0o644, f.chunk_map.size)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        if parent != ROOT_INODE:
            raise FuseError(errno.ENOENT)
        f = await self.image(os.fsdecode(name))
        return Attr(f.inode, stat.S_IFREG | 0o644, f.chunk_map.size)

    async def statfs(self) -> FsStats:
        """What df shows; it also tells a program (the clone QEMUs' shim) that a file is on memfs."""
        return FsStats(blocks=sum(f.chunk_map.size for f in self.files.values()) // 4096, files=len(self.files))

    async def readdir(self, inode: int, offset: int) -> list[tuple[bytes, Attr]]:
        if inode != ROOT_INODE:
            raise FuseError(errno.ENOTDIR)
        refs = await trio.to_thread.run_sync(self.store.list_refs)
        names = sorted(r.split("/")[1] for r in refs if r.startswith("images/") and r.endswith("/memory"))
        out = []
        for name in names[offset:]:
            f = await self.image(name)
            out.append((os.fsencode(name), Attr(f.inode, stat.S_IFREG | 0o644, f.chunk_map.size)))
        return out

    async def open(self, inode: int, flags: int) -> None:
        await self.file(inode)  # write opens too: QEMU opens its mem-path read-write; writes are refused

    async def read(self, inode: int, off: int, size: int) -> bytes:
        f = await self.file(inode)
        cm = f.chunk_map
        end = min(off + size, cm.size)
        if off >= end:
            return b""
        cs = cm.chunk_size
        sequential = f.run >= READ_AHEAD_AFTER
        parts: list[bytes | memoryview] = []
        data: bytes | memoryview = b""
        for index in range(off // cs, (end - 1) // cs + 1):
            lo = max(off, index * cs) - index * cs
            hi = min(end, (index + 1) * cs) - index * cs
            ref = cm.chunks[index]
            if ref is None:
                data = _ZEROS[: cm.chunk_length(index)]  # a clone's zeros are not pushed: a guest writes them, and pays no page cache
            else:
                if f.recording is not None and index not in f.recording:
                    f.recording[index] = time.monotonic() - f.record_start
                data = await self.chunk(f, ref)
                if not sequential:
                    self._push(f, index, data)
            parts.append(data[lo:hi])
        if sequential:
            await self._push_after(f, index, hi, data)
        self._follow(f, off // cs)
        out = b"".join(parts)
        f.read_bytes += len(out)
        f.held = True
        return out

    # ---- the page cache ------------------------------------------------------------------

    def _push(self, f: ImageFile, index: int, data: bytes | memoryview) -> None:
        """Queue a chunk for the file's page cache (see _pusher); a full queue skips it."""
        if index in f.pushing:
            return
        try:
            self._push_send.send_nowait((f, index, data))
            f.pushing.add(index)
        except trio.WouldBlock:
            pass  # the kernel asks again for what it lacks

    async def _pusher(self) -> None:
        """Push queued chunks into the page cache from a thread, a batch at a time.

        notify_store takes each page's lock, and a page that a read request is
        filling stays locked until that request is answered: from the request
        loop this would deadlock, from a thread it waits a moment at most."""
        while True:
            batch = await _batch(self._push_recv, PUSH_BATCH)
            try:
                await trio.to_thread.run_sync(self._store_pages, batch, limiter=self._push_threads)
            finally:
                for f, index, _ in batch:
                    f.pushing.discard(index)

    async def _push_after(self, f: ImageFile, index: int, hi: int, data: bytes | memoryview) -> None:
        """Before answering a sequential reader, push what follows the page it asked for:
        the rest of its chunk, then the chunks after it that this host holds, up to
        PUSH_AFTER_BYTES. A reader that caught up with its read-ahead (it is faster than
        any fetch) would otherwise ask again for every page until the pusher lands it.
        Only pages after the one asked for are pushed, so two answers waiting like this
        never wait for each other's page; the wait is bounded anyway."""
        with trio.move_on_after(REST_WAIT_S):
            await trio.to_thread.run_sync(self._store_after, f, index, hi, data, abandon_on_cancel=True, limiter=self._push_threads)

    def _store_after(self, f: ImageFile, index: int, hi: int, data: bytes | memoryview) -> None:
        cm = f.chunk_map
        parts: list[bytes | memoryview] = [memoryview(data)[hi:]]
        size, i = len(data) - hi, index + 1
        while size < PUSH_AFTER_BYTES and i < len(cm.chunks):
            ref = cm.chunks[i]
            part = _ZEROS[: cm.chunk_length(i)] if ref is None else self._have(ref.id)
            if part is None:
                break  # not here yet: the read-ahead brings it
            parts.append(part)
            size, i = size + len(part), i + 1
        if size and self._store(f, index * cm.chunk_size + hi, parts[0] if len(parts) == 1 else b"".join(parts)):
            f.pushed_chunks += i - index

    def _store(self, f: ImageFile, offset: int, data: bytes | memoryview) -> bool:
        """notify_store: the pages of data into f's page cache at offset."""
        if self.session is None:
            return False
        try:
            self.session.notify_store(f.inode, offset, data)
            return True
        except OSError as exc:  # ENOENT: the kernel holds no inode for it (nobody has it open)
            log.debug("image %s: %d bytes at %d not pushed to the page cache: %s", f.name, len(data), offset, exc)
            return False

    def _store_pages(self, batch: list[tuple[ImageFile, int, bytes | memoryview]]) -> None:
        """notify_store each run of consecutive chunks of a file at once (up to 4 MiB):
        one system call and one pass over the pages' locks for the run."""
        runs: list[tuple[ImageFile, int, list[bytes | memoryview]]] = []
        for f, index, data in sorted(batch, key=lambda item: (item[0].inode, item[1])):
            last = runs[-1] if runs else None
            if last and last[0] is f and last[1] + len(last[2]) == index and len(last[2]) * len(data) < (4 << 20):
                last[2].append(data)
            elif not (last and last[0] is f and last[1] + len(last[2]) > index):  # not a repeat
                runs.append((f, index, [data]))
        for f, index, datas in runs:
            if len(datas) == 1:
                payload = datas[0]
            elif all(isinstance(d, memoryview) and d.obj is _ZERO for d in datas):
                payload = _ZEROS[: sum(map(len, datas))]  # a run of zero chunks: no copy to make
            else:
                payload = b"".join(datas)
            if self._store(f, index * f.chunk_map.chunk_size, payload):
                f.pushed_chunks += len(datas)

    def _follow(self, f: ImageFile, index: int) -> None:
        """A reader asking for chunk after chunk (a copy, a migration, a flatten) gets the
        chunks ahead of it pushed, fetched in pieces of AHEAD_PIECE chunks (one ranged
        read each) on the prefetch lanes. Pushed pages never reach memfs, so the reader
        is seen again only when it catches up with the window: then the window doubles,
        up to MAX_AHEAD_CHUNKS. Clone faults are scattered and get none."""
        if f.last_index < index <= max(f.last_index, f.ahead_to) + 1:
            f.run += 1
        elif index != f.last_index:
            f.run, f.ahead_to, f.window = 1, -1, self.read_ahead_chunks
        f.last_index = index
        if f.run < READ_AHEAD_AFTER or not self.read_ahead_chunks or self.nursery is None:
            return
        f.window = f.window or self.read_ahead_chunks
        if f.ahead_to >= index + f.window // 2:
            return  # well inside the window: its pushes have not all landed yet
        if f.ahead_to >= 0:
            f.window = min(2 * f.window, MAX_AHEAD_CHUNKS)  # caught up: the reader is faster than the window
        start, stop = max(index + 1, f.ahead_to + 1), min(index + 1 + f.window, len(f.chunk_map.chunks))
        if start >= stop:
            return
        f.ahead_to = stop - 1
        for piece in range(start, stop, AHEAD_PIECE):
            self.nursery.start_soon(self._fetch_and_push, f, list(range(piece, min(piece + AHEAD_PIECE, stop))), self._prefetch_limit, True)

    # ---- chunks ------------------------------------------------------------------------

    def holds(self, cid: str) -> bool:
        """On this host: in the host cache or on its way there."""
        return cid in self._pending or cid in self.cache

    def _have(self, cid: str) -> bytes | None:
        data = self._pending.get(cid)
        return data if data is not None else self.cache.get(cid)

    async def chunk(self, f: ImageFile, ref: ChunkRef) -> bytes:
        """A verified chunk for a read: from the host cache, else fetched once however many ask."""
        data = self._have(ref.id)
        if data is not None:
            f.cache_hits += 1
            return data
        f.cache_misses += 1
        got = await self._fetch(f, [ref], self._fetch_limit)
        if ref.id not in got:
            raise FuseError(errno.EIO)
        return got[ref.id]

    async def _fetch(self, f: ImageFile, refs: list[ChunkRef], limit: trio.CapacityLimiter) -> dict[str, bytes]:
        """The verified contents of refs by chunk id, those that could be had: from the
        host cache, from a fetch another task has under way, or fetched here with one
        ranged read per run of adjacent chunks (ChunkStore.read_chunks). A chunk that
        cannot be fetched or verified is left out, and logged with its id."""
        got: dict[str, bytes] = {}
        mine: dict[str, ChunkRef] = {}
        theirs: dict[str, trio.Event] = {}
        if len(refs) > 1:  # a batch: its host-cache reads off the request loop
            held = await trio.to_thread.run_sync(lambda: {r.id: d for r in refs if (d := self._have(r.id)) is not None})
        else:
            held = {}
        for ref in refs:
            if ref.id in got or ref.id in mine or ref.id in theirs:
                continue
            data = held.get(ref.id) or self._have(ref.id)
            if data is not None:
                got[ref.id] = data
            elif (event := self._inflight.get(ref.id)) is not None:
                theirs[ref.id] = event
            else:
                mine[ref.id] = ref
                self._inflight[ref.id] = trio.Event()
        if mine:
            to_write: list[tuple[str, bytes]] = []
            try:
                async with limit:
                    t0 = time.perf_counter()
                    results = await trio.to_thread.run_sync(self.store.read_chunks, list(mine.values()))
                    self.fetch_seconds.observe(time.perf_counter() - t0)
                for ref, result in zip(mine.values(), results, strict=True):
                    if isinstance(result, StoreError):
                        f.errors += 1
                        f.last_error = str(result)
                        log.error("image %s: chunk %s: %s", f.name, ref.id[:16], result)
                        continue
                    got[ref.id] = result
                    f.fetched_bytes += len(result)
                    f.fetched_chunks += 1
                    if limit is self._fetch_limit:
                        self._remember(ref.id, result)
                    else:
                        self._pending[ref.id] = result
                        to_write.append((ref.id, result))
            finally:
                for cid in mine:
                    self._inflight.pop(cid).set()
            for cid, data in to_write:  # prefetch and read-ahead wait for the writer (bulk must not overrun it), readers do not
                await self._cache_send.send((self._generation, cid, data))
        for cid, event in theirs.items():
            await event.wait()
            data = self._have(cid)
            if data is not None:
                got[cid] = data
        return got

    def _remember(self, cid: str, data: bytes) -> None:
        """Into the host cache, written by _cache_writer off the fault's path; until then
        readers find it in _pending. A full queue leaves it uncached (the page cache has it)."""
        try:
            self._cache_send.send_nowait((self._generation, cid, data))
            self._pending[cid] = data
        except trio.WouldBlock:
            pass

    async def _cache_writer(self) -> None:
        """Write queued chunks into the host cache, all that are waiting in one thread hop."""
        while True:
            batch = await _batch(self._cache_recv, CACHE_BATCH)
            async with self._cache_lock:
                # a chunk queued before a drop is dropped too
                now = [(cid, data) for generation, cid, data in batch if generation == self._generation]
                try:
                    if now:
                        await trio.to_thread.run_sync(self.cache.put_many, now)
                except OSError as exc:
                    log.warning("%d chunks not kept in the host cache: %s", len(now), exc)
                finally:
                    for cid, _ in now:
                        self._pending.pop(cid, None)

    async def drop_cache(self) -> None:
        """Forget every chunk this host holds (the page cache is the caller's to drop)."""
        async with self._cache_lock:
            self._generation += 1
            self._pending.clear()
            await trio.to_thread.run_sync(self.cache.clear)
        for f in self.files.values():
            f.held = False

    async def _fetch_and_push(self, f: ImageFile, indexes: list[int], limit: trio.CapacityLimiter, zeros: bool = False) -> None:
        """Fetch and push chunks; zeros: push zero chunks too (for a sequential reader,
        which reads them all: a request per zero page would be its slowest part)."""
        cm = f.chunk_map
        at = [(i, cm.chunks[i]) for i in indexes if 0 <= i < len(cm.chunks)]
        got = await self._fetch(f, [r for _, r in at if r is not None], limit)
        for i, r in at:
            if r is None:
                if zeros:
                    self._push(f, i, _ZEROS[: cm.chunk_length(i)])
            elif r.id in got:
                self._push(f, i, got[r.id])

    async def background(self) -> None:
        """The page-cache pusher and the host-cache writer, for as long as the daemon runs."""
        async with trio.open_nursery() as nursery:
            for _ in range(PUSHERS):
                nursery.start_soon(self._pusher)
            nursery.start_soon(self._cache_writer)

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

    async def prefetch_pack(self, f: ImageFile, key: str, entries: list[tuple[int, int, int]]) -> None:
        """Stream a working-set pack (store object key: the image's working set, stored
        forms back to back in first-touch order; entries: chunk index, offset, length)
        and push each chunk into the page cache the moment it is in and verified: the
        whole working set in one request, REAP's working-set file. Demand fetches run
        beside it in their own lane. If the stream fails, what it did not bring is
        prefetched chunk by chunk."""
        t0 = time.monotonic()
        cm = f.chunk_map
        at: list[tuple[int, ChunkRef]] = []
        for index, offset, length in entries:
            if 0 <= index < len(cm.chunks) and (ref := cm.chunks[index]) is not None:
                at.append((index, ChunkRef(id=ref.id, pack=key, offset=offset, length=length)))
        f.prefetch = {"state": "streaming", "chunks": len(at), "from": key}
        done: set[int] = set()
        token = trio.lowlevel.current_trio_token()

        def arrived(batch: list[tuple[int, bytes]]) -> None:  # in trio, from the streaming thread
            for index, data in batch:
                cid = cm.chunks[index].id  # type: ignore[union-attr]
                done.add(index)
                if not self.holds(cid):
                    f.fetched_bytes += len(data)
                    f.fetched_chunks += 1
                    self._remember(cid, data)

        def stream() -> None:
            batch: list[tuple[int, bytes]] = []
            for pos, data in self.store.stream_chunks(key, [r for _, r in at]):
                index = at[pos][0]
                if isinstance(data, StoreError):
                    f.errors += 1
                    f.last_error = str(data)
                    log.error("image %s: working-set chunk %d: %s", f.name, index, data)
                    continue
                self._store_pages([(f, index, data)])  # straight from this thread: no hop
                batch.append((index, data))
                if len(batch) >= 16:
                    trio.from_thread.run_sync(arrived, batch, trio_token=token)
                    batch = []
            if batch:
                trio.from_thread.run_sync(arrived, batch, trio_token=token)

        try:
            await trio.to_thread.run_sync(stream)
        except (StoreError, BackendUnavailable) as exc:  # the stream is not retried: ranged reads are
            log.warning("image %s: streaming its working set from %s failed (%s): fetching the rest chunk by chunk", f.name, key, exc)
            await self.prefetch(f, [i for i, _ in at if i not in done])
            return
        f.prefetch = {"state": "done", "chunks": len(at), "from": key, "seconds": round(time.monotonic() - t0, 3)}

    async def prefetch(self, f: ImageFile, indexes: list[int]) -> None:
        """Fetch the given chunks and push them into the page cache, in the order given
        (the order the image's first clone touched them: REAP), a batch per lane, with
        lanes of their own: a clone's demand fetches never queue behind them."""
        t0 = time.monotonic()
        cm = f.chunk_map
        at = {i: r for i in dict.fromkeys(indexes) if 0 <= i < len(cm.chunks) and (r := cm.chunks[i]) is not None}
        order = list(at)
        missing = sum(1 for r in at.values() if not self.holds(r.id))
        f.prefetch = {"state": "running", "chunks": len(order), "missing": missing}
        batches = iter([order[b : b + PREFETCH_BATCH] for b in range(0, len(order), PREFETCH_BATCH)])

        async def lane() -> None:
            for batch in batches:  # shared: each lane takes the next batch in order
                await self._fetch_and_push(f, batch, self._prefetch_limit)

        async with trio.open_nursery() as nursery:
            for _ in range(PREFETCH_LANES):
                nursery.start_soon(lane)
        f.prefetch = {"state": "done", "chunks": len(order), "missing": missing, "seconds": round(time.monotonic() - t0, 3)}


def _read_inodes(path: Path) -> dict[str, int]:
    """The inodes file: "<inode> <image name>" per line, the names a previous daemon gave out."""
    known: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError), open(path) as lines:
        for line in lines:
            inode, _, name = line.rstrip("\n").partition(" ")
            if inode.isdigit() and name:
                known[name] = int(inode)
    return known
