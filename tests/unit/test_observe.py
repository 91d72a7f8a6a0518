"""The agent's metrics in Prometheus's text format: the pure parts (memfs's histogram turned
into Prometheus's, the families a snapshot gives, the request counter's route names)."""

from __future__ import annotations

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from vmstream.host.metrics import AgentMetrics
from vmstream.host.observe import Snapshot, VmView, exposition, memfs_families, snapshot_families, store_kind
from vmstream.memfs.fs import FETCH_BUCKETS, Latencies


def _samples(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = exposition(families).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_fetch_latencies_become_a_cumulative_histogram() -> None:
    lat = Latencies()
    for s in (0.0001, 0.0007, 0.003, 0.003, 100.0):
        lat.observe(s)
    assert sum(lat.counts) == 5 and lat.counts[-1] == 1  # the last bucket: over the largest bound
    stats = {"images": {"img": {"cache_hits": 30, "cache_misses": 10, "fetched_chunks": 10, "fetched_bytes": 655360}},
             "cache_bytes": 1000, "cache_capacity": 8000, "restarts": 1, "fetch_seconds": lat.to_dict()}
    got = _samples(list(memfs_families(stats, "peer")))
    assert got[("vmstream_memfs_fetch_seconds_bucket", (("le", "0.0005"), ("source", "peer")))] == 1
    assert got[("vmstream_memfs_fetch_seconds_bucket", (("le", "0.001"), ("source", "peer")))] == 2
    assert got[("vmstream_memfs_fetch_seconds_bucket", (("le", "0.005"), ("source", "peer")))] == 4
    assert got[("vmstream_memfs_fetch_seconds_bucket", (("le", str(FETCH_BUCKETS[-1])), ("source", "peer")))] == 4
    assert got[("vmstream_memfs_fetch_seconds_bucket", (("le", "+Inf"), ("source", "peer")))] == 5
    assert got[("vmstream_memfs_fetch_seconds_count", (("source", "peer"),))] == 5
    assert abs(got[("vmstream_memfs_fetch_seconds_sum", (("source", "peer"),))] - 100.0068) < 1e-9
    assert got[("vmstream_memfs_chunks_total", (("image", "img"), ("source", "cache")))] == 30
    assert got[("vmstream_memfs_chunks_total", (("image", "img"), ("source", "peer")))] == 10
    assert got[("vmstream_memfs_fetched_bytes_total", (("image", "img"), ("source", "peer")))] == 655360
    assert got[("vmstream_chunk_cache_hit_ratio", ())] == 0.75
    assert got[("vmstream_memfs_up", ())] == 1


def test_memfs_down_is_one_sample() -> None:
    assert _samples(list(memfs_families(None, "local"))) == {("vmstream_memfs_up", ()): 0}


def test_snapshot_families() -> None:
    def vm(name: str, private: int | None, pss: int | None, rss: int | None) -> VmView:
        return VmView(name=name, state="running", image="img", memory_bytes=256 << 20, private_bytes=private, shared_bytes=None,
                      resident_bytes=rss, pss_bytes=pss, balloon_bytes=None, limit_bytes=None, ready_s=0.1, created_at=0.0,
                      migrating_to=None, endpoint=None)

    snap = Snapshot(at=0.0, host="h", mem_total_bytes=100, mem_available_bytes=40, floor_bytes=5, pressure={"some_avg10": 2.5},
                    controller_cpu_s=1.5, store="local", vms=[vm("a", 10, 50, 100), vm("b", 20, 50, 100), vm("new", 5, None, None)],
                    images=[{"name": "img", "clones": 3}], memfs=None, pool={"img": 1}, groups=[], migrations=[], peers=[],
                    states={"running": 3, "exited": 0})
    got = _samples(list(snapshot_families(snap)))
    assert got[("vmstream_vms", (("state", "running"),))] == 3 and got[("vmstream_vms", (("state", "exited"),))] == 0
    assert got[("vmstream_vm_private_bytes", (("image", "img"), ("vm", "b")))] == 20
    assert ("vmstream_vm_pss_bytes", (("image", "img"), ("vm", "new"))) not in got, "no reading yet: no sample, not 0"
    assert got[("vmstream_vm_sharing_ratio", ())] == 2.0  # 200 resident for 100 of cost
    assert got[("vmstream_host_memory_pressure_ratio", (("kind", "some"),))] == 0.025
    assert got[("vmstream_memory_controller_cpu_seconds_total", ())] == 1.5
    assert got[("vmstream_live_image_clones", (("image", "img"),))] == 3


def test_event_metrics() -> None:
    m = AgentMetrics()
    m.clone_started("img", "img-1", 0.4, {"qemu_spawned": 0.05, "identity_applied": 0.3, "guest_woke": 0.01})
    m.migration_ended("delta", "completed", 1000, 40.0, 1.5)
    m.migration_ended("live", "failed")
    got = _samples(list(m.registry.collect()))
    assert got[("vmstream_clone_start_seconds_count", (("image", "img"),))] == 1
    phases = {dict(k[1])["phase"] for k in got if k[0] == "vmstream_clone_start_phase_seconds_count"}
    assert phases == {"qemu_spawned", "identity_applied"}, "the guest's own breakdown is not a phase label"
    assert got[("vmstream_migrations_total", (("mode", "live"), ("outcome", "failed")))] == 1
    assert got[("vmstream_migration_sent_bytes_total", (("mode", "delta"),))] == 1000
    assert got[("vmstream_migration_downtime_seconds_sum", (("mode", "delta"),))] == 0.04
    assert ("vmstream_migration_sent_bytes_total", (("mode", "live"),)) not in got
    assert m.events == 3 and len(m.recent_starts) == 1


def test_store_kind() -> None:
    assert store_kind("peer:http://127.0.0.1:1/v1/store") == "peer"
    assert store_kind("s3://bucket/p?endpoint_url=http://127.0.0.1:9000") == "s3"
    assert store_kind("/var/lib/store") == "local"
