"""Bounded retries with backoff for transient backend failures.

Only BackendUnavailable is retried: a missing key, a refused token or a corrupt
chunk will not change by asking again. When the attempts or the time run out,
the caller gets StoreUnavailable naming the backend, the operation and the key.
The policy is a value passed to the store, so tests inject a fast one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from vmstream.store.backend import Backend, ObjectInfo
from vmstream.store.errors import BackendUnavailable, StoreUnavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # in total, the first try included
    initial_delay: float = 0.1
    max_delay: float = 2.0
    deadline: float = 20.0  # no new attempt starts after this many seconds
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    # Called before each retry with (attempt number that failed, its error); for logs and tests.
    on_retry: Callable[[int, BackendUnavailable], None] | None = field(default=None, compare=False)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        delay = self.initial_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except BackendUnavailable as exc:
                elapsed = time.monotonic() - start
                wait = min(delay, self.max_delay) * random.uniform(0.5, 1.0)  # jitter spreads out clients
                if attempt == self.attempts or elapsed + wait > self.deadline:
                    # exc names the backend and the key already; `what` is for the rare error that does not.
                    context = "" if str(exc).startswith(what.partition(":")[0]) else f"{what}: "
                    raise StoreUnavailable(
                        f"{context}{exc} (gave up after {attempt} attempt(s) over {elapsed:.1f}s); "
                        "check that the store is reachable and retry"
                    ) from exc
                if self.on_retry:
                    self.on_retry(attempt, exc)
                self.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable: attempts must be >= 1")


class RetryingBackend(Backend):
    """Wraps a backend so every call retries transient failures under a policy."""

    def __init__(self, inner: Backend, policy: RetryPolicy) -> None:
        self.inner = inner
        self.policy = policy
        self.name = inner.name

    def put(self, key: str, data: bytes) -> None:
        self.policy.call(f"{self.name}: put '{key}'", lambda: self.inner.put(key, data))

    def get(self, key: str, offset: int = 0, size: int | None = None) -> bytes:
        return self.policy.call(f"{self.name}: get '{key}'", lambda: self.inner.get(key, offset, size))

    def exists(self, key: str) -> bool:
        return self.policy.call(f"{self.name}: exists '{key}'", lambda: self.inner.exists(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Listed whole, so a retry never yields a key twice.
        return iter(self.policy.call(f"{self.name}: list '{prefix}'", lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self.policy.call(f"{self.name}: delete '{key}'", lambda: self.inner.delete(key))

    def stream(self, key: str, piece: int = 1 << 20) -> Iterator[bytes]:
        """Not retried: a reader that loses a stream falls back to ranged reads, which are."""
        return self.inner.stream(key, piece)

    def close(self) -> None:
        self.inner.close()
