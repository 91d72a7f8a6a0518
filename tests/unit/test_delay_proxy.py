"""The bench's delaying proxy: bytes pass intact both ways, and never before their delay."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from vmstream.bench.delay import DelayProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def _round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += s.recv(1 << 16)
        return got, time.monotonic() - t0


def test_bytes_pass_intact_and_late(echo_port: int) -> None:
    payload = os.urandom(1 << 20)
    with DelayProxy(echo_port) as proxy:
        got, _ = _round_trip(proxy.port, payload)
        assert got == payload
        proxy.rtt_ms = 40
        got, took = _round_trip(proxy.port, payload)
        assert got == payload
        # a lower bound the proxy enforces (handshake + a round trip), not a measurement
        assert took >= 0.040, took
