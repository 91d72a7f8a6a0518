"""vmstream's Nova driver on a real deployment: 2 computes, each driving its own vmstream
agent; servers are real QEMU guests (the demo guest, marked in Glance by vmstream_guest=demo).

Measures the time from `POST /servers` to every server ACTIVE, for 1 and for 10 servers: the
driver returns from spawn only once the agent says the guest answers its status page, so
ACTIVE here means serving (the `boots10_serving_s` baseline of `vmstream bench openstack`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.openstack.conftest import MARKER_IMAGE, OpenStack, agent_vms, demo_image, vmstream
from vmstream.openstack.deploy.cloud import Cloud
from vmstream.openstack.nova.translate import vm_name

pytestmark = pytest.mark.openstack

BOOT_TIMEOUT_S = 900  # 10 TCG cold boots sharing 2 busy cores


def boot(cloud: Cloud, name: str, count: int, image: str | None = None) -> tuple[list[dict[str, Any]], float]:
    """POST /servers (min = max = count, no network) -> every server ACTIVE: servers, seconds."""
    flavor = cloud.ensure_flavor()
    image = image or demo_image(cloud)
    cloud.token()  # not counted: a client holds its token already
    t0 = time.monotonic()
    reservation = cloud.create_servers(name, image, flavor, count=count)

    def active(servers: list[dict[str, Any]]) -> bool:
        failed = [(s["name"], s.get("fault")) for s in servers if s["status"] == "ERROR"]
        assert not failed, f"servers in ERROR: {failed}"
        return len(servers) == count and all(s["status"] == "ACTIVE" for s in servers)

    servers = cloud.wait_servers(active, "ACTIVE", timeout=BOOT_TIMEOUT_S, reservation_id=reservation)
    return servers, time.monotonic() - t0


def delete(cloud: Cloud, servers: list[dict[str, Any]]) -> float:
    t0 = time.monotonic()
    for s in servers:
        cloud.request("compute", "DELETE", f"/servers/{s['id']}")
    ids = {s["id"] for s in servers}
    cloud.wait_servers(lambda ss: not ids & {s["id"] for s in ss}, "deleted", timeout=300)
    return time.monotonic() - t0


def test_status_shows_the_agents(vmstream_openstack: OpenStack) -> None:
    st = vmstream("openstack", "status", "--dir", str(vmstream_openstack.state), "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    services = {s["name"]: s for s in json.loads(st.stdout)["services"]}
    assert {"agent-compute1", "agent-compute2", "compute1", "compute2"} <= set(services)
    assert all(s["running"] and s["answers"] for s in services.values()), services


def test_two_servers_run_as_vms_of_their_hosts_agents(vmstream_openstack: OpenStack) -> None:
    with vmstream_openstack.cloud() as cloud:
        servers, active_s = boot(cloud, "two", 2)
        by_host: dict[str, list[str]] = {}
        for s in servers:
            host = s["OS-EXT-SRV-ATTR:host"]
            assert s["OS-EXT-STS:power_state"] == 1  # RUNNING, from the agent's VM state
            vm = agent_vms(vmstream_openstack, host)[vm_name(s["id"])]
            assert vm["state"] == "running"
            status = httpx.get(vm["endpoint"].rstrip("/") + "/status.json", timeout=30).json()  # the guest itself
            assert status["hostname"] == vm_name(s["id"]) and "counter" in status
            by_host.setdefault(host, []).append(s["id"])
        hypervisors = cloud.json("compute", "GET", "/os-hypervisors/detail")["hypervisors"]
        assert {h["hypervisor_hostname"] for h in hypervisors} == {"compute1", "compute2"}
        assert {h["hypervisor_type"] for h in hypervisors} == {"qemu"}

        gone_s = delete(cloud, servers)
        for host in ("compute1", "compute2"):
            assert not [n for n in agent_vms(vmstream_openstack, host) if n.startswith("nova-")]
    print(f"2 servers ACTIVE in {active_s:.2f}s on {sorted(by_host)}; deleted, VMs gone, in {gone_s:.2f}s")


def test_an_image_the_driver_cannot_boot_fails_the_server_and_leaves_no_vm(vmstream_openstack: OpenStack) -> None:
    with vmstream_openstack.cloud() as cloud:
        image = cloud.upload_image("not-a-guest", MARKER_IMAGE, vmstream_guest="windows")
        reservation = cloud.create_servers("bad", image, cloud.ensure_flavor(), count=1)
        servers = cloud.wait_servers(lambda ss: ss and ss[0]["status"] == "ERROR", "ERROR", timeout=120,
                                     reservation_id=reservation)
        fault = servers[0].get("fault", {}).get("message", "")
        assert "vmstream_guest" in fault and "demo" in fault, fault
        assert not any(n.startswith("nova-") for h in ("compute1", "compute2") for n in agent_vms(vmstream_openstack, h))
        delete(cloud, servers)


def test_cold_boot_times_through_nova(vmstream_openstack: OpenStack, tmp_path: Path) -> None:
    """POST /servers -> ACTIVE (= serving) for 1 server, then for 10 (min = max = 10)."""
    with vmstream_openstack.cloud() as cloud:
        one, one_s = boot(cloud, "one", 1)
        delete(cloud, one)
        ten, ten_s = boot(cloud, "ten", 10)
        hosts = sorted(s["OS-EXT-SRV-ATTR:host"] for s in ten)
        ready: list[float] = []  # each VM's boot as its agent timed it (request to guest ready)
        for host in set(hosts):
            running = [vm for n, vm in agent_vms(vmstream_openstack, host).items() if n.startswith("nova-")]
            assert len(running) == hosts.count(host) and all(vm["state"] == "running" for vm in running)
            ready += [vm["ready_s"] for vm in running if vm.get("ready_s") is not None]
        gone_s = delete(cloud, ten)
    figures = {"boot1_serving_s": round(one_s, 2), "boots10_serving_s": round(ten_s, 2),
               "split": {h: hosts.count(h) for h in sorted(set(hosts))}, "delete10_s": round(gone_s, 2),
               "agent_ready_s_min_max": [round(min(ready), 2), round(max(ready), 2)] if ready else None}
    print("cold boots through Nova:", json.dumps(figures))
    assert ten_s < BOOT_TIMEOUT_S
