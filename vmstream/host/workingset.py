"""Working sets: the chunks an image's first clone touches early on, kept with the
root image, so a later cold start on another host prefetches them (REAP)."""

from __future__ import annotations

import asyncio
import contextlib
import json

from vmstream.image import ImageRepository, LiveImage
from vmstream.memfs.mount import MemfsMount
from vmstream.store import StoreError

WORKING_SET = "workingset.json"
RECORD_S = 2.0  # how long after a clone answers its chunk touches are recorded


class WorkingSets:
    def __init__(self, images: ImageRepository, memfs: MemfsMount) -> None:
        self.images = images
        self.memfs = memfs
        self._recording: set[str] = set()

    async def prepare(self, image: LiveImage, prefetch: bool) -> bool:
        """Prefetch the image's recorded working set if the host lacks it; with no
        working set yet, start recording one. Returns True if recording."""
        root = image.memory_root or image.name
        profile = self.images.image_dir(self.images.get(root)) / WORKING_SET
        if profile.exists():
            chunks = json.loads(profile.read_text())["chunks"]
            missing = await self.memfs.request("missing", image=root, chunks=chunks)
            if prefetch and missing.get("missing"):
                await self.memfs.request("prefetch", image=root, chunks=chunks, wait=False)
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
                profile = json.dumps({"chunks": chunks, "recorded_s": stop_after}).encode()
                with contextlib.suppress(StoreError):
                    await asyncio.to_thread(self.images.add_file, self.images.get(root), WORKING_SET, profile)
        finally:
            self._recording.discard(root)
