"""Which FUSE binding serves image memory faster: pyfuse3 or mfusepy.

    python -m vmstream.memfs.compare [--mib 256]

Both serve the same read-only file from one in-memory buffer, so only the
binding and its threading model differ. Each is read sequentially (1 MiB
reads) and by random 4 KiB page reads (how a clone's page faults arrive),
with the page cache dropped for the file between passes (O_DIRECT is not
honoured by FUSE without direct_io, so each pass uses a fresh mount).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import errno
import json
import multiprocessing
import os
import random
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

NAME = "mem"


def _serve_pyfuse3(mount: str, data: bytes) -> None:
    import pyfuse3
    import trio

    class Fs(pyfuse3.Operations):
        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
            a.st_size = 0 if inode == pyfuse3.ROOT_INODE else len(data)
            a.attr_timeout = a.entry_timeout = 3600
            return a

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
            if name != NAME.encode():
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(2)

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            return data[off : off + size]

    pyfuse3.init(Fs(), mount, set(pyfuse3.default_options))
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def _serve_mfusepy(mount: str, data: bytes) -> None:
    import mfusepy

    class Fs(mfusepy.Operations):
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
            if path == "/" + NAME:
                return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": len(data)}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return data[offset : offset + size]

    mfusepy.FUSE(Fs(), mount, foreground=True, nothreads=False, kernel_cache=True)


def _measure(binding: str, data: bytes, pages: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for mode in ("sequential", "random"):
        with tempfile.TemporaryDirectory(prefix="vmstream-fuse-") as mount:
            target = _serve_pyfuse3 if binding == "pyfuse3" else _serve_mfusepy
            proc = multiprocessing.Process(target=target, args=(mount, data), daemon=True)
            proc.start()
            path = Path(mount) / NAME
            try:
                deadline = time.monotonic() + 10
                while not path.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{binding} did not mount")
                    time.sleep(0.02)
                fd = os.open(path, os.O_RDONLY)
                t = time.perf_counter()
                if mode == "sequential":
                    for off in range(0, len(data), 1 << 20):
                        os.pread(fd, 1 << 20, off)
                    out["sequential_mbps"] = round(len(data) / (1 << 20) / (time.perf_counter() - t), 1)
                else:
                    for p in pages:
                        os.pread(fd, 4096, p * 4096)
                    out["random_4k_reads_per_s"] = round(len(pages) / (time.perf_counter() - t))
                os.close(fd)
            finally:
                subprocess.run(["fusermount3", "-u", "-z", mount], capture_output=True)
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--random-reads", type=int, default=20000)
    args = p.parse_args()
    data = os.urandom(args.mib << 20)
    rng = random.Random(1)
    pages = rng.sample(range(len(data) // 4096), min(args.random_reads, len(data) // 4096))
    result: dict[str, Any] = {"mib": args.mib}
    for binding in ("pyfuse3", "mfusepy"):
        try:
            result[binding] = _measure(binding, data, pages)
        except ImportError as exc:
            result[binding] = {"error": f"not installed: {exc}"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
