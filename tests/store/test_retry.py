"""A store that is down: bounded retries, then a clear error; never wrong or zero bytes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store.conftest import PEER_TOKEN, S3_CREDENTIALS, free_port, peer_app, serve
from vmstream.store import (
    Backend,
    BackendUnavailable,
    ChunkStore,
    LocalBackend,
    ObjectInfo,
    ObjectNotFound,
    PeerBackend,
    RetryPolicy,
    S3Backend,
    StoreUnavailable,
)


class Recorder:
    """A RetryPolicy sleep that records instead of sleeping, so tests stay fast."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)


class Flaky(Backend):
    """Fails the first `failures` gets with a transient error, then behaves."""

    def __init__(self, inner: Backend, failures: int) -> None:
        self.inner, self.failures, self.calls, self.name = inner, failures, 0, "flaky"

    def get(self, key: str, offset: int = 0, size: int | None = None) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise BackendUnavailable(f"flaky: get '{key}' failed: simulated outage")
        return self.inner.get(key, offset, size)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there


@pytest.mark.parametrize("kind", ["peer", "s3"])
def test_unreachable_store_retries_then_names_backend_and_key(kind: str) -> None:
    url = closed_port_url()
    backend: Backend = PeerBackend(url, PEER_TOKEN) if kind == "peer" else S3Backend("b", endpoint_url=url, **S3_CREDENTIALS)
    sleep = Recorder()
    store = ChunkStore(backend, retry=RetryPolicy(attempts=4, initial_delay=0.1, sleep=sleep))
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as exc:
        store.get_ref("img")
    msg = str(exc.value)
    assert "after 4 attempt(s)" in msg and "refs/img" in msg and url.removeprefix("http://") in msg
    assert len(sleep.sleeps) == 3
    assert all(a < b for a, b in zip(sleep.sleeps, [0.11, 0.21, 0.41], strict=True))  # backoff, with jitter below the cap
    assert time.monotonic() - start < 10
    store.close()


def test_server_going_down_mid_use(tmp_path: Path) -> None:
    """Reads succeed while the peer is up; once it stops, reads fail clearly instead of returning zeros."""
    served = LocalBackend(tmp_path / "served")
    content = os.urandom(1 << 20)
    (tmp_path / "f").write_bytes(content)
    cmap = ChunkStore(served).store_file(tmp_path / "f", ref="f")
    sleep = Recorder()
    with serve(peer_app(served, writable=False)) as url:
        remote = ChunkStore(PeerBackend(url + "/v1/store", PEER_TOKEN), retry=RetryPolicy(attempts=3, sleep=sleep))
        assert remote.read_range(cmap, 0, cmap.size) == content
    with pytest.raises(StoreUnavailable, match="after 3 attempt"):
        remote.read_range(cmap, 0, 4096)
    assert len(sleep.sleeps) == 2
    remote.close()


def test_transient_failures_are_ridden_out(tmp_path: Path) -> None:
    local = LocalBackend(tmp_path / "s")
    content = os.urandom(300_000)
    (tmp_path / "f").write_bytes(content)
    cmap = ChunkStore(local).store_file(tmp_path / "f")
    flaky = Flaky(local, failures=2)
    retries: list[int] = []
    policy = RetryPolicy(attempts=3, sleep=Recorder(), on_retry=lambda n, _: retries.append(n))
    store = ChunkStore(flaky, retry=policy, workers=1)
    assert store.read_range(cmap, 0, cmap.size) == content
    assert retries == [1, 2]


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    sleep = Recorder()
    store = ChunkStore(LocalBackend(tmp_path), retry=RetryPolicy(sleep=sleep))
    with pytest.raises(ObjectNotFound, match="refs/missing"):
        store.get_ref("missing")
    assert sleep.sleeps == []


def test_deadline_bounds_the_time_spent(tmp_path: Path) -> None:
    flaky = Flaky(LocalBackend(tmp_path), failures=10**6)
    policy = RetryPolicy(attempts=100, initial_delay=0.05, max_delay=0.05, deadline=0.3)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="flaky: get 'x'"):
        ChunkStore(flaky, retry=policy).backend.get("x")
    assert time.monotonic() - start < 1.0
    assert flaky.calls < 100
