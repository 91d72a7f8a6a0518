"""The agents' /metrics, scraped by a real Prometheus (Debian's package) and read back
through its HTTP API, after clones start on two hosts and one moves between them.

Host A (the session agent) is scraped with its read-only scrape token, host B (a peer
that streams A's image) with its agent token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hosts import Cli, free_port
from tests.integration.conftest import SCRAPE_TOKEN, BaseImage, VmFactory

PROMETHEUS = "/usr/bin/prometheus"


class Prometheus:
    """A Prometheus server on loopback scraping the given agents every second; stopped by its pid."""

    def __init__(self, root: Path, targets: dict[str, tuple[int, str]]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        jobs = []
        for job, (port, token) in targets.items():
            (root / f"{job}.token").write_text(token)
            jobs.append({"job_name": job, "scrape_interval": "1s", "scrape_timeout": "1s",
                         "authorization": {"type": "Bearer", "credentials_file": str(root / f"{job}.token")},
                         "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]})
        config = root / "prometheus.yml"
        config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))  # JSON is YAML
        self.log = open(root / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"prometheus exited: {(root / 'prometheus.log').read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus was not ready in 60 s"
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        result: list[dict[str, Any]] = r.json()["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait(self, expr: str, ok: Any, timeout: float = 30) -> float:
        """The expression's value once ok(value) holds (Prometheus sees a scrape a second after it)."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(expr)
            if v is not None and ok(v):
                return v
            assert time.monotonic() < deadline, f"{expr} = {v} after {timeout} s"
            time.sleep(0.5)

    def targets_up(self) -> dict[str, str]:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return {t["labels"]["job"]: t["health"] for t in r["data"]["activeTargets"]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(cli: Cli, peer_host: Cli, tmp_path: Path) -> Iterator[Prometheus]:
    cli.json("list")
    peer_host.json("list")
    targets = {"a": (json.loads((cli.home / "agent.json").read_text())["port"], SCRAPE_TOKEN),
               "b": (json.loads((peer_host.home / "agent.json").read_text())["port"],
                     (peer_host.home / "agent.token").read_text().strip())}
    root = tmp_path / "prometheus"
    root.mkdir()
    prom = Prometheus(root, targets)
    try:
        yield prom
    finally:
        prom.stop()


def test_scrape_token_reads_metrics_only(cli: Cli, base_image: BaseImage) -> None:
    url, auth, _ = cli.agent()
    scrape = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    r = httpx.get(f"{url}/metrics", headers=scrape, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:200]
    assert "vmstream_vms{" in r.text
    assert httpx.get(f"{url}/metrics", headers=auth, timeout=10).status_code == 200  # the agent token too
    assert httpx.get(f"{url}/v1/dashboard/state", headers=scrape, timeout=10).status_code == 200  # watching is reading
    assert httpx.get(f"{url}/v1/vms", headers=scrape, timeout=10).status_code == 401  # the API is not
    r = httpx.post(f"{url}/v1/live-images/base-img/start", json={"count": 1}, headers=scrape, timeout=10)
    assert r.status_code == 401, "a scrape token must not start clones"


def test_prometheus_sees_every_family(cli: Cli, base_image: BaseImage, peer_host: Cli, vms: VmFactory,
                                      prometheus: Prometheus) -> None:
    a, b = 'job="a"', 'job="b"'
    prometheus.wait(f"vmstream_memfs_up{{{a}}}", lambda v: v >= 0)
    prometheus.wait(f"vmstream_memfs_up{{{b}}}", lambda v: v >= 0)
    assert prometheus.targets_up() == {"a": "up", "b": "up"}
    before = prometheus.value(f'sum(vmstream_clone_start_seconds_count{{{a}}})') or 0.0

    # a burst of 3 clones on A, 2 on B (which streams the image from A), one of A's moved to B
    burst = vms.clones("base-img", count=3, prefix="prom")
    remote = peer_host.json("live-image", "start", "base-img", "--count", "2", "--name", "prom-b")["vms"]
    try:
        peer_host.json("peer", "add", "a", "--home", str(cli.home))
        cli.json("peer", "add", "b", "--home", str(peer_host.home))
        moved = cli.json("migrate", burst[0]["name"], "--to", "b")
        assert moved["state"] == "completed", moved
        vms.names.remove(burst[0]["name"])
        remote.append(burst[0])

        # clone start latency: one observation per clone started, and each phase as often
        assert prometheus.wait(f'sum(vmstream_clone_start_seconds_count{{{a}}})', lambda v: v >= before + 3) == before + 3
        assert prometheus.wait(f'sum(vmstream_clone_start_seconds_count{{{b}}})', lambda v: v >= 2) == 2
        assert prometheus.value(f'vmstream_clone_start_phase_seconds_count{{{b},phase="identity_applied"}}') == 2
        assert prometheus.value(f'vmstream_clone_starts_total{{{b},outcome="ok"}}') == 2
        p50 = prometheus.value(f'histogram_quantile(0.5, sum by (le) (vmstream_clone_start_seconds_bucket{{{b}}}))')
        assert p50 is not None and 0 < p50 < 60, p50
        # VMs by state, per-VM memory (a clone's own pages, the image's pages it shares, its balloon)
        prometheus.wait(f'vmstream_vms{{{b},state="running"}}', lambda v: v == 3)
        name = burst[1]["name"]
        private = prometheus.wait(f'vmstream_vm_private_bytes{{{a},vm="{name}"}}', lambda v: v > 0)
        shared = prometheus.wait(f'vmstream_vm_shared_bytes{{{a},vm="{name}"}}', lambda v: v > 0)
        assert private + shared <= burst[1]["memory_bytes"] + (64 << 20), (private, shared)
        assert prometheus.value(f'vmstream_vm_balloon_bytes{{{a},vm="{name}"}}') == burst[1]["memory_bytes"]
        assert prometheus.wait(f"vmstream_vm_sharing_ratio{{{b}}}", lambda v: v > 1.0) > 1.0, "B's clones share the image"
        # host memory
        total = prometheus.value(f"vmstream_host_memory_total_bytes{{{a}}}")
        avail = prometheus.value(f"vmstream_host_memory_available_bytes{{{a}}}")
        assert total and avail and 0 < avail < total
        # memfs: B fetched the image's chunks from its peer, timed; A served its clones from its cache
        fetched = prometheus.wait(f'sum(vmstream_memfs_fetched_bytes_total{{{b},source="peer"}})', lambda v: v > 0)
        assert prometheus.wait(f'vmstream_memfs_fetch_seconds_count{{{b},source="peer"}}', lambda v: v > 0) > 0
        assert prometheus.value(f'vmstream_memfs_fetch_seconds_bucket{{{b},source="peer",le="+Inf"}}') == \
            prometheus.value(f'vmstream_memfs_fetch_seconds_count{{{b},source="peer"}}')
        assert prometheus.wait(f'sum(vmstream_memfs_chunks_total{{{a},source="cache"}})', lambda v: v > 0) > 0
        cache = prometheus.wait(f"vmstream_chunk_cache_bytes{{{b}}}", lambda v: v > 0)
        assert cache <= fetched + (1 << 20), (cache, fetched)  # the cache holds what was fetched (stored compressed or not)
        ratio = prometheus.value(f"vmstream_chunk_cache_hit_ratio{{{b}}}")
        assert ratio is not None and 0 <= ratio <= 1
        # the move: outcome, bytes, downtime
        assert prometheus.wait(f'vmstream_migrations_total{{{a},mode="delta",outcome="completed"}}', lambda v: v >= 1) >= 1
        assert prometheus.value(f'vmstream_migration_sent_bytes_total{{{a},mode="delta"}}') > 0
        assert prometheus.value(f'vmstream_migration_downtime_seconds_count{{{a},mode="delta"}}') >= 1
        # live images (the session image's pause), and the API by route and status
        assert prometheus.value(f"vmstream_live_image_pause_seconds_count{{{a}}}") >= 1
        starts = prometheus.value(f'sum(vmstream_api_requests_total{{{b},route="/v1/live-images/{{name}}/start",status="200"}})')
        assert starts == 1
        assert prometheus.value(f'sum(vmstream_api_request_duration_seconds_count{{{a},route="/metrics"}})') >= 1
    finally:
        for vm in remote:
            peer_host.run("destroy", vm["name"])
