"""HostManager: the agent's parts, put together, and the operations on VMs.

Each concern has one owner, and they depend on each other downwards only:

    VmRegistry   the VM rows (state, identity, ports): vmstream.host.registry
    Starter      the QEMU processes; every start goes through its guard
    ClonePool    QEMUs started ahead of clone starts
    HookWatcher  clone hooks and their results
    WorkingSets  per-image working sets (prefetch on cold hosts)
    CloneStarter starting clones of an image
    ImageOps     capturing, listing, deleting live images
    Migrations, IncomingVms, Peers   moving VMs between hosts

This class boots and destroys VMs and answers for the host as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from vmstream import __version__
from vmstream.config import check_name, parse_memory, parse_size
from vmstream.errors import InvalidInput
from vmstream.guest.clock import agent_clock, qga_clock
from vmstream.guest.clock import read as read_clock
from vmstream.guest.cloudinit import check_user_data, write_seed
from vmstream.guest.qga import qga
from vmstream.guest.readiness import AGENT, STATUS, parse_publish, parse_readiness
from vmstream.guest.rootfs import build_rootfs
from vmstream.host import disks, footprint, network
from vmstream.host.clones import CloneStarter
from vmstream.host.db import VmRecord, open_db
from vmstream.host.groups import Groups
from vmstream.host.hooks import HookWatcher
from vmstream.host.images import ImageOps
from vmstream.host.incoming import IncomingVms
from vmstream.host.memory import MemoryController
from vmstream.host.metrics import AgentMetrics
from vmstream.host.migration import Migrations
from vmstream.host.peers import Peers
from vmstream.host.pool import ClonePool
from vmstream.host.registry import VmRegistry
from vmstream.host.schemas import BootSource, ClockReading, HostInfo, VmInfo
from vmstream.host.starter import Starter
from vmstream.host.state import Op, VmState, check
from vmstream.host.tasks import Tasks, log, operation
from vmstream.host.workingset import WorkingSets
from vmstream.image import ImageRepository, LiveImage
from vmstream.memfs import memory_ref
from vmstream.memfs.mount import MemfsMount
from vmstream.policy import MemoryPolicy, parse_floor, start_cost
from vmstream.qemu import QemuProcess, guest_ram_bytes, qemu_version
from vmstream.settings import Settings
from vmstream.store import ChunkStore, StoreError, collect_garbage
from vmstream.store.gc import DEFAULT_GRACE
from vmstream.store.peer import PeerBackend
from vmstream.store.spec import open_backend
from vmstream.store.store import REFS

BOOT_TIMEOUT_S = 240.0
# A probe sent while a booting guest's network is not up yet hangs (slirp gets no answer to
# its ARP) until the probe gives up: with 2 s per probe, boots were seen as 8.1, 10.2 or 12.2 s.
BOOT_PROBE_S = 0.25
# Memory chunks of 64 KiB: a page fault on a cold host fetches 16 pages, not 64
# (an idle 256 MiB clone touches scattered pages), and 16 GiB is 256 K chunks.
MEMORY_CHUNK = 64 << 10
LENT_RECONCILE_S = 300.0  # how often a host asks its peers about the VMs it lent addresses to

StarterFactory = Callable[[Settings, VmRegistry, ImageRepository], Starter]


class HostManager:
    def __init__(self, settings: Settings, starter: StarterFactory = Starter, memfs: MemfsMount | None = None) -> None:
        """starter / memfs: replaced by in-process tests (an agent without QEMU or FUSE)."""
        self.settings = settings
        self.data_dir = settings.home
        (self.data_dir / "run").mkdir(parents=True, exist_ok=True)
        self.store = ChunkStore(open_backend(settings.store_spec, settings.peer_token), chunk_size=MEMORY_CHUNK)
        self.memfs = memfs or MemfsMount(self.data_dir, settings.store_spec, parse_size(settings.cache_size),
                                         settings.peer_token, settings.memfs_read_ahead_chunks)
        self.images = ImageRepository(self.data_dir / "images", self.memfs.mountpoint, self.store.backend)
        self.session = open_db(self.data_dir / "state.db")
        self.tasks = Tasks()
        self.metrics = AgentMetrics()
        self.registry = VmRegistry(self.session, self.data_dir / "run", network.from_settings(settings))
        self.starter = starter(settings, self.registry, self.images)
        self.pool = ClonePool(settings, self.registry, self.starter, self.images, self.tasks)
        self.hooks = HookWatcher(self.registry, self.starter)
        self.clones = CloneStarter(settings, self.registry, self.starter, self.images, self.memfs, self.pool, self.hooks,
                                   WorkingSets(self.images, self.memfs, self.store), self.tasks, self.metrics)
        self.image_ops = ImageOps(self.registry, self.starter, self.images, self.store, self.memfs, self.pool, self.metrics)
        self.peers = Peers(self.session)
        self.migrations = Migrations(self.registry, self.starter, self.images, self.peers, self.metrics)
        self.incoming = IncomingVms(settings, self.registry, self.starter, self.images, self.memfs, self.tasks)
        self.memory = MemoryController(self.registry, self.starter)
        self.groups = Groups(self.session, self.registry, self.starter, self.images, self.clones, self._boot_member,
                             self.destroy, self.peers, self.data_dir / "run", self.tasks, settings.group_tb_mib)

    async def info(self) -> HostInfo:
        guest = await asyncio.to_thread(self.starter.guest)
        accel = await asyncio.to_thread(self.starter.accelerator, guest)
        return HostInfo(
            version=__version__, data_dir=str(self.data_dir), qemu_version=qemu_version(),
            accelerator=accel.accel, accelerator_reason=accel.reason,
            guest={"key": guest.key, "kernel_release": guest.kernel_release, "kernel": str(guest.kernel), "initrd": str(guest.initrd)},
            settings=self.settings.shown(),
        )

    # ---- lifecycle ---------------------------------------------------------------

    async def reattach(self) -> dict[str, int]:
        """At agent start: adopt VMs still running; remove half-started ones."""
        adopted = exited = removed = 0
        if self.settings.gc_interval_s > 0 and not isinstance(self.store.backend, PeerBackend):
            self.tasks.spawn(self._gc_loop(), "store GC")
        self.tasks.spawn(self.memory.run(), "memory policy")
        if self.starter.net is not None:
            self.tasks.spawn(self._lent_loop(), "lent addresses")
        if any(r.parent_image for r in self.registry.all(pooled=True)):
            await self.memfs.ensure()  # clones' memory: a no-op if the daemon outlived the agent
        if leftovers := self.images.remove_leftovers():
            log.info("removed what unfinished captures left: %s", ", ".join(leftovers))
        for rec in self.registry.all(pooled=True):
            proc = self.starter.proc(rec)
            if rec.state == VmState.INCOMING and proc.alive() and await self.starter.qemu_status(proc) == "running":
                # it arrived whole (its QEMU runs it) before this agent died: the only running copy
                self.registry.set_state(rec.name, VmState.RUNNING, only_if=[VmState.INCOMING])
                log.info("kept %s, which had arrived by migration and runs here", rec.name)
                adopted += 1
            elif rec.state in (VmState.STARTING, VmState.INCOMING, VmState.POOLED, VmState.STOPPING):
                await self.starter.remove(rec)
                removed += 1
            elif rec.state == VmState.MIGRATING and proc.alive():
                log.info("VM %s was moving to %s when the agent stopped: %s", rec.name, rec.migrating_to,
                         await self.migrations.recover(rec))
                adopted += self.registry.find(rec.name) is not None
            elif proc.alive():
                adopted += 1
                if rec.state == VmState.CAPTURING and (was := await self.starter.resume_if_paused(proc)):
                    # the capture stopped the guest; nobody else asked for it
                    log.info("resumed %s, whose capture the agent did not finish (QEMU was %s)", rec.name, was)
                # an operation the dead agent was running is over: the VM runs
                self.registry.set_state(rec.name, VmState.RUNNING, only_if=[VmState.CAPTURING, VmState.MIGRATING])
                await self._adopt_run_state(rec.name, proc)
                if rec.parent_image and not rec.hooks:  # its batch's hooks may still wait for the agent that died
                    self.tasks.spawn(self.hooks.start_hooks(proc), "clone hooks", vm=rec.name)
            else:
                self.registry.set_state(rec.name, VmState.EXITED)
                exited += 1
        log.info("agent started: %d VM(s) adopted, %d exited, %d half-started removed", adopted, exited, removed)
        await self.groups.reattach()  # after the VMs: a group's members are VMs
        return {"adopted": adopted, "exited": exited, "removed_half_started": removed}

    async def _adopt_run_state(self, name: str, proc: QemuProcess) -> None:
        """A pause or unpause the dead agent was in may have reached QEMU or not: QEMU says."""
        status = await self.starter.qemu_status(proc)
        if status == "paused":
            self.registry.set_state(name, VmState.PAUSED, only_if=[VmState.RUNNING])
        elif status == "running":
            self.registry.set_state(name, VmState.RUNNING, only_if=[VmState.PAUSED])

    async def shutdown(self) -> None:
        """Cancel background work (hook collection, migrations) and stop the pool; VMs keep running."""
        await self.migrations.shutdown()
        await self.incoming.shutdown()
        await self.pool.drain()
        await self.tasks.cancel_all()
        if not any(r.state != VmState.EXITED for r in self.registry.all()):
            await self.memfs.stop()  # nothing maps image memory any more
        self.store.close()

    # ---- VMs -------------------------------------------------------------------------

    async def boot(
        self, name: str, memory: str, cpus: int, guest_agent: str = "native", disk: str | None = None,
        ready: str | None = None, publish: list[str] | None = None, timeout: float = BOOT_TIMEOUT_S,
        boot: BootSource | None = None, user_data: bytes | None = None, memory_policy: MemoryPolicy | None = None,
    ) -> VmInfo:
        """Cold-boot the demo guest, or a disk guest; return once it is ready (its readiness check)."""
        check_name(name)
        boot = boot or BootSource()
        memory_bytes = parse_memory(memory)
        if user_data is not None:
            if not disk:
                raise InvalidInput("--user-data is for cloud-init in a disk guest (the demo guest has none): give --disk IMAGE "
                                   "too, or pass data to clones with 'live-image start --user-data'")
            check_user_data(user_data)  # before anything starts
        # the project's own guests serve the status page; another image has only the agent for sure
        readiness = parse_readiness(ready) if ready else (AGENT if disk and disk != "debian" else STATUS)
        ports = parse_publish(publish or [])
        if readiness.guest_port not in (None, 80) and readiness.guest_port not in ports:
            ports[readiness.guest_port] = 0  # the probe needs it forwarded, and so will the user
        policy_json = self._policy_json(memory_policy, self.starter.settings.balloon)
        self.starter.admit([start_cost(memory_bytes, memory_policy, clone=False)], f"VM {name}")  # before any build
        t0 = asyncio.get_running_loop().time()
        base = await self._disk_base(disk) if disk else None
        guest = await asyncio.to_thread(self.starter.guest)
        accel = await asyncio.to_thread(self.starter.accelerator, guest)
        kernel, initrd, append = await self._boot_files(boot, disk, base, guest.kernel, guest.initrd)
        (rec,) = await self.registry.reserve(
            [name], memory_bytes=guest_ram_bytes(memory_bytes, accel.accel), cpus=cpus, kernel=kernel, initrd=initrd, append=append,
            accel=accel.accel, parent_image=None, ready=str(readiness), publish=ports, balloon=self.starter.settings.balloon,
            memory_policy=policy_json,
        )
        try:
            async with operation("boot", vm=name), self.starter.starting(rec) as proc:
                if base is not None:
                    await self.starter.overlay_disk(rec, base)
                if user_data is not None:
                    seed = Path(rec.rundir) / disks.SEED  # the run dir: made with the disk's overlay
                    await asyncio.to_thread(write_seed, seed, user_data, rec.vm_id, rec.hostname)
                    rec.seed = str(seed)
                    self.registry.update(name, seed=rec.seed)
                spec = self.starter.spec(rec)
                if guest_agent == "portable":
                    spec = dataclasses.replace(spec, extra_append=("vmstream.agent=sh",))
                await self.starter.launch(rec, proc, spec)
                await self.starter.wait_ready(rec, proc, timeout, attempt_s=BOOT_PROBE_S)
                self.registry.update(name, state=VmState.RUNNING, ready_s=asyncio.get_running_loop().time() - t0)
        except BaseException:
            self.metrics.boots.labels("failed").inc()
            raise
        self.metrics.boots.labels("ok").inc()
        return self.starter.info(self.registry.get(name))

    async def _disk_base(self, disk: str) -> Path:
        """The image a disk guest boots from: a path, or 'debian' (built on first use)."""
        if disk == "debian":
            return await asyncio.to_thread(build_rootfs, self.data_dir / "guest" / "rootfs", mirror=self.settings.debian_mirror)
        path = Path(disk).absolute()
        if not path.is_file():
            raise InvalidInput(f"disk image {disk} not found: give a raw or qcow2 file, or 'debian' for the built Debian guest")
        return path

    async def _boot_files(self, boot: BootSource, disk: str | None, base: Path | None, kernel: Path,
                          initrd: Path) -> tuple[str, str, str | None]:
        """(kernel, initrd, command line) for the row: vmstream's kernel and its own command
        line, a given kernel (copied into the data dir, so the user's file may change or go),
        or ("", "", None): the disk's own bootloader."""
        if base is None:
            if boot.mode != "auto" or boot.kernel or boot.initrd or boot.append is not None:
                raise InvalidInput("--boot, --kernel, --initrd and --append are for disk guests: give --disk IMAGE too")
            return str(kernel), str(initrd), None
        if boot.kernel is None:
            if boot.initrd or boot.append is not None:
                raise InvalidInput("--initrd and --append go with --kernel FILE (the kernel they belong to)")
            mode = boot.mode
            if mode == "auto":  # a disk with a partition table has its own bootloader; a bare file system has none
                mode = "vmstream" if disk == "debian" or not await disks.partitioned(base) else "firmware"
            return (str(kernel), str(initrd), None) if mode == "vmstream" else ("", "", None)
        if boot.mode == "firmware":
            raise InvalidInput("--boot firmware boots the disk's own bootloader: leave out --kernel, or --boot")
        given = await asyncio.to_thread(self._keep_boot_files, boot.kernel, boot.initrd)
        append = boot.append if boot.append is not None else \
            f"root=/dev/vda{'1' if await disks.partitioned(base) else ''} ro console=ttyS0"
        return str(given[0]), str(given[1] or ""), append

    def _keep_boot_files(self, kernel: str, initrd: str | None) -> tuple[Path, Path | None]:
        """Copies of a given kernel and initrd under the data dir, by content: the
        VM's clones need them (their setup header) long after the boot."""
        kept: list[Path | None] = []
        for what, given in (("kernel", kernel), ("initrd", initrd)):
            if given is None:
                kept.append(None)
                continue
            path = Path(given).absolute()
            if not path.is_file():
                raise InvalidInput(f"{what} {given} not found: give the path of a file on the agent's host")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            out = self.data_dir / "boot" / f"{what}-{digest}"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{out.name}.{os.getpid()}")
                shutil.copyfile(path, tmp)
                tmp.replace(out)
            kept.append(out)
        assert kept[0] is not None
        return kept[0], kept[1]

    async def destroy(self, name: str) -> None:
        """Stop a VM and forget it; refused while an operation (migration, capture) owns it."""
        rec = self.registry.begin(name, Op.DESTROY, VmState.STOPPING)
        async with operation("destroy", vm=name):
            await self.starter.remove(rec)
        if (ip := self._borrowed(rec)) is not None:
            self.tasks.spawn(self.peers.release_address(ip, rec.name), "give back address", vm=name)

    def _borrowed(self, rec: VmRecord) -> str | None:
        """The address of a VM that came by migration with one of another host's range (lent by it)."""
        return rec.ip if rec.ip and not self.registry.owns(rec.ip) else None

    async def pause(self, name: str) -> VmInfo:
        """Stop a VM's vCPUs: it keeps its memory, devices and connections, uses no CPU and
        answers nothing until unpaused (Nova's pause). A paused VM is not captured or moved."""
        await self._run_state(name, Op.PAUSE, "stop", to=VmState.PAUSED, undo=VmState.RUNNING)
        return self.show(name)

    async def unpause(self, name: str) -> VmInfo:
        await self._run_state(name, Op.UNPAUSE, "cont", to=VmState.RUNNING, undo=VmState.PAUSED)
        return self.show(name)

    async def _run_state(self, name: str, op: Op, command: str, to: VmState, undo: VmState) -> None:
        """The row moves to `to` first (so no other operation starts meanwhile), then QEMU is
        asked; the row goes back to `undo` if QEMU did not take it."""
        rec = self.registry.begin(name, op, to)
        async with operation(str(op), vm=name):
            try:
                await self.starter.run_state(rec, self.starter.proc(rec), command)
            except BaseException:
                self.registry.set_state(name, undo, only_if=[to])
                raise

    async def _boot_member(self, name: str, image: LiveImage) -> VmInfo:
        """A cold-booted member of a group (--start boot): the image's guest, booted anew."""
        return await self.boot(name, f"{image.guest.memory_bytes >> 20}M", image.guest.cpus)

    async def destroy_all(self) -> int:
        """Every VM, and every group (its HAProxy and members), the memfs daemon too."""
        await self.groups.delete_all()
        await self.migrations.shutdown()  # a VM being moved is back to running (or gone) first
        recs = self.registry.all()
        await self.pool.drain()
        await asyncio.gather(*(self.starter.remove(r) for r in recs))
        borrowed = [(ip, r.name) for r in recs if (ip := self._borrowed(r)) is not None]
        await asyncio.gather(*(self.peers.release_address(ip, vm) for ip, vm in borrowed))
        await self.memfs.stop()
        return len(recs)

    def list_vms(self) -> list[VmInfo]:
        return [self.starter.info(r) for r in self.registry.all()]

    def show(self, name: str) -> VmInfo:
        rec = self.registry.get(name)
        return self.starter.info(rec, with_footprint=True).model_copy(update={"memory": self.memory.info(rec)})

    @staticmethod
    def _policy_json(policy: MemoryPolicy | None, balloon: bool) -> str | None:
        if policy is None or policy.limit_bytes is None:
            return None
        if not balloon:
            raise InvalidInput("this VM has no balloon, so its memory cannot be limited: only VMs booted with one "
                               "(VMSTREAM_BALLOON, on by default) and their images' clones can")
        return policy.model_dump_json()

    def set_memory_policy(self, name: str, policy: MemoryPolicy) -> VmInfo:
        """A running VM's new memory policy, applied from the controller's next look (within a second)."""
        rec = self.registry.get(name)
        self.registry.update(name, memory_policy=self._policy_json(policy, self.starter.balloon(rec)))
        return self.show(name)

    def _live(self, name: str, op: Op) -> VmRecord:
        rec = self.registry.get(name)
        check(name, rec.state, op)
        return rec

    async def ask(self, name: str, command: str, timeout: float) -> dict[str, Any]:
        rec = self._live(name, Op.ASK)
        return await self.starter.ask(self.starter.proc(rec), command, timeout)

    async def clock(self, name: str, source: Literal["agent", "qga"], samples: int) -> ClockReading:
        """The VM's wall clock against the host's, read through its vmstream agent or
        (source 'qga', disk guests) qemu-guest-agent."""
        if source == "qga":
            reader = qga_clock(self._qga_socket(name))
        else:
            reader = agent_clock(self.starter.proc(self._live(name, Op.ASK)).agent_path)
        sample = await read_clock(reader, samples)
        return ClockReading(vm=name, source=source, offset_s=sample.offset_s, error_s=sample.error_s,
                            guest_time=sample.guest, host_time=(sample.sent + sample.received) / 2)

    async def qga(self, name: str, execute: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        return await qga(self._qga_socket(name), execute, arguments, timeout)

    def _qga_socket(self, name: str) -> Path:
        """A running disk guest's qemu-guest-agent socket, or why there is none."""
        if not self.registry.get(name).disk:
            raise InvalidInput(f"VM {name} is not a disk guest: qemu-guest-agent runs in disk guests only")
        return self.starter.proc(self._live(name, Op.QGA)).qga_path

    # ---- the host ------------------------------------------------------------------------

    async def host_info(self) -> dict[str, Any]:
        """Per host: memory, the host chunk cache, per-image streaming counters, VM totals."""
        meminfo = footprint.meminfo()
        vms = [self.starter.info(r, with_footprint=True) for r in self.registry.all()]
        fps = [v.footprint for v in vms if v.footprint is not None]
        memfs: dict[str, Any] = {"running": False}
        if self.memfs.pid() is not None:
            with contextlib.suppress(Exception):
                memfs = {"running": True, **(await self.memfs.request("stats"))}
        return {
            "mem_total_bytes": meminfo["MemTotal"], "mem_available_bytes": meminfo["MemAvailable"],
            "vms": len(vms), "running_vms": sum(v.state == VmState.RUNNING for v in vms),
            "vm_pss_bytes": sum(f.pss_bytes for f in fps),
            "vm_memory_bytes": sum(v.memory_bytes for v in vms if v.footprint is not None),  # the RAM those VMs were given
            "vm_private_bytes": sum(f.anonymous_bytes for f in fps),
            "guest_ram_from_images_bytes": sum(f.guest_ram.image_bytes for f in fps if f.guest_ram),
            "store": str(self.store.backend), "memfs": memfs, "clone_pool": self.pool.info(),
            "memory_policy": self.memory_policy_info(meminfo),
        }

    def memory_policy_info(self, meminfo: dict[str, int] | None = None) -> dict[str, Any]:
        """The memory policy's figures: host floor and pressure, the controller's cost, each limited VM."""
        meminfo = meminfo or footprint.meminfo()
        return {
            "mem_available_bytes": meminfo["MemAvailable"],
            "floor_bytes": parse_floor(self.settings.host_memory_floor, meminfo["MemTotal"]),
            "memory_pressure": footprint.memory_pressure(),
            "controller_cpu_s": round(self.memory.cpu_s, 3),
            "vms": {r.name: info.model_dump() for r in self.registry.all() if (info := self.memory.info(r)) is not None},
        }

    async def drop_caches(self) -> dict[str, Any]:
        """Forget every image chunk this host holds: the chunk cache, and the page
        cache of memfs files no clone maps (a mapped one cannot be dropped)."""
        if self.memfs.pid() is None:
            return {"dropped": False}
        await self.pool.drain()  # pooled QEMUs map image memory: they would keep it cached
        await self.memfs.request("drop-cache")
        in_use = {(self.images.get(r.parent_image).memory_root or r.parent_image) for r in self.registry.all() if r.parent_image}
        for name in self.images.names() - in_use:
            await self.memfs.request("invalidate", image=name)
        return {"dropped": True, "kept_page_cache_of": sorted(in_use)}

    async def collect_garbage(self, grace: float = DEFAULT_GRACE) -> dict[str, Any]:
        """Mark and sweep the store's packs (see vmstream.store.gc): deleted images' memory goes."""
        if isinstance(self.store.backend, PeerBackend):
            raise InvalidInput("this host streams from a peer's store: run the GC on the host that owns it")
        async with operation("store GC"):
            orphans = await asyncio.to_thread(self._drop_orphan_refs, grace)
            report = await asyncio.to_thread(collect_garbage, self.store, grace=grace)
        return {**dataclasses.asdict(report), "orphan_refs": orphans}

    def _drop_orphan_refs(self, grace: float) -> list[str]:
        """Image memory refs older than grace whose image never committed (its capture was
        killed between storing the memory and the commit): without this they keep their
        packs alive for good. The age keeps a capture under way (here or on a host sharing
        the store) safe: its ref is seconds old when its image commits."""
        now, dropped = time.time(), []
        names = self.images.names()
        for obj in self.store.backend.list(REFS + "images/"):
            ref = obj.key[len(REFS):]
            image = ref.split("/")[1]
            if ref == memory_ref(image) and image not in names and now - obj.mtime >= grace:
                self.store.delete_ref(ref)
                dropped.append(image)
        if dropped:
            log.info("dropped the memory of captures that never committed: %s", ", ".join(dropped))
        return dropped

    async def reconcile_lent(self) -> list[str]:
        """Give back lent addresses whose VM no peer has any more (the host it ended on could
        not tell this one when it was destroyed). One a peer that cannot be asked might have
        stays lent. The addresses given back."""
        freed = []
        for row in self.registry.lent():
            if await self.peers.has_vm(row.vm) is False and self.registry.release(row.ip, row.vm):
                freed.append(row.ip)
        if freed:
            log.info("gave back addresses lent to VMs no peer has: %s", ", ".join(freed))
        return freed

    async def _lent_loop(self) -> None:
        """Now and then, reconcile_lent: a lent address whose VM is gone does not stay lent for good."""
        while True:
            await asyncio.sleep(LENT_RECONCILE_S)
            if self.registry.lent():
                try:
                    await self.reconcile_lent()
                except Exception:  # the next round tries again; the agent goes on
                    log.exception("reconciling lent addresses failed")

    async def _gc_loop(self) -> None:
        """Run the store GC every gc_interval_s (a store shared by hosts may run it on each)."""
        while True:
            await asyncio.sleep(self.settings.gc_interval_s)
            with contextlib.suppress(StoreError, OSError):
                await self.collect_garbage()
