"""A client that keeps asking a VM's web server while the VM moves.

Two streams run in threads inside the client's network namespace: one
HTTP/1.1 connection kept alive for every request, and one new connection
per request. Each records when every answer arrived, so the largest gap in
the answers, the failed requests and the reset connections can be read
afterwards.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vmstream.net.links import in_netns_if


@dataclass
class StreamStats:
    name: str
    requests: int = 0
    failed_requests: int = 0
    reset_connections: int = 0
    max_gap_ms: float = 0.0
    max_gap_at: float = 0.0  # monotonic time the largest gap ended
    errors: list[str] = field(default_factory=list)


@dataclass
class ClientStats:
    requests: int
    failed_requests: int
    reset_connections: int
    client_gap_ms: float  # the largest gap between two answers in any one stream
    streams: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP response (headers + Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed before a full answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed inside the body")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        raise ConnectionError(f"not a 200 answer: {head[:40]!r}")
    return body


class LoadClient:
    """Start with start(), read figures with stop(); a context manager too."""

    def __init__(self, ip: str, netns: str | None, port: int = 80, interval_s: float = 0.005,
                 timeout_s: float = 10.0) -> None:
        self.ip, self.netns, self.port = ip, netns, port
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stats = {"keepalive": StreamStats("keepalive"), "new_connections": StreamStats("new_connections")}
        self.answers: dict[str, list[float]] = {name: [] for name in self.stats}  # monotonic times

    def __enter__(self) -> LoadClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, args=(self.stats["keepalive"], True), daemon=True),
            threading.Thread(target=self._run, args=(self.stats["new_connections"], False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _connect(self) -> socket.socket:
        with in_netns_if(self.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect((self.ip, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _run(self, st: StreamStats, keepalive: bool) -> None:
        request = (b"GET /status.json HTTP/1.1\r\nHost: vm\r\n\r\n" if keepalive
                   else b"GET /status.json HTTP/1.1\r\nHost: vm\r\nConnection: close\r\n\r\n")
        sock: socket.socket | None = None
        last = time.monotonic()
        while not self._stop.is_set():
            try:
                if sock is None:
                    sock = self._connect()
                sock.sendall(request)
                _read_response(sock)
                st.requests += 1
                now = time.monotonic()
                self.answers[st.name].append(now)
                if (now - last) * 1000 > st.max_gap_ms:
                    st.max_gap_ms, st.max_gap_at = (now - last) * 1000, now
                last = now
                if not keepalive:
                    sock.close()
                    sock = None
            except OSError as exc:
                st.failed_requests += 1
                if isinstance(exc, ConnectionResetError) or "reset" in str(exc).lower():
                    st.reset_connections += 1
                if len(st.errors) < 20:
                    st.errors.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                    sock = None
            self._stop.wait(self.interval_s)
        if sock is not None:
            sock.close()
        now = time.monotonic()  # a stream that stopped answering counts up to the end
        if (now - last) * 1000 > st.max_gap_ms:
            st.max_gap_ms, st.max_gap_at = (now - last) * 1000, now

    def gap_around(self, t: float) -> dict[str, tuple[float, float]]:
        """Per stream: (last answer before t, first answer after t), relative to t in ms."""
        out = {}
        for name, times in self.answers.items():
            before = [x for x in times if x <= t]
            after = [x for x in times if x > t]
            out[name] = (round((before[-1] - t) * 1000, 1) if before else float("nan"),
                         round((after[0] - t) * 1000, 1) if after else float("nan"))
        return out

    def reset_gaps(self) -> None:
        """Forget the gaps so far (e.g. those of the VM's warm-up)."""
        for st in self.stats.values():
            st.max_gap_ms = 0.0

    def stop(self) -> ClientStats:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)
        return self.snapshot()

    def snapshot(self) -> ClientStats:
        """Figures so far (a running stream's current wait counts only once stop() ends it)."""
        sts = list(self.stats.values())
        return ClientStats(
            requests=sum(s.requests for s in sts), failed_requests=sum(s.failed_requests for s in sts),
            reset_connections=sum(s.reset_connections for s in sts),
            client_gap_ms=round(max(s.max_gap_ms for s in sts), 2),
            streams={s.name: asdict(s) for s in sts},
        )
