"""Moving VMs to another host agent: the source side (outgoing jobs).

Source agent                                   destination agent (vmstream.host.incoming)
  POST /v1/vms/{vm}/migrate {to, mode}
    -> POST {peer}/v1/migrations/incoming      reserve the name, start QEMU waiting
                                               (live: -incoming tcp; delta: on the
                                               image's memory + a page receiver)
    <- {mode, uri | host:port}
  migrate_live / migrate_delta  ------------>  (QEMU stream / private pages)
    RemoteTarget: GET  .../incoming/{vm}       alive?
                  POST .../incoming/{vm}/running   wait until it runs, record it
                  POST .../incoming/{vm}/announce  gratuitous ARP from the new place
                  DELETE .../incoming/{vm}         failed: remove QEMU and row
  stop the source QEMU, drop its row

The VM is 'migrating' while its job runs: destroy, capture and a second
migration are refused. Whatever fails before the switch-over leaves the VM
running on the source and nothing on the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vmstream.agentapi import AsyncApiClient
from vmstream.errors import Conflict, InvalidInput, NotFound, VmstreamError
from vmstream.host.db import VmRecord
from vmstream.host.machines import machine_to_dict
from vmstream.host.metrics import AgentMetrics
from vmstream.host.network import pack_frames
from vmstream.host.peers import Peers
from vmstream.host.registry import VmRegistry
from vmstream.host.schemas import IncomingAnswer, IncomingRequest, MigrationInfo
from vmstream.host.starter import Starter
from vmstream.host.state import Op, VmState, check
from vmstream.host.tasks import log, operation
from vmstream.image import ImageRepository
from vmstream.migrate import LiveOptions, MigrationCancelled, MigrationError, MigrationResult, Progress, migrate_delta, migrate_live
from vmstream.migrate.target import sends_configuration

REMOTE_ALIVE_CHECK_S = 0.5  # a remote destination is asked over HTTP, so less often than each poll


class RemoteTarget:
    """The destination QEMU of a live migration, on a peer host (migrate.Target)."""

    def __init__(self, peer: AsyncApiClient, vm: str) -> None:
        self.peer, self.vm = peer, vm
        self._reason = ""

    async def alive(self) -> bool:
        try:
            st = await self.peer.call("GET", f"/v1/migrations/incoming/{self.vm}")
        except VmstreamError as exc:
            self._reason = str(exc)
            return False
        self._reason = st.get("reason", "")
        return bool(st.get("alive"))

    async def exit_reason(self) -> str:
        return self._reason or "no reason given"

    async def wait_running(self, timeout: float) -> None:
        try:
            await self.peer.call("POST", f"/v1/migrations/incoming/{self.vm}/running", params={"timeout": timeout})
        except VmstreamError as exc:
            raise MigrationError(f"the destination did not take over the VM: {exc}") from exc

    async def announce(self) -> None:
        with contextlib.suppress(VmstreamError):
            await self.peer.call("POST", f"/v1/migrations/incoming/{self.vm}/announce")

    async def claim_network(self) -> None:
        await self.peer.call("POST", f"/v1/migrations/incoming/{self.vm}/claim")

    async def remove(self) -> None:
        with contextlib.suppress(VmstreamError):
            await self.peer.call("DELETE", f"/v1/migrations/incoming/{self.vm}")


async def _where(peer: AsyncApiClient, name: str) -> str | None:
    """Where a peer has a VM: 'running' (its own row), 'incoming-running' (migrated in, QEMU
    running, not yet confirmed), 'incoming' (still arriving), or None."""
    try:
        st = await peer.call("GET", f"/v1/migrations/incoming/{name}")
        return "incoming-running" if st.get("running") else "incoming"
    except NotFound:
        pass
    try:
        await peer.call("GET", f"/v1/vms/{name}")
    except NotFound:
        return None
    return "running"  # in whatever state: the move reached it (it may have moved on since), so this copy is stale


@dataclass
class Job:
    """One outgoing migration."""

    vm: str
    to: str
    requested_mode: str
    max_bandwidth_mbps: float | None = None
    started: float = field(default_factory=time.perf_counter)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    mode: str | None = None
    state: str = "preparing"
    progress: Progress | None = None
    result: MigrationResult | None = None
    error: str | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    ended: float | None = None

    def info(self) -> MigrationInfo:
        return MigrationInfo(
            vm=self.vm, to=self.to, requested_mode=self.requested_mode, mode=self.mode, state=self.state,  # type: ignore[arg-type]
            progress=self.progress.to_dict() if self.progress else None,
            result=self.result.to_dict() if self.result else None, error=self.error, started_at=self.started_at,
            elapsed_s=round((self.ended or time.perf_counter()) - self.started, 3),
        )


def _live_options(max_bandwidth_mbps: float | None) -> LiveOptions:
    opts = LiveOptions(alive_check_s=REMOTE_ALIVE_CHECK_S)
    if max_bandwidth_mbps is not None:
        opts = dataclasses.replace(opts, max_bandwidth=int(max_bandwidth_mbps * 1e6))
    return opts


class Migrations:
    """This host's outgoing migrations, one job per VM (kept after it ends, for status)."""

    def __init__(self, registry: VmRegistry, starter: Starter, images: ImageRepository, peers: Peers,
                 metrics: AgentMetrics | None = None) -> None:
        self.metrics = metrics or AgentMetrics()
        self.registry = registry
        self.starter = starter
        self.images = images
        self.peers = peers
        self.jobs: dict[str, Job] = {}

    async def start(self, vm: str, to: str, mode: str, max_bandwidth_mbps: float | None = None) -> MigrationInfo:
        """Begin moving vm to peer `to`; runs in the background (see status / cancel)."""
        rec = self.registry.get(vm)
        check(vm, rec.state, Op.MIGRATE)  # before the peer is looked up: the VM's state is the first problem
        if mode == "delta" and not rec.parent_image:
            raise InvalidInput(f"VM {vm} was booted, not started from a live image: delta migration needs an image the "
                               "destination has; use --mode live or auto")
        if rec.disk:
            raise InvalidInput(f"VM {vm} is a disk guest: its disk is local to this host, and moving disks is not supported yet")
        peer = self.peers.client(to)  # NotFound before anything changes
        try:
            rec = self.registry.begin(vm, Op.MIGRATE, VmState.MIGRATING, migrating_to=to)
        except BaseException:
            await peer.aclose()
            raise
        job = Job(vm=vm, to=to, requested_mode=mode, max_bandwidth_mbps=max_bandwidth_mbps)
        self.jobs[vm] = job
        job.task = asyncio.create_task(self._run(job, rec, peer))
        return job.info()

    def status(self, vm: str) -> MigrationInfo:
        job = self.jobs.get(vm)
        if job is None:
            raise NotFound(f"VM {vm} has no migration on this host")
        return job.info()

    def cancel(self, vm: str) -> MigrationInfo:
        job = self.jobs.get(vm)
        if job is None or job.state not in ("preparing", "running"):
            raise Conflict(f"VM {vm} has no migration in progress to cancel")
        job.cancel.set()
        return job.info()

    def _request(self, rec: VmRecord, mode: str) -> IncomingRequest:
        image = self.images.get(rec.parent_image) if rec.parent_image and not rec.spec else None
        spec = self.starter.spec(rec, image)
        return IncomingRequest(
            name=rec.name, from_host=os.uname().nodename, mode=mode, machine=machine_to_dict(spec),  # type: ignore[arg-type]
            send_configuration=sends_configuration(spec), parent_image=rec.parent_image,
            identity={"hostname": rec.hostname, "mac": rec.mac, "vmgenid": rec.vmgenid, **({"ip": rec.ip} if rec.ip else {})},
            guest_key=spec.kernel.parent.name if spec.kernel else "",  # guest/<key>/vmlinuz: the key names the build's inputs
            ready=rec.ready,
        )

    async def _run(self, job: Job, rec: VmRecord, peer: AsyncApiClient) -> None:
        proc = self.starter.proc(rec)
        target = RemoteTarget(peer, rec.name)
        prepared = False
        try:
            async with operation(f"migrate to {job.to}", vm=rec.name):
                answer = IncomingAnswer(**await peer.call("POST", "/v1/migrations/incoming",
                                                          json=self._request(rec, job.requested_mode).model_dump()))
                prepared = True
                job.mode, job.state = answer.mode, "running"
                if job.cancel.is_set():
                    raise MigrationCancelled("migration cancelled on request")

                def report(p: Progress) -> None:
                    job.progress = p

                if answer.mode == "live":
                    assert answer.uri is not None
                    job.result = await migrate_live(proc, target, answer.uri, postcopy=False, progress=report, cancel=job.cancel,
                                                    options=_live_options(job.max_bandwidth_mbps))
                else:
                    assert answer.host is not None and answer.port is not None
                    job.result = await migrate_delta(proc, rec.memory_bytes, (answer.host, answer.port),
                                                     netns=self.starter.vm_netns, progress=report, cancel=job.cancel,
                                                     on_failure=target.remove, on_paused=target.claim_network)
                    await target.wait_running(60.0)
                assert job.result is not None
                if job.result.details.get("claim_error") is None:  # nothing new reaches this tap now: hand on what did
                    job.result.details["forwarded_frames"] = await self._hand_on_frames(rec, peer)
                await self.starter.remove(rec, lent_to=job.to)  # its address stays its own: not handed to a clone here
                job.state = "completed"
        except BaseException as exc:
            if prepared and job.result is None:
                await target.remove()  # a no-op if the library already removed it
            if self.registry.set_state(rec.name, VmState.RUNNING, only_if=[VmState.MIGRATING]):
                self.registry.update(rec.name, migrating_to=None)
            job.state = "cancelled" if isinstance(exc, (MigrationCancelled, asyncio.CancelledError)) else "failed"
            job.error = str(exc) or type(exc).__name__
            if job.state == "failed" and not isinstance(exc, MigrationError):
                job.error += f"; the VM keeps running on this host ({rec.name})"
            if not isinstance(exc, Exception):
                raise
        finally:
            job.ended = time.perf_counter()
            r = job.result if job.state == "completed" else None
            self.metrics.migration_ended(job.mode or job.requested_mode, job.state, r.bytes_sent if r else 0,
                                         r.downtime_ms if r else None, job.ended - job.started)
            await peer.aclose()

    async def _hand_on_frames(self, rec: VmRecord, peer: AsyncApiClient) -> int:
        """Frames that reached the VM here while it was stopped go to its new host, which gives
        them to it: a lost SYN costs a new connection 1 s, a lost segment TCP's 200 ms timeout.
        They go over the agents' API, not back into the network: sent from this host with their
        senders' MACs, they would teach the switches that those senders are here."""
        frames = await self.starter.queued_frames(rec)
        if not frames:
            return 0
        try:
            answer = await peer.call("POST", f"/v1/vms/{rec.name}/frames", content=pack_frames(frames),
                                     headers={"Content-Type": "application/octet-stream"})
        except VmstreamError as exc:
            log.warning("could not hand %d frames of VM %s to its new host: %s", len(frames), rec.name, exc)
            return 0
        return int(answer.get("delivered", 0))

    async def recover(self, rec: VmRecord) -> str:
        """A move the agent that died was making: find out where the VM runs and keep it there
        only. The destination has it running (or has all of it: the source QEMU finished
        sending): this host's copy goes. It has not: its half is removed there and the VM runs
        here again. The peer cannot be asked: a source that had stopped stays paused (the
        operator decides, the error says how), one still running keeps running. What was done."""
        proc, name, to = self.starter.proc(rec), rec.name, rec.migrating_to
        status = await self.starter.qemu_status(proc)
        if to:
            try:
                async with self.peers.client(to) as peer:
                    there = await _where(peer, name)
                    if there == "incoming-running" or (there == "incoming" and status == "postmigrate"):
                        await peer.call("POST", f"/v1/migrations/incoming/{name}/running", params={"timeout": 30})
                        there = "running"
                    if there == "running":
                        await self.starter.remove(rec, lent_to=to)
                        return f"runs on {to}: its copy here is removed"
                    if there == "incoming":
                        await peer.call("DELETE", f"/v1/migrations/incoming/{name}")
            except VmstreamError as exc:
                if status not in ("running", None):
                    self.registry.set_state(name, VmState.PAUSED, only_if=[VmState.MIGRATING])
                    return (f"left paused: peer {to} could not be asked whether it runs there ({exc}); if it does not, "
                            f"'vmstream unpause {name}', else 'vmstream destroy {name}'")
        was = await self.starter.resume_if_paused(proc)  # a migration still under way is cancelled first
        self.registry.set_state(name, VmState.RUNNING, only_if=[VmState.MIGRATING])
        self.registry.update(name, migrating_to=None)
        return f"runs here again{f' (QEMU was {was})' if was else ''}"

    async def shutdown(self) -> None:
        for job in self.jobs.values():
            if job.task is not None and not job.task.done():
                job.cancel.set()
        await asyncio.gather(*(j.task for j in self.jobs.values() if j.task is not None), return_exceptions=True)
