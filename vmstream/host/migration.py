"""Moving VMs between host agents: peers, outgoing jobs, incoming VMs.

Source agent                                   destination agent
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

Whatever fails before the switch-over leaves the VM running on the source and
nothing on the destination. An incoming VM whose source never finishes is
removed after INCOMING_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import select

from vmstream.config import check_name
from vmstream.errors import BY_NAME, AgentUnavailable, Conflict, GuestError, InvalidInput, NotFound, VmstreamError
from vmstream.host.db import PeerRecord, VmRecord
from vmstream.host.machines import machine_from_dict, machine_to_dict, machine_to_json
from vmstream.host.schemas import (
    IncomingAnswer,
    IncomingRequest,
    IncomingStatus,
    MigrationInfo,
    PeerInfo,
    VmInfo,
)
from vmstream.migrate import (
    DeltaTarget,
    LiveOptions,
    LocalTarget,
    MigrationCancelled,
    MigrationError,
    MigrationResult,
    Progress,
    live_target_spec,
    migrate_delta,
    migrate_live,
    prepare_live_target,
)
from vmstream.migrate.target import sends_configuration
from vmstream.qemu import MachineSpec

if TYPE_CHECKING:
    from vmstream.host.manager import HostManager

INCOMING_TIMEOUT_S = 600.0
PEER_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
REMOTE_ALIVE_CHECK_S = 0.5  # a remote destination is asked over HTTP, so less often than each poll


def migration_address() -> str:
    """The address this host's QEMU and delta receiver listen on for incoming VMs."""
    return os.environ.get("VMSTREAM_MIGRATION_ADDRESS", "127.0.0.1")


class PeerClient:
    """HTTP client for one peer agent; its errors come back as the same error classes."""

    def __init__(self, name: str, url: str, token: str) -> None:
        self.name, self.url = name, url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=PEER_TIMEOUT)

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AgentUnavailable(f"peer host '{self.name}' at {self.url} cannot be reached: {exc or type(exc).__name__}") from exc
        if r.status_code == 401:
            raise InvalidInput(f"peer host '{self.name}' refused the token: add it again with its current agent.token")
        if r.status_code >= 400:
            try:
                body = r.json()
                cls = BY_NAME.get(body.get("error", ""), VmstreamError)
                raise cls(f"peer host '{self.name}': {body.get('message', r.text)}")
            except ValueError:
                raise VmstreamError(f"peer host '{self.name}' answered HTTP {r.status_code}: {r.text[:200]}") from None
        return r.json()

    async def close(self) -> None:
        await self.http.aclose()


class RemoteTarget:
    """The destination QEMU of a live migration, on a peer host (migrate.Target)."""

    def __init__(self, peer: PeerClient, vm: str) -> None:
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

    async def remove(self) -> None:
        with contextlib.suppress(VmstreamError):
            await self.peer.call("DELETE", f"/v1/migrations/incoming/{self.vm}")


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


@dataclass
class Incoming:
    """A VM this host is receiving: its row (state 'incoming') and QEMU."""

    name: str
    mode: str
    target: LocalTarget
    delta: DeltaTarget | None = None
    deadline: float = field(default_factory=lambda: time.monotonic() + INCOMING_TIMEOUT_S)


def _live_options(max_bandwidth_mbps: float | None) -> LiveOptions:
    opts = LiveOptions(alive_check_s=REMOTE_ALIVE_CHECK_S)
    if max_bandwidth_mbps is not None:
        opts = dataclasses.replace(opts, max_bandwidth=int(max_bandwidth_mbps * 1e6))
    return opts


class Migrations:
    """Both halves of migration for one host agent."""

    def __init__(self, manager: HostManager) -> None:
        self.m = manager
        self.jobs: dict[str, Job] = {}
        self.incoming: dict[str, Incoming] = {}

    # ---- peers -------------------------------------------------------------------------

    async def add_peer(self, name: str, url: str, token: str) -> PeerInfo:
        """Remember a peer, after checking it answers with this token."""
        check_name(name, "peer name")
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"peer URL '{url}' must start with http:// or https://")
        client = PeerClient(name, url, token)
        try:
            await client.call("GET", "/v1/info")
        finally:
            await client.close()
        with self.m.session() as s:
            rec = s.get(PeerRecord, name) or PeerRecord(name=name)
            rec.url, rec.token = url.rstrip("/"), token
            s.add(rec)
            s.commit()
            return PeerInfo(name=rec.name, url=rec.url, added_at=rec.added_at)

    def peers(self) -> list[PeerInfo]:
        with self.m.session() as s:
            return [PeerInfo(name=p.name, url=p.url, added_at=p.added_at) for p in s.scalars(select(PeerRecord).order_by(PeerRecord.name))]

    def remove_peer(self, name: str) -> None:
        with self.m.session() as s:
            rec = s.get(PeerRecord, name)
            if rec is None:
                raise NotFound(f"no peer host named '{name}': see 'vmstream peer list'")
            s.delete(rec)
            s.commit()

    def _peer(self, name: str) -> PeerClient:
        with self.m.session() as s:
            rec = s.get(PeerRecord, name)
        if rec is None:
            raise NotFound(f"no peer host named '{name}': add it with 'vmstream peer add {name} URL --token TOKEN'")
        return PeerClient(rec.name, rec.url, rec.token)

    # ---- source side ---------------------------------------------------------------------

    def running_machine(self, rec: VmRecord) -> MachineSpec:
        image = self.m.images.get(rec.parent_image) if rec.parent_image and not rec.spec else None
        return self.m._spec(rec, image)

    async def start(self, vm: str, to: str, mode: str, max_bandwidth_mbps: float | None = None) -> MigrationInfo:
        """Begin moving vm to peer `to`; runs in the background (see status / cancel)."""
        rec = self.m._record(vm)
        if rec.state != "running":
            raise Conflict(f"VM {vm} is {rec.state}: only a running VM can be migrated")
        if rec.disk:
            raise InvalidInput(f"VM {vm} is a disk guest: its disk is local to this host, and moving disks is not supported yet")
        old = self.jobs.get(vm)
        if old is not None and old.state in ("preparing", "running"):
            raise Conflict(f"VM {vm} is already migrating to '{old.to}': see 'vmstream migrate {vm} --status'")
        peer = self._peer(to)
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

    async def _run(self, job: Job, rec: VmRecord, peer: PeerClient) -> None:
        proc = self.m._proc(rec)
        target = RemoteTarget(peer, rec.name)
        prepared = False
        try:
            spec = self.running_machine(rec)
            req = IncomingRequest(
                name=rec.name, from_host=os.uname().nodename, mode=job.requested_mode, machine=machine_to_dict(spec),  # type: ignore[arg-type]
                send_configuration=sends_configuration(spec), parent_image=rec.parent_image,
                identity={"hostname": rec.hostname, "mac": rec.mac, "vmgenid": rec.vmgenid,
                          **({"ip": rec.ip} if rec.ip else {})},
                guest_key=spec.kernel.parent.name,  # guest/<key>/vmlinuz: the key names the build's inputs
            )
            answer = IncomingAnswer(**await peer.call("POST", "/v1/migrations/incoming", json=req.model_dump()))
            prepared = True
            job.mode, job.state = answer.mode, "running"
            if job.cancel.is_set():
                raise MigrationCancelled("migration cancelled on request")

            def report(p: Progress) -> None:
                job.progress = p

            if answer.mode == "live":
                assert answer.uri is not None
                job.result = await migrate_live(
                    proc, target, answer.uri, postcopy=False, progress=report, cancel=job.cancel,
                    options=_live_options(job.max_bandwidth_mbps),
                )
            else:
                assert answer.host is not None and answer.port is not None
                job.result = await migrate_delta(
                    proc, rec.memory_bytes, (answer.host, answer.port), netns=self.m.vm_netns,
                    progress=report,
                    cancel=job.cancel, on_failure=target.remove,
                )
                await target.wait_running(60.0)
            await proc.stop()
            self.m._delete_record(rec.name)
            job.state = "completed"
        except BaseException as exc:
            if prepared and job.result is None:
                await target.remove()  # a no-op if the library already removed it
            job.state = "cancelled" if isinstance(exc, (MigrationCancelled, asyncio.CancelledError)) else "failed"
            job.error = str(exc) or type(exc).__name__
            if job.state == "failed" and not isinstance(exc, MigrationError):
                job.error += f"; the VM keeps running on this host ({rec.name})"
            if not isinstance(exc, Exception):
                raise
        finally:
            job.ended = time.perf_counter()
            await peer.close()

    # ---- destination side ------------------------------------------------------------------

    async def prepare_incoming(self, req: IncomingRequest) -> IncomingAnswer:
        """Reserve the VM's name here and start a QEMU waiting for it."""
        check_name(req.name)
        m = self.m
        guest = await asyncio.to_thread(m.guest)
        if guest.key != req.guest_key:
            raise GuestError(
                f"this host's guest build ({guest.key}) differs from the source's ({req.guest_key}): "
                "both hosts must run the same vmstream version and guest kernel package"
            )
        source = machine_from_dict(req.machine)
        accel = (await asyncio.to_thread(m.accelerator, guest)).accel
        if accel != source.accel:
            raise InvalidInput(f"VM {req.name} runs under {source.accel} on the source, this host uses {accel}")
        bridged = bool(req.identity.get("ip"))
        if bridged != (m.net is not None):
            raise InvalidInput(
                f"VM {req.name} is on a {'bridged' if bridged else 'slirp'} network on the source, and this host's "
                f"VMs are on {'a bridge' if m.net else 'slirp'}: both hosts need the same kind (VMSTREAM_BRIDGE)"
            )
        has_image = req.parent_image is not None and m.images.exists(req.parent_image)
        mode = req.mode
        if mode == "delta" and not has_image:
            raise InvalidInput(
                f"delta migration needs VM {req.name}'s live image ({req.parent_image or 'none: it was booted'}) "
                "on this host's store; use --mode live"
            )
        if mode == "auto":
            mode = "delta" if has_image else "live"
        image = m.images.get(req.parent_image) if mode == "delta" and req.parent_image else None
        (rec,) = await m._reserve(
            [req.name], identity=req.identity,
            state="incoming", memory_bytes=source.memory_bytes, cpus=source.cpus, kernel=str(guest.kernel),
            initrd=str(guest.initrd), accel=accel, parent_image=image.name if image else None,
        )
        m._update(rec.name, migrated_from=req.from_host)
        proc = m._proc(rec)
        netns = m.vm_netns
        try:
            tap = m.tap_for(rec.vm_id, rec.ip) if rec.ip else None  # its own address, on this host's bridge
            if tap is not None and m.net is not None:
                m.net.create_tap(rec.vm_id)
            common: dict[str, Any] = {"vm_id": rec.vm_id, "http_port": rec.http_port, "kernel": guest.kernel,
                                      "initrd": guest.initrd, "tap": tap}
            if mode == "delta":
                assert image is not None
                await m.memfs.ensure()
                base = {k: v for k, v in machine_to_dict(source).items() if k not in ("kind", "send_configuration")}
                spec: MachineSpec = machine_from_dict({**base, "kind": "machine"})
                spec = dataclasses.replace(spec, **common, memory_file=m.images.memory_path(image), incoming=True)
                delta = DeltaTarget(proc, spec, migration_address(), netns)
                host, port = await delta.prepare()
                m._update(rec.name, pid=proc.pid, spec=machine_to_json(spec))
                self.incoming[rec.name] = inc = Incoming(rec.name, mode, LocalTarget(proc), delta)
                answer = IncomingAnswer(mode="delta", host=host, port=port)
            else:
                live = live_target_spec(source, **common, memory_file=None)
                uri = await prepare_live_target(proc, live, migration_address(), netns, postcopy=False)
                m._update(rec.name, pid=proc.pid, spec=machine_to_json(live))
                self.incoming[rec.name] = inc = Incoming(rec.name, mode, LocalTarget(proc))
                answer = IncomingAnswer(mode="live", uri=uri)
        except BaseException:
            await LocalTarget(proc).remove()
            m._delete_record(rec.name)
            raise
        m._spawn(self._expire(inc))
        return answer

    def _incoming(self, name: str) -> Incoming:
        inc = self.incoming.get(name)
        if inc is None:
            raise NotFound(f"no VM named '{name}' is migrating to this host")
        return inc

    async def incoming_status(self, name: str) -> IncomingStatus:
        inc = self._incoming(name)
        alive = await inc.target.alive()
        return IncomingStatus(name=name, state=self.m._record(name).state, alive=alive,
                              reason="" if alive else await inc.target.exit_reason())

    async def incoming_running(self, name: str, timeout: float) -> VmInfo:
        """Wait until the incoming VM runs here, then record it as this host's."""
        inc = self._incoming(name)
        if inc.delta is not None and inc.delta.task is not None:
            async with asyncio.timeout(timeout):
                await asyncio.shield(inc.delta.task)
            inc.delta.close()
        else:
            await inc.target.wait_running(timeout)
        self.m._update(name, state="running")
        self.incoming.pop(name, None)
        return self.m._info(self.m._record(name))

    async def incoming_announce(self, name: str) -> None:
        rec = self.m._record(name)
        await LocalTarget(self.m._proc(rec)).announce()

    async def remove_incoming(self, name: str) -> None:
        """The source gave up: remove the half-started VM (never a running one)."""
        inc = self.incoming.pop(name, None)
        if inc is None:
            return
        if inc.delta is not None:
            await inc.delta.abort()
        await inc.target.remove()
        with contextlib.suppress(NotFound):
            if self.m._record(name).state == "incoming":
                self.m._delete_record(name)

    async def _expire(self, inc: Incoming) -> None:
        while self.incoming.get(inc.name) is inc:
            if time.monotonic() > inc.deadline:
                await self.remove_incoming(inc.name)
                return
            await asyncio.sleep(1.0)

    async def shutdown(self) -> None:
        for job in self.jobs.values():
            if job.task is not None and not job.task.done():
                job.cancel.set()
        await asyncio.gather(*(j.task for j in self.jobs.values() if j.task is not None), return_exceptions=True)
        for name in list(self.incoming):
            await self.remove_incoming(name)


