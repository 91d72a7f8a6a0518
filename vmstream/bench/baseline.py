"""QEMU's own save and restore, driven directly: the baseline clones must beat.

Save: boot the same guest with the same machine, stop it, QMP `migrate` to
`exec:cat > FILE`. Restore: a new QEMU with `-incoming "exec:cat FILE"`; once
the state is in, `cont` (the source was stopped, so QEMU leaves it paused),
then poll HTTP exactly as the agent does for a clone: only after `running`,
because a probe sent earlier reaches slirp before the guest's NIC is live.
Every QEMU started here is stopped here (finally blocks).

A disk guest is saved and restored with its disk: the booted VM runs on a qcow2
overlay of the base image, which the save leaves as it was at the stop (the VM
never runs again); each restore runs on its own overlay on that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

from vmstream.bench.common import Bench, http_answer
from vmstream.errors import QemuError
from vmstream.guest import channel
from vmstream.host.disks import overlay_at
from vmstream.qemu import MachineSpec, QemuProcess

BOOT_TIMEOUT_S = 240.0
RESTORE_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class FullRestoreSpec:
    """A MachineSpec that loads a full QEMU migration stream at start."""

    spec: MachineSpec
    state_file: Path

    @property
    def memory_file(self) -> Path | None:
        return self.spec.memory_file

    def command(self, rundir: Path, tap_fd: int | None = None) -> list[str]:
        return [*self.spec.command(rundir, tap_fd), "-incoming", f"exec:cat {self.state_file}"]


@dataclass
class BaselineVm:
    proc: QemuProcess
    port: int
    ready_s: float  # process start to first HTTP answer
    running_s: float = 0.0  # process start to state 'running'


def _spec(bench: Bench, mib: int, ident: dict[str, str], disk: Path | None = None) -> MachineSpec:
    """The agent's machine for this guest; ident (MAC, VM generation id) is kept across save and restore."""
    f = bench.facts()
    values: dict[str, Any] = {
        "vm_id": "bench-" + secrets.token_hex(5), "hostname": bench.name("qemu"), "memory_bytes": mib << 20,
        "cpus": 1, "kernel": f.kernel, "initrd": f.initrd, "accel": f.accelerator, "http_port": free_port(), "disk": disk,
    }
    names = {fl.name for fl in fields(MachineSpec)}
    values.update({k: v for k, v in ident.items() if k in names})
    return MachineSpec(**values)


def new_identity() -> dict[str, str]:
    return {"mac": "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3)), "vmgenid": str(uuid.uuid4())}


async def _wait_http(proc: QemuProcess, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, TimeoutError, ValueError):
            await http_answer(port)
            return
        if not proc.alive():
            raise RuntimeError(f"baseline QEMU exited before the guest answered HTTP: {proc.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"baseline VM did not answer HTTP within {timeout:.0f}s")
        await asyncio.sleep(0.005)


async def _qmp_state(qmp: Any) -> str:
    status = await qmp.execute("query-status")
    return str(status["status"]) if isinstance(status, dict) else ""


async def _until_running(proc: QemuProcess, qmp: Any, deadline: float) -> None:
    """Wait for the loaded VM to run; `cont` it if it ends paused (it was saved stopped)."""
    await proc.wait_incoming(qmp, max(0.0, deadline - time.monotonic()))


@dataclass
class BootedVm:
    proc: QemuProcess
    ident: dict[str, str]
    boot_s: float
    disk: Path | None = None  # a disk guest's overlay: after a save, the disk as it was at the stop


async def boot(bench: Bench, mib: int, base_disk: Path | None = None) -> BootedVm:
    """Cold-boot the agent's machine for this guest directly (a disk guest on an overlay of
    base_disk); returns it serving HTTP. The caller stops it."""
    ident = new_identity()
    vm_id = "bench-" + secrets.token_hex(5)
    disk = await overlay_at(base_disk, bench.scratch / "disk" / f"{vm_id}.qcow2") if base_disk else None
    spec = dataclasses.replace(_spec(bench, mib, ident, disk), vm_id=vm_id)
    proc = QemuProcess(spec.vm_id, bench.scratch / "run" / spec.vm_id)
    try:
        t0 = time.perf_counter()
        proc.start(spec)
        await _wait_http(proc, spec.http_port, BOOT_TIMEOUT_S)
        return BootedVm(proc, ident, time.perf_counter() - t0, disk)
    except BaseException:
        await asyncio.shield(proc.stop())
        raise


async def save(vm: BootedVm, state_file: Path, resume: bool = False) -> dict[str, Any]:
    """Stop the VM and save it in full with QMP migrate; optionally let it run on afterwards."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    async with vm.proc.qmp() as qmp:
        # No bandwidth cap, so the save is as fast as QEMU can write; it is
        # the restore that is measured, but the save should not be handicapped.
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        await qmp.execute("stop")
        t1 = time.perf_counter()
        await qmp.execute("migrate", {"uri": f"exec:cat > {state_file}"})
        while True:
            mig = await qmp.execute("query-migrate")
            status = mig.get("status") if isinstance(mig, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migrate to file failed: {mig}")
            await asyncio.sleep(0.01)
        save_s = time.perf_counter() - t1
        if resume:
            await qmp.execute("cont")
    return {"save_s": save_s, "state_bytes": state_file.stat().st_size, "ident": vm.ident, "disk": vm.disk}


async def boot_and_save(bench: Bench, mib: int, state_file: Path, base_disk: Path | None = None) -> dict[str, Any]:
    """Cold-boot a VM, let it settle, save it in full to state_file; the VM is stopped afterwards.
    A disk guest's result has "disk": its overlay as saved, for the restores."""
    vm = await boot(bench, mib, base_disk)
    try:
        await asyncio.sleep(1.0)
        return {"boot_s": vm.boot_s, **await save(vm, state_file)}
    finally:
        await vm.proc.stop()


async def restore(bench: Bench, mib: int, ident: dict[str, str], state_file: Path, disk: Path | None = None) -> BaselineVm:
    """Start a QEMU from a full save (a disk guest: on a new overlay of its saved disk);
    returns it serving HTTP. The caller stops it."""
    vm_id = "bench-" + secrets.token_hex(5)
    own_disk = await overlay_at(disk, bench.scratch / "disk" / f"{vm_id}.qcow2") if disk else None
    spec = dataclasses.replace(_spec(bench, mib, ident, own_disk), vm_id=vm_id)
    proc = QemuProcess(spec.vm_id, bench.scratch / "run" / spec.vm_id)
    try:
        t0 = time.perf_counter()
        proc.start(cast(MachineSpec, FullRestoreSpec(spec, state_file)))
        deadline = time.monotonic() + RESTORE_TIMEOUT_S
        while True:
            # QMP refuses connections while QEMU's main loop is busy loading the
            # stream at start, so retry until it answers.
            try:
                async with proc.qmp() as qmp:
                    await _until_running(proc, qmp, deadline)
                break
            except QemuError:
                if not proc.alive() or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)
        running_s = time.perf_counter() - t0
        await _wait_http(proc, spec.http_port, RESTORE_TIMEOUT_S)
        return BaselineVm(proc, spec.http_port, time.perf_counter() - t0, running_s)
    except BaseException:
        await asyncio.shield(proc.stop())
        raise


async def restore_times(bench: Bench, mib: int, ident: dict[str, str], state_file: Path, runs: int,
                        disk: Path | None = None) -> list[float]:
    """Restore runs times, one at a time, stopping each VM before the next."""
    times = []
    for _ in range(runs):
        vm = await restore(bench, mib, ident, state_file, disk)
        try:
            times.append(vm.ready_s)
        finally:
            await vm.proc.stop()
    return times


async def ask_guest(proc: QemuProcess, command: str, timeout: float = 150.0) -> dict[str, Any]:
    """One command to the in-guest agent of a QEMU started here."""
    return await channel.ask_guest(proc.agent_path, command, timeout)
