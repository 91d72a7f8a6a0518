"""Moving VMs to this host: the destination side of a migration.

The source's agent asks this one to get ready (prepare): the VM's name is
reserved here ('incoming'), and a QEMU started through the Starter's guard waits
for the stream. The source then polls it, waits for it to run and has it
announce itself; or removes it when it gives up. An incoming VM whose source
never finishes is removed after INCOMING_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from vmstream.config import check_name
from vmstream.errors import GuestError, InvalidInput, NotFound
from vmstream.host.machines import machine_from_dict, machine_to_dict, machine_to_json
from vmstream.host.registry import VmRegistry, forwards
from vmstream.host.schemas import IncomingAnswer, IncomingRequest, IncomingStatus, VmInfo
from vmstream.host.starter import Starter
from vmstream.host.state import VmState
from vmstream.host.tasks import Tasks, log, operation
from vmstream.image import ImageRepository, LiveImage
from vmstream.memfs.mount import MemfsMount
from vmstream.migrate import DeltaTarget, LocalTarget, live_target_spec, prepare_live_target
from vmstream.qemu import MachineSpec
from vmstream.settings import Settings

INCOMING_TIMEOUT_S = 600.0


@dataclass
class Incoming:
    """A VM this host is receiving: its row (state 'incoming') and QEMU."""

    name: str
    mode: str
    target: LocalTarget
    delta: DeltaTarget | None = None
    deadline: float = field(default_factory=lambda: time.monotonic() + INCOMING_TIMEOUT_S)


class IncomingVms:
    def __init__(
        self, settings: Settings, registry: VmRegistry, starter: Starter, images: ImageRepository, memfs: MemfsMount, tasks: Tasks,
    ) -> None:
        self.listen_ip = settings.migration_address
        self.registry = registry
        self.starter = starter
        self.images = images
        self.memfs = memfs
        self.tasks = tasks
        self.incoming: dict[str, Incoming] = {}

    async def _mode(self, req: IncomingRequest, source: MachineSpec) -> tuple[str, LiveImage | None, Any, str]:
        """Check the VM can run here; the mode, image, guest and accelerator it runs with."""
        guest = await asyncio.to_thread(self.starter.guest)
        if guest.key != req.guest_key:
            raise GuestError(f"this host's guest build ({guest.key}) differs from the source's ({req.guest_key}): "
                             "both hosts must run the same vmstream version and guest kernel package")
        accel = (await asyncio.to_thread(self.starter.accelerator, guest)).accel
        if accel != source.accel:
            raise InvalidInput(f"VM {req.name} runs under {source.accel} on the source, this host uses {accel}")
        bridged, here = bool(req.identity.get("ip")), self.starter.net is not None
        if bridged != here:
            raise InvalidInput(
                f"VM {req.name} is on a {'bridged' if bridged else 'slirp'} network on the source, and this host's "
                f"VMs are on {'a bridge' if here else 'slirp'}: both hosts need the same kind (VMSTREAM_BRIDGE)")
        has_image = req.parent_image is not None and self.images.exists(req.parent_image)
        mode = req.mode
        if mode == "delta" and not has_image:
            raise InvalidInput(f"delta migration needs VM {req.name}'s live image ({req.parent_image or 'none: it was booted'}) "
                               "on this host's store; use --mode live")
        if mode == "auto":
            mode = "delta" if has_image else "live"
        image = self.images.get(req.parent_image) if mode == "delta" and req.parent_image else None
        return mode, image, guest, accel

    async def prepare(self, req: IncomingRequest) -> IncomingAnswer:
        """Reserve the VM's name here and start a QEMU waiting for it."""
        check_name(req.name)
        source = machine_from_dict(req.machine)
        mode, image, guest, accel = await self._mode(req, source)
        (rec,) = await self.registry.reserve(
            [req.name], identity=req.identity, state=VmState.INCOMING, memory_bytes=source.memory_bytes, cpus=source.cpus,
            kernel=str(guest.kernel), initrd=str(guest.initrd), accel=accel, parent_image=image.name if image else None,
            migrated_from=req.from_host, ready=req.ready, balloon=source.balloon,
            publish={g: 0 for _, g in source.forwards},  # this host's own ports for the guest's published ones
        )
        delta: DeltaTarget | None = None

        async def abort() -> None:
            if delta is not None:
                await delta.abort()

        async with operation(f"prepare incoming ({mode})", vm=rec.name), self.starter.starting(rec, abort) as proc:
            tap = self.starter.tap_for(rec.vm_id, rec.ip) if rec.ip else None  # its own address, on this host's bridge
            if tap is not None:
                self.starter.make_tap(rec.vm_id, proc)
            common: dict[str, Any] = {"vm_id": rec.vm_id, "http_port": rec.http_port, "kernel": guest.kernel,
                                      "initrd": guest.initrd, "tap": tap,
                                      "forwards": forwards(rec)}
            if image is not None:
                await self.memfs.ensure()
                base = {k: v for k, v in machine_to_dict(source).items() if k not in ("kind", "send_configuration")}
                spec: MachineSpec = dataclasses.replace(machine_from_dict({**base, "kind": "machine"}), **common,
                                                        memory_file=self.images.memory_path(image), incoming=True)
                delta = DeltaTarget(proc, spec, self.listen_ip, self.starter.vm_netns)
                host, port = await delta.prepare()
                answer = IncomingAnswer(mode="delta", host=host, port=port)
            else:
                spec = live_target_spec(source, **common, memory_file=None)
                uri = await prepare_live_target(proc, spec, self.listen_ip, self.starter.vm_netns, postcopy=False)
                answer = IncomingAnswer(mode="live", uri=uri)
            self.registry.update(rec.name, pid=proc.pid, spec=machine_to_json(spec))
        inc = self.incoming[rec.name] = Incoming(rec.name, answer.mode, LocalTarget(proc), delta)
        self.tasks.spawn(self._expire(inc), "incoming VM expiry", vm=rec.name)
        return answer

    def _get(self, name: str) -> Incoming:
        inc = self.incoming.get(name)
        if inc is None:
            raise NotFound(f"no VM named '{name}' is migrating to this host")
        return inc

    async def status(self, name: str) -> IncomingStatus:
        inc = self._get(name)
        alive = await inc.target.alive()
        running = alive and await self._runs(name)
        return IncomingStatus(name=name, state=self.registry.get(name).state, alive=alive, running=running,
                              reason="" if alive else await inc.target.exit_reason())

    async def running(self, name: str, timeout: float) -> VmInfo:
        """Wait until the incoming VM runs here, then record it as this host's."""
        inc = self._get(name)
        if inc.delta is not None and inc.delta.task is not None:
            async with asyncio.timeout(timeout):
                await asyncio.shield(inc.delta.task)
            inc.delta.close()
        else:
            await inc.target.wait_running(timeout)
        self.registry.set_state(name, VmState.RUNNING, only_if=[VmState.INCOMING])
        self.incoming.pop(name, None)
        return self.starter.info(self.registry.get(name))

    async def announce(self, name: str) -> None:
        await LocalTarget(self.starter.proc(self.registry.get(name))).announce()

    async def _runs(self, name: str) -> bool:
        """Whether the incoming VM's QEMU runs the guest: the migration reached its end here."""
        return await self.starter.qemu_status(self.starter.proc(self.registry.get(name))) == "running"

    async def claim(self, name: str) -> bool:
        """The source has stopped the VM: take its frames here (BridgedNet.claim). False on a
        slirp host, where a VM's address is its host's and there is nothing to move."""
        self._get(name)
        rec = self.registry.get(name)
        if self.starter.net is None or not rec.ip:
            return False
        await asyncio.to_thread(self.starter.net.claim, rec.vm_id, rec.mac)
        return True

    async def remove(self, name: str) -> None:
        """The source gave up: remove the half-started VM (never a running one)."""
        inc = self.incoming.pop(name, None)
        if inc is None:
            return
        if inc.delta is not None:
            await inc.delta.abort()
        await inc.target.remove()
        with contextlib.suppress(NotFound):
            if self.registry.get(name).state == VmState.INCOMING:
                self.starter.remove_row(name)

    async def _expire(self, inc: Incoming) -> None:
        """An incoming VM the source never confirmed: removed after INCOMING_TIMEOUT_S, unless
        its QEMU runs the guest (the source's QEMU finished sending it, and then the source's
        agent went quiet): that is the only copy running, so it is kept as this host's."""
        while self.incoming.get(inc.name) is inc:
            if time.monotonic() > inc.deadline:
                if await self._runs(inc.name):
                    self.registry.set_state(inc.name, VmState.RUNNING, only_if=[VmState.INCOMING])
                    self.incoming.pop(inc.name, None)
                    log.warning("VM %s arrived and runs here, but its source never confirmed the move: kept as this host's",
                                inc.name)
                else:
                    await self.remove(inc.name)
                return
            await asyncio.sleep(1.0)

    async def shutdown(self) -> None:
        for name in list(self.incoming):
            await self.remove(name)
