"""Starting clones of a live image: all of a request start, or none is left behind."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from vmstream.config import check_name
from vmstream.errors import GuestError, InvalidInput, QemuError
from vmstream.guest.identity import CloneIdentity, check_params, check_user_data
from vmstream.host import disks
from vmstream.host.db import VmRecord
from vmstream.host.hooks import Batch, HookWatcher
from vmstream.host.metrics import AgentMetrics
from vmstream.host.pool import ClonePool
from vmstream.host.registry import VmRegistry
from vmstream.host.schemas import StartResult
from vmstream.host.starter import CLONE_TIMEOUT_S, Starter
from vmstream.host.state import VmState
from vmstream.host.tasks import Tasks, operation
from vmstream.host.workingset import WorkingSets
from vmstream.image import ImageRepository, LiveImage
from vmstream.memfs.mount import MemfsMount
from vmstream.policy import MemoryPolicy, start_cost
from vmstream.qemu import QemuProcess, qemu_version
from vmstream.settings import Settings

HTTP_HEDGE_S = 0.2  # a single clone's status probe unanswered this long after its identity gets a second one


class CloneStarter:
    def __init__(
        self, settings: Settings, registry: VmRegistry, starter: Starter, images: ImageRepository, memfs: MemfsMount,
        pool: ClonePool, hooks: HookWatcher, working_sets: WorkingSets, tasks: Tasks, metrics: AgentMetrics | None = None,
    ) -> None:
        self.metrics = metrics or AgentMetrics()
        self.defer_hooks = settings.batch_defer_hooks
        self.registry = registry
        self.starter = starter
        self.images = images
        self.memfs = memfs
        self.pool = pool
        self.hooks = hooks
        self.working_sets = working_sets
        self.tasks = tasks

    def _check(self, image: LiveImage) -> None:
        g = image.guest
        for path in (g.kernel, g.initrd):
            if path and not Path(path).is_file():
                raise GuestError(f"live image '{image.name}' needs {path}, which is gone: rebuild the image")
        if g.qemu_version != qemu_version():
            raise InvalidInput(f"live image '{image.name}' was made with QEMU {g.qemu_version}, this host has {qemu_version()}")

    def _names(self, prefix: str, count: int) -> list[str]:
        existing = {r.name for r in self.registry.all()}
        index, names = 1, list[str]()
        while len(names) < count:
            if f"{prefix}-{index}" not in existing:
                names.append(f"{prefix}-{index}")
            index += 1
        return names

    async def start(
        self, image_name: str, count: int, prefix: str | None, params: dict[str, str] | None = None,
        user_data: bytes | None = None, prefetch: bool = True, pool: bool = True, names: list[str] | None = None,
        memory_policy: MemoryPolicy | None = None, tb_mib: int | None = None,
    ) -> StartResult:
        """Start count clones in parallel (named PREFIX-N, or the names given, as a Nova
        driver names its servers' VMs); all start, or none is left behind. tb_mib: at least
        this TCG translation cache (a group's members, which serve: vmstream.host.groups)."""
        t0 = time.perf_counter()
        params = params or {}
        check_params(params)
        check_user_data(user_data)
        if names is not None:
            if count not in (1, len(names)):
                raise InvalidInput(f"count {count} but {len(names)} names given: give count={len(names)} or leave it out")
            if len(set(names)) != len(names):
                raise InvalidInput(f"clone names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
            names = [check_name(n, "clone name") for n in names]
        image = self.images.get(image_name)
        if names is None:
            names = self._names(check_name(prefix or image_name, "clone name prefix"), count)
        self._check(image)
        g = image.guest
        if memory_policy is not None and memory_policy.limit_bytes is not None and not g.balloon:
            raise InvalidInput(f"image '{image_name}' has no balloon (it was made before VMs had one), so its clones' memory "
                               "cannot be limited: start them without a memory limit, or make the image again from a new VM")
        self.starter.admit([start_cost(g.memory_bytes, memory_policy, clone=True)] * len(names),
                           f"{len(names)} clone(s) of {image_name}")
        recs = await self.registry.reserve(
            names, memory_bytes=g.memory_bytes, cpus=g.cpus, accel=g.accel,
            parent_image=image_name, ready=g.ready, publish=dict.fromkeys(g.guest_ports, 0), **self.starter.image_boot(image),
            memory_policy=memory_policy.model_dump_json() if memory_policy else None,
        )
        batch = Batch(len(recs), self.defer_hooks, in_burst=self.hooks.burst.begin())
        try:
            async with operation(f"start {len(recs)} clone(s)", vm=",".join(r.name for r in recs), image=image_name):
                return await self._start(image, recs, t0, params, user_data, prefetch, pool, batch, tb_mib)
        finally:
            self.hooks.burst.end()
            batch.finish()

    async def _start(
        self, image: LiveImage, recs: list[VmRecord], t0: float, params: dict[str, str], user_data: bytes | None,
        prefetch: bool, pool: bool, batch: Batch, tb_mib: int | None = None,
    ) -> StartResult:
        try:
            await self.memfs.ensure()
            recording = await self.working_sets.prepare(image, prefetch)
        except BaseException:
            for rec in recs:
                self.starter.remove_row(rec.name)
            raise
        # only a start with no other under way waits for a pooled QEMU being readied: clones asked
        # for one after another (even 0.25 s apart) keep taking pooled QEMUs, while concurrent
        # starts (Nova spawning a batch server by server) are not held back for one
        alone = self.hooks.burst.in_flight == 1
        if tb_mib is not None and image.guest.accel == "tcg" and self.pool.tb_mib_of(image.name) < tb_mib:
            pool = False  # its pooled QEMUs have a smaller translation cache than these clones need
        if pool and len(recs) == 1 and alone:
            await self.pool.wait(image.name)
        taken = [self.pool.take(rec, image.name) if pool else (rec, False) for rec in recs]
        recs = [rec for rec, _ in taken]
        results = await asyncio.gather(
            *(self._start_one(rec, image, t0, params, user_data, batch, pooled, tb_mib) for rec, pooled in taken),
            return_exceptions=True,
        )
        if any(isinstance(r, BaseException) for r in results) and (why := await self._memfs_error(image)):
            results = [QemuError(f"clones of '{image.name}' cannot run: reading the image memory failed ({why}); "
                                 "the clone was stopped and never ran on wrong memory")]
        if recording:
            self.tasks.spawn(self.working_sets.record(image), "working-set recording", image=image.name)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.metrics.clones_failed(len(recs))
            await asyncio.gather(*(self.starter.remove(r) for r in recs if self.registry.exists(r.name)), return_exceptions=True)
            raise errors[0]
        # refilled once a burst is over, not after each start, when other starts run beside this
        # one or the pool still holds QEMUs for the next ones (a deeper pool: VMSTREAM_CLONE_POOL);
        # a start alone that emptied it refills at once, for the next one to find
        if self.hooks.burst.in_flight > 1 or self.pool.stocked(image.name):
            self.tasks.spawn(self._fill_when_quiet(image.name), "clone pool fill", image=image.name)
        else:
            self.pool.fill(image.name)
        return StartResult(image=image.name, vms=[self.starter.info(self.registry.get(r.name)) for r in recs],
                           elapsed_s=time.perf_counter() - t0)

    async def _fill_when_quiet(self, image_name: str) -> None:
        await self.hooks.burst.quiet()
        self.pool.fill(image_name)

    async def _memfs_error(self, image: LiveImage) -> str | None:
        """Why memfs failed to read an image's memory, if it did: the clone died of it."""
        try:
            stats = await self.memfs.request("stats")
        except Exception:
            return None
        err = stats.get("images", {}).get(image.memory_root or image.name, {}).get("last_error")
        return str(err) if err else None

    async def _start_one(
        self, rec: VmRecord, image: LiveImage, t0: float, params: dict[str, str], user_data: bytes | None,
        batch: Batch, pooled: bool, tb_mib: int | None = None,
    ) -> None:
        """QEMU on the image's memory, delta pages written in, device state loaded,
        new identity applied, and first HTTP answer; then hooks are watched.
        pooled: the QEMU was started ahead and is paused with all that loaded."""
        phases: dict[str, float] = {}

        def mark(phase: str) -> None:
            phases[phase] = round(time.perf_counter() - t0, 4)

        async with self.starter.starting(rec) as proc:
            if pooled:
                mark("pool_taken")
            else:
                if image.guest.disk:  # its own overlay on the image's disk layer
                    await self.starter.overlay_disk(rec, self.images.image_dir(image) / disks.LAYER)
                spec = self.starter.spec(rec, image)
                # its start would overflow the cache and translate again what it dropped: a Debian
                # clone started anew used 0.43 CPU-s with 8 MiB, 0.30 with 24 (+6 MiB private)
                needed = max(self.pool.grown_tb_mib(image.name) or 0, tb_mib or 0)
                if needed > spec.tb_mib:
                    spec = dataclasses.replace(spec, tb_mib=needed)
                await self.starter.launch(rec, proc, spec)
                mark("qemu_spawned")
            identity = CloneIdentity(rec.hostname, rec.mac, params, user_data, defer_hooks=batch.defer_hooks,
                                     ip=self.starter.address(rec))
            identity_task: asyncio.Task[dict[str, Any]] | None = None
            http_task: asyncio.Task[None] | None = None
            probed = not self.starter.readiness(rec).after_identity
            try:
                identity_task = await self.starter.resume_clone(rec, proc, image, identity.command(), pooled, mark)
                # A single start probes while the identity is applied, and hedges (see _answer). A burst,
                # which does not hedge, probes once the new MAC is set: a probe whose handshake straddled
                # the MAC change lost its packets and waited 2 s for its next attempt (in 1 of 10 Debian clones).
                if probed and batch.hedge_http:
                    http_task = asyncio.create_task(self.starter.wait_ready(rec, proc, CLONE_TIMEOUT_S))
                answer = await identity_task
                mark("identity_applied")
                if isinstance(answer.get("us"), dict):  # the guest's own time, waking up and applying it
                    # ("woke" is -1 when the agent was not waiting for the host: not counted)
                    us = {k: v for k, v in answer["us"].items() if v >= 0}
                    phases["identity_in_guest"] = round(sum(us.values()) / 1e6, 4)
                    phases.update({f"guest_{k}": round(v / 1e6, 4) for k, v in {**us, **answer.get("steps_us", {})}.items()})
                if not answer.get("ok") or answer.get("hostname") != rec.hostname:
                    raise QemuError(f"clone {rec.name}: the guest agent did not apply the new identity: {answer}")
                self.registry.update(rec.name, identity_applied_s=phases["identity_applied"])
                if probed and http_task is None:
                    http_task = asyncio.create_task(self.starter.wait_ready(rec, proc, CLONE_TIMEOUT_S))
                if http_task is not None:
                    await self._answer(rec, proc, http_task, batch.hedge_http)
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
            mark("http_answered" if probed else "ready")
            ready_s = phases["http_answered" if probed else "ready"]
            self.registry.update(rec.name, state=VmState.RUNNING, ready_s=ready_s, phases=json.dumps(phases))
            self.metrics.clone_started(image.name, rec.name, ready_s, phases)
        self.tasks.spawn(self.hooks.after_start(rec, proc, batch), "clone hooks", vm=rec.name)

    async def _answer(self, rec: VmRecord, proc: QemuProcess, http: asyncio.Task[None], hedge: bool) -> None:
        """The clone's first ready answer (HTTP for the demo guest), once its identity is applied.

        The probe started while the guest was still resuming. If its SYN-ACK went out
        to the image's MAC just before the guest took its new one, slirp resends only
        after ~2 s; so a probe still unanswered HTTP_HEDGE_S after the identity gets
        one more beside it (new MAC, known to slirp from the guest's gratuitous ARP),
        and the first answer wins. Not in a burst, where probes cost the guests."""
        done, _ = await asyncio.wait({http}, timeout=HTTP_HEDGE_S if hedge else None)
        if done:
            return http.result()
        second = asyncio.create_task(self.starter.wait_ready(rec, proc, CLONE_TIMEOUT_S))
        try:
            done, _ = await asyncio.wait({http, second}, return_when=asyncio.FIRST_COMPLETED)
            next(iter(done)).result()
        finally:
            second.cancel()
