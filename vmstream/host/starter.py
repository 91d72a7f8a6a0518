"""Starter: the one owner of this host's QEMU processes.

Every QEMU start goes through it (boot, clone, pooled QEMU, incoming
migration), under one guard, `starting`, which stops the QEMU and drops the
VM's row on any failure or cancellation. It is also the only place that talks
to a VM's QEMU (QMP) and guest (agent channel, status page) on the agent's
behalf, so in-process tests replace this one class to run an agent without QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from vmstream.capture import CaptureResult, apply_delta, capture_vm
from vmstream.errors import InvalidInput, QemuError
from vmstream.guest import GuestArtifacts, build_guest
from vmstream.guest.channel import ask_guest, channel_errors
from vmstream.guest.readiness import STATUS, Readiness, parse_readiness, probe
from vmstream.host import disks, footprint
from vmstream.host.db import VmRecord
from vmstream.host.machines import machine_from_json
from vmstream.host.registry import VmRegistry, forwards, published
from vmstream.host.schemas import VmInfo
from vmstream.host.state import LIVE, VmState
from vmstream.image import ImageRepository, LiveImage
from vmstream.policy import check_room, parse_floor
from vmstream.qemu import AccelChoice, MachineSpec, QemuProcess, TapNic, choose_accelerator, tb_flushes
from vmstream.settings import Settings

CLONE_TIMEOUT_S = 90.0


def identity_answer(answer: dict[str, Any]) -> bool:
    """The agent's answer to an identity or prepare (or its error), not a stale answer
    the image's channel still held (say, to a status query)."""
    return "hostname" in answer or not answer.get("ok", True)


ATTEMPT_MAX_S = 16.0  # the longest one readiness probe waits for its answer
# query-migrate states in which QEMU is still writing a state save (or stopping one)
SAVE_UNDER_WAY = ("setup", "active", "device", "pre-switchover", "cancelling")


class Starter:
    process_class: Callable[[str, Path, int | None], QemuProcess] = QemuProcess

    def __init__(self, settings: Settings, registry: VmRegistry, images: ImageRepository) -> None:
        self.settings = settings
        self.registry = registry
        self.images = images
        self.net = registry.net  # None: slirp, each VM on a port of 127.0.0.1
        self._procs: dict[str, QemuProcess] = {}
        self._tap_fds: dict[str, int] = {}  # vm_id -> our descriptor of its tap (BridgedNet.open_tap)
        self._channels: dict[Path, asyncio.Lock] = {}  # a guest agent's channel -> one command at a time on it

    # ---- what this host runs -----------------------------------------------------

    def guest(self, kernel: Path | None = None, force: bool = False) -> GuestArtifacts:
        return build_guest(self.settings.home / "guest", kernel, force)

    def accelerator(self, guest: GuestArtifacts) -> AccelChoice:
        return choose_accelerator(guest.kernel, self.settings.home / "accel.json", self.settings.accel)

    @property
    def vm_netns(self) -> str | None:
        """The network namespace this host's VMs (and their migration streams) live in."""
        return self.net.netns if self.net else None

    def tap_for(self, vm_id: str, ip: str) -> TapNic | None:
        """The bridged NIC of a VM with this vm_id and address; None on a slirp host."""
        if self.net is None:
            return None
        return TapNic(self.net.tap_name(vm_id), ip, self.net.netmask, self.net.gateway, self.net.netns)

    def address(self, rec: VmRecord) -> str | None:
        """ADDRESS/PREFIX of a VM on a bridged host (None with user networking)."""
        return f"{rec.ip}/{self.net.prefix_len}" if rec.ip and self.net else None

    # ---- processes -----------------------------------------------------------------

    def proc(self, rec: VmRecord) -> QemuProcess:
        """The QEMU of a row (adopted by pid after an agent restart)."""
        proc = self._procs.get(rec.name)
        if proc is None or proc.vm_id != rec.vm_id:
            proc = self.process_class(rec.vm_id, Path(rec.rundir), rec.pid)
            self._procs[rec.name] = proc
        return proc

    def hand_over(self, from_name: str, to_name: str) -> None:
        """A pooled QEMU now belongs to a VM row (see VmRegistry.take_over)."""
        self._procs[to_name] = self._procs.pop(from_name)

    def spec(self, rec: VmRecord, image: LiveImage | None = None) -> MachineSpec:
        """The VM's command line; a clone's is its image's but for port, MAC, vmgenid and memory file.
        A VM that migrated here runs with the machine it came with."""
        if rec.spec:
            return machine_from_json(rec.spec)
        s = self.settings
        return MachineSpec(
            disk=Path(rec.disk) if rec.disk else None, vm_id=rec.vm_id, hostname=image.guest.hostname if image else rec.hostname,
            memory_bytes=rec.memory_bytes, cpus=rec.cpus, kernel=Path(rec.kernel) if rec.kernel else None,
            initrd=Path(rec.initrd) if rec.initrd else None, accel=rec.accel, append=rec.append, seed=Path(rec.seed) if rec.seed else None,
            http_port=rec.http_port, mac=rec.mac, vmgenid=rec.vmgenid, memory_file=self.images.memory_path(image) if image else None,
            tap=self.tap_for(rec.vm_id, rec.ip) if rec.ip else None,
            incoming=image is not None, tb_mib=s.clone_tb_mib if image else MachineSpec.tb_mib,
            guest_announce=image.guest.guest_announce if image else MachineSpec.guest_announce,
            kernel_header_only=s.clone_kernel_header_only, nothp=s.clone_nothp, balloon=bool(rec.balloon),
            forwards=forwards(rec), outbound=s.guest_outbound,
        )

    def admit(self, costs: list[int], what: str) -> None:
        """Refuse (Conflict, naming the shortfall) starts that would take the host's
        MemAvailable below VMSTREAM_HOST_MEMORY_FLOOR (vmstream.policy.admission)."""
        info = footprint.meminfo()
        floor = parse_floor(self.settings.host_memory_floor, info.get("MemTotal", 0))
        if floor > 0:
            check_room(info.get("MemAvailable", 0), floor, costs, what)

    @staticmethod
    def balloon(rec: VmRecord) -> bool:
        """Whether the VM's machine has a balloon (an image's clones must have the same)."""
        return machine_from_json(rec.spec).balloon if rec.spec else bool(rec.balloon)

    def guest_announce(self, rec: VmRecord) -> bool:
        """Whether the VM's NIC has guest announce (an image's clones must have the same)."""
        if rec.spec:
            return machine_from_json(rec.spec).guest_announce
        if rec.parent_image and self.images.exists(rec.parent_image):
            return self.images.get(rec.parent_image).guest.guest_announce
        return MachineSpec.guest_announce

    async def launch(self, rec: VmRecord, proc: QemuProcess, spec: MachineSpec) -> None:
        """Start a VM's QEMU; on a bridged host its tap first."""
        if spec.tap is not None:
            self.make_tap(rec.vm_id, proc)
        proc.start(spec)
        self.registry.update(rec.name, pid=proc.pid)

    def make_tap(self, vm_id: str, proc: QemuProcess) -> None:
        """A VM's tap on this host's bridge, and a descriptor of it that its QEMU gets (fd=)
        and the agent keeps, to hand on what waits on it after the VM moved (queued_frames)."""
        if self.net is None:
            return
        self.net.create_tap(vm_id)
        self._close_tap_fd(vm_id)
        proc.tap_fd = self._tap_fds[vm_id] = self.net.open_tap(vm_id)

    def _close_tap_fd(self, vm_id: str) -> None:
        fd = self._tap_fds.pop(vm_id, None)
        if fd is not None:
            os.close(fd)

    async def queued_frames(self, rec: VmRecord) -> list[bytes]:
        """After a move: the frames that reached the VM's tap here while it was stopped
        (BridgedNet.read_queued), for its new host to deliver; none without a bridge, or for a
        VM adopted after an agent restart (its descriptor went with the old agent)."""
        fd = self._tap_fds.get(rec.vm_id)
        if fd is None or self.net is None:
            return []
        return await asyncio.to_thread(self.net.read_queued, fd, rec.mac)

    async def deliver_frames(self, rec: VmRecord, frames: list[bytes]) -> int:
        """Give a VM that moved here the frames its old host kept for it (BridgedNet.deliver)."""
        if self.net is None or not rec.ip:
            raise InvalidInput(f"VM {rec.name} is not on a bridge here: there is nothing to deliver frames through")
        return await asyncio.to_thread(self.net.deliver, frames)

    @contextlib.asynccontextmanager
    async def starting(
        self, rec: VmRecord, cleanup: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[QemuProcess]:
        """Own a starting VM: on any failure (or cancellation) run cleanup, stop its QEMU
        and drop its row (and tap); its serial and QEMU logs go to logs_dir first (the
        errors name that place), so a boot or clone that failed can be looked into."""
        proc = self.proc(rec)
        try:
            yield proc
        except BaseException:
            with contextlib.suppress(Exception):
                if cleanup is not None:
                    await asyncio.shield(cleanup())
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.stop(keep=self._keep_logs(rec, proc)))
            self.remove_row(rec.name)
            raise

    def _keep_logs(self, rec: VmRecord, proc: QemuProcess) -> Callable[[], None]:
        def keep() -> None:
            out = self.logs_dir(rec)
            out.mkdir(parents=True, exist_ok=True)
            for log in (proc.serial_path, proc.log_path):
                if log.exists():
                    shutil.copyfile(log, out / log.name)

        return keep

    def remove_row(self, name: str, lent_to: str | None = None) -> None:
        rec = self.registry.delete(name, lent_to)
        proc = self._procs.pop(name, None)
        if proc is not None:
            self._channels.pop(proc.agent_path, None)
        if rec is not None:
            self._close_tap_fd(rec.vm_id)

    async def remove(self, rec: VmRecord, lent_to: str | None = None) -> None:
        """Stop a VM's QEMU (removing its run dir) and drop its row (lent_to: see VmRegistry.delete)."""
        await self.proc(rec).stop()
        self.remove_row(rec.name, lent_to)

    def image_boot(self, image: LiveImage) -> dict[str, Any]:
        """The row fields that give an image's clones its machine: kernel (or the
        firmware), initrd, command line, and its cloud-init seed."""
        g = image.guest
        seed = str(self.images.image_dir(image) / disks.SEED) if g.seed else None
        return {"kernel": g.kernel, "initrd": g.initrd, "append": g.append, "seed": seed, "balloon": g.balloon}

    async def overlay_disk(self, rec: VmRecord, base: Path) -> None:
        """A disk guest's own qcow2 overlay on base (a disk image or an image's disk layer)."""
        rec.disk, rec.disk_base = str(await disks.overlay(base, Path(rec.rundir))), str(base)
        self.registry.update(rec.name, disk=rec.disk, disk_base=rec.disk_base)

    def info(self, rec: VmRecord, with_footprint: bool = False) -> VmInfo:
        """The API's view of a VM; a VM whose QEMU died under us is marked exited."""
        if rec.state in LIVE and not self.proc(rec).alive():
            self.registry.set_state(rec.name, VmState.EXITED, only_if=LIVE)
            rec.state = VmState.EXITED
        fp = None
        if with_footprint and rec.pid and rec.state in LIVE:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fp = footprint.measure(rec.pid, rec.memory_bytes)
        return VmInfo(
            name=rec.name, state=VmState(rec.state),
            endpoint=f"http://{rec.ip}/" if rec.ip else f"http://127.0.0.1:{rec.http_port}/", pid=rec.pid,
            memory_bytes=rec.memory_bytes, cpus=rec.cpus, accel=rec.accel, parent_image=rec.parent_image,
            ready_s=rec.ready_s, created_at=rec.created_at, footprint=fp, hostname=rec.hostname, mac=rec.mac,
            vmgenid=rec.vmgenid, identity_applied_s=rec.identity_applied_s, migrated_from=rec.migrated_from, disk=rec.disk,
            hooks=json.loads(rec.hooks) if rec.hooks else None, phases=json.loads(rec.phases) if rec.phases else None,
            clock=json.loads(rec.clock) if rec.clock else None,
            ready=str(self.readiness(rec)), ports={str(g): h for g, h in published(rec).items()},
            boot="firmware" if not rec.kernel else ("vmstream" if rec.append is None else f"kernel {rec.kernel}"),
            cloud_init_seed=bool(rec.seed), balloon=self.balloon(rec),
        )

    # ---- the guest ---------------------------------------------------------------------

    async def ask(self, proc: QemuProcess, command: str, timeout: float,
                  expect: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """One command to the in-guest agent, after any other to it has its answer: the channel is one
        stream, and two commands on it at once (a user's and the hooks watcher's) could each read
        the other's answer. The wait counts in the timeout."""
        lock = self._channels.setdefault(proc.agent_path, asyncio.Lock())
        t0 = time.monotonic()
        with channel_errors("the guest agent", proc.agent_path, f"'{command}'", timeout, " (another command to it had not been answered)"):
            async with asyncio.timeout(timeout):
                await lock.acquire()
        try:
            return await ask_guest(proc.agent_path, command, max(timeout - (time.monotonic() - t0), 0.1), expect=expect)
        finally:
            lock.release()

    @staticmethod
    def readiness(rec: VmRecord) -> Readiness:
        """When the VM counts as ready (rows from before readiness existed: the demo status page)."""
        return parse_readiness(rec.ready) if rec.ready else STATUS

    def _probe_address(self, rec: VmRecord, ready: Readiness) -> tuple[str, int]:
        """Where a probe reaches the guest's readiness port: its own address on a bridge,
        else the host port slirp forwards to it."""
        guest_port = ready.guest_port or 80
        if rec.ip:
            return rec.ip, guest_port
        if guest_port == 80:
            return "127.0.0.1", rec.http_port
        host_port = published(rec).get(guest_port)
        if host_port is None:
            raise InvalidInput(f"VM {rec.name}'s readiness {ready} needs guest port {guest_port} published (--publish {guest_port})")
        return "127.0.0.1", host_port

    def logs_dir(self, rec: VmRecord) -> Path:
        """Where a failed start's serial and QEMU logs are kept (its run dir goes with it)."""
        return self.settings.home / "logs" / f"{rec.name}-{rec.vm_id}"

    async def wait_ready(self, rec: VmRecord, proc: QemuProcess, timeout: float, attempt_s: float = 2.0,
                         ready: Readiness | None = None) -> None:
        """Probe the guest until it is ready (its readiness check); fail fast if QEMU dies.
        attempt_s: how long the first probe may wait for its answer. Each one that goes
        unanswered waits longer (up to ATTEMPT_MAX_S): an app that needs more than
        attempt_s to answer (a guest slowed by a busy host, its memory still coming in)
        would otherwise be asked anew forever and never be found ready."""
        ready = ready or self.readiness(rec)
        host, port = self._probe_address(rec, ready)
        netns = self.vm_netns if rec.ip else None
        deadline = time.monotonic() + timeout
        attempt = attempt_s
        while True:
            asked = time.monotonic()
            if await probe(ready, host, port, proc.agent_path, min(attempt, max(0.1, deadline - asked)), netns, bridged=bool(rec.ip)):
                return
            if time.monotonic() - asked >= attempt * 0.9:  # it waited out its time, not refused at once
                attempt = min(attempt * 2, ATTEMPT_MAX_S)
            if not proc.alive():
                raise QemuError(f"VM {rec.name}'s QEMU exited before the guest was ready ({ready}): "
                                f"QEMU said: {proc.log_tail() or 'nothing'}; guest console: {proc.serial_tail() or 'nothing'}; "
                                f"logs kept in {self.logs_dir(rec)}")
            if time.monotonic() > deadline:
                raise QemuError(f"VM {rec.name} was not ready ({ready}) within {timeout:.0f}s; guest console's last lines: "
                                f"{proc.serial_tail() or 'nothing'}; logs kept in {self.logs_dir(rec)}")
            await asyncio.sleep(0.005 if ready.kind != "agent" else 0.05)

    # ---- state loads and captures (QMP) ------------------------------------------------

    async def resume_clone(
        self, rec: VmRecord, proc: QemuProcess, image: LiveImage, identity: str, pooled: bool, mark: Callable[[str], None],
    ) -> asyncio.Task[dict[str, Any]]:
        """Load the image's state into a started clone QEMU (a pooled one has it: it is only
        continued) and resume it; the identity is queued on the guest channel before the
        guest runs, so the agent finds it as soon as it resumes. Returns the identity's answer task."""
        ask: asyncio.Task[dict[str, Any]] | None = None
        try:
            async with proc.qmp() as qmp:
                mark("qmp_ready")
                if image.layout == "delta" and not pooled:
                    assert proc.pid is not None
                    await asyncio.to_thread(apply_delta, proc.pid, rec.memory_bytes, self.images.image_dir(image))
                    mark("delta_applied")
                await proc.wait_for_socket(proc.agent_path)
                ask = asyncio.create_task(self.ask(proc, identity, CLONE_TIMEOUT_S, expect=identity_answer))
                if pooled:
                    await qmp.execute("cont")
                else:
                    await qmp.execute("migrate-incoming", {"uri": f"exec:cat {self.images.devstate_path(image)}"})
                    await proc.wait_incoming(qmp, CLONE_TIMEOUT_S)
                mark("running")
            return ask
        except BaseException:
            if ask is not None:
                ask.cancel()
            raise

    async def load_paused(self, rec: VmRecord, proc: QemuProcess, image: LiveImage) -> None:
        """A pooled QEMU: the image's delta and device state loaded, guest paused."""
        async with proc.qmp() as qmp:
            if image.layout == "delta":
                assert proc.pid is not None
                await asyncio.to_thread(apply_delta, proc.pid, rec.memory_bytes, self.images.image_dir(image))
            await qmp.execute("migrate-incoming", {"uri": f"exec:cat {self.images.devstate_path(image)}"})
            await proc.wait_incoming(qmp, CLONE_TIMEOUT_S, resume=False)

    async def run_through(self, rec: VmRecord, proc: QemuProcess, prepare: str) -> int | None:
        """Run a paused guest through `prepare` and one HTTP answer, then pause it again
        (see vmstream.host.pool). Returns TCG's translation cache flushes so far (None: not known)."""
        await proc.wait_for_socket(proc.agent_path)
        ask = asyncio.create_task(self.ask(proc, prepare, CLONE_TIMEOUT_S, expect=identity_answer))
        try:
            async with proc.qmp() as qmp:
                await qmp.execute("cont")
                if (await ask).get("ok") and not self.readiness(rec).after_identity:
                    await self.wait_ready(rec, proc, CLONE_TIMEOUT_S, attempt_s=0.5)
                await qmp.execute("stop")
                return await tb_flushes(qmp) if rec.accel != "kvm" else None
        finally:
            ask.cancel()

    async def run_state(self, rec: VmRecord, proc: QemuProcess, command: str) -> None:
        """Stop or continue a VM's vCPUs (QMP 'stop' / 'cont')."""
        try:
            async with proc.qmp() as qmp:
                await qmp.execute(command)
        except (QMPError, EOFError, OSError) as exc:
            raise QemuError(f"QEMU of VM {rec.name} did not take '{command}': {proc.log_tail() or exc}") from exc

    @staticmethod
    async def qemu_status(proc: QemuProcess) -> str | None:
        """QEMU's run state ('running', 'paused', ...), or None if its monitor does not answer."""
        with contextlib.suppress(QMPError, EOFError, OSError, TimeoutError):
            async with asyncio.timeout(5), proc.qmp() as qmp:
                status: dict[str, Any] = await qmp.execute("query-status")  # type: ignore[assignment]
                return str(status["status"])
        return None

    @staticmethod
    async def resume_if_paused(proc: QemuProcess) -> str | None:
        """Run a guest that an agent killed mid-capture left stopped: its state save (if still
        going) is cancelled first, as the image it was for is gone. The run state it resumed
        from, or None. A monitor that does not answer is left alone (reattach then takes the
        VM as it finds it)."""
        with contextlib.suppress(QMPError, EOFError, OSError, TimeoutError):
            async with asyncio.timeout(10), proc.qmp() as qmp:
                migration: dict[str, Any] = await qmp.execute("query-migrate")  # type: ignore[assignment]
                if migration.get("status") in SAVE_UNDER_WAY:
                    await qmp.execute("migrate_cancel")
                while migration.get("status") in SAVE_UNDER_WAY:
                    await asyncio.sleep(0.05)
                    migration = await qmp.execute("query-migrate")  # type: ignore[assignment]
                status: dict[str, Any] = await qmp.execute("query-status")  # type: ignore[assignment]
                if status["status"] in ("paused", "postmigrate", "finish-migrate"):
                    await qmp.execute("cont")
                    return str(status["status"])
        return None

    async def capture(
        self, rec: VmRecord, proc: QemuProcess, stage: Path, root_memory: Path | None, flatten_above: int | None,
    ) -> tuple[CaptureResult, list[Path]]:
        """Capture a running VM into stage; a disk guest's disk is frozen in the pause
        (returns [frozen layer, new overlay] for it)."""
        frozen: list[Path] = []
        paused = (lambda qmp: disks.freeze(qmp, Path(rec.rundir), frozen)) if rec.disk else None
        try:
            result = await capture_vm(proc, rec.memory_bytes, stage, root_memory, flatten_above, paused)
        except (QMPError, EOFError) as exc:
            raise QemuError(f"capturing VM {rec.name} failed: {proc.log_tail() or exc}") from exc
        return result, frozen

    @staticmethod
    def pooled_spec(spec: MachineSpec, tb_mib: int | None) -> MachineSpec:
        """A pooled QEMU's machine: started paused, with a bigger TCG cache if it runs through."""
        spec = dataclasses.replace(spec, start_paused=True)
        return dataclasses.replace(spec, tb_mib=tb_mib) if tb_mib else spec
