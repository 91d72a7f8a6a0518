"""Bridged hosts: two agents whose VMs sit on the bridges of a namespace test bed.

Each agent keeps its VMs on the bridge of one test-bed host (VMSTREAM_BRIDGE,
VMSTREAM_NETNS) with addresses from its own range. A client namespace talks to
the VMs' own addresses; a VM keeps its address, and a kept-alive connection
to it, when it migrates to the other host.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hosts import bridged_host, fuse_mounts, http_get, our_qemu_pids, taps, vm_ip
from vmstream.host.network import BridgedNet
from vmstream.net.links import in_netns, unique_prefix
from vmstream.net.testbed import HOST_BRIDGE, UPLINK, TestBed


@pytest.fixture
def bed() -> Iterator[TestBed]:
    with TestBed(unique_prefix("vb")) as b:
        yield b
    assert not b.leftovers(), "the test bed's namespaces were removed"


def test_bridged_vms_keep_their_address_and_connection_when_they_move(bed: TestBed, tmp_path: Path) -> None:
    a = bridged_host(bed, "a", tmp_path / "host-a", 10, 29)
    b = bridged_host(bed, "b", tmp_path / "host-b", 30, 49, VMSTREAM_STORE=str(tmp_path / "host-a" / "store"))
    try:
        src = a.json("boot", "src", "--memory", "256M")
        assert src["endpoint"] == f"http://{bed.subnet}.10/"
        assert a.ask("src", "memcheck-fill 32 11")["ok"]
        a.json("live-image", "create", "src", "br-img")
        c1, c2 = a.json("live-image", "start", "br-img", "--count", "2", "--name", "br")["vms"]
        ips = {v["endpoint"] for v in (src, c1, c2)}
        assert len(ips) == 3, f"each clone has its own address: {ips}"
        # every VM answers at its own address, from the client namespace
        for v in (src, c1, c2):
            with bed.connect(vm_ip(v), 80) as sock:
                assert http_get(sock, keep_alive=False) == v["name"]

        # a connection kept alive across the move: same address, same TCP connection
        sock = bed.connect(vm_ip(c1), 80, timeout=10)
        with sock:
            assert http_get(sock) == c1["name"]
            b.json("list")
            a.json("peer", "add", "b", "--home", str(b.home))
            moved = a.json("migrate", c1["name"], "--to", "b")
            assert moved["state"] == "completed", moved
            assert http_get(sock) == c1["name"], "the same connection answers from host B"
        on_b = {v["name"]: v for v in b.json("list")}
        assert on_b[c1["name"]]["endpoint"] == c1["endpoint"]
        assert c1["name"] not in {v["name"] for v in a.json("list")}
        verify = b.ask(c1["name"], "memcheck-verify")
        assert verify["ok"] and verify["result"]["bad_pages"] == 0, verify
        # its sibling and the source stay on A, at their addresses
        with bed.connect(vm_ip(c2), 80) as s2:
            assert http_get(s2, keep_alive=False) == c2["name"]
        assert len(taps(bed.hosts["a"].netns)) == 2 and len(taps(bed.hosts["b"].netns)) == 1
        # A keeps the moved VM's address for it: a new clone on A gets another one
        assert [(r["ip"], r["vm"], r["to_host"]) for r in a.json("peer", "lent")] == [(vm_ip(c1), c1["name"], "b")]
        (c3,) = a.json("live-image", "start", "br-img", "--name", "br-late")["vms"]
        assert vm_ip(c3) not in {vm_ip(v) for v in (src, c1, c2)}, c3
        with bed.connect(vm_ip(c1), 80) as s1:
            assert http_get(s1, keep_alive=False) == c1["name"], "the moved VM still answers at its address"
        # destroyed on B, it gives the address back to A (B knows A as a peer)
        b.json("peer", "add", "a", "--home", str(a.home))
        assert b.run("destroy", c1["name"]).returncode == 0
        deadline = time.monotonic() + 30
        while a.json("peer", "lent") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert a.json("peer", "lent") == [], "B gave the address back when the VM was destroyed there"
    finally:
        for host in (b, a):
            host.run("agent", "stop", "--destroy-vms")
    for host in (a, b):
        assert not our_qemu_pids(host.home) and not fuse_mounts(host.home)
    assert not taps(bed.hosts["a"].netns) and not taps(bed.hosts["b"].netns), "every VM's tap was removed"


def _fdb_port(netns: str, mac: str) -> str | None:
    """The port a bridge in netns sends frames for mac to (None: it does not know the MAC)."""
    out = subprocess.run(["bridge", "-n", netns, "fdb", "show"], capture_output=True, text=True, check=True).stdout
    ports = [line.split()[2] for line in out.splitlines() if line.startswith(mac) and "master" in line]
    return ports[0] if ports else None


def _attach(netns: str, tap: str) -> int:
    """Open a tap as QEMU does (its carrier comes up, so its bridge port forwards); the fd."""
    with in_netns(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000 | 0x4000))  # TUNSETIFF: TAP, NO_PI, VNET_HDR
    return fd


def _wait_forwarding(netns: str, dev: str) -> None:
    deadline = time.monotonic() + 5
    while "state forwarding" not in subprocess.run(["bridge", "-n", netns, "link", "show", "dev", dev],
                                                   capture_output=True, text=True, check=False).stdout:
        assert time.monotonic() < deadline, f"{dev} in {netns} never forwarded"
        time.sleep(0.05)


def test_a_claim_points_the_segment_at_the_arriving_host(bed: TestBed) -> None:
    """What the destination does the moment the source stops a VM (BridgedNet.claim): its
    bridge sends the VM's MAC to the VM's tap, and the fabric learns the host's port."""
    nets = {h: BridgedNet(HOST_BRIDGE, bed.hosts[h].netns, *[ipaddress.IPv4Address(f"{bed.subnet}.{i}") for i in (10, 20)],
                          24, None) for h in ("a", "b")}
    mac, vm_id = "52:54:00:12:34:56", "claimtest0001"
    held = []
    for h, net in nets.items():
        net.create_tap(vm_id)
        held.append(_attach(bed.hosts[h].netns, BridgedNet.tap_name(vm_id)))  # as QEMU holds it: the port forwards
    try:
        for h in nets:  # a new link's carrier comes up within a second (the kernel's link watch)
            for dev in (BridgedNet.tap_name(vm_id), UPLINK):
                _wait_forwarding(bed.hosts[h].netns, dev)
        nets["a"].claim(vm_id, mac)  # as if the VM ran on host a
        assert _fdb_port(bed.fabric, mac) == bed.hosts["a"].fabric_port
        assert _fdb_port(bed.hosts["a"].netns, mac) == BridgedNet.tap_name(vm_id)
        nets["b"].claim(vm_id, mac)  # it moves to host b
        assert _fdb_port(bed.fabric, mac) == bed.hosts["b"].fabric_port, "the fabric sends its frames to host b"
        assert _fdb_port(bed.hosts["b"].netns, mac) == BridgedNet.tap_name(vm_id), "host b's bridge sends them to its tap"
    finally:
        for fd in held:
            os.close(fd)
        for net in nets.values():
            net.remove_tap(vm_id)
    assert not taps(bed.hosts["a"].netns) and not taps(bed.hosts["b"].netns)


def test_bad_bridge_settings_are_refused(bed: TestBed, tmp_path: Path) -> None:
    bad = bridged_host(bed, "a", tmp_path / "bad", 10, 29, VMSTREAM_BRIDGE="nobr0")
    r = bad.run("list")
    assert r.returncode != 0 and "VMSTREAM_BRIDGE=nobr0: no such bridge" in " ".join(r.stderr.split()), r.stderr
    bad = bridged_host(bed, "a", tmp_path / "bad2", 10, 29, VMSTREAM_VM_ADDRESSES="10.77.0.10-9/24")
    r = bad.run("list")
    assert r.returncode != 0 and "is not an address range" in " ".join(r.stderr.split()), r.stderr
