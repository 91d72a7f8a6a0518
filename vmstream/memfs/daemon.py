"""The memfs daemon: mounts the filesystem and answers a control socket.

    python -m vmstream.memfs.daemon --mount DIR --store SPEC --cache DIR
        --cache-bytes N --control SOCK

Control protocol: one JSON object per line in, one per line out:
    {"cmd": "stats"}                         host and per-image counters
    {"cmd": "prefetch", "image": I, "chunks": [...], "wait": bool,
     "pack": {"key": K, "entries": [[index, offset, length], ...]}}   pack: optional,
                                             the working set as one store object, streamed
    {"cmd": "record-start", "image": I}      log first touches of chunks
    {"cmd": "record-stop", "image": I}       -> {"chunks": [indexes in touch order]}
    {"cmd": "missing", "image": I, "chunks": [...]} -> how many are not cached
    {"cmd": "warm", "image": I, "path": P}   fill the cache from a local copy of the memory
    {"cmd": "forget", "image": I}            drop an image (after it is deleted)
    {"cmd": "drop-cache"}                    empty the host chunk cache (benchmarks)
    {"cmd": "invalidate", "image": I}        drop the kernel's page cache of it
    {"cmd": "shutdown"}                      unmount and exit
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from vmstream.memfs.cache import ChunkCache
from vmstream.memfs.fs import MemFs
from vmstream.store import ChunkStore, RetryPolicy
from vmstream.store.spec import open_backend

log = logging.getLogger("vmstream.memfs")


class Daemon:
    def __init__(self, fs: MemFs, control: Path) -> None:
        self.fs = fs
        self.control = control
        self.cancel: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        fs = self.fs
        if cmd == "stats":
            return {
                "ok": True,
                "cache_bytes": fs.cache.bytes,
                "cache_capacity": fs.cache.capacity,
                "images": {name: f.stats() for name, f in fs.files.items()},
            }
        if cmd == "drop-cache":
            await fs.drop_cache()
            return {"ok": True}
        if cmd == "shutdown":
            assert self.cancel is not None
            self.cancel.cancel()
            return {"ok": True}
        image = str(req.get("image", ""))
        if cmd == "forget":
            fs.forget_image(image)
            return {"ok": True}
        try:
            f = await fs.image(image)
        except pyfuse3.FUSEError:
            return {"ok": False, "error": f"no memory of image '{image}' in the store"}
        if cmd == "prefetch":
            assert self.nursery is not None
            pack = req.get("pack")
            if pack:
                entries = [(int(i), int(o), int(n)) for i, o, n in pack["entries"]]
                job = functools.partial(fs.prefetch_pack, f, str(pack["key"]), entries)
            else:
                job = functools.partial(fs.prefetch, f, [int(i) for i in req.get("chunks", [])])
            if req.get("wait"):
                await job()
            else:
                self.nursery.start_soon(job)
            return {"ok": True}
        if cmd == "warm":
            warmed = await trio.to_thread.run_sync(fs.warm, f, Path(str(req.get("path", ""))))
            return {"ok": True, "chunks": warmed}
        if cmd == "missing":
            cm = f.chunk_map
            refs = [cm.chunks[i] for i in req.get("chunks", []) if 0 <= i < len(cm.chunks)]
            return {"ok": True, "missing": sum(1 for r in refs if r is not None and not fs.holds(r.id))}
        if cmd == "record-start":
            f.recording, f.record_start = {}, time.monotonic()
            return {"ok": True}
        if cmd == "record-stop":
            touched = f.recording or {}
            f.recording = None
            return {"ok": True, "chunks": sorted(touched, key=touched.__getitem__)}
        if cmd == "invalidate":
            with contextlib.suppress(OSError):  # from a thread: inline it can deadlock with the kernel
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, f.inode, False)
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def serve_client(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        answer = await self.handle(json.loads(line))
                    except Exception as exc:  # a bad request must not take the daemon down
                        log.exception("control request failed")
                        answer = {"ok": False, "error": str(exc)}
                    await stream.send_all(json.dumps(answer).encode() + b"\n")

    async def serve_control(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.control.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(self.control))
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self.serve_client, [listener])

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.fs.nursery = nursery
            with trio.CancelScope() as scope:
                self.cancel = scope
                await nursery.start(self.serve_control)
                nursery.start_soon(self.fs.background)
                nursery.start_soon(_on_signals, scope.cancel)
                await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()


async def _on_signals(stop: Callable[[], Awaitable[None] | None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop()
            return


def _no_kernel_read_around(mount: Path) -> None:
    """Set the mount's kernel read-ahead to 0.

    Clones fault their memory in page by page, and each fault that misses would
    otherwise read 128 KiB around it, so an idle clone pulled ~30% more chunks
    than it touched. The daemon's own sequential read-ahead (whole chunks) is kept.
    Found through /proc/self/mountinfo: stat() on the mount would wait for this
    daemon, which is not serving yet.
    """
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == str(mount.absolute()):
                knob = Path(f"/sys/class/bdi/{fields[2]}/read_ahead_kb")
                try:
                    knob.write_text("0")
                except OSError as exc:
                    log.warning("could not turn off kernel read-ahead on %s (%s): clones fetch more", mount, exc)
                return
    log.warning("mount %s not found in /proc/self/mountinfo; kernel read-ahead left on", mount)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vmstream-memfs")
    p.add_argument("--mount", type=Path, required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--cache-bytes", type=int, default=8 << 30)
    p.add_argument("--control", type=Path, required=True)
    p.add_argument("--retry-attempts", type=int, default=4)
    p.add_argument("--retry-deadline", type=float, default=10.0)
    p.add_argument("--read-ahead-chunks", type=int, default=16)
    p.add_argument("--token-stdin", action="store_true", help="read a peer store's token from the first line of stdin")
    args = p.parse_args(argv)
    token = sys.stdin.readline().strip() or None if args.token_stdin else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s memfs %(levelname)s %(message)s")
    store = ChunkStore(open_backend(args.store, token), retry=RetryPolicy(attempts=args.retry_attempts, deadline=args.retry_deadline))
    fs = MemFs(store, ChunkCache(args.cache, args.cache_bytes), args.read_ahead_chunks)
    args.mount.mkdir(parents=True, exist_ok=True)
    options = set(pyfuse3.default_options) | {"fsname=vmstream-memfs"}
    pyfuse3.init(fs, str(args.mount), options)
    log.info("mounted %s (pid %d)", args.mount, os.getpid())
    _no_kernel_read_around(args.mount)
    try:
        trio.run(Daemon(fs, args.control).run)
    finally:
        pyfuse3.close(unmount=True)
        args.control.unlink(missing_ok=True)
        store.close()
        log.info("unmounted %s", args.mount)


if __name__ == "__main__":
    main()
