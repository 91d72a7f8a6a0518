"""The clone pool: QEMUs started ahead for recently started images, their state
loaded and paused, so a clone start only resumes one.

A pooled QEMU also runs once through a clone's start before it is paused
(run-through): QEMU drops all translated code when it loads a state, so under
TCG a clone's start is mostly translating anew the guest's resume, identity and
network paths; done here, before any request, that is off the start's path. The
guest reseeds its RNG on this QEMU's new VM Generation ID, takes this QEMU's MAC
and address (which the clone keeps), and answers HTTP once. No hooks run and
none of their inputs are written: the clone's identity brings those. An agent
that does not know 'prepare' (images from before it) answers with an error, and
the guest is paused again as it is.

The run-through must fit in the pooled QEMU's translation cache: when the cache
fills, TCG drops all of it, and with it most of what the run-through translated.
The demo guest's run-through translates ~8 MB; the Debian guest's (systemd and
its services wake up too) ~14 MB, which overflowed the default 10 MiB, so its
pooled clones still spent 0.05-0.2 s translating their identity and HTTP paths.
So after each run-through the pool asks QEMU how often it flushed the cache;
more than the state load's one flush and the image's next pooled QEMUs get twice
the cache (up to TB_MIB_MAX). Only the used part of the cache costs memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from typing import Any

from qemu.qmp import QMPError

from vmstream.errors import NotFound, QemuError
from vmstream.guest.identity import CloneIdentity
from vmstream.host import disks
from vmstream.host.db import VmRecord
from vmstream.host.registry import POOL_PREFIX, VmRegistry
from vmstream.host.starter import Starter
from vmstream.host.state import VmState
from vmstream.host.tasks import Tasks
from vmstream.image import ImageRepository
from vmstream.settings import Settings

log = logging.getLogger("vmstream.host.pool")
TB_MIB_MAX = 64  # a pooled QEMU's translation cache grows up to a booted VM's (MachineSpec.tb_mib)
LOAD_FLUSHES = 1  # TCG drops its translated code once when the state loads; more: the cache overflowed
POOL_WAIT_S = 2.0  # a single start waits this long for a pooled QEMU being prepared (further along than a new one)


def renice(pid: int | None, nice: int) -> None:
    """Set the nice value of every thread of a process (Linux's setpriority(PRIO_PROCESS)
    sets one thread's, and QEMU's vCPU threads exist before we are asked)."""
    if pid is None:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)


class ClonePool:
    def __init__(self, settings: Settings, registry: VmRegistry, starter: Starter, images: ImageRepository, tasks: Tasks) -> None:
        self.size = settings.clone_pool
        self.images_kept = settings.clone_pool_images
        self.run_through = settings.clone_pool_run_through
        self.nice = settings.clone_pool_nice
        self.tb_mib = settings.clone_pool_tb_mib
        self.registry = registry
        self.starter = starter
        self.images = images
        self.tasks = tasks
        self._ready: dict[str, list[str]] = {}  # image -> names of its pooled rows, ready to take
        self._tb_mib: dict[str, int] = {}  # image -> cache size its run-through needed, where tb_mib was too small
        self._fills: dict[str, asyncio.Task[None]] = {}
        self._added = asyncio.Condition()

    def take(self, rec: VmRecord, image_name: str) -> tuple[VmRecord, bool]:
        """rec with a ready pooled QEMU of the image taken over, and True; or rec, False."""
        ready = self._ready.get(image_name, [])
        while ready:
            pool_name = ready.pop(0)
            pool_rec = self.registry.find(pool_name)
            if pool_rec is None:
                continue
            if not self.starter.proc(pool_rec).alive():  # it died while it waited: drop it (and its tap)
                log.warning("pooled QEMU %s of image %s had exited; starting the clone anew", pool_name, image_name)
                self.starter.remove_row(pool_name)
                continue
            renice(self.starter.proc(pool_rec).pid, 0)  # a clone now: as urgent as a new QEMU
            clone = self.registry.take_over(pool_name, rec.name)
            self.starter.hand_over(pool_name, rec.name)
            return clone, True
        return rec, False

    def stocked(self, image_name: str) -> bool:
        """Pooled QEMUs of the image are ready to take."""
        return bool(self._ready.get(image_name))

    async def wait(self, image_name: str) -> None:
        """If the image's pool is being filled, wait a little for the QEMU on its way."""

        def settled() -> bool:
            return image_name not in self._fills or bool(self._ready.get(image_name))

        if settled():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POOL_WAIT_S), self._added:
                await self._added.wait_for(settled)

    def fill(self, image_name: str) -> None:
        """Start the image's pooled QEMUs in the background, up to the pool size; the pools
        of images started least recently go beyond clone_pool_images."""
        if self.size <= 0:
            return
        self._ready[image_name] = self._ready.pop(image_name, [])  # most recently used last
        for old in list(self._ready)[:-self.images_kept] if self.images_kept > 0 else list(self._ready):
            self.tasks.spawn(self.drain(old), "clone pool drain", image=old)
        if image_name in self._fills:
            return
        task = asyncio.create_task(self._fill(image_name))
        self._fills[image_name] = task
        task.add_done_callback(lambda t: self._filled(image_name, t))

    async def _fill(self, image_name: str) -> None:
        while len(self._ready.get(image_name, [])) < self.size:
            image = self.images.get(image_name)
            g = image.guest
            t0 = time.perf_counter()
            (rec,) = await self.registry.reserve(
                [POOL_PREFIX + secrets.token_hex(6)], state=VmState.POOLED, memory_bytes=g.memory_bytes, cpus=g.cpus,
                accel=g.accel, parent_image=image_name, ready=g.ready,
                publish=dict.fromkeys(g.guest_ports, 0), **self.starter.image_boot(image),
            )
            async with self.starter.starting(rec) as proc:
                if g.disk:  # its own overlay on the image's disk layer, which the clone that takes it keeps
                    await self.starter.overlay_disk(rec, self.images.image_dir(image) / disks.LAYER)
                tb_mib = self._tb_mib.get(image_name, self.tb_mib)
                spec = self.starter.pooled_spec(self.starter.spec(rec, image), tb_mib if self.run_through else None)
                await self.starter.launch(rec, proc, spec)
                renice(proc.pid, self.nice)  # preparing ahead must not slow the starts being served now
                t_launched = time.perf_counter()
                await self.starter.load_paused(rec, proc, image)
                t_loaded = time.perf_counter()
                if self.run_through:
                    prepare = CloneIdentity(rec.hostname, rec.mac, ip=self.starter.address(rec)).command(verb="prepare")
                    flushes = await self.starter.run_through(rec, proc, prepare)
                    if flushes is not None and flushes > LOAD_FLUSHES and tb_mib < TB_MIB_MAX:
                        # this QEMU is kept (its last translations are still warm); the next ones get room
                        self._tb_mib[image_name] = min(2 * tb_mib, TB_MIB_MAX)
                        log.info("the run-through of pooled QEMU %s of image %s filled its %d MiB translation cache "
                                 "(%d flushes): the image's next pooled QEMUs get %d MiB", rec.name, image_name, tb_mib,
                                 flushes, self._tb_mib[image_name])
            # how long a refill takes decides how closely spaced starts still find one ready
            t = time.perf_counter()
            log.info("pooled QEMU %s of image %s ready in %.3f s (launched %.3f, state loaded %.3f, run through %.3f)",
                     rec.name, image_name, t - t0, t_launched - t0, t_loaded - t_launched, t - t_loaded)
            self._ready.setdefault(image_name, []).append(rec.name)
            async with self._added:
                self._added.notify_all()

    def tb_mib_of(self, image_name: str) -> int:
        """The translation cache (MiB) of the image's pooled QEMUs."""
        return self._tb_mib.get(image_name, self.tb_mib)

    def grown_tb_mib(self, image_name: str) -> int | None:
        """The cache a run-through of this image showed it needs, where the default was too small
        (None: it fitted, or no pooled QEMU ran through yet). A clone's start runs the same paths."""
        return self._tb_mib.get(image_name)

    def _filled(self, image_name: str, task: asyncio.Task[None]) -> None:
        self._fills.pop(image_name, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            level = logging.WARNING if isinstance(exc, (QemuError, NotFound, OSError, QMPError, EOFError)) else logging.ERROR
            log.log(level, "filling the clone pool of image %s failed: %s", image_name, exc or type(exc).__name__)

        async def wake() -> None:  # a start waiting on this fill stops waiting, even if it failed
            async with self._added:
                self._added.notify_all()

        self.tasks.spawn(wake(), "clone pool wake-up", image=image_name)

    async def drain(self, image_name: str | None = None) -> None:
        """Stop the pooled QEMUs (of one image, or all): before the image goes, or the agent."""
        names = [image_name] if image_name is not None else list({*self._ready, *self._fills})
        for name in names:
            task = self._fills.pop(name, None)
            if task is not None:
                task.cancel()  # a QEMU it was starting is stopped by Starter.starting
                await asyncio.gather(task, return_exceptions=True)
            self._ready.pop(name, None)
        for rec in self.registry.all(pooled=True):
            if rec.state == VmState.POOLED and (image_name is None or rec.parent_image == image_name):
                await self.starter.remove(rec)

    def info(self) -> dict[str, Any]:
        """Per image: pooled QEMUs ready to take, and the pids of all (also those being started)."""
        pids: dict[str, list[int]] = {}
        for r in self.registry.all(pooled=True):
            if r.state == VmState.POOLED and r.pid and r.parent_image:
                pids.setdefault(r.parent_image, []).append(r.pid)
        return {"ready": {name: len(ready) for name, ready in self._ready.items() if ready}, "pids": pids}
