"""A scaling group of Nova servers (vmstream.openstack.autoscale) on the real deployment (2
vmstream computes): load through its HAProxy adds servers of the live image, spread over both
computes by the group's soft-anti-affinity server group; without load it shrinks back; close
leaves no server, server group or HAProxy. (Named to sort after test_deploy.py: the session's
vmstream deployment must not start before that module's FakeDriver one, on the same ports.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hosts import Load, free_port
from tests.openstack.conftest import OpenStack, agent_call, demo_image
from tests.procs import pids_mentioning
from vmstream.lb import Balancer
from vmstream.openstack.autoscale import NovaGroup, NovaGroupSpec, agent_locator

pytestmark = pytest.mark.openstack


@pytest.fixture(scope="module")
def live_image(vmstream_openstack: OpenStack) -> Iterator[tuple[str, str]]:
    """(Glance id, flavor) of a live image of a demo-guest server on compute1."""
    with vmstream_openstack.cloud() as cloud:
        flavor = cloud.ensure_flavor()
        reservation = cloud.create_servers("as-src", demo_image(cloud), flavor, host="compute1")
        (src,) = cloud.wait_servers(lambda ss: len(ss) == 1 and ss[0]["status"] == "ACTIVE", "ACTIVE", timeout=600,
                                    reservation_id=reservation)
        image_id = cloud.live_image(src["id"], "as-live")
        yield image_id, flavor
        cloud.delete_servers([src["id"]])
        cloud.delete_image(image_id)


def test_a_nova_group_spreads_over_computes_under_load_and_shrinks_after(vmstream_openstack: OpenStack,
                                                                          live_image: tuple[str, str]) -> None:
    openstack = vmstream_openstack

    def vm_on(host: str, name: str) -> dict[str, Any] | None:
        vm: dict[str, Any] | None = agent_call(openstack, host, "GET", f"/v1/vms/{name}") if host in ("compute1", "compute2") else None
        return vm

    port = free_port()
    spec = NovaGroupSpec("as-test", live_image[0], live_image[1], min_size=1, max_size=3, target_inflight=1,
                         member_maxconn=2, scale_in_delay_s=2)
    with openstack.cloud() as cloud:
        group = NovaGroup(cloud, spec, Balancer("as-test", openstack.state / "lb", port), agent_locator(vm_on))
        group.start()
        try:
            assert len(group.serving()) == 1 and group.server_group is not None
            haproxy = group.balancer.pid()
            with Load(port, threads=6) as load:
                deadline = time.monotonic() + 600
                while len(load.hosts()) < 3:
                    assert time.monotonic() < deadline, f"3 members never answered: {group.hosts()}, {group.last_error}"
                    time.sleep(0.5)
                assert sorted(group.hosts()) == ["compute1", "compute2"], group.hosts()
            deadline = time.monotonic() + 300
            while len(group.members) > 1:
                assert time.monotonic() < deadline, f"the group did not shrink back: {group.members}"
                time.sleep(0.5)
            assert load.failures() == [], load.failures()[:5]
            left = [s["id"] for s in cloud.servers(name="as-test")]
            assert left == list(group.members), left
        finally:
            group.close()
        assert cloud.servers(name="as-test") == []
        groups = cloud.json("compute", "GET", "/os-server-groups")["server_groups"]
        assert "as-test" not in {g["name"] for g in groups}
        assert haproxy not in pids_mentioning(openstack.state, b"haproxy")
