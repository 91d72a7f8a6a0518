"""Bridged hosts: two agents whose VMs sit on the bridges of a namespace test bed.

Each agent keeps its VMs on the bridge of one test-bed host (VMSTREAM_BRIDGE,
VMSTREAM_NETNS) with addresses from its own range. A client namespace talks to
the VMs' own addresses; a VM keeps its address, and a kept-alive connection
to it, when it migrates to the other host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hosts import bridged_host, fuse_mounts, http_get, our_qemu_pids, taps, vm_ip
from vmstream.host.network import BridgedNet, pack_frames, unpack_frames
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
        # destroyed on B, which does not know A: the address stays lent until A asks its peers
        assert b.run("destroy", c1["name"]).returncode == 0
        time.sleep(1.0)
        assert [r["vm"] for r in a.json("peer", "lent")] == [c1["name"]]
        assert a.json("peer", "lent", "--reconcile") == [], "no peer has the VM: its address is given back"
        # destroyed on B, which knows A now: B gives the address back itself
        assert a.json("migrate", c3["name"], "--to", "b")["state"] == "completed"
        assert [r["vm"] for r in a.json("peer", "lent")] == [c3["name"]]
        b.json("peer", "add", "a", "--home", str(a.home))
        assert b.run("destroy", c3["name"]).returncode == 0
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


def _wait_forwarding(netns: str, dev: str) -> None:
    deadline = time.monotonic() + 5
    while "state forwarding" not in subprocess.run(["bridge", "-n", netns, "link", "show", "dev", dev],
                                                   capture_output=True, text=True, check=False).stdout:
        assert time.monotonic() < deadline, f"{dev} in {netns} never forwarded"
        time.sleep(0.05)


def _send_from_client(bed: TestBed, dst: bytes, payload: bytes) -> bytes:
    """One raw frame from the client namespace (ethertype 0x88b5, local experimental); the client's MAC."""
    with in_netns(bed.client):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind(("eth0", 0x88B5))
        own = sock.getsockname()[4]
        sock.send(dst + own + b"\x88\xb5" + payload.ljust(46, b"\0"))
    return bytes(own)


def _read_all(fd: int) -> list[bytes]:
    os.set_blocking(fd, False)
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(os.read(fd, 70000))
    return out


def test_a_claim_and_the_frames_kept_for_a_moved_vm(bed: TestBed) -> None:
    """What the agents do around a move's switch-over, on real bridges and taps: the destination's
    claim (BridgedNet.claim) makes its bridge send the VM's MAC to the VM's tap and teaches the
    fabric its port; the source reads what reached the VM's tap meanwhile (read_queued: frames
    for the VM only) and the destination delivers it to its tap (deliver) without teaching the
    fabric a wrong port for the sender."""
    nets = {h: BridgedNet(HOST_BRIDGE, bed.hosts[h].netns, *[ipaddress.IPv4Address(f"{bed.subnet}.{i}") for i in (10, 20)],
                          24, None) for h in ("a", "b")}
    mac, vm_id = "52:54:00:12:34:56", "claimtest0001"
    fds = {}
    for h, net in nets.items():
        net.create_tap(vm_id)
        fds[h] = net.open_tap(vm_id)  # as QEMU holds it: the port forwards
    try:
        for h in nets:  # a new link's carrier comes up within a second (the kernel's link watch)
            for dev in (BridgedNet.tap_name(vm_id), UPLINK):
                _wait_forwarding(bed.hosts[h].netns, dev)
        nets["a"].claim(vm_id, mac)  # as if the VM ran on host a
        assert _fdb_port(bed.fabric, mac) == bed.hosts["a"].fabric_port
        assert _fdb_port(bed.hosts["a"].netns, mac) == BridgedNet.tap_name(vm_id)
        _read_all(fds["a"])  # what the claims flooded
        # the VM is stopped for its move: a frame for it, and a broadcast, wait on host a's tap
        client_mac = _send_from_client(bed, bytes.fromhex(mac.replace(":", "")), b"kept for the vm")
        _send_from_client(bed, b"\xff" * 6, b"for everyone")
        time.sleep(0.2)
        nets["b"].claim(vm_id, mac)  # it runs on host b now
        assert _fdb_port(bed.fabric, mac) == bed.hosts["b"].fabric_port, "the fabric sends its frames to host b"
        assert _fdb_port(bed.hosts["b"].netns, mac) == BridgedNet.tap_name(vm_id), "host b's bridge sends them to its tap"
        kept = nets["a"].read_queued(fds["a"], mac)
        assert len(kept) == 1 and b"kept for the vm" in kept[0], "only the frame for the VM is kept, not the broadcast"
        _read_all(fds["b"])
        assert nets["b"].deliver(unpack_frames(pack_frames(kept))) == 1
        time.sleep(0.2)
        assert any(b"kept for the vm" in f for f in _read_all(fds["b"])), "host b's tap got the kept frame"
        client_port = _fdb_port(bed.fabric, ":".join(f"{x:02x}" for x in client_mac))
        assert client_port == "cl0", f"the fabric still knows the client at its own port, not {client_port}"
    finally:
        for fd in fds.values():
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
