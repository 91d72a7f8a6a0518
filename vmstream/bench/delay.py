"""A TCP proxy on loopback that adds a round-trip time, for benches between hosts.

The kernel here has no netem qdisc, so latency between two hosts on one machine
is made in user space: every byte is held rtt/2 on its way in each direction,
and a new connection waits one round trip before its first byte (the TCP
handshake). Bandwidth is not limited: segments are released on time, not paced.
The delay can be changed between runs (set `rtt_ms`), so one pair of hosts is
measured at several latencies in one interleaved bench.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import threading
from typing import Any


class DelayProxy:
    def __init__(self, target_port: int, rtt_ms: float = 0.0, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.rtt_ms = rtt_ms
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def __enter__(self) -> DelayProxy:
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError("the delaying proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, sock=sock))
            self._ready.set()
            loop.run_forever()
        finally:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            loop.close()
            self._ready.set()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_w: asyncio.StreamWriter | None = None
        try:
            await asyncio.sleep(self.rtt_ms / 1000)  # the handshake's round trip
            up_r, up_w = await asyncio.open_connection(*self.target)
            for w in (client_w, up_w):
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w), return_exceptions=True)
        except OSError:
            pass
        finally:
            client_w.close()
            if up_w is not None:
                up_w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Bytes from reader to writer, each held rtt/2 after it arrived."""
        loop = asyncio.get_running_loop()
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        arrived = asyncio.Event()
        done = False

        async def receive() -> None:
            nonlocal done
            try:
                while data := await reader.read(1 << 20):
                    queue.append((loop.time() + self.rtt_ms / 2000, data))
                    arrived.set()
            finally:
                done = True
                arrived.set()

        receiver = asyncio.ensure_future(receive())
        try:
            while True:
                while not queue:
                    if done:
                        return
                    arrived.clear()
                    await arrived.wait()
                due, data = queue.popleft()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        finally:
            receiver.cancel()
            with contextlib.suppress(Exception):
                writer.write_eof()
