"""A test bed of several 'hosts' on one machine, as network namespaces.

Topology (every part inside namespaces this object creates):

    client ns (PREFIX-c)          fabric ns (PREFIX-f)             host ns (PREFIX-a, PREFIX-b, ...)
    eth0 10.77.0.250/24 ---veth--- fab0 (bridge) ---veth "ha"--- up0 -- br0 10.77.0.1/24 -- tapX (VM 10.77.0.10)
                                        |---------veth "hb"--- up0 -- br0 10.77.0.2/24 -- tapY

One L2 segment spans the fabric bridge and every host's bridge, so a VM's
static address (10.77.0.10+) stays valid wherever its tap is: moving a VM
only moves its MAC from one bridge port to another. The fabric is also
programmable like an SDN switch: move_mac() points the VM's MAC at the
destination before the source stops, so frames sent during the switch-over
wait in the destination's tap queue instead of being lost in the source's.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from dataclasses import dataclass
from types import TracebackType

from vmstream.net.links import Bridge, NetError, Netns, Tap, Veth, in_netns, namespaces_with_prefix, run

SUBNET = "10.77.0"
PREFIX_LEN = 24
CLIENT_HOST = 250
HOST_BRIDGE = "br0"
FABRIC_BRIDGE = "fab0"
UPLINK = "up0"


@dataclass(frozen=True)
class HostNet:
    """One host of the test bed: its namespace, bridge and own address."""

    name: str
    netns: str
    ip: str
    fabric_port: str  # its uplink's peer on the fabric bridge
    bridge: str = HOST_BRIDGE


class TestBed:
    """Fabric + hosts + a client namespace; removes all of it on exit, also on failure."""

    __test__ = False  # not a pytest class

    def __init__(self, prefix: str, hosts: tuple[str, ...] = ("a", "b"), subnet: str = SUBNET) -> None:
        if len(prefix) + 2 > 15:
            raise NetError(f"test bed prefix {prefix!r} is too long: at most 13 characters")
        self.prefix = prefix
        self.subnet = subnet
        self.fabric = f"{prefix}-f"
        self.client = f"{prefix}-c"
        self.client_ip = f"{subnet}.{CLIENT_HOST}"
        self.hosts = {
            h: HostNet(h, f"{prefix}-{h}", f"{subnet}.{i + 1}", f"h{h}") for i, h in enumerate(hosts)
        }
        self._stack = contextlib.ExitStack()
        self._taps: dict[tuple[str, str], Tap] = {}

    def __enter__(self) -> TestBed:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        enter = self._stack.enter_context
        enter(Netns(self.fabric))
        enter(Bridge(FABRIC_BRIDGE, self.fabric))
        for host in self.hosts.values():
            enter(Netns(host.netns))
            enter(Bridge(host.bridge, host.netns, f"{host.ip}/{PREFIX_LEN}"))
            enter(Veth(self.fabric, host.fabric_port, host.netns, UPLINK, master_a=FABRIC_BRIDGE, master_b=host.bridge))
        enter(Netns(self.client))
        enter(Veth(self.fabric, "cl0", self.client, "eth0", master_a=FABRIC_BRIDGE,
                   address_b=f"{self.client_ip}/{PREFIX_LEN}"))

    def close(self) -> None:
        """Remove taps, then links and namespaces in reverse order of creation."""
        for tap in list(self._taps.values()):
            tap.close()
        self._taps.clear()
        self._stack.close()

    def leftovers(self) -> list[str]:
        """Namespaces of this test bed still present (empty after close)."""
        return namespaces_with_prefix(self.prefix + "-")

    def vm_ip(self, index: int) -> str:
        """The static address of VM number index (0-based): 10.77.0.10, .11, ..."""
        return f"{self.subnet}.{10 + index}"

    @property
    def netmask(self) -> str:
        bits = (0xFFFFFFFF << (32 - PREFIX_LEN)) & 0xFFFFFFFF
        return ".".join(str((bits >> s) & 0xFF) for s in (24, 16, 8, 0))

    # ---- VM taps ----------------------------------------------------------------

    def add_tap(self, host: str, name: str) -> Tap:
        """A tap on host's bridge; owned by the test bed until remove_tap or close.

        Its queue holds 10000 frames: frames for a VM arriving while it
        migrates in wait there until its QEMU runs.
        """
        h = self.hosts[host]
        tap = Tap(name, h.netns, h.bridge)
        tap.__enter__()
        try:
            run(["ip", "link", "set", name, "txqueuelen", "10000"], h.netns)
        except BaseException:
            tap.close()
            raise
        self._taps[(host, name)] = tap
        return tap

    def remove_tap(self, host: str, name: str) -> None:
        tap = self._taps.pop((host, name), None)
        if tap is not None:
            tap.close()

    # ---- switching ------------------------------------------------------------------

    def switch(self, mac: str, src: str, dst: str, dst_tap: str) -> FabricSwitch:
        """The network side of moving the VM with this MAC from host src to dst's tap."""
        return FabricSwitch(self, mac, src, dst, dst_tap)

    def connect(self, ip: str, port: int, from_ns: str | None = None, timeout: float = 2.0) -> socket.socket:
        """A TCP connection to ip:port made from from_ns (default: the client namespace)."""
        with in_netns(from_ns or self.client):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        return sock


def _batch(netns: str, lines: list[str], check: bool) -> None:
    """Several bridge commands in one process (one fork, ~3 ms) inside netns."""
    proc = subprocess.run(["bridge", "-n", netns, "-force", "-batch", "-"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetError(f"bridge commands in {netns} failed ({'; '.join(lines)}): {proc.stderr.strip()}")


class FabricSwitch:
    """Moves one VM's MAC between hosts without losing a frame.

    open(): before the source stops, the fabric floods the VM's frames to
    every host (learning off on the source host's port, its entry flushed)
    and the destination's bridge sends them to the destination tap, where
    they wait until the destination QEMU runs. The source still gets them
    while it runs; the destination gets each one again, and TCP drops the
    duplicates. So a frame arriving during the switch-over is never lost.
    commit(): the destination runs; learning comes back on, and the VM's own
    frames (QEMU's announce) teach every bridge its new port.
    abort(): the migration failed; back to the source.
    """

    def __init__(self, bed: TestBed, mac: str, src: str, dst: str, dst_tap: str) -> None:
        self.bed, self.mac, self.dst_tap = bed, mac, dst_tap
        self.src, self.dst = bed.hosts[src], bed.hosts[dst]
        self.opened = False

    def open(self) -> None:
        _batch(self.dst.netns, [f"fdb replace {self.mac} dev {self.dst_tap} master static"], check=True)
        _batch(self.bed.fabric, [f"link set dev {self.src.fabric_port} learning off",
                                 f"fdb del {self.mac} dev {self.src.fabric_port} master"], check=False)
        self.opened = True

    def commit(self) -> None:
        self._restore()

    def abort(self) -> None:
        self._restore()

    def _restore(self) -> None:
        if not self.opened:
            return
        _batch(self.bed.fabric, [f"link set dev {self.src.fabric_port} learning on"], check=False)
        _batch(self.dst.netns, [f"fdb del {self.mac} dev {self.dst_tap} master"], check=False)
        self.opened = False
