"""A real HAProxy (Debian's) in front of real HTTP servers on loopback: members added,
drained while a request is in flight, removed; bad input refused; nothing left behind."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from vmstream.lb import Balancer, HaproxyError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def member(name: str) -> Iterator[int]:
    """An HTTP server answering its name; /slow takes 1.5 s."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow":
                time.sleep(1.5)
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Balancer]:
    lb = Balancer("g1", tmp_path / "lb", _free_port())
    lb.start()
    try:
        yield lb
    finally:
        lb.stop()
    assert lb.pid() is None and not lb.socket.exists()


def _wait_up(lb: Balancer, *names: str) -> None:
    deadline = time.monotonic() + 10
    while not all((m := lb.members().get(n)) is not None and m.status == "UP" for n in names):
        assert time.monotonic() < deadline, lb.members()
        time.sleep(0.05)


def test_members_come_and_go_without_a_failed_request(balancer: Balancer) -> None:
    url = f"http://127.0.0.1:{balancer.port}"
    with member("a") as pa, member("b") as pb:
        balancer.add("a", "127.0.0.1", pa)
        balancer.add("b", "127.0.0.1", pb)
        _wait_up(balancer, "a", "b")
        served = {httpx.get(url + "/", timeout=10).text for _ in range(20)}
        assert served == {"a", "b"}
        slow: dict[str, httpx.Response] = {}
        # a request in flight on a member that leaves finishes; new ones go to the other
        threads = [threading.Thread(target=lambda k=k: slow.__setitem__(k, httpx.get(url + "/slow", timeout=30))) for k in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        busy = [n for n, m in balancer.members().items() if m.current]
        assert busy, balancer.members()
        leaving = busy[0]
        remover = threading.Thread(target=balancer.remove, args=(leaving,))
        remover.start()
        time.sleep(0.2)
        during = {httpx.get(url + "/", timeout=10).text for _ in range(10)}
        remover.join()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in slow.values()), slow
        assert during == {"a", "b"} - {leaving}
        assert leaving not in balancer.members()
        assert balancer.members()[({"a", "b"} - {leaving}).pop()].total >= 10


def test_bad_input_is_refused_and_leaves_nothing(balancer: Balancer, tmp_path: Path) -> None:
    with pytest.raises(HaproxyError, match="not allowed"):
        balancer.add("bad/name", "127.0.0.1", 80)
    with pytest.raises(HaproxyError, match="not allowed"):
        Balancer("no spaces", tmp_path / "x", _free_port())
    taken = Balancer("g2", tmp_path / "lb2", balancer.port)  # its port is the first one's
    try:
        with pytest.raises(HaproxyError, match=r"exited at start \(port \d+ in use\?\)"):
            taken.start()
    finally:
        taken.stop()  # had it started, it is ended here
    assert taken.pid() is None and not taken.pid_file.exists()
    with member("a") as pa:
        balancer.add("a", "127.0.0.1", pa)
        with pytest.raises(HaproxyError, match="did not add member 'a'"):
            balancer.add("a", "127.0.0.1", pa)  # the same name twice
