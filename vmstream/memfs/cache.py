"""The host chunk cache: verified chunk contents on local disk, LRU by bytes.

Files are named by chunk id, so what is cached is content-checked once and
valid for every image that shares the chunk. It survives restarts: the LRU
order is rebuilt from file times at start.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path


class ChunkCache:
    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = root
        self.capacity = capacity_bytes
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # chunk id -> size, oldest first
        self.bytes = 0
        root.mkdir(parents=True, exist_ok=True)
        found = []
        for path in root.glob("*/*"):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write that a crash cut short
                continue
            st = path.stat()
            found.append((st.st_mtime, path.name, st.st_size))
        for _, cid, size in sorted(found):
            self._lru[cid] = size
            self.bytes += size

    def _path(self, cid: str) -> Path:
        return self.root / cid[:2] / cid

    def __contains__(self, cid: str) -> bool:
        with self._lock:
            return cid in self._lru

    def get(self, cid: str) -> bytes | None:
        with self._lock:
            if cid not in self._lru:
                return None
            self._lru.move_to_end(cid)
        try:
            return self._path(cid).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self.bytes -= self._lru.pop(cid, 0)
            return None

    def put(self, cid: str, data: bytes) -> None:
        path = self._path(cid)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{cid}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see a whole chunk or none
        with self._lock:
            if cid not in self._lru:
                self.bytes += len(data)
            self._lru[cid] = len(data)
            self._lru.move_to_end(cid)
            victims = []
            while self.bytes > self.capacity and len(self._lru) > 1:
                old, size = self._lru.popitem(last=False)
                self.bytes -= size
                victims.append(old)
        for old in victims:
            self._path(old).unlink(missing_ok=True)

    def clear(self) -> None:
        with self._lock:
            ids = list(self._lru)
            self._lru.clear()
            self.bytes = 0
        for cid in ids:
            self._path(cid).unlink(missing_ok=True)
