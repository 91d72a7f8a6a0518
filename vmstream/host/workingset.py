"""Working sets: the chunks an image's first clone touches early on, kept with the
root image, so a later cold start on another host prefetches them (REAP).

Two files: workingset.json (the chunk indexes in first-touch order) and, where the
host can write the store, workingset.pack: those chunks' stored forms back to back
in that order, one object that memfs streams in one request and pushes into the
page cache chunk by chunk as it arrives. The pack is put first and the profile
that names it last, so a profile never names a pack that is not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from vmstream.image import ImageRepository, LiveImage
from vmstream.memfs import memory_ref
from vmstream.memfs.mount import MemfsMount
from vmstream.store import ChunkStore, StoreError

log = logging.getLogger("vmstream.host")
WORKING_SET = "workingset.json"
WORKING_SET_PACK = "workingset.pack"
RECORD_S = 2.0  # how long after a clone answers its chunk touches are recorded


class WorkingSets:
    def __init__(self, images: ImageRepository, memfs: MemfsMount, store: ChunkStore) -> None:
        self.images = images
        self.memfs = memfs
        self.store = store
        self._recording: set[str] = set()

    async def prepare(self, image: LiveImage, prefetch: bool) -> bool:
        """Prefetch the image's recorded working set if the host lacks it; with no
        working set yet, start recording one. Returns True if recording."""
        root = image.memory_root or image.name
        root_image = self.images.get(root)
        profile = self.images.image_dir(root_image) / WORKING_SET
        if profile.exists():
            ws = json.loads(profile.read_text())
            chunks = ws["chunks"]
            missing = await self.memfs.request("missing", image=root, chunks=chunks)
            if prefetch and missing.get("missing"):
                pack = ws.get("pack")
                args: dict[str, Any] = {"chunks": chunks}
                if pack:
                    args["pack"] = {"key": self.images.store_key(root_image, pack["file"]), "entries": pack["entries"]}
                await self.memfs.request("prefetch", image=root, wait=False, **args)
            return False
        if root in self._recording:
            return False
        self._recording.add(root)
        await self.memfs.request("record-start", image=root)
        return True

    async def record(self, image: LiveImage, stop_after: float = RECORD_S) -> None:
        """Keep, with the root image, the chunks its first clone touched early on."""
        root = image.memory_root or image.name
        try:
            await asyncio.sleep(stop_after)
            answer = await self.memfs.request("record-stop", image=root)
            chunks = answer.get("chunks", [])
            if answer.get("ok") and chunks and self.images.exists(root):
                root_image = self.images.get(root)
                profile: dict[str, Any] = {"chunks": chunks, "recorded_s": stop_after}
                with contextlib.suppress(StoreError):
                    profile["pack"] = await asyncio.to_thread(self._write_pack, root_image, chunks)
                with contextlib.suppress(StoreError):
                    await asyncio.to_thread(self.images.add_file, root_image, WORKING_SET, json.dumps(profile).encode())
        finally:
            self._recording.discard(root)

    def _write_pack(self, image: LiveImage, chunks: list[int]) -> dict[str, Any]:
        """Put the working-set pack in the store; its description for the profile.
        A StoreError if this host cannot (a peer's store is read-only to it)."""
        chunk_map = self.store.get_ref(memory_ref(image.name))
        at = [(i, r) for i in chunks if 0 <= i < len(chunk_map.chunks) and (r := chunk_map.chunks[i]) is not None]
        blob, where = self.store.stored_forms([r for _, r in at])
        try:
            self.images.add_file(image, WORKING_SET_PACK, blob)
        except StoreError as exc:
            log.info("working set of %s kept without its pack (%s): cold hosts prefetch it chunk by chunk", image.name, exc)
            raise
        return {"file": WORKING_SET_PACK, "bytes": len(blob),
                "entries": [[i, off, length] for (i, _), (off, length) in zip(at, where, strict=True)]}
