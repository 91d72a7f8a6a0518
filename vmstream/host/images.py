"""Live-image operations: capture a VM into an image, list, delete.

An image is committed whole or not at all (ImageRepository.staging/commit); its
memory goes into the chunk store under the image's ref, which is dropped again
if the commit fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from vmstream.config import check_name
from vmstream.errors import Conflict, QemuError
from vmstream.host import disks
from vmstream.host.metrics import AgentMetrics
from vmstream.host.pool import ClonePool
from vmstream.host.registry import VmRegistry, published
from vmstream.host.schemas import ImageInfo, VmInfo, WarmResult
from vmstream.host.starter import Starter
from vmstream.host.state import Op, VmState
from vmstream.host.tasks import operation
from vmstream.image import GuestConfig, ImageRepository, LiveImage
from vmstream.memfs import memory_ref
from vmstream.memfs.mount import MemfsMount
from vmstream.qemu import qemu_version
from vmstream.store import ChunkStore, StoreError

# A clone's capture is stored as a delta over its root image unless the delta
# is larger than this fraction of the root's stored memory; then it is flattened.
FLATTEN_FRACTION = 0.5


class ImageOps:
    def __init__(
        self, registry: VmRegistry, starter: Starter, images: ImageRepository, store: ChunkStore, memfs: MemfsMount, pool: ClonePool,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.metrics = metrics or AgentMetrics()
        self.registry = registry
        self.starter = starter
        self.images = images
        self.store = store
        self.memfs = memfs
        self.pool = pool
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def info(self, image: LiveImage) -> ImageInfo:
        return ImageInfo(
            name=image.name, created_at=image.created_at, source_vm=image.source_vm,
            parent_image=image.parent_image, memory_bytes=image.guest.memory_bytes,
            memory_bytes_stored=image.memory_bytes_stored, devstate_bytes=image.devstate_bytes,
            pause_ms=image.pause_ms, clones=len(self.registry.all(parent_image=image.name)),
            layout=image.layout, memory_root=image.memory_root, source_private_bytes=image.source_private_bytes,
        )

    def describe_all(self) -> list[ImageInfo]:
        return [self.info(i) for i in self.images.all()]

    def servers(self, name: str) -> list[VmInfo]:
        self.images.get(name)
        return [self.starter.info(r) for r in self.registry.all(parent_image=name)]

    async def create(self, vm: str, name: str, flatten: bool | None = None) -> ImageInfo:
        """Capture a running VM into a new live image; the VM keeps running.

        From a clone the image is a delta over the clone's root image, unless
        flatten is True, or None and the delta is large (FLATTEN_FRACTION).
        """
        check_name(name, "live image")
        self.registry.begin(vm, Op.CAPTURE, VmState.CAPTURING)
        try:
            async with operation("live-image create", vm=vm, image=name), self._lock(name):
                return await self._create(vm, name, flatten)
        finally:
            self.registry.set_state(vm, VmState.RUNNING, only_if=[VmState.CAPTURING])

    async def _create(self, vm: str, name: str, flatten: bool | None) -> ImageInfo:
        rec = self.registry.get(vm)
        proc = self.starter.proc(rec)
        parent = self.images.get(rec.parent_image) if rec.parent_image else None
        with self.images.staging(name) as stage:
            root_memory = self.images.memory_path(parent) if parent else None
            if flatten is None and root_memory is not None:
                flatten_above: int | None = int(FLATTEN_FRACTION * os.stat(root_memory).st_blocks * 512)
            else:
                flatten_above = -1 if flatten else None
            result, frozen = await self.starter.capture(rec, proc, stage, root_memory, flatten_above)
            if frozen:  # the disk as it was in the pause; the VM now writes to a new overlay
                self.registry.update(vm, disk=str(frozen[1]))
                assert rec.disk_base is not None
                await disks.layer(frozen[0], Path(rec.disk_base), stage / disks.LAYER)
            if rec.seed:  # clones attach it too: their machine is the image's
                await asyncio.to_thread(shutil.copyfile, rec.seed, stage / disks.SEED)
            root = (parent.memory_root or parent.name) if parent and result.layout == "delta" else None
            ref = None
            if result.layout == "full":
                ref = memory_ref(name)
                await self._store_memory(stage / "memory.raw", ref, name)
            image = LiveImage(
                name=name, created_at=datetime.now(UTC), source_vm=vm, parent_image=rec.parent_image,
                layout=result.layout, memory_root=root, memory_ref=ref,
                guest=GuestConfig(
                    memory_bytes=rec.memory_bytes, cpus=rec.cpus, kernel=rec.kernel, initrd=rec.initrd,
                    accel=rec.accel, hostname=rec.hostname, mac=rec.mac, vmgenid=rec.vmgenid,
                    qemu_version=qemu_version(), disk=bool(rec.disk), guest_announce=self.starter.guest_announce(rec),
                    ready=str(self.starter.readiness(rec)), guest_ports=tuple(sorted(published(rec))),
                    append=rec.append, seed=bool(rec.seed), balloon=self.starter.balloon(rec),
                ),
                pause_ms=result.pause_ms, devstate_bytes=result.devstate_bytes,
                memory_bytes_stored=result.memory_bytes_stored, source_private_bytes=result.private_bytes,
            )
            try:
                self.images.commit(stage, image)
            except BaseException:
                if ref is not None:
                    await asyncio.to_thread(self.store.delete_ref, ref)
                raise
        self.metrics.image_created(image.pause_ms)
        return self.info(image)

    async def _store_memory(self, path: Path, ref: str, image: str) -> None:
        """Chunk an image's memory into the store, and into this host's chunk cache
        while the local copy is at hand (the first clone here then starts warm)."""
        try:
            await asyncio.to_thread(self.store.store_file, path, ref=ref)
        except StoreError as exc:
            raise QemuError(f"storing the image memory failed: {exc}") from exc
        with contextlib.suppress(Exception):  # only an optimisation: memfs fetches what is missing
            await self.memfs.ensure()
            await self.memfs.request("warm", image=image, path=str(path))
        path.unlink()

    async def warm(self, name: str) -> WarmResult:
        """Bring an image's memory onto this host before any clone needs it (Nova's
        `aggregate cache image`): its files from the store, every chunk through memfs into
        the host's chunk cache and page cache, and its clone pool filled."""
        async with operation("live-image warm", image=name):
            t0 = time.perf_counter()
            image = await asyncio.to_thread(self.images.get, name)
            await self.memfs.ensure()
            read = await asyncio.to_thread(_read_through, self.images.memory_path(image))
            self.pool.fill(name)
            return WarmResult(image=name, memory_bytes_read=read, elapsed_s=time.perf_counter() - t0)

    async def delete(self, name: str) -> None:
        async with self._lock(name), operation("live-image delete", image=name):
            self.images.get(name)
            clones = self.registry.all(parent_image=name)
            if clones:
                names = ", ".join(r.name for r in clones)
                raise Conflict(f"live image '{name}' still has {len(clones)} clone(s) ({names}): destroy them first")
            children = self.images.children(name)
            if children:
                names = ", ".join(i.name for i in children)
                raise Conflict(f"live image '{name}' has child images ({names}) made from its clones: delete them first")
            image = self.images.get(name)
            await self.pool.drain(name)
            await asyncio.to_thread(self.images.delete, name)
            if image.memory_ref is not None:
                with contextlib.suppress(StoreError):
                    await asyncio.to_thread(self.store.delete_ref, image.memory_ref)
            if self.memfs.pid() is not None:
                with contextlib.suppress(Exception):
                    await self.memfs.request("forget", image=name)


def _read_through(path: Path, block: int = 4 << 20) -> int:
    """Read a memfs file end to end (fetching and caching its chunks); bytes read. A chunk
    that cannot be fetched or verified is an I/O error here, as it would be for a clone."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            total += len(data)
    return total
