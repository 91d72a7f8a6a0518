"""VMs on the network test bed: boot, clone, move. Shared by tests and the bench.

A BedVm owns its current QEMU and tap; move() migrates it to another host
of the TestBed and removes the old QEMU and tap. Fleet owns every BedVm of
a session and stops what is left at the end, also after failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmstream.capture.snapshot import capture_vm
from vmstream.guest import GuestArtifacts
from vmstream.guest.channel import ask_guest
from vmstream.migrate.api import Destination, migrate
from vmstream.migrate.live import LiveOptions
from vmstream.migrate.target import wait_running
from vmstream.migrate.types import MigrationResult, ProgressCallback
from vmstream.net.links import random_mac
from vmstream.net.testbed import TestBed
from vmstream.qemu.machine import MachineSpec, QemuProcess, TapNic, guest_ram_bytes


@dataclass
class BedVm:
    name: str
    ip: str
    host: str
    spec: MachineSpec
    proc: QemuProcess
    taps: int = 0  # taps made for this VM so far (names stay unique per host)

    @property
    def tap(self) -> str:
        assert self.spec.tap is not None
        return self.spec.tap.ifname

    async def ask(self, command: str, timeout: float = 120.0) -> dict[str, Any]:
        return await ask_guest(self.proc.agent_path, command, timeout)


@dataclass
class Fleet:
    """Every VM (QEMU + tap) of a session on one TestBed; close() removes what is left."""

    bed: TestBed
    guest: GuestArtifacts
    run_root: Path
    accel: str = "tcg"
    vms: list[BedVm] = field(default_factory=list)
    extra: list[QemuProcess] = field(default_factory=list)

    def _tap_name(self, vm: BedVm) -> str:
        vm.taps += 1
        return f"t{vm.name[:8]}{vm.taps}"[:15]

    def _proc(self) -> QemuProcess:
        vm_id = uuid.uuid4().hex[:12]
        proc = QemuProcess(vm_id, self.run_root / vm_id)
        self.extra.append(proc)
        return proc

    async def boot(self, name: str, index: int, host: str = "a", memory_mib: int = 256) -> BedVm:
        """Cold-boot the demo guest with a static IP on host's bridge; returns once it answers HTTP."""
        ip = self.bed.vm_ip(index)
        vm = BedVm(name, ip, host, None, None)  # type: ignore[arg-type]
        tap = self._tap_name(vm)
        self.bed.add_tap(host, tap)
        proc = self._proc()
        spec = MachineSpec(
            vm_id=proc.vm_id, hostname=name, memory_bytes=guest_ram_bytes(memory_mib << 20, self.accel), cpus=1, kernel=self.guest.kernel,
            initrd=self.guest.initrd, accel=self.accel, http_port=0, mac=random_mac(), vmgenid=str(uuid.uuid4()),
            tap=TapNic(tap, ip, self.bed.netmask, None, self.bed.hosts[host].netns),
        )
        vm.spec, vm.proc = spec, proc
        self.vms.append(vm)
        proc.start(spec)
        await self.wait_http(vm, 240.0)
        return vm

    async def wait_http(self, vm: BedVm, timeout: float) -> float:
        t0 = time.monotonic()
        while True:
            try:
                sock = await asyncio.to_thread(self.bed.connect, vm.ip, 80, None, 0.5)
                with sock:
                    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    if (await asyncio.to_thread(sock.recv, 200)).startswith(b"HTTP/1."):
                        return time.monotonic() - t0
            except OSError:
                pass
            if not vm.proc.alive():
                raise RuntimeError(f"VM {vm.name}'s QEMU exited: {vm.proc.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"VM {vm.name} did not answer HTTP at {vm.ip} within {timeout:.0f}s")
            await asyncio.sleep(0.2)

    async def capture(self, vm: BedVm, image_dir: Path) -> Path:
        """A live image (memory.raw + devstate.bin) of vm; vm keeps running."""
        image_dir.mkdir(parents=True, exist_ok=True)
        await capture_vm(vm.proc, vm.spec.memory_bytes, image_dir, None, None)
        return image_dir

    async def clone(self, name: str, image_dir: Path, like: BedVm, host: str = "a") -> BedVm:
        """Start a clone of an image captured from `like` (same IP, MAC and machine)."""
        vm = BedVm(name, like.ip, host, None, None)  # type: ignore[arg-type]
        tap = self._tap_name(vm)
        self.bed.add_tap(host, tap)
        proc = self._proc()
        assert like.spec.tap is not None
        spec = MachineSpec(
            vm_id=proc.vm_id, hostname=like.spec.hostname, memory_bytes=like.spec.memory_bytes, cpus=like.spec.cpus,
            kernel=like.spec.kernel, initrd=like.spec.initrd, accel=like.spec.accel, http_port=0, mac=like.spec.mac,
            vmgenid=like.spec.vmgenid, memory_file=image_dir / "memory.raw", incoming=True,
            tap=TapNic(tap, like.ip, like.spec.tap.netmask, None, self.bed.hosts[host].netns),
        )
        vm.spec, vm.proc = spec, proc
        self.vms.append(vm)
        proc.start(spec)
        async with proc.qmp() as qmp:
            await qmp.execute("migrate-incoming", {"uri": f"exec:cat {image_dir / 'devstate.bin'}"})
            await wait_running(proc, qmp, 60.0, "the clone's start")
        await self.wait_http(vm, 60.0)
        return vm

    async def move(self, vm: BedVm, to: str, mode: str = "auto", progress: ProgressCallback | None = None,
                   cancel: asyncio.Event | None = None, options: LiveOptions | None = None) -> MigrationResult:
        """Migrate vm to host `to` with the fabric switched loss-free; the old QEMU and tap are removed."""
        tap = self._tap_name(vm)
        self.bed.add_tap(to, tap)
        assert vm.spec.tap is not None
        dest = Destination(self._proc(), self.bed.hosts[to].ip, self.bed.hosts[to].netns,
                           TapNic(tap, vm.ip, vm.spec.tap.netmask, None, self.bed.hosts[to].netns))
        switch = self.bed.switch(vm.spec.mac, vm.host, to, tap)
        try:
            result, spec = await migrate(vm.proc, vm.spec, dest, mode=mode, switch=switch, progress=progress,
                                         cancel=cancel, options=options)
        except BaseException:
            self.bed.remove_tap(to, tap)
            raise
        self.bed.remove_tap(vm.host, vm.tap)
        vm.host, vm.spec, vm.proc = to, spec, dest.proc
        return result

    async def destroy(self, vm: BedVm) -> None:
        await vm.proc.stop()
        self.bed.remove_tap(vm.host, vm.tap)
        if vm in self.vms:
            self.vms.remove(vm)

    async def close(self) -> None:
        for proc in self.extra:
            with contextlib.suppress(Exception):
                await proc.stop()
        for vm in list(self.vms):
            self.bed.remove_tap(vm.host, vm.tap)
        self.vms.clear()
