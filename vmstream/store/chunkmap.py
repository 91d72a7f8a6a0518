"""ChunkMap: one file (a memory or disk layer) as a list of chunks in the store.

It is the value a live-image manifest embeds or points to. Chunk i covers bytes
[i * chunk_size, min((i + 1) * chunk_size, size)); None means all zeros and
nothing stored. A ChunkRef says where the chunk's stored form lies, so a reader
needs no index lookup: one ranged read of (pack, offset, length).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChunkRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=r"^[0-9a-f]{64}$")  # blake3 of the uncompressed content
    pack: str  # object packs/<pack>
    offset: int = Field(ge=0)  # of the stored form (marker byte + payload) in the pack
    length: int = Field(gt=0)


class ChunkMap(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: Literal[1] = 1
    size: int = Field(ge=0)
    chunk_size: int = Field(gt=0)
    chunks: list[ChunkRef | None]

    @model_validator(mode="after")
    def _chunk_count(self) -> ChunkMap:
        want = -(-self.size // self.chunk_size)
        if len(self.chunks) != want:
            raise ValueError(f"a {self.size}-byte file in {self.chunk_size}-byte chunks has {want} chunks, not {len(self.chunks)}")
        return self

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def stored(self) -> Iterator[ChunkRef]:
        """The non-zero chunks, in file order (repeats included)."""
        return (c for c in self.chunks if c is not None)

    @property
    def packs(self) -> set[str]:
        return {c.pack for c in self.stored()}

    @property
    def nonzero_bytes(self) -> int:
        return sum(self.chunk_length(i) for i, c in enumerate(self.chunks) if c is not None)
