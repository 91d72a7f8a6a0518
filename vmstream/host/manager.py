"""HostManager: every VM and live-image operation on this host.

It is the one owner of the host's QEMU processes: each VM row in the
database names a QemuProcess, and every operation that starts one either
finishes with the VM recorded as running or stops it and removes its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from vmstream import __version__
from vmstream.capture import apply_delta, capture_vm
from vmstream.config import check_name, parse_memory, parse_size
from vmstream.errors import Conflict, GuestError, InvalidInput, NotFound, QemuError
from vmstream.guest import GuestArtifacts, build_guest
from vmstream.guest.channel import ask_guest
from vmstream.guest.identity import CloneIdentity, check_params
from vmstream.guest.qga import qga
from vmstream.guest.rootfs import build_rootfs
from vmstream.guest.status import get_status
from vmstream.host import disks, footprint, network
from vmstream.host.db import VmRecord, open_db
from vmstream.host.machines import machine_from_json
from vmstream.host.migration import Migrations
from vmstream.host.schemas import HostInfo, ImageInfo, StartResult, VmInfo
from vmstream.image import GuestConfig, ImageRepository, LiveImage
from vmstream.memfs import memory_ref
from vmstream.memfs.mount import MemfsMount
from vmstream.qemu import AccelChoice, MachineSpec, QemuProcess, TapNic, choose_accelerator, qemu_version
from vmstream.store import ChunkStore, StoreError, collect_garbage
from vmstream.store.gc import DEFAULT_GRACE
from vmstream.store.peer import PeerBackend
from vmstream.store.spec import open_backend

BOOT_TIMEOUT_S = 240.0
CLONE_TIMEOUT_S = 90.0
# A probe sent while a booting guest's network is not up yet hangs (slirp gets no answer to
# its ARP) until the probe gives up: with 2 s per probe, boots were seen as 8.1, 10.2 or 12.2 s.
BOOT_PROBE_S = 0.25
HTTP_HEDGE_S = 0.2  # a single clone's status probe unanswered this long after its identity gets a second one
HOOKS_TIMEOUT_S = 300.0
WORKING_SET_RECORD_S = 2.0  # how long after a clone answers its chunk touches are recorded
WORKING_SET = "workingset.json"
# Memory chunks of 64 KiB: a page fault on a cold host fetches 16 pages, not 64
# (an idle 256 MiB clone touches scattered pages), and 16 GiB is 256 K chunks.
MEMORY_CHUNK = 64 << 10
# TCG translation cache of a clone. An idle clone fills ~19 MiB of a 64 MiB cache
# within seconds of resuming, all of it private: with 8 MiB a clone's own memory
# is ~33 MiB instead of ~45 (bench density). Booted VMs keep 64 MiB for boot speed.
CLONE_TB_MIB = int(os.environ.get("VMSTREAM_CLONE_TB_MIB", "8"))
# A clone's capture is stored as a delta over its root image unless the delta
# is larger than this fraction of the root's stored memory; then it is flattened.
FLATTEN_FRACTION = 0.5
# Per live image, this many clone QEMUs are kept started, their device state loaded and
# paused, so a clone start skips QEMU's own start and the state load; 0 turns it off.
POOL_SIZE = int(os.environ.get("VMSTREAM_CLONE_POOL", "1"))
POOL_IMAGES = int(os.environ.get("VMSTREAM_CLONE_POOL_IMAGES", "4"))  # images with a pool, most recently started
POOL_WAIT_S = 2.0  # a single start waits this long for a pooled QEMU being prepared (further along than a new one)
POOL_RUN_THROUGH = os.environ.get("VMSTREAM_CLONE_POOL_RUN_THROUGH", "1") != "0"  # see _run_through
# A pooled QEMU that ran through a start holds ~14k translated blocks, 7.7-8.1 MB of host code
# for the demo guest (QMP 'info jit'); its start adds ~1 MB. CLONE_TB_MIB would overflow at
# about the end of the run-through and the flush then drops what the start needs (it then
# takes 0.1-0.2 s instead of 0.05); 10 leaves room, at up to 2 MiB more private memory than
# a clone started anew, 16 up to 8 MiB.
POOL_TB_MIB = int(os.environ.get("VMSTREAM_CLONE_POOL_TB_MIB", "10"))
POOL_PREFIX = ".pool-"  # pooled rows' names: never a valid VM name, so never listed or taken by a user
# Clones started together run their clone.d hooks once all of them serve; 0 turns this off.
DEFER_HOOKS = os.environ.get("VMSTREAM_BATCH_DEFER_HOOKS", "1") != "0"
# Store garbage collection: how often the agent runs it (0: never; `vmstream host --gc` runs it
# by hand). A pack is deleted two runs apart, at least GC_GRACE_S after it was condemned.
GC_INTERVAL_S = float(os.environ.get("VMSTREAM_GC_INTERVAL_S", "3600"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


class _Batch:
    """Clones started by one request. Under TCG a clone's hooks cost several times
    its start (1.5 CPU-s for the demo hook against 0.25 s: every fork and exec in a
    restored guest is translated anew). Run while siblings are still resuming,
    they take the CPU those need, so a batch's hooks start once all of it serves."""

    def __init__(self, size: int) -> None:
        self.defer_hooks = size > 1 and DEFER_HOOKS
        self.hedge_http = size == 1  # in a burst a second status probe costs the siblings more than it saves
        self.done = asyncio.Event()

    def finish(self) -> None:
        self.done.set()


def _identity_answer(answer: dict[str, Any]) -> bool:
    """The agent's answer to an identity or prepare (or its error), not a stale answer
    the image's channel still held (say, to a status query)."""
    return "hostname" in answer or not answer.get("ok", True)


class HostManager:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.run_root = data_dir / "run"
        self.run_root.mkdir(parents=True, exist_ok=True)
        store_spec = os.environ.get("VMSTREAM_STORE") or str(data_dir / "store")
        self.store = ChunkStore(open_backend(store_spec), chunk_size=MEMORY_CHUNK)
        self.memfs = MemfsMount(data_dir, store_spec, parse_size(os.environ.get("VMSTREAM_CACHE_SIZE", "8G")))
        self.images = ImageRepository(data_dir / "images", self.memfs.mountpoint, self.store.backend)
        self._recording: set[str] = set()
        self.session = open_db(data_dir / "state.db")
        self.net = network.from_env()  # None: slirp, each VM on a port of 127.0.0.1
        self._procs: dict[str, QemuProcess] = {}
        self._alloc_lock = asyncio.Lock()
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool: dict[str, list[str]] = {}  # image -> names of its pooled rows, ready to take
        self._pool_fills: dict[str, asyncio.Task[None]] = {}
        self._pool_added = asyncio.Condition()
        self.migrations = Migrations(self)

    # ---- guest and accelerator -------------------------------------------------

    def guest(self, kernel: Path | None = None, force: bool = False) -> GuestArtifacts:
        return build_guest(self.data_dir / "guest", kernel, force)

    def accelerator(self, guest: GuestArtifacts) -> AccelChoice:
        return choose_accelerator(guest.kernel, self.data_dir / "accel.json")

    async def info(self) -> HostInfo:
        guest = await asyncio.to_thread(self.guest)
        accel = await asyncio.to_thread(self.accelerator, guest)
        return HostInfo(
            version=__version__, data_dir=str(self.data_dir), qemu_version=qemu_version(),
            accelerator=accel.accel, accelerator_reason=accel.reason,
            guest={"key": guest.key, "kernel_release": guest.kernel_release, "kernel": str(guest.kernel), "initrd": str(guest.initrd)},
        )

    # ---- records ---------------------------------------------------------------

    def _record(self, name: str) -> VmRecord:
        with self.session() as s:
            rec = s.get(VmRecord, name)
        if rec is None or rec.state == "pooled":
            raise NotFound(f"no VM named '{name}': see 'vmstream list'")
        return rec

    def _records(self, parent_image: str | None = None, pooled: bool = False) -> list[VmRecord]:
        """The VMs; pooled=True also the pool's paused QEMUs (which map image memory too)."""
        with self.session() as s:
            q = select(VmRecord).order_by(VmRecord.created_at)
            if not pooled:
                q = q.where(VmRecord.state != "pooled")
            if parent_image is not None:
                q = q.where(VmRecord.parent_image == parent_image)
            return list(s.scalars(q))

    def _proc(self, rec: VmRecord) -> QemuProcess:
        proc = self._procs.get(rec.name)
        if proc is None or proc.vm_id != rec.vm_id:
            proc = QemuProcess(rec.vm_id, Path(rec.rundir), rec.pid)
            self._procs[rec.name] = proc
        return proc

    def _update(self, name: str, **values: Any) -> None:
        with self.session() as s:
            rec = s.get(VmRecord, name)
            if rec is not None:
                for k, v in values.items():
                    setattr(rec, k, v)
                s.commit()

    def _delete_record(self, name: str) -> None:
        """Drop a VM's row (its QEMU already stopped), and its tap on a bridged host."""
        with self.session() as s:
            rec = s.get(VmRecord, name)
            if rec is not None:
                s.delete(rec)
                s.commit()
        self._procs.pop(name, None)
        if rec is not None and rec.ip and self.net is not None:
            self.net.remove_tap(rec.vm_id)

    def _start_qemu(self, rec: VmRecord, proc: QemuProcess, spec: MachineSpec) -> None:
        """Start a VM's QEMU; on a bridged host its tap first (QEMU attaches to it by name)."""
        if spec.tap is not None and self.net is not None:
            self.net.create_tap(rec.vm_id)
        proc.start(spec)
        self._update(rec.name, pid=proc.pid)

    @property
    def vm_netns(self) -> str | None:
        """The network namespace this host's VMs (and their migration streams) live in."""
        return self.net.netns if self.net else None

    def tap_for(self, vm_id: str, ip: str) -> TapNic | None:
        """The bridged NIC of a VM with this vm_id and address; None on a slirp host."""
        if self.net is None:
            return None
        return TapNic(self.net.tap_name(vm_id), ip, self.net.netmask, self.net.gateway, self.net.netns)

    async def _reserve(
        self, names: list[str], *, identity: dict[str, str] | None = None, state: str = "starting", **common: Any
    ) -> list[VmRecord]:
        """Insert rows for names ('starting', or 'incoming' for a VM migrating here),
        all or none: this claims the names and ports. identity (hostname, mac,
        vmgenid) is kept for a migrating VM; others get a new one."""
        async with self._alloc_lock:
            with self.session() as s:
                taken = set(s.scalars(select(VmRecord.name).where(VmRecord.name.in_(names))))
                if taken:
                    raise Conflict(f"a VM named '{sorted(taken)[0]}' already exists: choose another name or destroy it first")
                used = set(s.scalars(select(VmRecord.http_port)))
                used_ips = set(s.scalars(select(VmRecord.ip)))
                free_ips = [a for a in self.net.addresses() if a not in used_ips] if self.net else []
                recs = []
                for name in names:
                    port = _free_port()
                    while port in used:
                        port = _free_port()
                    used.add(port)
                    vm_id = uuid.uuid4().hex[:12]
                    # every VM gets its own identity: hostname, MAC, VM Generation ID
                    ident = dict(identity or {"hostname": name, "mac": _random_mac(), "vmgenid": str(uuid.uuid4())})
                    if self.net is not None and not ident.get("ip"):
                        if not free_ips:
                            raise Conflict(f"no free VM address left in {self.net.first}-{self.net.last} "
                                           "(VMSTREAM_VM_ADDRESSES): destroy a VM or give this host a larger range")
                        ident["ip"] = free_ips.pop(0)
                    recs.append(VmRecord(name=name, vm_id=vm_id, state=state, http_port=port,
                                         rundir=str(self.run_root / vm_id), **ident, **common))
                s.add_all(recs)
                try:
                    s.commit()
                except IntegrityError as exc:
                    raise Conflict(f"VM names {names} are already taken") from exc
                return recs

    def _info(self, rec: VmRecord, with_footprint: bool = False) -> VmInfo:
        if rec.state == "running" and not self._proc(rec).alive():
            self._update(rec.name, state="exited")  # it died under us: say so, keep the row for destroy
            rec.state = "exited"
        fp = None
        if with_footprint and rec.pid and rec.state == "running":
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fp = footprint.measure(rec.pid, rec.memory_bytes)
        return VmInfo(
            name=rec.name, state=rec.state, endpoint=f"http://{rec.ip}/" if rec.ip else f"http://127.0.0.1:{rec.http_port}/",
            pid=rec.pid,
            memory_bytes=rec.memory_bytes, cpus=rec.cpus, accel=rec.accel, parent_image=rec.parent_image,
            ready_s=rec.ready_s, created_at=rec.created_at, footprint=fp, hostname=rec.hostname, mac=rec.mac,
            vmgenid=rec.vmgenid, identity_applied_s=rec.identity_applied_s, migrated_from=rec.migrated_from, disk=rec.disk,
            hooks=json.loads(rec.hooks) if rec.hooks else None, phases=json.loads(rec.phases) if rec.phases else None,
        )

    # ---- lifecycle ---------------------------------------------------------------

    async def reattach(self) -> dict[str, int]:
        """At agent start: adopt VMs still running; remove half-started ones."""
        adopted = exited = removed = 0
        self._spawn(self.gc_loop())
        if any(r.parent_image for r in self._records(pooled=True)):
            await self.memfs.ensure()  # clones' memory: a no-op if the daemon outlived the agent
        for rec in self._records(pooled=True):
            proc = self._proc(rec)
            if rec.state in ("starting", "incoming", "pooled"):
                await proc.stop()
                self._delete_record(rec.name)
                removed += 1
            elif proc.alive():
                adopted += 1
                if rec.parent_image and not rec.hooks:  # its batch's hooks may still wait for the agent that died
                    self._spawn(self._start_hooks(proc))
            else:
                self._update(rec.name, state="exited")
                exited += 1
        return {"adopted": adopted, "exited": exited, "removed_half_started": removed}

    async def _wait_http(self, rec: VmRecord, proc: QemuProcess, timeout: float, attempt_s: float = 2.0) -> dict[str, Any]:
        """Poll the guest's status page until it answers; fail fast if QEMU dies.
        attempt_s: how long one probe may wait for its answer."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                if rec.ip:  # bridged: the guest's own address, reached from the VMs' namespace
                    body = await get_status(80, rec.ip, timeout=attempt_s, netns=self.vm_netns)
                else:
                    body = await get_status(rec.http_port, timeout=attempt_s)
                if "counter" in body:
                    return body
            if not proc.alive():
                raise QemuError(f"VM {rec.name}'s QEMU exited before the guest answered HTTP: {proc.log_tail() or 'no output'}")
            if time.monotonic() > deadline:
                raise QemuError(f"VM {rec.name} did not answer HTTP within {timeout:.0f}s; serial log: {proc.serial_path}")
            await asyncio.sleep(0.005)

    async def _clone_answer(self, rec: VmRecord, proc: QemuProcess, http: asyncio.Task[dict[str, Any]],
                            hedge: bool) -> dict[str, Any]:
        """The clone's first HTTP answer, once its identity is applied.

        The probe started while the guest was still resuming. If its SYN-ACK went out
        to the image's MAC just before the guest took its new one, slirp resends only
        after ~2 s; so a probe still unanswered HTTP_HEDGE_S after the identity gets
        one more beside it (new MAC, known to slirp from the guest's gratuitous ARP),
        and the first answer wins. Not in a burst, where probes cost the guests."""
        done, _ = await asyncio.wait({http}, timeout=HTTP_HEDGE_S if hedge else None)
        if done:
            return http.result()
        second = asyncio.create_task(self._wait_http(rec, proc, CLONE_TIMEOUT_S))
        try:
            done, _ = await asyncio.wait({http, second}, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            second.cancel()

    @contextlib.asynccontextmanager
    async def _starting(self, rec: VmRecord) -> AsyncIterator[QemuProcess]:
        """Own a starting VM: on any failure (or cancellation) stop it and drop its row."""
        proc = self._proc(rec)
        try:
            yield proc
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.stop())
            self._delete_record(rec.name)
            raise

    async def boot(self, name: str, memory: str, cpus: int, guest_agent: str = "native", disk: str | None = None) -> VmInfo:
        """Cold-boot the demo guest, or a disk guest; return once it answers HTTP."""
        check_name(name)
        memory_bytes = parse_memory(memory)
        t0 = time.perf_counter()
        base = await self._disk_base(disk) if disk else None
        guest = await asyncio.to_thread(self.guest)
        accel = await asyncio.to_thread(self.accelerator, guest)
        (rec,) = await self._reserve(
            [name], memory_bytes=memory_bytes, cpus=cpus, kernel=str(guest.kernel), initrd=str(guest.initrd),
            accel=accel.accel, parent_image=None,
        )
        async with self._starting(rec) as proc:
            if base is not None:
                rec.disk, rec.disk_base = str(await disks.overlay(base, Path(rec.rundir))), str(base)
                self._update(name, disk=rec.disk, disk_base=rec.disk_base)
            spec = self._spec(rec)
            if guest_agent == "portable":
                spec = dataclasses.replace(spec, extra_append=("vmstream.agent=sh",))
            self._start_qemu(rec, proc, spec)
            await self._wait_http(rec, proc, BOOT_TIMEOUT_S, attempt_s=BOOT_PROBE_S)
            ready = time.perf_counter() - t0
            self._update(name, state="running", ready_s=ready)
        return self._info(self._record(name))

    def _spec(self, rec: VmRecord, image: LiveImage | None = None) -> MachineSpec:
        """The VM's command line; a clone's is its image's but for port, MAC, vmgenid and memory file.
        A VM that migrated here runs with the machine it came with."""
        if rec.spec:
            return machine_from_json(rec.spec)
        return MachineSpec(disk=Path(rec.disk) if rec.disk else None,
            vm_id=rec.vm_id, hostname=image.guest.hostname if image else rec.hostname, memory_bytes=rec.memory_bytes,
            cpus=rec.cpus, kernel=Path(rec.kernel), initrd=Path(rec.initrd), accel=rec.accel, http_port=rec.http_port,
            mac=rec.mac, vmgenid=rec.vmgenid, memory_file=self.images.memory_path(image) if image else None,
            tap=self.tap_for(rec.vm_id, rec.ip) if rec.ip else None,
            incoming=image is not None, tb_mib=CLONE_TB_MIB if image else MachineSpec.tb_mib,
            guest_announce=image.guest.guest_announce if image else MachineSpec.guest_announce,
        )

    def _guest_announce(self, rec: VmRecord) -> bool:
        """Whether the VM's NIC has guest announce (an image's clones must have the same)."""
        if rec.spec:
            return machine_from_json(rec.spec).guest_announce
        if rec.parent_image and self.images.exists(rec.parent_image):
            return self.images.get(rec.parent_image).guest.guest_announce
        return MachineSpec.guest_announce

    async def _disk_base(self, disk: str) -> Path:
        """The image a disk guest boots from: a path, or 'debian' (built on first use)."""
        if disk == "debian":
            return await asyncio.to_thread(build_rootfs, self.data_dir / "guest" / "rootfs")
        path = Path(disk).absolute()
        if not path.is_file():
            raise InvalidInput(f"disk image {disk} not found: give a raw or qcow2 file, or 'debian' for the built Debian guest")
        return path

    async def qga(self, name: str, execute: str, arguments: dict[str, Any] | None, timeout: float) -> Any:
        rec = self._record(name)
        if not rec.disk:
            raise InvalidInput(f"VM {name} is not a disk guest: qemu-guest-agent runs in disk guests only")
        return await qga(self._proc(rec).rundir / "qga.sock", execute, arguments, timeout)

    async def destroy(self, name: str) -> None:
        rec = self._record(name)
        await self._proc(rec).stop()
        self._delete_record(name)

    async def destroy_all(self) -> int:
        recs = self._records()
        await self.drain_pool()
        await asyncio.gather(*(self.destroy(r.name) for r in recs))
        await self.memfs.stop()
        return len(recs)

    def list_vms(self) -> list[VmInfo]:
        return [self._info(r) for r in self._records()]

    def show(self, name: str) -> VmInfo:
        return self._info(self._record(name), with_footprint=True)

    async def ask(self, name: str, command: str, timeout: float) -> dict[str, Any]:
        rec = self._record(name)
        if rec.state != "running":
            raise Conflict(f"VM {name} is {rec.state}, not running")
        return await ask_guest(self._proc(rec).agent_path, command, timeout)

    # ---- live images ---------------------------------------------------------------

    def _image_lock(self, name: str) -> asyncio.Lock:
        return self._image_locks.setdefault(name, asyncio.Lock())

    def _image_info(self, image: LiveImage) -> ImageInfo:
        return ImageInfo(
            name=image.name, created_at=image.created_at, source_vm=image.source_vm,
            parent_image=image.parent_image, memory_bytes=image.guest.memory_bytes,
            memory_bytes_stored=image.memory_bytes_stored, devstate_bytes=image.devstate_bytes,
            pause_ms=image.pause_ms, clones=len(self._records(parent_image=image.name)),
            layout=image.layout, memory_root=image.memory_root, source_private_bytes=image.source_private_bytes,
        )

    async def create_image(self, vm: str, name: str, flatten: bool | None = None) -> ImageInfo:
        """Capture a running VM into a new live image; the VM keeps running.

        From a clone the image is a delta over the clone's root image, unless
        flatten is True, or None and the delta is large (FLATTEN_FRACTION).
        """
        check_name(name, "live image")
        rec = self._record(vm)
        if rec.state != "running":
            raise Conflict(f"VM {vm} is {rec.state}: only a running VM can become a live image")
        proc = self._proc(rec)
        parent = self.images.get(rec.parent_image) if rec.parent_image else None
        async with self._image_lock(name):
            with self.images.staging(name) as stage:
                root_memory = self.images.memory_path(parent) if parent else None
                if flatten is None and root_memory is not None:
                    flatten_above: int | None = int(FLATTEN_FRACTION * os.stat(root_memory).st_blocks * 512)
                else:
                    flatten_above = -1 if flatten else None
                frozen: list[Path] = []
                paused = (lambda qmp: disks.freeze(qmp, Path(rec.rundir), frozen)) if rec.disk else None
                result = await capture_vm(proc, rec.memory_bytes, stage, root_memory, flatten_above, paused)
                if frozen:  # the disk as it was in the pause; the VM now writes to a new overlay
                    self._update(vm, disk=str(frozen[1]))
                    assert rec.disk_base is not None
                    await disks.layer(frozen[0], Path(rec.disk_base), stage / disks.LAYER)
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
                        qemu_version=qemu_version(), disk=bool(rec.disk), guest_announce=self._guest_announce(rec),
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
        return self._image_info(image)

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

    def list_images(self) -> list[ImageInfo]:
        return [self._image_info(i) for i in self.images.all()]

    def image_servers(self, name: str) -> list[VmInfo]:
        self.images.get(name)
        return [self._info(r) for r in self._records(parent_image=name)]

    async def delete_image(self, name: str) -> None:
        async with self._image_lock(name):
            self.images.get(name)
            clones = self._records(parent_image=name)
            if clones:
                names = ", ".join(r.name for r in clones)
                raise Conflict(
                    f"live image '{name}' still has {len(clones)} clone(s) ({names}): destroy them first"
                )
            children = self.images.children(name)
            if children:
                names = ", ".join(i.name for i in children)
                raise Conflict(f"live image '{name}' has child images ({names}) made from its clones: delete them first")
            image = self.images.get(name)
            await self.drain_pool(name)
            await asyncio.to_thread(self.images.delete, name)
            if image.memory_ref is not None:
                with contextlib.suppress(StoreError):
                    await asyncio.to_thread(self.store.delete_ref, image.memory_ref)
            if self.memfs.pid() is not None:
                with contextlib.suppress(Exception):
                    await self.memfs.request("forget", image=name)

    async def start_clones(
        self, image_name: str, count: int, prefix: str | None,
        params: dict[str, str] | None = None, user_data: bytes | None = None, prefetch: bool = True,
        pool: bool = True,
    ) -> StartResult:
        """Start count clones in parallel; all start, or none is left behind."""
        t0 = time.perf_counter()
        params = params or {}
        check_params(params)
        image = self.images.get(image_name)
        prefix = check_name(prefix or image_name, "clone name prefix")
        g = image.guest
        for path in (g.kernel, g.initrd):
            if not Path(path).is_file():
                raise GuestError(f"live image '{image_name}' needs {path}, which is gone: rebuild the image")
        if g.qemu_version != qemu_version():
            raise InvalidInput(
                f"live image '{image_name}' was made with QEMU {g.qemu_version}, this host has {qemu_version()}"
            )
        existing = {r.name for r in self._records()}
        index, names = 1, list[str]()
        while len(names) < count:
            if f"{prefix}-{index}" not in existing:
                names.append(f"{prefix}-{index}")
            index += 1
        recs = await self._reserve(
            names, memory_bytes=g.memory_bytes, cpus=g.cpus, kernel=g.kernel, initrd=g.initrd,
            accel=g.accel, parent_image=image_name,
        )
        await self.memfs.ensure()
        record = await self._prepare_memory(image, prefetch)
        batch = _Batch(len(recs))
        if pool and len(recs) == 1:  # a batch does not hold its other clones back for one pooled QEMU
            await self._pool_wait(image_name)
        taken = [self._take_pooled(rec, image_name) if pool else (rec, False) for rec in recs]
        recs = [rec for rec, _ in taken]
        try:
            results = await asyncio.gather(
                *(self._start_clone(rec, image, t0, params, user_data, batch, pooled) for rec, pooled in taken),
                return_exceptions=True,
            )
            if any(isinstance(r, BaseException) for r in results) and (why := await self._memfs_error(image)):
                results = [QemuError(f"clones of '{image_name}' cannot run: reading the image memory failed ({why}); "
                                     "the clone was stopped and never ran on wrong memory")]
            if record:
                self._spawn(self._record_working_set(image, stop_after=WORKING_SET_RECORD_S))
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                await asyncio.gather(*(self.destroy(r.name) for r in recs if self._exists(r.name)), return_exceptions=True)
                raise errors[0]
            self.fill_pool(image_name)
            return StartResult(image=image_name, vms=[self._info(self._record(r.name)) for r in recs],
                               elapsed_s=time.perf_counter() - t0)
        finally:
            batch.finish()

    async def _prepare_memory(self, image: LiveImage, prefetch: bool) -> bool:
        """Prefetch the image's recorded working set if the host lacks it (REAP);
        with no working set yet, start recording one. Returns True if recording."""
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

    async def _record_working_set(self, image: LiveImage, stop_after: float) -> None:
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

    async def host_info(self) -> dict[str, Any]:
        """Per host: memory, the host chunk cache, per-image streaming counters, VM totals."""
        meminfo = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                meminfo[key] = int(value.split()[0]) * 1024
        vms = [self._info(r, with_footprint=True) for r in self._records()]
        fps = [v.footprint for v in vms if v.footprint is not None]
        memfs: dict[str, Any] = {"running": False}
        if self.memfs.pid() is not None:
            with contextlib.suppress(Exception):
                memfs = {"running": True, **(await self.memfs.request("stats"))}
        return {
            "mem_total_bytes": meminfo["MemTotal"], "mem_available_bytes": meminfo["MemAvailable"],
            "vms": len(vms), "running_vms": sum(v.state == "running" for v in vms),
            "vm_pss_bytes": sum(f.pss_bytes for f in fps),
            "vm_private_bytes": sum(f.anonymous_bytes for f in fps),
            "guest_ram_from_images_bytes": sum(f.guest_ram.image_bytes for f in fps if f.guest_ram),
            "store": str(self.store.backend), "memfs": memfs, "clone_pool": self.pool_info(),
        }

    async def drop_caches(self) -> dict[str, Any]:
        """Forget every image chunk this host holds: the chunk cache, and the page
        cache of memfs files no clone maps (a mapped one cannot be dropped)."""
        if self.memfs.pid() is None:
            return {"dropped": False}
        await self.drain_pool()  # pooled QEMUs map image memory: they would keep it cached
        await self.memfs.request("drop-cache")
        in_use = {(self.images.get(r.parent_image).memory_root or r.parent_image) for r in self._records() if r.parent_image}
        for name in self.images.names() - in_use:
            await self.memfs.request("invalidate", image=name)
        return {"dropped": True, "kept_page_cache_of": sorted(in_use)}

    async def collect_garbage(self, grace: float = DEFAULT_GRACE) -> dict[str, Any]:
        """Mark and sweep the store's packs (see vmstream.store.gc): deleted images' memory goes."""
        if isinstance(self.store.backend, PeerBackend):
            raise InvalidInput("this host streams from a peer's store: run the GC on the host that owns it")
        report = await asyncio.to_thread(collect_garbage, self.store, grace=grace)
        return dataclasses.asdict(report)

    async def gc_loop(self) -> None:
        """Run the store GC every GC_INTERVAL_S (a store shared by hosts may run it on each)."""
        if GC_INTERVAL_S <= 0 or isinstance(self.store.backend, PeerBackend):
            return
        while True:
            await asyncio.sleep(GC_INTERVAL_S)
            with contextlib.suppress(StoreError, OSError):
                await self.collect_garbage()

    async def _memfs_error(self, image: LiveImage) -> str | None:
        """Why memfs failed to read an image's memory, if it did: the clone died of it."""
        with contextlib.suppress(Exception):
            stats = await self.memfs.request("stats")
            err = stats.get("images", {}).get(image.memory_root or image.name, {}).get("last_error")
            return str(err) if err else None
        return None

    def _exists(self, name: str) -> bool:
        with self.session() as s:
            return s.get(VmRecord, name) is not None

    async def _start_clone(
        self, rec: VmRecord, image: LiveImage, t0: float, params: dict[str, str], user_data: bytes | None,
        batch: _Batch, pooled: bool,
    ) -> None:
        """QEMU on the image's memory, delta pages written in, device state loaded,
        new identity applied, and first HTTP answer; then hooks are watched.
        pooled: the QEMU was started ahead and is paused with all that loaded."""
        phases: dict[str, float] = {}

        def mark(phase: str) -> None:
            phases[phase] = round(time.perf_counter() - t0, 4)

        async with self._starting(rec) as proc:
            if pooled:
                mark("pool_taken")
            else:
                if image.guest.disk:  # its own overlay on the image's disk layer
                    layer = self.images.image_dir(image) / disks.LAYER
                    rec.disk, rec.disk_base = str(await disks.overlay(layer, Path(rec.rundir))), str(layer)
                    self._update(rec.name, disk=rec.disk, disk_base=rec.disk_base)
                self._start_qemu(rec, proc, self._spec(rec, image))
                mark("qemu_spawned")
            devstate = self.images.devstate_path(image)
            identity_task: asyncio.Task[dict[str, Any]] | None = None
            http_task: asyncio.Task[dict[str, Any]] | None = None
            try:
                async with proc.qmp() as qmp:
                    mark("qmp_ready")
                    if image.layout == "delta" and not pooled:
                        assert proc.pid is not None
                        await asyncio.to_thread(apply_delta, proc.pid, rec.memory_bytes, self.images.image_dir(image))
                        mark("delta_applied")
                    # The identity is queued on the guest channel before the guest runs, so
                    # the agent finds it as soon as it resumes. Its clock is set again,
                    # exactly, once the clone serves (_after_start).
                    await proc.wait_for_socket(proc.agent_path)
                    identity = CloneIdentity(rec.hostname, rec.mac, params, user_data, defer_hooks=batch.defer_hooks,
                                             ip=self._address(rec))
                    identity_task = asyncio.create_task(
                        ask_guest(proc.agent_path, identity.command(), timeout=CLONE_TIMEOUT_S,
                                  expect=_identity_answer)
                    )
                    if pooled:
                        await qmp.execute("cont")
                    else:
                        await qmp.execute("migrate-incoming", {"uri": f"exec:cat {devstate}"})
                        await proc.wait_incoming(qmp, CLONE_TIMEOUT_S)
                    mark("running")
                http_task = asyncio.create_task(self._wait_http(rec, proc, CLONE_TIMEOUT_S))
                answer = await identity_task
                mark("identity_applied")
                if isinstance(answer.get("us"), dict):  # the guest's own time, waking up and applying it
                    # ("woke" is -1 when the agent was not waiting for the host: not counted)
                    us = {k: v for k, v in answer["us"].items() if v >= 0}
                    phases["identity_in_guest"] = round(sum(us.values()) / 1e6, 4)
                    phases.update({f"guest_{k}": round(v / 1e6, 4) for k, v in {**us, **answer.get("steps_us", {})}.items()})
                if not answer.get("ok") or answer.get("hostname") != rec.hostname:
                    raise QemuError(f"clone {rec.name}: the guest agent did not apply the new identity: {answer}")
                self._update(rec.name, identity_applied_s=phases["identity_applied"])
                await self._clone_answer(rec, proc, http_task, batch.hedge_http)
            except (QMPError, OSError, EOFError) as exc:
                raise QemuError(f"clone {rec.name} failed while loading its device state: {proc.log_tail() or exc}") from exc
            except QemuError as exc:
                if proc.alive():
                    raise
                # the guest channel closed because QEMU is gone: say what it and the guest printed last
                raise QemuError(f"clone {rec.name}: QEMU exited while the clone started ({exc}); QEMU said: "
                                f"{proc.log_tail() or 'nothing'}; guest console: {proc.serial_tail() or 'nothing'}") from exc
            finally:
                for task in (identity_task, http_task):  # on failure, nothing keeps probing a stopped VM
                    if task is not None and not task.done():
                        task.cancel()
            mark("http_answered")
            self._update(rec.name, state="running", ready_s=phases["http_answered"], phases=json.dumps(phases))
        self._spawn(self._after_start(rec, proc, batch))

    # ---- clone pool: QEMUs started ahead, paused with an image's state loaded ----------

    def _take_pooled(self, rec: VmRecord, image_name: str) -> tuple[VmRecord, bool]:
        """rec with a ready pooled QEMU of the image taken over (its vm_id, run dir, port,
        MAC and VM Generation ID: all fresh, never used by a guest), and True; or rec, False."""
        ready = self._pool.get(image_name, [])
        while ready:
            pool_name = ready.pop(0)
            with self.session() as s:
                pool_rec = s.get(VmRecord, pool_name)
                if pool_rec is None:
                    continue
                if not self._proc(pool_rec).alive():  # it died while it waited: drop it (and its tap)
                    s.close()
                    self._delete_record(pool_name)
                    continue
                clone = s.get(VmRecord, rec.name)
                assert clone is not None
                fields = {f: getattr(pool_rec, f) for f in ("vm_id", "rundir", "http_port", "mac", "vmgenid", "pid", "ip")}
                s.delete(pool_rec)
                s.flush()  # its vm_id and port are unique: free them before the clone's row takes them
                for f, v in fields.items():
                    setattr(clone, f, v)
                s.commit()
            self._procs[clone.name] = self._procs.pop(pool_name)
            return clone, True
        return rec, False

    async def _pool_wait(self, image_name: str) -> None:
        """If the image's pool is being filled, wait a little for the QEMU on its way."""

        def settled() -> bool:
            return image_name not in self._pool_fills or bool(self._pool.get(image_name))

        if settled():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POOL_WAIT_S), self._pool_added:
                await self._pool_added.wait_for(settled)

    def fill_pool(self, image_name: str) -> None:
        """Start the image's pooled QEMUs in the background, up to POOL_SIZE; the pools of
        images started least recently go beyond POOL_IMAGES."""
        if POOL_SIZE <= 0:
            return
        self._pool[image_name] = self._pool.pop(image_name, [])  # most recently used last
        for old in list(self._pool)[:-POOL_IMAGES] if POOL_IMAGES > 0 else list(self._pool):
            self._spawn(self.drain_pool(old))
        if image_name in self._pool_fills:
            return
        task = asyncio.create_task(self._fill_pool(image_name))
        self._pool_fills[image_name] = task
        task.add_done_callback(lambda _t: self._pool_filled(image_name))

    async def _fill_pool(self, image_name: str) -> None:
        with contextlib.suppress(QemuError, NotFound, OSError, QMPError, EOFError):
            while len(self._pool.get(image_name, [])) < POOL_SIZE:
                image = self.images.get(image_name)
                if image.guest.disk:
                    return  # a disk clone needs its own overlay first: not pooled
                g = image.guest
                (rec,) = await self._reserve(
                    [POOL_PREFIX + secrets.token_hex(6)], state="pooled", memory_bytes=g.memory_bytes, cpus=g.cpus,
                    kernel=g.kernel, initrd=g.initrd, accel=g.accel, parent_image=image_name,
                )
                async with self._starting(rec) as proc:
                    spec = dataclasses.replace(self._spec(rec, image), start_paused=True)
                    if POOL_RUN_THROUGH:
                        spec = dataclasses.replace(spec, tb_mib=POOL_TB_MIB)
                    self._start_qemu(rec, proc, spec)
                    async with proc.qmp() as qmp:
                        if image.layout == "delta":
                            assert proc.pid is not None
                            await asyncio.to_thread(apply_delta, proc.pid, rec.memory_bytes, self.images.image_dir(image))
                        await qmp.execute("migrate-incoming", {"uri": f"exec:cat {self.images.devstate_path(image)}"})
                        await proc.wait_incoming(qmp, CLONE_TIMEOUT_S, resume=False)
                        if POOL_RUN_THROUGH:
                            await self._run_through(rec, proc, qmp)
                self._pool.setdefault(image_name, []).append(rec.name)
                async with self._pool_added:
                    self._pool_added.notify_all()

    async def _run_through(self, rec: VmRecord, proc: QemuProcess, qmp: QMPClient) -> None:
        """Run a pooled guest once through a clone's start, then pause it again.

        QEMU drops all translated code when it loads a state, so under TCG a clone's
        start is mostly translating anew the guest's resume, identity and network
        paths. Done here, before any request, that is off the start's path. The guest
        reseeds its RNG on this QEMU's new VM Generation ID, takes this QEMU's MAC and
        address (which the clone keeps: its start changes neither), and answers HTTP
        once. No hooks run and none of their inputs are written: the clone's identity
        brings those. An agent that does not know 'prepare' (images from before it)
        answers with an error, and the guest is paused again as it is."""
        prepare = CloneIdentity(rec.hostname, rec.mac, ip=self._address(rec)).command(verb="prepare")
        await proc.wait_for_socket(proc.agent_path)
        ask = asyncio.create_task(ask_guest(proc.agent_path, prepare, timeout=CLONE_TIMEOUT_S,
                                            expect=_identity_answer))
        try:
            await qmp.execute("cont")
            if (await ask).get("ok"):
                await self._wait_http(rec, proc, CLONE_TIMEOUT_S, attempt_s=0.5)
        finally:
            ask.cancel()
        await qmp.execute("stop")

    def _address(self, rec: VmRecord) -> str | None:
        """ADDRESS/PREFIX of a VM on a bridged host (None with user networking)."""
        return f"{rec.ip}/{self.net.prefix_len}" if rec.ip and self.net else None

    def _pool_filled(self, image_name: str) -> None:
        self._pool_fills.pop(image_name, None)

        async def wake() -> None:  # a start waiting on this fill stops waiting, even if it failed
            async with self._pool_added:
                self._pool_added.notify_all()

        self._spawn(wake())

    async def drain_pool(self, image_name: str | None = None) -> None:
        """Stop the pooled QEMUs (of one image, or all): before the image goes, or the agent."""
        names = [image_name] if image_name is not None else list({*self._pool, *self._pool_fills})
        for name in names:
            task = self._pool_fills.pop(name, None)
            if task is not None:
                task.cancel()  # a QEMU it was starting is stopped by _starting
                await asyncio.gather(task, return_exceptions=True)
            self._pool.pop(name, None)
        for rec in self._records(pooled=True):
            if rec.state == "pooled" and (image_name is None or rec.parent_image == image_name):
                await self._proc(rec).stop()
                self._delete_record(rec.name)

    def pool_info(self) -> dict[str, Any]:
        """Per image: pooled QEMUs ready to take, and the pids of all (also those being started)."""
        pids: dict[str, list[int]] = {}
        for r in self._records(pooled=True):
            if r.state == "pooled" and r.pid and r.parent_image:
                pids.setdefault(r.parent_image, []).append(r.pid)
        return {"ready": {name: len(ready) for name, ready in self._pool.items() if ready}, "pids": pids}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Cancel background work (hook collection, migrations) and stop the pool; VMs keep running."""
        await self.migrations.shutdown()
        await self.drain_pool()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not any(r.state != "exited" for r in self._records()):
            await self.memfs.stop()  # nothing maps image memory any more
        self.store.close()

    @staticmethod
    async def _start_hooks(proc: QemuProcess) -> None:
        """Run a clone's deferred hooks (a no-op where they already ran)."""
        with contextlib.suppress(QemuError):
            await ask_guest(proc.agent_path, "start-hooks", timeout=10, expect=lambda a: "started" in a or not a.get("ok", True))

    async def _after_start(self, rec: VmRecord, proc: QemuProcess, batch: _Batch) -> None:
        """Set the clone's clock exactly, start its hooks when its batch serves, then
        wait for them and keep their results."""
        with contextlib.suppress(QemuError):
            await ask_guest(proc.agent_path, f"clock {time.time():.9f}", timeout=10)
        if batch.defer_hooks:
            await batch.done.wait()
            await self._start_hooks(proc)
        if rec.disk:  # where the guest has qemu-guest-agent, it sets the clock too
            with contextlib.suppress(QemuError):
                await qga(proc.rundir / "qga.sock", "guest-set-time", {"time": time.time_ns()}, timeout=10)
        deadline = time.monotonic() + HOOKS_TIMEOUT_S
        while time.monotonic() < deadline and proc.alive():
            with contextlib.suppress(QemuError):
                answer = await ask_guest(proc.agent_path, "hooks", timeout=10)
                result = answer.get("result", {})
                if result.get("state") == "done":
                    self._update(rec.name, hooks=json.dumps(result))
                    return
            await asyncio.sleep(0.5)

