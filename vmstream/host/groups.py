"""Scaling groups: VMs of one live image behind their own HAProxy, sized to their load.

Each group has a row (vmstream.host.db.GroupRecord), a Balancer (vmstream.lb) listening on
its port, and a scaler task that reads HAProxy's statistics every TICK_S and sizes the group by
them (vmstream.lb.scaling: requests in service or waiting, per member, against the target).
Members that are wanted start at once, as one batch (clones start in parallel), and each joins
the balancer when it answers, so no request reaches a VM that is not ready; members that are
no longer wanted leave drained (no new requests, those in service finish), then destroyed.

Member rows (GroupMemberRecord) say what each VM is to its group, so an agent that restarts
finds its groups, their HAProxy (which outlives the agent, as QEMU does) and their members,
and puts right what it was doing: a member started but not yet added is added, one that was
leaving leaves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import math
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from vmstream.config import check_name
from vmstream.errors import Conflict, InvalidInput, NotFound, VmstreamError
from vmstream.host.clones import CloneStarter
from vmstream.host.db import GroupMemberRecord, GroupRecord
from vmstream.host.peers import Peers
from vmstream.host.registry import VmRegistry
from vmstream.host.schemas import GroupEvent, GroupInfo, GroupMember, GroupRequest, GroupUpdate, VmInfo
from vmstream.host.starter import Starter
from vmstream.host.state import VmState
from vmstream.host.tasks import Tasks, log, operation
from vmstream.image import ImageRepository, LiveImage
from vmstream.lb import BackendStats, Balancer, HaproxyError
from vmstream.lb.members import serving_address
from vmstream.lb.scaling import Sizer
from vmstream.policy import start_cost

TICK_S = 0.2  # how often a scaler reads HAProxy's statistics
RETRY_S = 5.0  # after a failed start, or a balancer that would not start, the scaler waits this long
RECONCILE_TICKS = 5  # every this many looks, members whose VM is gone are dropped
MAX_GROUP_NAME = 56  # members are NAME-N, and a VM name has at most 63 characters
EVENTS_KEPT = 20
LOCAL = "local"  # this host, among a group's hosts

Boot = Callable[[str, LiveImage], Awaitable[VmInfo]]
Destroy = Callable[[str], Awaitable[None]]


class MemberState:
    STARTING = "starting"  # its VM is starting; not in the balancer yet
    SERVING = "serving"  # in the balancer
    LEAVING = "leaving"  # draining, then destroyed


@dataclass
class _Scaler:
    """A group's running parts: its balancer, its scaler task and what it has seen."""

    balancer: Balancer
    sizer: Sizer = field(default_factory=Sizer)
    starting: set[str] = field(default_factory=set)
    leaving: set[str] = field(default_factory=set)
    events: collections.deque[GroupEvent] = field(default_factory=lambda: collections.deque(maxlen=EVENTS_KEPT))
    retry_after: float = 0.0
    last: BackendStats | None = None
    last_error: str | None = None
    task: asyncio.Task[None] | None = None
    work: set[asyncio.Task[None]] = field(default_factory=set)  # starts and leaves under way
    ticks: int = 0

    def event(self, action: str, vms: list[str], detail: str = "") -> None:
        self.events.append(GroupEvent(at=datetime.now(UTC), action=action, vms=vms, detail=detail))


class Groups:
    """The host's scaling groups: create, change, delete, and the scaler of each."""

    def __init__(self, session: sessionmaker, registry: VmRegistry, starter: Starter, images: ImageRepository,
                 clones: CloneStarter, boot: Boot, destroy: Destroy, peers: Peers, run_dir: Path, tasks: Tasks,
                 tb_mib: int) -> None:
        """tb_mib: the members' translation cache under TCG (VMSTREAM_GROUP_TB_MIB)."""
        self.session = session
        self.peers = peers
        self.tb_mib = tb_mib
        self.registry = registry
        self.starter = starter
        self.images = images
        self.clones = clones
        self.boot = boot
        self.destroy_vm = destroy
        self.run_dir = run_dir
        self.tasks = tasks
        self._scalers: dict[str, _Scaler] = {}
        self._lock = asyncio.Lock()  # one create, change or delete at a time

    # ---- rows ----------------------------------------------------------------------

    def _row(self, name: str) -> GroupRecord:
        with self.session() as s:
            row = s.get(GroupRecord, name)
        if row is None:
            raise NotFound(f"no group named '{name}': see 'vmstream group list'")
        return row

    def _rows(self) -> list[GroupRecord]:
        with self.session() as s:
            return list(s.scalars(select(GroupRecord).order_by(GroupRecord.created_at)))

    def _members(self, group: str) -> list[GroupMemberRecord]:
        with self.session() as s:
            return list(s.scalars(select(GroupMemberRecord).where(GroupMemberRecord.group == group).order_by(GroupMemberRecord.since)))

    def _set_member(self, group: str, vm: str, state: str, host: str | None = None) -> None:
        """A member's state (host: the peer a new member runs on; None: this host)."""
        with self.session.begin() as s:
            row = s.get(GroupMemberRecord, vm)
            if row is None:
                s.add(GroupMemberRecord(vm=vm, group=group, state=state, host=host))
            else:
                row.state = state

    def _drop_member(self, vm: str) -> None:
        with self.session.begin() as s:
            s.execute(delete(GroupMemberRecord).where(GroupMemberRecord.vm == vm))

    # ---- the operations ------------------------------------------------------------

    async def create(self, req: GroupRequest) -> GroupInfo:
        """Check everything, start the balancer and min_size members; on any failure nothing
        is left (no row, no HAProxy, no member)."""
        name = self._check_name(req.name)
        async with self._lock, operation(f"create group {name}", image=req.image):
            with self.session() as s:
                if s.get(GroupRecord, name) is not None:
                    raise Conflict(f"a group named '{name}' already exists: choose another name or delete it first")
                if (other := s.scalars(select(GroupRecord).where(GroupRecord.port == req.port)).first()) is not None:
                    raise Conflict(f"port {req.port} is group '{other.name}''s: choose another --port")
            image = self.images.get(req.image)
            row = GroupRecord(
                name=name, image=req.image, min_size=req.min_size, max_size=req.max_size, target_inflight=req.target_inflight,
                port=req.port, member_port=req.member_port, health_path=req.health_path, member_maxconn=req.member_maxconn,
                scale_in_delay_s=req.scale_in_delay_s, start=req.start, hosts=json.dumps(req.hosts),
            )
            self._check(row, image)
            _check_port_free(req.port)
            with self.session.begin() as s:
                s.add(row)
            scaler = _Scaler(self._balancer(row))
            try:
                await asyncio.to_thread(scaler.balancer.start)
                if row.min_size:
                    await self._grow(row, scaler, row.min_size)
            except BaseException:
                await self._teardown(row, scaler)
                raise
            self._scalers[name] = scaler
            scaler.sizer.last_change = time.monotonic()
            scaler.task = self.tasks.spawn(self._run(name), "group scaler")
        return self.show(name)

    def _check_name(self, name: str) -> str:
        check_name(name, "group")
        if len(name) > MAX_GROUP_NAME:
            raise InvalidInput(f"group name '{name}' is {len(name)} characters: at most {MAX_GROUP_NAME} (members are NAME-N)")
        return name

    def _check(self, row: GroupRecord, image: LiveImage) -> None:
        """What a group's settings must satisfy, with its image."""
        if row.min_size > row.max_size:
            raise InvalidInput(f"--min {row.min_size} is more than --max {row.max_size}: the smallest size cannot exceed the largest")
        g = image.guest
        if row.start == "boot" and (g.disk or g.append is not None or not g.kernel):
            raise InvalidInput(f"image '{row.image}' is of a disk guest: a group of cold-booted members (--start boot) is for "
                               "the demo guest only; use --start clone")
        if row.member_port != 80 and self.starter.net is None and row.member_port not in g.guest_ports:
            raise InvalidInput(f"image '{row.image}' does not publish guest port {row.member_port}: its clones could not be reached "
                               f"on it. Boot its VM with --publish {row.member_port} and make the image again, or use --member-port 80")
        hosts = _hosts(row)
        peers = {p.name for p in self.peers.list()}
        if unknown := [h for h in hosts if h != LOCAL and h not in peers]:
            raise NotFound(f"--hosts names {', '.join(unknown)}, which is neither 'local' nor a peer of this host: "
                           "add it with 'vmstream peer add NAME URL --token TOKEN', or leave it out")
        if len(set(hosts)) != len(hosts):
            raise InvalidInput(f"--hosts names a host twice: {', '.join(hosts)}")
        if row.start == "boot" and hosts != [LOCAL]:
            raise InvalidInput("--start boot members are booted on this host only: leave out --hosts")
        cost = start_cost(g.memory_bytes, None, clone=row.start == "clone")
        here = math.ceil(row.max_size / len(hosts)) if LOCAL in hosts else 0  # members go where there are fewest
        self.starter.admit([cost] * here, f"group '{row.name}' at its --max of {row.max_size} member(s) ({here} on this host)")

    def _balancer(self, row: GroupRecord) -> Balancer:
        # a short directory: HAProxy takes a runtime socket path of at most 97 characters
        short = hashlib.sha256(row.name.encode()).hexdigest()[:8]
        return Balancer(row.name, self.run_dir / f"lb-{short}", row.port, row.health_path)

    async def update(self, name: str, req: GroupUpdate) -> GroupInfo:
        """New sizes, target or delay; the scaler goes by them from its next look."""
        async with self._lock:
            row = self._row(name)
            for key, value in req.model_dump(exclude_none=True).items():
                setattr(row, key, value)
            self._check(row, self.images.get(row.image))
            with self.session.begin() as s:
                s.merge(row)
        log.info("group %s: now min %d, max %d, target %.1f in flight per member", name, row.min_size, row.max_size,
                 row.target_inflight)
        return self.show(name)

    async def delete(self, name: str) -> None:
        """Stop the scaler, then the balancer (requests in flight finish), then the members."""
        async with self._lock, operation(f"delete group {name}"):
            row = self._row(name)
            scaler = self._scalers.pop(name, None) or _Scaler(self._balancer(row))
            await self._teardown(row, scaler)

    async def _teardown(self, row: GroupRecord, scaler: _Scaler) -> None:
        if scaler.task is not None:
            scaler.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scaler.task
        for task in list(scaler.work):
            task.cancel()
        await asyncio.gather(*scaler.work, return_exceptions=True)
        await asyncio.to_thread(scaler.balancer.stop)
        members = self._members(row.name)
        vms = [m.vm for m in members]
        results = await asyncio.gather(*(self._destroy_member(m.vm, m.host) for m in members), return_exceptions=True)
        failed = [f"{vm}: {r}" for vm, r in zip(vms, results, strict=True) if isinstance(r, BaseException)]
        if failed:  # the row stays: a second delete tries again
            raise Conflict(f"group '{row.name}': could not destroy member(s) {'; '.join(failed)}; try the delete again")
        with self.session.begin() as s:
            s.execute(delete(GroupRecord).where(GroupRecord.name == row.name))
        await asyncio.to_thread(shutil.rmtree, scaler.balancer.run_dir, True)  # its configuration, socket and log

    async def _destroy_member(self, vm: str, host: str | None) -> None:
        """Destroy a member's VM, here or on its peer, and forget it."""
        if host is None:
            if self.registry.find(vm) is not None:
                with contextlib.suppress(NotFound):
                    await self.destroy_vm(vm)
        else:
            async with self.peers.client(host) as peer:
                with contextlib.suppress(NotFound):
                    await peer.call("DELETE", f"/v1/vms/{vm}")
        self._drop_member(vm)

    async def _look_up(self, row: GroupRecord, m: GroupMemberRecord) -> tuple[str, tuple[str, int]] | None:
        """A member's VM: its state and where it serves, on this host or its peer; None if it is
        gone. A peer that cannot be asked raises (the member is kept: HAProxy's checks decide)."""
        if m.host is None:
            rec = self.registry.find(m.vm)
            if rec is None:
                return None
            vm = self.starter.info(rec).model_dump(mode="json")
        else:
            async with self.peers.client(m.host) as peer:
                try:
                    vm = await peer.call("GET", f"/v1/vms/{m.vm}")
                except NotFound:
                    return None
        return vm["state"], serving_address(vm, row.member_port, _on(m.host))

    async def delete_all(self) -> int:
        """Every group (the agent stopping with its VMs destroyed)."""
        rows = self._rows()
        for row in rows:
            await self.delete(row.name)
        return len(rows)

    async def reattach(self) -> None:
        """At agent start: each group's balancer (kept if its HAProxy still runs), its members
        put right, and its scaler."""
        for row in self._rows():
            scaler = _Scaler(self._balancer(row))
            self._scalers[row.name] = scaler
            try:
                await self._restore(row, scaler)
            except Exception as exc:  # the scaler tries again
                scaler.last_error = f"at agent start: {exc}"
                log.warning("group %s: %s", row.name, scaler.last_error)
            scaler.sizer.last_change = time.monotonic()
            scaler.task = self.tasks.spawn(self._run(row.name), "group scaler")

    async def _restore(self, row: GroupRecord, scaler: _Scaler) -> None:
        """The group's HAProxy running (kept, or started again: dynamic members do not survive
        HAProxy), members that were leaving gone, the others in it, strays out of it."""
        kept = scaler.balancer.pid() is not None
        if not kept:
            await asyncio.to_thread(scaler.balancer.start)
        for m in self._members(row.name):
            if m.state == MemberState.LEAVING:
                await self._leave(row, scaler, m)
        stats = await asyncio.to_thread(scaler.balancer.stats)
        await self._reconcile(row, scaler, stats)
        known = {m.vm for m in self._members(row.name)}
        for stray in set(stats.members) - known:
            with contextlib.suppress(HaproxyError, OSError):
                await asyncio.to_thread(scaler.balancer.remove, stray, 5.0)
        log.info("group %s: balancer %s, %d member(s)", row.name, "kept" if kept else "started again", len(known))

    async def _reconcile(self, row: GroupRecord, scaler: _Scaler, stats: BackendStats) -> None:
        """Members whose VM is gone or exited (not by the group) leave it; members missing from
        HAProxy (an agent that died between a start and its add, a peer that could not be asked
        then) are added again. A peer that cannot be asked now is asked again next time."""
        for m in self._members(row.name):
            if m.vm in scaler.starting or m.vm in scaler.leaving or m.state == MemberState.LEAVING:
                continue
            try:
                found = await self._look_up(row, m)
            except VmstreamError:
                continue
            if found is None or found[0] == VmState.EXITED:
                log.warning("group %s: member %s is %s: it leaves the group", row.name, m.vm, "gone" if found is None else "exited")
                scaler.event("lost", [m.vm], "its VM is gone" if found is None else "its VM exited")
                self._spawn_work(scaler, self._leave(row, scaler, m), f"member {m.vm} leaving")
            elif m.vm not in stats.members:
                await asyncio.to_thread(scaler.balancer.add, m.vm, *found[1], maxconn=row.member_maxconn)
                self._set_member(row.name, m.vm, MemberState.SERVING)

    # ---- the scaler ----------------------------------------------------------------

    async def _run(self, name: str) -> None:
        while True:
            scaler = self._scalers.get(name)
            if scaler is None:
                return
            try:
                row = self._row(name)
            except NotFound:  # deleted
                return
            try:
                await self._tick(row, scaler)
            except Exception as exc:
                if str(exc) != scaler.last_error:
                    log.warning("group %s: %s", name, exc)
                scaler.last_error = str(exc)
                scaler.retry_after = time.monotonic() + RETRY_S
            await asyncio.sleep(TICK_S)

    async def _tick(self, row: GroupRecord, scaler: _Scaler) -> None:
        now = time.monotonic()
        if scaler.balancer.pid() is None:
            if now < scaler.retry_after:
                return
            log.warning("group %s: its HAProxy is not running: starting it again", row.name)
            await self._restore(row, scaler)
        stats = await asyncio.to_thread(scaler.balancer.stats)
        scaler.last = stats
        scaler.ticks += 1
        if scaler.ticks % RECONCILE_TICKS == 0:
            await self._reconcile(row, scaler, stats)
        members = [m for m in self._members(row.name) if m.state != MemberState.LEAVING and m.vm not in scaler.leaving]
        change = scaler.sizer.look(now, stats.load, len(members), len(scaler.starting), target=row.target_inflight,
                                   min_size=row.min_size, max_size=row.max_size, scale_in_delay_s=row.scale_in_delay_s)
        if change > 0 and now >= scaler.retry_after:
            await self._grow(row, scaler, change, background=True)
        elif change < 0:
            leaving = members[change:]  # the newest leave
            for m in leaving:
                self._spawn_work(scaler, self._leave(row, scaler, m), f"member {m.vm} leaving")
            scaler.event("scale-in", [m.vm for m in leaving], f"{len(members)} -> {len(members) + change} member(s)")

    def _spawn_work(self, scaler: _Scaler, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = self.tasks.spawn(coro, what)
        scaler.work.add(task)
        task.add_done_callback(scaler.work.discard)

    def _new_names(self, group: str, count: int) -> list[str]:
        taken = {r.name for r in self.registry.all()} | {m.vm for m in self._members(group)}
        names: list[str] = []
        index = 1
        while len(names) < count:
            if f"{group}-{index}" not in taken:
                names.append(f"{group}-{index}")
            index += 1
        return names

    async def _grow(self, row: GroupRecord, scaler: _Scaler, count: int, background: bool = False) -> None:
        """Start count members as one batch; each joins the balancer once it answers."""
        names = self._new_names(row.name, count)
        places = self._place(row, count)
        for vm, host in zip(names, places, strict=True):
            self._set_member(row.name, vm, MemberState.STARTING, None if host == LOCAL else host)
        scaler.starting.update(names)
        scaler.event("scale-out", names, f"load {scaler.last.load if scaler.last else 0}, {len(names)} more")
        if background:
            self._spawn_work(scaler, self._start_members(row, scaler, names), f"group {row.name} starting members")
        else:
            await self._start_members(row, scaler, names, raise_errors=True)

    def _place(self, row: GroupRecord, count: int) -> list[str]:
        """Where each of count new members runs: the host (of the group's) with the fewest, in turn."""
        hosts = _hosts(row)
        load = dict.fromkeys(hosts, 0)
        for m in self._members(row.name):
            if m.state != MemberState.LEAVING and (m.host or LOCAL) in load:
                load[m.host or LOCAL] += 1
        places = []
        for _ in range(count):
            host = min(hosts, key=lambda h: load[h])  # ties: the first named
            load[host] += 1
            places.append(host)
        return places

    async def _start_members(self, row: GroupRecord, scaler: _Scaler, names: list[str], raise_errors: bool = False) -> None:
        members = {m.vm: m for m in self._members(row.name) if m.vm in names}
        by_host: dict[str | None, list[str]] = {}
        for vm in names:
            by_host.setdefault(members[vm].host, []).append(vm)
        try:
            started: dict[str, dict[str, Any]] = {}  # the members' VmInfo, as their start answered
            for batch in await asyncio.gather(*(self._start_on(row, host, vms) for host, vms in by_host.items())):
                started.update((vm["name"], vm) for vm in batch)
            for vm in names:
                where = serving_address(started[vm], row.member_port, _on(members[vm].host))
                await asyncio.to_thread(scaler.balancer.add, vm, *where, maxconn=row.member_maxconn)
                self._set_member(row.name, vm, MemberState.SERVING)
                scaler.starting.discard(vm)
        except BaseException as exc:
            failed = [vm for vm in names if vm in scaler.starting]
            scaler.starting.difference_update(failed)
            scaler.retry_after = time.monotonic() + RETRY_S
            if not isinstance(exc, asyncio.CancelledError):
                scaler.last_error = f"starting {', '.join(failed)}: {exc}"
                scaler.event("start-failed", failed, str(exc))
                log.warning("group %s: %s", row.name, scaler.last_error)
            await asyncio.shield(asyncio.gather(*(self._destroy_member(vm, members[vm].host) for vm in failed),
                                                return_exceptions=True))
            if raise_errors or isinstance(exc, asyncio.CancelledError):
                raise

    async def _start_on(self, row: GroupRecord, host: str | None, names: list[str]) -> list[dict[str, Any]]:
        """Start members as one batch on this host (clones, or cold boots) or on a peer (clones,
        through its API: the peer reads the image from the store it shares with this host); the
        VMs as the agent API describes them."""
        if host is not None:
            async with self.peers.client(host) as peer:
                answer = await peer.call("POST", f"/v1/live-images/{row.image}/start", json={"count": len(names), "names": names})
            vms: list[dict[str, Any]] = answer["vms"]
            return vms
        if row.start == "clone":
            result = await self.clones.start(row.image, len(names), None, names=names, tb_mib=self.tb_mib)
            return [vm.model_dump(mode="json") for vm in result.vms]
        image = self.images.get(row.image)
        return [vm.model_dump(mode="json") for vm in await asyncio.gather(*(self.boot(vm, image) for vm in names))]

    async def _leave(self, row: GroupRecord, scaler: _Scaler, m: GroupMemberRecord) -> None:
        """Drain a member (its requests in service finish), then destroy it."""
        scaler.leaving.add(m.vm)
        try:
            self._set_member(row.name, m.vm, MemberState.LEAVING)
            with contextlib.suppress(HaproxyError, OSError):  # not in the balancer (any more), or HAProxy is gone
                await asyncio.to_thread(scaler.balancer.remove, m.vm)
            await self._destroy_member(m.vm, m.host)
        finally:
            scaler.leaving.discard(m.vm)

    # ---- reading -------------------------------------------------------------------

    def list(self) -> list[GroupInfo]:
        return [self.show(row.name) for row in self._rows()]

    def show(self, name: str) -> GroupInfo:
        row = self._row(name)
        scaler = self._scalers.get(name)
        stats = scaler.last if scaler else None
        members = []
        for m in self._members(name):
            figures = stats.members.get(m.vm) if stats else None
            members.append(GroupMember(
                name=m.vm, host=m.host or LOCAL, state=m.state, since=m.since, balancer_status=figures.status if figures else None,
                in_service=figures.current if figures else 0, served=figures.total if figures else 0,
            ))
        return GroupInfo(
            name=row.name, image=row.image, min_size=row.min_size, max_size=row.max_size, target_inflight=row.target_inflight,
            port=row.port, endpoint=f"http://127.0.0.1:{row.port}/", member_port=row.member_port, health_path=row.health_path,
            member_maxconn=row.member_maxconn, scale_in_delay_s=row.scale_in_delay_s, start=row.start, hosts=_hosts(row),
            created_at=row.created_at,
            balancer_pid=scaler.balancer.pid() if scaler else None, members=members,
            serving=sum(m.state == MemberState.SERVING for m in members),
            load=stats.load if stats else 0, queued=stats.queued if stats else 0,
            wanted=scaler.sizer.wanted(row.target_inflight, row.min_size, row.max_size) if scaler else row.min_size,
            last_error=scaler.last_error if scaler else None, events=list(scaler.events) if scaler else [],
        )


def _hosts(row: GroupRecord) -> list[str]:
    hosts: list[str] = json.loads(row.hosts) if row.hosts else [LOCAL]
    return hosts


def _on(host: str | None) -> str:
    """' on peer P' for a member on a peer, '' for one here (for errors)."""
    return f" on peer {host}" if host else ""


def _check_port_free(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HAProxy binds: a port in TIME_WAIT is free
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise Conflict(f"port {port} on 127.0.0.1 is in use ({exc.strerror}): choose another --port") from None
