"""The memfs daemon: mounts the filesystem, serves it, and answers a control socket.

    python -m vmstream.memfs.daemon --mount DIR --store SPEC --cache DIR
        --cache-bytes N --control SOCK

The process started is a small supervisor: it mounts, answers the kernel's INIT, keeps the
/dev/fuse descriptor, and forks the daemon that serves (the store, the caches, the request
loop, the control socket). If that daemon dies, the mount does not: the supervisor forks
another, which asks the kernel to resend what the dead one had read and not answered
(vmstream.memfs.fuse), so clones faulting their memory meanwhile wait a moment and go on.
It stops when the daemon is told to (shutdown, SIGTERM to the supervisor) or the mount goes
away, and gives up after RESTART_LIMIT deaths within RESTART_WINDOW_S.

Control protocol: one JSON object per line in, one per line out:
    {"cmd": "stats"}                         host and per-image counters, pid, restarts,
                                             requests (this daemon's), resent (of those: a dead one's)
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
from types import FrameType
from typing import Any

import trio

from vmstream.memfs import fuse
from vmstream.memfs.cache import ChunkCache
from vmstream.memfs.fs import MemFs
from vmstream.memfs.mount import main_thread_gone
from vmstream.store import ChunkStore, RetryPolicy
from vmstream.store.spec import open_backend

log = logging.getLogger("vmstream.memfs")
FSNAME = "vmstream-memfs"
RESTART_LIMIT = 10  # deaths within RESTART_WINDOW_S after which the supervisor gives up and unmounts
RESTART_WINDOW_S = 60.0
EXIT_SIGNALLED = 3  # the daemon got SIGTERM or SIGINT itself (not through the supervisor): start another


class Daemon:
    def __init__(self, fs: MemFs, session: fuse.Session, control: Path, restarts: int = 0) -> None:
        self.fs = fs
        self.session = session
        self.control = control
        self.restarts = restarts  # daemons before this one on the mount
        self.cancel: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        self.signalled = False

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        fs = self.fs
        if cmd == "stats":
            return {
                "ok": True,
                "pid": os.getpid(),
                "restarts": self.restarts,
                "requests": self.session.requests,
                "resent": self.session.resent,
                "inflight": len(self.session.inflight),
                "oldest_inflight": self.session.oldest(),
                "slow_requests": self.session.slow,
                "cache_bytes": fs.cache.bytes,
                "cache_capacity": fs.cache.capacity,
                "fetch_seconds": fs.fetch_seconds.to_dict(),
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
        except fuse.FuseError:
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
                await trio.to_thread.run_sync(self.session.invalidate_inode, f.inode)
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
        self.fs.session = self.session
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.fs.nursery = nursery
            with trio.CancelScope() as scope:
                self.cancel = scope
                await nursery.start(self.serve_control)
                nursery.start_soon(self.fs.background)
                nursery.start_soon(_on_signals, self._signalled)
                if self.restarts:
                    self.session.resend()
                    log.info("serving again after %d restart(s): the kernel resends what the last daemon left unanswered", self.restarts)
                await self.session.serve(self.fs)
            nursery.cancel_scope.cancel()

    def _signalled(self) -> None:
        self.signalled = True
        assert self.cancel is not None
        self.cancel.cancel()


async def _on_signals(stop: Callable[[], Awaitable[None] | None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop()
            return


def _serve(args: argparse.Namespace, token: str | None, fd: int, inodes: Path, restarts: int) -> int:
    """The daemon, in a process forked by the supervisor: its exit code says what next."""
    store = ChunkStore(open_backend(args.store, token), retry=RetryPolicy(attempts=args.retry_attempts, deadline=args.retry_deadline))
    try:
        fs = MemFs(store, ChunkCache(args.cache, args.cache_bytes), args.read_ahead_chunks, inodes)
        daemon = Daemon(fs, fuse.Session(fd), args.control, restarts)
        trio.run(daemon.run)
        return EXIT_SIGNALLED if daemon.signalled else 0
    finally:
        store.close()


class Supervisor:
    """Forks the serving daemon again and again, until one ends on purpose.

    A daemon is taken for dead when its main thread is: a killed daemon whose other threads
    wait in the kernel for a page lock (pushing into the page cache while a read of that page
    is in flight) cannot finish dying until that read is answered, and only the next daemon
    can answer it (the kernel resends it). So the next one starts as soon as the main thread
    is gone, and the rest is reaped when it ends. A daemon that ends on purpose says so on a
    pipe first; one that says nothing was killed or crashed."""

    def __init__(self, serve: Callable[[int], int]) -> None:
        self.serve = serve
        self.stopping = False
        self.child = 0
        self.dying: set[int] = set()  # daemons whose main thread is gone, not yet reaped
        self.deaths: list[float] = []  # within the last RESTART_WINDOW_S
        self.restarts = 0  # daemons started after one died, in all

    def stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        self.stopping = True
        if self.child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGTERM)

    def run(self) -> int:
        """0 when a daemon ended on purpose (or the supervisor was told to stop), 1 when they kept dying."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        while True:
            said, says = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(said)
                self._daemon(says)
            os.close(says)
            self.child = pid
            if self.stopping:
                os.kill(pid, signal.SIGTERM)
            try:
                code = self._wait(pid, said)
            finally:
                os.close(said)
                self.child = 0
            if self.stopping or code == 0:
                return 0
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_S] + [now]
            if code is None:
                how = "was killed (threads of it still finish: reaped later)"
            else:
                how = f"exited with {code}" if code > 0 else f"was killed by signal {-code}"
            if len(self.deaths) > RESTART_LIMIT:
                log.error("memfs daemon %d %s, the %dth time in %.0fs: giving up", pid, how, len(self.deaths), RESTART_WINDOW_S)
                return 1
            log.warning("memfs daemon %d %s: starting another on the same mount", pid, how)
            self.restarts += 1

    def _daemon(self, says: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = 1
        try:
            code = self.serve(self.restarts)
        except BaseException:
            log.exception("memfs daemon failed")
        finally:
            logging.shutdown()
            with contextlib.suppress(OSError):
                os.write(says, bytes([code]))
            os._exit(code)

    def _wait(self, pid: int, said: int) -> int | None:
        """The daemon's exit code once its main thread is gone (None: killed, code unknown yet)."""
        while True:
            self.reap()
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if main_thread_gone(pid):
                self.dying.add(pid)
                os.set_blocking(said, False)
                with contextlib.suppress(BlockingIOError):
                    if told := os.read(said, 1):
                        return told[0]
                return None
            time.sleep(0.005)

    def reap(self) -> None:
        for pid in list(self.dying):
            with contextlib.suppress(ChildProcessError):
                if not os.waitpid(pid, os.WNOHANG)[0]:
                    continue
            self.dying.discard(pid)


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
    args.mount.mkdir(parents=True, exist_ok=True)
    inodes = args.control.with_name(args.control.stem + ".inodes")
    inodes.unlink(missing_ok=True)  # a new mount: the kernel holds no inode yet
    fd = fuse.mount(args.mount, FSNAME)
    connection = fuse.connection_of(args.mount)
    supervisor = Supervisor(functools.partial(_serve, args, token, fd, inodes))
    code = 1
    try:
        fuse.answer_init(fd)
        log.info("mounted %s (supervisor pid %d)", args.mount, os.getpid())
        code = supervisor.run()
    finally:
        fuse.unmount(args.mount, lazy=True)
        deadline = time.monotonic() + 5
        while supervisor.dying and time.monotonic() < deadline:
            supervisor.reap()
            time.sleep(0.05)
        if supervisor.dying and connection is not None and not fuse.abort(connection):  # stuck on requests no daemon will answer now
            log.warning("could not end FUSE connection %s: a dying daemon may be left", connection)
        os.close(fd)
        args.control.unlink(missing_ok=True)
        inodes.unlink(missing_ok=True)
        log.info("unmounted %s", args.mount)
    sys.exit(code)


if __name__ == "__main__":
    main()
