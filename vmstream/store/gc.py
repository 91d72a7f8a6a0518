"""Garbage collection: mark packs from committed chunk maps, then sweep the rest.

Mark: every refs/<name> in the store (the committed chunk maps) plus the maps the
caller passes (e.g. images on their way to a commit) are roots; a pack is live if
any root points into it. Sweep works on whole packs: a pack goes only when no root
uses any chunk in it. Packs that mix live and dead chunks are kept whole (reported
as dead_bytes_in_live_packs; repacking them is left for later).

Safety against writers that run at the same time, without a lock:
- A pack younger than `grace` is never touched: it may belong to a writer that
  has written packs but not yet its ref.
- An unreferenced pack is first condemned (gc/condemned/<pack>) and deleted only by
  a later run at least `grace` after that, if still unreferenced then; if a root
  uses it again by then, the mark is removed (rescued).
- Writers do not reuse chunks in condemned packs, and ChunkStore.commit refuses a
  map that uses a condemned or missing pack. So a ref that is written has either
  been checked after the condemnation (refused) or exists before the deleting run
  marks (rescued), provided one commit (its check and its ref write) takes less
  than `grace`.
Deletion order is index, pack, then the condemned mark, so an interrupted run is
finished by the next one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from vmstream.store.chunkmap import ChunkMap
from vmstream.store.errors import ObjectNotFound
from vmstream.store.store import CONDEMNED, INDEX, PACKS, ChunkStore

DEFAULT_GRACE = 3600.0


@dataclass
class GcReport:
    roots: int = 0
    packs: int = 0
    live_packs: int = 0
    young_packs: int = 0  # unreferenced but within the grace period
    condemned: int = 0  # newly condemned by this run
    deleted: int = 0
    rescued: int = 0
    deleted_bytes: int = 0
    dead_bytes_in_live_packs: int = 0


def collect_garbage(
    store: ChunkStore,
    live_chunk_maps: Iterable[ChunkMap] = (),
    *,
    grace: float = DEFAULT_GRACE,
    now: float | None = None,
) -> GcReport:
    """Delete packs no committed ref (nor any of live_chunk_maps) uses, in two runs `grace` apart."""
    backend = store.backend
    now = time.time() if now is None else now
    report = GcReport()
    # List objects before reading roots: a pack written after this listing is not swept.
    packs = {o.key[len(PACKS) :]: o for o in backend.list(PACKS)}
    indexes = {o.key[len(INDEX) :]: o for o in backend.list(INDEX)}
    marks = {o.key[len(CONDEMNED) :]: o for o in backend.list(CONDEMNED)}

    live: dict[str, set[tuple[int, int]]] = {}  # pack -> (offset, length) of chunks in use
    roots = list(live_chunk_maps)
    for name in store.list_refs():
        try:
            roots.append(store.get_ref(name))
        except ObjectNotFound:
            continue  # deleted since the listing: no longer a root
    report.roots = len(roots)
    for chunk_map in roots:
        for c in chunk_map.stored():
            live.setdefault(c.pack, set()).add((c.offset, c.length))

    report.packs = len(packs)
    for pack, info in packs.items():
        if pack in live:
            report.live_packs += 1
            report.dead_bytes_in_live_packs += info.size - sum(length for _, length in live[pack])
            if pack in marks:
                backend.delete(CONDEMNED + pack)
                report.rescued += 1
            continue
        if now - info.mtime < grace:
            report.young_packs += 1
            continue
        mark = marks.get(pack)
        if mark is None:
            backend.put(CONDEMNED + pack, f"{now}\n".encode())
            report.condemned += 1
        elif now - mark.mtime >= grace:
            backend.delete(INDEX + pack)
            backend.delete(PACKS + pack)
            backend.delete(CONDEMNED + pack)
            report.deleted += 1
            report.deleted_bytes += info.size

    # Leftovers of interrupted runs: indexes and marks whose pack is gone (old ones only,
    # since a writer puts the pack before the index).
    for pack, info in indexes.items():
        if pack not in packs and now - info.mtime >= grace:
            backend.delete(INDEX + pack)
    for pack in marks.keys() - packs.keys():
        backend.delete(CONDEMNED + pack)
    return report
