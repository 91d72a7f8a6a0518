"""Fixtures: one backend of each kind, against real servers on loopback.

- s3: moto's S3-compatible server, started once per session as a subprocess on
  127.0.0.1 and a free port, stopped by its pid at teardown; one bucket per test.
- peer: uvicorn in a thread on 127.0.0.1 serving a LocalBackend through
  peer_router behind a bearer-token check, like the host agent will; one per test.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException

from vmstream.store import Backend, ChunkStore, LocalBackend, PeerBackend, RetryPolicy, S3Backend, peer_router
from vmstream.store.bulk import BulkServer

S3_CREDENTIALS: dict[str, Any] = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
PEER_TOKEN = "peer-test-token"
FAST_RETRY = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.05, deadline=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server on loopback, ours alone."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                httpx.get(url + "/", timeout=1)
                break
            if time.monotonic() > deadline:
                pytest.fail(f"moto server did not answer on {url} within 30 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_bucket(endpoint: str) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=endpoint, **S3_CREDENTIALS)
    client.create_bucket(Bucket=name)
    client.close()
    return name


def peer_app(backend: Backend | ChunkStore, token: str = PEER_TOKEN, writable: bool = True,
             bulk: BulkServer | None = None) -> FastAPI:
    """An app shaped like the host agent's: the store router under /v1/store, bearer auth;
    with bulk, the router names that sendfile server as the agent's does."""
    app = FastAPI()

    def auth(authorization: str = Header("")) -> None:
        if not secrets.compare_digest(authorization, f"Bearer {token}"):
            raise HTTPException(401, "missing or wrong agent token")

    app.include_router(peer_router(backend, auth, writable=writable, bulk_port=lambda: bulk.port if bulk else None),
                       prefix="/v1/store")
    return app


@contextlib.contextmanager
def bulk_server(backend: LocalBackend, token: str = PEER_TOKEN) -> Iterator[BulkServer]:
    server = BulkServer(backend, token)
    server.start()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run app under uvicorn on a loopback socket in a thread; yields the base URL."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the agent does
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def peer_url(tmp_path: Path) -> Iterator[tuple[str, LocalBackend]]:
    """A peer serving a fresh local store (writable, so the full suite applies) as the agent
    does, reads by sendfile included; yields its URL and that store."""
    served = LocalBackend(tmp_path / "peer-store")
    with bulk_server(served) as bulk, serve(peer_app(served, bulk=bulk)) as url:
        yield url + "/v1/store", served


@pytest.fixture(params=["local", "s3", "peer"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh, empty backend of each kind."""
    b: Backend
    if request.param == "local":
        b = LocalBackend(tmp_path / "store")
    elif request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        b = S3Backend(make_bucket(endpoint), prefix="vmstream", endpoint_url=endpoint, **S3_CREDENTIALS)
    else:
        url, _ = request.getfixturevalue("peer_url")
        b = PeerBackend(url, PEER_TOKEN)
    yield b
    b.close()
