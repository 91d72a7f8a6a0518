"""The host chunk cache: verified chunk contents on local disk, bounded, close to LRU.

Chunks are appended to segment files (seg-NNNNNNNN.dat, segment_bytes at most), and
each append is then recorded in the segment's index (seg-NNNNNNNN.idx: chunk id,
offset, length), so the cache is a few dozen files however many chunks it holds, and
a hit is one pread on a file kept open. Over capacity the oldest segment goes whole;
a chunk read from one of the oldest segments while the cache is nearly full is
appended again to the newest (promoted), so what clones keep using stays and what nobody read for a while goes:
LRU at the grain of a segment.

It survives restarts: the indexes are read at start. An index record is written only
after its data, but a crash (or a power loss) may still leave a record whose bytes
did not all reach the disk, so a chunk found at start is checked against its blake3
name the first time it is read, and forgotten if it does not match: the cache never
serves wrong bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import blake3

_RECORD = struct.Struct("<32sQI")  # chunk id (raw blake3), offset, length
_SEGMENT = re.compile(r"^seg-(\d{8})\.dat$")
_PROMOTE_FROM = 4  # a hit in the oldest 1/4 of the segments moves the chunk to the newest


@dataclass
class _Segment:
    id: int
    fd: int
    index: int  # fd of the .idx file, opened for appending
    size: int = 0
    chunks: list[str] = field(default_factory=list)


class ChunkCache:
    def __init__(self, root: Path, capacity_bytes: int, segment_bytes: int | None = None) -> None:
        self.root = root
        self.capacity = capacity_bytes
        self.segment_bytes = segment_bytes or max(1 << 20, min(64 << 20, capacity_bytes // 8))
        self._lock = threading.Lock()
        self._where: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # chunk id -> segment, offset, length; oldest use first
        self._segments: dict[int, _Segment] = {}
        self._unverified: set[str] = set()  # found at start, not yet read
        self.bytes = 0  # what the segment files hold, live or not: the bound is on disk use
        root.mkdir(parents=True, exist_ok=True)
        self._load()

    # ---- start -------------------------------------------------------------------------

    def _load(self) -> None:
        for stale in self.root.glob("*/*"):  # the cache of a version that kept a file per chunk
            stale.unlink(missing_ok=True)
        for stale_dir in self.root.iterdir():
            if stale_dir.is_dir():
                stale_dir.rmdir()
        ids = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _SEGMENT.match(p.name)))
        for index in self.root.glob("seg-*.idx"):  # an index whose data a crash removed first
            if not index.with_suffix(".dat").exists():
                index.unlink()
        for sid in ids:
            seg = self._open(sid)
            seg.size = os.fstat(seg.fd).st_size
            with open(self._path(sid, "idx"), "rb") as f:
                records = f.read()
            for at in range(0, len(records) - _RECORD.size + 1, _RECORD.size):  # a torn last record is ignored
                raw, offset, length = _RECORD.unpack_from(records, at)
                if offset + length > seg.size:
                    continue  # its bytes never reached the file
                cid = raw.hex()
                self._where[cid] = (sid, offset, length)
                self._where.move_to_end(cid)
                seg.chunks.append(cid)
                self._unverified.add(cid)
            self.bytes += seg.size
        for sid in ids:  # a segment no chunk points into any more
            if sid != max(ids) and not any(self._where.get(c, (None,))[0] == sid for c in self._segments[sid].chunks):
                self._drop(sid)

    def _path(self, sid: int, kind: str) -> Path:
        return self.root / f"seg-{sid:08d}.{kind}"

    def _open(self, sid: int) -> _Segment:
        seg = _Segment(sid, os.open(self._path(sid, "dat"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600),
                       os.open(self._path(sid, "idx"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._segments[sid] = seg
        return seg

    # ---- reading -----------------------------------------------------------------------

    def __contains__(self, cid: str) -> bool:
        with self._lock:
            return cid in self._where

    def get(self, cid: str) -> bytes | None:
        with self._lock:  # held over the read: a dropped segment's fd number may be reused at once
            where = self._where.get(cid)
            if where is None:
                return None
            self._where.move_to_end(cid)
            sid, offset, length = where
            data = os.pread(self._segments[sid].fd, length, offset)
        if len(data) != length:
            self._forget(cid)
            return None
        if cid in self._unverified:
            if blake3.blake3(data, max_threads=1).hexdigest() != cid:
                self._forget(cid)  # torn by a crash: fetched again, never served wrong
                return None
            self._unverified.discard(cid)
        with self._lock:
            near_full = self.bytes > self.capacity - self.capacity // _PROMOTE_FROM  # else nothing is about to go
            if near_full and self._where.get(cid, (None,))[0] == sid and len(self._segments) > 1:
                lo, hi = min(self._segments), max(self._segments)
                if sid < lo + max(1, (hi - lo + 1) // _PROMOTE_FROM):
                    with contextlib.suppress(OSError):  # a full disk: it stays where it is
                        self._append(cid, data)  # used again: it outlives its old segment
        return data

    def _forget(self, cid: str) -> None:
        with self._lock:
            self._where.pop(cid, None)
            self._unverified.discard(cid)

    # ---- writing -----------------------------------------------------------------------

    def put(self, cid: str, data: bytes) -> None:
        """Keep a verified chunk; the oldest segments go while over capacity."""
        self.put_many([(cid, data)])

    def put_many(self, chunks: list[tuple[str, bytes]]) -> None:
        """Keep verified chunks, under one hold of the lock (a bulk fetch's batch)."""
        with self._lock:
            for cid, data in chunks:
                if cid in self._where:
                    self._where.move_to_end(cid)
                    continue
                try:
                    self._append(cid, data)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or len(self._segments) < 2:
                        raise
                    # the disk filled before the bound: it is the bound now, and the oldest goes
                    self.capacity = min(self.capacity, self.bytes)
                    self._drop(min(self._segments))
                    self._append(cid, data)
            while self.bytes > self.capacity and len(self._segments) > 1:
                self._drop(min(self._segments))

    def _append(self, cid: str, data: bytes) -> None:
        """Under the lock: data first, then its index record. A write the disk cannot take whole
        (it filled up) is undone and raises OSError: kept in part, a chunk's missing tail would
        read back as zeros once a later chunk extends the file, and be served as its content."""
        head = self._segments[max(self._segments)] if self._segments else None
        if head is None or (head.size and head.size + len(data) > self.segment_bytes):
            head = self._open(head.id + 1 if head else 1)
        offset = head.size
        index_at = os.lseek(head.index, 0, os.SEEK_END)
        try:
            if os.pwrite(head.fd, data, offset) != len(data):
                raise OSError(errno.ENOSPC, f"the host cache took only part of a {len(data)}-byte chunk")
            record = _RECORD.pack(bytes.fromhex(cid), offset, len(data))
            if os.write(head.index, record) != len(record):
                raise OSError(errno.ENOSPC, "the host cache took only part of an index record")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(head.fd, offset)
                os.ftruncate(head.index, index_at)
            raise
        head.size += len(data)
        head.chunks.append(cid)
        self.bytes += len(data)
        self._where[cid] = (head.id, offset, len(data))
        self._where.move_to_end(cid)
        self._unverified.discard(cid)

    def _drop(self, sid: int) -> None:
        """Under the lock: a segment and every chunk that still lives in it."""
        seg = self._segments.pop(sid)
        for cid in seg.chunks:
            if self._where.get(cid, (None,))[0] == sid:
                del self._where[cid]
                self._unverified.discard(cid)
        self.bytes -= seg.size
        os.close(seg.fd)
        os.close(seg.index)
        self._path(sid, "idx").unlink(missing_ok=True)  # the index first: a crash never leaves records without data
        self._path(sid, "dat").unlink(missing_ok=True)

    def clear(self) -> None:
        with self._lock:
            for sid in list(self._segments):
                self._drop(sid)
            self._where.clear()
            self._unverified.clear()
            self.bytes = 0

    def close(self) -> None:
        with self._lock:
            for seg in self._segments.values():
                os.close(seg.fd)
                os.close(seg.index)
            self._segments.clear()
