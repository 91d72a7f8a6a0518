"""MemoryController: each VM's memory policy, applied through its balloon once a second
(five times a second while the VM is close to its limit).

For every running VM that has a balloon and a policy (vmstream.policy), it reads what
the VM costs the host alone (its QEMU's RssAnon: written guest RAM and QEMU's own), the
balloon's size and the guest's free memory (balloon stats), asks vmstream.policy.steer
for the balloon size that keeps the VM within its limit, and sets it. It talks to each
QEMU on a QMP monitor of its own (policy.sock), kept open, so the agent's other QMP work
is never locked out; a VM started before that monitor existed is not steered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from qemu.qmp import QMPClient

from vmstream.host.db import VmRecord
from vmstream.host.footprint import rss_anon
from vmstream.host.registry import VmRegistry
from vmstream.host.schemas import VmMemoryInfo
from vmstream.host.starter import Starter
from vmstream.host.state import VmState
from vmstream.policy import Control, MemoryPolicy, Sample, steer
from vmstream.qemu.machine import BALLOON_ID

log = logging.getLogger("vmstream.memory")

INTERVAL_S = 1.0  # how often a VM is looked at
CLOSE_INTERVAL_S = 0.2  # ... while it is within CLOSE of what it may cost: a guest can take tens of MiB in a second
CLOSE = 0.75
BALLOON_PATH = f"/machine/peripheral/{BALLOON_ID}"
STATS_S = 1  # the guest's balloon statistics, as often as the controller looks
SET_SLACK = 1 << 20  # a balloon within this of its target is left alone


@dataclass
class _Vm:
    vm_id: str
    qmp: QMPClient
    control: Control
    info: VmMemoryInfo | None = None
    next_look: float = 0.0  # monotonic time of the next sample
    asked_at: float = -1e9  # when QEMU was last asked for the balloon's size and the guest's statistics
    balloon_bytes: int = 0
    guest_free_bytes: int | None = None


class MemoryController:
    def __init__(self, registry: VmRegistry, starter: Starter) -> None:
        self.registry = registry
        self.starter = starter
        self._vms: dict[str, _Vm] = {}  # VM name -> its monitor and controller state
        self.cpu_s = 0.0  # the controller's own time, for its cost

    async def run(self) -> None:
        try:
            while True:
                t0 = time.thread_time()
                await self.tick()
                self.cpu_s += time.thread_time() - t0
                soonest = min((vm.next_look for vm in self._vms.values()), default=time.monotonic() + INTERVAL_S)
                await asyncio.sleep(min(INTERVAL_S, max(CLOSE_INTERVAL_S, soonest - time.monotonic())))
        finally:
            for name in list(self._vms):
                await self._drop(name)

    async def tick(self) -> None:
        steered = set()
        for rec in self.registry.all():
            if rec.state != VmState.RUNNING or not rec.memory_policy or not self.starter.balloon(rec) or not rec.pid:
                continue
            steered.add(rec.name)
            vm = self._vms.get(rec.name)
            if vm is not None and vm.vm_id == rec.vm_id and time.monotonic() < vm.next_look:
                continue
            try:
                async with asyncio.timeout(2.0):
                    await self._steer(rec, MemoryPolicy.model_validate_json(rec.memory_policy))
            except Exception as exc:  # one VM's trouble (it is exiting, its QEMU is busy) must not stop the rest
                log.debug("VM %s: memory policy not applied this time: %s", rec.name, exc)
                await self._drop(rec.name)
        for name in set(self._vms) - steered:
            await self._release(name)

    def info(self, rec: VmRecord) -> VmMemoryInfo | None:
        """The VM's policy and what the controller last saw of it."""
        policy = MemoryPolicy.model_validate_json(rec.memory_policy) if rec.memory_policy else None
        vm = self._vms.get(rec.name)
        if vm is not None and vm.vm_id == rec.vm_id and vm.info is not None:
            return vm.info.model_copy(update={"policy": policy})
        return VmMemoryInfo(policy=policy) if policy else None

    async def _steer(self, rec: VmRecord, policy: MemoryPolicy) -> None:
        """One look: RssAnon every time (a counter in /proc); the balloon's size and the
        guest's statistics from QEMU once a second (the guest updates them that often)."""
        assert rec.pid is not None
        vm = await self._monitor(rec)
        now = time.monotonic()
        if now - vm.asked_at >= INTERVAL_S - 0.05:
            balloon: Any = await vm.qmp.execute("query-balloon")
            stats: Any = await vm.qmp.execute("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})
            free = (stats or {}).get("stats", {}).get("stat-free-memory", -1)
            fresh = time.time() - float((stats or {}).get("last-update", 0)) < 5 * STATS_S
            vm.balloon_bytes, vm.guest_free_bytes = int(balloon["actual"]), int(free) if free >= 0 and fresh else None
            vm.asked_at = now
        sample = Sample(t=now, private_bytes=rss_anon(rec.pid), ram_bytes=rec.memory_bytes,
                        balloon_bytes=vm.balloon_bytes, guest_free_bytes=vm.guest_free_bytes)
        asked = vm.control.target_bytes if vm.control.target_bytes is not None else sample.balloon_bytes
        step = steer(policy, sample, vm.control)
        if abs(step.target_bytes - asked) >= SET_SLACK:
            await vm.qmp.execute("balloon", {"value": step.target_bytes})
        close = step.allowed_bytes is not None and sample.private_bytes >= CLOSE * step.allowed_bytes
        vm.next_look = now + (CLOSE_INTERVAL_S if close else INTERVAL_S) - 0.05
        vm.info = VmMemoryInfo(
            policy=policy, private_bytes=sample.private_bytes, balloon_bytes=sample.balloon_bytes,
            guest_free_bytes=sample.guest_free_bytes, allowed_bytes=step.allowed_bytes, target_bytes=step.target_bytes,
            bursting=step.bursting, sampled_at=time.time(),
        )

    async def _monitor(self, rec: VmRecord) -> _Vm:
        """The VM's policy monitor, connected (and its balloon asked for statistics) once."""
        vm = self._vms.get(rec.name)
        if vm is not None and vm.vm_id == rec.vm_id:
            return vm
        await self._drop(rec.name)
        path = self.starter.proc(rec).policy_qmp_path
        if not path.exists():
            raise FileNotFoundError(f"{path}: the VM started before vmstream steered memory")
        qmp = QMPClient(f"vmstream-policy-{rec.vm_id}")
        await qmp.connect(str(path))
        try:
            await qmp.execute("qom-set", {"path": BALLOON_PATH, "property": "guest-stats-polling-interval", "value": STATS_S})
        except BaseException:
            await qmp.disconnect()
            raise
        vm = self._vms[rec.name] = _Vm(rec.vm_id, qmp, Control())
        return vm

    async def _release(self, name: str) -> None:
        """A VM no longer limited gets all its RAM back (if it still runs), then is forgotten."""
        vm = self._vms.get(name)
        rec = self.registry.find(name) if vm is not None else None
        if vm is not None and rec is not None and rec.vm_id == vm.vm_id and rec.state == VmState.RUNNING:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await vm.qmp.execute("balloon", {"value": rec.memory_bytes})
        await self._drop(name)

    async def _drop(self, name: str) -> None:
        vm = self._vms.pop(name, None)
        if vm is not None:
            with contextlib.suppress(Exception):
                await vm.qmp.disconnect()
