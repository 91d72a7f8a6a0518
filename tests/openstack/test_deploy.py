"""`vmstream openstack up|status|down` on a real deployment (MariaDB, RabbitMQ, Keystone,
Glance, Placement, Neutron, Nova with 2 FakeDriver computes), used through the real APIs.

Select with `pytest -m openstack`; deselect with `-m "not openstack"`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.openstack.conftest import OpenStack, processes_mentioning, vmstream

pytestmark = pytest.mark.openstack

TINY_IMAGE = b"\0" * (1 << 20)  # the FakeDriver never reads it


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """Runs first (before the module's deployment): another listener on a port we need."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 9696))
        s.listen()
        proc = vmstream("openstack", "up", "--dir", str(tmp_path), "--no-install", timeout=120)
    said = " ".join(proc.stderr.split())  # rich wraps long lines
    assert proc.returncode == 4, said
    assert "port 9696 (neutron)" in said and "stop that process" in said
    assert not processes_mentioning(tmp_path)
    assert not list((tmp_path / "pids").glob("*.json"))


def test_up_again_says_it_is_up_and_status_shows_every_service(openstack: OpenStack) -> None:
    t0 = time.monotonic()
    again = vmstream("openstack", "up", "--dir", str(openstack.state), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_up"] is True
    assert time.monotonic() - t0 < 30

    st = vmstream("openstack", "status", "--dir", str(openstack.state), "--json")
    assert st.returncode == 0, st.stdout + st.stderr
    services = {s["name"]: s for s in json.loads(st.stdout)["services"]}
    expected = {"mariadb", "rabbitmq", "epmd", "keystone", "placement", "glance", "neutron", "nova-api",
                "nova-conductor", "nova-scheduler", "compute1", "compute2"}
    assert set(services) == expected
    assert all(s["running"] and s["answers"] and s["pid"] for s in services.values()), services


def test_two_servers_through_the_openstack_cli(openstack: OpenStack) -> None:
    """Flavor, image, 2 servers ACTIVE on the FakeDriver computes, deleted: the `openstack` CLI
    with the deployment's openrc."""
    flavor = openstack.osc("flavor", "create", "--ram", "256", "--vcpus", "1", "--disk", "1", "cli.tiny")
    image_file = openstack.state / "tiny.raw"
    image_file.write_bytes(TINY_IMAGE)
    image = openstack.osc("image", "create", "--disk-format", "raw", "--container-format", "bare",
                          "--file", str(image_file), "cli-tiny")
    assert openstack.osc("image", "show", image["id"])["status"] == "active"  # create shows it before the upload
    openstack.osc("server", "create", "--image", image["id"], "--flavor", flavor["id"], "--nic", "none",
                  "--min", "2", "--max", "2", "cli")
    deadline = time.monotonic() + 120
    while True:
        servers = openstack.osc("server", "list", "--long", "--name", "^cli")
        if len(servers) == 2 and all(s["Status"] == "ACTIVE" for s in servers):
            break
        assert not any(s["Status"] == "ERROR" for s in servers), servers
        assert time.monotonic() < deadline, f"not ACTIVE in 120 s: {servers}"
        time.sleep(1)
    assert {s["Host"] for s in servers} <= {"compute1", "compute2"}

    # without --wait, which waits for one server after another with 5 s polls
    _run_osc_plain(openstack, "server", "delete", *(s["ID"] for s in servers))
    deadline = time.monotonic() + 120
    while openstack.osc("server", "list", "--name", "^cli"):
        assert time.monotonic() < deadline, "servers not gone in 120 s"
        time.sleep(1)


def test_ten_servers_through_the_api(openstack: OpenStack) -> None:
    """POST /servers with min_count = max_count = 10 to all ACTIVE, then deleted: Nova's own time."""
    with openstack.cloud() as cloud:
        flavor = cloud.ensure_flavor()
        image = cloud.upload_image("api-tiny", TINY_IMAGE)
        t0 = time.monotonic()
        reservation = cloud.create_servers("ten", image, flavor, count=10)
        servers = cloud.wait_servers(lambda ss: len(ss) == 10 and all(s["status"] == "ACTIVE" for s in ss), "ACTIVE",
                                     reservation_id=reservation)
        active_s = time.monotonic() - t0
        hosts = sorted(s["OS-EXT-SRV-ATTR:host"] for s in servers)
        t1 = time.monotonic()
        for s in servers:
            cloud.request("compute", "DELETE", f"/servers/{s['id']}")
        cloud.wait_servers(lambda ss: not ss, "deleted", reservation_id=reservation)
        gone_s = time.monotonic() - t1
    print(f"10 servers ACTIVE in {active_s:.2f}s ({hosts.count('compute1')}/{hosts.count('compute2')}); deleted in {gone_s:.2f}s")
    assert set(hosts) <= {"compute1", "compute2"}
    assert active_s < 60


def _run_osc_plain(openstack: OpenStack, *args: str) -> None:
    env = {**os.environ, **openstack.creds.env(), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    proc = subprocess.run(["openstack", *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
