"""The backend interface: a flat namespace of immutable objects (after borgstore).

A backend knows nothing about chunks or packs; it stores bytes under keys.
Keys are relative paths of the characters [A-Za-z0-9._-] joined by '/',
never starting with '.' in any part (hidden names are the backends' temp files).

Semantics every backend must meet (tests/store/test_conformance.py checks them):
- put(key, data) is atomic: readers see the whole object or nothing, never a prefix.
  Overwriting replaces the object whole.
- get(key, offset, size) returns data[offset:offset+size] of the object, like a
  slice (b"" past the end); ObjectNotFound if the key is absent.
- exists(key), list(prefix) (every key starting with prefix, sorted, with size and
  modification time), delete(key) (absent keys are fine: deletion is idempotent).
- A failure that may pass (timeout, refused connection, 5xx, EIO) raises
  BackendUnavailable; the store retries it. Anything else is a StoreError.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from vmstream.errors import InvalidInput
from vmstream.store.errors import InvalidKey

_KEY_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def check_key(key: str) -> str:
    """Reject keys that could escape a directory or collide with temp files."""
    if not key or len(key) > 512 or not all(_KEY_PART.match(part) for part in key.split("/")):
        raise InvalidKey(f"'{key}' is not a valid store key: use parts of [A-Za-z0-9._-] joined by '/', none starting with '.'")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch, as the backend records it (GC ages objects by it)


class Backend(ABC):
    """Where objects live. Implementations: LocalBackend, S3Backend, PeerBackend."""

    #: Shown in errors, e.g. "local:/srv/store" or "s3://bucket/prefix".
    name: str = "backend"

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, key: str, offset: int = 0, size: int | None = None) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def stream(self, key: str, piece: int = 1 << 20) -> Iterator[bytes]:
        """The object from its start, a piece at a time, so a reader can use its head while
        the rest is on its way. This default makes one ranged get per piece; a backend
        that can send an object in one streamed request overrides it."""
        offset = 0
        while data := self.get(key, offset, piece):
            yield data
            offset += len(data)
            if len(data) < piece:
                return

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections; the backend must not be used afterwards."""

    def __str__(self) -> str:
        return self.name


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def parse_range(header: str) -> tuple[int, int | None] | None:
    """An HTTP "Range: bytes=a-b" or "bytes=a-" as (offset, size or None); None for any other
    form (suffix ranges, several ranges, b < a), which the peer servers answer with 416."""
    m = _RANGE.match(header.strip())
    if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
        return None
    start = int(m.group(1))
    return start, (int(m.group(2)) - start + 1 if m.group(2) else None)


def check_range(offset: int, size: int | None) -> None:
    if offset < 0 or (size is not None and size < 0):
        raise InvalidInput(f"invalid range: offset {offset}, size {size}; both must be >= 0")
