"""Live images through Nova and Glance on the real deployment (2 vmstream computes).

`createImage` on a running server makes a vmstream live image registered in Glance; servers
of that image are clones; the Glance image cannot be deleted under them; a deleted one is
reaped from the agents and the store; live migration moves a clone with its memory and
identity, and a move whose destination dies leaves the server ACTIVE on its source.
"""

from __future__ import annotations

import base64
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.openstack.conftest import OpenStack, agent_call, agent_vms, demo_image
from vmstream.openstack.deploy.cloud import Cloud
from vmstream.openstack.deploy.errors import DeployError
from vmstream.openstack.nova.translate import vm_name

pytestmark = pytest.mark.openstack

HOSTS = ("compute1", "compute2")
MEMCHECK = "memcheck-fill 64 7"  # 64 MiB of the guest's memory filled from seed 7
REAP_TIMEOUT_S = 300  # the computes' image cache pass runs every 60 s; a parent goes a pass after its children


@dataclass
class LiveImage:
    id: str
    name: str  # the vmstream live image's
    flavor: str
    source: str  # the source server's id


def wait_active(cloud: Cloud, reservation: str, count: int, timeout: float = 600) -> list[dict[str, Any]]:
    def done(servers: list[dict[str, Any]]) -> bool:
        failed = [(s["name"], s.get("fault")) for s in servers if s["status"] == "ERROR"]
        assert not failed, f"servers in ERROR: {failed}"
        return len(servers) == count and all(s["status"] == "ACTIVE" for s in servers)

    return cloud.wait_servers(done, "ACTIVE", timeout=timeout, reservation_id=reservation)


def wait_error(cloud: Cloud, reservation: str) -> dict[str, Any]:
    (server,) = cloud.wait_servers(lambda ss: len(ss) == 1 and ss[0]["status"] == "ERROR", "ERROR", timeout=300,
                                   reservation_id=reservation)
    return server


def ask(openstack: OpenStack, host: str, server_id: str, command: str) -> dict[str, Any]:
    answer: dict[str, Any] = agent_call(openstack, host, "POST", f"/v1/vms/{vm_name(server_id)}/guest",
                                        json={"command": command, "timeout": 120}, timeout=180)
    return answer


def no_vm_anywhere(openstack: OpenStack, server_id: str) -> None:
    for host in HOSTS:
        assert vm_name(server_id) not in agent_vms(openstack, host), f"{host} still has the VM of {server_id}"


@pytest.fixture(scope="module")
def live(vmstream_openstack: OpenStack) -> Iterator[LiveImage]:
    """A demo-guest server on compute1 and a live image of it, made through Nova."""
    with vmstream_openstack.cloud() as cloud:
        flavor = cloud.ensure_flavor()
        src = wait_active(cloud, cloud.create_servers("live-src", demo_image(cloud), flavor, host="compute1"), 1)[0]
        image_id = cloud.live_image(src["id"], "web-live")
        image = cloud.json("image", "GET", f"/v2/images/{image_id}")
        yield LiveImage(image_id, image["vmstream_live_image"], flavor, src["id"])
        servers = cloud.servers(image=image_id)
        if servers:
            cloud.delete_servers([s["id"] for s in servers])
        cloud.delete_servers([src["id"]])
        if cloud.request("image", "GET", f"/v2/images/{image_id}", expect=()).status_code == 200:
            cloud.delete_image(image_id)


def test_a_live_image_in_glance_starts_clones_with_their_params(vmstream_openstack: OpenStack, live: LiveImage) -> None:
    with vmstream_openstack.cloud() as cloud:
        image = cloud.json("image", "GET", f"/v2/images/{live.id}")
        assert image["protected"] is True and image["status"] == "active"
        assert live.name == f"glance-{live.id}"
        assert image["vmstream_source_server"] == live.source and image["vmstream_flavor"] == live.flavor
        assert image["vmstream_memory_mb"] == "256"
        reservation = cloud.create_servers("web", live.id, live.flavor, count=4, metadata={"role": "web", "tier": "front"})
        servers = wait_active(cloud, reservation, 4)
        for s in servers:
            host = s["OS-EXT-SRV-ATTR:host"]
            vm = agent_vms(vmstream_openstack, host)[vm_name(s["id"])]
            assert vm["state"] == "running" and vm["parent_image"] == live.name, vm
            deadline = time.monotonic() + 120
            while not vm["hooks"] and time.monotonic() < deadline:  # the clone hooks run just after it answers
                time.sleep(0.5)
                vm = agent_vms(vmstream_openstack, host)[vm_name(s["id"])]
            output = base64.b64decode(vm["hooks"]["hooks"][0]["output_b64"]).decode()
            assert "role=web" in output and "tier=front" in output, output
        # Glance refuses to delete the image while it is a live image (protected)
        refused = cloud.request("image", "DELETE", f"/v2/images/{live.id}", expect=())
        assert refused.status_code == 403 and "protected" in refused.text.lower(), refused.text
        cloud.delete_servers([s["id"] for s in servers])
        for s in servers:
            no_vm_anywhere(vmstream_openstack, s["id"])


def test_bad_requests_fail_cleanly(vmstream_openstack: OpenStack, live: LiveImage) -> None:
    with vmstream_openstack.cloud() as cloud:
        # a flavor with less memory than the live image's guest
        small = cloud.ensure_flavor("vmstream.small", ram_mib=128)
        server = wait_error(cloud, cloud.create_servers("small", live.id, small))
        fault = server["fault"]["message"]
        assert "at least 256 MB of RAM (this one: 128 MB" in fault, fault
        no_vm_anywhere(vmstream_openstack, server["id"])
        cloud.delete_servers([server["id"]])
        # a Glance image that claims a live image vmstream does not have
        ghost = cloud.upload_image("ghost-live", b"{}\n", vmstream_live_image=f"glance-{uuid.uuid4()}")
        server = wait_error(cloud, cloud.create_servers("ghost", ghost, live.flavor))
        assert "no live image named" in server["fault"]["message"], server["fault"]
        no_vm_anywhere(vmstream_openstack, server["id"])
        cloud.delete_servers([server["id"]])
        cloud.request("image", "DELETE", f"/v2/images/{ghost}")
        # count 0 and an unknown image are refused by Nova's API before anything starts
        body = {"server": {"name": "none", "imageRef": live.id, "flavorRef": live.flavor, "networks": "none",
                           "min_count": 0, "max_count": 0}}
        r = cloud.request("compute", "POST", "/servers", json=body, microversion="2.37", expect=())
        assert r.status_code == 400, r.text
        with pytest.raises(DeployError, match="400"):
            cloud.create_servers("unknown", str(uuid.uuid4()), live.flavor)
        assert not [s for s in cloud.servers() if s["name"] in ("none", "unknown")]


def test_live_migration_of_a_clone_keeps_its_memory_and_identity(vmstream_openstack: OpenStack, live: LiveImage) -> None:
    with vmstream_openstack.cloud() as cloud:
        (server,) = wait_active(cloud, cloud.create_servers("mover", live.id, live.flavor, host="compute1"), 1)
        before = agent_vms(vmstream_openstack, "compute1")[vm_name(server["id"])]
        assert ask(vmstream_openstack, "compute1", server["id"], MEMCHECK)["ok"]
        cloud.request("compute", "POST", f"/servers/{server['id']}/action", microversion="2.34",
                      json={"os-migrateLive": {"host": "compute2", "block_migration": "auto"}})
        cloud.wait_servers(
            lambda ss: ss[0]["OS-EXT-SRV-ATTR:host"] == "compute2" and ss[0]["status"] == "ACTIVE"
            and not ss[0]["OS-EXT-STS:task_state"], "moved to compute2", timeout=300, uuid=server["id"])
        after = agent_vms(vmstream_openstack, "compute2")[vm_name(server["id"])]
        assert after["state"] == "running"
        assert (after["mac"], after["hostname"], after["vmgenid"]) == (before["mac"], before["hostname"], before["vmgenid"])
        assert vm_name(server["id"]) not in agent_vms(vmstream_openstack, "compute1")
        assert ask(vmstream_openstack, "compute2", server["id"], "memcheck-verify")["ok"]
        cloud.delete_servers([server["id"]])


def test_pause_and_unpause_through_the_openstack_cli(vmstream_openstack: OpenStack, live: LiveImage) -> None:
    """`openstack server pause` stops the clone's vCPUs (it answers nothing, keeps its memory);
    a paused server is not live-migrated; `unpause` runs it on from where it was."""
    with vmstream_openstack.cloud() as cloud:
        (server,) = wait_active(cloud, cloud.create_servers("napper", live.id, live.flavor, host="compute2"), 1)
        name = vm_name(server["id"])
        endpoint = agent_vms(vmstream_openstack, "compute2")[name]["endpoint"]
        assert ask(vmstream_openstack, "compute2", server["id"], MEMCHECK)["ok"]
        for verb, status, state in (("pause", "PAUSED", "paused"), ("unpause", "ACTIVE", "running")):
            proc = vmstream_openstack.osc_run("server", verb, server["id"])
            assert proc.returncode == 0, proc.stderr[-2000:]
            cloud.wait_servers(lambda ss, st=status: ss[0]["status"] == st and not ss[0]["OS-EXT-STS:task_state"],
                               status, timeout=120, uuid=server["id"])
            assert agent_vms(vmstream_openstack, "compute2")[name]["state"] == state
            if verb == "pause":
                with pytest.raises(httpx.TimeoutException):  # QEMU takes the connection; the guest never answers
                    httpx.get(endpoint, timeout=2)
                moved = vmstream_openstack.osc_run("server", "migrate", "--live-migration", "--host", "compute1", server["id"])
                time.sleep(2)  # a refused move is refused at once; one that went ahead would show as MIGRATING
                s = cloud.json("compute", "GET", f"/servers/{server['id']}")["server"]
                assert s["OS-EXT-SRV-ATTR:host"] == "compute2" and s["status"] == "PAUSED", (moved.stderr, s)
        assert httpx.get(endpoint, timeout=30).status_code == 200
        assert ask(vmstream_openstack, "compute2", server["id"], "memcheck-verify")["ok"]
        cloud.delete_servers([server["id"]])
        no_vm_anywhere(vmstream_openstack, server["id"])


def test_a_destination_that_dies_mid_move_leaves_the_server_on_its_source(vmstream_openstack: OpenStack) -> None:
    """A cold-booted server moves in QEMU's live mode, capped (MIGRATION_MBPS) so the test can
    kill the destination's incoming QEMU in the middle of it."""
    with vmstream_openstack.cloud() as cloud:
        flavor = cloud.ensure_flavor()
        (server,) = wait_active(cloud, cloud.create_servers("doomed-move", demo_image(cloud), flavor, host="compute1"), 1)
        assert ask(vmstream_openstack, "compute1", server["id"], MEMCHECK)["ok"]
        cloud.request("compute", "POST", f"/servers/{server['id']}/action", microversion="2.34",
                      json={"os-migrateLive": {"host": "compute2", "block_migration": "auto"}})
        deadline, pid = time.monotonic() + 120, None
        while pid is None and time.monotonic() < deadline:
            vm = agent_vms(vmstream_openstack, "compute2").get(vm_name(server["id"]))
            if vm and vm["state"] == "incoming" and vm.get("pid"):
                pid = int(vm["pid"])
            else:
                time.sleep(0.05)
        assert pid is not None, "the move never reached the destination"
        time.sleep(1.0)  # into the memory stream
        os.kill(pid, signal.SIGKILL)  # the destination QEMU the deployment's agent started for this move
        (after,) = cloud.wait_servers(
            lambda ss: ss[0]["status"] == "ACTIVE" and not ss[0]["OS-EXT-STS:task_state"], "back to ACTIVE",
            timeout=300, uuid=server["id"])
        assert after["OS-EXT-SRV-ATTR:host"] == "compute1"
        migrations = cloud.json("compute", "GET", "/os-migrations", params={"instance_uuid": server["id"]},
                                microversion="2.59")["migrations"]
        assert migrations and migrations[0]["status"] in ("error", "failed"), migrations
        vm = agent_vms(vmstream_openstack, "compute1")[vm_name(server["id"])]
        assert vm["state"] == "running"
        assert vm_name(server["id"]) not in agent_vms(vmstream_openstack, "compute2")
        assert ask(vmstream_openstack, "compute1", server["id"], "memcheck-verify")["ok"]
        cloud.delete_servers([server["id"]])


def test_aggregate_cache_image_prewarms_a_host(vmstream_openstack: OpenStack, live: LiveImage) -> None:
    """`openstack aggregate cache image` (compute API 2.81) -> the driver's cache_image: the
    live image's memory is read onto the aggregate's host and its clone pool filled."""
    agent_call(vmstream_openstack, "compute2", "POST", "/v1/host/cache/drop")
    before = agent_call(vmstream_openstack, "compute2", "GET", "/v1/host")["memfs"].get("images", {}).get(live.name, {})
    assert not before.get("held"), before
    with vmstream_openstack.cloud() as cloud:
        agg = cloud.json("compute", "POST", "/os-aggregates", json={"aggregate": {"name": "prewarm"}})["aggregate"]
        try:
            cloud.request("compute", "POST", f"/os-aggregates/{agg['id']}/action", json={"add_host": {"host": "compute2"}})
            cloud.request("compute", "POST", f"/os-aggregates/{agg['id']}/images", json={"cache": [{"id": live.id}]},
                          microversion="2.81")
            deadline, stats, pool = time.monotonic() + 180, before, {}
            while time.monotonic() < deadline and not (stats.get("held") and live.name in pool.get("ready", {})):
                time.sleep(1)
                host = agent_call(vmstream_openstack, "compute2", "GET", "/v1/host")
                stats, pool = host["memfs"]["images"].get(live.name, {}), host["clone_pool"]
            # all of it through memfs: answered to the kernel's reads, or pushed into its page cache ahead of them
            assert stats.get("held") and stats["read_bytes"] + stats["pushed_chunks"] * stats["chunk_size"] >= stats["size"], stats
            assert live.name in pool.get("ready", {}), pool  # and a pooled QEMU of it waits
        finally:
            cloud.request("compute", "POST", f"/os-aggregates/{agg['id']}/action", json={"remove_host": {"host": "compute2"}},
                          expect=())
            cloud.request("compute", "DELETE", f"/os-aggregates/{agg['id']}", expect=())


def test_the_client_plugins_verbs(vmstream_openstack: OpenStack, live: LiveImage) -> None:
    """`openstack live-image ...` (vmstream's osc plugin) end to end, bad input included."""
    osc, run = vmstream_openstack.osc, vmstream_openstack.osc_run
    listed = {i["Name"]: i for i in osc("live-image", "list")}
    assert listed["web-live"]["Live Image"] == live.name and listed["web-live"]["Source Server"] == live.source
    started = osc("live-image", "start", "web-live", "--count", "2", "--name", "plug", "--param", "role=worker", "--wait",
                  timeout=600)
    assert sorted(s["Name"] for s in started) == ["plug-1", "plug-2"] and {s["Status"] for s in started} == {"ACTIVE"}
    servers = osc("live-image", "servers", "web-live")
    assert {"plug-1", "plug-2"} <= {s["Name"] for s in servers}
    for s in started:
        vm = agent_vms(vmstream_openstack, s["Host"])[vm_name(s["ID"])]
        assert vm["parent_image"] == live.name
    # a live image of a clone: layered on its parent's memory
    child = osc("live-image", "create", "plug-1", "plug-live", timeout=600)
    assert child["status"] == "active" and child["live_image"] == f"glance-{child['id']}" and child["protected"] is True
    assert child["source_server"] == next(s["ID"] for s in started if s["Name"] == "plug-1")
    (grandchild,) = osc("live-image", "start", "plug-live", "--count", "1", "--name", "layer", "--wait", timeout=600)
    vm = agent_vms(vmstream_openstack, grandchild["Host"])[vm_name(grandchild["ID"])]
    assert vm["parent_image"] == child["live_image"]

    refused = run("live-image", "delete", "web-live")
    assert refused.returncode != 0 and "plug-1" in refused.stderr and "delete them first" in refused.stderr, refused.stderr
    not_live = run("live-image", "start", "vmstream-demo", "--count", "1", "--name", "never")
    assert not_live.returncode != 0 and "not a live image" in not_live.stderr, not_live.stderr
    zero = run("live-image", "start", "web-live", "--count", "0", "--name", "never")
    assert zero.returncode == 2 and "count" in zero.stderr, zero.stderr
    unknown = run("live-image", "start", "no-such-image", "--count", "1", "--name", "never")
    assert unknown.returncode != 0 and "no-such-image" in unknown.stderr, unknown.stderr
    with vmstream_openstack.cloud() as cloud:
        assert not [s for s in cloud.servers() if s["name"].startswith("never")]
        cloud.delete_servers([grandchild["ID"]])
        assert run("live-image", "delete", "plug-live").returncode == 0
        assert cloud.request("image", "GET", f"/v2/images/{child['id']}", expect=()).status_code == 404
        cloud.delete_servers([s["ID"] for s in started])


def test_a_deleted_live_image_is_reaped_from_the_agents_and_the_store(vmstream_openstack: OpenStack, live: LiveImage) -> None:
    """Last in the module: deletes the module's live image (once no server uses it)."""
    with vmstream_openstack.cloud() as cloud:
        assert not cloud.servers(image=live.id)
        cloud.delete_image(live.id)
    store_meta = vmstream_openstack.state / "store" / "meta" / "images" / live.name
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while time.monotonic() < deadline:
        held = [h for h in HOSTS if live.name in {i["name"] for i in agent_call(vmstream_openstack, h, "GET", "/v1/live-images")}]
        if not held and not store_meta.exists():
            return
        time.sleep(5)
    raise AssertionError(f"live image {live.name} still on {held} (store meta there: {store_meta.exists()})")
