"""What an operator watches: the agent's /metrics (Prometheus) and the dashboard's state.

Both are read off the host when asked, from one Snapshot: the VMs and their memory,
host memory, live images, memfs's counters, the clone pool, groups and migrations.
Event figures (clone start latency, pauses, migrations, API requests) are counted
where they happen (vmstream.host.metrics) and exported beside them.

A VM's smaps-based footprint (its PSS and the guest RAM still shared with its image)
costs ~1 ms per VM to read, too dear for every scrape of a host with 40 VMs: it is
re-read in the background when older than FOOTPRINT_MAX_AGE_S, and a scrape reports
the last reading. What a VM costs alone (RssAnon) is a counter, read live.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from vmstream.host import footprint
from vmstream.host.db import VmRecord
from vmstream.host.footprint import Footprint
from vmstream.host.manager import HostManager
from vmstream.host.state import VmState

FOOTPRINT_MAX_AGE_S = 5.0
MEMFS_STATS_TIMEOUT_S = 1.0
LIVE_STATES = (VmState.RUNNING, VmState.CAPTURING, VmState.MIGRATING, VmState.PAUSED)


def store_kind(spec: str) -> str:
    """Where memfs fetches what the host cache lacks: 'peer', 's3' or 'local'."""
    if spec.startswith("peer:"):
        return "peer"
    return "s3" if spec.startswith("s3://") else "local"


class FootprintCache:
    """Each VM's last smaps reading, refreshed off the event loop when stale."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[float, Footprint]] = {}  # pid -> (monotonic time, reading)
        self._refresh: asyncio.Task[None] | None = None

    def get(self, pid: int) -> Footprint | None:
        got = self._seen.get(pid)
        return got[1] if got else None

    def refresh(self, recs: list[VmRecord]) -> None:
        """Start one background pass over the VMs whose reading is stale (none if one runs)."""
        now = time.monotonic()
        live = {r.pid: r.memory_bytes for r in recs if r.pid}
        for pid in set(self._seen) - set(live):
            del self._seen[pid]
        stale = {pid: ram for pid, ram in live.items() if now - self._seen.get(pid, (-1e9, None))[0] > FOOTPRINT_MAX_AGE_S}
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(asyncio.to_thread(self._measure, stale))

    async def wait(self) -> None:
        """Until the pass under way (if any) is done: a first reading for a caller that wants one."""
        if self._refresh is not None:
            await asyncio.shield(self._refresh)

    def _measure(self, stale: dict[int, int]) -> None:
        for pid, ram in stale.items():
            with contextlib.suppress(OSError):  # it exited meanwhile
                self._seen[pid] = (time.monotonic(), footprint.measure(pid, ram))


@dataclass
class VmView:
    name: str
    state: str
    image: str | None
    memory_bytes: int
    private_bytes: int | None  # RssAnon: what it costs the host alone
    shared_bytes: int | None  # its guest RAM pages that are still the image's (shared through the page cache)
    resident_bytes: int | None
    pss_bytes: int | None
    balloon_bytes: int | None
    limit_bytes: int | None
    ready_s: float | None
    created_at: float
    migrating_to: str | None
    endpoint: str | None


@dataclass
class Snapshot:
    at: float
    host: str
    mem_total_bytes: int
    mem_available_bytes: int
    floor_bytes: int
    pressure: dict[str, float] | None
    controller_cpu_s: float
    store: str  # the kind: local, s3 or peer
    vms: list[VmView]
    images: list[dict[str, Any]]
    memfs: dict[str, Any] | None  # memfs's stats, None when it is not running
    pool: dict[str, int]
    groups: list[dict[str, Any]]
    migrations: list[dict[str, Any]]
    peers: list[dict[str, Any]]
    states: dict[str, int] = field(default_factory=dict)

    @property
    def sharing_ratio(self) -> float | None:
        """Memory the VMs see resident over what they cost the host (RSS / PSS, summed):
        1.0 when nothing is shared, N when N clones share all their pages."""
        rss = sum(v.resident_bytes or 0 for v in self.vms if v.pss_bytes)
        pss = sum(v.pss_bytes or 0 for v in self.vms)
        return rss / pss if pss else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at, "host": self.host, "store": self.store,
            "memory": {"total_bytes": self.mem_total_bytes, "available_bytes": self.mem_available_bytes,
                       "floor_bytes": self.floor_bytes, "pressure": self.pressure},
            "sharing_ratio": self.sharing_ratio, "states": self.states,
            "vms": [v.__dict__ for v in self.vms], "images": self.images, "pool": self.pool, "groups": self.groups,
            "migrations": self.migrations, "peers": self.peers,
            "memfs": _memfs_summary(self.memfs),
        }


def _memfs_summary(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """memfs's totals over all images: the dashboard's streaming traffic."""
    if stats is None:
        return None
    images = stats.get("images", {}).values()
    return {
        "fetched_bytes": sum(i.get("fetched_bytes", 0) for i in images),
        "fetched_chunks": sum(i.get("fetched_chunks", 0) for i in images),
        "cache_hits": sum(i.get("cache_hits", 0) for i in images),
        "cache_misses": sum(i.get("cache_misses", 0) for i in images),
        "cache_bytes": stats.get("cache_bytes", 0), "cache_capacity": stats.get("cache_capacity", 0),
        "restarts": stats.get("restarts", 0),
    }


class Observer:
    def __init__(self, manager: HostManager) -> None:
        self.manager = manager
        self.footprints = FootprintCache()

    async def snapshot(self, wait_footprints: bool = False) -> Snapshot:
        m = self.manager
        all_recs = m.registry.all(pooled=True)
        self.footprints.refresh([r for r in all_recs if r.state in LIVE_STATES])
        if wait_footprints:
            await self.footprints.wait()
        states = dict.fromkeys((s.value for s in VmState), 0)
        vms = []
        for r in all_recs:
            info = m.starter.info(r)  # marks a VM whose QEMU died as exited
            states[info.state.value] += 1
            if r.state == VmState.POOLED:
                continue
            vms.append(self._vm(r, info.state.value, info.endpoint))
        memfs = None
        if m.memfs.pid() is not None:
            with contextlib.suppress(Exception):  # not answering now: no memfs figures in this scrape
                memfs = await asyncio.wait_for(m.memfs.request("stats"), MEMFS_STATS_TIMEOUT_S)
        policy = m.memory_policy_info()
        meminfo = footprint.meminfo()
        pool = m.pool.info()
        return Snapshot(
            at=time.time(), host=os.uname().nodename, mem_total_bytes=meminfo["MemTotal"],
            mem_available_bytes=meminfo["MemAvailable"], floor_bytes=policy["floor_bytes"], pressure=policy["memory_pressure"],
            controller_cpu_s=policy["controller_cpu_s"], store=store_kind(m.settings.store_spec), vms=vms,
            images=[i.model_dump(mode="json") for i in m.image_ops.describe_all()], memfs=memfs,
            pool={name: len(pids) for name, pids in pool["pids"].items()},
            groups=[g.model_dump(mode="json", exclude={"events"}) for g in m.groups.list()],
            migrations=[j.info().model_dump(mode="json") for j in m.migrations.jobs.values()],
            peers=[p.model_dump(mode="json") for p in m.peers.list()], states=states,
        )

    def _vm(self, r: VmRecord, state: str, endpoint: str) -> VmView:
        live = r.pid is not None and state in LIVE_STATES
        private = None
        if live:
            assert r.pid is not None
            with contextlib.suppress(OSError):
                private = footprint.rss_anon(r.pid)
        fp = self.footprints.get(r.pid) if live and r.pid else None
        mem = self.manager.memory.info(r)
        balloon = mem.balloon_bytes if mem and mem.balloon_bytes else None
        if balloon is None and self.manager.starter.balloon(r):
            balloon = r.memory_bytes  # only the policy's controller inflates a balloon: without one it leaves all the RAM
        return VmView(
            name=r.name, state=state, image=r.parent_image, memory_bytes=r.memory_bytes, private_bytes=private,
            shared_bytes=fp.guest_ram.image_bytes if fp and fp.guest_ram else None,
            resident_bytes=fp.resident_bytes if fp else None, pss_bytes=fp.pss_bytes if fp else None,
            balloon_bytes=balloon,
            limit_bytes=mem.policy.limit_bytes if mem and mem.policy else None,
            ready_s=r.ready_s, created_at=r.created_at.timestamp(), migrating_to=r.migrating_to, endpoint=endpoint,
        )

    async def metrics(self) -> bytes:
        """The Prometheus text: the event metrics and this moment's figures."""
        snap = await self.snapshot()
        return exposition([*self.manager.metrics.registry.collect(), *snapshot_families(snap)])


@dataclass
class _Families:
    families: list[Metric]

    def collect(self) -> Iterable[Metric]:
        return self.families


def exposition(families: list[Metric]) -> bytes:
    """Prometheus's text format of these families."""
    return generate_latest(_Families(families))  # type: ignore[arg-type]  # anything with collect() will do


def _gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float | None]]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        if value is not None:
            g.add_metric(values, value)
    return g


def snapshot_families(s: Snapshot) -> Iterator[Metric]:
    """One moment's figures in Prometheus's names and units."""
    yield _gauge("vmstream_vms", "VMs on this host by state (pooled: a clone pool's QEMUs)", ["state"],
                 (([state], n) for state, n in s.states.items()))
    per_vm = [("memory", "Guest RAM the VM was given", lambda v: v.memory_bytes),
              ("private", "What the VM alone costs the host: its QEMU's anonymous memory (written guest pages, QEMU's own)",
               lambda v: v.private_bytes),
              ("shared", "The VM's guest RAM still the image's pages, shared with its siblings through the page cache",
               lambda v: v.shared_bytes),
              ("pss", "The VM's proportional set size: shared pages divided among their users", lambda v: v.pss_bytes),
              ("balloon", "Guest RAM the balloon leaves the VM (VMs with a memory policy)", lambda v: v.balloon_bytes),
              ("memory_limit", "The VM's memory limit (its policy)", lambda v: v.limit_bytes)]
    for what, doc, get in per_vm:
        yield _gauge(f"vmstream_vm_{what}_bytes", doc, ["vm", "image"], (([v.name, v.image or ""], get(v)) for v in s.vms))
    yield _gauge("vmstream_host_memory_total_bytes", "The host's memory", [], [([], s.mem_total_bytes)])
    yield _gauge("vmstream_host_memory_available_bytes", "The host's MemAvailable", [], [([], s.mem_available_bytes)])
    yield _gauge("vmstream_host_memory_floor_bytes", "MemAvailable the memory policy keeps (admission control)", [],
                 [([], s.floor_bytes)])
    yield _gauge("vmstream_host_memory_pressure_ratio", "Share of the last 10 s some or all tasks stalled on memory (PSI)",
                 ["kind"], (([k.removesuffix("_avg10")], v / 100) for k, v in (s.pressure or {}).items()))
    yield _gauge("vmstream_vm_sharing_ratio", "The VMs' resident memory over what they cost the host (RSS / PSS)", [],
                 [([], s.sharing_ratio)])
    c = CounterMetricFamily("vmstream_memory_controller_cpu_seconds", "CPU time the memory-policy controller used")
    c.add_metric([], s.controller_cpu_s)
    yield c
    yield _gauge("vmstream_live_images", "Live images on this host", [], [([], len(s.images))])
    yield _gauge("vmstream_live_image_clones", "Clones of each live image on this host", ["image"],
                 (([i["name"]], i["clones"]) for i in s.images))
    yield _gauge("vmstream_clone_pool_qemus", "Pooled (paused, ready) QEMUs per image", ["image"],
                 (([name], n) for name, n in s.pool.items()))
    yield _gauge("vmstream_migrations_in_progress", "Migrations from this host under way", [],
                 [([], sum(m["state"] in ("preparing", "running") for m in s.migrations))])
    yield _gauge("vmstream_peers", "Peer hosts this agent knows", [], [([], len(s.peers))])
    per_group: list[tuple[str, str, Callable[[dict[str, Any]], float]]] = [
        ("vmstream_group_members", "Members of each scaling group", lambda g: len(g["members"])),
        ("vmstream_group_wanted_members", "Members the group's scaler wants", lambda g: g["wanted"]),
        ("vmstream_group_load", "Requests in service or queued at the group", lambda g: g["load"])]
    for name, doc, get_g in per_group:
        yield _gauge(name, doc, ["group"], (([g["name"]], get_g(g)) for g in s.groups))
    yield from memfs_families(s.memfs, s.store)


def memfs_families(stats: dict[str, Any] | None, source: str) -> Iterator[Metric]:
    """memfs's counters: chunks by where they came from, bytes fetched, fetch latency, the host chunk cache."""
    yield _gauge("vmstream_memfs_up", "1 when the memory filesystem answers", [], [([], 0 if stats is None else 1)])
    if stats is None:
        return
    images = stats.get("images", {})
    chunks = CounterMetricFamily("vmstream_memfs_chunks", "Chunks memfs served, by where they came from (cache: the host "
                                 "chunk cache)", labels=["image", "source"])
    fetched = CounterMetricFamily("vmstream_memfs_fetched_bytes", "Bytes memfs fetched (uncompressed)", labels=["image", "source"])
    errors = CounterMetricFamily("vmstream_memfs_errors", "Chunks that could not be fetched or verified", labels=["image"])
    for name, i in images.items():
        chunks.add_metric([name, "cache"], i.get("cache_hits", 0))
        chunks.add_metric([name, source], i.get("fetched_chunks", 0))
        fetched.add_metric([name, source], i.get("fetched_bytes", 0))
        errors.add_metric([name], i.get("errors", 0))
    yield chunks
    yield fetched
    yield errors
    restarts = CounterMetricFamily("vmstream_memfs_restarts", "Times memfs took over its mount from a dead daemon")
    restarts.add_metric([], stats.get("restarts", 0))
    yield restarts
    if (lat := stats.get("fetch_seconds")) is not None:
        h = HistogramMetricFamily("vmstream_memfs_fetch_seconds", "One ranged read of chunks from the store or a peer",
                                  labels=["source"])
        cumulative, buckets = 0, []
        for le, n in zip([*lat["buckets"], float("inf")], lat["counts"], strict=True):
            cumulative += n
            buckets.append(("+Inf" if le == float("inf") else repr(float(le)), cumulative))
        h.add_metric([source], buckets, lat["sum"])
        yield h
    yield _gauge("vmstream_chunk_cache_bytes", "Bytes in the host chunk cache", [], [([], stats.get("cache_bytes"))])
    yield _gauge("vmstream_chunk_cache_capacity_bytes", "The host chunk cache's bound", [], [([], stats.get("cache_capacity"))])
    hits = sum(i.get("cache_hits", 0) for i in images.values())
    misses = sum(i.get("cache_misses", 0) for i in images.values())
    yield _gauge("vmstream_chunk_cache_hit_ratio", "Chunk reads served by the host cache, over all reads since memfs started",
                 [], [([], hits / (hits + misses) if hits + misses else None)])
