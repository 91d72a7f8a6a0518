"""The FUSE wire protocol, spoken by memfs itself: so a new daemon can take over a live mount.

A FUSE connection lives as long as some process holds its /dev/fuse descriptor. memfs's
supervisor opens it, mounts, answers the kernel's INIT and keeps it; each daemon it starts
gets the descriptor and serves requests on it. When a daemon dies, the requests it had read
and not answered are still the kernel's: the next daemon asks for them again
(FUSE_NOTIFY_RESEND, Linux 6.9) and the clones whose faults they are never notice. libfuse
(and so pyfuse3) cannot do this: it answers EIO to every request of a session that has not
seen INIT, and a taken-over connection never sends INIT again.

memfs serves a flat read-only directory, so only a few requests matter: LOOKUP, GETATTR,
OPEN, READ, STATFS, OPENDIR, READDIR and the releases and forgets; the rest get ENOSYS (the
kernel remembers that) or EROFS.

Layouts from include/uapi/linux/fuse.h (protocol 7.x, the structs unchanged since 7.9).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

log = logging.getLogger("vmstream.memfs")

ROOT_INODE = 1
MAJOR = 7
MINOR = 38  # the newest minor whose structs this module writes; the kernel speaks down to it
READ_BUFFER = 1 << 16  # a request: at least FUSE_MIN_READ_BUFFER (8 KiB) and max_write + headers
MAX_WRITE = 4096  # memfs takes no writes: the smallest the kernel allows
MAX_PAGES = 32  # pages per READ (128 KiB, the kernel's default)
SLOW_S = 5.0  # a request answered this late is logged

# opcodes
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 25, 26, 27, 28, 29
INTERRUPT, DESTROY, BATCH_FORGET, CREATE, MKNOD, MKDIR = 36, 38, 42, 35, 8, 9
UNLINK, RMDIR, RENAME, RENAME2, LINK, SYMLINK = 10, 11, 12, 45, 13, 6
# notify codes (written with unique 0 and the code as error)
NOTIFY_INVAL_INODE, NOTIFY_STORE, NOTIFY_RESEND = 2, 4, 7
# INIT flags
ASYNC_READ = 1 << 0
PARALLEL_DIROPS = 1 << 18
FLAG_MAX_PAGES = 1 << 22
FOPEN_KEEP_CACHE = 1 << 1
UNIQUE_RESEND = 1 << 63  # set by the kernel on a request it sends again

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
# major minor max_readahead flags max_background congestion max_write time_gran max_pages map_alignment flags2 max_stack_depth
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks atime mtime ctime (+nsec x3) mode nlink uid gid rdev blksize flags
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid (+nsec x2), then ATTR
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy, then ATTR
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQI")  # fh offset size (read_flags, lock_owner, flags follow)
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name padded to 8
STORE_OUT = struct.Struct("<QQII")  # nodeid offset size padding
INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino offset length


class FuseError(Exception):
    """Answer the request with this errno."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


@dataclass(frozen=True)
class Attr:
    inode: int
    mode: int
    size: int
    timeout: float = 3600.0  # images are immutable: the kernel may keep entries and attributes this long

    def pack(self) -> bytes:
        uid, gid = os.getuid(), os.getgid()
        return ATTR.pack(self.inode, self.size, (self.size + 511) // 512, 0, 0, 0, 0, 0, 0, self.mode, 1, uid, gid, 0, 4096, 0)


@dataclass(frozen=True)
class FsStats:
    blocks: int
    files: int
    block_size: int = 4096
    name_max: int = 255


class Operations(Protocol):
    """What the session asks of the filesystem: raise FuseError to answer an error."""

    async def lookup(self, parent: int, name: bytes) -> Attr: ...
    async def getattr(self, inode: int) -> Attr: ...
    async def open(self, inode: int, flags: int) -> None: ...
    async def read(self, inode: int, offset: int, size: int) -> bytes: ...
    async def statfs(self) -> FsStats: ...
    async def readdir(self, inode: int, offset: int) -> list[tuple[bytes, Attr]]: ...


def _timeout(seconds: float) -> tuple[int, int]:
    return int(seconds), int((seconds % 1) * 1e9)


class Session:
    """One daemon's serving of a FUSE connection whose INIT is already answered."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.requests = 0
        self.resent = 0  # requests a dead daemon had read, resent by the kernel to this one
        self.inflight: dict[int, tuple[int, int, float]] = {}  # unique -> opcode, inode, when read
        self.slow = 0  # requests answered after SLOW_S or more

    def oldest(self) -> dict[str, object] | None:
        """The request waiting longest for its answer: a clone stuck on a fault shows here."""
        if not self.inflight:
            return None
        unique, (opcode, inode, t0) = min(self.inflight.items(), key=lambda item: item[1][2])
        return {"opcode": opcode, "inode": inode, "waiting_s": round(time.monotonic() - t0, 3), "resent": bool(unique & UNIQUE_RESEND)}

    # ---- notifications: from any thread ----------------------------------------------

    def _notify(self, code: int, *parts: bytes | memoryview) -> None:
        size = OUT_HEADER.size + sum(len(p) for p in parts)
        os.writev(self.fd, [OUT_HEADER.pack(size, code, 0), *parts])

    def notify_store(self, inode: int, offset: int, data: bytes | memoryview) -> None:
        """Put data into the inode's page cache at offset (OSError ENOENT: no one has it open)."""
        self._notify(NOTIFY_STORE, STORE_OUT.pack(inode, offset, len(data), 0), data)

    def invalidate_inode(self, inode: int) -> None:
        """Drop the inode's page cache."""
        self._notify(NOTIFY_INVAL_INODE, INVAL_INODE_OUT.pack(inode, 0, 0))

    def resend(self) -> bool:
        """Have the kernel queue again the requests a dead daemon had read and not answered."""
        try:
            self._notify(NOTIFY_RESEND)
            return True
        except OSError as exc:  # before Linux 6.9: those requests wait for ever
            log.warning("the kernel could not resend the requests of the previous daemon (%s)", exc)
            return False

    # ---- requests ---------------------------------------------------------------------

    def _reply(self, unique: int, *parts: bytes | memoryview, error: int = 0) -> None:
        size = OUT_HEADER.size + sum(len(p) for p in parts)
        try:
            os.writev(self.fd, [OUT_HEADER.pack(size, -error, unique), *parts])
        except OSError as exc:  # ENOENT: the request was interrupted meanwhile; ENODEV: unmounted
            if exc.errno not in (errno.ENOENT, errno.ENODEV):  # the kernel refused the answer: one request lost, not the daemon
                log.error("the kernel refused the answer to request %#x (%d bytes): %s", unique, size, exc)

    async def serve(self, ops: Operations) -> None:
        """Read requests until the mount goes away (ENODEV), each answered in its own task."""
        os.set_blocking(self.fd, False)
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                for _ in range(64):  # what is queued, then let the answers run
                    try:
                        buf = os.read(self.fd, READ_BUFFER)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == errno.ENODEV:  # unmounted
                            nursery.cancel_scope.cancel()
                            return
                        if exc.errno in (errno.ENOENT, errno.EINTR):  # interrupted before we read it
                            continue
                        raise
                    self.requests += 1
                    nursery.start_soon(self._handle, ops, buf)
                await trio.lowlevel.checkpoint()

    async def _handle(self, ops: Operations, buf: bytes) -> None:
        _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(buf)
        if unique & UNIQUE_RESEND:
            self.resent += 1
        body = memoryview(buf)[IN_HEADER.size :]
        handler = _HANDLERS.get(opcode)
        if handler is None:
            if opcode not in _NO_REPLY:
                self._reply(unique, error=errno.EROFS if opcode in _WRITES else errno.ENOSYS)
            return
        t0 = time.monotonic()
        self.inflight[unique] = (opcode, nodeid, t0)
        try:
            parts = await handler(ops, nodeid, body)
        except FuseError as exc:
            self._reply(unique, error=exc.errno)
        except Exception:  # a bug must cost one request, not the daemon
            log.exception("FUSE request %d on inode %d failed", opcode, nodeid)
            self._reply(unique, error=errno.EIO)
        else:
            self._reply(unique, *parts)
        finally:
            del self.inflight[unique]
            if (took := time.monotonic() - t0) >= SLOW_S:
                self.slow += 1
                log.warning("FUSE request %d on inode %d took %.1fs", opcode, nodeid, took)


def _entry(a: Attr) -> bytes:
    valid, nsec = _timeout(a.timeout)
    return ENTRY_OUT.pack(a.inode, 0, valid, valid, nsec, nsec) + a.pack()


async def _lookup(ops: Operations, nodeid: int, body: memoryview) -> list[bytes]:
    return [_entry(await ops.lookup(nodeid, bytes(body).split(b"\0", 1)[0]))]


async def _getattr(ops: Operations, nodeid: int, body: memoryview) -> list[bytes]:
    a = await ops.getattr(nodeid)
    valid, nsec = _timeout(a.timeout)
    return [ATTR_OUT.pack(valid, nsec, 0) + a.pack()]


async def _open(ops: Operations, nodeid: int, body: memoryview) -> list[bytes]:
    await ops.open(nodeid, struct.unpack_from("<I", body)[0])
    return [OPEN_OUT.pack(nodeid, FOPEN_KEEP_CACHE, 0)]  # keep_cache: every clone shares one page-cache copy


async def _opendir(ops: Operations, nodeid: int, body: memoryview) -> list[bytes]:
    if stat.S_ISDIR((await ops.getattr(nodeid)).mode):
        return [OPEN_OUT.pack(nodeid, 0, 0)]
    raise FuseError(errno.ENOTDIR)


async def _read(ops: Operations, nodeid: int, body: memoryview) -> list[bytes]:
    _, offset, size = READ_IN.unpack_from(body)
    return [await ops.read(nodeid, offset, size)]


async def _statfs(ops: Operations, nodeid: int, body: memoryview) -> list[bytes]:
    s = await ops.statfs()
    return [STATFS_OUT.pack(s.blocks, 0, 0, s.files, 0, s.block_size, s.name_max, s.block_size, 0)]


async def _readdir(ops: Operations, nodeid: int, body: memoryview) -> list[bytes]:
    _, offset, size = READ_IN.unpack_from(body)
    out = bytearray()
    for i, (name, a) in enumerate(await ops.readdir(nodeid, offset), offset + 1):
        entry = DIRENT.pack(a.inode, i, len(name), stat.S_IFMT(a.mode) >> 12) + name
        entry += bytes(-len(entry) % 8)
        if len(out) + len(entry) > size:
            break
        out += entry
    return [bytes(out)]


async def _ok(ops: Operations, nodeid: int, body: memoryview) -> list[bytes]:
    return []


_HANDLERS: dict[int, Callable[[Operations, int, memoryview], Awaitable[list[bytes]]]] = {
    LOOKUP: _lookup, GETATTR: _getattr, OPEN: _open, READ: _read, STATFS: _statfs,
    OPENDIR: _opendir, READDIR: _readdir, RELEASE: _ok, RELEASEDIR: _ok, FLUSH: _ok,
}
_NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT, DESTROY}  # the kernel expects no answer to these
_WRITES = {WRITE, SETATTR, CREATE, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, RENAME2, LINK, SYMLINK}


# ---- the connection: opened, mounted and initialised by the supervisor ---------------------


def answer_init(fd: int) -> None:
    """Read the kernel's INIT (sent when the mount is made) and answer it: the one request
    only the first daemon of a connection would see, so the supervisor answers it."""
    while True:
        buf = os.read(fd, READ_BUFFER)
        _, opcode, unique, *_ = IN_HEADER.unpack_from(buf)
        if opcode == INIT:
            break
        log.warning("FUSE request %d before INIT: answered ENOSYS", opcode)
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, -errno.ENOSYS, unique))
    major, minor, _, flags = INIT_IN.unpack_from(buf, IN_HEADER.size)
    if major != MAJOR:
        raise OSError(errno.EPROTO, f"the kernel speaks FUSE {major}.{minor}; memfs speaks {MAJOR}.x")
    want = flags & (ASYNC_READ | PARALLEL_DIROPS | FLAG_MAX_PAGES)
    # max_readahead 0: a clone's fault pulls only the page it touches (memfs reads ahead itself, by chunks)
    body = INIT_OUT.pack(MAJOR, min(minor, MINOR), 0, want, 0, 0, MAX_WRITE, 1, MAX_PAGES, 0, 0, 0)
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body)


def mount(mountpoint: Path, fsname: str) -> int:
    """Mount a FUSE filesystem at mountpoint; its /dev/fuse descriptor (inheritable).

    As root with mount(2), else through fusermount3, which hands the descriptor back over
    a socket, as libfuse does."""
    options = f"rootmode={stat.S_IFDIR:o},user_id={os.getuid()},group_id={os.getgid()},default_permissions"
    if os.geteuid() == 0:
        fd = os.open("/dev/fuse", os.O_RDWR)
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        ms_nosuid, ms_nodev = 2, 4
        if libc.mount(fsname.encode(), str(mountpoint).encode(), f"fuse.{fsname}".encode(),
                      ms_nosuid | ms_nodev, f"fd={fd},{options}".encode()) != 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise OSError(code, f"mounting {mountpoint}: {os.strerror(code)}")
        os.set_inheritable(fd, True)
        return fd
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        proc = subprocess.run(
            ["fusermount3", "-o", f"fsname={fsname},subtype={fsname},default_permissions", "--", str(mountpoint)],
            env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}, pass_fds=[theirs.fileno()],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise OSError(errno.EPERM, f"fusermount3 could not mount {mountpoint}: {proc.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EIO, f"fusermount3 mounted {mountpoint} but sent no descriptor")
    os.set_inheritable(fds[0], True)
    return fds[0]


def unmount(mountpoint: Path, lazy: bool = False) -> bool:
    """Unmount; lazy detaches it even while files on it are open. False if it was busy."""
    with contextlib.suppress(FileNotFoundError):
        result = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)],
                                capture_output=True, check=False)
        return result.returncode == 0
    return False


def connection_of(mountpoint: Path) -> str | None:
    """The mount's FUSE connection number (its device minor), from /proc/self/mountinfo:
    stat() on the mount would wait for a daemon."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == str(mountpoint.absolute()):
                return fields[2].split(":")[1]
    return None


def abort(connection: str | int) -> bool:
    """End a FUSE connection through fusectl (mounted for the purpose, and unmounted after, if it
    was not): every request waiting on it fails instead of waiting for ever. False if it could not."""
    control = Path("/sys/fs/fuse/connections")
    mounted = not (control / str(connection)).exists() and subprocess.run(
        ["mount", "-t", "fusectl", "fusectl", str(control)], capture_output=True, check=False).returncode == 0
    try:
        (control / str(connection) / "abort").write_text("1")
        return True
    except OSError as exc:
        log.warning("could not abort FUSE connection %s: %s", connection, exc)
        return False
    finally:
        if mounted:  # ours: not left behind
            subprocess.run(["umount", str(control)], capture_output=True, check=False)
