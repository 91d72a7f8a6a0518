"""Clone hooks: when a clone's /etc/vmstream/clone.d hooks run, and their results.

Under TCG a clone's hooks cost as much as its start (0.25-0.3 CPU-s for the demo
hook: every program a restored guest starts is translated anew). Run while
siblings are still resuming, they take the CPU those need, so a batch's hooks
start once all of it serves (Batch), and so do the hooks of clones started one
by one in quick succession, as Nova starts a batch of servers (Burst): they wait
until the host has started no clone for QUIET_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from vmstream.errors import QemuError
from vmstream.guest.clock import sync_agent_clock
from vmstream.guest.qga import qga
from vmstream.host.db import VmRecord
from vmstream.host.registry import VmRegistry
from vmstream.host.starter import Starter
from vmstream.host.tasks import log
from vmstream.qemu import QemuProcess

HOOKS_TIMEOUT_S = 300.0


class Batch:
    """Clones started by one request; in_burst: while other starts run on the host."""

    def __init__(self, size: int, defer_hooks: bool, in_burst: bool = False) -> None:
        self.in_burst = in_burst
        self.defer_hooks = (size > 1 or in_burst) and defer_hooks
        self.hedge_http = size == 1  # in a burst a second status probe costs the siblings more than it saves
        self.done = asyncio.Event()

    def finish(self) -> None:
        self.done.set()


QUIET_S = 1.0  # a burst of single clone starts is over once none came for this long


class Burst:
    """Clone starts on this host that come close together: requests of one clone each."""

    def __init__(self, quiet_s: float = QUIET_S) -> None:
        self.quiet_s = quiet_s
        self.in_flight = 0
        self.last = -float("inf")

    def begin(self) -> bool:
        """A start begins; True if it is part of a burst (another one runs, or ended just now)."""
        now = time.monotonic()
        busy = self.in_flight > 0 or now - self.last < self.quiet_s
        self.in_flight += 1
        self.last = now
        return busy

    def end(self) -> None:
        self.in_flight -= 1
        self.last = time.monotonic()

    async def quiet(self) -> None:
        """Return once no start has run for quiet_s."""
        while True:
            wait = self.last + self.quiet_s - time.monotonic()
            if self.in_flight == 0 and wait <= 0:
                return
            await asyncio.sleep(max(wait, 0.1))


class HookWatcher:
    def __init__(self, registry: VmRegistry, starter: Starter) -> None:
        self.registry = registry
        self.starter = starter
        self.burst = Burst()

    async def set_clock(self, rec: VmRecord, proc: QemuProcess) -> None:
        """Measure the clone's clock and step it to the host's (vmstream.guest.clock); the
        identity set it already, but with a time stamped before the guest ran."""
        try:
            result = await sync_agent_clock(proc.agent_path)
        except QemuError as exc:
            log.warning("setting the clock of %s failed: %s", rec.name, exc)
            return
        if result.method == "set" and rec.disk:  # an old agent: qemu-guest-agent sets it too, as before
            with contextlib.suppress(QemuError):
                await qga(proc.qga_path, "guest-set-time", {"time": time.time_ns()}, timeout=10)
        self.registry.update(rec.name, clock=json.dumps(result.as_dict()))

    async def start_hooks(self, proc: QemuProcess) -> None:
        """Run a clone's deferred hooks (a no-op where they already ran)."""
        with contextlib.suppress(QemuError):
            await self.starter.ask(proc, "start-hooks", 10, expect=lambda a: "started" in a or not a.get("ok", True))

    async def after_start(self, rec: VmRecord, proc: QemuProcess, batch: Batch) -> None:
        """Set the clone's clock exactly, start its hooks when its batch serves, then
        wait for them and keep their results."""
        await self.set_clock(rec, proc)
        if batch.defer_hooks:
            await batch.done.wait()
            await self.burst.quiet()
            await self.start_hooks(proc)
        deadline = time.monotonic() + HOOKS_TIMEOUT_S
        while time.monotonic() < deadline and proc.alive():
            with contextlib.suppress(QemuError):
                answer = await self.starter.ask(proc, "hooks", 10)
                result = answer.get("result", {})
                if result.get("state") == "done":
                    self.registry.update(rec.name, hooks=json.dumps(result))
                    return
            await asyncio.sleep(0.5)
        if proc.alive():
            raise QemuError(f"the clone hooks of {rec.name} did not finish within {HOOKS_TIMEOUT_S:.0f}s")
