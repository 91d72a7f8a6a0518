"""Content-addressed chunk store: the bottom layer, under image and memfs.

Files (memory and disk layers) are cut into fixed-size chunks named by blake3,
zstd-compressed where that pays, zero chunks not stored; new chunks go into packs
with an index; a ref (the ChunkMap) is written last as the commit point. Reads
fetch one chunk by (pack, offset, length) and verify it. Backends: a local
directory, S3, or a peer host's agent. See docs/store.md.
"""

from vmstream.store.backend import Backend, ObjectInfo
from vmstream.store.chunkmap import ChunkMap, ChunkRef
from vmstream.store.errors import (
    BackendUnavailable,
    CorruptChunk,
    InvalidKey,
    ObjectNotFound,
    StoreConflict,
    StoreError,
    StoreUnavailable,
)
from vmstream.store.gc import DEFAULT_GRACE, GcReport, collect_garbage
from vmstream.store.local import LocalBackend
from vmstream.store.peer import PeerBackend, peer_router
from vmstream.store.retry import RetryingBackend, RetryPolicy
from vmstream.store.s3 import S3Backend
from vmstream.store.store import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, ChunkStore

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_GRACE",
    "DEFAULT_PACK_SIZE",
    "Backend",
    "BackendUnavailable",
    "ChunkMap",
    "ChunkRef",
    "ChunkStore",
    "CorruptChunk",
    "GcReport",
    "InvalidKey",
    "LocalBackend",
    "ObjectInfo",
    "ObjectNotFound",
    "PeerBackend",
    "RetryPolicy",
    "RetryingBackend",
    "S3Backend",
    "StoreConflict",
    "StoreError",
    "StoreUnavailable",
    "collect_garbage",
    "peer_router",
]
