"""How this host's VMs reach the network: slirp (the default) or a bridge.

Slirp gives each VM a host port on 127.0.0.1 and needs nothing set up, but a
VM's address changes with its host. With a bridge, each VM gets a tap on it
and a static address from this host's range; the address stays with the VM
when it migrates to another host on the same L2 segment, and so do its TCP
connections. Set by the agent's settings (vmstream.settings), i.e. its environment:

    VMSTREAM_BRIDGE=br0                          the bridge (must exist)
    VMSTREAM_NETNS=hosta                         the namespace it is in (default: this one)
    VMSTREAM_VM_ADDRESSES=10.77.0.10-10.77.0.49/24   addresses this host hands out
    VMSTREAM_VM_GATEWAY=10.77.0.1                optional

Hosts on one segment need disjoint ranges: a VM keeps its address wherever it runs,
and its home host keeps it lent meanwhile (VmRegistry.delete, docs/migration.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
from dataclasses import dataclass

from vmstream.errors import InvalidInput
from vmstream.net.links import NETNS_DIR, in_netns_if
from vmstream.settings import Settings


@dataclass(frozen=True)
class BridgedNet:
    bridge: str
    netns: str | None
    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address
    prefix_len: int
    gateway: str | None

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix_len}").netmask)

    def addresses(self) -> list[str]:
        return [str(ipaddress.IPv4Address(i)) for i in range(int(self.first), int(self.last) + 1)]

    @staticmethod
    def tap_name(vm_id: str) -> str:
        """The tap a VM's QEMU attaches to: named after its vm_id, so it is found again after a restart."""
        return f"vs{vm_id[:12]}"

    def create_tap(self, vm_id: str) -> str:
        name = self.tap_name(vm_id)
        self.remove_tap(vm_id)  # left by a crash: start clean
        _run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"], self.netns)
        _run(["ip", "link", "set", name, "master", self.bridge, "up"], self.netns)
        return name

    def remove_tap(self, vm_id: str) -> None:
        _run(["ip", "link", "del", self.tap_name(vm_id)], self.netns, check=False)

    def claim(self, vm_id: str, mac: str) -> None:
        """Make frames for an arriving VM come here while it is between hosts (its source
        stopped, this QEMU not yet running): this bridge sends its MAC to its tap, where they
        wait for the guest, and a RARP from this bridge teaches the switches on the segment
        this host's port. Without it, frames keep going to the stopped source until the
        guest's own announce, tens of milliseconds later; what reached the source meanwhile
        is handed on (Starter.queued_frames), and the guest's announce confirms the claim."""
        cmd = ["bridge", *(["-n", self.netns] if self.netns else []),  # -n: no 'ip netns exec' fork, this is downtime
               "fdb", "replace", mac, "dev", self.tap_name(vm_id), "master", "dynamic"]
        _run(cmd, None)
        with in_netns_if(self.netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with sock:
            sock.bind((self.bridge, 0x8035))  # ETH_P_RARP, the frame's own type
            sock.send(rarp_frame(mac))

    def open_tap(self, vm_id: str) -> int:
        """A descriptor of a VM's tap, for its QEMU (fd=) and kept by the agent too. Frames that
        reach the tap while the VM is stopped for a move wait in the tap's queue; with this
        descriptor the source hands them to the destination once the VM runs there (read_queued),
        instead of losing them when the tap goes (a new connection's SYN lost costs it 1 s)."""
        with in_netns_if(self.netns):  # a tap is found by name in the opener's namespace
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.tap_name(vm_id).encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as exc:
            os.close(fd)
            raise InvalidInput(f"cannot open tap {self.tap_name(vm_id)}: {exc.strerror}") from None
        return fd

    @staticmethod
    def read_queued(fd: int, mac: str) -> list[bytes]:
        """The frames for mac waiting on a moved VM's tap, each with its offload header
        (struct virtio_net_hdr: GSO, checksum). Broadcasts are left: every host got them.
        Reads at most a tap queue's worth."""
        want = bytes.fromhex(mac.replace(":", ""))
        hdr_len = struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0]
        os.set_blocking(fd, False)
        frames = []
        for _ in range(MAX_QUEUED_FRAMES):
            try:
                data = os.read(fd, 65536 + hdr_len)
            except BlockingIOError:
                break
            if data[hdr_len:hdr_len + 6] == want:
                frames.append(data[:VIRTIO_NET_HDR_LEN] + data[hdr_len:])
        return frames

    def deliver(self, frames: list[bytes]) -> int:
        """Send frames (as read_queued gives them) from this host's bridge device: its table sends
        them to the VM's tap, and a bridge learns nothing from what it sends itself (so the
        senders' MACs are not taught a wrong port); how many the kernel took."""
        with in_netns_if(self.netns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sent = 0
        with sock:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            for f in frames:
                if len(f) < VIRTIO_NET_HDR_LEN + 14:
                    continue
                proto = int.from_bytes(f[VIRTIO_NET_HDR_LEN + 12:VIRTIO_NET_HDR_LEN + 14], "big")
                with contextlib.suppress(OSError):  # a frame the kernel will not take is lost, as it was before
                    sock.sendto(f, (self.bridge, proto))
                    sent += 1
        return sent


TUNSETIFF, TUNGETVNETHDRSZ = 0x400454CA, 0x800454D7
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
SOL_PACKET, PACKET_VNET_HDR = 263, 15
MAX_QUEUED_FRAMES = 4096  # a tap's queue holds 1000 (txqueuelen)
MAX_FRAMES_BODY = 32 << 20  # what one POST /v1/vms/{name}/frames may carry
VIRTIO_NET_HDR_LEN = 10  # struct virtio_net_hdr; a tap's may be 12 (num_buffers), which a packet socket does not take


def pack_frames(frames: list[bytes]) -> bytes:
    """Frames as one body between agents: each a 4-byte big-endian length, then its bytes."""
    return b"".join(len(f).to_bytes(4, "big") + f for f in frames)


def unpack_frames(body: bytes) -> list[bytes]:
    """The frames of a pack_frames body; InvalidInput naming the problem if it is not one."""
    frames, pos = [], 0
    while pos < len(body):
        n = int.from_bytes(body[pos:pos + 4], "big")
        if pos + 4 > len(body) or n > 65536 + VIRTIO_NET_HDR_LEN or pos + 4 + n > len(body):
            raise InvalidInput(f"bad frame list at byte {pos}: each frame is a 4-byte big-endian length "
                               f"(at most {65536 + VIRTIO_NET_HDR_LEN}) and that many bytes")
        frames.append(body[pos + 4:pos + 4 + n])
        pos += 4 + n
    if len(frames) > MAX_QUEUED_FRAMES:
        raise InvalidInput(f"{len(frames)} frames: at most {MAX_QUEUED_FRAMES} at a time")
    return frames


def rarp_frame(mac: str) -> bytes:
    """A broadcast RARP request from mac, as QEMU's announce-self sends for a NIC."""
    hw = bytes.fromhex(mac.replace(":", ""))
    payload = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, hw, bytes(4), hw, bytes(4))
    return (b"\xff" * 6 + hw + struct.pack("!H", 0x8035) + payload).ljust(60, b"\0")


def _run(args: list[str], netns: str | None, check: bool = True) -> None:
    cmd = ["ip", "netns", "exec", netns, *args] if netns else args
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise InvalidInput(f"'{' '.join(cmd)}' failed: {proc.stderr.strip()}")


def from_settings(settings: Settings) -> BridgedNet | None:
    """The bridged network the settings ask for, checked; None for slirp."""
    bridge, netns, spec = settings.bridge, settings.netns, settings.vm_addresses
    if not bridge:
        return None
    if netns and not (NETNS_DIR / netns).exists():
        raise InvalidInput(f"VMSTREAM_NETNS={netns}: no such network namespace (ip netns add {netns})")
    where = f" in namespace {netns}" if netns else ""
    probe = subprocess.run(["ip", *(["-n", netns] if netns else []), "link", "show", bridge, "type", "bridge"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0 or bridge not in probe.stdout:
        ns = f"-n {netns} " if netns else ""
        raise InvalidInput(f"VMSTREAM_BRIDGE={bridge}: no such bridge{where}; make it with 'ip {ns}link add {bridge} type bridge'")
    try:
        span, _, plen = spec.partition("/")
        lo, _, hi = span.partition("-")
        first, last = ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi or lo)
        prefix_len = int(plen)
        net = ipaddress.IPv4Network(f"{first}/{prefix_len}", strict=False)
        if last < first or last not in net:
            raise ValueError("range")
    except ValueError:
        raise InvalidInput(
            f"VMSTREAM_VM_ADDRESSES={spec!r} is not an address range: write it as FIRST-LAST/PREFIX, "
            "e.g. 10.77.0.10-10.77.0.49/24 (the addresses this host gives its VMs)"
        ) from None
    return BridgedNet(bridge, netns, first, last, prefix_len, settings.vm_gateway)
