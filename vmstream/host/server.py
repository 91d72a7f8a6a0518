"""Running the agent: one per data dir, on a loopback port it picks itself.

It writes agent.json (pid, port) once it listens, keeps a token in
agent.token (mode 0600), and holds agent.lock for its whole life so a
second agent on the same data dir refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import time
import tracemalloc

import uvicorn

from vmstream.config import agent_token, private_dir
from vmstream.errors import Conflict
from vmstream.host.api import create_app
from vmstream.host.manager import HostManager
from vmstream.settings import Settings

M_MMAP_THRESHOLD = -3  # glibc mallopt


def run_agent(settings: Settings, port: int = 0) -> None:
    # A fixed threshold: blocks of 128 KiB or more (migration pages, device state) always come
    # from mmap and go back to the kernel when freed. glibc's default raises the threshold after
    # each such free, so later ones stay in the heap and the agent's RSS only grew (bench soak:
    # 145 -> 172 MiB over 40 moves by default, 118 -> 133 MiB with the threshold fixed).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)
    data_dir = private_dir(settings.home)
    os.umask(0o077)  # what the agent, memfs and QEMU make in it is their owner's alone too
    # the operation log: stderr, which the CLI points at agent.log when it starts the agent
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to peers (a group's checks: every second)
    lock = open(data_dir / "agent.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Conflict(f"another vmstream agent is already running for {data_dir}") from None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it, a kept-alive client waits ~40 ms
    # per answer (Nagle holding the body for the delayed ACK of the headers).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    info_file = data_dir / "agent.json"
    server: uvicorn.Server | None = None

    def request_exit() -> None:
        assert server is not None
        server.should_exit = True

    if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=N: each SIGUSR2 writes where the agent's memory went
        signal.signal(signal.SIGUSR2, lambda *_: tracemalloc.take_snapshot().dump(str(data_dir / f"tracemalloc-{time.time():.0f}.snap")))
    manager = HostManager(settings)
    app = create_app(manager, agent_token(data_dir), request_exit)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    tmp = info_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": sock.getsockname()[1]}))
    os.replace(tmp, info_file)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        info_file.unlink(missing_ok=True)
        sock.close()
        lock.close()
