"""A scaling group whose members are Nova servers of a live image, behind HAProxy on this machine.

The agent's groups (vmstream.host.groups) start clones on their own host. On OpenStack, Nova
places VMs: this group asks Nova for servers of the live image's Glance image (one POST
/servers per batch, min = max = the gap), so they land on any compute the scheduler picks (the
image-aware weigher prefers hosts that hold the image), and it deletes them through Nova. The
sizing is the agent's groups' own (vmstream.lb.scaling), read from the same HAProxy statistics.

A member joins the balancer once Nova says ACTIVE (the vmstream driver reports a clone ACTIVE
once it is ready) and its address is known: `locate` maps a server to where it serves (on the
one-machine deployment: its compute's agent's port forward on 127.0.0.1). A member leaving is
drained first, then deleted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from vmstream.errors import VmstreamError
from vmstream.lb import BackendStats, Balancer, HaproxyError
from vmstream.lb.members import serving_address
from vmstream.lb.scaling import Sizer
from vmstream.openstack.deploy.cloud import Cloud
from vmstream.openstack.deploy.errors import DeployError
from vmstream.openstack.nova.translate import vm_name

LOG = logging.getLogger(__name__)
TICK_S = 0.2
NOVA_POLL_S = 0.5  # a server list costs nova-api a Neutron query per server: not faster
START_TIMEOUT_S = 600.0
RETRY_S = 5.0

Locate = Callable[[dict[str, Any]], "tuple[str, int] | None"]


def agent_locator(vm_on: Callable[[str, str], dict[str, Any] | None]) -> Locate:
    """A Locate for servers the vmstream driver runs: vm_on(compute, vm name) is that compute's
    agent's view of the VM (GET /v1/vms/NAME), or None for a compute it does not know; the
    server serves once its VM runs, where the agent says (vmstream.lb.members)."""
    def locate(server: dict[str, Any]) -> tuple[str, int] | None:
        host = server.get("OS-EXT-SRV-ATTR:host")
        vm = vm_on(host, vm_name(server["id"])) if host else None
        return serving_address(vm, 80) if vm is not None and vm["state"] == "running" else None

    return locate


@dataclass
class Member:
    server: str  # the Nova server's id
    state: str = "starting"  # starting | serving | leaving
    host: str | None = None  # its compute, once ACTIVE
    since: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"s-{self.server[:8]}"  # HAProxy's name for it


@dataclass
class NovaGroupSpec:
    name: str
    image: str  # the live image's Glance id
    flavor: str
    min_size: int = 1
    max_size: int = 10
    target_inflight: float = 4.0
    member_maxconn: int | None = None
    scale_in_delay_s: float = 10.0

    def check(self) -> None:
        if self.min_size < 0 or self.max_size < 1:
            raise VmstreamError(f"group {self.name}: --min must be >= 0 and --max >= 1")
        if self.min_size > self.max_size:
            raise VmstreamError(f"--min {self.min_size} is more than --max {self.max_size}: the smallest size cannot exceed the largest")
        if self.target_inflight <= 0:
            raise VmstreamError("--target-inflight must be more than 0")


class NovaGroup:
    """Owns its HAProxy and its Nova servers: close() removes both."""

    def __init__(self, cloud: Cloud, spec: NovaGroupSpec, balancer: Balancer, locate: Locate) -> None:
        spec.check()
        self.cloud = cloud
        self.spec = spec
        self.balancer = balancer
        self.locate = locate
        self.members: dict[str, Member] = {}
        self.sizer = Sizer()
        self.events: list[dict[str, Any]] = []
        self.last: BackendStats | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._retry_after = 0.0
        self._awaiting = 0  # servers asked of Nova that its server list does not show yet
        self.server_group: str | None = None

    # ---- life ----------------------------------------------------------------------

    def start(self) -> None:
        """HAProxy, a server group that spreads the members over hosts (soft anti-affinity),
        then min_size servers serving; on failure nothing is left."""
        self.balancer.start()
        try:
            self.server_group = self.cloud.create_server_group(self.spec.name)
            if self.spec.min_size:
                self._grow(self.spec.min_size)
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the start is the one to tell
                self.close()
            raise
        self.sizer.last_change = time.monotonic()
        loop = threading.Thread(target=self._run, name=f"group {self.spec.name}", daemon=True)
        loop.start()
        self._threads.append(loop)

    def close(self) -> None:
        """Stop scaling, stop HAProxy (requests in flight finish), delete every server."""
        self._stop.set()
        for t in list(self._threads):
            t.join(timeout=START_TIMEOUT_S)
        self.balancer.stop()
        with self._lock:
            ids = list(self.members)
        try:
            if ids:
                self.cloud.delete_servers(ids)
        finally:
            with self._lock:
                self.members.clear()
            if self.server_group is not None:
                self.cloud.delete_server_group(self.server_group)
                self.server_group = None

    def serving(self) -> list[Member]:
        with self._lock:
            return [m for m in self.members.values() if m.state == "serving"]

    def hosts(self) -> dict[str, int]:
        """Serving members per compute."""
        out: dict[str, int] = {}
        for m in self.serving():
            out[m.host or "?"] = out.get(m.host or "?", 0) + 1
        return out

    # ---- the scaler ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except (VmstreamError, OSError, httpx.HTTPError) as exc:
                if str(exc) != self.last_error:
                    LOG.warning("group %s: %s", self.spec.name, exc)
                self.last_error = str(exc)
            self._stop.wait(TICK_S)

    def _tick(self) -> None:
        now = time.monotonic()
        stats = self.balancer.stats()
        self.last = stats
        with self._lock:
            members = [m for m in self.members.values() if m.state != "leaving"]
            starting = sum(m.state == "starting" for m in members) + self._awaiting
        s = self.spec
        change = self.sizer.look(now, stats.load, len(members) + self._awaiting, starting, target=s.target_inflight, min_size=s.min_size,
                                 max_size=s.max_size, scale_in_delay_s=s.scale_in_delay_s)
        if change > 0 and now >= self._retry_after:
            self._background(self._grow, change)
        elif change < 0:
            leaving = sorted(members, key=lambda m: m.since)[change:]  # the newest leave
            with self._lock:
                for m in leaving:
                    m.state = "leaving"
            self.events.append({"at": time.time(), "action": "scale-in", "servers": [m.server for m in leaving]})
            for m in leaving:
                self._background(self._leave, m)

    def _background(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=self._guarded, args=(fn, *args), daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except (VmstreamError, OSError, httpx.HTTPError) as exc:
            self.last_error = f"{fn.__name__}: {exc}"
            self._retry_after = time.monotonic() + RETRY_S
            LOG.warning("group %s: %s", self.spec.name, self.last_error)

    def _grow(self, count: int) -> None:
        """One POST /servers for count servers (members of the group's server group); each joins
        the balancer once ACTIVE. Until Nova lists them, they count as awaited, so the scaler
        does not ask for them again."""
        s = self.spec
        with self._lock:
            self._awaiting += count
        seen: set[str] = set()
        try:
            reservation = self.cloud.create_servers(s.name, s.image, s.flavor, count=count, metadata={"vmstream_group": s.name},
                                                    server_group=self.server_group)
            self.events.append({"at": time.time(), "action": "scale-out", "count": count, "reservation": reservation})
            deadline = time.monotonic() + START_TIMEOUT_S
            added: set[str] = set()
            while True:
                servers = self.cloud.servers(reservation_id=reservation)
                with self._lock:
                    for srv in servers:
                        if srv["id"] not in seen:
                            seen.add(srv["id"])
                            self._awaiting -= 1
                            self.members.setdefault(srv["id"], Member(srv["id"]))
                for srv in servers:
                    if srv["id"] not in added:
                        self._join(srv, added)
                if (len(servers) == count and len(added) == count) or self._stop.is_set():
                    return
                if time.monotonic() > deadline:
                    raise DeployError(f"group {s.name}: {count - len(added)} server(s) not ACTIVE within {START_TIMEOUT_S:.0f}s")
                time.sleep(NOVA_POLL_S)
        finally:
            with self._lock:
                self._awaiting -= count - len(seen)

    def _join(self, srv: dict[str, Any], added: set[str]) -> None:
        """A server of a batch into the balancer once ACTIVE and located; one in ERROR is deleted."""
        if srv["status"] == "ERROR":
            with self._lock:
                self.members.pop(srv["id"], None)
            added.add(srv["id"])
            with contextlib.suppress(DeployError):
                self.cloud.request("compute", "DELETE", f"/servers/{srv['id']}")
            raise DeployError(f"server {srv['id']} of group {self.spec.name} went to ERROR: "
                              f"{(srv.get('fault') or {}).get('message', 'no fault given')}")
        if srv["status"] == "ACTIVE" and (where := self.locate(srv)) is not None:
            with self._lock:
                member = self.members[srv["id"]]
                member.host = srv.get("OS-EXT-SRV-ATTR:host")
            self.balancer.add(member.name, where[0], where[1], maxconn=self.spec.member_maxconn)
            with self._lock:
                member.state = "serving"
            added.add(srv["id"])

    def _leave(self, member: Member) -> None:
        with contextlib.suppress(HaproxyError, OSError):
            self.balancer.remove(member.name)
        self.cloud.delete_servers([member.server])
        with self._lock:
            self.members.pop(member.server, None)
