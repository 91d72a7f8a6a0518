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

from vmstream.net.links import Bridge, NetError, Netns, Tap, Veth, in_netns, namespaces_with_prefix

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
        """A tap on host's bridge; owned by the test bed until remove_tap or close."""
        h = self.hosts[host]
        tap = Tap(name, h.netns, h.bridge)
        tap.__enter__()
        self._taps[(host, name)] = tap
        return tap

    def remove_tap(self, host: str, name: str) -> None:
        tap = self._taps.pop((host, name), None)
        if tap is not None:
            tap.close()

    # ---- switching ------------------------------------------------------------------

    def _fdb(self, mac: str, src: str, dst: str, dst_tap: str, op: str) -> list[tuple[list[str], str]]:
        s, d = self.hosts[src], self.hosts[dst]
        extra = ["master", "static"] if op == "replace" else ["master"]
        return [
            (["bridge", "fdb", op, mac, "dev", d.fabric_port, *extra], self.fabric),
            (["bridge", "fdb", op, mac, "dev", UPLINK, *extra], s.netns),
            (["bridge", "fdb", op, mac, "dev", dst_tap, *extra], d.netns),
        ]

    def move_mac(self, mac: str, src: str, dst: str, dst_tap: str) -> None:
        """Point mac at dst's tap in every bridge (static entries), all three at once."""
        self._parallel(self._fdb(mac, src, dst, dst_tap, "replace"), check=True)

    def release_mac(self, mac: str, src: str, dst: str, dst_tap: str) -> None:
        """Drop the static entries again; the bridges relearn from the VM's own frames."""
        self._parallel(self._fdb(mac, src, dst, dst_tap, "del"), check=False)

    @staticmethod
    def _parallel(cmds: list[tuple[list[str], str]], check: bool) -> None:
        procs = []
        for args, ns in cmds:
            procs.append((subprocess.Popen([args[0], "-n", ns, *args[1:]], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True), args))
        errors = []
        for p, args in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                errors.append(f"'{' '.join(args)}': {err.strip()}")
        if check and errors:
            raise NetError("switching the VM's MAC failed: " + "; ".join(errors))

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
