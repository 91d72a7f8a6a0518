"""A peer's bulk reads by sendfile: object ranges go from the page cache to the socket
without a copy through Python objects.

The peer router runs under uvicorn, which hands an app no socket, so a range it serves is
read into a bytes object and written again. BulkServer is a small threaded HTTP/1.1 server
beside the agent's API, on a loopback port of its own, that serves

    GET /objects/{key}     the object, or one "Range: bytes=a-b" of it (206)

for a LocalBackend's files with `socket.sendfile`, behind the agent's bearer token. The
agent's peer router names its port (GET /v1/store/bulk); PeerBackend reads ranges and
streams there when a peer has one, and through the router otherwise. Like the router it does
not verify chunks: the reading host does. Errors are {"error", "message"} as the router's.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from vmstream.errors import VmstreamError
from vmstream.store.backend import check_key, parse_range
from vmstream.store.local import LocalBackend

log = logging.getLogger("vmstream.store.bulk")
IDLE_S = 120.0  # a kept-alive connection nobody uses for this long is closed (its thread ends)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection's thread never holds the agent's exit
    block_on_close = False
    backend: LocalBackend
    token: str


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: memfs's lanes read range after range on one connection
    server: _Server
    timeout = IDLE_S

    def setup(self) -> None:
        super().setup()
        # headers and body go in separate writes: without this the body's last segment can
        # wait for the delayed ACK of the headers
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # the base class's name
        """Quiet: a cold host reads thousands of ranges."""

    def _error(self, status: int, error: str, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": error, "message": message}).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._error(405, "InvalidInput", "the bulk server answers GET only: ask the agent's /v1/store routes")

    def do_GET(self) -> None:
        if not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {self.server.token}"):
            self._error(401, "Unauthorized", "missing or wrong agent token")
            return
        if not self.path.startswith("/objects/"):
            self._error(404, "NotFound", f"no route {self.path}: GET /objects/KEY")
            return
        key = unquote(self.path[len("/objects/"):])
        try:
            path = self.server.backend.root / check_key(key)
        except VmstreamError as exc:
            self._error(exc.http_status, type(exc).__name__, str(exc))
            return
        try:
            f = open(path, "rb")  # closed below, after sendfile
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self._error(404, "ObjectNotFound", f"{self.server.backend.name}: no object '{key}'")
            return
        except OSError as exc:
            self._error(503, "BackendUnavailable", f"{self.server.backend.name}: get '{key}' failed: {exc.strerror or exc}")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            start, end, status = 0, size, 200
            header = self.headers.get("Range")
            if header is not None:
                wanted = parse_range(header)
                if wanted is None:
                    self._error(416, "InvalidInput", f"unsupported Range '{header}': use bytes=a-b")
                    return
                start = wanted[0]
                end = size if wanted[1] is None else min(size, start + wanted[1])
                if start >= size:
                    self._error(416, "InvalidInput", f"range starts at {start}, past the object's {size} bytes",
                                {"Content-Range": f"bytes */{size}"})
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            self.connection.sendfile(f, start, end - start)


class BulkServer:
    """The sendfile server of one agent's local store; start() returns its port."""

    def __init__(self, backend: LocalBackend, token: str, host: str = "127.0.0.1") -> None:
        self.backend, self.token, self.host = backend, token, host
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server is not None else None

    def start(self) -> int:
        server = _Server((self.host, 0), _Handler)
        server.backend, server.token = self.backend, self.token
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="store bulk server", daemon=True)
        self._thread.start()
        port = server.server_address[1]
        log.info("bulk reads of %s by sendfile on %s:%d", self.backend.name, self.host, port)
        return int(port)

    def close(self) -> None:
        """Stop accepting; connections being served end with their request (daemon threads)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
