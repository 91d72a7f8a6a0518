"""MemfsMount: the agent's handle on this host's memfs daemon.

One owner: it starts the daemon (own session, so clones keep their memory
if the agent dies), adopts a running one after an agent restart, talks to
its control socket, and stops it, unmounting, when no VM needs it. The
process it starts is memfs's supervisor, which holds the mount and starts
the serving daemon again if it dies (vmstream.memfs.daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmstream.errors import VmstreamError

START_TIMEOUT_S = 20.0


class MemfsError(VmstreamError):
    """memfs did not start, mount or answer: like AgentUnavailable, exit 7 and HTTP 503."""

    exit_code = 7
    http_status = 503


def is_mounted(path: Path) -> bool:
    target = str(path.absolute())
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


class MemfsMount:
    def __init__(self, data_dir: Path, store_spec: str, cache_bytes: int, peer_token: str | None = None,
                 read_ahead_chunks: int = 16) -> None:
        self.mountpoint = data_dir / "memfs"
        self.cache_dir = data_dir / "cache"
        self.control = data_dir / "memfs.sock"
        self.pid_file = data_dir / "memfs.pid"
        self.log_file = data_dir / "memfs.log"
        self.store_spec = store_spec
        self.cache_bytes = cache_bytes
        self.peer_token = peer_token  # handed to the daemon on its stdin, never on its command line
        self.read_ahead_chunks = read_ahead_chunks
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = asyncio.Lock()

    def pid(self) -> int | None:
        """The daemon's pid, if it runs and serves our mountpoint."""
        if self._popen is not None and self._popen.poll() is None:
            return self._popen.pid
        try:
            pid = int(self.pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid if b"vmstream.memfs.daemon" in cmdline and str(self.mountpoint).encode() in cmdline else None

    async def ensure(self) -> None:
        """Running and mounted, starting it if need be."""
        async with self._lock:
            if self.pid() is not None and is_mounted(self.mountpoint):
                return
            await asyncio.to_thread(self._unmount_stale)
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "ab") as log:
                self._popen = subprocess.Popen(
                    [sys.executable, "-m", "vmstream.memfs.daemon", "--mount", str(self.mountpoint),
                     "--store", self.store_spec, "--cache", str(self.cache_dir),
                     "--cache-bytes", str(self.cache_bytes), "--control", str(self.control),
                     "--read-ahead-chunks", str(self.read_ahead_chunks), "--token-stdin"],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            assert self._popen.stdin is not None
            self._popen.stdin.write(((self.peer_token or "") + "\n").encode())
            self._popen.stdin.close()
            self.pid_file.write_text(str(self._popen.pid))
            deadline = time.monotonic() + START_TIMEOUT_S
            while not (is_mounted(self.mountpoint) and _accepts(self.control)):
                if self._popen.poll() is not None:
                    tail = self.log_file.read_text(errors="replace").strip().splitlines()[-3:]
                    raise MemfsError(f"the memory filesystem (memfs) failed to start: {' / '.join(tail)}")
                if time.monotonic() > deadline:
                    raise MemfsError(f"memfs did not mount {self.mountpoint} within {START_TIMEOUT_S:.0f}s")
                await asyncio.sleep(0.02)

    def _unmount_stale(self) -> None:
        """A mount whose daemon died ('transport endpoint is not connected') blocks a new one."""
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """One control request. While memfs's supervisor starts another daemon after one
        died (tens of ms), the socket refuses: wait for it rather than fail a clone's start."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.control))
                break
            except OSError as exc:
                if time.monotonic() > deadline or self.pid() is None:
                    raise MemfsError(f"memfs is not answering on {self.control}: {exc}") from exc
                await asyncio.sleep(0.02)
        try:
            writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            if not line:  # its daemon died under the request; the supervisor starts another
                raise MemfsError(f"memfs closed {self.control} before it answered {cmd!r} (its daemon restarted?): try again")
            answer: dict[str, Any] = json.loads(line)
            return answer
        finally:
            writer.close()

    async def stop(self) -> None:
        """Unmount and end the daemon: politely, then by signal, then a lazy unmount."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(MemfsError, OSError, ValueError):
                await self.request("shutdown")
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                for _ in range(100):
                    if self._exited(pid):
                        break
                    await asyncio.sleep(0.05)
                if self._exited(pid):
                    break
        await asyncio.to_thread(self._unmount_stale)
        self.pid_file.unlink(missing_ok=True)
        self._popen = None

    def _exited(self, pid: int) -> bool:
        if self._popen is not None and self._popen.pid == pid:
            return self._popen.poll() is not None
        return main_thread_gone(pid)


def main_thread_gone(pid: int) -> bool:
    """Whether the process has exited or its main thread has (a zombie, maybe with threads that
    still finish): what memfs's supervisor and the agent take for a dead process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


def _accepts(path: Path) -> bool:
    """Whether a daemon listens on the unix socket path: the file alone is not enough (it exists
    from the daemon's bind, before its listen, and after a daemon died), and a request sent in
    between is refused (seen in CI: two clones on a new host, one refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def control_request(control: Path, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    """One request on memfs's control socket, blocking: for tools and tests (the agent's is async)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(control))
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise MemfsError(f"memfs closed {control} before it answered {cmd!r}")
            answer += chunk
    out: dict[str, Any] = json.loads(answer)
    return out
