"""memfs over a real FUSE mount, streaming from a real peer: one fetch per chunk however
many ask, a working-set pack in one stream, a peer lost mid-stream or for good."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from fastapi.responses import StreamingResponse

from tests.store.conftest import PEER_TOKEN, peer_app, serve
from vmstream.bench.delay import DelayProxy
from vmstream.memfs import fuse
from vmstream.memfs.mount import control_request, is_mounted
from vmstream.store import ChunkStore, LocalBackend

CS = 64 << 10
PACK_KEY = "meta/images/img/workingset.pack"


class Memfs:
    def __init__(self, mount: Path, control: Path) -> None:
        self.mount, self.control = mount, control

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        return control_request(self.control, cmd, **args)  # with a timeout: a test fails rather than hangs

    def stats(self) -> dict[str, Any]:
        image: dict[str, Any] = self.request("stats")["images"]["img"]
        return image


@contextlib.contextmanager
def memfs(tmp_path: Path, store: str) -> Iterator[Memfs]:
    """The memfs daemon as the agent runs it, on its own mount; unmounted and ended after."""
    mount, control = tmp_path / "mnt", tmp_path / "memfs.sock"
    with open(tmp_path / "memfs.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmstream.memfs.daemon", "--mount", str(mount), "--store", store, "--cache", str(tmp_path / "cache"),
             "--control", str(control), "--retry-attempts", "2", "--retry-deadline", "2", "--token-stdin"],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    proc.stdin.write(PEER_TOKEN.encode() + b"\n")
    proc.stdin.close()
    try:
        deadline = time.monotonic() + 20
        while not (control.exists() and is_mounted(mount)):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "memfs.log").read_text()
            time.sleep(0.05)
        yield Memfs(mount, control)
    finally:
        with contextlib.suppress(OSError):
            Memfs(mount, control).request("shutdown")
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if is_mounted(mount):
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False)


def _image(tmp_path: Path, chunks: int = 48) -> tuple[LocalBackend, bytes]:
    backend = LocalBackend(tmp_path / "host-a")
    content = os.urandom(chunks * CS)
    (tmp_path / "mem").write_bytes(content)
    ChunkStore(backend, chunk_size=CS).store_file(tmp_path / "mem", ref="images/img/memory")
    return backend, content


def test_clones_faulting_one_chunk_cause_one_fetch(tmp_path: Path) -> None:
    backend, content = _image(tmp_path)
    with serve(peer_app(ChunkStore(backend), writable=False)) as url, DelayProxy(int(url.rsplit(":", 1)[1]), rtt_ms=200) as proxy, \
            memfs(tmp_path, f"peer:{proxy.url}/v1/store") as fs:
        fd = os.open(fs.mount / "img", os.O_RDONLY)
        try:
            pages = [5 * CS + 4096 * k for k in (0, 3, 7, 11)]  # four faults in chunk 5, at once
            got: dict[int, bytes] = {}
            threads = [threading.Thread(target=lambda off=off: got.__setitem__(off, os.pread(fd, 4096, off))) for off in pages]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(got[off] == content[off : off + 4096] for off in pages)
            stats = fs.stats()
            assert stats["fetched_chunks"] == 1, stats
            # the chunk went whole into the page cache: its other pages never reach memfs
            deadline = time.monotonic() + 5
            while fs.stats()["pushed_chunks"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            before = fs.stats()["read_bytes"]
            assert os.pread(fd, CS, 5 * CS) == content[5 * CS : 6 * CS]
            assert fs.stats()["read_bytes"] == before
        finally:
            os.close(fd)


def test_working_set_pack_streams_and_a_cut_stream_is_made_up_chunk_by_chunk(tmp_path: Path) -> None:
    backend, content = _image(tmp_path)
    store = ChunkStore(backend, chunk_size=CS)
    cmap = store.get_ref("images/img/memory")
    order = [40, 3, 4, 5, 22, 9, 31, 0]
    blob, where = store.stored_forms([cmap.chunks[i] for i in order])  # type: ignore[misc]
    backend.put(PACK_KEY, blob)
    entries = [[i, off, n] for i, (off, n) in zip(order, where, strict=True)]
    app = peer_app(store, writable=False)
    cut = {"streams": 0}

    @app.middleware("http")
    async def cut_the_first_stream(request: Request, call_next: Any) -> Any:
        if request.url.path.endswith(PACK_KEY) and "range" not in request.headers:
            cut["streams"] += 1
            if cut["streams"] == 1:  # half the pack, then the connection drops
                async def half() -> AsyncIterator[bytes]:
                    yield blob[: len(blob) // 2]
                    raise ConnectionError("the peer went away")
                return StreamingResponse(half(), headers={"content-length": str(len(blob))})
        return await call_next(request)

    with serve(app) as url, memfs(tmp_path, f"peer:{url}/v1/store") as fs:
        for attempt in (1, 2):
            fs.request("drop-cache")
            fs.request("invalidate", image="img")
            before = fs.stats()["fetched_chunks"]
            assert fs.request("prefetch", image="img", chunks=order, wait=True, pack={"key": PACK_KEY, "entries": entries})["ok"]
            stats = fs.stats()
            assert stats["prefetch"]["state"] == "done" and stats["fetched_chunks"] - before == len(order), (attempt, stats)
            assert fs.request("missing", image="img", chunks=order)["missing"] == 0
            if attempt == 2:
                assert stats["prefetch"]["from"] == PACK_KEY, "a whole stream: the pack alone brought them"
        assert cut["streams"] == 2
        with open(fs.mount / "img", "rb") as f:
            assert f.read() == content
        assert fs.stats()["errors"] == 0


def test_a_peer_gone_for_good_is_a_clear_error(tmp_path: Path) -> None:
    backend, content = _image(tmp_path)
    with serve(peer_app(ChunkStore(backend), writable=False)) as url:
        port = int(url.rsplit(":", 1)[1])
        proxy = DelayProxy(port).__enter__()
        with memfs(tmp_path, f"peer:{proxy.url}/v1/store") as fs:
            fd = os.open(fs.mount / "img", os.O_RDONLY)
            try:
                assert os.pread(fd, 4096, 0) == content[:4096]
                proxy.__exit__(None, None, None)  # host A is gone
                with pytest.raises(OSError) as err:
                    os.pread(fd, 4096, 20 * CS)
                assert err.value.errno == 5  # EIO: never wrong or zero bytes
                stats = fs.stats()
                assert stats["errors"] >= 1 and proxy.url.split("//")[1] in stats["last_error"], stats
                assert "gave up" in stats["last_error"], stats
            finally:
                os.close(fd)


def _memfs_pid(fs: Memfs) -> int:
    return int(fs.request("stats")["pid"])


def test_memfs_killed_under_readers_loses_no_read(tmp_path: Path) -> None:
    """SIGKILL of the serving daemon, five times, while four readers fault pages in through
    a 20 ms link (so reads are in flight at each kill): the supervisor keeps the mount and
    starts another daemon, which has the kernel resend what the dead one left unanswered.
    Every read gets the right bytes, none fails, none waits for ever."""
    backend, content = _image(tmp_path, chunks=256)
    with serve(peer_app(ChunkStore(backend), writable=False)) as url, DelayProxy(int(url.rsplit(":", 1)[1]), rtt_ms=20) as proxy, \
            memfs(tmp_path, f"peer:{proxy.url}/v1/store") as fs:
        fd = os.open(fs.mount / "img", os.O_RDONLY)
        connection = os.minor(os.fstat(fd).st_dev)
        stop = threading.Event()
        reads, wrong, failed = [0], [], []
        done = False

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                off = rng.randrange(len(content) // 4096) * 4096
                try:
                    if os.pread(fd, 4096, off) != content[off : off + 4096]:
                        wrong.append(off)
                except OSError as exc:
                    failed.append(exc)
                reads[0] += 1

        threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(4)]
        try:
            for t in threads:
                t.start()
            for kill in range(5):  # an error here (a request timed out) still ends the connection below
                time.sleep(0.3)
                pid = _memfs_pid(fs)
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while True:
                    with contextlib.suppress(OSError):
                        if _memfs_pid(fs) != pid:
                            break
                    assert time.monotonic() < deadline, f"no daemon after kill {kill + 1}: {(tmp_path / 'memfs.log').read_text()}"
                    time.sleep(0.01)
                fs.request("drop-cache")  # the readers fault again, from the store
                fs.request("invalidate", image="img")
            time.sleep(0.3)
            done = True
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=20)
            hung = any(t.is_alive() for t in threads)
            if hung or not done:  # end the connection, or this test would hang (or leak memfs) instead of failing
                assert fuse.abort(connection), "the FUSE connection could not be ended: see the log"
            os.close(fd)
        assert not hung, "a read never came back: the dead daemon's requests were not resent"
        assert not wrong and not failed, (wrong[:3], failed[:3])
        assert reads[0] > 100 and fs.request("stats")["restarts"] == 5
        assert is_mounted(fs.mount)


def test_memfs_stops_and_unmounts_on_sigterm_to_its_supervisor(tmp_path: Path) -> None:
    _, content = _image(tmp_path, chunks=4)
    with memfs(tmp_path, f"local:{tmp_path / 'host-a'}") as fs:
        assert (fs.mount / "img").read_bytes() == content
        supervisor = int(next(line.split()[-1].rstrip(")") for line in (tmp_path / "memfs.log").read_text().splitlines()
                              if "supervisor pid" in line))
        daemon = _memfs_pid(fs)
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while is_mounted(fs.mount) or Path(f"/proc/{daemon}").exists() or fs.control.exists():
            assert time.monotonic() < deadline, "memfs did not stop, unmount and remove its socket"
            time.sleep(0.05)


def test_a_sequential_reader_gets_every_byte_and_few_requests(tmp_path: Path) -> None:
    """A copy of an image (data and zero chunks in runs) reads it right, each stored chunk
    fetched once, while most of its pages reach the page cache by pushes, not requests."""
    backend = LocalBackend(tmp_path / "host-a")
    content = bytearray(os.urandom(256 * CS))
    for run in range(0, len(content), 32 * CS):
        content[run + 8 * CS : run + 24 * CS] = bytes(16 * CS)  # half the chunks zero, in runs as in a guest
    (tmp_path / "mem").write_bytes(content)
    ChunkStore(backend, chunk_size=CS).store_file(tmp_path / "mem", ref="images/img/memory")
    with serve(peer_app(ChunkStore(backend), writable=False)) as url, memfs(tmp_path, f"peer:{url}/v1/store") as fs:
        with open(fs.mount / "img", "rb", buffering=0) as f:
            copy = b"".join(iter(lambda: f.read(1 << 20), b""))
        assert copy == content
        stats = fs.stats()
        assert stats["fetched_chunks"] == 128, stats
        assert stats["read_bytes"] < len(content) // 4, f"{stats['read_bytes']} of {len(content)} bytes asked for page by page"


def test_the_clone_shim_makes_a_punch_on_memfs_a_no_op(tmp_path: Path) -> None:
    """QEMU discards a clone's freed RAM by punching a hole in the RAM's file, then
    MADV_DONTNEED. On memfs (the image, shared by every clone) the shim makes the punch
    succeed untouched, so the DONTNEED happens; on any other file it is the real one."""
    from vmstream.qemu.preload import clone_shim_library

    shim = clone_shim_library(tmp_path / "lib")
    assert shim is not None
    backend, content = _image(tmp_path, chunks=4)
    other = tmp_path / "other"
    other.write_bytes(b"\x07" * (4 * CS))
    punch = (
        "import ctypes, os, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for path in sys.argv[1:]:\n"
        "    fd = os.open(path, os.O_RDWR)\n"
        "    print(libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(65536)), ctypes.get_errno())\n"  # PUNCH_HOLE|KEEP_SIZE
    )
    with serve(peer_app(ChunkStore(backend), writable=False)) as url, memfs(tmp_path, f"peer:{url}/v1/store") as fs:
        image = fs.mount / "img"
        out = subprocess.run([sys.executable, "-c", punch, str(image), str(other)], env={**os.environ, "LD_PRELOAD": str(shim)},
                             capture_output=True, text=True, check=True).stdout.split("\n")
        assert out[0].split()[0] == "0", f"the punch on memfs succeeds: {out}"
        assert image.read_bytes() == content, "and leaves the image as it was"
        assert out[1].split()[0] == "0" and other.read_bytes()[:65536] == bytes(65536), "a punch elsewhere is real"
        bare = subprocess.run([sys.executable, "-c", punch, str(image)], capture_output=True, text=True, check=True).stdout
        assert bare.split()[0] == "-1", "without the shim memfs refuses it (QEMU then frees nothing)"
