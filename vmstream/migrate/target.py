"""The destination half of a migration: a QEMU waiting for the VM.

It is started with the source's MachineSpec (changed only in vm_id, tap and
its namespace) plus `-incoming defer`. Any failure before it runs the VM
stops it and removes its run dir, so a failed migration leaves nothing on
the destination host.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from vmstream.errors import QemuError
from vmstream.migrate.types import MigrationError
from vmstream.net.links import in_netns_if
from vmstream.qemu.machine import MachineSpec, QemuProcess


@dataclasses.dataclass(frozen=True)
class IncomingSpec(MachineSpec):
    """A MachineSpec started as a live-migration target.

    MachineSpec(incoming=True) is for clones loading device state only, and
    it turns QEMU's configuration section off. A live-migration target must
    expect exactly what the source sends: the section is on unless the
    source itself was started as a clone.
    """

    send_configuration: bool = True

    def command(self, rundir: Path, tap_fd: int | None = None) -> list[str]:
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(MachineSpec)}
        base["incoming"] = False
        cmd = MachineSpec(**base).command(rundir, tap_fd)
        cmd += ["-incoming", "defer"]
        if not self.send_configuration:
            cmd += ["-global", "migration.send-configuration=off"]
        return cmd


def sends_configuration(spec: MachineSpec) -> bool:
    """Whether a running VM of this spec sends QEMU's configuration section when migrated."""
    if isinstance(spec, IncomingSpec):
        return spec.send_configuration
    return not spec.incoming


def live_target_spec(source: MachineSpec, **changes: Any) -> IncomingSpec:
    """The destination's spec for a live migration of a VM running with `source`."""
    base = {f.name: getattr(source, f.name) for f in dataclasses.fields(MachineSpec)}
    base.update(incoming=False, **changes)
    return IncomingSpec(**base, send_configuration=sends_configuration(source))


def free_port(ip: str, netns: str | None) -> int:
    """A free TCP port on ip inside netns (the destination host's migration port)."""
    with in_netns_if(netns):
        sock = socket.socket()
    with sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


async def status(proc: QemuProcess, qmp: Any) -> str:
    st = await qmp.execute("query-status")
    return str(st["status"]) if isinstance(st, dict) else ""


async def wait_running(proc: QemuProcess, qmp: Any, timeout: float, what: str) -> None:
    """Until the VM runs on proc; `cont` if the migration completed but left it paused."""
    try:
        await proc.wait_incoming(qmp, timeout, poll=0.002)
    except QemuError as exc:
        raise MigrationError(f"the destination failed to take over the VM during {what}: {exc}") from exc


async def remove_target(proc: QemuProcess) -> None:
    """Stop a half-started destination QEMU and remove its files, whatever state it is in."""
    with contextlib.suppress(Exception):
        await asyncio.shield(proc.stop(soft_timeout=1.0))


ANNOUNCE = {"initial": 5, "max": 100, "rounds": 3, "step": 50}


class LocalTarget:
    """A destination QEMU owned by this process (tests, bench, the destination agent)."""

    def __init__(self, proc: QemuProcess) -> None:
        self.proc = proc

    async def alive(self) -> bool:
        return self.proc.alive()

    async def exit_reason(self) -> str:
        return self.proc.log_tail() or "no output"

    async def wait_running(self, timeout: float) -> None:
        async with self.proc.qmp() as qmp:
            await wait_running(self.proc, qmp, timeout, "the switch-over")

    async def announce(self) -> None:
        """Gratuitous ARP/RARP from the VM's new place, so switches learn where it is."""
        with contextlib.suppress(QMPError, QemuError, OSError):
            async with self.proc.qmp() as qmp:
                await qmp.execute("announce-self", ANNOUNCE)

    async def claim_network(self) -> None:
        """Nothing: a local target's network is moved by the caller's NetworkSwitch."""

    async def remove(self) -> None:
        await remove_target(self.proc)
